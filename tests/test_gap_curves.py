"""eval.py's generalization gap (AGAIN Sec. 5.6, Fig. 3), robustness curve over eps and training
curves: which images the gap reads, its sign, the curve's shape, the masking warning, and the
pictures."""
import argparse
import json

import numpy as np
import torch

import common
import eval as evaluation
import models
from conftest import run_ok, write_idx
from test_eval_analyses import check_picture

# Told apart by construction: every image is one flat grey level and one label per part
TRAIN, VAL, TEST = (50, 1), (100, 3), (150, 2)          # (pixel value, label)
N_TRAIN, VAL_SIZE, N_TEST = 120, 40, 60


def write_parts(root):
    """MNIST files whose held-out validation images (the indices every script holds out),
    trained-on images and test images differ in grey level and label."""
    raw = root / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    held = set(common.validation_indices(N_TRAIN, VAL_SIZE).tolist())
    value = np.array([VAL[0] if i in held else TRAIN[0] for i in range(N_TRAIN)], dtype=np.uint8)
    label = np.array([VAL[1] if i in held else TRAIN[1] for i in range(N_TRAIN)], dtype=np.uint8)
    write_idx(raw / 'train-images-idx3-ubyte', np.broadcast_to(value[:, None, None], (N_TRAIN, 28, 28)).copy())
    write_idx(raw / 'train-labels-idx1-ubyte', label)
    write_idx(raw / 't10k-images-idx3-ubyte', np.full((N_TEST, 28, 28), TEST[0], np.uint8))
    write_idx(raw / 't10k-labels-idx1-ubyte', np.full(N_TEST, TEST[1], np.uint8))


def constant_checkpoint(path, data_dir, label):
    """A cnn_b that answers ``label`` for every input (zero weights, a large bias: no gradient, so
    it stays 'accurate' on images of that label at every eps)."""
    model = models.build('cnn_b', 10, 1, width=0.125)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.fc.bias[label] = 10.0
    args = argparse.Namespace(dataset='mnist', data_dir=str(data_dir), val_size=VAL_SIZE, train_size=None,
                              image_size=32, batch_size=16, test_size=None, eps=0.2, steps=2,
                              step_size=0.1, random_start=False, epochs=1)
    common.save_checkpoint(path, model, args, 1)
    return path


def test_gen_gap_reads_only_trained_on_images_and_gaps_are_train_minus_test(tmp_path):
    write_parts(tmp_path / 'data')
    ckpt = constant_checkpoint(tmp_path / 'one.pt', tmp_path / 'data', TRAIN[1])
    loaded = common.load_checkpoint(ckpt)
    args = argparse.Namespace(data_dir=None)
    train = evaluation.training_images(loaded, args, 'cpu', 1000)
    assert len(train) == N_TRAIN - VAL_SIZE                   # all it trained on, nothing else
    assert (train.x == TRAIN[0]).all() and (train.y == TRAIN[1]).all()
    js = tmp_path / 'g.json'
    proc = run_ok('eval.py', '--ckpt', ckpt, '--gen-gap', '30', '--no-table', '--json', js,
                  '--gen-gap-picture', tmp_path / 'g.png')
    g = json.loads(js.read_text())['rows'][0]['gen_gap']
    assert g['train_images'] == 30 and g['test_images'] == 30
    # right on every training image (a validation or test image would be wrong), wrong on every test one
    for kind in ('nat', 'pgd_train', 'pgd20'):
        assert g[f'train_{kind}'] == 100.0 and g[f'test_{kind}'] == 0.0
        assert g[f'gap_{kind}'] == g[f'train_{kind}'] - g[f'test_{kind}'] == 100.0
    assert 'robust gap' in proc.stdout
    check_picture(tmp_path / 'g.png', proc.stderr, '1 groups of 4 bars')


def test_eps_curve_starts_at_natural_accuracy_and_never_rises():
    from test_attacks import trained_model
    model, x, y = trained_model()
    split = common.Split((x * 255).round().to(torch.uint8), y)
    radii = [0.0, 0.02, 0.05, 0.1, 0.2, 0.4]
    curve = evaluation.eps_curve(model, split, radii, 32)
    assert curve[0] == common.accuracy(model, split)
    assert all(b <= a for a, b in zip(curve, curve[1:])) and curve[-1] < curve[0]


def test_eps_curve_counts_an_image_only_if_every_smaller_eps_left_it_right(monkeypatch):
    """An attack that is weaker at a larger eps (here: it gives up above 0.05) must not lift the
    curve: the smaller ball lies inside the larger, so what it broke stays broken."""
    from test_attacks import trained_model
    model, x, y = trained_model()
    split = common.Split((x * 255).round().to(torch.uint8), y)

    def erratic(m, xb, yb, eps, *a, **k):           # breaks images at eps 0.05 only
        return torch.zeros_like(xb) if 0 < eps <= 0.05 else xb
    monkeypatch.setattr(evaluation, 'pgd', erratic)
    nat, erased = common.accuracy(model, split), common.accuracy(model, split, lambda m, xb, yb: torch.zeros_like(xb))
    curve = evaluation.eps_curve(model, split, [0.0, 0.05, 0.1], 32)
    assert curve[0] == nat and erased < nat
    assert curve[1] == curve[2] <= erased       # not back to natural accuracy at 0.1


def test_masking_warning_fires_on_a_model_accurate_at_every_eps(tmp_path, quick_runs):
    write_parts(tmp_path / 'data')
    stuck = constant_checkpoint(tmp_path / 'stuck.pt', tmp_path / 'data', TEST[1])
    js = tmp_path / 'e.json'
    proc = run_ok('eval.py', '--ckpt', stuck, '--eps-curve', tmp_path / 'e.png', '--eps-list', '0', '0.1',
                  '0.2', '0.4', '--no-table', '--test-size', '20', '--json', js)
    c = json.loads(js.read_text())['rows'][0]['eps_curve']
    assert c['accuracy'] == [100.0] * 4 and c['check_radius'] == 0.5 and c['check_accuracy'] == 100.0
    assert 'warning: ' in proc.stdout and 'masked' in proc.stdout
    check_picture(tmp_path / 'e.png', proc.stderr, '1 lines')
    # default radii: 9 from 0 to twice the training eps
    at = quick_runs['at'][0] / 'last.pt'
    proc = run_ok('eval.py', '--ckpt', at, '--eps-curve', tmp_path / 'a.png', '--no-table', '--test-size', '8',
                  '--json', js)
    c = json.loads(js.read_text())['rows'][0]['eps_curve']
    eps = common.load_checkpoint(at)['args']['eps']
    assert len(c['radii']) == 9 and c['radii'][0] == 0 and abs(c['radii'][-1] - 2 * eps) < 1e-6


def test_training_curves_picture(tmp_path, quick_runs):
    at, st = quick_runs['at'][0], quick_runs['st'][0]
    proc = run_ok('eval.py', '--ckpt', at, st / 'last.pt', '--no-table', '--test-size', '8',
                  '--training-curves', tmp_path / 't.png')
    # loss, training accuracy, val nat, adv and worst; one line per run
    check_picture(tmp_path / 't.png', proc.stderr, '5 panels x 2 lines')
