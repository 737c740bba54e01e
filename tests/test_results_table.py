"""tests/results_table.py, the README's Results table from the files tests/results.sh writes: three
seeds per row, AutoAttack on the size it ran on, last.pt in the main table and best.pt in its own."""
import json

import results_table


def _write(folder, name, seed, aa_last, aa_best, pgd20=70.0):
    base = folder / f'{name}-s{seed}'
    base.mkdir()
    (base / 'log.jsonl').write_text(json.dumps({'epoch': 1, 'seconds': 60.0, 'images_per_s': 100.0}) + '\n')
    (folder / f'{name}-s{seed}.log').write_text('done in 1m30s (1000 test images): ...\n')

    def row(ckpt, **kw):
        return {'ckpt': str(base / ckpt), 'epoch': 1, 'epochs': 1, **kw}
    shift = {k: {'natural': 90.0, 'adversarial': 10.0} for k in ('N', 'N(U)', 'N(D)')}
    files = {
        'nat': [row('last.pt', shift=shift)],
        'eval': [row('last.pt', shift=shift, pgd_train_acc=80.0, pgd20_acc=pgd20, cw20_acc=71.0, worst_acc=69.0)],
        'aa': [row(ckpt, test_images=500, natural_acc=98.0, pgd20_acc=pgd20, autoattack_acc=acc, worst_acc=acc,
                   autoattack_breakdown={'clean': 98.0, 'apgd-ce': acc + 1, 'apgd-t': acc, 'fab-t': acc, 'square': acc})
               for ckpt, acc in (('last.pt', aa_last), ('best.pt', aa_best))],
    }
    for kind, rows in files.items():
        (folder / f'{name}-s{seed}.{kind}.json').write_text(json.dumps({'rows': rows}))


def test_three_seeds_aa_on_500_and_best_pt_in_its_own_table(tmp_path, capsys):
    for seed, last, best in ((8, 60.0, 50.0), (9, 64.0, 52.0), (10, 62.0, 54.0)):
        _write(tmp_path, 'at', seed, last, best)
    results_table.main([str(tmp_path), '8', '9', '10'])
    out = capsys.readouterr().out
    assert '| AA (500) |' in out and 'worst (500;' in out
    row = [line for line in out.splitlines() if line.startswith('| AT | ')][0]     # the main table's
    assert '| 62.0±2.0 | 62.0±2.0 |' in row              # last.pt's AutoAttack and worst: mean ± range/2
    assert 'best.pt (the epoch of the best val_worst), first 500 test images' in out
    (best,) = [line for line in out.splitlines() if line.startswith('| AT | 1/1/1 |')]
    assert '| 52.0±2.0 | 52.0±2.0 |' in best               # best.pt's AutoAttack, not last.pt's
    assert 'first 500 test images, last.pt' in out and '| AT, 10 | 98.0 | 63.0 | 62.0 |' in out
    assert '¹' not in out                                  # every seed ran: no one-seed mark, no footnote


def test_a_seed_not_run_is_marked_and_footnoted(tmp_path, capsys):
    _write(tmp_path, 'at', 8, 60.0, 50.0)
    results_table.main([str(tmp_path), '8', '9'])
    out = capsys.readouterr().out
    assert '| 60.0¹ |' in out and '¹ one seed only' in out
