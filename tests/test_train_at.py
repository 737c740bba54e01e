"""End-to-end runs of train_at.py and eval.py on synthetic data, and the one-line errors."""
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import torch

import common
import eval as evaluation
from conftest import QUICK, ROOT, THREADS, read_log, run_ok, run_process, run_script


def test_at_and_st_write_run_folder_and_eval_reads_it(data_dir, tmp_path, quick_runs):
    (out_at, proc), (out_st, _) = quick_runs['at'], quick_runs['st']
    assert 'img/s' in proc.stdout and 'ETA' in proc.stdout
    for out in (out_at, out_st):
        assert {'last.pt', 'best.pt', 'log.jsonl', 'final.json'} <= {p.name for p in out.iterdir()}
        (rec,) = read_log(out)
        for key in ('epoch', 'lr', 'train_loss', 'train_acc', 'val_nat', 'val_adv', 'val_worst', 'seconds',
                    'images_per_s'):
            assert key in rec
        assert rec['val_images'] == 16 and 'test_nat' not in rec     # epochs see validation only
        final = json.loads((out / 'final.json').read_text())
        assert final['test_images'] == 32 and final['last']['epoch'] == final['best']['epoch'] == 1
    ckpt = common.load_checkpoint(str(out_at / 'last.pt'))
    assert ckpt['finished'] and ckpt['epoch'] == 1 and ckpt['script'] == 'at'
    assert ckpt['args']['steps'] == 2 and ckpt['args']['eps'] == 0.3   # protocol eps kept
    js = tmp_path / 'eval.json'
    # a run folder (out_st) stands for its best.pt, said in one line
    proc = run_ok('eval.py', '--ckpt', out_at / 'last.pt', out_st, '--data-dir', data_dir,
                  '--test-size', '16', '--json', js, '--device', 'cpu', '--pgd', '0.1', '3', '0.05')
    rows_printed = [l for l in proc.stdout.splitlines() if l.startswith('| ') and '.pt' in l]
    assert len(rows_printed) == 2 and 'PGD-20' in proc.stdout
    assert proc.stderr.count(f"{out_st} is a run folder: using {out_st / 'best.pt'}") == 1, proc.stderr
    rows = json.loads(js.read_text())['rows']
    assert len(rows) == 2 and all(r['test_images'] == 16 for r in rows)
    for r in rows:
        assert r['pgd20_acc'] <= r['natural_acc'] + 1e-6
        assert 'pgd(0.1,3,0.05)_acc' in r


def test_eval_gives_best_pt_with_last_pts_weights_last_pts_row_without_attacking_again(quick_runs, data_dir, tmp_path):
    at, st = quick_runs['at'][0], quick_runs['st'][0]       # 1 epoch: best.pt is last.pt's model
    ckpt = common.load_checkpoint(str(at / 'last.pt'))
    ckpt['state_dict']['fc.bias'] = ckpt['state_dict']['fc.bias'] + 1e-6        # one tensor differs
    torch.save(ckpt, tmp_path / 'nudged.pt')
    assert evaluation.same_model(str(at / 'last.pt'), str(at / 'best.pt'))
    assert not evaluation.same_model(str(at / 'last.pt'), str(tmp_path / 'nudged.pt'))
    js = tmp_path / 'eval.json'
    proc = run_ok('eval.py', '--ckpt', at / 'last.pt', at / 'best.pt', st / 'last.pt', tmp_path / 'nudged.pt',
                  '--data-dir', data_dir, '--test-size', '16', '--json', js, '--device', 'cpu')
    rows = json.loads(js.read_text())['rows']
    assert proc.stderr.count('the same weights as') == 1 and f"{at / 'best.pt'}: PGD-20" not in proc.stderr
    assert rows[1].pop('same_weights_as') == rows[0]['ckpt'] and rows[1].pop('ckpt') != rows[0].pop('ckpt')
    assert rows[1] == rows[0]                                       # seeded attacks: the same row
    assert 'same_weights_as' not in rows[2] and 'same_weights_as' not in rows[3]


