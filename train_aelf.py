"""AELF: the Attention-Extended Learning Framework (AELF paper, Sec. 3.1, Algorithm 1, Eq. (8)).

The model is split x --c--> f --w--> y_hat (``model.features`` is c, ``model.fc`` is w). Per
mini-batch, in this order (Algorithm 1):

    3: x' = x + delta                     PGD with the training protocol, model in eval mode
    4: x --c--> f --w--> y_hat
    5: L1 = CE(y_hat, y)
    6: w <- w - dL1/dw                    w is updated with the label loss on clean data only
    7: x' --c--> f'
    8: L2 = distance(f', stopgrad(f))     the clean embedding is a constant target
    9: c <- c - d(L1 + lambda * L2)/dc

so w never sees adversarial data, and the fitting is one-way, f' -> f (footnote 4): no gradient
of L2 reaches f, only f'.

Reading of the paper, where it leaves room:
- Two SGD optimizers, one over c (everything but ``fc``) and one over w (``fc``), with the
  same lr, momentum, weight decay and schedule: line 6 and line 9 are then two separate,
  visible steps. dL1/dc is taken from the same forward pass as dL1/dw (before line 6 changes
  w), as the algorithm computes L1 once at line 5.
- x' is made from the whole batch (Algorithm 1 pairs every x with its x').
- ``--distance``: the paper names ||f - f'||_{1,2}. ``l2`` (default): per-sample l2 norm of
  f' - f, averaged over the batch; ``l1``: per-sample l1 norm, averaged; ``mse``: mean squared
  difference over all elements.
- ``--lam``: the paper gives no value. Default 1.0: the per-sample l2 distance has a unit-norm
  gradient with respect to f', the same order as the cross-entropy's gradient with respect to
  the logits, so lambda = 1 weighs the two terms evenly; tune it per data set.
- Forwards of x and x' are separate (Algorithm 1, lines 4 and 7), so BatchNorm uses each
  one's batch statistics.

    python train_aelf.py --dataset mnist
"""
import time

import torch
import torch.nn.functional as F

import common
from attacks import pgd


def parse_args(argv=None):
    parser = common.parser(__doc__)
    g = parser.add_argument_group('AELF (Algorithm 1)')
    g.add_argument('--lam', type=common.number('[0, 1000]'), default=1.0,
                   help='lambda, weight of L2 in the update of c')
    g.add_argument('--distance', choices=['l2', 'l1', 'mse'], default='l2',
                   help="L2 = distance(f', stopgrad(f))")
    return common.parse(parser, argv)      # AELF Appendix C


def embedding_distance(f_adv, f_target, kind):
    """L2 of Algorithm 1, line 8 (``f_target`` must already be detached)."""
    diff = f_adv - f_target
    if kind == 'l2':
        return diff.norm(p=2, dim=1).mean()
    if kind == 'l1':
        return diff.abs().sum(dim=1).mean()
    return diff.pow(2).mean()


def aelf_step(model, opt_c, opt_w, x, x_adv, y, lam, distance, amp=False):
    """One iteration of Algorithm 1 (lines 4-9) given x and its x'. Returns (L1, L2, logits)."""
    opt_c.zero_grad(set_to_none=True)
    opt_w.zero_grad(set_to_none=True)
    with common.autocast(x.device, amp):
        f = model.features(x)                                  # line 4: x -c-> f
        target = f.detach().clone()                            # line 8's f_bar, a copy of f
        logits = model.fc(f).float()                           #          f -w-> y_hat
        loss1 = F.cross_entropy(logits, y)                     # line 5: L1
    loss1.backward()           # dL1/dw into w.grad and dL1/dc into c's .grad (same forward)
    opt_w.step()                                               # line 6: w <- w - dL1/dw
    with common.autocast(x.device, amp):
        f_adv = model.features(x_adv)                          # line 7: x' -c-> f'
        # line 8: f_bar <- f (constant): ``target`` above
        loss2 = embedding_distance(f_adv.float(), target.float(), distance)
    (lam * loss2).backward()   # adds lambda dL2/dc to c's .grad; L2 does not involve w
    opt_c.step()                                               # line 9: c <- c - d(L1+lam L2)/dc
    return loss1.detach(), loss2.detach(), logits.detach()


