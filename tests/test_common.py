import argparse
import os

import pytest
import torch

import common
import models


@pytest.mark.parametrize('name,side,channels,classes', [
    ('mnist', 28, 1, 10), ('cifar10', 32, 3, 10), ('cifar100', 32, 3, 100)])
def test_load_split_reads_torchvision_layout(data_dir, name, side, channels, classes):
    train = common.load_split(name, str(data_dir), True)
    test = common.load_split(name, str(data_dir), False, size=10)
    assert train.x.dtype == torch.uint8 and train.x.shape[1:] == (channels, side, side)
    assert len(test) == 10 and test.y.dtype == torch.long
    assert int(train.y.max()) < classes
    assert train.x.max() > 200          # the bright class square is there: pixels not rescaled


def test_mnist_resized_to_32(data_dir):
    s = common.load_split('mnist', str(data_dir), False, image_size=32, size=4)
    assert s.x.shape == (4, 1, 32, 32) and s.x.dtype == torch.uint8


def test_batches_cover_split_in_seeded_order(data_dir):
    split = common.load_split('mnist', str(data_dir), True, size=100)
    torch.manual_seed(3)
    ys = torch.cat([y for _, y in common.batches(split, 32, shuffle=True)])
    assert sorted(ys.tolist()) == sorted(split.y.tolist()) and not torch.equal(ys, split.y)
    torch.manual_seed(3)
    ys2 = torch.cat([y for _, y in common.batches(split, 32, shuffle=True)])
    assert torch.equal(ys, ys2)
    x, _ = next(common.batches(split, 32))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, split.x[:32].float() / 255)


def test_augment_crops_with_zero_padding_and_flips():
    x = torch.rand(64, 3, 8, 8) + 1.0           # strictly positive: padding zeros are visible
    torch.manual_seed(0)
    out = common.augment(x, padding=2)
    assert out.shape == x.shape
    zero_rows = (out == 0).all(dim=(1, 3)).any(dim=1)   # some images were shifted
    assert zero_rows.any()
    # every crop is a window of the padded, possibly flipped, image
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(8):
        ok = any(torch.equal(out[i], cand[:, dy:dy + 8, dx:dx + 8])
                 for cand in (xp[i], xp[i].flip(2)) for dy in range(5) for dx in range(5))
        assert ok
    same = common.augment(x, padding=0)
    flipped = [torch.equal(same[i], x[i].flip(2)) for i in range(64)]
    assert 10 < sum(flipped) < 54 and all(f or torch.equal(same[i], x[i]) for i, f in enumerate(flipped))


def test_lr_schedule():
    import argparse
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    args = argparse.Namespace(seed=8, lr=0.1, milestones=[20, 40])
    lrs = [common.start_epoch(e, args, opt) for e in range(50)]
    assert opt.param_groups[0]['lr'] == lrs[-1]
    assert lrs[0] == lrs[19] == 0.1
    assert abs(lrs[20] - 0.01) < 1e-12 and abs(lrs[39] - 0.01) < 1e-12
    assert abs(lrs[40] - 0.001) < 1e-12


