"""common.compile_model (torch.compile of the model's passes, issue 16): the compiled passes
give the eager outputs and gradients within float tolerance, and the model stays the same
nn.Module for everything else (modes, the c/w split, AGAIN's heads, checkpoints)."""
import pytest
import torch
import torch.nn.functional as F

import common
import models


def _pair():
    """Two cnn_b copies with the same weights and an ASE head (AGAIN's model), channels_last on
    the CPU as every script prepares them; the second compiled."""
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        m = models.build('cnn_b', 10, 1, width=0.125, ase_layer=5)
        out.append(common.prepare_model(m, 'cpu'))
    eager, compiled = out
    assert common.compile_model(compiled, 'default') is compiled
    return eager, compiled


def _close(a, b, what):
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"{what}: max diff {(a - b).abs().max().item():.3g}"


def test_compiled_passes_equal_eager_ones():
    from torch._dynamo.utils import counters
    graphs_before = counters['stats']['unique_graphs']
    eager, compiled = _pair()
    torch.manual_seed(1)
    x = torch.rand(8, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))

    # an attack pass: eval mode, CE loss, gradient w.r.t. the input
    grads = []
    for m in (eager, compiled):
        m.eval()
        xx = x.clone().requires_grad_(True)
        logits = m(xx)
        grads.append((logits.detach(), torch.autograd.grad(F.cross_entropy(logits, y), xx)[0]))
    _close(grads[0][0], grads[1][0], 'eval logits')
    _close(grads[0][1], grads[1][1], 'input gradient')
    assert grads[1][1].abs().sum() > 0

    # a training pass through the c/w split (features, then fc), as AELF/JT/AT-id write it,
    # plus AGAIN's forward_heads with the training weighting of Eq. (4)
    y_fake = torch.roll(y, 1)
    for m in (eager, compiled):
        m.train()
        m.zero_grad()
        f = m.features(x)
        main, ase = m.forward_heads(x, y=y, y_fake=y_fake)
        loss = F.cross_entropy(m.fc(f), y) + F.cross_entropy(main, y) + F.cross_entropy(ase, y)
        loss.backward()
        m.loss = loss.detach()
    _close(eager.loss, compiled.loss, 'training loss')
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        _close(p.grad, q.grad, f'weight gradient {name}')
    for (name, b), c in zip(eager.named_buffers(), compiled.buffers()):   # BN running stats
        _close(b.float(), c.float(), f'buffer {name}')

    # back to eval after training: the compiled model follows the mode switch
    eager.eval(), compiled.eval()
    with torch.no_grad():
        _close(eager(x), compiled(x), 'eval logits after train()')
        _close(compiled(x), compiled.fc(compiled.features(x)), 'forward = fc(features)')
    # the equalities above would hold trivially if compile_model left the model eager
    assert counters['stats']['unique_graphs'] > graphs_before, 'compile_model compiled nothing'


def test_compiled_model_keeps_its_state_dict_and_default_is_eager():
    eager, compiled = _pair()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())                    # checkpoints load either way
    assert 'features' in vars(compiled) and 'forward_heads' in vars(compiled)
    plain = models.build('cnn_b', 10, 1, width=0.125)
    assert common.compile_model(plain, None) is plain and 'features' not in vars(plain)
    with pytest.raises(common.UserError, match='--compile'):
        common.compile_model(plain, 'fastest')


