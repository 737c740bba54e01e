"""AELF (Algorithm 1) and AELFs (Algorithm 2, Eq. (10))."""
import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

import common
import models
import train_aelf
import train_aelfs
import train_jt
from conftest import QUICK, read_log, run_ok, run_script


def tiny(seed=0, act='leakyrelu'):
    torch.manual_seed(seed)
    return models.build('cnn_b', 10, 1, width=0.125, act=act)


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


# ------------------------------------------------------------------------------- AELFs

def test_aelfs_loss_is_eq_10():
    model = tiny().train()
    x, y = batch()
    x_adv = (x + 0.1).clamp(0, 1)
    loss, logits, _, _ = train_aelfs.aelfs_loss(model, x[:8], x_adv[8:], y[:8], y[8:], 0.4, 0.6, 0.5, 0.3)
    f_all = model.features(torch.cat([x[:8], x_adv[8:]]))        # same BN batch statistics
    f, f_adv = f_all[:8], f_all[8:]
    expected = (0.4 * F.cross_entropy(model.fc(f), y[:8]) + 0.6 * F.cross_entropy(model.fc(f_adv), y[8:])
                + 0.5 * torch.linalg.vector_norm(f, dim=1).mean()
                + 0.3 * torch.linalg.vector_norm(f_adv, dim=1).mean())
    assert torch.allclose(loss, expected, atol=1e-5)
    assert logits.shape == (16, 10)
    # the beta term really is there: beta = 0 lowers the loss by exactly the norms
    loss0, _, _, _ = train_aelfs.aelfs_loss(model, x[:8], x_adv[8:], y[:8], y[8:], 0.4, 0.6, 0.0, 0.0)
    norms = 0.5 * f.norm(dim=1).mean() + 0.3 * f_adv.norm(dim=1).mean()
    assert torch.allclose(loss - loss0, norms, atol=1e-5)


@pytest.mark.parametrize('reading, expected', [
    ('l2', (5.0 + 0.0 + 2.0) / 3),                  # per-sample ||f||_2, batch mean
    ('l2sq', (25.0 + 0.0 + 4.0) / 3),               # ||f||_2^2
    ('rms', (5.0 / 2 + 0.0 + 2.0 / 2) / 3),         # ||f||_2 / sqrt(D), D = 4
    ('ms', (25.0 / 4 + 0.0 + 4.0 / 4) / 3),         # ||f||_2^2 / D
])
def test_feature_norm_readings_on_a_hand_made_embedding(reading, expected):
    f = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, -2.0, 0.0, 0.0]])
    assert train_aelfs.feature_norm(f, reading).item() == pytest.approx(expected)
    assert train_jt.feature_norm(f, reading).item() == pytest.approx(expected)     # JT*'s copy


def test_aelfs_loss_uses_the_chosen_reading_and_bn_batch():
    model = tiny().train()
    x, y = batch()
    x_adv = (x + 0.1).clamp(0, 1)
    loss0, _, _, _ = train_aelfs.aelfs_loss(model, x[:8], x_adv[8:], y[:8], y[8:], 0.5, 0.5, 0.0, 0.0)
    loss, _, f, f_adv = train_aelfs.aelfs_loss(model, x[:8], x_adv[8:], y[:8], y[8:], 0.5, 0.5,
                                               0.5, 0.5, reading='rms')
    rms = (f.norm(dim=1) / f.shape[1] ** 0.5).mean() + (f_adv.norm(dim=1) / f.shape[1] ** 0.5).mean()
    assert torch.allclose(loss - loss0, 0.5 * rms, atol=1e-5)
    # separate passes: each half gets its own BatchNorm batch statistics
    _, _, f_sep, _ = train_aelfs.aelfs_loss(model, x[:8], x_adv[8:], y[:8], y[8:], 0.5, 0.5, 0.5, 0.5,
                                            bn_batch='separate')
    assert torch.allclose(f_sep, model.features(x[:8]), atol=1e-5)
    assert not torch.allclose(f_sep, f, atol=1e-3)


