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
  package), an independent and standard robustness check; a second table gives the robust
  accuracy left after each of its attacks in order (APGD-CE, APGD-T, FAB-T, Square), so a
  gradient-free attack (Square) that still lowers it - the signature of masked gradients - is
  seen at a glance. ``--autoattack-version rand`` and ``--aa-attacks apgd-ce,apgd-t`` (a subset,
  with the version's settings) for quick checks.
- For checkpoints with an AGAIN ASE head: PGD-20 on both heads (the paper's adaptive attack),
  PGD-20 through a BPDA surrogate of the head's argmax (forward unchanged, backward through the
  softmax-weighted W_ase rows), and the head diagnostics (its own accuracy, agreement, oracle,
  the main head without any scaling).
- worst: an image counts only if it is classified correctly clean and under every attack of
  the row (AutoAttack included when run).
Models are rebuilt from the name and constructor arguments stored in each checkpoint, on the
dataset and image size they were trained on.
"""
import argparse
import copy
import json
import logging
import os
import re
import sys
import time

import torch
import torch.nn.functional as F

import common
from attacks import pgd


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()),
                                formatter_class=common.HelpFormatter)
    p.add_argument('--ckpt', nargs='+', required=True,
                   help='checkpoint files (.pt), or run folders (their best.pt)')
    p.add_argument('--data-dir', help="torchvision root (default: the checkpoint's --data-dir)")
    p.add_argument('--test-size', type=common.number('[1, inf)', int), help='first N test images (default: all)')
    p.add_argument('--batch-size', type=common.number('[1, 100000]', int), default=500)
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--eps', type=common.number('[0, 1]'), help="attack radius (default: the checkpoint's training eps)")
    p.add_argument('--pgd', nargs=3, type=float, action='append', metavar=('EPS', 'STEPS', 'STEP'),
                   help='an extra PGD column without random start, e.g. --pgd 0.031 10 0.005 '
                        '(AELF Table 3 A*(10)); repeatable')
    p.add_argument('--autoattack', action='store_true', help='also run AutoAttack (standard)')
    p.add_argument('--autoattack-version', choices=['standard', 'rand'], default='standard',
                   help="AutoAttack's version (rand: APGD-CE and APGD-DLR with EOT, for randomised models)")
    p.add_argument('--aa-attacks', metavar='A,B',
                   help="run only these of the version's attacks, in its order (e.g. apgd-ce,apgd-t)")
    p.add_argument('--transfer-from', metavar='SRC.pt',
                   help='black-box column: PGD examples made on SRC (an independently trained copy)')
    p.add_argument('--attention-maps', metavar='FILE.png',
                   help='attention models: inputs and the attention maps of both layers (Fig. 3)')
    p.add_argument('--n-images', type=common.number('[1, 64]', int), default=8, help='images shown in pictures')
    g = p.add_argument_group('analyses (the papers\' figures and diagnostic tables)')
    g.add_argument('--no-table', action='store_true', help='skip the attack table (analyses only)')
    g.add_argument('--shift', type=common.number('[1, 32]', int), nargs='?', const=8, metavar='PIXELS',
                   help='AELF Fig. 3 / Tables 2, 6: accuracy on the test set shifted left, right, '
                        'up, down by PIXELS (default 8), zero fill')
    g.add_argument('--shift-attack', action=argparse.BooleanOptionalAction, default=True,
                   help='--no-shift-attack: natural accuracy only on the shifted sets (fast)')
    g.add_argument('--grad-maps', metavar='FILE.png', help='AELF Fig. 2: input gradients')
    g.add_argument('--grad-style', choices=['signed', 'clip'], default='signed',
                   help='signed: G/||G||_2/max|G|, red + / green - on black (AELF); clip: raw '
                        'gradient clipped to +-3 std, rescaled to [0, 1] (AT-att-id Fig. 4)')
    g.add_argument('--smoothgrad', type=common.number('[0, 10000]', int), default=0, metavar='N',
                   help='--grad-maps/--grad-signs: mean input gradient over N noisy copies (AGAIN '
                        'supplement Fig. 1, SmoothGrad); 0: the plain gradient')
    g.add_argument('--smoothgrad-sigma', type=common.number('[0, 1]'), default=0.15,
                   help='std of the SmoothGrad noise (inputs in [0, 1]; Smilkov et al. use 10-20%%)')
    g.add_argument('--grad-signs', metavar='FILE.png', help='AELF Fig. 4: gradient signs above thresholds')
    g.add_argument('--sign-thresholds', default='0.1,0.3,0.5', help='thresholds for --grad-signs')
    g.add_argument('--sign-scale', choices=['raw', 'normalised'], default='raw',
                   help="--grad-signs thresholds on the raw gradient G (AELF Fig. 4: 'according to "
                        "original magnitude of gradient') or on G / ||G|| / max |.|")
    g.add_argument('--gradmap-classifier', metavar='ST.pt',
                   help='AT-att-id Table 3: a standard model classifies the gradient maps')
    g.add_argument('--asc', action='store_true', help='AGAIN Eq. (2): attribution span coverage')
    g.add_argument('--asc-threshold', type=common.number('[0, 1]'), default=0.5, help='lambda of Eq. (2)')
    g.add_argument('--cam', metavar='FILE.png', help='AGAIN Fig. 1: class activation maps')
    g.add_argument('--cam-style', choices=['overlay', 'raw'], default='overlay',
                   help='heat map over the input (as in the papers) or the grey map alone')
    g.add_argument('--valid-weights', action='store_true',
                   help='AGAIN supp. 4.4: fc weights above their class mean, averaged over classes')
    g.add_argument('--corrupt-span', metavar='ST.pt',
                   help='AGAIN Sec. 3, Table 1: erase the span only the standard model ST.pt attends to')
    g.add_argument('--span-reading', choices=['delete', 'keep'], default='delete',
                   help="--corrupt-span's mask: delete the standard-only span (default) or keep only it")
    g.add_argument('--span-picture', metavar='FILE.png', help='--corrupt-span: image, mask, corrupted rows')
    g.add_argument('--compactness', nargs='?', const='', metavar='FILE.png',
                   help='AGAIN Fig. 4: within-class / between-centroid distance of features(x); '
                        'with FILE, a PCA picture of the features')
    g.add_argument('--gen-gap', type=common.number('[1, inf)', int), nargs='?', const=1000, metavar='N',
                   help='AGAIN Sec. 5.6: natural, training-PGD and PGD-20 accuracy on N images the '
                        'checkpoint trained on (its training split without its validation images) and '
                        'on the test images (N of them unless --test-size), and the gaps train - test '
                        '(bare --gen-gap: N = 1000)')
    g.add_argument('--gen-gap-picture', metavar='FILE.png', help='--gen-gap as AGAIN Fig. 3\'s grouped bars')
    g.add_argument('--eps-curve', metavar='FILE.png',
                   help='accuracy under PGD-20 (random start) over eps, a line per checkpoint; warns '
                        'when a curve stays above 5%% at eps 0.5 (MNIST) or 4x the training eps')
    g.add_argument('--eps-list', type=float, nargs='+', metavar='EPS',
                   help='--eps-curve radii (default: 9 from 0 to twice the training eps)')
    g.add_argument('--training-curves', metavar='FILE.png',
                   help="loss, training accuracy and val nat / adv / worst per epoch from each run's "
                        'log.jsonl, a line per run, best.pt\'s epoch starred')
    g.add_argument('--sanity', action='store_true', help='checks against gradient masking')
    g.add_argument('--square-queries', type=common.number('[1, 1000000]', int), default=5000,
                   help="queries of --sanity's gradient-free attack (AutoAttack's Square: 5000)")
    p.add_argument('--compile', nargs='?', const='default', choices=common.COMPILE_MODES, metavar='MODE',
                   help='torch.compile a copy of the model for the PGD columns (bare: "default"; '
                        '%(choices)s); AutoAttack and the analyses run eager (README "Speed")')
    p.add_argument('--seed', type=common.number('[0, 4294967295]', int), default=0, help='seed for random starts and AutoAttack')
    p.add_argument('--json', help='write the numbers to this JSON file as well')
    args = p.parse_args(argv)
    for p_eps, p_steps, p_step in args.pgd or []:
        if not (0 <= p_eps <= 1 and p_steps in range(10001) and 0 <= p_step <= 1):
            p.error(f"--pgd {p_eps:g} {p_steps:g} {p_step:g}: EPS and STEP in [0, 1], STEPS a whole "
                    f"number in [0, 10000]")
    try:
        args.sign_thresholds = [float(t) for t in args.sign_thresholds.split(',')]
    except ValueError:
        p.error('--sign-thresholds takes numbers separated by commas, e.g. 0.1,0.3,0.5')
    if args.aa_attacks is not None:
        args.aa_attacks = [a.strip() for a in args.aa_attacks.split(',') if a.strip()]
        known = AA_ATTACKS[args.autoattack_version]
        bad = [a for a in args.aa_attacks if a not in known]
        if bad or not args.aa_attacks:
            p.error(f"--aa-attacks: {', '.join(bad) or 'none given'} not in the {args.autoattack_version} "
                    f"version's attacks ({','.join(known)})")
        if not args.autoattack:
            p.error('--aa-attacks needs --autoattack')
    if args.gen_gap_picture and not args.gen_gap:
        p.error('--gen-gap-picture draws --gen-gap: add --gen-gap')
    if args.eps_list and (not args.eps_curve or not all(0 <= e <= 1 for e in args.eps_list)):
        p.error('--eps-list takes radii in [0, 1] for --eps-curve')
    if args.no_table and (args.autoattack or args.pgd):
        p.error(f"{'--autoattack' if args.autoattack else '--pgd'} is a column of the attack table, "
                f"which --no-table skips: drop --no-table")
    return args


AA_ATTACKS = {'standard': ['apgd-ce', 'apgd-t', 'fab-t', 'square'], 'rand': ['apgd-ce', 'apgd-dlr']}


class Progress:
    """One line on stderr as each attack of a checkpoint finishes (what ran, its accuracy, the
    time so far), so a long evaluation shows it is alive; stdout keeps only the tables."""

    def __init__(self, path, n):
        self.path, self.n, self.t0 = path, n, time.time()

    def __call__(self, what, acc):
        print(f"  {self.path}: {what} {acc:.2f}% ({self.n} images, {time.time() - self.t0:.0f}s)",
              file=sys.stderr, flush=True)


class _AALog(logging.Handler):
    """Collects the 'auto-attack' logger's records: pyautoattack reports the robust accuracy
    after each attack only there ('robust accuracy after APGD-CE: 61.00% ...'); with a Progress,
    each of them is also a progress line as it arrives."""

    def __init__(self, progress=None):
        super().__init__(logging.DEBUG)
        self.messages, self.progress = [], progress

    def emit(self, record):
        message = record.getMessage()
        self.messages.append(message)
        m = re.match(r'(initial accuracy|robust accuracy after ([A-Z-]+)): ([0-9.]+)%', message)
        if m and self.progress:
            self.progress(f"AutoAttack {'clean' if m.group(2) is None else 'after ' + m.group(2)}",
                          float(m.group(3)))


def autoattack(model, split, eps, device, seed, batch_size, version='standard', attacks=None,
               square_queries=None, progress=None):
    """AutoAttack (pyautoattack 0.2.0's API) on the main logits: (per-image correctness after
    all attacks, {'clean': acc, attack: robust accuracy after it, ...} in percent, in the order
    run, warnings). ``attacks`` runs a subset of the version's attacks with its settings."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise common.UserError("--autoattack needs the pyautoattack package: "
                               "pip install -r requirements.txt") from None
    model.eval()
    x = common.to_float(split.x)
    aa = AutoAttack(model, norm='Linf', eps=eps, version=version, device=device, seed=seed)
    if attacks is not None:
        aa.attacks_to_run = [a for a in AA_ATTACKS[version] if a in attacks]
    if square_queries is not None:
        aa.square.n_queries = square_queries
    logger, handler = logging.getLogger('auto-attack'), _AALog(progress)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    # pyautoattack's check for dynamic defenses ends with sys.settrace(None), which would switch
    # off a debugger or coverage for the rest of the process: give the tracer back afterwards
    tracer = sys.gettrace()
    try:
        x_adv, _ = aa.run_standard_evaluation(x, split.y, batch_size=batch_size)
    finally:
        sys.settrace(tracer)
        logger.removeHandler(handler)
        logger.setLevel(level)
    with torch.no_grad():   # score the float x_adv itself (no uint8 round trip)
        preds = torch.cat([model(xb).argmax(1) for xb in x_adv.split(batch_size)])
    breakdown = {}
    for message in handler.messages:
        m = re.match(r'(initial accuracy|robust accuracy after ([A-Z-]+)): ([0-9.]+)%', message)
        if m:
            breakdown['clean' if m.group(2) is None else m.group(2).lower()] = float(m.group(3))
    missing = [a for a in ['clean'] + aa.attacks_to_run if a not in breakdown]
    if missing:   # another pyautoattack version words its log differently: say so, keep the total
        print(f"note: AutoAttack's log gave no accuracy for {', '.join(missing)} "
              f"(pyautoattack {getattr(sys.modules.get('pyautoattack'), '__version__', '?')})",
              file=sys.stderr)
    warnings = [m for m in handler.messages if 'Square Attack has decreased' in m]
    return (preds == split.y), breakdown, warnings