@common.main_guard
def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args)                     # seeded; torchrun: README "Several GPUs"
    model = common.build_model(args, device)
    common.compile_model(model, args.compile)          # --compile: README "Speed"
    run = common.Run(args, 'aelf')
    train_set, val_set, test_set = common.load_data(args, device)
    params_w = list(model.fc.parameters())
    params_c = [p for name, p in model.named_parameters() if not name.startswith('fc.')]
    sgd = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    opt_c = common.distributed_optimizer(torch.optim.SGD(params_c, **sgd))   # torchrun: sums
    opt_w = common.distributed_optimizer(torch.optim.SGD(params_w, **sgd))   # the gradients

    def load_optimizers(state):
        opt_c.load_state_dict(state['c'])
        opt_w.load_state_dict(state['w'])
    run.resume(model, load_optimizers)

    def attack(m, x, y, scale=1.0):   # scale < 1: the eps warm-up (--eps-warmup), training only
        return pgd(m, x, y, scale * args.eps, args.steps, scale * args.step_size, args.random_start)

    print(f"AELF {common.summary(args, model, train_set, val_set, test_set)}, lambda {args.lam}, "
          f"distance {args.distance}, {device}", flush=True)
    steps_per_epoch = -(-len(train_set) // args.batch_size)
    for epoch in range(run.start_epoch, args.epochs):
        lr = common.start_epoch(epoch, args, opt_c, opt_w)   # re-seeded; lr x0.1 at --milestones
        scale = min(1.0, (epoch + 1) / args.eps_warmup) if args.eps_warmup else 1.0   # --eps-warmup
        model.train()
        loss_sum, dist_sum, n_correct, seen = 0.0, 0.0, 0, 0
        t0 = time.time()
        for step, (x, y) in enumerate(common.batches(train_set, args.batch_size, shuffle=True,
                                                     padding=args.padding)):
            with common.autocast(device, args.amp):
                x_adv = attack(model, x, y, scale)             # line 3 (eval mode inside)
            loss1, loss2, logits = aelf_step(model, opt_c, opt_w, x, x_adv, y, args.lam,
                                             args.distance, args.amp)           # lines 4-9
            l1, l2 = common.check_finite(epoch, step, loss1, loss2)   # a NaN stops the run
            loss_value = l1 + args.lam * l2
            loss_sum += l1 * len(y)
            dist_sum += l2 * len(y)
            n_correct += (logits.argmax(1) == y).sum()   # on the device: no sync per step
            seen += len(y)
            run.progress(step + 1, steps_per_epoch, seen, loss_value)
        seconds = time.time() - t0
        loss_sum, dist_sum, n_correct, seen = common.all_sum(
            loss_sum, dist_sum, int(n_correct), seen)

        final = epoch + 1 == args.epochs
        metrics = {}          # the validation split, never the test split, chooses best.pt
        if len(val_set):      # best.pt: the worst case of the PGD and a CW-PGD from a random start
            metrics = common.validation_metrics(model, val_set, attack, args)
        record = {'epoch': epoch + 1, 'lr': lr, 'train_loss': loss_sum / seen,
                  'train_dist': dist_sum / seen, 'train_acc': 100.0 * n_correct / seen, **metrics,
                  'val_images': len(val_set), 'seconds': seconds, 'images_per_s': seen / seconds}
        run.log_epoch(record, args.epochs)
        run.save(model, epoch + 1, {'c': opt_c.state_dict(), 'w': opt_w.state_dict()}, metrics,
                 score=metrics.get('val_worst'), finished=final)
    run.finish(model, test_set, attack)      # final.json (nothing to do if it holds the last epoch)


if __name__ == '__main__':
    main()
