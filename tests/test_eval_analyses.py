"""eval.py analyses: shifted sets, gradient pictures, gradient-map classifier, CAM/ASC,
valid weights, and the gradient-masking sanity checks."""
import argparse
import json

import pytest
import torch
from PIL import Image

import common
import eval as evaluation
import models
from conftest import run_ok, run_script


def test_shift_moves_a_known_pixel_by_exactly_pixels():
    x = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    x[0, 0, 12, 14] = 255
    for (dx, dy), (row, col) in {(-8, 0): (12, 6), (8, 0): (12, 22), (0, -8): (4, 14),
                                 (0, 8): (20, 14)}.items():
        out = evaluation.shift_images(x, dx, dy)
        assert out[0, 0, row, col] == 255 and out.sum() == 255
    # content pushed past the border is gone, the freed border is zero
    x[0, 0, 12, 2] = 255
    left = evaluation.shift_images(x, -8, 0)
    assert left.sum() == 255 and (left[..., 24:] == 0).all()


def test_normalized_gradient_has_max_abs_one_and_colours():
    g = evaluation.normalized_gradient(torch.randn(3, 1, 8, 8) * 1e-4)
    assert torch.allclose(g.flatten(1).abs().amax(1), torch.ones(3))
    rgbmap = evaluation.red_green(g)
    assert rgbmap.shape == (3, 3, 8, 8) and (rgbmap[:, 2] == 0).all()
    assert torch.equal(rgbmap[:, 0] > 0, g > 0) and torch.equal(rgbmap[:, 1] > 0, g < 0)
    c = evaluation.clipped_gradient(torch.randn(2, 3, 8, 8))
    assert c.min() >= 0 and c.max() <= 1


def test_asc_of_a_hand_made_cam():
    cam = torch.zeros(2, 4, 4)
    cam[0, 0, :3] = torch.tensor([10.0, 6.0, 4.0])      # above 5: 10 and 6 -> 2 of 16
    cam[1] = 1.0                                          # flat: nothing above 0.5 * max? all 1 > 0.5
    asc = evaluation.asc_from_cam(cam, 0.5)
    assert torch.allclose(asc, torch.tensor([2 / 16, 1.0]))
    assert torch.allclose(evaluation.asc_from_cam(cam, 0.3), torch.tensor([3 / 16, 1.0]))


def test_cam_matches_the_classifier_on_gap_models():
    torch.manual_seed(0)
    model = models.build('cnn_b', 10, 1, width=0.125).eval()
    x, y = torch.rand(3, 1, 32, 32), torch.tensor([1, 2, 3])
    cam = evaluation.class_activation_maps(model, x, y)
    assert cam.shape == (3, 4, 4)
    logits = model(x) - model.fc.bias
    assert torch.allclose(cam.mean((1, 2)), logits[torch.arange(3), y], atol=1e-5)


def test_valid_weights_on_a_hand_made_fc():
    model = models.build('cnn_b', 3, 1, width=0.125)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[0, :4] = 1.0          # 4 above the (small) class mean
        model.fc.weight[1, :10] = 1.0         # 10
        model.fc.weight[2, :1] = 5.0          # 1
    assert abs(evaluation.valid_weights(model) - 5.0) < 1e-6


def sanity_args():
    return argparse.Namespace(seed=0, batch_size=128, transfer_from=None, square_queries=500)


def synthetic_split(n=64):
    from conftest import synthetic_images
    x, y = synthetic_images(n, 32, 1, 10, seed=5)
    return common.Split(torch.tensor(x).permute(0, 3, 1, 2).contiguous(), torch.tensor(y))