def training_attack(a, eps_override=None):
    """(eps, steps, step size, random start) of the PGD a checkpoint was trained with."""
    eps = a.get('eps', 0.0) if eps_override is None else eps_override
    steps, step_size = a.get('steps', 0), a.get('step_size', 0.0)
    if eps_override is not None and a.get('eps'):   # keep the training step/eps ratio
        step_size = step_size * eps_override / a['eps']
    return eps, steps, step_size, bool(a.get('random_start'))


def head(split, n):
    """The first n examples of a split (all when n is None)."""
    return common.Split(split.x[:n], split.y[:n])


def picture_inputs(path, args, device):
    """(model in eval mode, first --n-images test images as floats, their labels) of a checkpoint."""
    ckpt = common.load_checkpoint(path)
    model = common.model_from_checkpoint(ckpt, device, path).eval()
    test = head(load_test_split(ckpt, args, device), args.n_images)
    return model, common.to_float(test.x), test.y


def load_test_split(ckpt, args, device):
    a = ckpt['args']
    return common.load_split(a['dataset'], args.data_dir or a.get('data_dir', './data'), False,
                             image_size=a.get('image_size'), device=device, size=args.test_size)


def evaluate(path, args, device):
    """One table row: the accuracies of checkpoint ``path`` under each attack."""
    ckpt = common.load_checkpoint(path)
    model = common.model_from_checkpoint(ckpt, device, path)
    model.eval()
    # --compile: a compiled copy for the PGD columns; AutoAttack (which attacks shrinking subsets
    # of a batch: each new shape would compile again) and the analyses use the eager model
    table_model = model if not args.compile else common.compile_model(
        common.model_from_checkpoint(ckpt, device, path).eval(), args.compile)
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
        both_heads = strongest_pgd_loss(model)
        attacks['pgd20_both'] = lambda m, x, y: pgd(m, x, y, eps, 20, step20, random_start=True,
                                                    loss=both_heads)

        # BPDA (Athalye et al. 2018): the inference path's forward, with the argmax's row choice
        # differentiated as the softmax-weighted sum of W_ase rows (ASEHead 'surrogate')
        def through_argmax(m, x_adv, y):
            logits, _ = m.forward_heads(x_adv, ase_inference='surrogate')
            return F.cross_entropy(logits.float(), y, reduction='sum')
        attacks['pgd20_bpda'] = lambda m, x, y: pgd(m, x, y, eps, 20, step20, random_start=True,
                                                    loss=through_argmax)
        columns += [('PGD-20 (both heads)', 'pgd20_both'), ('PGD-20 (BPDA)', 'pgd20_bpda')]
    row = {'ckpt': path, 'script': ckpt.get('script', ''), 'model': ckpt['model'],
           'dataset': a['dataset'], 'epoch': ckpt.get('epoch'), 'epochs': a.get('epochs'),
           'test_images': len(test),
           'eps': eps, 'pgd_train': f"PGD({eps:g}, {train_steps}, {train_step_size:g})"}
    t0 = time.time()
    masks = {}
    if args.no_table:
        attacks, columns = {}, []
    progress = Progress(path, len(test))
    labels = {key: label for label, key in columns}
    for name, attack in attacks.items():
        torch.manual_seed(args.seed)
        masks[name] = common.correct(table_model, test, attack, args.batch_size)
        row[name + '_acc'] = 100.0 * masks[name].sum().item() / len(test)
        progress(labels.get(name, name), row[name + '_acc'])
    if args.autoattack and not args.no_table:
        columns.append(('AA', 'autoattack'))
        masks['autoattack'], row['autoattack_breakdown'], row['autoattack_warnings'] = autoattack(
            model, test, eps, device, args.seed, args.batch_size, args.autoattack_version, args.aa_attacks,
            progress=progress)
        row['autoattack_acc'] = 100.0 * masks['autoattack'].sum().item() / len(test)
        row['autoattack_version'] = args.autoattack_version + (
            f" ({','.join(args.aa_attacks)})" if args.aa_attacks else '')
    if len(masks) > 2:   # natural and at least two attacks: the per-image worst case
        worst = torch.stack(list(masks.values())).all(0)
        row['worst_acc'] = 100.0 * worst.sum().item() / len(test)
        columns.append(('worst', 'worst'))
    if getattr(model, 'ase_index', None) is not None:
        row.update(ase_diagnostics(model, test, args.batch_size))
    if args.shift:
        row['shift'] = shift_accuracies(model, test, args.shift, columns_attack(
            eps, train_steps, train_step_size, train_rand) if args.shift_attack else None, args.batch_size)
    if args.gradmap_classifier:
        row.update(gradmap_classification(model, ckpt, test, args, device))
    if args.asc or args.cam:
        row['asc_per_image'] = asc_values(model, test, args.asc_threshold, args.batch_size)
        row['asc'] = sum(row['asc_per_image']) / len(row['asc_per_image'])
    if args.valid_weights:
        row['valid_weights'] = valid_weights(model)
    if args.compactness is not None:
        row['compactness'], row['_features'] = compactness(model, test, args.batch_size)
    if args.corrupt_span:
        row['corrupt_span'] = corrupted_span_table(model, ckpt, path, test, eps, args, device)
    if args.gen_gap:
        row['gen_gap'] = generalization_gap(model, ckpt, path, test if args.test_size else head(test, args.gen_gap),
                                            args, device)
        progress('generalization gap (robust, PGD-20)', row['gen_gap']['gap_pgd20'])
    if args.eps_curve:
        row['eps_curve'] = eps_curve_row(model, ckpt, test, args)
        progress('eps curve at the check radius', row['eps_curve']['check_accuracy'])
    if args.sanity:
        measured = measure_sanity(model, test, eps, args, device, progress)
        row['sanity'] = {'measured': measured, 'warnings': sanity_warnings(measured, len(test))}
    row['seconds'] = time.time() - t0
    row['columns'] = columns
    return row


