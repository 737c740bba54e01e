"""JT: joint training on natural and adversarial inputs (Kurakin et al. 2017; AELF Eq. (4)),
and JT* (AELF Table 3: "JT with our two actions").

    JT:   lambda1 * CE(M(x), y) + lambda2 * CE(M(x'), y)                       # Eq. (4)
    JT*:  JT + ST initialisation (--init) + beta * (||f||_2 + ||f'||_2)         # as in Eq. (10)

x' is the training PGD (eval mode while attacking, AELF Appendix C). Unlike AELFs, JT and JT*
update every parameter, the final layer w included.

Reading of the paper, where it leaves room:
- Batch (Appendix C, "for different JT ways, the second half inputs (64) are used to generate
  adversarial data and combined with rest of natural data"): with ``--split half`` (the
  default, the paper's choice) the first half of each batch of 128 stays natural and the
  second half is replaced by its PGD example; ``--split full`` uses the whole batch twice,
  natural and adversarial (2 x 128 images per step). The combined batch goes through the
  network in one forward pass (shared BatchNorm batch statistics).
- Eq. (4) writes CE(x) + lambda CE(x'); Table 3 uses ratios lambda1:lambda2 (0.4:0.6,
  0.5:0.5, 0.6:0.4), which is what ``--lambda1/--lambda2`` give.
- JT* = JT from an ST checkpoint (``--init``) with the norm term. ||f||_2 is read as in
  train_aelfs.py (``--feature-norm``, default ``l2``: the paper's norm, per sample, batch mean)
  and beta defaults to AELFs' value there, 0.1 on ||f||_2 for cnn_b (paper: 0.5, which
  collapses AELFs on this model: README "Findings"; JT* also trains w) and 0.2 for wrn. Without
  ``--init`` beta is 0 (JT); ``--beta`` sets it either way. The log records mean ||f|| and
  ||f'|| and warns on a collapse.

    python train_jt.py --dataset mnist                                   # JT 0.5:0.5
    python train_jt.py --dataset cifar10 --init runs/st-cifar10-cnn_b-s8/last.pt   # JT*
"""
import time

import torch
import torch.nn.functional as F

import common
from attacks import pgd


def parse_args(argv=None):
    parser = common.parser(__doc__)
    g = parser.add_argument_group('JT (Eq. (4)) and JT*')
    g.add_argument('--lambda1', type=common.number('[0, 1000]'), default=0.5, help='weight of CE on natural inputs')
    g.add_argument('--lambda2', type=common.number('[0, 1000]'), default=0.5, help='weight of CE on adversarial inputs')
    g.add_argument('--split', choices=['half', 'full'], default='half',
                   help='half: 2nd half of the batch adversarial (the paper); full: whole batch twice')
    g.add_argument('--init', help='JT*: start from this ST checkpoint (train_at.py --standard)')
    g.add_argument('--beta', type=common.number('[0, 1000]'),
                   help="weight of ||f||_2 + ||f'||_2: 0 without --init (JT); with --init (JT*) "
                        "0.1 on ||f||_2 for cnn_b (paper: 0.5, which collapses AELFs on this model: "
                        "README \"Findings\"), 0.2 for wrn (the paper's, untested here)")
    g.add_argument('--feature-norm', choices=FEATURE_NORMS, default='l2',
                   help="JT*: reading of ||f||_2, as in train_aelfs.py (l2: the paper's norm)")

    def protocol(first, defaults):         # AELF Appendix C; JT*'s beta
        model = first.model or defaults['model']
        defaults['beta'] = JTSTAR_BETA.get(model, JTSTAR_BETA['cnn_b']) if first.init else 0.0
    return common.parse(parser, argv, protocol)


def jt_batch(model, x, y, split, attack):
    """Natural and adversarial parts of a batch (AELF Appendix C). Returns x, y, x', y'."""
    if split == 'half':
        half = len(x) // 2
        return x[:half], y[:half], attack(model, x[half:], y[half:]), y[half:]
    return x, y, attack(model, x, y), y


FEATURE_NORMS = ('l2', 'l2sq', 'rms', 'ms')     # train_aelfs.py's readings of ||f||_2
JTSTAR_BETA = {'cnn_b': 0.1, 'wrn': 0.2}        # on ||f||_2, train_aelfs.py's DEFAULT_BETA


def feature_norm(f, reading):
    """The batch mean of a reading of ||f||_2 per sample (train_aelfs.py's FEATURE_NORMS)."""
    f = f.float().flatten(1)
    squared = f.pow(2).sum(dim=1)
    per_sample = {'l2': squared.sqrt(), 'l2sq': squared, 'rms': (squared / f.shape[1]).sqrt(),
                  'ms': squared / f.shape[1]}[reading]
    return per_sample.mean()


