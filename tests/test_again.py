"""AGAIN: ASE head (models.py), HFF, schedule, MART, AWP (train_again.py) and eval's adaptive attack."""
import argparse
import copy
import json

import torch
import torch.nn.functional as F

import models
import train_again
from conftest import QUICK, read_log, run_ok, run_script


def test_hff_mixes_statistics_on_the_simplex():
    torch.manual_seed(0)
    for _ in range(20):
        g = train_again.simplex_gammas('cpu')
        assert g.shape == (4,) and (g >= 0).all() and (g <= 1).all()
        assert abs(g.sum().item() - 1) < 1e-6
    a = torch.randn(6, 5, 4, 4) * (torch.rand(6, 5, 1, 1) * 3 + 0.5) + torch.randn(6, 5, 1, 1)
    gammas = torch.tensor([0.05, 0.15, 0.2, 0.6])
    torch.manual_seed(1)
    out = train_again.hff(a, gammas)
    torch.manual_seed(1)
    perm = torch.randperm(6)                       # the same shuffle hff drew: A' = A[perm]

    def stats(t):                                  # per-sample, per-channel mean and std
        flat = t.flatten(2)
        return flat.mean(2)[:, :, None, None], (flat.var(2) + 1e-5).sqrt()[:, :, None, None]
    mu, sigma = stats(a)
    mu_s, sigma_s = stats(a[perm])
    # Eq. (5) written out: A1 = AdaIN(A, A') carries A''s statistics and A2 = AdaIN(A', A) A's,
    # so mu_hat = (g1 + g4) mu(A) + (g2 + g3) mu(A'), and the same for sigma; Eq. (6) then
    # renormalises A with them (an identity or a swapped AdaIN gives other weights)
    g1, g2, g3, g4 = gammas
    mu_hat = (g1 + g4) * mu + (g2 + g3) * mu_s
    sigma_hat = (g1 + g4) * sigma + (g2 + g3) * sigma_s
    expected = sigma_hat * (a - mu) / sigma + mu_hat
    assert out.shape == a.shape
    assert torch.allclose(out, expected, rtol=1e-3, atol=1e-4), (out - expected).abs().max()


def test_ase_training_weighting_is_eq_4_on_a_hand_built_head():
    head = models.ASEHead(channels=3, num_classes=4)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1., 2., 3.], [0., 1., 0.], [2., 2., 2.], [-1., 0., 1.]]))
        head.fc.bias.zero_()
    a = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).view(2, 3, 2, 2)
    y, y_fake = torch.tensor([0, 2]), torch.tensor([3, 1])
    out, logits = head(a, y, y_fake, alpha=0.6)
    w = head.fc.weight
    for b in range(2):
        expected = 0.6 * a[b] * w[y[b]][:, None, None] + 0.4 * a[b] * w[y_fake[b]][:, None, None]
        assert torch.allclose(out[b], expected)
    assert torch.allclose(logits, a.mean((2, 3)) @ w.T)


def test_ase_inference_uses_its_own_argmax_and_model_x_is_that_path():
    torch.manual_seed(0)
    model = models.build('cnn_b', 10, 1, width=0.125, ase_layer=4).eval()
    x = torch.rand(64, 1, 32, 32)
    with torch.no_grad():
        main, ase = model.forward_heads(x)
        assert torch.equal(model(x), main)                    # model(x) is the inference path
        # rebuild the inference path by hand up to the ASE stage
        h = x
        for stage in model.stages[:model.ase_index + 1]:
            h = stage(h)
        ase_logits = model.ase.fc(h.mean((2, 3)))
        assert torch.allclose(ase_logits, ase, atol=1e-6)
        pred = ase_logits.argmax(1)
        # find a case where the ASE prediction and the main prediction differ
        assert (pred != main.argmax(1)).any()
        scaled = h * model.ase.fc.weight[pred][:, :, None, None]
        for stage in model.stages[model.ase_index + 1:]:
            scaled = stage(scaled)
        assert torch.allclose(model.fc(model.pool(scaled)), main, atol=1e-5)
        # with another label the output changes: the weighting really follows pred
        other = (pred + 1) % 10
        h2 = h * model.ase.fc.weight[other][:, :, None, None]
        for stage in model.stages[model.ase_index + 1:]:
            h2 = stage(h2)
        assert not torch.allclose(model.fc(model.pool(h2)), main, atol=1e-4)


def test_schedule_share_tracks_i_over_n():
    torch.manual_seed(0)
    n = 4000
    flags = torch.tensor([train_again.use_again(i, n) for i in range(n)], dtype=torch.float)
    for k in range(4):
        chunk = flags[k * 1000:(k + 1) * 1000].mean().item()
        expected = (k * 1000 + 500) / n
        assert abs(chunk - expected) < 0.06, (k, chunk, expected)
    assert flags[:50].mean() < 0.1 and flags[-50:].mean() > 0.9