class Rounding(torch.nn.Module):
    """Gradient masking by construction: inputs are rounded (zero gradient everywhere)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 2) / 2)


def test_sanity_is_silent_on_an_honest_model_and_warns_on_a_masking_one():
    from test_attacks import trained_model
    model, _, _ = trained_model()
    split = synthetic_split(32)
    honest = evaluation.measure_sanity(model, split, 0.1, sanity_args(), torch.device('cpu'))
    assert evaluation.sanity_warnings(honest, len(split)) == [], honest
    masked = evaluation.measure_sanity(Rounding(model).eval(), split, 0.1, sanity_args(), torch.device('cpu'))
    warnings = evaluation.sanity_warnings(masked, len(split))
    assert any('unbounded attack' in w for w in warnings), masked
    # zero input gradients: Square still attacks what PGD cannot
    assert masked['square'] < masked['pgd20'] and any('gradient-free' in w for w in warnings), masked


class OnePixel(torch.nn.Module):
    """A model that reads one pixel, t = x[0, 0, 0] - 0.5 (0 on the clean images, all of class
    0): logit 0 is 1, logit 1 is h(t), so the cross-entropy rises with h."""

    def __init__(self, h):
        super().__init__()
        self.h = h

    def forward(self, x):
        t = x[:, 0, 0, 0].float() - 0.5
        return torch.stack([torch.ones_like(t), self.h(t)] + [torch.full_like(t, -10.0)] * 8, 1)


def one_pixel_split(n=64):
    x = torch.full((n, 1, 8, 8), 128, dtype=torch.uint8)
    x[:, 0, 0, 0] = 127                       # t = -0.002: clean and correct
    return common.Split(x, torch.zeros(n, dtype=torch.long))


def test_the_under_attack_check_fires_when_single_run_pgd_is_weak():
    # flat (zero gradient) while |t| < 0.8 eps, wrong beyond 0.8 eps + a little: PGD moves only
    # from a random start that fell outside the flat part (1 in 5), so one run breaks ~20% of
    # the images and four restarts ~59%: single-run PGD-20 is not to be trusted here
    eps = 0.3
    model = OnePixel(lambda t: 50.0 * torch.relu(t.abs() - 0.8 * eps)).eval()
    m = evaluation.measure_sanity(model, one_pixel_split(), eps, sanity_args(), torch.device('cpu'))
    assert m['pgd20_restarts4'] < m['pgd20'] - 20, m
    warnings = evaluation.sanity_warnings(m, 64)
    assert any('under-attacks' in w for w in warnings), (m, warnings)


def test_the_fgsm_check_fires_when_pgd_gets_stuck_on_a_local_maximum():
    # the loss rises from t = 0 to a bump at 0.1 eps, falls, and rises again past 0.9 eps, where
    # the label flips: FGSM's one step of eps jumps over the bump, PGD's small steps climb it and
    # stay (unless a random start fell past 0.9 eps: 1 in 20)
    eps = 0.3
    model = OnePixel(lambda t: 2.0 * torch.exp(-((t - 0.1 * eps) / (0.05 * eps)) ** 2)
                     + 200.0 * torch.relu(t - 0.9 * eps)).eval()
    m = evaluation.measure_sanity(model, one_pixel_split(), eps, sanity_args(), torch.device('cpu'))
    assert m['fgsm'] == 0.0 and m['pgd20'] > 70, m
    assert any('FGSM' in w for w in evaluation.sanity_warnings(m, 64)), m


def test_each_sanity_warning_can_fire():
    base = {'pgd20': 40.0, 'pgd100': 39.0, 'pgd20_restarts4': 39.0, 'fgsm': 55.0, 'pgd20_2eps': 10.0,
            'eps1': 0.0, 'noise': 80.0, 'transfer': 60.0, 'square': 45.0}
    assert evaluation.sanity_warnings(base, 1000) == []
    cases = {'pgd100': 45.0, 'pgd20_restarts4': 30.0, 'fgsm': 30.0, 'pgd20_2eps': 45.0, 'eps1': 20.0,
             'noise': 30.0, 'transfer': 30.0, 'square': 30.0}
    words = {'pgd100': 'stronger PGD raised', 'pgd20_restarts4': 'under-attacks', 'fgsm': 'FGSM',
             'pgd20_2eps': 'larger eps', 'eps1': 'unbounded', 'noise': 'random noise',
             'transfer': 'transfer attack', 'square': 'gradient-free'}
    for key, value in cases.items():
        warnings = evaluation.sanity_warnings(dict(base, **{key: value}), 1000)
        assert len(warnings) == 1 and words[key] in warnings[0], (key, warnings)
    # within the margin: a stronger attack 1.5 points lower is noise, not a warning
    assert evaluation.sanity_warnings(dict(base, pgd20_restarts4=38.5, pgd100=38.5), 1000) == []


def check_picture(path, stderr, what, min_size=(300, 150)):
    """A picture eval.py wrote: its line names what it holds (rows x images, panels, lines), it is
    large enough to read in a report, and it is not blank (more than a background colour)."""
    assert f"wrote {path} ({what})" in stderr, stderr[-2000:]
    image = Image.open(path).convert('RGB')
    assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20, 'a blank picture'
    return image


def test_all_analyses_from_the_command_line(data_dir, tmp_path, quick_runs):
    a, b = quick_runs['at'][0] / 'last.pt', quick_runs['st'][0] / 'last.pt'
    pics = {name: tmp_path / f'{name}.png' for name in ('grad', 'signs', 'cam')}
    js = tmp_path / 'out.json'
    proc = run_ok('eval.py', '--ckpt', a, b, '--data-dir', data_dir, '--test-size', '16', '--n-images', '5',
                  '--no-table', '--shift', '4', '--grad-maps', pics['grad'], '--grad-signs', pics['signs'],
                  '--gradmap-classifier', b, '--asc', '--cam', pics['cam'], '--valid-weights',
                  '--sanity', '--square-queries', '200', '--transfer-from', b, '--json', js)
    out = proc.stdout
    assert 'nat N(L)' in out and 'gradmap (clipped)' in out and 'ASC' in out and 'valid weights' in out
    assert 'gradmap (clipped, train)' in out
    assert out.count('sanity ') == 2
    rows = json.loads(js.read_text())['rows']
    for r in rows:
        assert set(r['shift']) == {'N', 'N(L)', 'N(R)', 'N(U)', 'N(D)'}
        assert 0 <= r['gradmap_clipped_acc'] <= 100 and 0 <= r['asc'] <= 1 and r['valid_weights'] > 0
        assert 0 <= r['gradmap_clipped_train_acc'] <= 100 and 0 <= r['gradmap_raw_train_acc'] <= 100
        assert 'warnings' in r['sanity'] and 'transfer' in r['sanity']['measured']
    assert 'asc_larger_than_second_percent' in rows[0]
    check_picture(pics['grad'], proc.stderr, '3 rows x 5 images')      # inputs + 2 ckpts
    check_picture(pics['signs'], proc.stderr, '3 rows x 15 images')    # 3 thresholds
    check_picture(pics['cam'], proc.stderr, '3 rows x 5 images')
    clip = run_ok('eval.py', '--ckpt', a, '--data-dir', data_dir, '--test-size', '8', '--no-table',
                  '--grad-maps', tmp_path / 'clip.png', '--grad-style', 'clip', '--n-images', '4')
    check_picture(tmp_path / 'clip.png', clip.stderr, '2 rows x 4 images')
    # where an analysis makes no sense: one line, no traceback
    proc = run_script('eval.py', '--ckpt', quick_runs['madry'][0] / 'last.pt', '--data-dir', data_dir,
                      '--test-size', '8', '--no-table', '--asc')
    assert proc.returncode != 0 and 'class activation maps need' in proc.stderr and 'Traceback' not in proc.stderr
    proc = run_script('eval.py', '--ckpt', a, '--sign-thresholds', 'a,b')
    assert proc.returncode != 0 and '--sign-thresholds' in proc.stderr


@pytest.fixture
def light_autoattack(monkeypatch):
    """AutoAttack standard with 2 target classes and 20 iterations for APGD-T and FAB-T (9 and
    100 in the version): the tests using it check eval.autoattack's cascade and breakdown, not
    pyautoattack's strength; the full settings cost 40 s on these 16 images, this 5 s."""
    from pyautoattack import AutoAttack
    real = AutoAttack._set_version

    def light(self, version='standard'):
        real(self, version)
        for attack in (self.apgd_targeted, self.fab):
            attack.n_target_classes, attack.n_iter = 2, 20
    monkeypatch.setattr(AutoAttack, '_set_version', light)


