"""TRADES (Zhang et al. 2019; AELF Eq. (5)).

    min_theta E[ CE(f(x), y) + beta * KL( softmax f(x) || softmax f(x') ) ]       # Eq. (5)
    x' = argmax_{||x' - x||_inf <= eps} KL( softmax f(x) || softmax f(x') )

- Attack: l-inf PGD that ascends the KL term from x + 0.001 * N(0, 1), with the model in eval
  mode and the clean distribution softmax f(x) held fixed; it is ``attacks.pgd`` with a KL loss
  callable (the same loop as every other method).
- Loss: KL summed over classes and averaged over the batch. Gradients flow through both sides
  of the KL, the clean softmax f(x) included, as in the TRADES reference implementation (its
  ``criterion_kl(log_softmax(model(x_adv)), softmax(model(x_natural)))`` does not detach the
  clean side). Here x and x' go through the network in two forward passes, and the clean
  logits serve both the CE and the KL term (the reference calls model(x_natural) twice, which
  gives the same loss and gradients; only BatchNorm's running statistics, which it updates once
  more with the clean batch, differ). The attack takes its first gradient at the unclamped
  x + 0.001 * N(0, 1), as Algorithm 1 and the reference code do; ``tests/test_jt_trades.py``
  checks a whole step against Algorithm 1 written out independently (a start clamped to
  [0, 1] before the first gradient fails it).
- ``--beta`` is the lambda of AELF Eq. (5) (AELF Tables 3/4 use 1, 2, 3 and 6): default 6 on
  CIFAR and 1 on MNIST, as in the TRADES paper.
- The attack budget is the AELF protocol's (the same PGD as train_at.py: MNIST
  PGD(0.3, 16, 0.02), CIFAR-10 PGD(0.031, 5, 0.01)) so that TRADES sits in the same tables;
  ``--eps/--steps/--step-size`` override it (the TRADES paper itself used 40 steps of 0.01 on
  MNIST and 10 steps of 0.007 on CIFAR-10).

    python train_trades.py --dataset mnist
"""
import time

import torch
import torch.nn.functional as F

import common
from attacks import pgd


def parse_args(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument('--beta', type=common.number('[0, 1000]'), help='weight of the KL term (6 on CIFAR, 1 on MNIST)')
    parser.add_argument('--init-noise', type=common.number('[0, 1]'), default=0.001,
                        help='std of the Gaussian start x + init_noise N(0, I) of the TRADES training '
                             'attack (Alg. 1); --random-start changes only the validation and test PGD')

    def protocol(first, defaults):         # AELF Appendix C, TRADES' beta for the dataset
        defaults['beta'] = 1.0 if first.dataset == 'mnist' else 6.0
    return common.parse(parser, argv, protocol)


def kl_clean_adv(logits_clean, logits_adv):
    """KL(softmax(clean) || softmax(adv)), summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits_clean.float(), dim=1),
                    reduction='sum') / len(logits_clean)


def trades_attack(model, x, y, eps, steps, step_size, init_noise):
    """The TRADES inner maximisation: PGD on KL(p(x) || p(x')) with p(x) fixed, in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits_clean = model(x).float()                      # constant target of the attack
    model.train(was_training)

    def kl_loss(m, x_adv, _y):
        return F.kl_div(F.log_softmax(m(x_adv).float(), dim=1), F.softmax(logits_clean, dim=1),
                        reduction='sum')
    x_start = x + init_noise * torch.randn_like(x)          # Alg. 1: x + 0.001 * N(0, I)
    return pgd(model, x, y, eps, steps, step_size, loss=kl_loss, x_init=x_start)


def trades_loss(model, x, x_adv, y, beta):
    """Eq. (5): CE(f(x), y) + beta * KL(f(x) || f(x')). Returns (loss, clean logits)."""
    logits_clean = model(x).float()
    logits_adv = model(x_adv).float()
    loss = F.cross_entropy(logits_clean, y) + beta * kl_clean_adv(logits_clean, logits_adv)
    return loss, logits_clean


@common.main_guard
def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args)                     # seeded; torchrun: README "Several GPUs"
    model = common.build_model(args, device)
    common.compile_model(model, args.compile)          # --compile: README "Speed"
    run = common.Run(args, 'trades')
    train_set, val_set, test_set = common.load_data(args, device)
    optimizer = common.distributed_optimizer(torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay))
    run.resume(model, optimizer.load_state_dict)

    def test_attack(m, x, y):   # the test uses the protocol's CE PGD, like every other method
        return pgd(m, x, y, args.eps, args.steps, args.step_size, args.random_start)

    warmup = f" (eps warm-up over {args.eps_warmup} epochs)" if args.eps_warmup else ''
    kl_attack = (f"KL-PGD({args.eps:g}, {args.steps}, {args.step_size:g}){warmup} from x + {args.init_noise:g} "
                 f"N(0, I){', test PGD from a random start' if args.random_start else ''}")
    print(f"TRADES {common.summary(args, model, train_set, val_set, test_set, kl_attack)}, beta {args.beta}, "
          f"{device}", flush=True)
    steps_per_epoch = -(-len(train_set) // args.batch_size)
    for epoch in range(run.start_epoch, args.epochs):
        lr = common.start_epoch(epoch, args, optimizer)   # re-seeded; lr x0.1 at --milestones
        scale = min(1.0, (epoch + 1) / args.eps_warmup) if args.eps_warmup else 1.0   # --eps-warmup
        model.train()
        loss_sum, n_correct, seen = 0.0, 0, 0
        t0 = time.time()
        for step, (x, y) in enumerate(common.batches(train_set, args.batch_size, shuffle=True,
                                                     padding=args.padding)):
            with common.autocast(device, args.amp):
                x_adv = trades_attack(model, x, y, scale * args.eps, args.steps, scale * args.step_size,
                                      args.init_noise)               # inner max of Eq. (5)
                loss, logits = trades_loss(model, x, x_adv, y, args.beta)   # Eq. (5)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            (loss_value,) = common.check_finite(epoch, step, loss)   # a NaN stops the run
            loss_sum += loss_value * len(y)
            n_correct += (logits.argmax(1) == y).sum()   # on the device: no sync per step
            seen += len(y)
            run.progress(step + 1, steps_per_epoch, seen, loss_value)
        seconds = time.time() - t0
        loss_sum, n_correct, seen = common.all_sum(loss_sum, int(n_correct), seen)

        final = epoch + 1 == args.epochs
        metrics = {}          # the validation split, never the test split, chooses best.pt
        if len(val_set):      # best.pt: the worst case of the PGD and a CW-PGD from a random start
            metrics = common.validation_metrics(model, val_set, test_attack, args)
        record = {'epoch': epoch + 1, 'lr': lr, 'train_loss': loss_sum / seen,
                  'train_acc': 100.0 * n_correct / seen, **metrics, 'val_images': len(val_set),
                  'seconds': seconds, 'images_per_s': seen / seconds}
        run.log_epoch(record, args.epochs)
        run.save(model, epoch + 1, optimizer.state_dict(), metrics, score=metrics.get('val_worst'),
                 finished=final)
    if run.start_epoch < args.epochs or not run.tested:      # final.json not yet written
        run.finish(model, test_set, test_attack)
    else:
        print(f"{run.dir} already holds all {args.epochs} epochs; nothing to do")


if __name__ == '__main__':
    main()