def test_mart_loss_matches_direct_computation():
    torch.manual_seed(0)
    la, ln = torch.randn(8, 5), torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    got = train_again.mart_loss(la, ln, y, 6.0)
    pa, pn = la.softmax(1), ln.softmax(1)
    total = 0.0
    for i in range(8):
        wrong = max((pa[i, k].item(), k) for k in range(5) if k != y[i])[1]
        bce = -torch.log(pa[i, y[i]]) - torch.log(1.0001 - pa[i, wrong] + 1e-12)
        kl = (pn[i] * (torch.log(pn[i] + 1e-12) - torch.log(pa[i] + 1e-12))).sum()
        total = total + bce + 6.0 * kl * (1.0000001 - pn[i, y[i]])
    assert torch.allclose(got, total / 8, atol=1e-5)


def again_args(**kw):
    base = dict(alpha=0.6, ase_layer=4, no_hff=False, base='at', mart_lambda=6.0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_awp_perturbs_by_gamma_along_the_ascent_direction_and_is_restored():
    torch.manual_seed(0)
    model = models.build('cnn_b', 10, 1, width=0.125, ase_layer=4).train()
    proxy = copy.deepcopy(model)
    x = torch.rand(16, 1, 32, 32)
    y = torch.randint(0, 10, (16,))
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = again_args(base='mart')
    # the direction by hand: the gradient g of the step's loss at w (the same fake labels and
    # HFF draw), and d = gamma ||w|| g / ||g|| per weight of 2+ dimensions (an ascent)
    ref = copy.deepcopy(model)
    torch.manual_seed(7)
    loss_ref, _ = train_again.step_loss(ref, x, x_adv, y, args, True)
    names = [n for n, _ in ref.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(loss_ref, list(ref.parameters()), allow_unused=True)))
    torch.manual_seed(7)
    diff = train_again.awp_perturbation(model, proxy, x, x_adv, y, args, True, 5e-3)
    params = dict(model.named_parameters())
    assert set(diff) == {n for n, p in params.items() if p.dim() > 1 and grads[n] is not None}
    for k, d in diff.items():
        expected = 5e-3 * params[k].norm() * grads[k] / grads[k].norm()
        # (d is read back as (w + 0.01 g) - w, so it is exact only to float rounding)
        assert (d - expected).norm() <= 1e-3 * expected.norm(), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k                  # computing it changes nothing
    # the step is taken at w + d, and removing d afterwards leaves w - lr * grad L(w + d)
    train_again.add_to_weights(model, diff, +1.0)
    at_w_plus_d = copy.deepcopy(model)
    torch.manual_seed(8)
    loss, _ = train_again.step_loss(at_w_plus_d, x, x_adv, y, again_args(), True)
    g_plus = torch.autograd.grad(loss, list(at_w_plus_d.parameters()), allow_unused=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(8)
    loss, _ = train_again.step_loss(model, x, x_adv, y, again_args(), True)
    opt.zero_grad()
    loss.backward()
    opt.step()
    train_again.add_to_weights(model, diff, -1.0)
    moved = False
    for (k, v), g in zip(model.named_parameters(), g_plus):
        expected = before[k] - 0.1 * g if g is not None else before[k]
        assert torch.allclose(v, expected, atol=1e-6), k
        moved |= g is not None and bool(g.abs().sum() > 0)
    assert moved


def test_step_loss_is_eq_7_and_plain_steps_use_the_inference_path():
    torch.manual_seed(0)
    model = models.build('cnn_b', 10, 1, width=0.125, ase_layer=4).train()
    x = torch.rand(8, 1, 32, 32)
    x_adv = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    y = torch.randint(0, 10, (8,))
    # a plain step (Alg. 1, line 8): CE of both heads on x', the ASE head in its inference weighting
    loss, logits = train_again.step_loss(model, x, x_adv, y, again_args(), again=False)
    main, ase = model.forward_heads(x_adv)
    assert torch.allclose(loss, F.cross_entropy(main, y) + F.cross_entropy(ase, y), atol=1e-5)
    assert torch.allclose(logits, main, atol=1e-6)
    # an AGAIN step (line 6, Eq. (7)) written out: y' a shuffle of y, HFF on the ASE stage's maps,
    # the ASE head's training weighting (Eq. (4)) with y and y', then CE of both heads on x'
    def by_hand(hff):
        y_fake = y[torch.randperm(8)]
        h, ase_logits = x_adv, None
        for i, stage in enumerate(model.stages):
            h = stage(h)
            if i == model.ase_index:
                h = hff(h) if hff else h
                h, ase_logits = model.ase(h, y, y_fake, 0.6)
        return F.cross_entropy(model.fc(model.pool(h)), y) + F.cross_entropy(ase_logits, y)
    torch.manual_seed(3)
    loss, _ = train_again.step_loss(model, x, x_adv, y, again_args(), again=True)
    torch.manual_seed(3)
    assert torch.allclose(loss, by_hand(train_again.hff), atol=1e-5)
    torch.manual_seed(3)
    assert not torch.allclose(loss, by_hand(None), atol=1e-4)         # HFF really acts
    torch.manual_seed(3)
    loss, _ = train_again.step_loss(model, x, x_adv, y, again_args(no_hff=True), again=True)
    torch.manual_seed(3)
    assert torch.allclose(loss, by_hand(None), atol=1e-5)
    # MART as the base: its natural pass reads the clean x through the inference path
    loss, _ = train_again.step_loss(model, x, x_adv, y, again_args(base='mart'), again=False)
    main_adv, ase_adv = model.forward_heads(x_adv)
    main_nat, _ = model.forward_heads(x)
    expected = train_again.mart_loss(main_adv, main_nat, y, 6.0) + F.cross_entropy(ase_adv, y)
    assert torch.allclose(loss, expected, atol=1e-5)


CIFAR = ['--dataset', 'cifar10', '--model', 'resnet18', '--width', '0.125', '--steps', '2',
         '--epochs', '2', '--batch-size', '32', '--train-size', '64', '--test-size', '32',
         '--val-size', '16', '--device', 'cpu']


def test_end_to_end_variants_and_adaptive_eval(data_dir, tmp_path):
    variants = {
        'at': [],
        'mart_awp': ['--base', 'mart', '--awp-gamma', '0.005', '--awp-warmup', '0'],
        'no_ase': ['--no-ase'],
        'no_hff_l3': ['--no-hff', '--ase-layer', '3', '--attack-loss', 'main'],
    }
    for name, flags in variants.items():
        run_ok('train_again.py', '--data-dir', data_dir, '--out', tmp_path / name, *CIFAR, *flags)
        log = read_log(tmp_path / name)
        assert len(log) == 2 and 'again_steps' in log[0]
    for name, flags in {'mnist': [], 'mnist_mart': ['--base', 'mart']}.items():
        run_ok('train_again.py', '--data-dir', data_dir, '--out', tmp_path / name, *QUICK, *flags)
    js = tmp_path / 'e.json'
    proc = run_ok('eval.py', '--ckpt', tmp_path / 'at' / 'last.pt', tmp_path / 'no_ase' / 'last.pt',
                  tmp_path / 'mnist' / 'last.pt', '--data-dir', data_dir, '--test-size', '32', '--json', js)
    assert 'PGD-20 (BPDA)' in proc.stdout and '| worst' in proc.stdout
    rows = json.loads(js.read_text())['rows']
    for r in rows:      # the worst case is at or below every attack of the row
        accs = [v for k, v in r.items() if k.endswith('_acc') and k != 'worst_acc' and not k.startswith('ase_')]
        assert len(accs) >= 4 and r['worst_acc'] <= min(accs) + 1e-9, r
    for r in (rows[0], rows[2]):
        assert 'pgd20_both_acc' in r and 'pgd20_bpda_acc' in r
    assert 'pgd20_bpda_acc' not in rows[1]             # no ASE head: no adaptive columns
    assert 'main = ASE' in proc.stdout                  # the ASE diagnostics, for ASE heads only
    assert all(k in rows[0] and k in rows[2] and k not in rows[1]
               for k in ('ase_head_acc', 'ase_agreement', 'ase_oracle_acc', 'ase_unscaled_acc'))
    # 8x8 inputs leave conv 5 with 1x1 maps, where HFF's per-channel std does not exist
    proc = run_script('train_again.py', '--data-dir', data_dir, '--out', tmp_path / 'bad', *QUICK,
                      '--image-size', '8')
    assert proc.returncode != 0 and 'larger than 1x1' in proc.stderr and 'Traceback' not in proc.stderr


def test_defaults_follow_the_paper():
    a = train_again.parse_args(['--dataset', 'cifar10'])
    assert (a.model, a.epochs, a.milestones, a.lr, a.weight_decay, a.steps) == ('resnet18', 120, [75, 90], 0.1, 5e-4, 10)
    assert abs(a.eps - 8 / 255) < 1e-12 and abs(a.step_size - 4 / 255) < 1e-12
    assert (a.alpha, a.ase_layer, a.attack_loss, a.base, a.awp_gamma) == (0.6, 4, 'both', 'at', 0.0)
    m = train_again.parse_args([])
    assert (m.model, m.eps, m.steps, m.ase_layer) == ('cnn_b', 0.3, 16, 5)


def test_ase_diagnostics_on_a_hand_built_model():
    import common
    import eval as evaluation

    class Tiny(models.StagedNet):
        """x (B x 3 x 1 x 1) -> ASE head (W_ase = identity) -> GAP -> fc diag(1, 1, -1)."""
        def __init__(self):
            super().__init__()
            self.stages = torch.nn.ModuleList([torch.nn.Identity()])
            self.pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
            self.fc = torch.nn.Linear(3, 3, bias=False)
            self.ase = models.ASEHead(3, 3)
            self.ase_index = 0
            with torch.no_grad():
                self.fc.weight.copy_(torch.diag(torch.tensor([1.0, 1.0, -1.0])))
                self.ase.fc.weight.copy_(torch.eye(3))
                self.ase.fc.bias.zero_()

    x = torch.tensor([[3, 1, 1], [1, 3, 1], [1, 1, 3], [1, 1, 3]], dtype=torch.uint8)[:, :, None, None] * 50
    y = torch.tensor([0, 1, 2, 0])
    # by hand: ASE predictions 0, 1, 2, 2 (right on 3 of 4); the maps scaled by e_pred give main
    # logits (3,0,0), (0,3,0), (0,0,-3), (0,0,-3) -> 0, 1, 0, 0: equal to ASE's on 2 of 4;
    # scaled by e_y: (3,0,0), (0,3,0), (0,0,-3), (1,0,0) -> 0, 1, 0, 0: right on 3 of 4
    got = evaluation.ase_diagnostics(Tiny().eval(), common.Split(x, y), batch_size=3)
    # unscaled maps: main logits (3,1,-1), (1,3,-1), (1,1,-3), (1,1,-3) -> 0, 1, 0, 0: 3 of 4
    assert got == {'ase_head_acc': 75.0, 'ase_agreement': 50.0, 'ase_oracle_acc': 75.0,
                   'ase_unscaled_acc': 75.0}


def test_bpda_surrogate_keeps_the_forward_and_lets_the_gradient_through_the_argmax():
    torch.manual_seed(0)
    model = models.build('cnn_b', 10, 1, width=0.125, ase_layer=5).eval()
    with torch.no_grad():   # rows that differ as a trained head's do (at init they are all small)
        model.ase.fc.weight.mul_(20)
    x = torch.rand(16, 1, 32, 32)
    y = torch.randint(0, 10, (16,))
    captured = {}
    model.ase.fc.register_forward_hook(lambda m, i, out: captured.__setitem__('logits', out))

    def grads(inference):
        xg = x.clone().requires_grad_(True)
        logits, _ = model.forward_heads(xg, ase_inference=inference)
        captured['logits'].retain_grad()
        F.cross_entropy(logits, y).backward()
        return logits.detach(), xg.grad, captured['logits'].grad
    hard, gx_hard, g_ase_hard = grads('argmax')
    soft, gx_soft, g_ase_soft = grads('surrogate')
    assert torch.equal(hard, soft) and torch.equal(hard, model(x))      # forward unchanged
    # through the argmax the main loss does not depend on the ASE logits; through the surrogate it does
    assert g_ase_hard is None or not g_ase_hard.any()
    assert g_ase_soft is not None and g_ase_soft.abs().sum() > 0
    assert (gx_hard - gx_soft).norm() > 1e-3 * gx_hard.norm()        # so the input gradient changes
    none, _ = model.forward_heads(x, ase_inference='none')
    assert not torch.allclose(none, hard)
    try:
        model.forward_heads(x, ase_inference='soft')
        raise AssertionError('an unknown inference mode was accepted')
    except ValueError as e:
        assert 'surrogate' in str(e)


def test_awp_warmup_counts_epochs_from_1_like_the_reference_code(data_dir, tmp_path, monkeypatch):
    # the AWP/AGAIN reference loops `for epoch in range(1, epochs + 1): if epoch >= awp_warmup`:
    # --awp-warmup 2 leaves epoch 1 without AWP and perturbs every step of epoch 2
    import train_again
    calls, real = [], train_again.awp_perturbation
    monkeypatch.setattr(train_again, 'awp_perturbation',
                        lambda *a, **k: (calls.append(len(read_log(tmp_path / 'r')) + 1
                                                      if (tmp_path / 'r' / 'log.jsonl').exists() else 1),
                                         real(*a, **k))[1])
    run_ok('train_again.py', '--data-dir', data_dir, '--out', tmp_path / 'r', *QUICK, '--epochs', '2',
           '--awp-gamma', '0.005', '--awp-warmup', '2')
    assert calls and set(calls) == {2} and len(calls) == 2, calls        # 64 images: 2 steps of 32
