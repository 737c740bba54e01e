"""AT-id / AT-att / AT-att-id (attention + implicit denoising) and the eval.py pieces it brings."""
import json

import pytest
import torch
import torch.nn.functional as F

import models
import train_att_id
from conftest import QUICK, read_log, run_ok, run_script


def att_model(seed=0, blocks=1):
    torch.manual_seed(seed)
    return models.build('att_resnet', 10, 3, blocks=blocks)


def test_attention_weights_are_a_distribution_with_map_shapes():
    model = att_model().eval()
    x = torch.rand(4, 3, 32, 32)
    f, maps = model.features_and_maps(x)
    assert f.shape == (4, 32 + 64) and model.fc.in_features == 96
    assert [a.shape for a in maps] == [(4, 16, 16), (4, 8, 8)]   # the block-3 / block-4 maps
    for a in maps:
        assert (a >= 0).all()
        assert torch.allclose(a.flatten(1).sum(1), torch.ones(4), atol=1e-5)
    assert torch.allclose(model(x), model.fc(f), atol=1e-6)
    plain = models.build('cifar_resnet', 10, 3, blocks=1)
    assert plain.features(x).shape == (4, 64)


def test_attended_feature_is_the_weighted_sum_on_a_hand_made_input():
    pool = models.AttentionPool(local_channels=2, global_dim=3, hidden=4)
    local = torch.arange(2 * 2 * 3, dtype=torch.float).view(1, 2, 2, 3)   # C=2, H=2, W=3
    g = torch.tensor([[1.0, -1.0, 0.5]])
    h, a = pool(local, g)
    # the scores by hand: MLP on [l_n ; g] for each location n (Eq. (3))
    w1 = torch.cat([pool.local.weight[:, :, 0, 0], pool.glob.weight], dim=1)   # hidden x (C + D)
    scores = []
    for i in range(2):
        for j in range(3):
            z = torch.cat([local[0, :, i, j], g[0]])
            hid = F.relu(w1 @ z + pool.local.bias)
            scores.append(pool.score.weight[0, :, 0, 0] @ hid + pool.score.bias[0])
    weights = torch.softmax(torch.stack(scores), 0)                          # Eq. (4)
    assert torch.allclose(a.flatten(), weights, atol=1e-6)
    expected_h = (local[0].flatten(1) * weights).sum(1)                       # Eq. (5)
    assert torch.allclose(h[0], expected_h, atol=1e-5)


def test_id_loss_is_eq_7_and_reaches_both_branches():
    model = att_model().train()
    x = torch.rand(6, 3, 32, 32)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    y = torch.randint(0, 10, (6,))
    loss, logits = train_att_id.att_id_loss(model, x, x_adv, y, 0.1)
    g, g_adv = model.features(x), model.features(x_adv)
    expected = F.cross_entropy(model.fc(g_adv), y) + 0.1 * (g - g_adv).norm(dim=1).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    # and not the other readings of Eq. (7): squared, or the norm of the whole batch's difference
    ce = F.cross_entropy(model.fc(g_adv), y)
    for other in (ce + 0.1 * (g - g_adv).pow(2).sum(1).mean(), ce + 0.1 * (g - g_adv).norm()):
        assert not torch.allclose(loss, other, atol=1e-3), (loss, other)
    # gradient reaches the clean and the adversarial branch: d loss / d x and d loss / d x'
    xc, xa = x.clone().requires_grad_(True), x_adv.clone().requires_grad_(True)
    loss, _ = train_att_id.att_id_loss(model, xc, xa, y, 0.1)
    gc, ga = torch.autograd.grad(loss, [xc, xa])
    assert gc.abs().sum() > 0 and ga.abs().sum() > 0
    # with lambda = 0 (AT-att) the clean branch plays no part
    xc = x.clone().requires_grad_(True)
    loss0, _ = train_att_id.att_id_loss(model, xc, x_adv, y, 0.0)
    assert torch.allclose(loss0, F.cross_entropy(model(x_adv), y), atol=1e-5)


