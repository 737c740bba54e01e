"""The GPU checks: every train_*.py for a few steps on CUDA with
and without --amp (MNIST cnn_b, ResNet-18 and WRN on synthetic CIFAR), a CUDA checkpoint read on
the CPU, PGD inside its ball under bf16 autocast and channels_last, resume, and eval.py's
AutoAttack on the device.

Skipped where CUDA is absent (CI has no GPU). On a GPU machine:

    python -m pytest -q tests/test_cuda.py

``ADV_TEST_DEVICE=cpu python -m pytest -q tests/test_cuda.py`` runs the same checks on the CPU
(--amp is then bfloat16 autocast on the CPU), which is how they were checked before a GPU was lent.
"""
import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F

import attacks
import common
import models
from conftest import read_log, run_ok

DEVICE = os.environ.get('ADV_TEST_DEVICE', 'cuda')
pytestmark = pytest.mark.skipif(DEVICE == 'cuda' and not torch.cuda.is_available(),
                                reason='no CUDA device (ADV_TEST_DEVICE=cpu runs these on the CPU)')

ON = ['--device', DEVICE]
MNIST = ['--width', '0.125', '--steps', '2', '--step-size', '0.1', '--epochs', '1',
         '--batch-size', '32', '--train-size', '64', '--test-size', '32', '--val-size', '16', *ON]
CIFAR = ['--dataset', 'cifar10', '--steps', '2', '--epochs', '1', '--batch-size', '32',
         '--train-size', '64', '--test-size', '32', '--val-size', '16', *ON]
RUNS = {
    'at': ('train_at.py', MNIST),
    'st': ('train_at.py', ['--standard', *MNIST]),
    'jt': ('train_jt.py', MNIST),
    'trades': ('train_trades.py', MNIST),
    'aelf': ('train_aelf.py', MNIST),
    'aelfs': ('train_aelfs.py', ['--st-epochs', '1', *MNIST]),       # its ST phase, then AELFs
    'again': ('train_again.py', MNIST),
    'again_resnet18': ('train_again.py', ['--model', 'resnet18', '--width', '0.125', *CIFAR]),
    'att_id': ('train_att_id.py', ['--blocks', '1', *CIFAR]),
    'at_resnet18': ('train_at.py', ['--model', 'resnet18', '--width', '0.125', *CIFAR]),
    'at_wrn': ('train_at.py', ['--model', 'wrn', '--depth', '10', '--widen-factor', '1', *CIFAR]),
}


@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'amp'])
@pytest.mark.parametrize('name', sorted(RUNS))
def test_every_script_trains_on_the_device(name, amp, data_dir, tmp_path):
    script, flags = RUNS[name]
    out = tmp_path / name
    proc = run_ok(script, '--data-dir', data_dir, '--out', out, *flags, *(['--amp'] if amp else []))
    headers = [l for l in proc.stdout.splitlines() if l.rstrip().endswith(f', {DEVICE}')]
    assert headers, proc.stdout[:500]                                 # it ran where it was asked to
    (rec,) = read_log(out)
    assert torch.isfinite(torch.tensor(rec['train_loss'])) and rec['images_per_s'] > 0, rec
    assert 0 <= rec['val_adv'] <= rec['val_nat'] <= 100, rec
    ckpt = common.load_checkpoint(str(out / 'last.pt'))               # read back on the CPU
    assert ckpt['finished'] and ckpt['args']['amp'] == amp
    assert all(v.device.type == 'cpu' for v in ckpt['state_dict'].values())


def test_a_device_checkpoint_is_evaluated_on_the_cpu(data_dir, tmp_path):
    run_ok('train_at.py', '--data-dir', data_dir, '--out', tmp_path / 'at', *MNIST, '--amp')
    js = tmp_path / 'e.json'
    run_ok('eval.py', '--ckpt', tmp_path / 'at', '--data-dir', data_dir, '--test-size', '16',
           '--device', 'cpu', '--json', js)
    (row,) = json.loads(js.read_text())['rows']
    assert 0 <= row['pgd20_acc'] <= row['natural_acc'] <= 100


