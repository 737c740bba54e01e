"""common.compile_model (torch.compile of the model's passes): the compiled passes give the eager
outputs and gradients within float tolerance, and the model stays the same nn.Module for
everything else (modes, the c/w split, AGAIN's heads, checkpoints).

Cost: with a cold inductor cache each new graph costs 10-25 s of C++ compilation on a 2-core CPU.
So the inductor tests share one compiled model (the ``pair`` fixture) and one batch shape, and
compile two graphs in all (an attack pass and a training pass, each forward and backward). The tests of what compile_model and the scripts do
with graphs (one graph per phase for every batch size, eval.py --compile, every script compiled) run
with the ``aot_eager`` backend: dynamo's tracing, guards and AOT autograd, the same graphs,
executed by eager kernels instead of inductor's generated code. In the every-script test, the
scripts whose compiled pass is ``features`` in the phases the inductor tests trace (AT, JT, JT*,
TRADES, AELFs, AT-id) use dynamo's graphs alone (backend ``eager``: the phases, fullgraph and the
log checked, AOT autograd not again: 35 s less); AGAIN (``forward_heads``, AWP's proxy) and AELF
(two backward passes of a step) keep ``aot_eager``."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import attacks
import common
import models
from conftest import run_script

B = 16                      # the one batch shape of the inductor tests


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


@pytest.fixture(scope='module')
def pair():
    return _pair()


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile with backend='aot_eager' (see the module docstring)."""
    real = torch.compile

    def compile_(fn, mode=None, **kw):
        return real(fn, backend='aot_eager', **kw)
    monkeypatch.setattr(torch, 'compile', compile_)


def _close(a, b, what):
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"{what}: max diff {(a - b).abs().max().item():.3g}"


def _batch(seed):
    torch.manual_seed(seed)
    x = torch.rand(B, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (B,))


