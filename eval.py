"""Evaluate checkpoints of any train_*.py: one markdown table, one row per checkpoint.

    python eval.py --ckpt runs/at-mnist-cnn_b-s8/best.pt runs/st-mnist-cnn_b-s8/last.pt
    python eval.py --ckpt A.pt --autoattack --test-size 1000 --json results.json

Columns (accuracy in percent on the first --test-size test images):
- natural: clean inputs;
- PGD (train): the l-inf PGD the checkpoint was trained with (its eps, steps, step size and
  random-start setting, read from the checkpoint's saved args);
- PGD-20: 20 steps, random start, step 2.5 * eps / 20 (Madry et al.'s rule), same eps;
- CW-inf: the same PGD-20 on the Carlini-Wagner margin loss;
- AA (with --autoattack): AutoAttack, standard version (Croce & Hein 2020, the pyautoattack
  package), an independent and standard robustness check.
Models are rebuilt from the name and constructor arguments stored in each checkpoint, on the
dataset and image size they were trained on.
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

import common
from attacks import pgd


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt', nargs='+', required=True, help='checkpoint files (.pt)')
    p.add_argument('--data-dir', help="torchvision root (default: the checkpoint's --data-dir)")
    p.add_argument('--test-size', type=int, help='first N test images (default: all)')
    p.add_argument('--batch-size', type=int, default=500)
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--eps', type=float, help="attack radius (default: the checkpoint's training eps)")
    p.add_argument('--pgd', nargs=3, type=float, action='append', metavar=('EPS', 'STEPS', 'STEP'),
                   help='an extra PGD column without random start, e.g. --pgd 0.031 10 0.005 '
                        '(AELF Table 3 A*(10)); repeatable')
    p.add_argument('--autoattack', action='store_true', help='also run AutoAttack (standard)')
    p.add_argument('--transfer-from', metavar='SRC.pt',
                   help='black-box column: PGD examples made on SRC (an independently trained copy)')
    p.add_argument('--attention-maps', metavar='FILE.png',
                   help='attention models: inputs and the attention maps of both layers (Fig. 3)')
    p.add_argument('--n-images', type=int, default=8, help='images shown in pictures')
    p.add_argument('--seed', type=int, default=0, help='seed for random starts and AutoAttack')
    p.add_argument('--json', help='write the numbers to this JSON file as well')
    args = p.parse_args(argv)
    if args.test_size is not None and args.test_size <= 0:
        p.error('--test-size must be positive')
    return args


def autoattack_accuracy(model, split, eps, device, seed, batch_size):
    """AutoAttack 'standard' on the main logits (pyautoattack 0.2.0's API)."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise common.UserError("--autoattack needs the pyautoattack package: "
                               "pip install -r requirements.txt") from None
    model.eval()
    x = common.to_float(split.x)
    aa = AutoAttack(model, norm='Linf', eps=eps, version='standard', device=device, seed=seed)
    x_adv, _ = aa.run_standard_evaluation(x, split.y, batch_size=batch_size)
    with torch.no_grad():   # score the float x_adv itself (no uint8 round trip)
        preds = torch.cat([model(xb).argmax(1) for xb in x_adv.split(batch_size)])
    return 100.0 * (preds == split.y).sum().item() / len(split)


def training_attack(a, eps_override=None):
    """(eps, steps, step size, random start) of the PGD a checkpoint was trained with."""
    eps = a.get('eps', 0.0) if eps_override is None else eps_override
    steps, step_size = a.get('steps', 0), a.get('step_size', 0.0)
    if eps_override is not None and a.get('eps'):   # keep the training step/eps ratio
        step_size = step_size * eps_override / a['eps']
    return eps, steps, step_size, bool(a.get('random_start'))


def load_test_split(ckpt, args, device):
    a = ckpt['args']
    return common.load_split(a['dataset'], args.data_dir or a.get('data_dir', './data'), False,
                             image_size=a.get('image_size'), device=device, size=args.test_size)


