"""Shared test fixtures: small synthetic datasets written in torchvision's on-disk formats (so
the real loading code in common.py runs), helpers to run the scripts as a user would, and the
path of the real MNIST copy beside the repository (tests that need it skip when it is absent)."""
import contextlib
import importlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Where the learning tests look for real MNIST (torchvision's MNIST/raw/ layout, as a first run
# of any script leaves it): the scripts' --data-dir default ./data, then $ADV_MNIST_DIR, then
# ../shared/data beside the repository. The first that holds it is used; none: they skip.
MNIST_PLACES = [ROOT / 'data', *([Path(os.environ['ADV_MNIST_DIR'])] if os.environ.get('ADV_MNIST_DIR') else []),
                ROOT.parent / 'shared' / 'data']


def _has_mnist(root):
    raw = root / 'MNIST' / 'raw'
    return all((raw / f).is_file() or (raw / (f + '.gz')).is_file()
               for f in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
                         't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'))


REAL_DATA = next((p for p in MNIST_PLACES if _has_mnist(p)), MNIST_PLACES[-1])
HAS_REAL_MNIST = _has_mnist(REAL_DATA)
NO_MNIST = ('real MNIST not found in ' + ', '.join(map(str, MNIST_PLACES)) +
            ' (run any script once with --data-dir ./data, or set ADV_MNIST_DIR)')
sys.path.insert(0, str(ROOT))

THREADS = os.environ.get('OMP_NUM_THREADS', '2')
torch.set_num_threads(int(THREADS))


def synthetic_images(n, side, channels, num_classes, seed):
    """Images with a class-dependent bright square on noise, so a tiny model can learn them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    x = rng.integers(0, 60, (n, side, side, channels)).astype(np.uint8)
    cells = int(np.ceil(np.sqrt(num_classes)))
    size = side // cells
    for i, label in enumerate(y):
        r, c = divmod(int(label), cells)
        x[i, r * size:(r + 1) * size, c * size:(c + 1) * size, :] = 220
    return x, y


def write_idx(path, array):
    """Write an idx file (the MNIST format): magic with dtype 0x08 (uint8) and rank, then dims."""
    with open(path, 'wb') as f:
        f.write(struct.pack('>BBBB', 0, 0, 0x08, array.ndim))
        f.write(struct.pack('>' + 'I' * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_mnist(root, n_train=256, n_test=128):
    raw = Path(root) / 'MNIST' / 'raw'
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (('train', n_train, 1), ('t10k', n_test, 2)):
        x, y = synthetic_images(n, 28, 1, 10, seed)
        write_idx(raw / f'{split}-images-idx3-ubyte', x[..., 0])
        write_idx(raw / f'{split}-labels-idx1-ubyte', y)


def write_cifar(root, num_classes, n_per_batch=64, n_test=64):
    """CIFAR-10 (cifar-10-batches-py/) or CIFAR-100 (cifar-100-python/) python pickles."""
    def dump(path, x, y, label_key):
        entry = {'data': x.transpose(0, 3, 1, 2).reshape(len(x), -1), label_key: [int(v) for v in y],
                 'batch_label': 'synthetic', 'filenames': [f'{i}.png' for i in range(len(x))]}
        with open(path, 'wb') as f:
            pickle.dump(entry, f)
    if num_classes == 10:
        base = Path(root) / 'cifar-10-batches-py'
        base.mkdir(parents=True, exist_ok=True)
        for b in range(1, 6):
            dump(base / f'data_batch_{b}', *synthetic_images(n_per_batch, 32, 3, 10, 10 + b), 'labels')
        dump(base / 'test_batch', *synthetic_images(n_test, 32, 3, 10, 20), 'labels')
        with open(base / 'batches.meta', 'wb') as f:
            pickle.dump({'label_names': [f'c{i}' for i in range(10)]}, f)
    else:
        base = Path(root) / 'cifar-100-python'
        base.mkdir(parents=True, exist_ok=True)
        dump(base / 'train', *synthetic_images(5 * n_per_batch, 32, 3, 100, 30), 'fine_labels')
        dump(base / 'test', *synthetic_images(n_test, 32, 3, 100, 31), 'fine_labels')
        with open(base / 'meta', 'wb') as f:
            pickle.dump({'fine_label_names': [f'c{i}' for i in range(100)]}, f)


import cifar_as_is  # noqa: E402,F401  (synthetic CIFAR files load without torchvision's md5 check)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """A folder holding synthetic MNIST, CIFAR-10 and CIFAR-100 in torchvision's layout."""
    root = tmp_path_factory.mktemp('data')
    write_mnist(root)
    write_cifar(root, 10)
    write_cifar(root, 100)
    return root


