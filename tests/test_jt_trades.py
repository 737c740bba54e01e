"""JT / JT* (AELF Eq. (4), Table 3) and TRADES (AELF Eq. (5))."""
import copy

import torch
import torch.nn.functional as F

import common
import models
import train_jt
import train_trades
from attacks import pgd
from conftest import QUICK, read_log, run_ok


def batch(n=16, seed=1, side=28):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, side, side, generator=g), torch.randint(0, 10, (n,), generator=g)


def attack(m, x, y):
    return pgd(m, x, y, 0.3, 3, 0.1)


# ---------------------------------------------------------------------------------- JT

def test_jt_with_lambda2_zero_is_st_on_the_natural_half():
    torch.manual_seed(0)
    model = models.build('madry_cnn', 10, 1).train()      # no BatchNorm: halves are independent
    x, y = batch()
    x_nat, y_nat, x_adv, y_adv = train_jt.jt_batch(model, x, y, 'half', attack)
    assert torch.equal(x_nat, x[:8]) and torch.equal(y_adv, y[8:])
    loss, _, _ = train_jt.jt_loss(model, x_nat, x_adv, y_nat, y_adv, 1.0, 0.0, 0.0)
    st_loss = F.cross_entropy(model(x[:8]), y[:8])
    assert torch.allclose(loss, st_loss, atol=1e-6)
    g_jt = torch.autograd.grad(loss, list(model.parameters()))
    g_st = torch.autograd.grad(st_loss, list(model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_jt, g_st))


def test_jt_adversarial_half_is_adversarial():
    torch.manual_seed(0)
    model = models.build('cnn_b', 10, 1, width=0.125).train()
    x, y = batch(side=32)
    _, _, x_adv, _ = train_jt.jt_batch(model, x, y, 'half', attack)
    assert x_adv.shape == x[8:].shape and not torch.equal(x_adv, x[8:])
    assert (x_adv - x[8:]).abs().max() <= 0.3 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    # exactly the PGD examples of the second half with its own labels (not other labels, not
    # noise), and they raise the loss
    assert torch.equal(x_adv, attack(model, x[8:], y[8:]))
    assert not torch.equal(x_adv, attack(model, x[8:], y[:8]))
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y[8:]) > F.cross_entropy(model(x[8:]), y[8:])
    model.train()
    x_nat, _, x_adv_full, _ = train_jt.jt_batch(model, x, y, 'full', attack)
    assert torch.equal(x_nat, x) and x_adv_full.shape == x.shape
    assert model.training


def test_jt_beta_term_adds_exactly_beta_times_mean_norms():
    torch.manual_seed(0)
    model = models.build('cnn_b', 10, 1, width=0.125).train()
    x, y = batch(side=32)
    xa = (x + 0.1).clamp(0, 1)
    l0, _, _ = train_jt.jt_loss(model, x[:8], xa[8:], y[:8], y[8:], 0.5, 0.5, 0.0)
    l1, _, _ = train_jt.jt_loss(model, x[:8], xa[8:], y[:8], y[8:], 0.5, 0.5, 0.7)
    f = model.features(torch.cat([x[:8], xa[8:]]))
    expected = 0.7 * (f[:8].norm(dim=1).mean() + f[8:].norm(dim=1).mean())
    assert torch.allclose(l1 - l0, expected, atol=1e-5)


def test_jt_loss_is_eq_4_with_any_lambdas_and_the_jtstar_term_in_each_reading():
    torch.manual_seed(0)
    model = models.build('cnn_b', 10, 1, width=0.125).train()
    x, y = batch(side=32)
    xa = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    for reading in ('l2', 'rms', 'l2sq', 'ms'):
        loss, logits, _ = train_jt.jt_loss(model, x[:8], xa[8:], y[:8], y[8:], 0.3, 0.7, 0.2, reading)
        f = model.features(torch.cat([x[:8], xa[8:]]))          # one pass: shared BN statistics
        sq = f.pow(2).sum(1)
        norm = {'l2': sq.sqrt(), 'rms': (sq / f.shape[1]).sqrt(), 'l2sq': sq, 'ms': sq / f.shape[1]}[reading]
        expected = (0.3 * F.cross_entropy(model.fc(f[:8]), y[:8]) + 0.7 * F.cross_entropy(model.fc(f[8:]), y[8:])
                    + 0.2 * (norm[:8].mean() + norm[8:].mean()))
        assert torch.allclose(loss, expected, atol=1e-5), reading
        assert torch.allclose(logits, model.fc(f), atol=1e-5)


