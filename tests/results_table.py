"""Print the README's results table from the folder tests/results.sh filled. Not a test.

    python tests/results_table.py runs/results 8 [9]

One row per method: natural accuracy on the whole test set (eval.py --shift, natural), the
training PGD, PGD-20 and CW-inf on the first 1,000 test images, AutoAttack (standard) and the
per-image worst case over every attack on the first 200, natural and PGD accuracy on the up /
down-shifted copies (AELF Table 2's N(U), N(D)), training time (the run's training images at
the median epoch's images per second in log.jsonl), and the paper's numbers for orientation
(another protocol). With several seeds each cell is their mean and half their range. AGAIN's PGD-20 is the strongest of its PGD-20 columns (the both-heads and
BPDA attacks; main-only PGD cannot see through its argmax), its main-only PGD-20 in brackets.
A second table gives AutoAttack's breakdown per run.
"""
import json
import os
import re
import sys

ROWS = [  # name in the folder, label, paper numbers (natural / PGD, their table; another protocol)
    ('st', 'ST', 'AELF T2: 99.54 / 0.0'),
    ('at', 'AT', 'AELF T2: 99.37 / 93.36'),
    ('jt', 'JT 0.5:0.5', 'AELF T2: 99.38 / 92.72'),
    ('jtstar', 'JT* (beta 0.1 on ‖f‖₂, from ST)', '-'),
    ('trades', 'TRADES (beta 1)', '-'),
    ('aelf', 'AELF (lambda 1)', '-'),
    ('aelfs', 'AELFs (beta 0.1 on ‖f‖₂, from ST)', 'AELF T2: 99.29 / 94.06'),
    ('again', 'AGAIN (alpha 0.6)', 'AGAIN T2 (CIFAR-10, ResNet-18): 87.88 / 54.43, AA 49.31'),
    ('at-id', 'AT-id (lambda 0.01; --quick: cnn_b, SGD)', 'AT-att-id T1 (Madry CNN): 98.66 / 95.69'),
]


