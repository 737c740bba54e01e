"""AELFs: the simplified implementation of AELF (AELF paper, Sec. 3.2, Algorithm 2, Eq. (10)).

Algorithm 2:
    1: initialise c and w with standard training (ST) on the natural set
    2-6: for each mini-batch: make x' = x + delta (PGD), forward x, x' -> f, f' -> y_hat, y_hat'
    7: update c only:  c <- c - alpha * d(L_x + lambda L_x') / dc      (w is never updated)

with the loss of Eq. (10):

    lambda1 * CE(w(c(x)), y) + lambda2 * CE(w(c(x')), y) + beta * (||f||_2 + ||f'||_2)

The frozen w was fitted to clean embeddings only, so the label loss on x' pulls f' = c(x')
towards the region where w reads clean features (Appendix B.1): the one-way fitting f' -> f of
AELF, with a single softmax loss.

Reading of the paper, where it leaves room:
- ST phase: ``--init CKPT`` takes a ``train_at.py --standard`` checkpoint of the same model;
  without it the script runs the ST protocol of the dataset first (``--st-epochs``, MNIST 50
  epochs with lr x0.1 after 20 and 40; CIFAR 100 epochs, after 40 and 80) and saves it as
  ``st.pt`` in the run folder, which a later run reuses (or pass it to ``--init``).
- w frozen: ``fc`` has requires_grad False and is not in the optimizer, so neither the loss
  nor weight decay ever changes it.
- Batch (Appendix C, "for different JT ways"): of each batch of 128 the second half (64) is
  made adversarial and combined with the natural first half (``--split half``, default);
  ``--split full`` uses the whole batch twice.
- ||f||_2 (``--feature-norm``): the l2 norm of each embedding, averaged over the batch (``l2``,
  the default: Eq. (10) as written). The paper's beta 0.5 collapses its own CNN_B under it (every
  embedding shrinks towards 0 within about 30 steps from an ST init; README, "Findings"), the
  kind of limit App. B.2 warns of ("higher embedding dimension usually needs to smaller beta
  value"). So the default keeps the paper's term and lowers its value: beta 0.1 on ||f||_2 for
  cnn_b (the lower end of App. B.2's range [0.1, 0.5]; README, "AELFs' beta on the paper's
  norm"); WRN keeps the paper's 0.2. Other readings: ``rms`` (||f||_2 / sqrt(D)), ``ms``
  (||f||_2^2 / D), ``l2sq`` (||f||_2^2). A collapsing run says so in one warning line naming a
  smaller beta; ``--beta-adv`` sets a separate beta for f' (Sec. 3.2).
- BatchNorm (``--bn-batch``): x and x' go through c in one forward pass (``mixed``, one set of
  batch statistics for the combined batch, as a single-loss implementation does); ``separate``
  gives each half its own pass.
- LeakyReLU models by default: the paper warns that ReLU units can lock after the ST init.

    python train_aelfs.py --dataset mnist     # ST phase, then AELFs: AELF Table 2's row
"""
import math
import os
import time

import torch
import torch.nn.functional as F

import common
from attacks import pgd


# Readings of ||f||_2 in Eq. (10), per sample, then averaged over the batch (--feature-norm).
# The paper's, and the default, is 'l2'.
FEATURE_NORMS = {
    'l2': 'the l2 norm ||f||_2 (the paper)',
    'l2sq': 'the squared l2 norm ||f||_2^2',
    'rms': 'the l2 norm divided by sqrt(D): the root mean square of the D entries of f',
    'ms': 'the squared l2 norm divided by D: the mean of squares of the D entries of f',
}


def feature_norm(f, reading):
    """The batch mean of one reading of ||f||_2 (FEATURE_NORMS) for embeddings f (B x D)."""
    f = f.float().flatten(1)
    if reading == 'l2':
        per_sample = f.norm(dim=1)
    elif reading == 'l2sq':
        per_sample = f.pow(2).sum(dim=1)
    elif reading == 'rms':
        per_sample = f.norm(dim=1) / math.sqrt(f.shape[1])
    elif reading == 'ms':
        per_sample = f.pow(2).mean(dim=1)
    else:
        raise ValueError(f"unknown feature-norm reading {reading!r}; one of {sorted(FEATURE_NORMS)}")
    return per_sample.mean()