@torch.no_grad()
def ase_diagnostics(model, test, batch_size):
    """For a model with an AGAIN ASE head, on natural test images: the ASE head's own accuracy
    (argmax of its logits), the share of images where the model's prediction (the inference
    path, scaled by W_ase[ASE prediction]) equals the ASE head's, and the oracle accuracy of the
    main head when the maps are scaled by the true class's row W_ase[y] (Eq. (4), alpha 1).
    Agreement near 100% with an oracle near 100% means the main head reads the class off the
    scaling, and the model's prediction is the ASE head's; the main head's accuracy on unscaled
    maps says how much it knows without the scaling."""
    hits = {'ase_head_acc': 0, 'ase_agreement': 0, 'ase_oracle_acc': 0, 'ase_unscaled_acc': 0}
    for x, y in common.batches(test, batch_size):
        main, ase = model.forward_heads(x)
        oracle, _ = model.forward_heads(x, y=y, y_fake=y, alpha=1.0)
        unscaled, _ = model.forward_heads(x, ase_inference='none')
        hits['ase_unscaled_acc'] += (unscaled.argmax(1) == y).sum().item()
        hits['ase_head_acc'] += (ase.argmax(1) == y).sum().item()
        hits['ase_agreement'] += (main.argmax(1) == ase.argmax(1)).sum().item()
        hits['ase_oracle_acc'] += (oracle.argmax(1) == y).sum().item()
    return {k: 100.0 * v / len(test) for k, v in hits.items()}


def columns_attack(eps, steps, step_size, rand):
    return lambda m, x, y: pgd(m, x, y, eps, steps, step_size, rand)


# ------------------------------------------------------------------ shifted test sets (AELF)

SHIFTS = {'N': (0, 0), 'N(L)': (-1, 0), 'N(R)': (1, 0), 'N(U)': (0, -1), 'N(D)': (0, 1)}


