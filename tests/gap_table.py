"""The README's generalization-gap table from tests/gen_gap.sh's eval.py --gen-gap JSON: per method,
mean +- half the range over seeds of the training and test accuracies and the gaps. Not a test.

    python tests/gap_table.py runs/gap/gap.json [MORE.json ...]
"""
import json
import re
import sys
from collections import defaultdict

COLUMNS = [('train nat', 'train_nat'), ('test nat', 'test_nat'), ('nat gap', 'gap_nat'),
           ('train PGD-20', 'train_pgd20'), ('test PGD-20', 'test_pgd20'), ('robust gap (PGD-20)', 'gap_pgd20'),
           ('robust gap (training PGD)', 'gap_pgd_train')]
NAMES = {'at': 'AT', 'again': 'AGAIN', 'mart': 'MART (`--base mart --no-ase --no-hff`)', 'again-mart': 'AGAIN-MART'}


def main(*paths):
    rows = [r for path in paths for r in json.load(open(path))['rows']]
    groups = defaultdict(list)
    for r in rows:
        method = re.match(r'(.*)-s\d+$', r['ckpt'].replace('\\', '/').split('/')[-2]).group(1)
        groups[method].append(r['gen_gap'])
    print('| method | seeds | ' + ' | '.join(c for c, _ in COLUMNS) + ' |\n|' + '---|' * (len(COLUMNS) + 2))
    for method in sorted(groups, key=list(NAMES).index):
        cells = []
        for _, key in COLUMNS:
            values = [g[key] for g in groups[method]]
            cells.append(f"{sum(values) / len(values):.1f}±{(max(values) - min(values)) / 2:.1f}")
        print(f"| {NAMES[method]} | {len(groups[method])} | " + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    main(*sys.argv[1:])