def test_finished_run_is_never_silently_overwritten(data_dir, tmp_path):
    args = ['--data-dir', data_dir, '--out', tmp_path / 'r', *QUICK]
    run_ok('train_at.py', *args)
    before = (tmp_path / 'r' / 'last.pt').read_bytes()
    proc = run_script('train_at.py', *args)
    assert proc.returncode != 0 and 'finished run' in proc.stderr and '--overwrite' in proc.stderr
    assert (tmp_path / 'r' / 'last.pt').read_bytes() == before
    run_ok('train_at.py', *args, '--overwrite')
    assert len(read_log(tmp_path / 'r')) == 1


def one_line_error(proc):
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    return lines[-1]


def test_bad_flags_give_one_line(data_dir, tmp_path):
    common_args = ['--data-dir', data_dir, '--out', tmp_path / 'x', '--device', 'cpu']
    # one real process: its exit status and stderr as a shell sees them
    assert 'invalid choice' in one_line_error(run_process('train_at.py', '--dataset', 'svhn', *common_args))
    assert 'invalid choice' in one_line_error(run_script('train_at.py', '--model', 'vgg', *common_args))
    assert '--epochs' in one_line_error(run_script('train_at.py', '--epochs', '0', *common_args))
    assert 'multiple of 8' in one_line_error(run_script('train_at.py', '--image-size', '28', *common_args))


def test_missing_data_offline_names_folder_and_files(tmp_path):
    empty = tmp_path / 'nodata'
    # a real process with no network (a proxy on a closed port): torchvision's download fails
    line = one_line_error(run_process('train_at.py', '--data-dir', empty, '--out', tmp_path / 'o',
                                      *QUICK))
    assert str(empty) in line and 'train-images-idx3-ubyte' in line and 'by hand' in line
    line = one_line_error(run_script('train_at.py', '--dataset', 'cifar10', '--data-dir', empty,
                                     '--out', tmp_path / 'o2', *QUICK))
    assert 'cifar-10-batches-py/data_batch_1' in line


def test_corrupt_or_foreign_checkpoints_give_one_line(data_dir, tmp_path, quick_runs):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'\x00garbage')
    assert 'not readable' in one_line_error(run_script('eval.py', '--ckpt', bad))
    assert 'does not exist' in one_line_error(run_script('eval.py', '--ckpt', tmp_path / 'none.pt'))
    # a checkpoint whose weights belong to another model
    shutil.copytree(quick_runs['at'][0], tmp_path / 'r')
    ckpt = torch.load(tmp_path / 'r' / 'last.pt', weights_only=True)
    ckpt['model_kwargs']['width'] = 0.25
    torch.save(ckpt, tmp_path / 'mixed.pt')
    assert 'cannot rebuild' in one_line_error(run_script('eval.py', '--ckpt', tmp_path / 'mixed.pt',
                                                         '--data-dir', data_dir))
    # resuming a folder with the flags of another model
    line = one_line_error(run_script('train_at.py', '--data-dir', data_dir, '--out', tmp_path / 'r',
                                     *QUICK[2:], '--width', '0.25', '--resume', '--epochs', '2'))
    assert 'resume with the flags' in line


def test_every_script_prints_its_help(monkeypatch, capsys):
    import runpy
    proc = run_process('train_at.py', '--help')              # one real process
    assert proc.returncode == 0 and 'usage: train_at.py' in proc.stdout, proc.stderr[-500:]
    for script in ('train_at.py', 'train_jt.py', 'train_trades.py', 'train_aelf.py', 'train_aelfs.py',
                   'train_again.py', 'train_att_id.py', 'eval.py'):
        # run as `python SCRIPT --help` runs it (as __main__, flags from sys.argv), in this process
        monkeypatch.setattr(sys, 'argv', [str(ROOT / script), '--help'])
        try:
            runpy.run_path(str(ROOT / script), run_name='__main__')
            raise AssertionError(f'{script} --help did not exit')
        except SystemExit as e:
            assert e.code in (0, None), (script, e.code)
        assert f'usage: {script}' in capsys.readouterr().out, script
        proc = run_script(script, '--help')
        assert proc.returncode == 0 and 'usage:' in proc.stdout, (script, proc.stderr[-500:])
        assert '--compile' in proc.stdout, script          # README "Speed": every script has it


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(script, *args):
    # the same environment as run_script (thread count included: results must match bitwise).
    # SIGINT at its default, as under a terminal's Ctrl-C: a suite run as a background job
    # (`pytest &`, nohup) ignores SIGINT and its children would inherit that
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS=THREADS)
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _wait_for(path, proc, seconds=120, content=''):
    t0 = time.time()
    while not (path.exists() and content in path.read_text(errors='replace')):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < seconds, f'{path} never appeared'
        time.sleep(0.05)


