"""AGAIN: adversarial training with Attribution Span Enlargement and Hybrid Feature Fusion
(AGAIN paper, Sec. 4; supplement Algorithm 1).

Model side (models.py, so eval.py can rebuild it): an ASE head after stage l (``--ase-layer``)
on the maps that the global average pooling reads, by default (Fig. 2 places ASE on "the second
last layer"; Table 5: the deeper the layer, the better): ResNet-18 layer 1-4, default 4; cnn_b
conv block 1-5, default 5 (conv 5's 4x4 maps: CNN_B's final 4x4 pool is its global pool);
WRN group 1-3, default 3 (after the final BN-act).
ASE logits = linear(GAP(A_l)). In training, A_hat = alpha A W_ase[y] + (1 - alpha) A W_ase[y']
(Eq. (4), y' = y shuffled within the batch); at inference A_hat = A W_ase[pred]. ``model(x)``
is the inference path, so every attack and eval.py work unchanged.

Method side, top to bottom (supplement Algorithm 1):

    for iteration i of N:
        prob = i / N; flag ~ U(0, 1)                                   # lines 2-3
        x_adv = PGD-10 on the sum of both heads' losses (adaptive), eval mode   # line 4
        if flag < prob: AGAIN step                                     # lines 5-6
            A_l -> HFF (Eq. (5), (6)) -> ASE with y and y' (Eq. (4))
            loss = CE(main(x_adv), y) + CE(ASE(GAP(A_l(x_adv))), y)    # Eq. (7)
        else: plain AT step                                            # lines 7-8

- HFF (Eq. (5), (6), training only): A' = A shuffled over the batch; A1 = AdaIN(A, A'),
  A2 = AdaIN(A', A); the per-sample, per-channel means and stds of A, A', A1, A2 are mixed with
  random gammas in [0, 1] summing to 1 (one draw per step, as in the authors' code), and
  HFF(A) = sigma_hat (A - mu(A)) / sigma(A) + mu_hat.
- The plain-AT steps of the schedule: the network that is evaluated always contains the ASE
  head in its inference form, so a plain step runs that same path (A W_ase[pred], no labels,
  no HFF) and keeps the loss of Eq. (7): the later layers train on the features they meet at
  test time, the head keeps learning, and the schedule switches on and off exactly what AGAIN
  adds (label-mixed span enlargement and HFF). With ``--no-ase`` a plain step is plain AT.
- Attack for training: ``--attack-loss both`` (default) ascends CE(main) + CE(ASE), the
  adaptive white-box attack of Sec. 5.2.2; ``main`` uses the main head only.
- Step size: the paper states PGD-10 with step 4/255 (Sec. 5.2.1), which is the default here;
  the authors' code uses 2/255 (``--step-size 0.00784``). Random start: uniform, as in PGD-AT.
- Schedule: lr 0.1, x0.1 at epochs 75 and 90, 120 epochs (the text lists 75/90/100 for three
  rates; the two steps at 75 and 90 are used), SGD momentum 0.9, weight decay 5e-4; CIFAR crop
  padding 4 and flip, as in the authors' code. ``--dataset mnist``: cnn_b and the AELF MNIST
  protocol (PGD(0.3, 16, 0.02)), so AGAIN can be compared with the other scripts here.
- Plug-ins (Tables 2-4): ``--base mart`` replaces CE(main) by MART's loss (Wang et al. 2020:
  boosted CE on x_adv + lambda KL(p(x) || p(x_adv)) weighted by 1 - p_y(x), ``--mart-lambda``
  6); its natural pass uses the same ASE weighting as the adversarial one, without HFF.
  ``--awp-gamma G`` adds adversarial weight perturbation (Wu et al. 2020, gamma 5e-3): a proxy
  copy takes one ascent step on the step's loss, the layer-wise scaled difference is added to
  the weights for the update and removed after it, from epoch ``--awp-warmup`` on (10), with
  epochs counted from 1 as in the AWP and AGAIN reference code (``epoch >= awp_warmup`` there):
  epochs 1-9 go without AWP.
- Ablations: ``--no-ase``, ``--no-hff`` (Table 6), ``--ase-layer`` (Table 5), ``--alpha``.

    python train_again.py --dataset cifar10           # AGAIN-PGD-AT, Table 2
"""
import copy
import time