def test_defaults_follow_the_paper():
    m = train_att_id.parse_args([])
    assert (m.model, m.image_size, m.eps, m.steps, m.step_size, m.random_start, m.lam) == \
        ('madry_cnn', 28, 0.3, 40, 0.01, True, 0.01)
    # Sec. 4.1: "The settings are the same as in Madry et al. (2017)": Adam 1e-4, batch 50,
    # 100,000 iterations (84 epochs of 1,200), no weight decay, no schedule
    assert (m.optimizer, m.lr, m.batch_size, m.epochs, m.milestones, m.weight_decay) == \
        ('adam', 1e-4, 50, 84, [], 0.0)
    assert m.epochs * (60000 // m.batch_size) >= 100_000 > (m.epochs - 1) * (60000 // m.batch_size)
    c = train_att_id.parse_args(['--dataset', 'cifar10', '--mode', 'att-id'])
    assert (c.model, c.steps, c.lam) == ('att_resnet', 5, 0.01)
    # CIFAR-10: Madry et al.'s CIFAR-10 training (80,000 iterations of 128, steps at 40k, 60k)
    assert (c.optimizer, c.lr, c.momentum, c.weight_decay, c.batch_size) == ('sgd', 0.1, 0.9, 2e-4, 128)
    assert (c.epochs, c.milestones) == (205, [102, 154])
    assert train_att_id.parse_args(['--optimizer', 'sgd', '--lr', '0.01']).optimizer == 'sgd'
    # choosing the other optimiser brings its own lr and weight decay, not Adam's 1e-4
    s = train_att_id.parse_args(['--optimizer', 'sgd'])
    assert (s.lr, s.momentum, s.weight_decay, s.batch_size) == (0.1, 0.9, 5e-4, 50)
    a = train_att_id.parse_args(['--dataset', 'cifar10', '--optimizer', 'adam'])
    assert (a.lr, a.weight_decay) == (1e-4, 0.0)
    assert abs(c.eps - 8 / 255) < 1e-9 and abs(c.step_size - 2 / 255) < 1e-9
    assert train_att_id.parse_args(['--dataset', 'cifar10']).lam == 0.1
    assert train_att_id.parse_args(['--dataset', 'cifar10']).model == 'cifar_resnet'
    assert train_att_id.parse_args(['--dataset', 'cifar10', '--mode', 'att']).lam == 0.0
    proc = run_script('train_att_id.py', '--mode', 'att')
    assert proc.returncode != 0 and 'no attention on MNIST' in proc.stderr


CIFAR_QUICK = ['--blocks', '1', '--steps', '2', '--epochs', '1', '--batch-size', '32',
               '--train-size', '64', '--test-size', '32', '--val-size', '16', '--device', 'cpu']


def test_each_mode_end_to_end_and_eval_pictures_and_transfer(data_dir, tmp_path):
    outs = {}
    for mode in ('id', 'att', 'att-id'):
        outs[mode] = tmp_path / mode
        run_ok('train_att_id.py', '--dataset', 'cifar10', '--mode', mode, '--data-dir', data_dir,
               '--out', outs[mode], *CIFAR_QUICK)
    run_ok('train_att_id.py', '--data-dir', data_dir, '--out', tmp_path / 'mnist',
           *QUICK[2:], '--steps', '2')                      # madry_cnn on MNIST, AT-id
    run_ok('train_att_id.py', '--dataset', 'cifar10', '--mode', 'att-id', '--data-dir', data_dir,
           '--out', tmp_path / 'copy', *CIFAR_QUICK, '--seed', '9')   # independently trained copy
    png, js = tmp_path / 'att.png', tmp_path / 'e.json'
    proc = run_ok('eval.py', '--ckpt', outs['att-id'] / 'last.pt', outs['att'] / 'last.pt',
                  outs['id'] / 'last.pt', '--data-dir', data_dir, '--test-size', '16',
                  '--attention-maps', png, '--n-images', '4', '--transfer-from', tmp_path / 'copy' / 'last.pt',
                  '--json', js)
    assert 'transfer' in proc.stdout and 'no attention module' in proc.stderr
    rows = json.loads(js.read_text())['rows']
    assert all('transfer_acc' in r for r in rows)
    from test_eval_analyses import check_picture
    # 2 attention checkpoints x 3 rows (inputs, block 3, block 4) of 4 images
    check_picture(png, proc.stderr, '6 rows x 4 images')
    proc = run_script('eval.py', '--ckpt', tmp_path / 'mnist' / 'last.pt', '--data-dir', data_dir,
                      '--test-size', '8', '--attention-maps', tmp_path / 'none.png')
    assert proc.returncode != 0 and 'none of the checkpoints has an attention module' in proc.stderr
    proc = run_script('eval.py', '--ckpt', tmp_path / 'mnist' / 'last.pt', '--data-dir', data_dir,
                      '--test-size', '8', '--transfer-from', outs['id'] / 'last.pt')
    assert proc.returncode != 0 and 'other data' in proc.stderr and 'Traceback' not in proc.stderr
