"""A hand-written, batched l-inf PGD (Madry et al. 2018; AELF footnote 2: PGD(eps, steps, step)).

One loop serves every method: the loss it ascends is 'ce' (cross-entropy, the default),
'cw' (the Carlini-Wagner margin loss, for CW-inf), or any callable
``loss(model, x_adv, y) -> scalar`` (TRADES' KL term, AGAIN's two-head loss, ...).
"""
import torch
import torch.nn.functional as F


def cw_margin(logits, y):
    """Per-sample CW margin: max_{j != y} z_j - z_y (positive = misclassified).

    Uncapped: Madry et al.'s, CAT's and AGAIN's ``cwloss`` clamp the margin at kappa = 50
    (``-relu(z_y - max_j z_j + 50)``), which stops pushing an image once it is misclassified
    by 50. The cap changes where PGD's steps go only for images already that far across the
    boundary, so no reported accuracy changes; the signed gradient is the same elsewhere."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float('-inf')).amax(1)
    return other - true


def _loss_value(model, x_adv, y, loss):
    if callable(loss):
        return loss(model, x_adv, y)
    logits = model(x_adv).float()
    if loss == 'ce':
        return F.cross_entropy(logits, y, reduction='sum')
    if loss == 'cw':
        return cw_margin(logits, y).sum()
    raise ValueError(f"unknown PGD loss {loss!r} (use 'ce', 'cw' or a callable)")


def pgd(model, x, y, eps, steps, step_size, random_start=False, loss='ce', x_init=None):
    """l-inf PGD: ``steps`` signed-gradient ascent steps of size ``step_size`` on ``loss``,
    each followed by projection onto the eps-ball around x and onto [0, 1].

    - The model is put in eval mode while attacking (AELF Appendix C) and its previous mode
      is restored afterwards.
    - Gradients are taken with respect to the input only (torch.autograd.grad): no parameter's
      ``.grad`` is touched.
    - ``random_start``: start from x + U(-eps, eps) (Madry et al.), projected; ``x_init``: start
      from a given point instead, used as given for the first gradient (TRADES Algorithm 1 starts
      from x + 0.001 * N(0, 1) and projects only after its first step).
    - Returns a detached tensor; with eps == 0 or steps == 0 it returns x (detached).
    - Works inside a CUDA autocast context: the loss is read in float32, x_adv stays float32.
    """
    x = x.detach()
    if eps <= 0 or steps <= 0:
        return x
    was_training = model.training
    model.eval()
    try:
        if x_init is not None:
            x_adv = x_init.detach().clone()          # as given: TRADES Alg. 1 takes its first
        else:                                        # gradient at x + 0.001 N(0, I), unclamped
            if random_start:
                x_adv = x + torch.empty_like(x).uniform_(-eps, eps)      # torchattacks' one line
            else:
                x_adv = x.clone()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                value = _loss_value(model, x_adv, y, loss)
                (grad,) = torch.autograd.grad(value, x_adv)
            with torch.no_grad():
                x_adv = x_adv.detach() + step_size * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
        return x_adv.detach()
    finally:
        model.train(was_training)