import torch
import torch.nn.functional as F

import common
from attacks import pgd


def parse_args(argv=None):
    parser = common.parser(__doc__)
    g = parser.add_argument_group('AGAIN')
    g.add_argument('--alpha', type=common.number('[0, 1]'), default=0.6, help='weight of the true-label span (Eq. (4))')
    g.add_argument('--ase-layer', type=common.number('[1, 5]', int),
                   help='stage of the ASE head (resnet18: 4; cnn_b: 5; wrn: 3; vgg16: 5)')
    g.add_argument('--no-ase', action='store_true', help='ablation: no ASE head (Table 6)')
    g.add_argument('--no-hff', action='store_true', help='ablation: no HFF (Table 6)')
    g.add_argument('--attack-loss', choices=['both', 'main'], default='both',
                   help='training PGD on CE(main) + CE(ASE) (adaptive) or CE(main)')
    g.add_argument('--base', choices=['at', 'mart'], default='at', help='AGAIN-PGD-AT or AGAIN-MART')
    g.add_argument('--mart-lambda', type=common.number('[0, 1000]'), default=6.0, help="MART's KL weight")
    g.add_argument('--awp-gamma', type=common.number('[0, 1]'), default=0.0, help='AGAIN-AWP: AWP gamma (5e-3); 0 = off')
    g.add_argument('--awp-warmup', type=common.number('[0, 100000]', int), default=10,
                   help='first epoch with AWP, counted from 1 as the reference code does (10: epochs '
                        '1-9 without AWP; 0 or 1: AWP from the start)')

    def protocol(first, p):      # CIFAR: AGAIN Sec. 5.2.1; MNIST: the AELF protocol
        if first.dataset != 'mnist':
            p.update(model='resnet18', epochs=120, milestones=[75, 90], weight_decay=5e-4, padding=4,
                     eps=8 / 255, steps=10, step_size=4 / 255, random_start=True)
        model = first.model or p['model']
        p['ase_layer'] = {'resnet18': 4, 'cnn_b': 5, 'wrn': 3, 'vgg16': 5}.get(model)   # before the pool
    args = common.parse(parser, argv, protocol)
    if args.model not in ('resnet18', 'cnn_b', 'wrn', 'vgg16'):
        parser.error('AGAIN here supports --model resnet18, cnn_b, wrn or vgg16')
    return args


# ------------------------------------------------------------------------- HFF, Eq. (5), (6)

def mean_std(a, eps=1e-5):
    """Per-sample, per-channel mean and std (B x C x 1 x 1)."""
    flat = a.flatten(2)
    return flat.mean(2)[:, :, None, None], (flat.var(2) + eps).sqrt()[:, :, None, None]


def adain(content, style):
    """AdaIN(content, style): content's normalised maps with style's statistics."""
    c_mean, c_std = mean_std(content)
    s_mean, s_std = mean_std(style)
    return (content - c_mean) / c_std * s_std + s_mean


def simplex_gammas(device):
    """gamma_1..gamma_4 in [0, 1] with sum 1: the gaps between sorted uniform cut points."""
    cuts = torch.rand(3, device=device).sort().values
    return torch.diff(torch.cat([cuts.new_zeros(1), cuts, cuts.new_ones(1)]))


def hff(a, gammas=None):
    """Hybrid Feature Fusion of the maps ``a`` (B x C x H x W), Eq. (5), (6)."""
    if a.shape[2] * a.shape[3] < 2:
        raise common.UserError("HFF needs feature maps larger than 1x1 (per-channel std): choose "
                               "an earlier --ase-layer or pass --no-hff")
    a_shuf = a[torch.randperm(len(a), device=a.device)]              # A' (the "style" data)
    a1, a2 = adain(a, a_shuf), adain(a_shuf, a)                      # A1, A2
    g = simplex_gammas(a.device) if gammas is None else gammas
    stats = [mean_std(t) for t in (a, a_shuf, a1, a2)]
    mu_hat = sum(gi * m for gi, (m, _) in zip(g, stats))             # Eq. (5)
    sigma_hat = sum(gi * s for gi, (_, s) in zip(g, stats))
    mu, sigma = stats[0]
    return sigma_hat * (a - mu) / sigma + mu_hat                     # Eq. (6)


