"""Faults a run survives with one line: bad numbers in flags, a full disk during any write
(checkpoints, log.jsonl, final.json, the lock, eval.py's outputs), SIGTERM and Ctrl-C, and an
unreadable last.pt."""
import argparse
import builtins
import contextlib
import errno
import importlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import uuid

import pytest
import torch

import common
from conftest import QUICK, read_log, run_ok, run_script
from test_train_at import _start, _wait_for, one_line_error

SCRIPTS = ['train_at', 'train_jt', 'train_trades', 'train_aelf', 'train_aelfs', 'train_again',
           'train_att_id', 'eval']
# flags whose huge values mean "all of it" (the whole split), which a run takes meaningfully
ALL_OF_IT = {'train_size', 'test_size', 'val_size', 'gen_gap'}   # --val-size: stopped by load_data (below)


def _parser_of(module, base):
    """The argparse parser the script's parse_args builds (caught as it parses)."""
    caught = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        caught.setdefault('parser', self)
        return real(self, args, namespace)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, 'parse_args', grab)
        with contextlib.redirect_stdout(io.StringIO()):
            module.parse_args(base)
    return caught['parser']


def _parse_status(module, argv):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            module.parse_args(argv)
        except SystemExit as e:
            return e.code, err.getvalue()
    return 0, err.getvalue()


def test_every_numeric_flag_rejects_nan_inf_negative_and_huge_values_at_parse_time():
    # parse time is before any training: a value that passes is one the run can take meaningfully
    checked = 0
    for name in SCRIPTS:
        module = importlib.import_module(name)
        base = ['--ckpt', 'x.pt'] if name == 'eval' else ['--quick']
        for action in _parser_of(module, base)._actions:
            numeric = action.type in (int, float) or getattr(action.type, '__qualname__', '').startswith('number.')
            if not numeric or not action.option_strings:
                continue
            flag, n = action.option_strings[0], 3 if action.nargs == 3 else 1
            huge = [] if action.dest in ALL_OF_IT else ['99999999999', '1e12']
            for value in ['nan', 'inf', '-inf', '-1', *huge]:
                code, err = _parse_status(module, base + [flag] + [value] * n)
                assert code == 2, f"{name}.py {flag} {value} was accepted"
                lines = [l for l in err.splitlines() if l.strip()]
                assert lines[-1].startswith(f"{name}.py: error:") or 'usage' in lines[0], (name, flag, err)
                checked += 1
    assert checked > 250


def test_val_size_that_leaves_less_than_one_batch_stops_before_training(data_dir, tmp_path):
    for val_size in ('250', '256', '9999'):          # 256 synthetic training images, batch 32
        proc = run_script('train_at.py', '--data-dir', data_dir, '--out', tmp_path / val_size, *QUICK,
                          '--val-size', val_size)
        line = one_line_error(proc)
        assert 'fewer than one batch (--batch-size 32)' in line and 'choose a smaller --val-size' in line, line
        assert not (tmp_path / val_size / 'last.pt').exists() and not (tmp_path / val_size / 'log.jsonl').exists()


# ------------------------------------------------------------------------------- a full disk

BASE = [*QUICK[:-8], '--batch-size', '32', '--train-size', '128', '--test-size', '16', '--val-size', '16',
        '--device', 'cpu']


def _no_space(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _assert_clean(folder):
    left = [p.name for p in folder.iterdir() if '.tmp' in p.name]
    assert not left, left


def test_full_disk_during_a_checkpoint_save_is_one_line_and_resume_continues_exactly(
        data_dir, tmp_path, monkeypatch):
    base = [*BASE, '--data-dir', data_dir, '--epochs', '3']
    run_ok('train_at.py', *base, '--out', tmp_path / 'full')
    real_save, calls = torch.save, []

    def save_until_full(obj, f, *a, **k):    # the second last.pt fills the disk half-way
        calls.append(str(f))
        if 'last.pt.tmp' in str(f) and sum('last.pt.tmp' in c for c in calls) == 2:
            with open(f, 'wb') as fh:
                fh.write(b'\0' * 1000)
            raise _no_space(f)
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', save_until_full)
    out = tmp_path / 'part'
    line = one_line_error(run_script('train_at.py', *base, '--out', out))
    assert line.startswith(f"error: cannot write {out / 'last.pt'}: No space left on device (") \
        and 'free there' in line and '--resume' in line, line
    _assert_clean(out)
    assert common.load_checkpoint(str(out / 'last.pt'))['epoch'] == 1     # the previous one, intact
    monkeypatch.setattr(torch, 'save', real_save)
    proc = run_ok('train_at.py', *base, '--out', out, '--resume')
    assert 'resuming' in proc.stdout
    a = common.load_checkpoint(str(tmp_path / 'full' / 'last.pt'))['state_dict']
    b = common.load_checkpoint(str(out / 'last.pt'))['state_dict']
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r['epoch'] for r in read_log(out)] == [1, 2, 3]
    best = common.load_checkpoint(str(out / 'best.pt'))
    assert best['epoch'] == common.load_checkpoint(str(tmp_path / 'full' / 'best.pt'))['epoch']


