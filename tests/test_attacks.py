import copy
import functools

import torch
import torch.nn.functional as F

import models
from attacks import cw_margin, pgd


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return models.build('cnn_b', 10, 1, width=0.125)


def trained_model():
    """A tiny cnn_b fitted for a few steps to a learnable synthetic problem (fitted once per
    test run; every call gets its own copy)."""
    model, x, y, rng = _trained_model()
    torch.set_rng_state(rng)            # the generator's state as a fresh fit would leave it
    return copy.deepcopy(model), x.clone(), y.clone()


@functools.lru_cache(maxsize=1)
def _trained_model():
    from conftest import synthetic_images
    x, y = synthetic_images(256, 32, 1, 10, seed=5)
    x = torch.tensor(x).permute(0, 3, 1, 2).float() / 255
    y = torch.tensor(y)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x[:64], y[:64], torch.get_rng_state()


def test_pgd_stays_in_ball_and_box_and_increases_loss():
    model, x, y = trained_model()
    model.eval()
    x_adv = pgd(model, x, y, eps=0.1, steps=10, step_size=0.02)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean, adv = F.cross_entropy(model(x), y), F.cross_entropy(model(x_adv), y)
    assert adv > clean + 0.1
    assert not x_adv.requires_grad


def test_pgd_restores_mode_and_leaves_parameter_grads_alone():
    model = tiny_model()
    x, y = torch.rand(8, 1, 32, 32), torch.randint(0, 10, (8,))
    seen_modes = []
    model.register_forward_pre_hook(lambda m, inp: seen_modes.append(m.training))
    model.train()
    pgd(model, x, y, 0.3, 3, 0.1)
    assert seen_modes == [False] * 3       # eval mode while attacking (AELF Appendix C)
    assert model.training                   # restored
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    pgd(model, x, y, 0.3, 1, 0.1)
    assert not model.training
    # existing grads are not modified either
    F.cross_entropy(model(x), y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    pgd(model, x, y, 0.3, 2, 0.1, loss='cw')
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))


def test_eps_zero_or_no_steps_is_identity():
    model = tiny_model()
    x, y = torch.rand(4, 1, 32, 32), torch.randint(0, 10, (4,))
    assert torch.equal(pgd(model, x, y, 0.0, 10, 0.1), x)
    assert torch.equal(pgd(model, x, y, 0.3, 0, 0.1), x)


def test_random_start_and_x_init():
    model = tiny_model()
    x, y = torch.rand(16, 1, 32, 32), torch.randint(0, 10, (16,))
    torch.manual_seed(1)
    a = pgd(model, x, y, 0.3, 1, 0.0, random_start=True)   # step 0: only the random start
    assert 0 < (a - x).abs().max() <= 0.3 + 1e-6
    torch.manual_seed(2)
    b = pgd(model, x, y, 0.3, 1, 0.0, random_start=True)
    assert not torch.equal(a, b)
    c = pgd(model, x, y, 0.3, 1, 0.0)
    assert torch.equal(c, x)
    start = (x + 0.5).clamp(0, 1)
    d = pgd(model, x, y, 0.3, 1, 0.0, x_init=start)          # projected back into the ball
    assert torch.allclose(d, torch.min(start, x + 0.3))


def test_callable_loss_and_cw():
    model, x, y = trained_model()
    calls = []

    def loss(m, x_adv, yy):
        calls.append(x_adv.shape)
        return -F.cross_entropy(m(x_adv), yy, reduction='sum')   # descend instead
    x_low = pgd(model, x, y, 0.1, 3, 0.02, loss=loss)
    assert len(calls) == 3
    with torch.no_grad():
        assert F.cross_entropy(model(x_low), y) <= F.cross_entropy(model(x), y)
    x_cw = pgd(model, x, y, 0.1, 5, 0.02, loss='cw')
    with torch.no_grad():
        assert (model(x_cw).argmax(1) == y).float().mean() <= (model(x).argmax(1) == y).float().mean()


def test_cw_margin_and_one_cw_step_by_hand():
    # the margin max_{j != y} z_j - z_y on hand-made logits
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 4.0], [0.0, 1.0, 7.0]])
    y = torch.tensor([0, 2, 2])
    assert torch.equal(cw_margin(logits, y), torch.tensor([3.0 - 1.0, 5.0 - 4.0, 1.0 - 7.0]))
    # one PGD step on the margin of a linear model z = W x: the gradient of z_j* - z_y is
    # W[j*] - W[y] (j* the largest other logit), so the step is x + step * sign(W[j*] - W[y]),
    # clipped to the ball and to [0, 1]; ascending CE, descending, or not moving all differ
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(5, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        z = model(x)
        j = z.masked_fill(F.one_hot(y, 3).bool(), float('-inf')).argmax(1)
        w = model[1].weight
        direction = (w[j] - w[y]).view(5, 1, 4, 4)
    expected = torch.min(torch.max(x + 0.05 * direction.sign(), x - 0.03), x + 0.03).clamp(0, 1)
    assert torch.allclose(pgd(model, x, y, 0.03, 1, 0.05, loss='cw'), expected, atol=1e-7)
    x_ce = pgd(model, x, y, 0.03, 1, 0.05, loss='ce')
    assert not torch.allclose(x_ce, expected)          # CE's step is another one on this model