# ------------------------------------------------------------------------- losses, schedule

def use_again(i, n):
    """Supplement Algorithm 1, lines 2-5: AGAIN with probability i / N."""
    return torch.rand((), generator=common.DIST.shared).item() < i / n   # one draw for all processes


def mart_loss(logits_adv, logits_nat, y, lam):
    """MART (Wang et al. 2020): BCE(p(x_adv), y) + lambda * KL(p(x) || p(x_adv)) (1 - p_y(x))."""
    probs_adv = F.softmax(logits_adv, dim=1)
    top2 = probs_adv.argsort(dim=1)[:, -2:]
    y_other = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])   # most likely wrong class
    bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - probs_adv + 1e-12), y_other)
    probs_nat = F.softmax(logits_nat, dim=1)
    p_true = probs_nat.gather(1, y[:, None]).squeeze(1)
    kl = (probs_nat * (torch.log(probs_nat + 1e-12) - torch.log(probs_adv + 1e-12))).sum(1)
    return bce + lam * (kl * (1.0000001 - p_true)).mean()


def step_loss(model, x, x_adv, y, args, again):
    """The loss of one step (Eq. (7), with MART as the base when asked) and the main logits."""
    if again:                                                        # Algorithm 1, line 6
        y_fake = y[torch.randperm(len(y), device=y.device)]          # y' (Eq. (3), (4))
        labels = dict(y=y, y_fake=y_fake, alpha=args.alpha) if model.ase_index is not None else {}
        transform = None if args.no_hff else hff
        transform_index = model.stage_index(args.ase_layer)
    else:                                                            # line 8: plain AT
        labels, transform, transform_index = {}, None, None
    logits, ase_logits = model.forward_heads(x_adv, transform=transform,
                                             transform_index=transform_index, **labels)
    logits = logits.float()
    if args.base == 'mart':
        logits_nat, _ = model.forward_heads(x, **labels)
        loss = mart_loss(logits, logits_nat.float(), y, args.mart_lambda)
    else:
        loss = F.cross_entropy(logits, y)                            # CE(F_ori(x_adv), y)
    if ase_logits is not None:
        loss = loss + F.cross_entropy(ase_logits.float(), y)         # + CE(F_ASE(...), y), Eq. (7)
    return loss, logits


# ------------------------------------------------------------------------------------ AWP

def awp_perturbation(model, proxy, x, x_adv, y, args, again, gamma):
    """AWP (Wu et al. 2020): one ascent step of a proxy copy on the step's loss; returns the
    per-layer perturbation gamma * ||w|| * d / ||d|| for every weight with 2+ dimensions."""
    proxy.load_state_dict(model.state_dict())
    proxy.train()
    proxy_opt = common.distributed_optimizer(torch.optim.SGD(proxy.parameters(), lr=0.01))
    # the proxy sees the same fake labels and HFF draw as the step that follows
    with torch.random.fork_rng(devices=[x.device] if x.device.type == 'cuda' else []):
        loss, _ = step_loss(proxy, x, x_adv, y, args, again)
    proxy_opt.zero_grad()
    (-loss).backward()                    # ascent
    proxy_opt.step()
    diff = {}
    model_params = dict(model.named_parameters())
    for name, p_proxy in proxy.named_parameters():
        p = model_params[name]
        if p.dim() <= 1:
            continue
        d = p_proxy.detach() - p.detach()
        diff[name] = gamma * p.detach().norm() / (d.norm() + 1e-20) * d
    return diff


def add_to_weights(model, diff, sign):
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, d in diff.items():
            params[name].add_(sign * d)