def test_checkpoint_roundtrip_and_errors(tmp_path):
    model = models.build('cnn_b', 10, 1, width=0.125)
    args = argparse.Namespace(dataset='mnist', eps=0.3)
    path = str(tmp_path / 'a.pt')
    common.save_checkpoint(path, model, args, 3, {'x': 1}, {'test_adv': 50.0})
    assert not [p for p in os.listdir(tmp_path) if 'tmp' in p]
    ckpt = common.load_checkpoint(path)
    assert ckpt['epoch'] == 3 and ckpt['args']['eps'] == 0.3 and ckpt['model'] == 'cnn_b'
    rebuilt = common.model_from_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))
    other = models.build('cnn_b', 10, 1, width=0.25)
    with pytest.raises(common.UserError, match='holds cnn_b'):
        common.load_weights_into(other, path)
    (tmp_path / 'bad.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(common.UserError, match='not readable'):
        common.load_checkpoint(str(tmp_path / 'bad.pt'))
    torch.save({'some': 'dict'}, tmp_path / 'foreign.pt')
    with pytest.raises(common.UserError, match='not a checkpoint of this repo'):
        common.load_checkpoint(str(tmp_path / 'foreign.pt'))


def test_accuracy_in_eval_mode_and_restores_mode():
    torch.manual_seed(0)
    model = models.build('cnn_b', 10, 1, width=0.125)
    with torch.no_grad():              # running statistics far from any batch's: in train mode
        for m in model.modules():      # (batch statistics) the predictions are another set
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(0.5)
                m.running_var.fill_(4.0)
    split = common.Split((torch.rand(40, 1, 32, 32) * 255).byte(), torch.randint(0, 10, (40,)))
    model.train()
    got = common.correct(model, split, batch_size=7)
    assert model.training                                          # mode restored
    x = split.x.float() / 255
    with torch.no_grad():
        eval_pred = model.eval()(x).argmax(1)
        train_pred = torch.cat([model.train()(x[i:i + 7]).argmax(1) for i in range(0, 40, 7)])
    assert not torch.equal(eval_pred, train_pred)                  # so the check below can fail
    assert torch.equal(got, eval_pred == split.y)
    assert common.accuracy(model, split, batch_size=7) == pytest.approx(100.0 * got.float().mean().item())


def test_cpu_models_and_batches_are_channels_last(data_dir):
    # the speed-up of README "Speed" is only real if the CPU path really uses channels_last
    model = common.prepare_model(models.build('cnn_b', 10, 3, width=0.25), 'cpu')
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    split = common.load_split('cifar10', str(data_dir), False, size=8)
    x, _ = next(common.batches(split, 4))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class _Template(torch.nn.Module):
    """A hand-built classifier of the synthetic images (conftest.synthetic_images: a bright square
    in the class's cell of a 4x4 grid on dim noise): logit c = scale * (mean of cell c + v_c . x).
    With v = 0 it is robust (the square's margin, about 0.7, exceeds 2 eps). ``blind`` drops one
    class (its images are always wrong: an honest, imperfect model). With a fragile direction v
    and a huge scale it is a masked model: the softmax is saturated at every clean image, so the
    cross-entropy has no gradient there and PGD from x does not move, while an eps-step along
    sign(v_other - v_y) flips every prediction."""
    arch_name, arch_kwargs = 'template', {}

    def __init__(self, side, scale=1.0, fragile=0.0, blind=None):
        super().__init__()
        cell = side // 4
        masks = torch.zeros(10, side, side)
        for c in range(10):
            r, k = divmod(c, 4)
            masks[c, r * cell:(r + 1) * cell, k * cell:(k + 1) * cell] = 1.0 / cell ** 2
        g = torch.Generator().manual_seed(0)
        self.register_buffer('w', masks.flatten(1) + fragile * torch.randn(10, side * side, generator=g).sign())
        self.scale, self.blind = scale, blind

    def forward(self, x):
        logits = self.scale * x.flatten(1) @ self.w.t()
        if self.blind is not None:
            logits[:, self.blind] = -1e9
        return logits


def test_best_pt_score_is_not_fooled_by_a_masked_model_where_the_training_pgd_is(tmp_path):
    from conftest import synthetic_images
    x, y = synthetic_images(300, 28, 1, 10, seed=5)
    val = common.make_split(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y))
    args = argparse.Namespace(eps=0.3, steps=10, step_size=0.05, amp=False)
    robust = _Template(28, blind=9)                        # honest: loses class 9, robust on the rest
    masked = _Template(28, scale=1e4, fragile=0.01)        # saturated softmax, fragile direction
    from attacks import pgd

    def train_pgd(m, xb, yb):                              # the training PGD: CE, from x
        return pgd(m, xb, yb, args.eps, args.steps, args.step_size)
    r = common.validation_metrics(robust, val, train_pgd, args)
    m = common.validation_metrics(masked, val, train_pgd, args)
    assert r['val_nat'] == r['val_adv'] == r['val_worst'] == pytest.approx(100 * (y != 9).mean())
    assert m['val_nat'] == m['val_adv'] == 100.0                # the training PGD is fooled...
    assert m['val_worst'] <= 5.0, m                             # ...the best.pt score is not
    # so a run that validates the robust epoch first and the masked one next keeps the robust one
    run_args = argparse.Namespace(out=str(tmp_path / 'r'), resume=False, overwrite=False, dataset='mnist',
                                  model='cnn_b', seed=8)
    run = common.Run(run_args, 'at')
    model = common.prepare_model(models.build('cnn_b', 10, 1, width=0.125), 'cpu')
    for epoch, metrics in ((1, r), (2, m)):
        run.save(model, epoch, {}, metrics, score=metrics['val_worst'])
    assert common.load_checkpoint(str(tmp_path / 'r' / 'best.pt'))['epoch'] == 1
    assert m['val_adv'] > r['val_adv']        # the former score, val_adv, would have kept epoch 2
    run.release()


def test_the_gpu_scripts_bench_reads_the_synthetic_cifar_files(data_dir):
    """tests/gpu_reproduce.sh times ResNet-18 rows through bench_overhead.py on synthetic CIFAR, in a
    process without this conftest: its own import must let them past torchvision's md5 check."""
    import subprocess
    import sys
    from conftest import ROOT
    code = ("import sys; sys.path[:0] = [sys.argv[1] + '/tests', sys.argv[1]]; import bench_overhead, common; "
            "print(len(common.read_split('cifar10', sys.argv[2], False)[1]))")
    proc = subprocess.run([sys.executable, '-c', code, str(ROOT), str(data_dir)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0 and proc.stdout.strip() == '64', proc.stderr[-2000:]