def shift_images(x, dx, dy):
    """Shift a batch (B x C x H x W) by dx pixels right (negative: left) and dy pixels down
    (negative: up), filling with zeros (AELF Fig. 3)."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    src_y, dst_y = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    src_x, dst_x = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., dst_y, dst_x] = x[..., src_y, src_x]
    return out


def shift_accuracies(model, test, pixels, attack, batch_size):
    """Natural and adversarial (training PGD) accuracy on N, N(L), N(R), N(U), N(D)."""
    result = {}
    for name, (sx, sy) in SHIFTS.items():
        shifted = common.Split(shift_images(test.x, sx * pixels, sy * pixels), test.y)
        result[name] = {'natural': common.accuracy(model, shifted, None, batch_size),
                        'adversarial': (common.accuracy(model, shifted, attack, batch_size)
                                        if attack is not None else None)}
    return result


def shift_table(rows, pixels):
    names = list(SHIFTS)
    head = ['checkpoint'] + [f'nat {n}' for n in names] + [f'adv {n}' for n in names]
    lines = [f"Shifted test sets ({pixels} pixels, zero fill; adversarial = the training PGD):",
             '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        cells = [r['ckpt']] + [f"{r['shift'][n]['natural']:.2f}" for n in names]
        cells += [f"{r['shift'][n]['adversarial']:.2f}" if r['shift'][n]['adversarial'] is not None
                  else '-' for n in names]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


# ----------------------------------------------------------------- input gradients (pictures)

def input_gradients(model, x, y):
    """d CE / d x in eval mode (per image; no parameter .grad touched)."""
    model.eval()
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x).float(), y, reduction='sum')
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def smooth_gradients(model, x, y, n, sigma, seed=0):
    """SmoothGrad (Smilkov et al. 2017; AGAIN supplement Fig. 1): the mean of d CE / d x over
    ``n`` copies of x + N(0, sigma^2) (not clamped); n = 0 gives the plain gradient."""
    if n <= 0:
        return input_gradients(model, x, y)
    g = torch.Generator(device=x.device).manual_seed(seed)
    total = torch.zeros_like(x)
    for _ in range(n):
        noise = torch.randn(x.shape, generator=g, device=x.device) * sigma
        total += input_gradients(model, x + noise, y)
    return total / n


def normalized_gradient(grad):
    """AELF footnote 3: G / ||G||_2, then divided by max |.|, per image (channels summed):
    values in [-1, 1] with max |value| 1."""
    g = grad.sum(1)
    g = g / g.flatten(1).norm(dim=1).clamp_min(1e-20)[:, None, None]
    return g / g.flatten(1).abs().amax(1).clamp_min(1e-20)[:, None, None]


def sign_maps(grad, thresholds, scale='raw'):
    """AELF Fig. 4: the sign of the input gradient where its magnitude exceeds each threshold
    (one block of images per threshold). Footnote 5 and the caption take the signs "from original
    values G", "according to original magnitude of gradient": ``raw`` thresholds G itself
    (channels summed), so a model with smaller gradients shows fewer pixels, which is what the
    figure compares; ``normalised`` thresholds G / ||G||_2 / max |.| (every image's largest value
    is 1), which keeps only the shape of the gradient."""
    g = grad.sum(1) if scale == 'raw' else normalized_gradient(grad)
    return torch.cat([red_green(torch.sign(g) * (g.abs() > t)) for t in thresholds])


def red_green(g):
    """Signed map in [-1, 1] -> RGB: positive red, negative green, on black."""
    return torch.stack([g.clamp(min=0), (-g).clamp(min=0), torch.zeros_like(g)], dim=1)


def clipped_gradient(grad):
    """AT-att-id Fig. 4: raw gradient clipped to +-3 std, rescaled to [0, 1], per image."""
    std = grad.flatten(1).std(1).clamp_min(1e-20)[:, None, None, None]
    return ((grad.clamp(-3 * std, 3 * std) + 3 * std) / (6 * std)).clamp(0, 1)


def raw_rescaled_gradient(grad):
    """The raw gradient rescaled to [0, 1] per image (min-max), without clipping."""
    lo = grad.flatten(1).amin(1)[:, None, None, None]
    hi = grad.flatten(1).amax(1)[:, None, None, None]
    return (grad - lo) / (hi - lo).clamp_min(1e-20)


def rgb(x):
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def gradient_pictures(paths, args, device):
    """--grad-maps and --grad-signs: a row of inputs, then one row per checkpoint (for the
    signs, one block of images per threshold)."""
    maps, signs, inputs = [], [], None
    for path in paths:
        model, x, y = picture_inputs(path, args, device)
        grad = smooth_gradients(model, x, y, args.smoothgrad, args.smoothgrad_sigma, args.seed)
        if inputs is None:
            inputs = rgb(x)
        elif inputs.shape != rgb(x).shape:
            raise common.UserError(f"{path} was trained on other images than {paths[0]}: pictures "
                                   f"compare checkpoints of one dataset and image size")
        maps.append(rgb(clipped_gradient(grad)) if args.grad_style == 'clip'
                    else red_green(normalized_gradient(grad)))
        signs.append(sign_maps(grad, args.sign_thresholds, args.sign_scale))
        print(f"{path}: max |G| {grad.sum(1).abs().amax().item():.3g} over the pictured images "
              f"(--grad-signs thresholds apply to the {args.sign_scale} gradient)", file=sys.stderr)
    n = len(inputs)
    names = [short_name(p) for p in paths]
    if args.grad_maps:
        clip = args.grad_style == 'clip'
        image_grid([inputs] + maps, ['input'] + names,
                   'Input gradients (AELF Fig. 2)' + (', clipped to +-3 std' if clip else
                                                      ', scaled to max |G| = 1 per image'),
                   args.grad_maps, key=grey_key('gradient, -3 std (black) to +3 std (white)') if clip
                   else sign_key)
    if args.grad_signs:
        k = len(args.sign_thresholds)
        image_grid([torch.cat([inputs] * k)] + signs, ['input'] + names,
                   f"Gradient signs where |G| > threshold ({args.sign_scale} G; AELF Fig. 4)",
                   args.grad_signs, col_titles={i * n: f"threshold {t:g}" for i, t in enumerate(args.sign_thresholds)},
                   key=sign_key)


def gradmap_classification(model, ckpt, test, args, device):
    """AT-att-id Table 3: accuracy of a standard-trained classifier on the gradient maps of
    ``model`` (clipped to +-3 std and rescaled; and raw, min-max rescaled), on the test images
    and, as the paper also reports, on as many training images (the first len(test))."""
    st_ckpt = common.load_checkpoint(args.gradmap_classifier)
    if (st_ckpt['args']['dataset'], st_ckpt['args'].get('image_size')) != \
            (ckpt['args']['dataset'], ckpt['args'].get('image_size')):
        raise common.UserError(f"--gradmap-classifier {args.gradmap_classifier!r} was trained on other "
                               f"data: use a standard model of the same dataset and image size")
    classifier = common.model_from_checkpoint(st_ckpt, device, args.gradmap_classifier).eval()
    a = ckpt['args']
    train = common.load_split(a['dataset'], args.data_dir or a.get('data_dir', './data'), True,
                              image_size=a.get('image_size'), device=test.y.device, size=len(test))
    out = {}
    for part, split in (('', test), ('_train', train)):
        hits = {'clipped': 0, 'raw': 0}
        for x, y in common.batches(split, args.batch_size):
            grad = input_gradients(model, x, y)
            with torch.no_grad():
                hits['clipped'] += (classifier(clipped_gradient(grad)).argmax(1) == y).sum().item()
                hits['raw'] += (classifier(raw_rescaled_gradient(grad)).argmax(1) == y).sum().item()
        out.update({f'gradmap_clipped{part}_acc': 100.0 * hits['clipped'] / len(split),
                    f'gradmap_raw{part}_acc': 100.0 * hits['raw'] / len(split)})
    return out


# -------------------------------------------------------------- CAM, ASC, valid weights (AGAIN)

def class_activation_maps(model, x, y):
    """AGAIN Eq. (1): M = sum_c w_{y,c} A_c over the maps the classifier average-pools."""
    try:
        a = model.cam_maps(x)
    except (ValueError, AttributeError) as e:
        raise common.UserError(f"class activation maps need a model that classifies globally "
                               f"average-pooled maps ({e})") from None
    return torch.einsum('bchw,bc->bhw', a.float(), model.fc.weight[y].float())


def standard_only_span(std_model, robust_model, x, y, threshold, reading='delete'):
    """AGAIN Sec. 3, Fig. 1(d): the mask (B x 1 x H x W, 0/1) of the corrupted-span experiment.
    Each model's span is its CAM of the true class (upsampled to the input, nearest) above
    ``threshold`` x its maximum (the ASC rule, Eq. (2)); "the different spans" are read as the
    span the standard model attends to and the robust one does not, and ``delete`` (default)
    erases them: Fig. 1(e) shows the image with part of it erased ("partial feature erasure"),
    and Table 1's small drops on clean data (20.6 / 15.6 points) with unchanged adversarial
    accuracy fit erasing a small region, not keeping one (which would erase most of the image
    and of the perturbation). ``keep`` keeps only the standard-only span, the other reading."""
    def span(model):
        cam = class_activation_maps(model, x, y)
        cam = F.interpolate(cam[:, None], size=x.shape[-2:], mode='nearest')
        return cam > threshold * cam.flatten(1).amax(1)[:, None, None, None]
    only_std = (span(std_model) & ~span(robust_model)).float()
    return 1.0 - only_std if reading == 'delete' else only_std


def corrupted_span_table(model, ckpt, path, test, eps, args, device):
    """AGAIN Table 1 for the pair (--corrupt-span ST.pt, ``model``): for each of the two models,
    on the test images it classifies correctly, accuracy on the original clean images (100 by
    construction), the corrupted ones (image x mask), PGD-20 examples (the robust checkpoint's
    eps, random start) and the corrupted PGD examples (x_adv x mask)."""
    st_ckpt = common.load_checkpoint(args.corrupt_span)
    if (st_ckpt['args']['dataset'], st_ckpt['args'].get('image_size')) != \
            (ckpt['args']['dataset'], ckpt['args'].get('image_size')):
        raise common.UserError(f"--corrupt-span {args.corrupt_span!r} was trained on other data than "
                               f"{path!r}: use a standard model of the same dataset and image size")
    standard = common.model_from_checkpoint(st_ckpt, device, args.corrupt_span).eval()
    x_all, y_all = common.to_float(test.x), test.y
    with torch.no_grad():
        masks = torch.cat([standard_only_span(standard, model, xb, yb, args.asc_threshold, args.span_reading)
                           for xb, yb in zip(x_all.split(args.batch_size), y_all.split(args.batch_size))])
    only_std = 1 - masks if args.span_reading == 'delete' else masks
    table = {'reading': args.span_reading, 'span_share': 100.0 * only_std.mean().item()}
    for name, m in (('standard', standard), ('robust', model)):
        m.eval()
        with torch.no_grad():
            keep = torch.cat([m(xb).argmax(1) == yb for xb, yb in
                              zip(x_all.split(args.batch_size), y_all.split(args.batch_size))])
        x, y, mask = x_all[keep], y_all[keep], masks[keep]
        hits = {'clean': 0, 'corrupted_clean': 0, 'adv': 0, 'corrupted_adv': 0}
        torch.manual_seed(args.seed)
        for xb, yb, mb in zip(x.split(args.batch_size), y.split(args.batch_size), mask.split(args.batch_size)):
            x_adv = pgd(m, xb, yb, eps, 20, 2.5 * eps / 20, random_start=True)
            with torch.no_grad():
                for key, inp in (('clean', xb), ('corrupted_clean', xb * mb), ('adv', x_adv),
                                 ('corrupted_adv', x_adv * mb)):
                    hits[key] += (m(inp).argmax(1) == yb).sum().item()
        table[name] = {'images': len(y), **{k: 100.0 * v / max(len(y), 1) for k, v in hits.items()}}
    return table


def span_picture(paths, args, device):
    """--span-picture: per checkpoint, rows of images, masks and corrupted images."""
    standard = common.model_from_checkpoint(common.load_checkpoint(args.corrupt_span), device,
                                            args.corrupt_span).eval()
    rows, labels = [], []
    for path in paths:
        model, x, y = picture_inputs(path, args, device)
        with torch.no_grad():
            mask = standard_only_span(standard, model, x, y, args.asc_threshold, args.span_reading)
        rows += [rgb(x), rgb(mask), rgb(x * mask)]
        labels += [f"{short_name(path)}\ninput", f"mask ({args.span_reading})", 'corrupted input']
    image_grid(rows, labels, f"Corrupted span against {short_name(args.corrupt_span)} (AGAIN Fig. 1(d, e); "
               f"white: kept, black: erased)", args.span_picture)


def compactness(model, split, batch_size):
    """AGAIN Fig. 4 in one number: the mean distance of features(x) to their class centroid
    divided by the mean distance between class centroids (smaller: more compact classes, further
    apart). Returns (ratio, (features, labels)) for the picture."""
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.features(x).float() for x, _ in common.batches(split, batch_size)])
    y = split.y
    classes = y.unique()
    centroids = torch.stack([feats[y == c].mean(0) for c in classes])
    index = torch.searchsorted(classes, y)
    within = (feats - centroids[index]).norm(dim=1).mean()
    pair = torch.cdist(centroids, centroids)
    between = pair[torch.triu_indices(len(classes), len(classes), 1).unbind()].mean()
    return (within / between).item(), (feats, y)


CLASS_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                 (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def principal_components(feats):
    """The features projected on their first two principal components (N x 2). AGAIN Fig. 4 uses
    t-SNE; PCA is used here because it is deterministic, a few lines of torch (no extra package)
    and a linear view that keeps distances' proportions, so pictures of two models can be compared
    with the compactness number."""
    centred = feats - feats.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T


def compactness_picture(rows, path):
    """One scatter per checkpoint: its test features on their first two principal components,
    coloured by class, with the compactness number."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows) + 1.2, 4.2), squeeze=False)
    for ax, r in zip(axes[0], rows):
        feats, y = r['_features']
        p = principal_components(feats).cpu()
        for c in y.unique().tolist():
            pts = p[(y == c).cpu()]
            ax.scatter(pts[:, 0], pts[:, 1], s=6, color=[v / 255 for v in CLASS_COLOURS[c % len(CLASS_COLOURS)]],
                       label=str(c))
        ax.set_title(f"{short_name(r['ckpt'])}\ncompactness {r['compactness']:.3f}", fontsize=9)
        ax.set_xlabel('principal component 1')
        ax.set_ylabel('principal component 2')
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, title='class', loc='center right', fontsize=8, markerscale=2)
    fig.suptitle('Features of the test images (AGAIN Fig. 4, PCA instead of t-SNE)', fontsize=10, y=1.05)
    fig.subplots_adjust(right=0.88)
    save_figure(fig, path, f"{len(rows)} panels")