def test_two_runs_on_one_folder_the_second_stops_at_once(data_dir, tmp_path):
    out = tmp_path / 'x'
    args = ['--data-dir', data_dir, '--out', out, *QUICK[:-10], '--epochs', '3', '--batch-size', '32',
            '--train-size', '128', '--test-size', '16', '--val-size', '16', '--device', 'cpu']
    first = _start('train_at.py', *args)
    _wait_for(out / '.lock', first, content='process ')
    first.send_signal(signal.SIGSTOP)          # it keeps its lock while stopped: no race with the others
    try:
        # a second process (another seed), and --resume / --overwrite on the same folder
        lines = [run_process('train_at.py', *args, '--seed', '9').stderr.strip()]
        lines += [run_script('train_at.py', *args, extra).stderr.strip() for extra in ('--resume', '--overwrite')]
    finally:
        first.send_signal(signal.SIGCONT)
    for line in lines:
        assert 'in use by another run' in line and f'process {first.pid}' in line and '\n' not in line, line
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    log = read_log(out)
    assert [r['epoch'] for r in log] == [1, 2, 3]              # only the first run's lines
    assert common.load_checkpoint(str(out / 'last.pt'))['args']['seed'] == 8
    import fcntl                                               # released at the end: the file
    with open(out / '.lock') as f:                             # stays, its flock is free
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_lock_file_left_by_a_process_that_is_gone_does_not_stop_a_run(data_dir, tmp_path):
    out = tmp_path / 'x'
    out.mkdir()
    (out / '.lock').write_text('process 1 on elsewhere, started earlier')     # no flock held on it
    proc = run_ok('train_at.py', '--data-dir', data_dir, '--out', out, *QUICK)
    assert 'in use' not in proc.stderr and f'process {os.getpid()}' in (out / '.lock').read_text()


def test_resume_after_kill_9_equals_an_uninterrupted_run(data_dir, tmp_path):
    base = [*QUICK[:-8], '--batch-size', '32', '--train-size', '256', '--test-size', '16',
            '--val-size', '16', '--device', 'cpu', '--data-dir', data_dir, '--epochs', '4']
    run_ok('train_at.py', *base, '--out', tmp_path / 'full')
    killed = _start('train_at.py', *base, '--out', tmp_path / 'part')
    _wait_for(tmp_path / 'part' / 'last.pt', killed)            # written atomically (os.replace)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    epoch = common.load_checkpoint(str(tmp_path / 'part' / 'last.pt'))['epoch']
    assert epoch < 4, 'the run ended before it could be killed: give it more epochs'
    assert (tmp_path / 'part' / '.lock').exists()              # a kill -9 leaves the file
    proc = run_ok('train_at.py', *base, '--out', tmp_path / 'part', '--resume')
    assert 'resuming' in proc.stdout
    a = common.load_checkpoint(str(tmp_path / 'full' / 'last.pt'))['state_dict']
    b = common.load_checkpoint(str(tmp_path / 'part' / 'last.pt'))['state_dict']
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r['epoch'] for r in read_log(tmp_path / 'part')] == list(range(1, 5))


def test_resume_rewrites_the_log_from_the_history_last_pt_keeps(tmp_path):
    import argparse
    out = tmp_path / 'r'
    args = argparse.Namespace(out=str(out), resume=False, overwrite=False, dataset='mnist', model='cnn_b', seed=8)
    run = common.Run(args, 'at')
    model = common.prepare_model(common.models.build('cnn_b', 10, 1, width=0.125), 'cpu')

    def record(epoch):
        return {'epoch': epoch, 'lr': 0.1, 'train_loss': float(epoch), 'train_acc': 0.0, 'seconds': 1.0,
                'images_per_s': 1.0}
    run.log_epoch(record(1), 3)
    run.save(model, 1, {}, {}, score=1.0)
    run.log_epoch(record(2), 3)               # epoch 2's line was written, its checkpoint not
    with open(out / 'log.jsonl', 'a') as f:
        f.write('{"epo')                      # and a line cut short by the kill
    run.release()
    resumed = common.Run(argparse.Namespace(**{**vars(args), 'resume': True}), 'at')
    resumed.log_epoch(record(2), 3)
    assert [r['epoch'] for r in read_log(out)] == [1, 2]
    resumed.release()