def evaluate(path, args, device):
    """One table row: the accuracies of checkpoint ``path`` under each attack."""
    ckpt = common.load_checkpoint(path)
    model = common.model_from_checkpoint(ckpt, device, path)
    model.eval()
    a = ckpt['args']
    test = load_test_split(ckpt, args, device)
    eps, train_steps, train_step_size, train_rand = training_attack(a, args.eps)
    step20 = 2.5 * eps / 20
    columns = [('natural', 'natural'), ('PGD (train)', 'pgd_train'), ('PGD-20', 'pgd20'),
               ('CW-inf', 'cw20')]
    attacks = {
        'natural': None,
        'pgd_train': lambda m, x, y: pgd(m, x, y, eps, train_steps, train_step_size, train_rand),
        'pgd20': lambda m, x, y: pgd(m, x, y, eps, 20, step20, random_start=True),
        'cw20': lambda m, x, y: pgd(m, x, y, eps, 20, step20, random_start=True, loss='cw'),
    }
    for p_eps, p_steps, p_step in args.pgd or []:
        name = f"pgd({p_eps:g},{int(p_steps)},{p_step:g})"
        columns.append((name, name))
        attacks[name] = lambda m, x, y, e=p_eps, n=int(p_steps), s=p_step: pgd(m, x, y, e, n, s)
    if args.transfer_from:
        # black box (AT-att-id Tables 1-2): PGD examples made on an independently trained copy
        src_ckpt = common.load_checkpoint(args.transfer_from)
        if (src_ckpt['args']['dataset'], src_ckpt['args'].get('image_size')) != (a['dataset'], a.get('image_size')):
            raise common.UserError(f"--transfer-from {args.transfer_from!r} was trained on other data "
                                   f"than {path!r}: use a checkpoint of the same dataset and image size")
        source = common.model_from_checkpoint(src_ckpt, device, args.transfer_from).eval()
        columns.append(('transfer', 'transfer'))
        attacks['transfer'] = lambda m, x, y: pgd(source, x, y, eps, train_steps, train_step_size,
                                                  train_rand)
    if getattr(model, 'ase_index', None) is not None:
        # AGAIN's adaptive white-box attack (Sec. 5.2.2): ascend CE(main) + CE(ASE) as well,
        # and count an example robust only if it survives both attacks
        def both_heads(m, x_adv, y):
            logits, ase_logits = m.forward_heads(x_adv)
            return (F.cross_entropy(logits.float(), y, reduction='sum')
                    + F.cross_entropy(ase_logits.float(), y, reduction='sum'))
        attacks['pgd20_both'] = lambda m, x, y: pgd(m, x, y, eps, 20, step20, random_start=True,
                                                    loss=both_heads)
        columns += [('PGD-20 (both heads)', 'pgd20_both'), ('PGD-20 worst', 'pgd20_worst')]
    row = {'ckpt': path, 'script': ckpt.get('script', ''), 'model': ckpt['model'],
           'dataset': a['dataset'], 'epoch': ckpt.get('epoch'), 'test_images': len(test),
           'eps': eps, 'pgd_train': f"PGD({eps:g}, {train_steps}, {train_step_size:g})"}
    t0 = time.time()
    masks = {}
    for name, attack in attacks.items():
        common.seed_everything(args.seed)
        masks[name] = common.correct(model, test, attack, args.batch_size)
        row[name + '_acc'] = 100.0 * masks[name].sum().item() / len(test)
    if 'pgd20_both' in masks:
        worst = masks['pgd20'] & masks['pgd20_both']
        row['pgd20_worst_acc'] = 100.0 * worst.sum().item() / len(test)
    if args.autoattack:
        columns.append(('AA', 'autoattack'))
        row['autoattack_acc'] = autoattack_accuracy(model, test, eps, device, args.seed,
                                                    args.batch_size)
    row['seconds'] = time.time() - t0
    row['columns'] = columns
    return row


def markdown(rows):
    columns = []
    for r in rows:
        columns += [c for c in r['columns'] if c not in columns]
    head = ['checkpoint'] + [label for label, _ in columns]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        cells = [f"{r['ckpt']} ({r['pgd_train']}, n={r['test_images']})"]
        cells += [f"{r[key + '_acc']:.2f}" if key + '_acc' in r else '-' for _, key in columns]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def attention_maps_png(paths, args, device, filename):
    """AT-att-id Fig. 3: per checkpoint, a row of input images and a row per attention layer
    (blocks 3 and 4), each map upsampled to the image size and scaled to [0, 1]."""
    from torchvision.utils import save_image
    rows = []
    for path in paths:
        ckpt = common.load_checkpoint(path)
        model = common.model_from_checkpoint(ckpt, device, path).eval()
        if not hasattr(model, 'features_and_maps') or not getattr(model, 'attention', False):
            print(f"note: {path} has no attention module (train_att_id.py --mode att or att-id); "
                  f"left out of {filename}", file=sys.stderr)
            continue
        test = load_test_split(ckpt, args, device).head(args.n_images)
        x = common.to_float(test.x)
        with torch.no_grad():
            _, maps = model.features_and_maps(x)
        rows.append(x.expand(-1, 3, -1, -1))
        for a in maps:
            a = a / a.flatten(1).amax(1)[:, None, None].clamp_min(1e-12)
            up = torch.nn.functional.interpolate(a[:, None].float(), size=x.shape[-2:], mode='bilinear',
                                                 align_corners=False)
            rows.append(up.expand(-1, 3, -1, -1))
    if not rows:
        raise common.UserError(f"--attention-maps: none of the checkpoints has an attention module "
                               f"(train one with train_att_id.py --mode att or att-id)")
    save_image(torch.cat(rows).cpu(), filename, nrow=len(rows[0]), padding=2)
    return filename


@common.main_guard
def main(argv=None):
    args = parse_args(argv)
    device = common.get_device(args.device)
    rows = [evaluate(path, args, device) for path in args.ckpt]
    print(markdown(rows))
    if args.attention_maps:
        print(f"wrote {attention_maps_png(args.ckpt, args, device, args.attention_maps)}", file=sys.stderr)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'rows': rows, 'test_size': args.test_size, 'seed': args.seed}, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == '__main__':
    main()