def asc_from_cam(cam, threshold):
    """AGAIN Eq. (2): share of the elements of M above threshold * max(M), per image."""
    flat = cam.flatten(1)
    return (flat > threshold * flat.amax(1, keepdim=True)).float().mean(1)


@torch.no_grad()
def asc_values(model, test, threshold, batch_size):
    model.eval()
    values = []
    for x, y in common.batches(test, batch_size):
        values += asc_from_cam(class_activation_maps(model, x, y), threshold).tolist()
    return values


@torch.no_grad()
def heat_colours(t):
    """A jet-like colour map: t in [0, 1] (B x H x W) -> RGB (B x 3 x H x W), blue (low)
    through green to red (high)."""
    return torch.stack([(1.5 - (4 * t - 3).abs()), (1.5 - (4 * t - 2).abs()),
                        (1.5 - (4 * t - 1).abs())], dim=1).clamp(0, 1)


def cam_overlay(x, cam, weight=0.5):
    """The heat map of ``cam`` (B x H x W in [0, 1]) laid over the grey input, as AGAIN Fig. 1."""
    grey = rgb(x.mean(1, keepdim=True))
    return ((1 - weight) * grey + weight * heat_colours(cam)).clamp(0, 1)


def cam_picture(paths, args, device):
    rows, labels = [], []
    for path in paths:
        model, x, y = picture_inputs(path, args, device)
        cam = class_activation_maps(model, x, y)
        lo = cam.flatten(1).amin(1)[:, None, None]
        hi = cam.flatten(1).amax(1)[:, None, None]
        cam = ((cam - lo) / (hi - lo).clamp_min(1e-20))[:, None]
        up = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode='bilinear', align_corners=False)
        if not rows:
            rows.append(rgb(x))
            labels.append('input')
        rows.append(cam_overlay(x, up[:, 0]) if args.cam_style == 'overlay' else rgb(up))
        labels.append(short_name(path))
    image_grid(rows, labels, 'Class activation maps of the true class (AGAIN Fig. 1)', args.cam,
               key=heat_key if args.cam_style == 'overlay' else grey_key('activation (scaled to [0, 1] per image)'))


def valid_weights(model):
    """AGAIN supplement 4.4: per class, the number of fc weights above that class's mean
    weight; averaged over the classes."""
    w = model.fc.weight.detach().float()
    return (w > w.mean(1, keepdim=True)).sum(1).float().mean().item()


# ------------------------------------------- generalization gap, robustness curve (AGAIN Fig. 3)

def strongest_pgd_loss(model):
    """The loss the gap and the eps curve's PGD-20 ascend: CE of the main head, plus the ASE
    head's CE for a checkpoint with AGAIN's head (the paper's adaptive attack, Sec. 5.2.2)."""
    if getattr(model, 'ase_index', None) is None:
        return 'ce'

    def both_heads(m, x_adv, y):
        logits, ase_logits = m.forward_heads(x_adv)
        return (F.cross_entropy(logits.float(), y, reduction='sum')
                + F.cross_entropy(ase_logits.float(), y, reduction='sum'))
    return both_heads


def training_images(ckpt, args, device, n):
    """The first ``n`` images the checkpoint trained on: its training split with its validation
    images removed (its own --dataset, --val-size, --train-size and --image-size), never a
    validation or test image."""
    a = argparse.Namespace(**{**ckpt['args'], 'data_dir': args.data_dir or ckpt['args'].get('data_dir', './data'),
                              'val_size': ckpt['args'].get('val_size') or 0, 'test_size': 1})
    train, _, _ = common.load_data(a, device)
    return head(train, n)


def generalization_gap(model, ckpt, path, test, args, device):
    """AGAIN Sec. 5.6 / Fig. 3: natural accuracy and accuracy under the checkpoint's training PGD
    and under PGD-20 (random start), on --gen-gap images it trained on and on the test images;
    gap = train - test."""
    a = ckpt['args']
    eps, steps, step_size, rand = training_attack(a, args.eps)
    loss = strongest_pgd_loss(model)
    train_loss = loss if a.get('attack_loss', 'both') == 'both' else 'ce'    # as it trained
    attacks = {'nat': None,
               'pgd_train': lambda m, x, y: pgd(m, x, y, eps, steps, step_size, rand, loss=train_loss),
               'pgd20': lambda m, x, y: pgd(m, x, y, eps, 20, 2.5 * eps / 20, True, loss=loss)}
    out = {'train_images': 0, 'test_images': len(test)}
    train = training_images(ckpt, args, device, args.gen_gap)
    out['train_images'] = len(train)
    for part, split in (('train', train), ('test', test)):
        for name, attack in attacks.items():
            torch.manual_seed(args.seed)
            out[f'{part}_{name}'] = 100.0 * common.correct(model, split, attack, args.batch_size).float().mean().item()
    for name in attacks:
        out[f'gap_{name}'] = out[f'train_{name}'] - out[f'test_{name}']
    return out