def test_pgd_on_a_compiled_model_treats_the_weights_as_constants_and_restores_them():
    import attacks
    eager, compiled = _pair()
    torch.manual_seed(2)
    x = torch.rand(8, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    compiled.fc.bias.requires_grad_(False)           # a frozen parameter stays frozen afterwards
    eager.fc.bias.requires_grad_(False)
    seen = {}

    def ce(model, x_adv, y):                         # PGD's CE, noting the weights' flags
        seen[model is compiled] = {p.requires_grad for p in model.parameters()}
        return F.cross_entropy(model(x_adv), y, reduction='sum')
    adv = [attacks.pgd(m, x, y, 0.1, 3, 0.03, loss=ce) for m in (eager, compiled)]
    assert seen == {False: {True, False}, True: {False}}   # only the compiled model's are frozen
    _close(adv[0], adv[1], 'PGD examples')
    assert (adv[1] - x).abs().max() <= 0.1 + 1e-6 and (adv[1] != x).any()
    # the weights are graph inputs, not constants baked in while they were frozen: a training
    # step's new weights reach the next attack
    with torch.no_grad():
        for p, q in zip(eager.parameters(), compiled.parameters()):
            noise = 0.2 * torch.randn_like(p)
            p.add_(noise), q.add_(noise)
    again = [attacks.pgd(m, x, y, 0.1, 3, 0.03, loss=ce) for m in (eager, compiled)]
    _close(again[0], again[1], 'PGD examples after a weight update')
    assert not torch.allclose(again[1], adv[1])

    def flags(m):
        return {name: p.requires_grad for name, p in m.named_parameters()}
    expected = {name: name != 'fc.bias' for name, _ in eager.named_parameters()}
    assert flags(eager) == flags(compiled) == expected   # flags restored after the attacks...

    def broken(model, x_adv, y):
        raise RuntimeError('boom')
    with pytest.raises(RuntimeError, match='boom'):
        attacks.pgd(compiled, x, y, 0.1, 3, 0.03, loss=broken)
    assert flags(compiled) == expected                     # ...and after an error


def test_each_batch_shape_gets_its_own_static_graph():
    """The last, smaller batch of an epoch must not turn the compiled passes shape-generic
    (dynamic=False): three shapes, three graphs, each giving the eager logits."""
    from torch._dynamo.utils import counters
    eager, compiled = _pair()
    eager.eval(), compiled.eval()
    before = counters['stats']['unique_graphs']
    with torch.no_grad():
        for n in (6, 5, 3):
            x = torch.rand(n, 1, 32, 32).contiguous(memory_format=torch.channels_last)
            _close(eager(x), compiled(x), f'logits of a batch of {n}')
    assert counters['stats']['unique_graphs'] - before == 3


def test_eval_compile_gives_the_eager_table(data_dir, tmp_path):
    """eval.py --compile: the PGD columns on a compiled copy equal the eager ones (to one image:
    a float difference may flip a borderline example), AutoAttack stays on the eager model."""
    import eval as evaluation
    from torch._dynamo.utils import counters
    from conftest import QUICK, run_ok
    run_ok('train_at.py', '--data-dir', data_dir, '--out', tmp_path / 'at', *QUICK)
    ckpt = str(tmp_path / 'at' / 'last.pt')
    rows = []
    for extra in ([], ['--compile', 'default']):
        args = evaluation.parse_args(['--ckpt', ckpt, '--data-dir', str(data_dir), '--test-size', '32',
                                      '--device', 'cpu', *extra])
        before = counters['stats']['unique_graphs']
        rows.append(evaluation.evaluate(ckpt, args, torch.device('cpu')))
        assert (counters['stats']['unique_graphs'] > before) == bool(extra)
    for key in ('natural_acc', 'pgd_train_acc', 'pgd20_acc', 'cw20_acc'):
        assert abs(rows[0][key] - rows[1][key]) <= 100 / 32 + 1e-9, key


def test_again_with_awp_trains_compiled(data_dir, tmp_path):
    """The script whose model has a copy (AGAIN-AWP's proxy, made before compile_model) and an
    ASE head, end to end under --compile: it finishes and logs finite losses."""
    from conftest import QUICK, read_log, run_ok
    out = tmp_path / 'again'
    run_ok('train_again.py', '--data-dir', data_dir, '--out', out, *QUICK, '--base', 'mart',
           '--awp-gamma', '0.005', '--awp-warmup', '0', '--compile', 'default')
    (rec,) = read_log(out)
    assert torch.isfinite(torch.tensor(rec['train_loss'])) and 'again_steps' in rec
    assert common.load_checkpoint(str(out / 'last.pt'))['args']['compile'] == 'default'