def test_eval_lists_a_folder_without_checkpoints(data_dir, tmp_path):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'notes.txt').write_text('')
    proc = run_script('eval.py', '--ckpt', tmp_path / 'empty', '--data-dir', data_dir)
    assert proc.returncode != 0 and 'without best.pt or last.pt' in proc.stderr and 'notes.txt' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_best_pt_is_the_epoch_with_the_best_score_and_last_pt_the_last(tmp_path):
    import argparse
    args = argparse.Namespace(out=str(tmp_path / 'r'), resume=False, overwrite=False, dataset='mnist',
                              model='cnn_b', seed=8)
    run = common.Run(args, 'at')
    model = common.prepare_model(common.models.build('cnn_b', 10, 1, width=0.125), 'cpu')
    for epoch, score in enumerate([20.0, 50.0, 30.0, 50.0], start=1):   # a tie does not replace
        with torch.no_grad():
            model.fc.bias.fill_(epoch)          # tells the epochs' weights apart
        run.save(model, epoch, {}, {'score': score}, score=score, finished=epoch == 4)
    run.release()
    best, last = (common.load_checkpoint(str(tmp_path / 'r' / n)) for n in ('best.pt', 'last.pt'))
    assert best['epoch'] == 2 and best['best_score'] == 50.0 and float(best['state_dict']['fc.bias'][0]) == 2
    assert last['epoch'] == 4 and last['finished'] and float(last['state_dict']['fc.bias'][0]) == 4


def test_validation_split_is_held_out_fixed_and_the_only_split_epochs_read(data_dir, tmp_path, monkeypatch):
    import train_at
    args = train_at.parse_args(['--data-dir', str(data_dir), '--val-size', '24', '--train-size', '100',
                                '--test-size', '32', '--device', 'cpu'])
    train, val, test = common.load_data(args, 'cpu')
    assert (len(train), len(val), len(test)) == (100, 24, 32)
    rows = {bytes(x.numpy()) for x in train.x}
    assert not any(bytes(x.numpy()) in rows for x in val.x)            # never trained on
    held = common.validation_indices(256, 24)
    full = common.load_split('mnist', str(data_dir), True, image_size=32)
    assert torch.equal(val.x, full.x[held])                             # the fixed choice...
    other = train_at.parse_args(['--data-dir', str(data_dir), '--val-size', '24', '--seed', '9',
                                 '--device', 'cpu'])
    assert torch.equal(common.load_data(other, 'cpu')[1].x, val.x)     # ...whatever the seed
    assert torch.equal(train.x, full.x[[i for i in range(256) if i not in set(held.tolist())]][:100])
    # the per-epoch evaluation reads the validation split only; the test split is read after the
    # last epoch, for last.pt and best.pt
    seen = []
    real_correct = common.correct
    monkeypatch.setattr(common, 'correct', lambda model, split, *a, **k: (seen.append(len(split)),
                                                                          real_correct(model, split, *a, **k))[1])
    run_ok('train_at.py', '--data-dir', data_dir, '--out', tmp_path / 'r', *QUICK, '--val-size', '24',
           '--epochs', '3')
    assert seen[:9] == [24] * 9 and set(seen[9:]) == {32}, seen       # nat, PGD, CW-PGD per epoch
    final = json.loads((tmp_path / 'r' / 'final.json').read_text())
    assert final['last']['epoch'] == 3 and 1 <= final['best']['epoch'] <= 3
    assert len(seen[9:]) == (2 if final['best']['epoch'] == 3 else 4)
    assert [r.get('val_adv') is not None for r in read_log(tmp_path / 'r')] == [True] * 3
    # --val-size 0: no validation, no best.pt, last.pt tested
    run_ok('train_at.py', '--data-dir', data_dir, '--out', tmp_path / 'noval', *QUICK, '--val-size', '0')
    assert not (tmp_path / 'noval' / 'best.pt').exists()
    assert set(json.loads((tmp_path / 'noval' / 'final.json').read_text())) == {'test_images', 'last'}
    line = one_line_error(run_script('train_at.py', '--data-dir', data_dir, '--out', tmp_path / 'x',
                                     *QUICK, '--val-size', '256'))
    assert 'fewer than one batch' in line