def gap_table(rows):
    lines = ['| checkpoint | train nat | test nat | nat gap | train PGD (train) | test PGD (train) | '
             'gap | train PGD-20 | test PGD-20 | robust gap (PGD-20) |', '|' + '---|' * 10]
    for r in rows:
        g = r['gen_gap']
        cells = [f"{g[k]:.2f}" for k in ('train_nat', 'test_nat', 'gap_nat', 'train_pgd_train', 'test_pgd_train',
                                           'gap_pgd_train', 'train_pgd20', 'test_pgd20', 'gap_pgd20')]
        lines.append(f"| {r['ckpt']} ({g['train_images']} train / {g['test_images']} test images) | "
                     + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def eps_curve(model, split, radii, batch_size, loss='ce', seed=0):
    """Accuracy (%) under PGD-20 with random start (step 2.5 eps / 20) at each radius (sorted).
    An image counts as robust at a radius only if it also survived every smaller one: the
    smaller ball lies inside the larger, so the curve cannot rise with eps."""
    alive, curve = None, []
    for e in sorted(radii):
        torch.manual_seed(seed)
        ok = common.correct(model, split, lambda m, x, y: pgd(m, x, y, e, 20, 2.5 * e / 20, True, loss=loss),
                            batch_size)
        alive = ok if alive is None else alive & ok
        curve.append(100.0 * alive.float().mean().item())
    return curve


MASKING_SHARE = 5.0    # percent: a curve above this at the check radius is called masking


def check_radius(dataset, train_eps):
    """Where every image can be changed into another: eps 0.5 on MNIST (any image can become a
    grey one), 4x the training eps elsewhere."""
    return 0.5 if dataset == 'mnist' else 4 * train_eps


def eps_curve_row(model, ckpt, test, args):
    a = ckpt['args']
    eps = training_attack(a, args.eps)[0]
    radii = sorted(set(args.eps_list if args.eps_list else [round(2 * eps * i / 8, 6) for i in range(9)]))
    check = check_radius(a['dataset'], eps)
    measured = sorted(set(radii + [check]))
    curve = dict(zip(measured, eps_curve(model, test, measured, args.batch_size, strongest_pgd_loss(model), args.seed)))
    warning = None
    if curve[check] > MASKING_SHARE:
        warning = (f"{curve[check]:.1f}% of the images survive PGD-20 at eps {check:g}, where every "
                   f"image can be made another: the attack under-attacks this model (masked "
                   f"gradients); trust AutoAttack, not this curve")
    return {'radii': radii, 'accuracy': [curve[r] for r in radii], 'check_radius': check,
            'check_accuracy': curve[check], 'warning': warning}


def eps_curve_table(rows):
    radii = sorted({e for r in rows for e in r['eps_curve']['radii']})
    lines = ['| checkpoint (accuracy % under PGD-20; an image counts if it survived every smaller eps) | '
             + ' | '.join(f"eps {e:.3g}" for e in radii) + ' | check eps |', '|' + '---|' * (len(radii) + 2)]
    for r in rows:
        c = r['eps_curve']
        at = dict(zip(c['radii'], c['accuracy']))
        lines.append(f"| {r['ckpt']} | " + ' | '.join(f"{at[e]:.1f}" if e in at else '-' for e in radii)
                     + f" | {c['check_radius']:g}: {c['check_accuracy']:.1f} |")
    return '\n'.join(lines)


# --------------------------------------------------------------------- pictures (matplotlib)

def pyplot():
    import matplotlib
    matplotlib.use('Agg')           # no screen: files only
    import matplotlib.pyplot as plt
    return plt


def short_name(path):
    """'runs/at-s8/last.pt' -> 'at-s8/last.pt': the run folder and file, as a label."""
    parts = str(path).replace('\\', '/').rstrip('/').split('/')
    return '/'.join(parts[-2:])


def save_figure(fig, path, what):
    """Write a matplotlib figure atomically (one line if the disk is full) and say what it shows."""
    plt = pyplot()
    ext = os.path.splitext(path)[1].lstrip('.').lower() or 'png'
    try:
        common.write_atomically(path, lambda tmp: fig.savefig(tmp, format=ext, dpi=110, bbox_inches='tight'),
                                hint='free some space and run eval.py again')
    finally:
        plt.close(fig)
    print(f"wrote {path} ({what})", file=sys.stderr)


def image_grid(rows, labels, title, path, col_titles=None, key=None):
    """Rows of images (each B x 3 x H x W in [0, 1]), each row labelled on its left, a title, and
    a colour key where colour carries meaning (``key(fig, axes)``)."""
    plt = pyplot()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.2 + 1.15 * n_cols, 0.9 + 1.2 * n_rows), squeeze=False)
    for r, (images, label) in enumerate(zip(rows, labels)):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).float().cpu().numpy(), interpolation='nearest')
            else:
                ax.axis('off')
        axes[r][0].set_ylabel(label, rotation=0, ha='right', va='center', fontsize=9)
    for c, text in (col_titles or {}).items():
        axes[0][c].set_title(text, fontsize=9)
    fig.suptitle(title, fontsize=11)
    if key:
        key(fig, axes)
    save_figure(fig, path, f"{n_rows} rows x {n_cols} images")


def sign_key(fig, axes):
    from matplotlib.patches import Patch
    fig.legend(handles=[Patch(color='red', label='positive gradient'), Patch(color='#00ff00', label='negative gradient'),
                        Patch(color='black', label='zero / below threshold')],
               loc='lower center', ncol=3, fontsize=9, bbox_to_anchor=(0.5, -0.02))


def heat_key(fig, axes):
    from matplotlib.colors import ListedColormap
    from matplotlib.cm import ScalarMappable
    cmap = ListedColormap(heat_colours(torch.linspace(0, 1, 256)[:, None, None])[:, :, 0, 0].numpy())
    fig.colorbar(ScalarMappable(cmap=cmap), ax=axes, shrink=0.6, label='activation (scaled to [0, 1] per image)')


def grey_key(label):
    def key(fig, axes):
        from matplotlib.cm import ScalarMappable
        fig.colorbar(ScalarMappable(cmap='gray'), ax=axes, shrink=0.6, label=label)
    return key


def gap_picture(rows, path):
    """AGAIN Fig. 3: per checkpoint, clean and PGD-20 accuracy on training and test images."""
    plt = pyplot()
    bars = [('train_nat', 'train, clean', '#9ecae1'), ('test_nat', 'test, clean', '#3182bd'),
            ('train_pgd20', 'train, PGD-20', '#fdae6b'), ('test_pgd20', 'test, PGD-20', '#e6550d')]
    fig, ax = plt.subplots(figsize=(2.5 + 1.6 * len(rows), 4.2))
    width = 0.8 / len(bars)
    for i, (key, label, colour) in enumerate(bars):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(rows))]
        values = [r['gen_gap'][key] for r in rows]
        ax.bar(xs, values, width, label=label, color=colour)
        for x, v in zip(xs, values):
            ax.text(x, v + 0.5, f"{v:.0f}", ha='center', va='bottom', fontsize=7)
    ax.set_xticks(range(len(rows)), [short_name(r['ckpt']) for r in rows], rotation=20, ha='right', fontsize=8)
    ax.set_ylabel('accuracy (%)')
    ax.set_ylim(0, 105)
    ax.set_title('Generalization gap: training vs test images (AGAIN Fig. 3)', fontsize=10)
    ax.legend(fontsize=8, loc='lower left', ncol=2)
    save_figure(fig, path, f"{len(rows)} groups of {len(bars)} bars")