PAPER_BETA = {'cnn_b': 0.5, 'wrn': 0.2}     # Sec. 4.1 (CNN_B), Tables 4, 5 and App. B.2 (WRN)
DEFAULT_BETA = {'cnn_b': 0.1, 'wrn': 0.2}   # on ||f||_2: cnn_b's chosen by the README's sweep


def beta_in_paper_units(beta, reading, dim, model):
    """How a beta on a reading of the norm reads in the paper's units (beta on ||f||_2): 'rms'
    with beta b is 'l2' with b / sqrt(D); the squared readings have no such equivalent."""
    paper = PAPER_BETA.get(model)
    if paper is None:
        source = f"(the paper gives no beta for {model})"
    elif reading == 'l2' and beta == paper:
        source = f"(the paper's value for {model}" + ("; untested here)" if model == 'wrn' else ")")
    else:
        source = f"(paper: {paper:g} on ||f||_2" + (
            ", which collapses this model: README \"Findings\")" if model == 'cnn_b' else ")")
    if reading == 'l2':
        return f"beta {beta:g} on ||f||_2 {source}"
    if reading == 'rms':
        return (f"beta {beta:g} on ||f||_2 / sqrt(D) = beta {beta / math.sqrt(dim):.3g} on ||f||_2 "
                f"(D = {dim}) {source}")
    return f"beta {beta:g} on {FEATURE_NORMS[reading]}, not the paper's ||f||_2 {source}"


def parse_args(argv=None):
    parser = common.parser(__doc__)
    g = parser.add_argument_group('AELFs (Eq. (10))')
    g.add_argument('--lambda1', type=common.number('[0, 1000]'), default=0.5, help='weight of CE on natural inputs')
    g.add_argument('--lambda2', type=common.number('[0, 1000]'), default=0.5, help='weight of CE on adversarial inputs')
    g.add_argument('--beta', type=common.number('[0, 1000]'),
                   help="weight of the norm term, on the --feature-norm reading: 0.1 on ||f||_2 "
                        "for cnn_b (paper: 0.5, which collapses this model: README \"Findings\"), "
                        "0.2 for wrn (the paper's, untested here)")
    g.add_argument('--beta-adv', type=common.number('[0, 1000]'), help="weight of the f' norm term (default: --beta)")
    g.add_argument('--split', choices=['half', 'full'], default='half',
                   help='half: 2nd half of the batch adversarial (the paper); full: whole batch twice')
    g.add_argument('--feature-norm', choices=sorted(FEATURE_NORMS), default='l2',
                   help="reading of ||f||_2 in Eq. (10), per sample then batch mean: " +
                        '; '.join(f"{k}: {v}" for k, v in FEATURE_NORMS.items()))
    g.add_argument('--bn-batch', choices=['mixed', 'separate'], default='mixed',
                   help='mixed: x and x\' in one forward pass (one set of BatchNorm batch '
                        'statistics); separate: one pass each')
    g.add_argument('--init', help='ST checkpoint (train_at.py --standard) to start from')
    g.add_argument('--st-epochs', type=common.number('[1, 100000]', int),
                   help='epochs of the in-script ST phase')
    g.add_argument('--st-milestones', type=common.number('[1, 100000]', int), nargs='*',
                   help='lr milestones of the ST phase')

    def protocol(first, defaults):         # AELF Appendix C and Algorithm 2's notes
        defaults['act'] = 'leakyrelu'       # Alg. 2 note: ReLU units can lock after ST init
        # Alg. 2, line 1: App. C's ST protocol (MNIST 50 epochs, x0.1 at 20, 40; CIFAR 100, x0.1 at 40, 80);
        # --quick: its own epochs and milestones, the Results' ST row
        epochs, milestones = ((defaults['epochs'], defaults['milestones']) if first.quick else
                              (50, [20, 40]) if first.dataset == 'mnist' else (100, [40, 80]))
        defaults.update(st_epochs=epochs, st_milestones=milestones)
        defaults['beta'] = DEFAULT_BETA.get(first.model or defaults['model'], DEFAULT_BETA['cnn_b'])
        defaults['beta_adv'] = first.beta if first.beta is not None else defaults['beta']
    return common.parse(parser, argv, protocol)


