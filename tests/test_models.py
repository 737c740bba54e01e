import copy

import pytest
import torch

import models


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize('name,kw,shape,dim', [
    ('cnn_b', {}, (2, 1, 32, 32), 512),
    ('cnn_b', {'width': 0.25, 'act': 'relu'}, (2, 3, 32, 32), 128),
    ('madry_cnn', {}, (2, 1, 28, 28), 1024),
    ('resnet18', {'width': 0.125}, (2, 3, 32, 32), 64),
    ('wrn', {'depth': 10, 'widen_factor': 1, 'dropout': 0.2, 'act': 'leakyrelu'}, (2, 3, 32, 32), 64),
])
def test_forward_is_fc_of_features(name, kw, shape, dim):
    torch.manual_seed(0)
    model = models.build(name, 10, shape[1], **kw).eval()
    x = torch.rand(shape)
    f = model.features(x)
    assert f.shape == (2, dim)
    assert model.fc.in_features == dim
    assert torch.allclose(model(x), model.fc(f), atol=1e-6)
    assert model(x).shape == (2, 10)


def test_cnn_b_matches_aelf_table_1():
    m = models.build('cnn_b', 10, 1)
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 256, 512]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules()) == 5
    assert sum(isinstance(mod, torch.nn.LeakyReLU) for mod in m.modules()) == 5
    pools = [mod.kernel_size for mod in m.modules() if isinstance(mod, torch.nn.AvgPool2d)]
    assert pools == [2, 2, 2]
    # 32x32 input: after the three 2x2 pools conv 5's maps are 4x4; the final 4x4 average pool
    # is the model's global pool (m.pool), so feature_maps gives conv 5's 4x4 maps
    assert m.feature_maps(torch.rand(1, 1, 32, 32)).shape == (1, 512, 4, 4)
    assert isinstance(m.pool[0], torch.nn.AdaptiveAvgPool2d)
    assert (m.fc.in_features, m.fc.out_features) == (512, 10)
    conv_weights = 9 * (1 * 64 + 64 * 64 + 64 * 128 + 128 * 256 + 256 * 512)
    assert n_params(m) == conv_weights + 2 * (64 + 64 + 128 + 256 + 512) + 512 * 10 + 10


def test_parameter_counts_are_the_known_ones():
    assert n_params(models.build('madry_cnn', 10, 1)) == 3_274_634
    assert abs(n_params(models.build('resnet18', 10, 3)) - 11.17e6) < 0.01e6
    assert abs(n_params(models.build('wrn', 10, 3, depth=34, widen_factor=10)) - 46.16e6) < 0.01e6
    assert abs(n_params(models.build('wrn', 10, 3, depth=28, widen_factor=10)) - 36.48e6) < 0.01e6


def test_build_records_how_to_rebuild():
    m = models.build('cnn_b', 10, 1, width=0.5, act='relu')
    assert m.arch_name == 'cnn_b'
    m2 = models.build(m.arch_name, **m.arch_kwargs)
    m2.load_state_dict(m.state_dict())
    with pytest.raises(ValueError):
        models.build('vgg', 10, 3)


@pytest.mark.parametrize('name,kw,shape', [
    ('cnn_b', {'width': 0.25}, (4, 1, 32, 32)),
    ('cnn_b', {'width': 0.25, 'ase_layer': 4}, (4, 1, 32, 32)),
    ('madry_cnn', {}, (4, 1, 28, 28)),
    ('resnet18', {'width': 0.125}, (4, 3, 32, 32)),
    ('att_resnet', {'blocks': 1}, (4, 3, 32, 32)),
])
def test_channels_last_gives_the_same_outputs_and_gradients(name, kw, shape):
    # common.prepare_model puts models (and common.batches the inputs) in channels_last on
    # CPU too: that must change nothing a model computes, only how fast.
    torch.manual_seed(0)
    model = models.build(name, 10, shape[1], **kw).eval()
    fast = models.build(name, 10, shape[1], **kw).eval()
    fast.load_state_dict(model.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    x = torch.rand(shape)
    y = torch.arange(shape[0]) % 10
    outs, grads = [], []
    for m, xin in ((model, x.clone()), (fast, x.clone().contiguous(memory_format=torch.channels_last))):
        xin.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(m(xin), y)
        loss.backward()
        outs.append(m(xin).detach())
        grads.append((xin.grad, [p.grad for p in m.parameters()]))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        assert (g0 is None) == (g1 is None)   # e.g. the ASE logits' bias, unused at inference
        assert g0 is None or torch.allclose(g0, g1, rtol=1e-4, atol=1e-5)


def old_cnn_b_layout(model):
    """The cnn_b layout before the final 4x4 pool became the global pool: it sat at the end of
    stage 5, followed by the adaptive global pool over a 1x1 map."""
    old = copy.deepcopy(model)
    old.stages[-1] = torch.nn.Sequential(*old.stages[-1], torch.nn.AvgPool2d(4))
    return old


@pytest.mark.parametrize('kw', [{}, {'ase_layer': 4}, {'ase_layer': 5}])
def test_cnn_b_old_state_dicts_load_with_identical_outputs(kw):
    torch.manual_seed(0)
    new = models.build('cnn_b', 10, 1, width=0.25, **kw).eval()
    old = old_cnn_b_layout(new)
    # the checkpoint layout: these keys, in this order, whatever the pool's place (a renamed or
    # re-nested module would make old checkpoints unreadable)
    keys = [f'stages.{i}.{j}.{p}' for i in range(5) for j, p in
            [(0, 'weight'), (1, 'weight'), (1, 'bias'), (1, 'running_mean'), (1, 'running_var'),
             (1, 'num_batches_tracked')]]
    ase = [] if not kw else ['ase.fc.weight', 'ase.fc.bias']
    assert list(new.state_dict()) == keys + ['fc.weight', 'fc.bias'] + ase
    assert list(old.state_dict()) == list(new.state_dict())      # same keys, same shapes
    fresh = models.build('cnn_b', 10, 1, width=0.25, **kw).eval()
    fresh.load_state_dict(old.state_dict())                      # an old checkpoint loads
    x = torch.rand(8, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fresh(x), old(x), atol=1e-5)
        assert torch.allclose(fresh.features(x), old.features(x), atol=1e-6)
    for m in (fresh, old):
        m.train()
    assert torch.allclose(fresh(x), old(x), atol=1e-5)             # BatchNorm batch statistics too


def test_cnn_b_ase_after_conv_5_sees_its_4x4_maps():
    model = models.build('cnn_b', 10, 1, width=0.25, ase_layer=5).eval()
    seen = []
    model.ase.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    model(torch.rand(2, 1, 32, 32))
    assert seen == [(2, 128, 4, 4)]
    assert model.cam_maps(torch.rand(2, 1, 32, 32)).shape == (2, 128, 4, 4)