def eps_curve_picture(rows, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for r in rows:
        c = r['eps_curve']
        ax.plot(c['radii'], c['accuracy'], marker='o', markersize=3, label=short_name(r['ckpt']))
    trained = sorted({r['eps'] for r in rows})
    for e in trained:
        ax.axvline(e, color='grey', linestyle=':', linewidth=1)
    ax.set_xlabel('l-inf radius eps (dotted: the training eps)')
    ax.set_ylabel('accuracy under PGD-20 (%)')
    ax.set_ylim(0, 101)
    ax.set_title('Robustness over eps', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, f"{len(rows)} lines")


CURVE_PANELS = [('train_loss', 'training loss'), ('train_acc', 'training accuracy (%)'),
                ('val_nat', 'val nat (%)'), ('val_adv', 'val adv, training PGD (%)'),
                ('val_worst', 'val worst (%)')]


def run_log(path):
    """(folder, epochs' records, the epoch best.pt holds or None) of a run folder or checkpoint."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or '.'
    log = os.path.join(folder, 'log.jsonl')
    if not os.path.isfile(log):
        raise common.UserError(f"--training-curves: {folder} has no log.jsonl: pass run folders or "
                               f"checkpoints inside them")
    with open(log) as f:
        records = [json.loads(line) for line in f if line.strip()]
    best = os.path.join(folder, 'best.pt')
    best_epoch = common.load_checkpoint(best)['epoch'] if os.path.isfile(best) else None
    return folder, records, best_epoch


def training_curves_picture(paths, path):
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    runs = []
    for p in dict.fromkeys(os.path.dirname(q) if os.path.isfile(q) else q for q in paths):
        runs.append(run_log(p))
    panels = [(k, label) for k, label in CURVE_PANELS if any(k in rec for _, recs, _ in runs for rec in recs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for folder, records, best in runs:
            pts = [(rec['epoch'], rec[key]) for rec in records if rec.get(key) is not None]
            if not pts:
                continue
            line, = ax.plot(*zip(*pts), marker='o', markersize=3, label=os.path.basename(folder.rstrip('/')))
            at = [v for e, v in pts if e == best]
            if at:
                ax.plot([best], at, marker='*', markersize=12, color=line.get_color(), linestyle='none')
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle('Training curves (star: the epoch best.pt was taken)', fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, f"{len(panels)} panels x {len(runs)} lines")


# ------------------------------------------------------------------- sanity (gradient masking)

def measure_sanity(model, test, eps, args, device, progress=None):
    """The accuracies the gradient-masking checks compare (Carlini et al. 2019; AutoAttack):
    single-run PGD-20 against stronger versions of itself (PGD-100; four random restarts, an image
    counting as broken when any restart breaks it), against a single FGSM step (iterative attacks
    must be at least as strong), at 2 eps and an unbounded eps, and against attacks that need no
    gradient (noise, Square, transfer)."""
    def acc(attack, seed=args.seed):
        torch.manual_seed(seed)
        return common.correct(model, test, attack, args.batch_size)

    def pgd_n(steps, e=eps):
        return lambda m, x, y: pgd(m, x, y, e, steps, 2.5 * e / steps, random_start=True)
    pct = lambda c: 100.0 * c.sum().item() / len(c)
    masks = {'pgd20': acc(pgd_n(20)), 'pgd100': acc(pgd_n(100)),
             'fgsm': acc(lambda m, x, y: pgd(m, x, y, eps, 1, eps)),
             'pgd20_2eps': acc(pgd_n(20, 2 * eps)),
             'eps1': acc(lambda m, x, y: pgd(m, x, y, 1.0, 50, 0.05, random_start=True)),
             'noise': acc(lambda m, x, y: (x + eps * torch.sign(torch.randn_like(x))).clamp(0, 1))}
    restarts = [acc(pgd_n(20), seed=args.seed + 1 + r) for r in range(4)]      # other seeds
    masks['pgd20_restarts4'] = torch.stack(restarts).all(0)                  # broken by any
    # a gradient-free attack (AutoAttack's Square, 5000 queries): it cannot be misled by
    # gradients that vanish or point the wrong way, so it must not clearly beat white-box PGD
    masks['square'], _, _ = autoattack(model, test, eps, device, args.seed, args.batch_size,
                                       attacks=['square'], square_queries=args.square_queries)
    if args.transfer_from:
        source = common.model_from_checkpoint(common.load_checkpoint(args.transfer_from), device,
                                              args.transfer_from).eval()
        masks['transfer'] = acc(lambda m, x, y: pgd(source, x, y, eps, 10, 2.5 * eps / 10,
                                                    random_start=True))
    measured = {name: pct(mask) for name, mask in masks.items()}
    if progress:
        progress('sanity ' + ', '.join(f"{k} {v:.1f}" for k, v in measured.items()), measured['pgd20'])
    return measured


SANITY_MARGIN = 2.0     # points: a stronger PGD finding this many more errors distrusts PGD-20


def sanity_warnings(m, n):
    """One line per failed check; an empty list means 'ok'. Tolerance of the ordering checks:
    one test image or 1%, whichever is larger; of the under-attack check, SANITY_MARGIN points
    or two images."""
    tol = max(100.0 / n, 1.0)
    margin = max(SANITY_MARGIN, 200.0 / n)
    warnings = []
    stronger = min(m['pgd100'], m['pgd20_restarts4'])
    if stronger < m['pgd20'] - margin:
        warnings.append(f"single-run PGD-20 under-attacks this model ({m['pgd20']:.2f}%; PGD-100 "
                        f"{m['pgd100']:.2f}%, four restarts {m['pgd20_restarts4']:.2f}%): read "
                        f"robustness from the restarts, AutoAttack or an adaptive attack")
    if max(m['pgd100'], m['pgd20_restarts4']) > m['pgd20'] + tol:
        warnings.append(f"a stronger PGD raised accuracy (PGD-20 {m['pgd20']:.2f}% -> PGD-100 "
                        f"{m['pgd100']:.2f}%, four restarts {m['pgd20_restarts4']:.2f}%)")
    if m['fgsm'] < m['pgd20'] - tol:
        warnings.append(f"one FGSM step ({m['fgsm']:.2f}%) beats PGD-20 ({m['pgd20']:.2f}%): the "
                        f"iterative attack gets stuck (a misleading loss surface near the inputs)")
    if m['pgd20_2eps'] > m['pgd20'] + tol:
        warnings.append(f"a larger eps raised accuracy (eps {m['pgd20']:.2f}% -> 2 eps {m['pgd20_2eps']:.2f}%)")
    if m['eps1'] > 5.0:
        warnings.append(f"an unbounded attack (eps 1) leaves {m['eps1']:.2f}% accuracy, not about 0")
    whitebox = min(m['pgd20'], m['pgd100'])
    if m['noise'] < whitebox - tol:
        warnings.append(f"random noise ({m['noise']:.2f}%) beats white-box PGD ({whitebox:.2f}%)")
    if 'square' in m and m['square'] < whitebox - tol:
        warnings.append(f"a gradient-free attack (Square: {m['square']:.2f}%) beats white-box "
                        f"PGD ({whitebox:.2f}%): the gradients mislead PGD (masking); read robustness "
                        f"from AutoAttack or an adaptive attack, not PGD")
    if 'transfer' in m and m['transfer'] < whitebox - tol:
        warnings.append(f"a transfer attack ({m['transfer']:.2f}%) beats white-box PGD ({whitebox:.2f}%)")
    return warnings


def markdown(rows):
    columns = []
    for r in rows:
        columns += [c for c in r['columns'] if c not in columns]
    head = ['checkpoint'] + [label for label, _ in columns]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        # the epoch says which checkpoint of a run it is (best.pt: the best validation epoch)
        cells = [f"{r['ckpt']} (epoch {r['epoch']}/{r['epochs']}, {r['pgd_train']}, n={r['test_images']})"]
        cells += [f"{r[key + '_acc']:.2f}" if key + '_acc' in r else '-' for _, key in columns]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def square_drop(breakdown):
    """Points of robust accuracy that Square (gradient-free, run last) removed after the gradient
    attacks, or None when Square did not run after another attack."""
    names = list(breakdown)
    if 'square' not in names or names.index('square') < 2:
        return None
    return breakdown[names[names.index('square') - 1]] - breakdown['square']


def autoattack_table(rows):
    """Robust accuracy (%) left after each AutoAttack attack, in the order run."""
    names = []
    for r in rows:
        names += [n for n in r.get('autoattack_breakdown', {}) if n not in names]
    lines = ['| AutoAttack | ' + ' | '.join('clean' if n == 'clean' else f'after {n.upper()}' for n in names)
             + ' |', '|' + '---|' * (len(names) + 1)]
    for r in rows:
        b = r.get('autoattack_breakdown', {})
        lines.append(f"| {r['ckpt']} ({r.get('autoattack_version', '')}) | "
                     + ' | '.join(f'{b[n]:.2f}' if n in b else '-' for n in names) + ' |')
    return '\n'.join(lines)


def attention_maps_png(paths, args, device, filename):
    """AT-att-id Fig. 3: per checkpoint, a row of input images and a row per attention layer
    (blocks 3 and 4), each map upsampled to the image size and scaled to [0, 1]."""
    rows, labels = [], []
    for path in paths:
        model, x, _ = picture_inputs(path, args, device)
        if not hasattr(model, 'features_and_maps') or not getattr(model, 'attention', False):
            print(f"note: {path} has no attention module (train_att_id.py --mode att or att-id); "
                  f"left out of {filename}", file=sys.stderr)
            continue
        with torch.no_grad():
            _, maps = model.features_and_maps(x)
        rows.append(x.expand(-1, 3, -1, -1))
        labels += [f"{short_name(path)}\ninput"] + [f"attention, block {b}" for b in range(3, 3 + len(maps))]
        for a in maps:
            a = a / a.flatten(1).amax(1)[:, None, None].clamp_min(1e-12)
            up = torch.nn.functional.interpolate(a[:, None].float(), size=x.shape[-2:], mode='bilinear',
                                                 align_corners=False)
            rows.append(up.expand(-1, 3, -1, -1))
    if not rows:
        raise common.UserError(f"--attention-maps: none of the checkpoints has an attention module "
                               f"(train one with train_att_id.py --mode att or att-id)")
    image_grid(rows, labels, 'Attention maps (AT-att-id Fig. 3)', filename,
               key=grey_key('attention (scaled to max 1 per image)'))
    return filename


def same_model(a, b):
    """Whether checkpoints ``a`` and ``b`` hold the same model, trained with the same flags (which
    set the attack eval.py uses): a run's best.pt when its best epoch was the last."""
    ca, cb = common.load_checkpoint(a), common.load_checkpoint(b)
    sa, sb = ca['state_dict'], cb['state_dict']
    return (ca['model'] == cb['model'] and ca.get('model_kwargs') == cb.get('model_kwargs')
            and ca['args'] == cb['args']
            and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa))