def test_collapse_watch_fires_on_a_collapse_and_not_otherwise(capsys):
    healthy = common.CollapseWatch('mnist', 'try a smaller beta')
    logits = torch.eye(10)[torch.arange(20) % 10] * 5
    y = torch.arange(20) % 10
    healthy.step(torch.ones(20, 8) * 2, torch.ones(20, 8) * 2, logits, y)
    healthy.step(torch.ones(20, 8), torch.ones(20, 8), logits, y)        # ||f|| halves: fine
    record = healthy.end_epoch(0)
    assert not record['collapse_warning'] and 'WARNING' not in capsys.readouterr().out
    assert record['f_norm'] == pytest.approx(1.5 * 8 ** 0.5) and record['train_acc_nat'] == 100.0
    shrunk = common.CollapseWatch('mnist', 'try a smaller beta')
    shrunk.step(torch.ones(20, 8), torch.ones(20, 8), logits, y)
    for _ in range(30):
        shrunk.step(torch.ones(20, 8) * 0.01, torch.ones(20, 8) * 0.01, logits, y)
    assert shrunk.end_epoch(0)['collapse_warning']
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith('WARNING') and 'try a smaller beta' in out[0]
    chance = common.CollapseWatch('mnist', 'hint')
    chance.step(torch.ones(20, 8), torch.ones(20, 8), torch.zeros(20, 10), y)   # predicts class 0
    assert chance.end_epoch(0)['collapse_warning'] and 'near chance' in capsys.readouterr().out
    chance.step(torch.ones(20, 8), torch.ones(20, 8), torch.zeros(20, 10), y)
    assert chance.end_epoch(1)['collapse_warning']          # and in every later epoch
    # a collapse late in a short epoch (a real-MNIST case a 20-step window misses: ||f|| 6.7 -> 0.08 over
    # the last steps of a 16-step epoch while the 20-step average was still 0.11 of the start)
    late = common.CollapseWatch('mnist', 'hint')
    for norm in [6.7] + [2.0] * 14 + [1.0] * 10 + [0.08] * 5:
        late.step(torch.ones(20, 1) * norm, torch.ones(20, 1) * norm, logits, y)
    assert late.end_epoch(1)['collapse_warning'] and 'fell from 6.7 to 0.08' in capsys.readouterr().out


def test_aelfs_warns_on_a_forced_collapse_and_logs_norms(data_dir, tmp_path):
    quick = [*QUICK, '--train-size', '256', '--step-size', '0.01', '--batch-size', '16']
    run_ok('train_at.py', '--standard', '--data-dir', data_dir, '--out', tmp_path / 'st', *quick,
           '--epochs', '3')
    init = tmp_path / 'st' / 'last.pt'
    proc = run_ok('train_aelfs.py', '--data-dir', data_dir, '--out', tmp_path / 'big', '--init', init,
                  *quick, '--beta', '200')
    assert 'WARNING: the embeddings are collapsing' in proc.stdout, proc.stdout
    assert 'beta 200' in proc.stdout and "||f'||" in proc.stdout
    rec = read_log(tmp_path / 'big')[0]
    assert rec['collapse_warning'] and rec['f_norm'] >= 0 and 'f_adv_norm' in rec
    proc = run_ok('train_aelfs.py', '--data-dir', data_dir, '--out', tmp_path / 'default', '--init',
                  init, *quick)
    assert 'WARNING' not in proc.stdout, proc.stdout
    assert not read_log(tmp_path / 'default')[0]['collapse_warning']