def test_full_disk_while_the_first_last_pt_is_written_says_a_command_that_then_works(data_dir, tmp_path, monkeypatch):
    """best.pt of epoch 1 written, then the disk fills while last.pt is: the line's command runs."""
    base = [*BASE, '--data-dir', data_dir, '--epochs', '2']
    real_save = torch.save

    def first_last_fails(obj, f, *a, **k):
        if 'last.pt.tmp' in str(f):
            raise _no_space(f)
        return real_save(obj, f, *a, **k)
    out = tmp_path / 'first'
    with monkeypatch.context() as mp:
        mp.setattr(torch, 'save', first_last_fails)
        line = one_line_error(run_script('train_jt.py', *base, '--out', out))
    assert f"cannot write {out / 'last.pt'}: No space left on device" in line, line
    command = shlex.split(line.split('then run ')[1])
    assert command[:2] == ['python', 'train_jt.py'] and '--resume' in command, line
    proc = run_ok(*command[1:])
    assert 'starting at epoch 1' in proc.stdout, proc.stdout
    assert [r['epoch'] for r in read_log(out)] == [1, 2] and common.load_checkpoint(str(out / 'last.pt'))['epoch'] == 2
    # the same when the first log line is what fills the disk (no file of the run written yet)
    out = tmp_path / 'log-first'
    with monkeypatch.context() as mp:
        _open_full_for(mp, common, 'log.jsonl')
        line = one_line_error(run_script('train_jt.py', *base, '--out', out))
    assert f"cannot write {out / 'log.jsonl'}: No space left on device" in line, line
    command = shlex.split(line.split('then run ')[1])
    assert 'starting at epoch 1' in run_ok(*command[1:]).stdout and len(read_log(out)) == 2