def test_autoattack_breakdown_follows_the_cascade_and_shows_square_beating_masked_gradients(light_autoattack):
    from test_attacks import trained_model
    model, _, _ = trained_model()
    split = synthetic_split(16)
    masked = Rounding(model).eval()
    correct, breakdown, warnings = evaluation.autoattack(masked, split, 0.1, torch.device('cpu'), 0, 128,
                                                         square_queries=300)
    assert list(breakdown) == ['clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square'], breakdown
    values = list(breakdown.values())
    assert all(a >= b for a, b in zip(values, values[1:])), breakdown       # a cascade only falls
    assert breakdown['square'] == pytest.approx(100.0 * correct.sum().item() / len(split))
    with torch.no_grad():
        clean = (masked(common.to_float(split.x)).argmax(1) == split.y).float().mean().item() * 100
    assert breakdown['clean'] == pytest.approx(clean)
    # zero input gradients: the gradient attacks leave the rounding model alone, Square does not,
    # and AutoAttack's own check says so
    assert breakdown['square'] < breakdown['fab-t'] and warnings, (breakdown, warnings)
    assert evaluation.square_drop(breakdown) == pytest.approx(breakdown['fab-t'] - breakdown['square'])
    assert evaluation.square_drop({'clean': 50.0, 'square': 40.0}) is None     # Square alone
    # a subset runs only those attacks, with the version's settings
    _, sub, _ = evaluation.autoattack(model, split, 0.1, torch.device('cpu'), 0, 128, attacks=['apgd-ce'])
    assert list(sub) == ['clean', 'apgd-ce']


