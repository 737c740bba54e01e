"""AT-id, AT-att and AT-att-id: adversarial training with feature prioritisation (non-linear
attention) and implicit denoising (the AT-att-id paper, Sec. 3, 4.1, 4.2).

    Loss = CE(f(x'), y) + lambda * ||G(x) - G(x')||_2                              # Eq. (7)

x' is Madry et al.'s PGD (Eq. (2), random start, eval mode while attacking), G the features
of the layer before the final linear layer (``model.features``: for the attention model the
concatenated attention-weighted descriptors [h3 ; h4], Sec. 3.2-3.3). Cross-entropy is taken on
the adversarial input only (Fig. 2).

    --mode id       AT-id: AT + implicit denoising on the plain model (madry_cnn on MNIST,
                    the [16, 16, 32, 64] CIFAR ResNet with global average pooling on CIFAR)
    --mode att      AT-att: AT on the attention ResNet (att_resnet), lambda 0
    --mode att-id   AT-att-id: both

Reading of the paper, where it leaves room:
- The regulariser's gradient flows through both G(x) and G(x') (Eq. (6), Fig. 2: the two
  branches are one network with shared parameters): unlike AELF, the clean features are not a
  constant target.
- ||.||_2 is the per-sample l2 norm, not squared ("the Euclidean distance between the two sets
  of attention features", Sec. 3 and Fig. 2), averaged over the batch (the expectation of
  Eq. (7)). x and x' go through the network in two forward passes (the two copies of Fig. 2).
- lambda: 0.01 on MNIST (Sec. 4.1), 0.1 for AT-id and 0.01 for AT-att-id on CIFAR-10
  (Sec. 4.2), 0 for AT-att.
- Attack: MNIST PGD eps 0.3, 40 steps of 0.01 (Madry et al.); CIFAR-10 PGD eps 8/255, 5 steps
  of 2/255; random start in both (Madry et al.'s setting, which the paper adopts).
- Optimiser and schedule. MNIST, Sec. 4.1: "The settings are the same as in Madry et al.
  (2017)", so Madry et al.'s MNIST training: Adam, lr 1e-4, batch 50, 100,000 iterations (84
  epochs of 1,200 steps, the first whole number of epochs that covers them), no weight decay, no
  lr schedule (``--optimizer adam``). CIFAR-10, Sec. 4.2, gives the model and the attack but no
  optimiser; the natural reading of the paper's "same as Madry" is Madry et al.'s CIFAR-10
  training: SGD momentum 0.9, weight decay 2e-4, batch 128, lr 0.1, x0.1 after 40,000 and 60,000
  of 80,000 iterations (205 epochs, steps after epochs 102 and 154), crop (padding 2) + flip
  (``--optimizer sgd``). The Table 1/2 baseline (Madry et al.'s AT) is ``--lam 0`` with the same
  settings. No attention on MNIST, as in the paper. Choosing the other optimiser brings its own
  lr and weight decay (``--optimizer sgd`` on MNIST: lr 0.1, momentum 0.9, weight decay 5e-4, the
  AELF protocol's; ``--optimizer adam`` on CIFAR-10: lr 1e-4, no weight decay).

    python train_att_id.py --dataset mnist                  # AT-id, Table 1
    python train_att_id.py --dataset cifar10 --mode att-id  # AT-att-id, Table 2
"""
import time

import torch
import torch.nn.functional as F

import common
from attacks import pgd


def protocol(dataset, mode):
    """Defaults: Madry et al.'s training for the dataset (see the docstring), the paper's attack."""
    p = common.aelf_protocol(dataset)
    if dataset == 'mnist':
        p.update(model='madry_cnn', eps=0.3, steps=40, step_size=0.01, random_start=True,
                 optimizer='adam', lr=1e-4, batch_size=50, epochs=84, milestones=[],
                 weight_decay=0.0)                                # Madry et al., MNIST
        p['lam'] = 0.01                                           # Sec. 4.1
    else:
        p.update(model='att_resnet' if mode in ('att', 'att-id') else 'cifar_resnet',
                 eps=8 / 255, steps=5, step_size=2 / 255, random_start=True,   # Sec. 4.2
                 optimizer='sgd', lr=0.1, momentum=0.9, weight_decay=2e-4, batch_size=128,
                 epochs=205, milestones=[102, 154], padding=2)    # Madry et al., CIFAR-10
        p['lam'] = {'id': 0.1, 'att-id': 0.01, 'att': 0.0}[mode]  # Sec. 4.2
    return p