class _FullFile(io.StringIO):
    """A text file on a full disk: half of what is written arrives, then ENOSPC."""

    def __init__(self, path, mode):
        super().__init__()
        self.path, self.mode = path, mode

    def write(self, text):
        with builtins.open(self.path, self.mode) as f:
            f.write(text[:len(text) // 2])
        raise _no_space(self.path)


def _open_full_for(monkeypatch, module, needle):
    def fake_open(path, mode='r', *a, **k):
        if needle in str(path) and ('w' in mode or 'a' in mode):
            return _FullFile(path, mode)
        return builtins.open(path, mode, *a, **k)
    monkeypatch.setattr(module, 'open', fake_open, raising=False)


def test_full_disk_on_the_log_final_json_lock_and_eval_outputs_is_one_line(data_dir, tmp_path, monkeypatch):
    base = [*BASE, '--data-dir', data_dir]
    out = tmp_path / 'r'
    run_ok('train_at.py', *base, '--out', out, '--epochs', '1')
    log_before = (out / 'log.jsonl').read_bytes()
    # log.jsonl: the half-written line is cut off again
    with monkeypatch.context() as mp:
        _open_full_for(mp, common, 'log.jsonl')
        line = one_line_error(run_script('train_at.py', *base, '--out', out, '--epochs', '2', '--resume'))
    assert f"cannot write {out / 'log.jsonl'}: No space left on device" in line, line
    assert (out / 'log.jsonl').read_bytes() == log_before
    _assert_clean(out)
    # final.json: the checkpoints are complete; --resume writes it once there is space
    with monkeypatch.context() as mp:
        _open_full_for(mp, common, 'final.json')
        line = one_line_error(run_script('train_at.py', *base, '--out', out, '--epochs', '2', '--resume'))
    assert f"cannot write {out / 'final.json'}: No space left on device" in line and '--resume' in line, line
    assert json.loads((out / 'final.json').read_text())['last']['epoch'] == 1      # the previous one
    assert common.load_checkpoint(str(out / 'last.pt'))['epoch'] == 2
    _assert_clean(out)
    proc = run_ok('train_at.py', *base, '--out', out, '--epochs', '2', '--resume')
    assert 'done in' in proc.stdout and json.loads((out / 'final.json').read_text())['last']['epoch'] == 2
    assert 'nothing to do' in run_ok('train_at.py', *base, '--out', out, '--epochs', '2', '--resume').stdout
    # the lock file's owner line
    class FullLock:
        def __init__(self, path, mode):
            self.file, self.name = builtins.open(path, mode), str(path)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def write(self, text):
            raise _no_space(self.name)
    with monkeypatch.context() as mp:
        mp.setattr(common, 'open', lambda path, mode='r', *a, **k: FullLock(path, mode) if str(path).endswith('.lock')
                   else builtins.open(path, mode, *a, **k), raising=False)
        line = one_line_error(run_script('train_at.py', *base, '--out', tmp_path / 'new'))
    assert f"cannot write {tmp_path / 'new' / '.lock'}: No space left on device" in line, line
    assert 'run the same command again' in line
    _assert_clean(tmp_path / 'new')
    # eval.py's JSON and pictures: the previous file stays whole, no temporary file
    (tmp_path / 'e.json').write_text('previous')
    with monkeypatch.context() as mp:
        _open_full_for(mp, common, 'e.json')
        line = one_line_error(run_script('eval.py', '--ckpt', out / 'last.pt', '--data-dir', data_dir,
                                         '--test-size', '8', '--device', 'cpu', '--json', tmp_path / 'e.json'))
    assert f"cannot write {tmp_path / 'e.json'}: No space left on device" in line and 'eval.py again' in line
    assert (tmp_path / 'e.json').read_text() == 'previous'
    from matplotlib.figure import Figure

    def full_picture(self, fp, *a, **k):
        with builtins.open(fp, 'wb') as f:
            f.write(b'\x89PNG')
        raise _no_space(fp)
    with monkeypatch.context() as mp:
        mp.setattr(Figure, 'savefig', full_picture)
        line = one_line_error(run_script('eval.py', '--ckpt', out / 'last.pt', '--data-dir', data_dir,
                                         '--test-size', '8', '--device', 'cpu', '--no-table',
                                         '--grad-maps', tmp_path / 'g.png'))
    assert f"cannot write {tmp_path / 'g.png'}: No space left on device" in line, line
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('g.png')] == []
    assert Figure.savefig is not full_picture                   # the patch undone


def _mount_tmpfs(folder, size):
    folder.mkdir()
    try:
        done = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(folder)],
                              capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _fill(folder, leave):
    """Fill the filesystem of ``folder`` up to ``leave`` bytes free (a filler file)."""
    filler = folder / 'filler'
    with open(filler, 'wb', buffering=0) as f:
        try:
            while True:
                f.write(b'\0' * 4096)
        except OSError:
            pass
    os.truncate(filler, max(os.path.getsize(filler) - leave, 0))
    return filler


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() != 0, reason='mounting a tmpfs needs root')
def test_a_real_small_filesystem_that_fills_up(data_dir, tmp_path):
    disk = tmp_path / f'disk-{uuid.uuid4().hex[:6]}'
    if not _mount_tmpfs(disk, '4m'):
        pytest.skip('mount -t tmpfs is not allowed here')
    try:
        base = [*BASE, '--data-dir', data_dir, '--epochs', '2']
        run_ok('train_at.py', *base, '--out', tmp_path / 'full')
        out = disk / 'r'
        run_ok('train_at.py', *base, '--out', out, '--epochs', '1')
        filler = _fill(disk, leave=12 * 1024)       # room for the lock and a log line, not last.pt
        line = one_line_error(run_script('train_at.py', *base, '--out', out, '--resume'))
        assert f"cannot write {out}" in line and 'free there' in line and '--resume' in line, line
        _assert_clean(out)
        assert common.load_checkpoint(str(out / 'last.pt'))['epoch'] == 1
        os.remove(filler)
        filler = _fill(disk, leave=0)               # now not even the lock fits
        line = one_line_error(run_script('train_at.py', *base, '--out', out, '--resume'))
        assert 'cannot write' in line and 'Traceback' not in line, line
        _assert_clean(out)
        os.remove(filler)                           # space is back: the run continues exactly
        run_ok('train_at.py', *base, '--out', out, '--resume')
        a = common.load_checkpoint(str(tmp_path / 'full' / 'last.pt'))['state_dict']
        b = common.load_checkpoint(str(out / 'last.pt'))['state_dict']
        assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        subprocess.run(['umount', '-l', str(disk)], capture_output=True)