def _help_defaults(text):
    """{flag: text of its '(default: ...)'} from a --help output."""
    out, flag, buf = {}, None, []
    for line in text.splitlines() + ['  --end']:
        m = re.match(r'  (--[a-z0-9-]+)', line)
        if m or not line.startswith('    '):
            if flag:
                d = re.search(r'\(default: ([^()]*)\)\s*$', ' '.join(buf))
                if d:
                    out[flag] = d.group(1)
            flag, buf = (m.group(1), [line]) if m else (None, [])
        else:
            buf.append(line.strip())
    return out


def test_help_shows_every_protocol_value_per_dataset_as_the_run_takes_it():
    # the protocol is set as argparse's defaults before parsing: for each script, dataset and
    # protocol flag, `--dataset D --help` shows the value a run with `--dataset D` takes
    import importlib
    flags = ('--epochs', '--lr', '--milestones', '--batch-size', '--eps', '--steps', '--step-size',
             '--model', '--weight-decay', '--seed', '--val-size')
    for script, datasets in [('train_at.py', ('mnist', 'cifar10', 'cifar100')),
                             ('train_jt.py', ('mnist', 'cifar10', 'cifar100')),
                             ('train_trades.py', ('mnist', 'cifar10', 'cifar100')),
                             ('train_aelf.py', ('mnist', 'cifar10', 'cifar100')),
                             ('train_aelfs.py', ('mnist', 'cifar10', 'cifar100')),
                             ('train_again.py', ('mnist', 'cifar10', 'cifar100')),
                             ('train_att_id.py', ('mnist', 'cifar10'))]:
        module = importlib.import_module(script[:-3])
        for dataset in datasets:
            for extra in ([], ['--quick'] if dataset == 'mnist' else ['--standard'] if script == 'train_at.py' else []):
                argv = ['--dataset', dataset, *extra]
                shown = _help_defaults(run_ok(script, *argv, '--help').stdout)
                args = vars(module.parse_args(argv))
                for flag in flags + {'train_aelfs.py': ('--beta', '--st-epochs'), 'train_trades.py': ('--beta',),
                                     'train_att_id.py': ('--lam', '--optimizer')}.get(script, ()):
                    assert shown.get(flag) == str(args[flag[2:].replace('-', '_')]), (script, argv, flag, shown.get(flag))
    # each default said once, and none for a flag without one
    text = run_ok('eval.py', '--help').stdout
    assert '(default: None)' not in text and not re.search(r'default[^()]*\(default', text)


def test_at_loss_is_eq_3_with_pgd_written_independently():
    """AT's step (Eq. (3)) against the equation written out here: l-inf PGD from x (no random
    start) by signed-gradient ascent on CE with the model in eval mode, projected on the eps-ball
    and [0, 1]; then CE of the model in train mode on those examples (BatchNorm batch statistics)."""
    import train_at
    from attacks import pgd
    torch.manual_seed(0)
    model = common.models.build('cnn_b', 10, 1, width=0.125).train()
    x, y = torch.rand(16, 1, 32, 32), torch.randint(0, 10, (16,))

    def attack(m, xx, yy):
        return pgd(m, xx, yy, 0.3, 3, 0.1)
    ref, ref_st = copy.deepcopy(model), copy.deepcopy(model)    # a train-mode pass moves BN stats
    ref.eval()
    x_adv = x.clone()
    for _ in range(3):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(ref(x_adv), y, reduction='sum'), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + 0.1 * g.sign(), x - 0.3), x + 0.3).clamp(0, 1)
    ref.train()
    expected_logits = ref(x_adv)
    expected = torch.nn.functional.cross_entropy(expected_logits, y)
    st_model = copy.deepcopy(model)
    loss, logits = train_at.at_loss(model, x, y, attack)
    assert model.training and torch.allclose(loss, expected, atol=1e-6), (loss, expected)
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    st_loss, _ = train_at.at_loss(st_model, x, y, attack, standard=True)       # Eq. (1)
    assert torch.allclose(st_loss, torch.nn.functional.cross_entropy(ref_st(x), y), atol=1e-6)
    assert not torch.allclose(st_loss, loss)