def test_autoattack_flags_and_table(data_dir, tmp_path, quick_runs):
    ckpt, js = quick_runs['at'][0] / 'last.pt', tmp_path / 'aa.json'
    proc = run_ok('eval.py', '--ckpt', ckpt, '--data-dir', data_dir, '--test-size', '16', '--autoattack',
                  '--aa-attacks', 'apgd-ce', '--json', js)
    assert 'after APGD-CE' in proc.stdout and 'after APGD-T' not in proc.stdout
    row = json.loads(js.read_text())['rows'][0]
    assert row['autoattack_breakdown']['apgd-ce'] == pytest.approx(row['autoattack_acc'])
    assert row['worst_acc'] <= min(row['autoattack_acc'], row['pgd20_acc'], row['natural_acc'])
    for bad, words in [(['--autoattack', '--aa-attacks', 'square,bogus'], 'bogus'),
                       (['--autoattack', '--autoattack-version', 'rand', '--aa-attacks', 'square'], 'rand'),
                       (['--autoattack', '--no-table'], 'drop --no-table'),      # else nothing ran, silently
                       (['--pgd', '0.1', '10', '0.01', '--no-table'], 'drop --no-table')]:
        proc = run_script('eval.py', '--ckpt', ckpt, '--data-dir', data_dir, *bad)
        assert proc.returncode != 0 and words in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr


def test_sign_maps_raw_keeps_the_magnitude_normalised_does_not():
    torch.manual_seed(0)
    grad = torch.randn(2, 1, 8, 8) * 0.2
    small, large = evaluation.sign_maps(grad, [0.1, 0.3], 'raw'), evaluation.sign_maps(10 * grad, [0.1, 0.3], 'raw')
    assert small.shape == (4, 3, 8, 8)
    assert large.abs().sum() > 2 * small.abs().sum()       # larger gradients: more pixels shown
    # by hand: the red channel is on exactly where G > 0.3 (second block)
    assert torch.equal(small[2:, 0] > 0, grad[:, 0] > 0.3)
    n_small, n_large = (evaluation.sign_maps(g, [0.1, 0.3], 'normalised') for g in (grad, 10 * grad))
    assert torch.equal(n_small, n_large)                    # the scale is gone


def test_cam_overlay_colours():
    t = torch.tensor([0.0, 0.5, 1.0])[:, None, None]
    c = evaluation.heat_colours(t)[:, :, 0, 0]
    assert c[0].argmax() == 2 and c[1].argmax() == 1 and c[2].argmax() == 0     # blue, green, red
    x = torch.zeros(3, 1, 1, 1)
    assert torch.allclose(evaluation.cam_overlay(x, t), 0.5 * evaluation.heat_colours(t))
    x = torch.ones(3, 1, 1, 1)                     # a white input under the map: lighter colours
    assert (evaluation.cam_overlay(x, t) >= evaluation.cam_overlay(0 * x, t)).all()


def test_vgg16_shapes_features_and_cam():
    torch.manual_seed(0)
    model = models.build('vgg16', 10, 3, width=0.125).eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model(x), model.fc(model.features(x)), atol=1e-6)
    assert model.feature_maps(x).shape == (2, 64, 2, 2)          # block 5's maps, globally pooled
    cam = evaluation.class_activation_maps(model, x, torch.tensor([1, 2]))
    assert torch.allclose(cam.mean((1, 2)), (model(x) - model.fc.bias)[[0, 1], [1, 2]], atol=1e-5)
    assert len(model.stages) == 5 and sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 13


def test_standard_only_span_mask_on_hand_made_cams():
    class FixedCam(torch.nn.Module):
        """cam_maps returns one fixed 2x2 map; fc weight 1: the CAM is that map."""
        def __init__(self, cam):
            super().__init__()
            self.cam = cam
            self.fc = torch.nn.Linear(1, 10, bias=False)
            torch.nn.init.ones_(self.fc.weight)

        def cam_maps(self, x):
            return self.cam.expand(len(x), 1, 2, 2)
    std = FixedCam(torch.tensor([[[[1.0, 0.9], [0.2, 0.0]]]]))     # span: top row
    rob = FixedCam(torch.tensor([[[[1.0, 0.1], [0.2, 0.0]]]]))     # span: top-left only
    x, y = torch.rand(1, 1, 4, 4), torch.tensor([3])
    mask = evaluation.standard_only_span(std, rob, x, y, 0.5)
    expected = torch.ones(1, 1, 4, 4)
    expected[..., :2, 2:] = 0                                      # top-right quarter erased
    assert torch.equal(mask, expected)
    assert torch.equal(evaluation.standard_only_span(std, rob, x, y, 0.5, 'keep'), 1 - expected)
    assert torch.equal(x * mask, torch.where(expected.bool(), x, torch.zeros_like(x)))