# A proxy on a closed local port: torchvision's download fails at once, as it would offline.
# Set for the whole test run, so in-process runs cannot reach the network either.
OFFLINE_ENV = {'http_proxy': 'http://127.0.0.1:9', 'https_proxy': 'http://127.0.0.1:9',
               'HTTP_PROXY': 'http://127.0.0.1:9', 'HTTPS_PROXY': 'http://127.0.0.1:9',
               'no_proxy': '', 'NO_PROXY': ''}
os.environ.update(OFFLINE_ENV)


@dataclass
class Result:
    """What a run of a script left: like subprocess.CompletedProcess."""
    returncode: int
    stdout: str
    stderr: str


def run_script(script, *args):
    """Run ``script``'s ``main(argv)`` in this process, as its command line would, and return its
    exit status and what it printed. A UserError or a bad flag ends main with SystemExit and a
    one-line message on stderr, as in a process; any other exception propagates to the test (in a
    process it would be a traceback). Most tests use this: starting Python and importing torch
    again for each run would cost more than the runs themselves. ``run_process`` is for what only
    a separate process shows."""
    module = importlib.import_module(script[:-3])
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
    return Result(code, out.getvalue(), err.getvalue())


def run_ok(script, *args):
    proc = run_script(script, *args)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def run_process(script, *args, timeout=600):
    """Run a script of the repo in a new Python process, as a user would (exit status, the
    one-line error without a traceback, the offline download error, kill -9, locks)."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS=THREADS)
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def read_log(out):
    with open(Path(out) / 'log.jsonl') as f:
        return [json.loads(line) for line in f]


# Quick flags: a narrow cnn_b, a couple of PGD steps, tiny subsets.
QUICK = ['--width', '0.125', '--steps', '2', '--step-size', '0.1', '--epochs', '1',
         '--batch-size', '32', '--train-size', '64', '--test-size', '32', '--val-size', '16',
         '--device', 'cpu']


# The real-MNIST protocol of the learning tests, the smallest found to separate each working
# method from ST with a margin the method sets, not the thread count (measured at 1 thread):
# narrow cnn_b, 2 epochs (lr x0.1 after the first) of batch 64 on 2,500 training images,
# PGD(0.3, 5, 0.1) for training and testing, 200 test images, no validation split (last.pt).
# ST (REAL_ST: 6,000 images, no attack) reaches 97.5% natural and 2-5% PGD accuracy; each
# adversarial method 23-37% PGD accuracy (observed values beside each test).
REAL = ['--data-dir', str(REAL_DATA), '--width', '0.25', '--train-size', '2500', '--val-size', '0',
        '--test-size', '200', '--epochs', '2', '--milestones', '1', '--batch-size', '64',
        '--steps', '5', '--step-size', '0.1', '--device', 'cpu']
REAL_ST = ['--standard', *REAL, '--train-size', '6000']
# margin of a method's PGD accuracy over ST's: ST sits at 2-5%, the methods at 23-37%
ROBUST_MARGIN = 12.0

@pytest.fixture(scope='session')
def quick_runs(data_dir, tmp_path_factory):
    """AT and ST of cnn_b, and AT of the Madry CNN (no global pooling), on synthetic MNIST with
    the QUICK flags, trained once per test run for the tests that only read them (eval.py,
    analyses, checkpoints): {name: (run folder, what the run printed)}. A test that changes a
    folder copies it first. Only train_at.py trains them, so a method's blanked loss function
    fails that method's tests alone."""
    root = tmp_path_factory.mktemp('quick')
    runs = {'at': ('train_at.py', []), 'st': ('train_at.py', ['--standard']),
            'madry': ('train_at.py', ['--model', 'madry_cnn'])}
    out = {}
    for name, (script, flags) in runs.items():
        proc = run_ok(script, *flags, '--data-dir', data_dir, '--out', root / name, *QUICK)
        out[name] = (root / name, proc)
    return out


needs_real_mnist = pytest.mark.skipif(not HAS_REAL_MNIST, reason=NO_MNIST)


@pytest.fixture(scope='session')
def real_st_run(tmp_path_factory):
    """ST on the real-MNIST protocol (REAL_ST), trained once per test run: the baseline every
    learning test compares with, and the init of AELFs."""
    if not HAS_REAL_MNIST:
        pytest.skip(NO_MNIST)
    out = tmp_path_factory.mktemp('real') / 'st'
    run_ok('train_at.py', '--out', out, *REAL_ST)
    return out


def final_metrics(out, which='last'):
    """The test accuracies of a run's last.pt (or best.pt) from its final.json."""
    with open(Path(out) / 'final.json') as f:
        return json.load(f)[which]