def test_quick_is_the_results_table_protocol_and_every_flag_overrides_it(data_dir, tmp_path):
    import train_aelfs
    import train_att_id
    q = common.QUICK
    a = __import__('train_at').parse_args(['--quick'])
    assert (a.width, a.train_size, a.epochs, a.milestones) == (q['width'], q['train_size'], q['epochs'], q['milestones'])
    assert (a.test_size, a.val_size) == (1000, 1000)     # the final test on the first 1,000 test images
    # the papers' 16 steps of eps/15, at eps 0.2 (not 0.3: masked gradients at this length)
    assert (a.eps, a.steps, a.step_size, a.model) == (0.2, 16, 0.0133, 'cnn_b')
    assert __import__('train_at').parse_args([]).eps == 0.3                          # the paper's
    b = __import__('train_at').parse_args(['--quick', '--epochs', '3', '--width', '0.5'])
    assert (b.epochs, b.width, b.train_size) == (3, 0.5, 8000)
    s = train_aelfs.parse_args(['--quick'])
    assert (s.st_epochs, s.st_milestones) == (q['epochs'], q['milestones'])       # ST phase included
    i = train_att_id.parse_args(['--quick'])                                        # the table's row
    assert (i.model, i.optimizer, i.lr, i.batch_size, i.steps, i.random_start) == ('cnn_b', 'sgd', 0.1, 128, 16, False)
    assert (i.eps, i.step_size) == (0.2, 0.0133)
    for script in ('train_jt', 'train_trades', 'train_aelf', 'train_again'):         # every row's PGD
        m = __import__(script).parse_args(['--quick'])
        assert (m.eps, m.steps, m.step_size) == (0.2, 16, 0.0133), script
    assert 'MNIST preset' in one_line_error(run_script('train_at.py', '--quick', '--dataset', 'cifar10'))
    proc = run_ok('train_at.py', '--quick', '--data-dir', data_dir, '--out', tmp_path / 'q', '--train-size', '32',
                  '--epochs', '1', '--val-size', '16', '--test-size', '16', '--steps', '1', '--device', 'cpu')
    assert "--quick: a small MNIST protocol" in proc.stdout and "not the paper's" in proc.stdout
    assert 'eps 0.2' in proc.stdout and "(its eps: 0.3)" in proc.stdout      # the departure, said
    assert common.load_checkpoint(str(tmp_path / 'q' / 'last.pt'))['model_kwargs']['width'] == 0.25


def test_eps_warmup_scales_the_training_attack_only(data_dir, tmp_path, monkeypatch):
    # --eps-warmup 2: epoch 1 trains against eps/2 (and step/2), epoch 2 against eps; the
    # validation attack takes the full eps from the first epoch on
    import train_at
    calls, real = [], train_at.pgd
    monkeypatch.setattr(train_at, 'pgd', lambda m, x, y, eps, steps, step, *a, **k:
                        (calls.append((round(eps, 6), round(step, 6), m.training)), real(m, x, y, eps, steps, step, *a, **k))[1])
    proc = run_ok('train_at.py', '--data-dir', data_dir, '--out', tmp_path / 'r', *QUICK, '--epochs', '2',
                  '--eps', '0.3', '--step-size', '0.1', '--eps-warmup', '2')
    assert 'eps warm-up over 2 epochs' in proc.stdout
    per_batch = 64 // 32
    train1, val1 = calls[:per_batch], calls[per_batch:per_batch + 1]
    train2 = calls[per_batch + 1:2 * per_batch + 1]
    assert {c[:2] for c in train1} == {(0.15, 0.05)} and all(c[2] for c in train1), calls
    assert val1[0][:2] == (0.3, 0.1) and not val1[0][2], calls       # validation: full eps, eval mode
    assert {c[:2] for c in train2} == {(0.3, 0.1)}, calls