def test_aelfs_trains_c_on_the_pgd_examples_of_each_batchs_second_half(data_dir, tmp_path, monkeypatch):
    # Where the real-MNIST robustness margin cannot reach (AELFs' PGD accuracy after the learning
    # tests' 78 steps ranges from ST's level to 17% between ST inits), the defect it guards is
    # checked exactly: each training step's x' is the training PGD's output on the second half of
    # that batch with its own labels, inside the eps ball and of higher loss than the clean half,
    # and x is the first half. Breaks: clean inputs passed as x', the halves or labels mixed up.
    steps = []
    real_batches, real_pgd, real_loss = common.batches, train_aelfs.pgd, train_aelfs.aelfs_loss

    def batches_(*args, **kw):
        for x, y in real_batches(*args, **kw):
            steps.append({'x': x.clone(), 'y': y.clone()})
            yield x, y

    def pgd_(m, x, y, *args, **kw):
        training = m.training                       # the training attack, not the evaluations'
        out = real_pgd(m, x, y, *args, **kw)
        if training:
            m.eval()
            with torch.no_grad():
                gain = (F.cross_entropy(m(out), y) - F.cross_entropy(m(x), y)).item()
            m.train()
            steps[-1].update(pgd_x=x.clone(), pgd_y=y.clone(), pgd_out=out.clone(), gain=gain)
        return out

    def loss_(model, x_nat, x_adv, y_nat, y_adv, *args, **kw):
        steps[-1].update(x_nat=x_nat.clone(), x_adv=x_adv.clone(), y_nat=y_nat.clone(), y_adv=y_adv.clone())
        return real_loss(model, x_nat, x_adv, y_nat, y_adv, *args, **kw)
    monkeypatch.setattr(common, 'batches', batches_)
    monkeypatch.setattr(train_aelfs, 'pgd', pgd_)
    monkeypatch.setattr(train_aelfs, 'aelfs_loss', loss_)
    run_ok('train_aelfs.py', '--data-dir', data_dir, '--out', tmp_path / 'a', '--st-epochs', '1',
           *QUICK, '--val-size', '0')
    steps = [s for s in steps if 'x_adv' in s]
    assert len(steps) == 2, len(steps)                     # 64 images, batch 32
    for s in steps:
        half = len(s['y']) // 2
        assert torch.equal(s['x_nat'], s['x'][:half]) and torch.equal(s['y_nat'], s['y'][:half])
        assert torch.equal(s['pgd_x'], s['x'][half:]) and torch.equal(s['pgd_y'], s['y'][half:])
        assert torch.equal(s['x_adv'], s['pgd_out']) and torch.equal(s['y_adv'], s['y'][half:])
        assert not torch.equal(s['x_adv'], s['pgd_x']) and (s['x_adv'] - s['pgd_x']).abs().max() <= 0.3 + 1e-6
        assert s['gain'] > 0


def fc_of(path):
    sd = common.load_checkpoint(str(path))['state_dict']
    return sd['fc.weight'], sd['fc.bias']


def test_aelfs_in_script_st_phase_then_frozen_w(data_dir, tmp_path):
    out = tmp_path / 'aelfs'
    proc = run_ok('train_aelfs.py', '--data-dir', data_dir, '--out', out, '--st-epochs', '1',
                  *QUICK, '--epochs', '2')
    assert 'ST phase' in proc.stdout and (out / 'st.pt').exists()
    assert 'last.pt (epoch 2): test nat' in proc.stdout.splitlines()[-1]
    st_w, st_b = fc_of(out / 'st.pt')
    for name in ('last.pt', 'best.pt'):
        w, b = fc_of(out / name)
        assert torch.equal(w, st_w) and torch.equal(b, st_b)     # bit-identical w
    # c did change
    st_sd = common.load_checkpoint(str(out / 'st.pt'))['state_dict']
    last_sd = common.load_checkpoint(str(out / 'last.pt'))['state_dict']
    assert not torch.equal(st_sd['stages.0.0.weight'], last_sd['stages.0.0.weight'])
    assert common.load_checkpoint(str(out / 'last.pt'))['model_kwargs']['act'] == 'leakyrelu'
    # a later run in a folder that holds st.pt reuses it (no second ST phase, the same w)
    (tmp_path / 'reuse').mkdir()
    shutil.copy(out / 'st.pt', tmp_path / 'reuse' / 'st.pt')
    proc = run_ok('train_aelfs.py', '--data-dir', data_dir, '--out', tmp_path / 'reuse', *QUICK)
    assert 'using the ST phase saved in' in proc.stdout and 'ST phase:' not in proc.stdout
    assert torch.equal(fc_of(tmp_path / 'reuse' / 'last.pt')[0], st_w)
    # so does --init, from anywhere; --overwrite redoes the ST phase
    proc = run_ok('train_aelfs.py', '--data-dir', data_dir, '--out', tmp_path / 'again',
                  '--init', out / 'st.pt', *QUICK)
    assert 'ST phase' not in proc.stdout
    w, b = fc_of(tmp_path / 'again' / 'last.pt')
    assert torch.equal(w, st_w)
    proc = run_ok('train_aelfs.py', '--data-dir', data_dir, '--out', out, '--overwrite', *QUICK)
    assert 'ST phase:' in proc.stdout
    run_ok('eval.py', '--ckpt', out / 'last.pt', tmp_path / 'again' / 'best.pt', '--data-dir', data_dir,
           '--test-size', '16', '--device', 'cpu')