def params_of(path):
    sd = common.load_checkpoint(str(path))['state_dict']
    return {k: v for k, v in sd.items() if k.endswith('weight') or k.endswith('bias')}


def test_jt_and_jtstar_defaults():
    # JT: no norm term; JT* (--init): AELFs' default, Eq. (10)'s own norm at beta 0.1 (0.2 for wrn)
    assert (train_jt.parse_args([]).beta, train_jt.parse_args([]).feature_norm) == (0.0, 'l2')
    assert train_jt.parse_args(['--init', 'st.pt']).beta == 0.1
    assert train_jt.parse_args(['--init', 'st.pt', '--dataset', 'cifar100']).beta == 0.2
    assert train_jt.parse_args(['--init', 'st.pt', '--beta', '0']).beta == 0.0


def test_jt_end_to_end_and_jtstar_init(data_dir, tmp_path):
    run_ok('train_jt.py', '--data-dir', data_dir, '--out', tmp_path / 'jt', *QUICK, '--split', 'full')
    assert len(read_log(tmp_path / 'jt')) == 1
    run_ok('train_at.py', '--standard', '--data-dir', data_dir, '--out', tmp_path / 'st', *QUICK)
    init = tmp_path / 'st' / 'last.pt'
    # JT* with a vanishing lr: the weights it ends with are the ST checkpoint's
    run_ok('train_jt.py', '--data-dir', data_dir, '--out', tmp_path / 'jts0', '--init', init,
           '--beta', '0.5', *QUICK, '--lr', '1e-30')
    st, jts0 = params_of(init), params_of(tmp_path / 'jts0' / 'last.pt')
    assert all(torch.equal(st[k], jts0[k]) for k in st)
    fresh = params_of(tmp_path / 'jt' / 'last.pt')
    assert not all(torch.equal(st[k], fresh[k]) for k in st)
    # JT* (--init, beta by default AELFs' 0.1 on ||f||_2, said in the paper's units) updates every
    # parameter, w included (unlike AELFs)
    proc = run_ok('train_jt.py', '--data-dir', data_dir, '--out', tmp_path / 'jts', '--init', init, *QUICK)
    assert 'beta 0.1 on ||f||_2 (paper, cnn_b: 0.5)' in proc.stdout.splitlines()[0], proc.stdout
    jts = params_of(tmp_path / 'jts' / 'last.pt')
    assert not torch.equal(jts['fc.weight'], st['fc.weight'])
    ckpt = common.load_checkpoint(str(tmp_path / 'jts' / 'last.pt'))
    assert ckpt['script'] == 'jtstar' and ckpt['init'] == str(init)
    # JT* shares AELFs' penalty, so its log has the norms and the collapse guard; JT has neither
    assert {'f_norm', 'f_adv_norm', 'collapse_warning'} <= set(read_log(tmp_path / 'jts')[0])
    assert 'f_norm' not in read_log(tmp_path / 'jt')[0]
    proc = run_ok('train_jt.py', '--data-dir', data_dir, '--out', tmp_path / 'jts-big', '--init', init,
                  '--beta', '200', *QUICK, '--batch-size', '16', '--train-size', '256')
    assert 'WARNING: the embeddings are collapsing' in proc.stdout, proc.stdout
    run_ok('eval.py', '--ckpt', tmp_path / 'jts' / 'last.pt', tmp_path / 'jt' / 'best.pt',
           '--data-dir', data_dir, '--test-size', '16')


# ------------------------------------------------------------------------------ TRADES

def tiny_trained():
    from test_attacks import trained_model
    return trained_model()


def test_trades_kl_is_zero_when_x_adv_is_x():
    model, x, y = tiny_trained()
    model.train()
    loss, logits = train_trades.trades_loss(model, x, x, y, beta=6.0)
    assert torch.allclose(loss, F.cross_entropy(model(x), y), atol=1e-6)


def test_trades_attack_increases_kl_and_stays_in_ball():
    model, x, y = tiny_trained()
    model.eval()
    torch.manual_seed(0)
    x_adv = train_trades.trades_attack(model, x, y, 0.1, 10, 0.02, 0.001)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        clean = model(x)
        kl_start = train_trades.kl_clean_adv(clean, model((x + 0.001 * torch.randn_like(x)).clamp(0, 1)))
        kl_adv = train_trades.kl_clean_adv(clean, model(x_adv))
    assert kl_adv > 10 * kl_start and kl_adv > 0.05