def jt_loss(model, x_nat, x_adv, y_nat, y_adv, lambda1, lambda2, beta, reading='l2'):
    """Eq. (4) (+ the JT* norm term). Returns (loss, logits of [x_nat; x_adv], f_all)."""
    f_all = model.features(torch.cat([x_nat, x_adv]))      # one forward of the combined batch
    logits = model.fc(f_all).float()
    n = len(x_nat)
    loss = (lambda1 * F.cross_entropy(logits[:n], y_nat)    # lambda1 L(theta; x, y)
            + lambda2 * F.cross_entropy(logits[n:], y_adv))  # lambda2 L(theta; x', y)
    if beta:                                                # JT*: + beta (||f||_2 + ||f'||_2)
        loss = loss + beta * (feature_norm(f_all[:n], reading) + feature_norm(f_all[n:], reading))
    return loss, logits, f_all


@common.main_guard
def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args)                     # seeded; torchrun: README "Several GPUs"
    model = common.build_model(args, device)
    common.compile_model(model, args.compile)          # --compile: README "Speed"
    run = common.Run(args, 'jtstar' if args.init or args.beta else 'jt')
    if args.init:
        common.load_weights_into(model, args.init)          # JT*: ST initialisation
    train_set, val_set, test_set = common.load_data(args, device)
    optimizer = common.distributed_optimizer(torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay))  # w too
    run.resume(model, optimizer.load_state_dict)

    def attack(m, x, y, scale=1.0):   # scale < 1: the eps warm-up (--eps-warmup), training only
        return pgd(m, x, y, scale * args.eps, args.steps, scale * args.step_size, args.random_start)

    beta_text = {'l2': f"beta {args.beta:g} on ||f||_2 (paper, cnn_b: 0.5)",
                 'rms': f"beta {args.beta:g} on ||f||_2 / sqrt(D) = {args.beta / model.fc.in_features ** 0.5:.3g} "
                        f"on ||f||_2 (paper, cnn_b: 0.5)"}.get(
        args.feature_norm, f"beta {args.beta:g} on the {args.feature_norm} reading, not the paper's ||f||_2")
    print(f"JT{'*' if args.init or args.beta else ''} {common.summary(args, model, train_set, val_set, test_set)}, "
          f"lambda {args.lambda1}:{args.lambda2}, {beta_text}, "
          f"split {args.split}, init {args.init or 'random'}, {device}", flush=True)
    steps_per_epoch = -(-len(train_set) // args.batch_size)
    watch = common.CollapseWatch(   # JT*'s norm term can collapse the embeddings as in AELFs
        args.dataset,
        f"beta {args.beta:g} on --feature-norm {args.feature_norm} is too strong for this model; "
        f"try a smaller beta with the same reading (e.g. --beta {args.beta / 10:g})") if args.beta else None
    for epoch in range(run.start_epoch, args.epochs):
        lr = common.start_epoch(epoch, args, optimizer)   # re-seeded; lr x0.1 at --milestones
        scale = min(1.0, (epoch + 1) / args.eps_warmup) if args.eps_warmup else 1.0   # --eps-warmup
        model.train()
        loss_sum, n_correct, n_predicted, seen = 0.0, 0, 0, 0
        t0 = time.time()
        for step, (x, y) in enumerate(common.batches(train_set, args.batch_size, shuffle=True,
                                                     padding=args.padding)):
            with common.autocast(device, args.amp):
                x_nat, y_nat, x_adv, y_adv = jt_batch(model, x, y, args.split,
                                                      lambda m, a, b: attack(m, a, b, scale))
                loss, logits, f_all = jt_loss(model, x_nat, x_adv, y_nat, y_adv, args.lambda1,
                                              args.lambda2, args.beta, args.feature_norm)  # Eq. (4)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            (loss_value,) = common.check_finite(epoch, step, loss)   # a NaN stops the run
            loss_sum += loss_value * len(y)
            n_correct += (logits.argmax(1) == torch.cat([y_nat, y_adv])).sum()   # on the device: no sync per step
            n_predicted += len(logits)
            seen += len(y)
            if watch:
                watch.step(f_all[:len(y_nat)], f_all[len(y_nat):], logits[:len(y_nat)], y_nat,
                           epoch)
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
                  **(watch.end_epoch(epoch) if watch else {}),
                  'val_images': len(val_set), 'seconds': seconds, 'images_per_s': seen / seconds}
        run.log_epoch(record, args.epochs)
        run.save(model, epoch + 1, optimizer.state_dict(), metrics, score=metrics.get('val_worst'),
                 finished=final, init=args.init)
    run.finish(model, test_set, attack)      # final.json (nothing to do if it holds the last epoch)


if __name__ == '__main__':
    main()