def load(path, ckpt='last.pt'):
    """The row of ``ckpt`` (last.pt or best.pt) in an eval.py --json file; None if absent."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = json.load(f)['rows']
    rows = [r for r in rows if os.path.basename(r['ckpt']) == ckpt] or (rows[:1] if ckpt == 'last.pt' else [])
    return rows[0] if rows else None


def numbers(folder, name, seed):
    """The row's numbers for one seed, or None when its runs are missing."""
    base = os.path.join(folder, f'{name}-s{seed}')
    nat, ev, aa = (load(f'{base}.{kind}.json') for kind in ('nat', 'eval', 'aa'))
    if not (nat and ev):
        return None
    for kind, row in (('nat', nat), ('eval', ev), ('aa', aa)):
        if row and row['epoch'] != row['epochs']:       # evaluated while the run was unfinished
            sys.exit(f"{base}.{kind}.json evaluated epoch {row['epoch']} of {row['epochs']}: rerun its eval.py")
    with open(os.path.join(base, 'log.jsonl')) as f:
        log = [json.loads(line) for line in f]
    pgd20 = ev['pgd20_acc']
    adaptive = [ev[k] for k in ('pgd20_both_acc', 'pgd20_bpda_acc') if ev.get(k) is not None]
    # speed: the median epoch's images per second (one slow epoch, e.g. a busy neighbour on the
    # core, does not move it); training time: the run's images at that rate
    rates = sorted(r['images_per_s'] for r in log)
    rate = rates[len(rates) // 2] if len(rates) % 2 else (rates[len(rates) // 2 - 1] + rates[len(rates) // 2]) / 2
    images = sum(r['seconds'] * r['images_per_s'] for r in log)
    wall = None                     # the script's own "done in" line: training, validation, test
    if os.path.exists(f'{base}.log'):
        m = re.search(r'done in (?:(\d+)h)?(\d+)m(\d+)s', open(f'{base}.log').read())
        wall = m and int(m.group(1) or 0) * 60 + int(m.group(2)) + int(m.group(3)) / 60
    return {
        'nat': nat['shift']['N']['natural'],
        'pgd_train': ev['pgd_train_acc'],
        'pgd20': min([pgd20] + adaptive),
        'pgd20_main': pgd20 if adaptive else None,
        'cw': ev['cw20_acc'],
        'aa': aa and aa['autoattack_acc'],                  # '-' where AutoAttack was not run
        'worst': aa['worst_acc'] if aa else ev['worst_acc'],
        'worst_on': aa['test_images'] if aa else 1000,
        'nat_u': nat['shift']['N(U)']['natural'], 'nat_d': nat['shift']['N(D)']['natural'],
        'adv_u': ev['shift']['N(U)']['adversarial'], 'adv_d': ev['shift']['N(D)']['adversarial'],
        'minutes': images / rate / 60, 'img_s': rate, 'wall': wall,
    }


def cell(values, digits=1):
    """One seed's value, or the mean and half the difference; '¹' marks one value among more seeds."""
    one_of_more = len(values) > 1 and sum(v is not None for v in values) == 1
    values = [v for v in values if v is not None]
    if not values:
        return '-'
    if len(values) == 1:
        return f'{values[0]:.{digits}f}' + ('¹' if one_of_more else '')
    mean, half = sum(values) / len(values), (max(values) - min(values)) / 2
    return f'{mean:.{digits}f}±{half:.{digits}f}'


def main(argv):
    if not argv:
        sys.exit(__doc__)
    folder, seeds = argv[0], argv[1:] or ['8']
    aa_on = sorted({r['worst_on'] for name, _, _ in ROWS for s in seeds
                    for r in [numbers(folder, name, s)] if r and r['worst_on'] != 1000}) or [200]
    aa_on = '/'.join(map(str, aa_on))
    head = ['method', 'nat (10,000)', 'PGD-16 (train)', 'PGD-20', 'CW-inf', f'AA ({aa_on})', f'worst ({aa_on}; no AA: 1,000)',
            'nat N(U) / N(D)', 'PGD-16 N(U) / N(D)', 'train min', 'paper (another protocol)']
    print('| ' + ' | '.join(head) + ' |')
    print('|' + '---|' * len(head))
    lines = []
    for name, label, paper in ROWS:
        runs = [numbers(folder, name, s) for s in seeds]            # None: that seed not run
        done = [r for r in runs if r]
        if not done:
            continue
        if len({r['worst_on'] for r in done}) > 1:      # a seed without AutoAttack: its worst is on 1,000
            for r in done:
                r['worst'] = r['worst'] if r['worst_on'] != 1000 else None
        col = {k: cell([r and r[k] for r in runs], 0 if k in ('img_s', 'wall') else 1) for k in done[0] if k != 'worst_on'}
        adaptive = col['pgd20_main'] != '-'      # AGAIN: eval.py's PGD columns attack the main head only
        pgd20 = col['pgd20'] + (f" ({col['pgd20_main']} main-only)" if adaptive else '')
        pgd_train = col['pgd_train'] + (' (main-only)' if adaptive else '')
        lines.append(f"| {label} | {col['nat']} | {pgd_train} | {pgd20} | {col['cw']} | {col['aa']} | "
                     f"{col['worst']} | {col['nat_u']} / {col['nat_d']} | {col['adv_u']} / {col['adv_d']} | "
                     f"{col['minutes']} | {paper} |")
    print('\n'.join(lines))
    if len(seeds) > 1:
        one_seed = '; ¹ one seed only (the others not run)' if any('¹' in line for line in lines) else ''
        print(f'\nWith seeds {", ".join(seeds)}: mean ± half the range (max - min) / 2{one_seed}.')
    best_rows = []
    for name, label, _ in ROWS:
        best = [load(os.path.join(folder, f'{name}-s{s}.aa.json'), 'best.pt') for s in seeds]
        if any(best):
            best_rows.append(f"| {label.split(' (')[0]} | {'/'.join(str(b['epoch']) if b else '-' for b in best)} | "
                             + ' | '.join(cell([b and b[k] for b in best]) for k in
                                          ('natural_acc', 'autoattack_acc', 'worst_acc')) + ' |')
    if best_rows:
        print(f'\nbest.pt (the epoch of the best val_worst), first {aa_on} test images:\n')
        print('| method | epoch (per seed) | natural | AA | worst |')
        print('|---|---|---|---|---|')
        print('\n'.join(best_rows))
    print(f'\nAutoAttack, robust accuracy (%) left after each of its attacks (first {aa_on} test images, last.pt):\n')
    stages = ['clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square']
    print('| method, seed | ' + ' | '.join(['clean'] + [f'after {a.upper()}' for a in stages[1:]]) + ' |')
    print('|' + '---|' * (len(stages) + 1))
    for name, label, _ in ROWS:
        for seed in seeds:
            aa = load(os.path.join(folder, f'{name}-s{seed}.aa.json'))
            if aa:
                b = aa['autoattack_breakdown']
                print(f"| {label.split(' (')[0]}, {seed} | " + ' | '.join(f'{b[a]:.1f}' if a in b else '-' for a in stages) + ' |')


if __name__ == '__main__':
    main(sys.argv[1:])