def test_trades_loss_matches_direct_computation():
    model, x, y = tiny_trained()
    model.train()
    x_adv = (x + 0.05 * torch.sign(torch.randn_like(x))).clamp(0, 1)
    loss, _ = train_trades.trades_loss(model, x, x_adv, y, beta=3.0)
    p, q = F.softmax(model(x), 1), F.softmax(model(x_adv), 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(loss, F.cross_entropy(model(x), y) + 3.0 * kl, atol=1e-5)
    # gradients flow through the clean side of the KL too (as in the reference code)
    model.zero_grad()
    logits_clean = model(x)
    kl_only = train_trades.kl_clean_adv(logits_clean, model(x_adv).detach())
    (g,) = torch.autograd.grad(kl_only, logits_clean)
    assert g.abs().sum() > 0


def test_trades_defaults_and_end_to_end(data_dir, tmp_path):
    assert train_trades.parse_args([]).beta == 1.0
    assert train_trades.parse_args(['--dataset', 'cifar10']).beta == 6.0
    a = train_trades.parse_args([])
    assert (a.eps, a.steps, a.step_size) == (0.3, 16, 0.02)
    run_ok('train_trades.py', '--data-dir', data_dir, '--out', tmp_path / 't', *QUICK)
    assert {'last.pt', 'best.pt', 'log.jsonl'} <= {p.name for p in (tmp_path / 't').iterdir()}
    run_ok('eval.py', '--ckpt', tmp_path / 't' / 'last.pt', '--data-dir', data_dir, '--test-size', '16')


def test_trades_start_up_line_names_the_kl_attacks_own_start_not_random_start(data_dir, tmp_path):
    # --random-start moves only the validation/test PGD: TRADES' training attack keeps Alg. 1's
    # x + 0.001 N(0, I), and the start-up line must not say the KL-PGD starts at random
    out = run_ok('train_trades.py', '--data-dir', data_dir, '--out', tmp_path / 't', *QUICK,
                 '--random-start').stdout
    line = next(l for l in out.splitlines() if l.startswith('TRADES on'))
    assert 'KL-PGD(' in line and ', rand)' not in line, line
    assert 'from x + 0.001 N(0, I), test PGD from a random start' in line, line


def algorithm_1_step(model, x, y, eps, steps, step_size, beta, noise):
    """One training step of the TRADES paper's Algorithm 1, written out independently of
    train_trades.py: x' = x + 0.001 N(0, I) used as is; K steps of x' <- Pi(x' + eta sign(grad of
    KL(f(x) || f(x')) summed)) in eval mode, Pi = the eps-ball, then [0, 1]; then in train mode
    CE(f(x), y) + beta * KL summed over classes / batch, with f(x) not detached."""
    model.eval()
    x_adv = x + 0.001 * noise
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction='sum')
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x - eps), x + eps).clamp(0, 1)
    model.train()
    logits = model(x)
    kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction='sum') / len(x)
    return x_adv, F.cross_entropy(logits, y) + beta * kl


def test_trades_step_equals_algorithm_1_written_independently():
    model, x, y = tiny_trained()
    x = x.clone()
    x[:, :, :4] = 0.0              # black borders (as in MNIST): the start's noise leaves [0, 1] there
    torch.manual_seed(3)
    noise = torch.randn_like(x)
    ref_model = copy.deepcopy(model)
    ref_x_adv, ref_loss = algorithm_1_step(ref_model, x, y, 0.1, 5, 0.02, 6.0, noise)
    ref_grads = torch.autograd.grad(ref_loss, list(ref_model.parameters()))
    torch.manual_seed(3)           # trades_attack draws the same noise
    model.train()
    x_adv = train_trades.trades_attack(model, x, y, 0.1, 5, 0.02, 0.001)
    assert model.training                                   # the attack restores train mode
    assert torch.allclose(x_adv, ref_x_adv, atol=1e-6), (x_adv - ref_x_adv).abs().max()
    loss, _ = train_trades.trades_loss(model, x, x_adv, y, 6.0)
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-5, rtol=1e-4)