def test_compactness_is_smaller_for_tight_clusters():
    class Identity(torch.nn.Module):
        def features(self, x):
            return x.flatten(1)
    y = torch.arange(40) % 4
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    torch.manual_seed(0)
    noise = torch.randn(40, 2)
    tight = common.Split((centres[y] + 0.1 * noise)[:, None, :, None], y)
    spread = common.Split((centres[y] + 3.0 * noise)[:, None, :, None], y)
    ratio_tight, _ = evaluation.compactness(Identity(), tight, 16)
    ratio_spread, (feats, labels) = evaluation.compactness(Identity(), spread, 16)
    assert ratio_tight < 0.05 < ratio_spread
    projected = evaluation.principal_components(feats)
    assert projected.shape == (40, 2)
    # the first component carries more of the spread than the second
    assert projected[:, 0].var() >= projected[:, 1].var()


def test_smoothgrad_with_sigma_0_is_the_plain_gradient():
    from test_attacks import trained_model
    model, x, y = trained_model()
    plain = evaluation.input_gradients(model, x[:4], y[:4])
    assert torch.allclose(evaluation.smooth_gradients(model, x[:4], y[:4], 5, 0.0), plain, atol=1e-6)
    assert torch.equal(evaluation.smooth_gradients(model, x[:4], y[:4], 0, 0.3), plain)
    assert not torch.allclose(evaluation.smooth_gradients(model, x[:4], y[:4], 5, 0.3), plain, atol=1e-4)


def test_span_compactness_smoothgrad_from_the_command_line(data_dir, tmp_path, quick_runs):
    at, st = quick_runs['at'][0], quick_runs['st'][0]
    pics = {n: tmp_path / f'{n}.png' for n in ('span', 'feat', 'grad')}
    js = tmp_path / 'o.json'
    proc = run_ok('eval.py', '--ckpt', at / 'last.pt', '--data-dir', data_dir, '--test-size', '16',
                  '--no-table', '--n-images', '4', '--corrupt-span', st / 'last.pt',
                  '--span-picture', pics['span'], '--compactness', pics['feat'], '--grad-maps', pics['grad'],
                  '--smoothgrad', '3', '--json', js)
    assert 'corrupted clean' in proc.stdout and 'compactness' in proc.stdout
    row = json.loads(js.read_text())['rows'][0]
    for name in ('standard', 'robust'):
        assert row['corrupt_span'][name]['clean'] == 100.0 or row['corrupt_span'][name]['images'] == 0
    assert row['compactness'] > 0 and '_features' not in row
    check_picture(pics['span'], proc.stderr, '3 rows x 4 images')      # image, mask, corrupted
    check_picture(pics['feat'], proc.stderr, '1 panels')
    check_picture(pics['grad'], proc.stderr, '2 rows x 4 images')      # inputs, one model


def test_vgg16_trains_with_train_at_and_eval_reads_its_cam(data_dir, tmp_path):
    run_ok('train_at.py', '--data-dir', data_dir, '--out', tmp_path / 'vgg', '--dataset', 'cifar10',
           '--model', 'vgg16', '--width', '0.125', '--steps', '1', '--epochs', '1', '--batch-size', '32',
           '--train-size', '32', '--test-size', '16', '--val-size', '16', '--device', 'cpu')
    proc = run_ok('eval.py', '--ckpt', tmp_path / 'vgg', '--data-dir', data_dir, '--no-table', '--asc',
                  '--test-size', '8')
    assert 'ASC' in proc.stdout


def test_autoattack_leaves_the_process_tracer_in_place():
    # pyautoattack's dynamic-defense check calls sys.settrace(None); a debugger or coverage
    # running the evaluation must keep its tracer
    import sys
    from test_attacks import trained_model
    model, _, _ = trained_model()
    calls = []

    def tracer(frame, event, arg):
        calls.append(event)
        return None
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        evaluation.autoattack(model, synthetic_split(4), 0.1, torch.device('cpu'), 0, 128, attacks=['apgd-ce'])
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)