@common.main_guard
def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args)                     # seeded; torchrun: README "Several GPUs"
    extra = {} if args.no_ase else {'ase_layer': args.ase_layer}
    model = common.build_model(args, device, **extra)
    proxy = copy.deepcopy(model) if args.awp_gamma > 0 else None
    common.compile_model(model, args.compile)          # --compile (after the copy: README "Speed")
    name = 'again' + ('-mart' if args.base == 'mart' else '') + ('-awp' if args.awp_gamma else '')
    run = common.Run(args, name)
    train_set, val_set, test_set = common.load_data(args, device)
    optimizer = common.distributed_optimizer(torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay))
    run.resume(model, optimizer.load_state_dict)
    if not args.no_hff:   # fail now, not at the first AGAIN step, if HFF cannot run there
        with torch.no_grad():
            model.eval()
            model.forward_heads(next(common.batches(train_set, 2))[0], transform=hff,
                                transform_index=model.stage_index(args.ase_layer))

    def train_attack_loss(m, x_adv, y):        # the adaptive attack: both heads' losses
        logits, ase_logits = m.forward_heads(x_adv)
        loss = F.cross_entropy(logits.float(), y, reduction='sum')
        if ase_logits is not None and args.attack_loss == 'both':
            loss = loss + F.cross_entropy(ase_logits.float(), y, reduction='sum')
        return loss

    def attack(m, x, y, scale=1.0):   # scale < 1: the eps warm-up (--eps-warmup), training only
        return pgd(m, x, y, scale * args.eps, args.steps, scale * args.step_size, args.random_start,
                   loss=train_attack_loss)

    print(f"AGAIN ({args.base}{', AWP ' + str(args.awp_gamma) if args.awp_gamma else ''}) "
          f"{common.summary(args, model, train_set, val_set, test_set)} on {args.attack_loss}, alpha {args.alpha}, "
          f"ASE {'off' if args.no_ase else args.ase_layer}, "
          f"HFF {'off' if args.no_hff else 'on'}, {device}", flush=True)
    steps_per_epoch = -(-len(train_set) // args.batch_size)
    total_iterations = args.epochs * steps_per_epoch                 # N of Algorithm 1
    for epoch in range(run.start_epoch, args.epochs):
        lr = common.start_epoch(epoch, args, optimizer)   # re-seeded; lr x0.1 at --milestones
        scale = min(1.0, (epoch + 1) / args.eps_warmup) if args.eps_warmup else 1.0   # --eps-warmup
        model.train()
        loss_sum, n_correct, seen, n_again = 0.0, 0, 0, 0
        t0 = time.time()
        for step, (x, y) in enumerate(common.batches(train_set, args.batch_size, shuffle=True,
                                                     padding=args.padding)):
            i = epoch * steps_per_epoch + step
            again = use_again(i, total_iterations)                   # Algorithm 1, lines 2-3
            with common.autocast(device, args.amp):
                x_adv = attack(model, x, y, scale)                   # line 4 (eval mode inside)
                diff = None
                if proxy is not None and epoch + 1 >= args.awp_warmup:   # epochs counted from 1
                    diff = awp_perturbation(model, proxy, x, x_adv, y, args, again, args.awp_gamma)
                    add_to_weights(model, diff, +1.0)                # perturb
                loss, logits = step_loss(model, x, x_adv, y, args, again)   # lines 5-8, Eq. (7)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if diff is not None:
                add_to_weights(model, diff, -1.0)                    # restore
            (loss_value,) = common.check_finite(epoch, step, loss)   # a NaN stops the run
            loss_sum += loss_value * len(y)
            n_correct += (logits.argmax(1) == y).sum()   # on the device: no sync per step
            seen += len(y)
            n_again += int(again)
            run.progress(step + 1, steps_per_epoch, seen, loss_value)
        seconds = time.time() - t0
        loss_sum, n_correct, seen = common.all_sum(loss_sum, int(n_correct), seen)

        final = epoch + 1 == args.epochs
        metrics = {}          # the validation split, never the test split, chooses best.pt
        if len(val_set):      # best.pt: the worst case of the PGD and a CW-PGD from a random start
            metrics = common.validation_metrics(model, val_set, attack, args)
        record = {'epoch': epoch + 1, 'lr': lr, 'train_loss': loss_sum / seen,
                  'train_acc': 100.0 * n_correct / seen, 'again_steps': n_again, **metrics,
                  'val_images': len(val_set), 'seconds': seconds, 'images_per_s': seen / seconds}
        run.log_epoch(record, args.epochs)
        run.save(model, epoch + 1, optimizer.state_dict(), metrics, score=metrics.get('val_worst'),
                 finished=final)
    run.finish(model, test_set, attack)      # final.json (nothing to do if it holds the last epoch)


if __name__ == '__main__':
    main()