def aelfs_loss(model, x_nat, x_adv, y_nat, y_adv, lambda1, lambda2, beta, beta_adv,
               reading='l2', bn_batch='mixed'):
    """Eq. (10) on one batch. Returns (loss, logits of [x_nat; x_adv], f, f')."""
    if bn_batch == 'mixed':                                   # Alg. 2, line 5: x, x' -c-> f, f'
        f_all = model.features(torch.cat([x_nat, x_adv]))
        f, f_adv = f_all[:len(x_nat)], f_all[len(x_nat):]
    else:
        f, f_adv = model.features(x_nat), model.features(x_adv)
    logit_nat, logit_adv = model.fc(f).float(), model.fc(f_adv).float()   # frozen w
    loss = (lambda1 * F.cross_entropy(logit_nat, y_nat)       # lambda1 L(c; x, y)
            + lambda2 * F.cross_entropy(logit_adv, y_adv)     # lambda2 L(c; x', y)
            + beta * feature_norm(f, reading)                 # beta ||f||_2
            + beta_adv * feature_norm(f_adv, reading))        # beta ||f'||_2
    return loss, torch.cat([logit_nat, logit_adv]), f, f_adv


def standard_training(model, args, train_set, device):
    """Alg. 2, line 1: ST on the natural set (the ST protocol of the dataset)."""
    optimizer = common.distributed_optimizer(torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay))
    for epoch in range(args.st_epochs):
        lr = common.start_epoch(epoch, args, optimizer, seed=args.seed + 1, milestones=args.st_milestones)
        model.train()
        t0, seen, loss_sum = time.time(), 0, 0.0
        for step, (x, y) in enumerate(common.batches(train_set, args.batch_size, shuffle=True,
                                                     padding=args.padding)):
            with common.autocast(device, args.amp):
                loss = F.cross_entropy(model(x).float(), y)   # Eq. (1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            (loss_value,) = common.check_finite(epoch, step, loss)   # a NaN stops the run
            loss_sum += loss_value * len(y)
            seen += len(y)
        seconds = time.time() - t0
        loss_sum, seen = common.all_sum(loss_sum, seen)
        print(f"ST phase epoch {epoch + 1}/{args.st_epochs} | lr {lr:.4g} | loss {loss_sum / seen:.4f} | "
              f"{seconds:.1f}s | {seen / seconds:.0f} img/s", flush=True)


