"""AT (adversarial training, Madry et al. 2018; AELF Eq. (3)) and ST (standard training, Eq. (1)).

    AT:  min_theta E[ max_{||delta||_inf <= eps} CE(M_theta(x + delta), y) ]     # Eq. (3)
    ST:  min_theta E[ CE(M_theta(x), y) ]                                         # Eq. (1), --standard

The inner maximisation is l-inf PGD(eps, steps, step_size) without random start, run with the
model in eval mode (AELF Appendix C); every clean input of the batch is replaced by its PGD
example. Defaults are the AELF paper's protocol for the chosen dataset (Appendix C):

    MNIST     cnn_b, 32x32, 50 epochs, lr 0.1 (x0.1 after epochs 20, 40), PGD(0.3, 16, 0.02)
    CIFAR-10  cnn_b, crop (pad 2) + flip, 160 epochs (ST 100), PGD(0.031, 5, 0.01), wd 2e-4
    CIFAR-100 wrn-28-10, PGD(0.03, 7, 0.0075)

batch 128, SGD momentum 0.9, weight decay 5e-4, seed 8. The ST model of this script is the
initialisation AELFs and JT* start from (``--init runs/st-.../last.pt``).

    python train_at.py --dataset mnist              # AT, the paper protocol
    python train_at.py --dataset mnist --standard   # ST

The script is the template every train_*.py follows: flags, data on the device, one training
loop written out top to bottom, a per-epoch evaluation on the --val-size validation split (held-out
training images) with the training PGD, the test set once after the last epoch, and a run folder
(last.pt, best.pt, log.jsonl, final.json).
"""
import time

import torch
import torch.nn.functional as F

import common
from attacks import pgd


def parse_args(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument('--standard', action='store_true', help='ST: train on clean inputs only')
    parser.add_argument('--init', help='start from this checkpoint of the same model (e.g. AT '
                                       'fine-tuned from the ST init AELFs starts from)')
    return common.parse(parser, argv)      # AELF Appendix C (ST's epochs with --standard)


def at_loss(model, x, y, attack, standard=False):
    """Eq. (3) on one batch: the cross-entropy of the model (in its current mode) on the PGD
    examples of x (``attack``, run in eval mode); Eq. (1) with ``standard``. Returns (loss, logits)."""
    x_in = x if standard else attack(model, x, y)       # inner max: PGD (eval mode, restored)
    logits = model(x_in)
    return F.cross_entropy(logits.float(), y), logits   # outer min: CE(M(x + delta), y)


@common.main_guard
def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args)                     # seeded; torchrun: README "Several GPUs"
    model = common.build_model(args, device)
    common.compile_model(model, args.compile)          # --compile: README "Speed"
    run = common.Run(args, 'st' if args.standard else 'at')
    if args.init and run.resume_ckpt is None:
        common.load_weights_into(model, args.init)           # one-line error for another model
    train_set, val_set, test_set = common.load_data(args, device)
    optimizer = common.distributed_optimizer(torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay))
    run.resume(model, optimizer.load_state_dict)

    def attack(m, x, y, scale=1.0):  # the training PGD, also the per-epoch test's (scale 1);
        # scale < 1: the eps warm-up (--eps-warmup), training only
        return pgd(m, x, y, scale * args.eps, args.steps, scale * args.step_size, args.random_start)

    data = common.summary(args, model, train_set, val_set, test_set, 'no attack' if args.standard else None)
    print(f"{'ST' if args.standard else 'AT'} {data}, init {args.init or 'random'}, {device}", flush=True)
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
                loss, logits = at_loss(model, x, y, lambda m, a, b: attack(m, a, b, scale),
                                       args.standard)                         # Eq. (3) / Eq. (1)
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
        run.save(model, epoch + 1, optimizer.state_dict(), metrics, finished=final,
                 score=metrics.get('val_nat' if args.standard else 'val_worst'))
    run.finish(model, test_set, attack)      # final.json (nothing to do if it holds the last epoch)


if __name__ == '__main__':
    main()