@pytest.mark.skipif(importlib.util.find_spec('pyautoattack') is None, reason='pyautoattack not installed')
def test_eval_autoattack_on_the_device(data_dir, tmp_path):
    run_ok('train_at.py', '--data-dir', data_dir, '--out', tmp_path / 'at', *MNIST)
    js = tmp_path / 'e.json'
    proc = run_ok('eval.py', '--ckpt', tmp_path / 'at', '--data-dir', data_dir, '--test-size', '16',
                  '--autoattack', '--json', js, *ON)
    (row,) = json.loads(js.read_text())['rows']
    assert row['autoattack_acc'] <= row['natural_acc'] + 1e-9, proc.stdout
    assert row['worst_acc'] <= min(row['autoattack_acc'], row['pgd20_acc']) + 1e-9


def test_pgd_stays_in_its_ball_under_bf16_autocast_and_channels_last():
    device = torch.device(DEVICE)
    torch.manual_seed(0)
    model = common.prepare_model(models.build('cnn_b', 10, 1, width=0.25), device).eval()
    conv = model.stages[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(64, 1, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,), device=device)
    eps = 0.3
    for amp in (False, True):
        with common.autocast(device, amp):
            if amp:
                assert model(x).dtype == torch.bfloat16          # autocast does take effect
            for random_start in (False, True):
                x_adv = attacks.pgd(model, x, y, eps, 10, 0.1, random_start=random_start)
                assert x_adv.dtype == torch.float32 and not x_adv.requires_grad
                assert (x_adv - x).abs().max().item() <= eps + 1e-6
                assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1
                assert (x_adv != x).float().mean().item() > 0.5, 'the gradient was lost'
                with torch.no_grad():
                    assert F.cross_entropy(model(x_adv).float(), y) > F.cross_entropy(model(x).float(), y)


def test_resume_on_the_device_continues_the_run(data_dir, tmp_path):
    """On CUDA the runs are not bitwise repeatable (cudnn.benchmark may pick kernels that add in
    another order), so the resumed run must end close to the uninterrupted one, not equal."""
    base = ['--data-dir', data_dir, '--width', '0.125', '--steps', '2', '--step-size', '0.1',
            '--batch-size', '32', '--train-size', '128', '--test-size', '16', '--val-size', '16', *ON]
    run_ok('train_at.py', *base, '--epochs', '3', '--out', tmp_path / 'full')
    run_ok('train_at.py', *base, '--epochs', '1', '--out', tmp_path / 'part')
    proc = run_ok('train_at.py', *base, '--epochs', '3', '--out', tmp_path / 'part', '--resume')
    assert 'resuming' in proc.stdout
    assert [r['epoch'] for r in read_log(tmp_path / 'part')] == [1, 2, 3]
    a = common.load_checkpoint(str(tmp_path / 'full' / 'last.pt'))['state_dict']
    b = common.load_checkpoint(str(tmp_path / 'part' / 'last.pt'))['state_dict']
    for k in a:
        if a[k].is_floating_point():
            assert (a[k] - b[k]).norm() <= 0.05 * a[k].norm() + 1e-6, k


@pytest.mark.parametrize('mode', ['default', 'reduce-overhead'])
def test_compiled_training_on_the_device(mode, data_dir, tmp_path):
    """--compile (CUDA graphs with reduce-overhead) under --amp: the run finishes, finite."""
    out = tmp_path / mode
    run_ok('train_at.py', '--data-dir', data_dir, '--out', out, *MNIST, '--amp', '--compile', mode)
    (rec,) = read_log(out)
    assert torch.isfinite(torch.tensor(rec['train_loss'])) and 0 <= rec['val_adv'] <= rec['val_nat']


@pytest.mark.parametrize('name', ['jt', 'trades', 'aelf', 'aelfs', 'again', 'att_id'])
def test_every_script_trains_under_cuda_graphs(name, data_dir, tmp_path):
    """--compile reduce-overhead --amp (CUDA graphs: a graph's outputs are overwritten by its next
    replay, so a step that reads one after the next call fails or is wrong, as AELF's f_bar would)
    for every other script: the run finishes, and its first epoch's loss is the eager run's up to
    bf16 and kernel choice. `bash tests/gpu_reproduce.sh compile` runs these."""
    script, flags = RUNS[name]
    losses = []
    for extra in ([], ['--compile', 'reduce-overhead']):
        out = tmp_path / ('graphs' if extra else 'eager')
        run_ok(script, '--data-dir', data_dir, '--out', out, *flags, '--amp', *extra)
        (rec,) = read_log(out)
        assert torch.isfinite(torch.tensor(rec['train_loss'])) and 0 <= rec['val_adv'] <= rec['val_nat'], rec
        losses.append(rec['train_loss'])
    assert losses[1] == pytest.approx(losses[0], rel=0.1), losses