def test_aelfs_init_from_st_checkpoint_and_mismatch(data_dir, tmp_path):
    run_ok('train_at.py', '--standard', '--data-dir', data_dir, '--out', tmp_path / 'st', *QUICK)
    init = tmp_path / 'st' / 'last.pt'
    proc = run_ok('train_aelfs.py', '--data-dir', data_dir, '--out', tmp_path / 'a', '--init', init,
                  *QUICK, '--split', 'full')
    assert 'ST phase' not in proc.stdout and not (tmp_path / 'a' / 'st.pt').exists()
    assert torch.equal(fc_of(tmp_path / 'a' / 'last.pt')[0], fc_of(init)[0])
    assert len(read_log(tmp_path / 'a')) == 1
    proc = run_script('train_aelfs.py', '--data-dir', data_dir, '--out', tmp_path / 'b', '--init', init,
                      *QUICK, '--width', '0.25')
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr
    assert 'holds cnn_b' in proc.stderr.strip().splitlines()[-1]


def test_aelfs_defaults_follow_the_paper():
    a = train_aelfs.parse_args([])
    assert (a.model, a.act, a.image_size, a.epochs, a.milestones) == ('cnn_b', 'leakyrelu', 32, 50, [20, 40])
    assert (a.eps, a.steps, a.step_size, a.random_start) == (0.3, 16, 0.02, False)
    assert (a.lambda1, a.lambda2, a.split) == (0.5, 0.5, 'half')
    # Eq. (10)'s own norm; beta below the paper's 0.5, which collapses cnn_b (the README's sweep)
    assert (a.feature_norm, a.beta, a.beta_adv, a.bn_batch) == ('l2', 0.1, 0.1, 'mixed')
    assert (a.st_epochs, a.st_milestones, a.batch_size, a.seed) == (50, [20, 40], 128, 8)
    c = train_aelfs.parse_args(['--dataset', 'cifar100'])
    assert (c.model, c.beta, c.feature_norm, c.st_epochs, c.epochs) == ('wrn', 0.2, 'l2', 100, 160)
    assert c.act == 'leakyrelu'


@pytest.mark.parametrize('beta, reading, model, words', [
    (0.1, 'l2', 'cnn_b', ['beta 0.1 on ||f||_2', 'paper: 0.5 on ||f||_2, which collapses this model']),
    (0.5, 'l2', 'cnn_b', ["beta 0.5 on ||f||_2 (the paper's value for cnn_b)"]),
    (0.2, 'l2', 'wrn', ["the paper's value for wrn; untested here"]),
    (0.5, 'rms', 'cnn_b', ['beta 0.5 on ||f||_2 / sqrt(D) = beta 0.0221 on ||f||_2 (D = 512)', 'paper: 0.5']),
    (0.5, 'ms', 'cnn_b', ["not the paper's ||f||_2", 'paper: 0.5'])])
def test_beta_is_told_in_the_papers_units(beta, reading, model, words):
    text = train_aelfs.beta_in_paper_units(beta, reading, 512, model)
    assert all(w in text for w in words), text


def test_zero_flag_start_up_line_names_the_papers_beta(data_dir, tmp_path):
    proc = run_ok('train_aelfs.py', '--data-dir', data_dir, '--out', tmp_path / 'a', '--st-epochs', '1',
                  *QUICK, '--lr', '1e-30')
    line = next(l for l in proc.stdout.splitlines() if l.startswith('AELFs on'))
    assert 'beta 0.1 on ||f||_2 (paper: 0.5 on ||f||_2, which collapses this model' in line, line


# -------------------------------------------------------------------------------- AELF

def sgd_step(p, g, lr, wd):
    """First SGD step with momentum from a zero buffer: p - lr * (g + wd * p)."""
    return p - lr * (g + wd * p)