@common.main_guard
def main(argv=None):
    args = parse_args(argv)
    # a run folder stands for its best.pt (one line says so, once)
    args.ckpt = [common.resolve_checkpoint(p) for p in args.ckpt]
    for name in ('transfer_from', 'gradmap_classifier'):
        if getattr(args, name):
            setattr(args, name, common.resolve_checkpoint(getattr(args, name)))
    device = common.setup(args)           # the device, seeded with --seed
    rows = []
    for path in args.ckpt:
        twin = next((r for r in rows if same_model(r['ckpt'], path)), None)
        if twin is None:
            rows.append(evaluate(path, args, device))
        else:     # best.pt of a run whose last epoch was its best: every attack is seeded, the same row
            print(f"  {path}: the same weights as {twin['ckpt']}: its row, not evaluated again",
                  file=sys.stderr, flush=True)
            rows.append({**copy.deepcopy(twin), 'ckpt': path, 'same_weights_as': twin['ckpt']})
    if not args.no_table:
        print(markdown(rows))
    if args.shift:
        print(shift_table(rows, args.shift))
    extra = [('gradmap (clipped)', 'gradmap_clipped_acc', '{:.2f}'), ('gradmap (raw)', 'gradmap_raw_acc', '{:.2f}'),
             ('gradmap (clipped, train)', 'gradmap_clipped_train_acc', '{:.2f}'),
             ('gradmap (raw, train)', 'gradmap_raw_train_acc', '{:.2f}'),
             ('ASC', 'asc', '{:.4f}'), ('valid weights', 'valid_weights', '{:.1f}'),
             ('ASE head acc', 'ase_head_acc', '{:.2f}'), ('main = ASE', 'ase_agreement', '{:.2f}'),
             ('oracle (W_ase[y])', 'ase_oracle_acc', '{:.2f}'), ('main, unscaled', 'ase_unscaled_acc', '{:.2f}')]
    extra = [e for e in extra if any(e[1] in r for r in rows)]
    if extra:
        print('| checkpoint | ' + ' | '.join(e[0] for e in extra) + ' |\n|' + '---|' * (len(extra) + 1))
        for r in rows:
            print(f"| {r['ckpt']} | " + ' | '.join(fmt.format(r[key]) if key in r else '-'
                                                   for _, key, fmt in extra) + ' |')
    if any('autoattack_breakdown' in r for r in rows):
        print(autoattack_table(rows))
        for r in rows:
            drop = square_drop(r['autoattack_breakdown'])
            if drop is not None and drop > max(100.0 / r['test_images'], 1.0):   # more than one image
                print(f"warning: {r['ckpt']}: AutoAttack's gradient-free Square lowered the accuracy its "
                      f"gradient attacks left by {drop:.2f} points: they under-attack this model "
                      f"(masked gradients); trust the lowest column, and try an adaptive attack")
    if (args.asc or args.cam) and len(rows) >= 2:
        a, b = rows[0]['asc_per_image'], rows[1]['asc_per_image']
        share = 100.0 * sum(x > y for x, y in zip(a, b)) / len(a)
        rows[0]['asc_larger_than_second_percent'] = share
        print(f"ASC: {rows[0]['ckpt']} has the larger span on {share:.1f}% of the images "
              f"(vs {rows[1]['ckpt']})")
    if args.sanity:
        for r in rows:
            w = r['sanity']['warnings']
            print(f"sanity {r['ckpt']}: " + ('ok' if not w else 'WARNING'))
            for line in w:
                print(f"  warning: {line}")
    if args.grad_maps or args.grad_signs:
        gradient_pictures(args.ckpt, args, device)
    if args.cam:
        cam_picture(args.ckpt, args, device)
    if args.corrupt_span:
        print(f"| corrupted span (reading: {args.span_reading}, --corrupt-span {args.corrupt_span}) | model | "
              f"images | original clean | corrupted clean | original adv | corrupted adv | "
              f"standard-only span |\n|" + '---|' * 8)
        for r in rows:
            t = r['corrupt_span']
            for name in ('standard', 'robust'):
                c = t[name]
                print(f"| {r['ckpt']} | {name} | {c['images']} | {c['clean']:.2f} | {c['corrupted_clean']:.2f} "
                      f"| {c['adv']:.2f} | {c['corrupted_adv']:.2f} | {t['span_share']:.1f}% of pixels |")
        if args.span_picture:
            span_picture(args.ckpt, args, device)
    if args.compactness is not None:
        print('| checkpoint | compactness (within / between) |\n|---|---|')
        for r in rows:
            print(f"| {r['ckpt']} | {r['compactness']:.4f} |")
        if args.compactness:
            compactness_picture(rows, args.compactness)
    for r in rows:
        r.pop('_features', None)
    if args.attention_maps:
        attention_maps_png(args.ckpt, args, device, args.attention_maps)
    if args.gen_gap:
        print(gap_table(rows))
        if args.gen_gap_picture:
            gap_picture(rows, args.gen_gap_picture)
    if args.eps_curve:
        print(eps_curve_table(rows))
        for r in rows:
            if r['eps_curve']['warning']:
                print(f"warning: {r['ckpt']}: {r['eps_curve']['warning']}")
        eps_curve_picture(rows, args.eps_curve)
    if args.training_curves:
        training_curves_picture(args.ckpt, args.training_curves)
    if args.json:
        common.write_text(args.json, json.dumps({'rows': rows, 'test_size': args.test_size,
                                                 'seed': args.seed}, indent=1),
                          hint='free some space and run eval.py again')
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == '__main__':
    main()