@contextlib.contextmanager
def _frozen(model):
    """The weights as the compiled pass freezes them in an attack (common.compile_model)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _attack_pass(m, x, y):
    """Eval-mode logits and input gradient, as PGD takes them (the compiled graph pgd uses)."""
    m.eval()
    with _frozen(m):
        xx = x.clone().requires_grad_(True)
        logits = m(xx)
        grad = torch.autograd.grad(F.cross_entropy(logits, y), xx)[0]
    return logits.detach(), grad


def test_compiled_passes_equal_eager_ones(pair):
    from torch._dynamo.utils import counters
    graphs_before = counters['stats']['unique_graphs']
    eager, compiled = pair
    x, y = _batch(1)

    # an attack pass: eval mode, CE loss, gradient w.r.t. the input
    (le, ge), (lc, gc) = (_attack_pass(m, x, y) for m in pair)
    _close(le, lc, 'eval logits')
    _close(ge, gc, 'input gradient')
    assert gc.abs().sum() > 0
    adv = [attacks.pgd(m, x, y, 0.1, 2, 0.05) for m in pair]          # the same graph, via pgd
    _close(adv[0], adv[1], 'PGD examples')

    # a training pass through the c/w split (features, then fc), as every script but AGAIN
    # writes it (AGAIN's forward_heads compiled: AGAIN-MART-AWP in test_every_script_trains_compiled_...)
    for m in pair:
        m.train()
        m.zero_grad()
        loss = F.cross_entropy(m.fc(m.features(x)), y)
        loss.backward()
        m.loss = loss.detach()
    _close(eager.loss, compiled.loss, 'training loss')
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None or q.grad is not None:          # the ASE head is not on this path
            _close(p.grad, q.grad, f'weight gradient {name}')
    for (name, b), c in zip(eager.named_buffers(), compiled.buffers()):   # BN running stats
        _close(b.float(), c.float(), f'buffer {name}')

    # back to eval after training: the compiled model follows the mode switch (running stats)
    (le, ge), (lc, gc) = (_attack_pass(m, x, y) for m in pair)
    _close(le, lc, 'eval logits after train()')
    _close(ge, gc, 'input gradient after train()')
    # the equalities above would hold trivially if compile_model left the model eager
    assert counters['stats']['unique_graphs'] > graphs_before, 'compile_model compiled nothing'


def test_compiled_model_keeps_its_state_dict_and_default_is_eager(pair):
    eager, compiled = pair
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())                    # checkpoints load either way
    assert 'features' in vars(compiled) and 'forward_heads' in vars(compiled)
    plain = models.build('cnn_b', 10, 1, width=0.125)
    assert common.compile_model(plain, None) is plain and 'features' not in vars(plain)
    proc = run_script('train_at.py', '--compile', 'fastest')          # argparse's choices
    assert proc.returncode == 2 and "invalid choice: 'fastest'" in proc.stderr


def test_pgd_on_a_compiled_model_treats_the_weights_as_constants_and_restores_them(pair):
    eager, compiled = pair
    for m in pair:
        m.eval()
    x, y = _batch(2)
    compiled.fc.bias.requires_grad_(False)           # a frozen parameter stays frozen afterwards
    eager.fc.bias.requires_grad_(False)
    seen = {}

    def ce(model, x_adv, y):                         # PGD's CE, noting the weights' flags
        seen[model is compiled] = {p.requires_grad for p in model.parameters()}
        return F.cross_entropy(model(x_adv), y, reduction='sum')
    try:
        adv = [attacks.pgd(m, x, y, 0.1, 3, 0.03, loss=ce) for m in pair]
        assert seen == {False: {True, False}, True: {True, False}}   # the flags as they were, around the pass
        # in an attack (eval mode, gradients on) the compiled pass takes the weights as constants:
        # its output has no gradient path to them; in training it has (BatchNorm's statistics kept)
        weight, state = next(p for p in compiled.parameters() if p.dim() == 4), copy.deepcopy(compiled.state_dict())
        for training, path in ((False, False), (True, True)):
            compiled.train(training)
            out = compiled.features(x.clone().requires_grad_(True))
            assert (torch.autograd.grad(out.sum(), weight, allow_unused=True)[0] is not None) == path
        compiled.eval()
        compiled.load_state_dict(state)
        _close(adv[0], adv[1], 'PGD examples')
        assert (adv[1] - x).abs().max() <= 0.1 + 1e-6 and (adv[1] != x).any()
        # the weights are graph inputs, not constants baked in while they were frozen: a training
        # step's new weights reach the next attack
        with torch.no_grad():
            for p, q in zip(eager.parameters(), compiled.parameters()):
                noise = 0.2 * torch.randn_like(p)
                p.add_(noise), q.add_(noise)
        again = [attacks.pgd(m, x, y, 0.1, 3, 0.03, loss=ce) for m in pair]
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
    finally:
        compiled.fc.bias.requires_grad_(True)
        eager.fc.bias.requires_grad_(True)


def test_every_batch_shape_shares_one_graph(aot_eager):
    """The last, smaller batch of an epoch, the evaluation batches and a process's shard reuse
    the phase's graph (the batch dimension is symbolic): three shapes, one graph, each giving the
    eager logits."""
    from torch._dynamo.utils import counters
    eager, compiled = _pair()
    eager.eval(), compiled.eval()
    before = counters['stats']['unique_graphs']
    with torch.no_grad():
        for n in (6, 5, 3):
            x = torch.rand(n, 1, 32, 32).contiguous(memory_format=torch.channels_last)
            _close(eager(x), compiled(x), f'logits of a batch of {n}')
    assert counters['stats']['unique_graphs'] - before == 1


@pytest.fixture
def phases(monkeypatch):
    """torch.compile with BACKEND's backend (module docstring), noting for every graph dynamo
    compiles the compiled pass and its phase: the model's train/eval mode, the gradient mode,
    whether the weights need gradients (attacks.pgd freezes them) and whether the input does.
    Returns that list, each phase with the batch size its graph holds."""
    import torch._dynamo
    from torch._dynamo.backends.registry import lookup_backend
    torch._dynamo.reset()     # no shapes remembered from an earlier test: each case proves its own
    real, seen = torch.compile, []

    def compile_(fn, mode=None, **kw):
        model = fn.__self__
        assert kw.get('fullgraph') is True, 'a graph break would fall back to eager code unseen'

        def backend(gm, example_inputs):
            x = [n.meta['example_value'] for n in gm.graph.nodes
                 if n.op == 'placeholder' and n.name == 'l_x_'][0]
            seen.append(((id(model), fn.__name__, model.training, torch.is_grad_enabled(),
                          any(p.requires_grad for p in model.parameters()), x.requires_grad),
                         str(x.shape[0])))
            return lookup_backend(BACKEND[0])(gm, example_inputs)
        return real(fn, backend=backend, **kw)
    monkeypatch.setattr(torch, 'compile', compile_)
    yield seen
    BACKEND[0] = 'aot_eager'


BACKEND = ['aot_eager']        # the phases fixture's backend (module docstring)
AOT = {'train_again.py', 'train_aelf.py'}        # the scripts compiled with aot_eager there


# Every script, with a tail batch (72 = 40 + 32), a validation split of 17 and 20 test images.
# Every batch holds 16 images or more (JT's and AELFs' halves too): below 16 torch's CPU convolution takes another
# kernel, and dynamo guards on it (`16 <= x.size()[0]`), so smaller batches get a graph of their own.
COMPILED_RUNS = {
    'train_at.py': [], 'train_jt.py': [], 'train_jt.py*': ['--beta', '0.1'],
    'train_trades.py': [], 'train_aelf.py': [], 'train_aelfs.py': ['--st-epochs', '1'],
    # AGAIN on MART with AWP from the first epoch: a model with a copy (AWP's proxy, made before
    # compile_model) and an ASE head
    'train_again.py': ['--base', 'mart', '--awp-gamma', '0.005', '--awp-warmup', '0'], 'train_att_id.py': [],
}


@pytest.mark.parametrize('script', list(COMPILED_RUNS))
def test_every_script_trains_compiled_with_one_graph_per_phase(script, data_dir, tmp_path, phases):
    """Each script end to end under --compile (fullgraph=True): it finishes, each phase of each
    compiled pass compiled one graph whatever the batch size (tail, validation, test), and the
    log equals the eager run's (to float tolerance: the graphs are the eager ops, traced)."""
    from conftest import QUICK, read_log, run_ok
    name = script.rstrip('*')
    BACKEND[0] = 'aot_eager' if name in AOT else 'eager'
    flags = [*QUICK, '--data-dir', data_dir, '--train-size', '72', '--batch-size', '40',
             '--val-size', '17', '--test-size', '20', *COMPILED_RUNS[script]]
    logs = []
    for extra in ([], ['--compile']):
        out = tmp_path / ('compiled' if extra else 'eager')
        run_ok(name, *flags, '--out', out, *extra)
        logs.append(read_log(out))
    keys = [key for key, _ in phases]
    assert keys, 'the script compiled nothing'
    assert any(key[2:] == (True, True, True, False) for key in keys), f'no training pass compiled: {keys}'
    repeated = [(key, [b for k, b in phases if k == key]) for key in set(keys) if keys.count(key) > 1]
    assert not repeated, f'a phase compiled again for another batch: {repeated}'
    assert common.load_checkpoint(str(tmp_path / 'compiled' / 'last.pt'))['args']['compile'] == 'default'
    eager, compiled = logs
    assert len(eager) == len(compiled)
    assert name != 'train_again.py' or all('again_steps' in c for c in compiled)
    for e, c in zip(eager, compiled):
        for key in ('train_loss', 'val_nat', 'val_adv'):
            if key in e:
                assert c[key] == pytest.approx(e[key], rel=1e-3, abs=1e-3), (key, e, c)


def test_eval_compile_gives_the_eager_table(data_dir, quick_runs, aot_eager):
    """eval.py --compile: the PGD columns on a compiled copy equal the eager ones (to one image:
    a float difference may flip a borderline example), AutoAttack stays on the eager model."""
    import eval as evaluation
    from torch._dynamo.utils import counters
    ckpt = str(quick_runs['at'][0] / 'last.pt')
    rows = []
    for extra in ([], ['--compile']):           # bare --compile: 'default'
        args = evaluation.parse_args(['--ckpt', ckpt, '--data-dir', str(data_dir), '--test-size', '32',
                                      '--device', 'cpu', *extra])
        assert args.compile == (extra and 'default' or None)
        before = counters['stats']['unique_graphs']
        rows.append(evaluation.evaluate(ckpt, args, torch.device('cpu')))
        assert (counters['stats']['unique_graphs'] > before) == bool(extra)
    for key in ('natural_acc', 'pgd_train_acc', 'pgd20_acc', 'cw20_acc'):
        assert abs(rows[0][key] - rows[1][key]) <= 100 / 32 + 1e-9, key