@common.main_guard
def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args)                     # seeded; torchrun: README "Several GPUs"
    model = common.build_model(args, device)
    common.compile_model(model, args.compile)          # --compile: README "Speed"
    run = common.Run(args, 'aelfs')
    st_path = os.path.join(run.dir, 'st.pt')
    if args.init:
        common.load_weights_into(model, args.init)   # one-line error for another model
    train_set, val_set, test_set = common.load_data(args, device)

    def attack(m, x, y, scale=1.0):   # scale < 1: the eps warm-up (--eps-warmup), training only
        return pgd(m, x, y, scale * args.eps, args.steps, scale * args.step_size, args.random_start)

    # Alg. 2, line 1: c and w from standard training (skipped when resuming AELFs itself)
    if run.resume_ckpt is None and not args.init:
        if os.path.exists(st_path) and not args.overwrite:
            common.load_weights_into(model, st_path)
            print(f"using the ST phase saved in {st_path}")
        else:
            print(f"ST phase: {args.st_epochs} epochs on clean data (saved to {st_path})", flush=True)
            standard_training(model, args, train_set, device)
            st_metrics = common.validation_metrics(model, val_set, None, args) if len(val_set) else {}
            common.save_checkpoint(st_path, model, args, args.st_epochs, None, st_metrics,
                                   finished=True, script='aelfs-st-phase')
            print(f"ST phase done" + (f": val nat {st_metrics['val_nat']:.2f}%" if st_metrics else ''),
                  flush=True)
    # Freeze w: never updated again (Alg. 2 note: "The w is not updated during AELFs")
    model.fc.requires_grad_(False)
    params_c = [p for name, p in model.named_parameters() if not name.startswith('fc.')]
    optimizer = common.distributed_optimizer(torch.optim.SGD(
        params_c, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay))
    run.resume(model, optimizer.load_state_dict)
    w_start = {k: v.detach().clone() for k, v in model.fc.state_dict().items()}

    dim = model.fc.in_features
    print(f"AELFs {common.summary(args, model, train_set, val_set, test_set)}, lambda {args.lambda1}:{args.lambda2}, "
          f"{beta_in_paper_units(args.beta, args.feature_norm, dim, args.model)}"
          f"{f', beta_adv {args.beta_adv:g}' if args.beta_adv != args.beta else ''}, "
          f"split {args.split}, BN {args.bn_batch}, init {args.init or st_path}, {device}", flush=True)
    steps_per_epoch = -(-len(train_set) // args.batch_size)
    watch = common.CollapseWatch(
        args.dataset,
        f"beta {args.beta:g}/{args.beta_adv:g} on --feature-norm {args.feature_norm} is too strong for "
        f"this model; try a smaller beta with the same reading (e.g. --beta {args.beta / 10:g})")
    for epoch in range(run.start_epoch, args.epochs):
        lr = common.start_epoch(epoch, args, optimizer)   # re-seeded; lr x0.1 at --milestones
        scale = min(1.0, (epoch + 1) / args.eps_warmup) if args.eps_warmup else 1.0   # --eps-warmup
        model.train()
        loss_sum, n_correct, n_predicted, seen = 0.0, 0, 0, 0
        t0 = time.time()
        for step, (x, y) in enumerate(common.batches(train_set, args.batch_size, shuffle=True,
                                                     padding=args.padding)):
            with common.autocast(device, args.amp):
                # Alg. 2, lines 3-4: the second half of the batch becomes adversarial (App. C)
                if args.split == 'half':
                    half = len(x) // 2
                    x_nat, y_nat, x_src, y_adv = x[:half], y[:half], x[half:], y[half:]
                else:
                    x_nat, y_nat, x_src, y_adv = x, y, x, y
                x_adv = attack(model, x_src, y_adv, scale)   # eval mode while attacking
                # Alg. 2, lines 5-6 and Eq. (10)
                loss, logits, f, f_adv = aelfs_loss(model, x_nat, x_adv, y_nat, y_adv,
                                                    args.lambda1, args.lambda2, args.beta,
                                                    args.beta_adv, args.feature_norm, args.bn_batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()                                  # Alg. 2, line 7: c only
            (loss_value,) = common.check_finite(epoch, step, loss)   # a NaN stops the run
            loss_sum += loss_value * len(y)
            n_correct += (logits.argmax(1) == torch.cat([y_nat, y_adv])).sum()   # on the device: no sync per step
            n_predicted += len(logits)
            seen += len(y)
            watch.step(f, f_adv, logits[:len(y_nat)], y_nat, epoch)
            run.progress(step + 1, steps_per_epoch, seen, loss_value)
        seconds = time.time() - t0
        loss_sum, n_correct, n_predicted, seen = common.all_sum(
            loss_sum, int(n_correct), n_predicted, seen)

        final = epoch + 1 == args.epochs
        metrics = {}          # the validation split, never the test split, chooses best.pt
        if len(val_set):      # best.pt: the worst case of the PGD and a CW-PGD from a random start
            metrics = common.validation_metrics(model, val_set, attack, args)
        record = {'epoch': epoch + 1, 'lr': lr, 'train_loss': loss_sum / seen,
                  'train_acc': 100.0 * n_correct / n_predicted, **metrics,
                  **watch.end_epoch(epoch),
                  'val_images': len(val_set), 'seconds': seconds,
                  'images_per_s': seen / seconds}
        run.log_epoch(record, args.epochs)
        run.save(model, epoch + 1, optimizer.state_dict(), metrics, score=metrics.get('val_worst'),
                 finished=final, init=args.init or st_path)
    if not all(torch.equal(v, model.fc.state_dict()[k]) for k, v in w_start.items()):
        raise RuntimeError('w (fc) changed during AELFs: it must stay frozen')   # never expected
    run.finish(model, test_set, attack)      # final.json (nothing to do if it holds the last epoch)


if __name__ == '__main__':
    main()