def make_opts(model, lr=0.1, wd=5e-4):
    w = list(model.fc.parameters())
    c = [p for n, p in model.named_parameters() if not n.startswith('fc.')]
    kw = dict(lr=lr, momentum=0.9, weight_decay=wd)
    return torch.optim.SGD(c, **kw), torch.optim.SGD(w, **kw)


def test_aelf_step_update_order_and_stop_gradient():
    model = tiny().train()
    ref = copy.deepcopy(model)
    x, y = batch()
    x_adv = (x + 0.2 * torch.rand_like(x)).clamp(0, 1)
    fc_inputs = []
    model.fc.register_forward_hook(lambda m, inp, out: fc_inputs.append(inp[0].shape[0]))
    opt_c, opt_w = make_opts(model)
    lam = 2.0
    train_aelf.aelf_step(model, opt_c, opt_w, x, x_adv, y, lam, 'l2')
    assert fc_inputs == [16]          # w sees the clean batch only, never x'

    # expected, by hand on a copy: w moves with dL1/dw only (line 6)
    f = ref.features(x)
    loss1 = F.cross_entropy(ref.fc(f), y)
    c_params = [p for n, p in ref.named_parameters() if not n.startswith('fc.')]
    g_w = torch.autograd.grad(loss1, list(ref.fc.parameters()), retain_graph=True)
    g1_c = torch.autograd.grad(loss1, c_params, retain_graph=True)
    for p, g, new in zip(ref.fc.parameters(), g_w, model.fc.parameters()):
        assert torch.allclose(new, sgd_step(p, g, 0.1, 5e-4), atol=1e-6)
    # c moves with d(L1 + lam * L2)/dc, the target f detached (line 8-9)
    f_adv = ref.features(x_adv)
    loss2 = (f_adv - f.detach()).norm(dim=1).mean()
    g2_c = torch.autograd.grad(loss2, c_params, retain_graph=True)
    new_c = [p for n, p in model.named_parameters() if not n.startswith('fc.')]
    for p, a, b, new in zip(c_params, g1_c, g2_c, new_c):
        assert torch.allclose(new, sgd_step(p, a + lam * b, 0.1, 5e-4), atol=1e-5)
    # the L2 term is really in c's gradient: without it the update differs
    assert any(not torch.allclose(new, sgd_step(p, a, 0.1, 5e-4), atol=1e-5)
               for p, a, new in zip(c_params, g1_c, new_c))
    # and a non-detached target would give another update (so the check above can fail)
    loss2_both = (f_adv - f).norm(dim=1).mean()
    g2_both = torch.autograd.grad(loss2_both, c_params, retain_graph=True)
    assert any(not torch.allclose(new, sgd_step(p, a + lam * b, 0.1, 5e-4), atol=1e-5)
               for p, a, b, new in zip(c_params, g1_c, g2_both, new_c))
    # the gradient of L2 with respect to f is zero: the target is a constant
    assert torch.autograd.grad(loss2, f, allow_unused=True)[0] is None


@pytest.mark.parametrize('kind', ['l2', 'l1', 'mse'])
def test_aelf_distances(kind):
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    got = train_aelf.embedding_distance(a, b, kind)
    d = a - b
    want = {'l2': d.norm(dim=1).mean(), 'l1': d.abs().sum(1).mean(), 'mse': (d ** 2).mean()}[kind]
    assert torch.allclose(got, want)


def test_aelf_end_to_end_and_resume(data_dir, tmp_path):
    out = tmp_path / 'aelf'
    run_ok('train_aelf.py', '--data-dir', data_dir, '--out', out, *QUICK, '--distance', 'l1')
    rec = read_log(out)[0]
    assert 'train_dist' in rec and rec['val_images'] == 16
    ckpt = common.load_checkpoint(str(out / 'last.pt'))
    assert set(ckpt['optimizer']) == {'c', 'w'} and ckpt['script'] == 'aelf'
    run_ok('train_aelf.py', '--data-dir', data_dir, '--out', out, *QUICK[:-2], '--epochs', '2', '--resume',
           '--device', 'cpu')
    assert len(read_log(out)) == 2
    run_ok('eval.py', '--ckpt', out / 'last.pt', '--data-dir', data_dir, '--test-size', '16')