def parse_args(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument('--mode', choices=['id', 'att', 'att-id'], default='id',
                        help='id: Eq. (7) on a plain model; att: the attention model (Eq. (3)-(5)), '
                             'no denoising term; att-id: both (att and att-id need --model att_resnet)')
    parser.add_argument('--lam', type=common.number('[0, 1000]'), help='lambda of Eq. (7) (see the docstring)')
    parser.add_argument('--optimizer', choices=['adam', 'sgd'],
                        help="Madry et al.'s: adam on MNIST (lr 1e-4), sgd on CIFAR-10 (momentum 0.9)")

    def madry(first, defaults):
        if first.dataset == 'mnist' and first.mode != 'id':
            parser.error('the paper uses no attention on MNIST: use --mode id there')
        defaults.update(protocol(first.dataset, first.mode))
        if first.quick:       # the results table's row: the other methods' model, optimiser and PGD
            defaults.update(model='cnn_b', optimizer='sgd', lr=0.1, momentum=0.9, weight_decay=5e-4,
                            batch_size=128, steps=16, random_start=False)
        if first.optimizer is not None and first.optimizer != defaults['optimizer']:
            # the other optimiser's own lr and weight decay (never Adam's lr 1e-4 under SGD):
            # SGD as in the AELF protocol (lr 0.1, momentum 0.9, wd 5e-4), Adam as in Madry's MNIST
            defaults.update(dict(lr=0.1, weight_decay=5e-4) if first.optimizer == 'sgd' else
                            dict(lr=1e-4, weight_decay=0.0))
    args = common.parse(parser, argv, madry)
    if args.mode in ('att', 'att-id') and args.model != 'att_resnet':
        parser.error(f'--mode {args.mode} needs --model att_resnet')
    return args


def att_id_loss(model, x, x_adv, y, lam):
    """Eq. (7): CE(f(x'), y) + lambda * ||G(x) - G(x')||_2. Returns (loss, logits of x')."""
    g_adv = model.features(x_adv)
    logits_adv = model.fc(g_adv).float()
    loss = F.cross_entropy(logits_adv, y)                       # CE on the adversarial input
    if lam:
        g_clean = model.features(x)                             # not detached: both branches learn
        loss = loss + lam * (g_clean.float() - g_adv.float()).norm(dim=1).mean()   # Eq. (6)
    return loss, logits_adv


@common.main_guard
def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args)                     # seeded; torchrun: README "Several GPUs"
    model = common.build_model(args, device)
    common.compile_model(model, args.compile)          # --compile: README "Speed"
    run = common.Run(args, 'at-' + args.mode)
    train_set, val_set, test_set = common.load_data(args, device)
    if args.optimizer == 'adam':      # Madry et al.'s MNIST training
        optimizer = common.distributed_optimizer(
            torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay))
    else:
        optimizer = common.distributed_optimizer(torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay))
    run.resume(model, optimizer.load_state_dict)

    def attack(m, x, y, scale=1.0):   # Eq. (2), Madry et al.'s PGD (scale < 1: --eps-warmup)
        return pgd(m, x, y, scale * args.eps, args.steps, scale * args.step_size, args.random_start)

    name = 'AT (Madry et al.: AT-id with lambda 0)' if args.mode == 'id' and args.lam == 0 else f'AT-{args.mode}'
    print(f"{name} {common.summary(args, model, train_set, val_set, test_set)}, lambda {args.lam}, "
          f"{args.optimizer} lr {args.lr} batch {args.batch_size}, {device}",
          flush=True)
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
                x_adv = attack(model, x, y, scale)              # eval mode inside
                loss, logits = att_id_loss(model, x, x_adv, y, args.lam)   # Eq. (7)
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
            metrics = common.validation_metrics(model, val_set, attack, args)
        record = {'epoch': epoch + 1, 'lr': lr, 'train_loss': loss_sum / seen,
                  'train_acc': 100.0 * n_correct / seen, **metrics, 'val_images': len(val_set),
                  'seconds': seconds, 'images_per_s': seen / seconds}
        run.log_epoch(record, args.epochs)
        run.save(model, epoch + 1, optimizer.state_dict(), metrics, score=metrics.get('val_worst'),
                 finished=final)
    run.finish(model, test_set, attack)      # final.json (nothing to do if it holds the last epoch)


if __name__ == '__main__':
    main()