# ------------------------------------------------------------------------ SIGTERM and Ctrl-C

def test_sigterm_and_sigint_release_the_lock_and_say_how_to_resume(data_dir, tmp_path):
    # runs that cannot end before their signal (100000 epochs), each signalled as soon as both
    # have logged epoch 2; one that ignores its signal is killed when the test ends
    base = [*BASE, '--data-dir', data_dir, '--epochs', '100000', '--train-size', '64']
    cases = {'SIGTERM': (signal.SIGTERM, 143), 'SIGINT': (signal.SIGINT, 130)}
    procs = {name: _start('train_at.py', *base, '--out', tmp_path / name) for name in cases}   # side by side
    lines = {}
    try:
        for name in cases:
            _wait_for(tmp_path / name / 'log.jsonl', procs[name], content='"epoch": 2')
        for name, (sig, _) in cases.items():
            procs[name].send_signal(sig)
        for name, (sig, code) in cases.items():
            out, proc = tmp_path / name, procs[name]
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail(f'{name} did not stop the run within 30 s')
            assert proc.returncode == code and 'Traceback' not in err, err
            lines[name] = [l for l in err.splitlines() if l.strip()][-1]
            epoch = common.load_checkpoint(str(out / 'last.pt'))['epoch']
            assert lines[name].startswith(f"interrupted ({name}): {out} keeps epoch {epoch} in last.pt; "
                                          f"continue with: python train_at.py "), lines[name]
            _assert_clean(out)                      # the lock released, no temporary file
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    # the printed command continues the run (with fewer epochs here, to keep the test short)
    out = tmp_path / 'SIGTERM'
    epoch = common.load_checkpoint(str(out / 'last.pt'))['epoch']
    command = shlex.split(lines['SIGTERM'].split('continue with: ')[1])
    assert command[:2] == ['python', 'train_at.py'] and command[-1] == '--resume'
    argv = command[2:]
    argv[len(argv) - argv[::-1].index('--epochs')] = str(epoch + 1)      # the last --epochs
    proc = run_ok('train_at.py', *argv)
    assert f'resuming {out} after epoch {epoch}' in proc.stdout
    assert common.load_checkpoint(str(out / 'last.pt'))['epoch'] == epoch + 1


# --------------------------------------------------------------------------- a corrupt last.pt

def test_a_corrupt_last_pt_names_the_intact_best_pt_and_the_command_that_continues(data_dir, tmp_path):
    base = [*BASE, '--data-dir', data_dir, '--epochs', '3']
    out = tmp_path / 'r'
    run_ok('train_at.py', *base, '--out', out)
    best_epoch = common.load_checkpoint(str(out / 'best.pt'))['epoch']
    (out / 'last.pt').write_bytes(b'not a checkpoint at all')
    line = one_line_error(run_script('train_at.py', *base, '--out', out, '--resume'))
    assert f"{out / 'last.pt'}" in line and 'is not readable' in line, line
    assert f"{out / 'best.pt'} (epoch {best_epoch}) is intact" in line, line
    copy, command = line.split('continue from it with')[1].split('&&')
    assert shlex.split(copy) == ['cp', str(out / 'best.pt'), str(out / 'last.pt')]
    shutil.copy(out / 'best.pt', out / 'last.pt')
    words = shlex.split(command)
    assert words[:2] == ['python', 'train_at.py'] and '--resume' in words
    proc = run_ok('train_at.py', *words[2:])
    assert f'after epoch {best_epoch}' in proc.stdout or 'nothing to do' in proc.stdout
    assert common.load_checkpoint(str(out / 'last.pt'))['epoch'] == 3
    # without a readable best.pt the line says how to start again
    (out / 'last.pt').write_bytes(b'broken')
    (out / 'best.pt').write_bytes(b'broken too')
    line = one_line_error(run_script('train_at.py', *base, '--out', out, '--resume'))
    assert 'no readable best.pt' in line and '--overwrite' in line and '--resume' not in line.split('start again')[1], line
