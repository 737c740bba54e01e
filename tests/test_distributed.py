"""Several processes (torchrun, README "Several GPUs") on the CPU with gloo. A run without
per-image random draws and without BatchNorm (the Madry CNN, no random start) on 2 processes
equals the 1-process run up to float summation order; with random starts, uneven shards and
BatchNorm (per process on the CPU) it runs, writes one run folder whose checkpoints load
anywhere, resumes equal to an uninterrupted 2-process run and across a change of the number of
processes; every train_*.py runs under torchrun. And the --amp (bfloat16 autocast) path of every
script, which on a CPU is the one a test can run.

One torchrun launch of 2 processes runs every distributed run of the module
(tests/ddp_worker.py: one start-up of torch for all of them).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import argparse

import pytest
import torch

import common
from conftest import QUICK, ROOT, read_log, run_ok

SCRIPTS = ['train_at.py', 'train_jt.py', 'train_trades.py', 'train_aelf.py', 'train_aelfs.py',
           'train_again.py', 'train_att_id.py']
# each script's own flags for a tiny run (AELFs runs its in-script ST phase; AGAIN with AWP from
# the first epoch; AT-id on cnn_b, its --quick model)
OWN = {'train_aelfs.py': ['--st-epochs', '1'], 'train_again.py': ['--awp-gamma', '0.005', '--awp-warmup', '1'],
       'train_att_id.py': ['--model', 'cnn_b', '--optimizer', 'sgd', '--steps', '2', '--step-size', '0.1']}
# no per-image draw and no BatchNorm: equal to one process (batches of 32 split 16 / 16)
MADRY = ['--model', 'madry_cnn', '--no-random-start']
# uneven shards (batches of 25 images: 13 and 12 rows), random starts, BatchNorm (cnn_b)
EVEN_NOT = ['--batch-size', '25', '--train-size', '75', '--random-start']
NOTHING = 4                 # the run of `launched` that has nothing to resume


@pytest.fixture
def one_thread():
    """The one-process reference runs on one thread, as each of the processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def launched(data_dir, tmp_path_factory):
    """Every distributed run of the module, in one torchrun launch of 2 gloo processes:
    (root folder, what the launch printed)."""
    root = tmp_path_factory.mktemp('ddp')
    base = ['--data-dir', str(data_dir), *map(str, QUICK)]
    runs = [
        ['train_at.py', *base, *MADRY, '--epochs', '2', '--out', str(root / 'madry2')],
        ['train_at.py', *base, *MADRY, '--epochs', '1', '--out', str(root / 'madry1')],
        ['train_at.py', *base, *EVEN_NOT, '--epochs', '2', '--out', str(root / 'at2')],
        ['train_at.py', *base, *EVEN_NOT, '--epochs', '1', '--out', str(root / 'at_resumed')],
        ['train_at.py', *base, '--resume', '--out', str(root / 'nothing')],          # one-line error
        ['train_at.py', *base, *EVEN_NOT, '--epochs', '2', '--resume', '--out', str(root / 'at_resumed')],
    ] + [[s, *base, *OWN.get(s, []), '--out', str(root / s[:-3])] for s in SCRIPTS] + [
        ['test_distributed:watch_a_batch', str(root / 'watch')],
    ]
    (root / 'runs.json').write_text(json.dumps(runs))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           '--nproc_per_node', '2', str(ROOT / 'tests' / 'ddp_worker.py'),
                           str(root / 'runs.json')], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    return root, proc


def _max_diff(a, b):
    sa, sb = (common.load_checkpoint(str(p))['state_dict'] for p in (a, b))
    assert sa.keys() == sb.keys()          # no 'module.' prefix: the model's own names
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


def test_two_processes_equal_one_without_per_image_draws(launched, data_dir, tmp_path, one_thread):
    root, proc = launched
    run_ok('train_at.py', '--data-dir', data_dir, *QUICK, *MADRY, '--epochs', '2', '--out', tmp_path / 'madry2')
    assert _max_diff(root / 'madry2' / 'last.pt', tmp_path / 'madry2' / 'last.pt') < 1e-4, proc.stderr[-2000:]
    # the logged numbers are the whole batch's and the whole validation split's
    for ours, theirs in zip(read_log(root / 'madry2'), read_log(tmp_path / 'madry2')):
        assert abs(ours['train_loss'] - theirs['train_loss']) < 1e-4
        assert ours['train_acc'] == theirs['train_acc'] and ours['val_nat'] == theirs['val_nat']
    final = [json.loads((r / 'madry2' / 'final.json').read_text()) for r in (root, tmp_path)]
    assert final[0]['last']['test_nat'] == final[1]['last']['test_nat']


def test_one_run_folder_written_by_rank_0_that_loads_in_eval_py(launched, data_dir):
    root, proc = launched
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = [json.loads((root / f'runs.json.rank{r}').read_text()) for r in (0, 1)]
    failed = [i for i, c in enumerate(codes[0]) if c]
    assert codes[0] == codes[1] and failed == [NOTHING], codes    # both processes stop with 2
    assert codes[0][NOTHING] == 2
    assert proc.stderr.count('error: nothing to resume') == 1, proc.stderr[-3000:]   # one line
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    out = root / 'at2'
    assert sorted(p.name for p in out.iterdir()) == ['.lock', 'best.pt', 'final.json', 'last.pt', 'log.jsonl']
    assert [r['epoch'] for r in read_log(out)] == [1, 2]        # one line per epoch, not per process
    assert proc.stdout.count(f"-> {out}") == 1                  # rank 0 prints, the others do not
    ckpt = torch.load(out / 'last.pt', map_location='cpu', weights_only=True)
    momentum = [s['momentum_buffer'] for s in ckpt['optimizer']['state'].values()]
    assert momentum and all(t.device.type == 'cpu' for t in momentum)
    run_ok('eval.py', '--ckpt', out / 'last.pt', '--data-dir', data_dir, '--test-size', '16', '--device', 'cpu')


def test_resume_under_two_processes_and_across_a_change_of_their_number(launched, data_dir, tmp_path, one_thread):
    root, proc = launched
    # 2 processes, random starts, uneven shards, BatchNorm: epoch 1, then --resume for epoch 2
    # equals 2 epochs at once (each process re-seeds its draws per epoch)
    assert _max_diff(root / 'at_resumed' / 'last.pt', root / 'at2' / 'last.pt') < 1e-4
    assert [r['epoch'] for r in read_log(root / 'at_resumed')] == [1, 2]
    # epoch 1 under 2 processes, resumed by one process for epoch 2: as one process throughout
    shutil.copytree(root / 'madry1', tmp_path / 'madry1')
    run_ok('train_at.py', '--data-dir', data_dir, *QUICK, *MADRY, '--epochs', '2', '--resume',
           '--out', tmp_path / 'madry1')
    run_ok('train_at.py', '--data-dir', data_dir, *QUICK, *MADRY, '--epochs', '2', '--out', tmp_path / 'one')
    assert _max_diff(tmp_path / 'madry1' / 'last.pt', tmp_path / 'one' / 'last.pt') < 1e-4


def watch_a_batch(args):
    """common.CollapseWatch over 3 steps of a batch of 25 embeddings (this process's rows of it
    under torchrun): its epoch record, written by rank 0 to ``args[0]``. The embeddings shrink
    to a twentieth, so the check warns."""
    torch.manual_seed(0)
    mine = torch.arange(25).tensor_split(common.DIST.world)[common.DIST.rank]
    lo, hi = mine[0].item(), mine[-1].item() + 1
    watch = common.CollapseWatch('mnist', 'hint')
    for step in range(3):
        f = torch.randn(25, 6) * (1 - 0.95 * (step == 2)) + torch.arange(25.0)[:, None] / 10
        logits = torch.randn(25, 10)
        y = torch.arange(25) % 10
        watch.step(f[lo:hi], 2 * f[lo:hi], logits[lo:hi], y[lo:hi], 0)
    record = watch.end_epoch(0)
    if common.DIST.rank == 0:
        with open(args[0], 'w') as file:
            json.dump(record, file)


def test_the_collapse_watch_reads_the_whole_batch_under_two_processes(launched, tmp_path):
    """JT*'s and AELFs' logged norms and natural accuracy, and the collapse check, are the whole
    batch's, not rank 0's rows."""
    root, proc = launched
    watch_a_batch([tmp_path / 'one.json'])
    one = json.loads((tmp_path / 'one.json').read_text())
    two = json.loads((root / 'watch').read_text())
    assert two.keys() == one.keys() and two['collapse_warning'] == one['collapse_warning'] is True
    for key in ('f_norm', 'f_adv_norm', 'train_acc_nat'):
        assert two[key] == pytest.approx(one[key], rel=1e-6), (key, one, two)


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_script_runs_under_torchrun(launched, script):
    root, proc = launched
    out = root / script[:-3]
    assert (out / 'last.pt').is_file() and (out / 'final.json').is_file(), proc.stderr[-3000:]
    assert len(read_log(out)) == 1
    import fcntl                      # the lock file stays, free for the next run
    with open(out / '.lock') as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_process_that_fails_alone_ends_the_run_with_its_line_and_the_others_with_one(data_dir, tmp_path):
    """Two nodes of one process each (torchrun's environment, set by hand), the second without
    the data on its disk: both stop within seconds, each with one line: the second its own
    error, naming its rank, the first that it lost the other (gloo's closed connection)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    procs = []
    for rank, data in ((0, data_dir), (1, tmp_path / 'no-data-on-this-node')):
        env = dict(os.environ, OMP_NUM_THREADS='1', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port),
                   WORLD_SIZE='2', RANK=str(rank), LOCAL_RANK='0', LOCAL_WORLD_SIZE='1')
        procs.append(subprocess.Popen([sys.executable, str(ROOT / 'train_at.py'), *map(str, QUICK),
                                       '--data-dir', str(data), '--out', str(tmp_path / 'r')],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2], errs
    lines = [[l for l in e.splitlines() if l.strip()] for e in errs]
    assert len(lines[1]) == 1 and lines[1][0].startswith(
        f"error (rank 1): could not load mnist from '{tmp_path / 'no-data-on-this-node'}'"), errs[1]
    assert len(lines[0]) == 1 and lines[0][0].startswith("error: the run's processes lost each other"), errs[0]


def test_more_processes_than_gpus_is_said_by_every_process_of_the_node(monkeypatch):
    """torchrun --nproc_per_node 4 on a node of 2 GPUs: every process of the node (its first
    prints it), not only the processes without a GPU, stops with the one line."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    for name in ('rank', 'world', 'shared'):
        monkeypatch.setattr(common.DIST, name, getattr(common.DIST, name))
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
    for rank in range(4):
        monkeypatch.setenv('RANK', str(rank))
        monkeypatch.setenv('LOCAL_RANK', str(rank))
        with pytest.raises(common.UserError, match='--nproc-per-node 4 asks for a GPU per process but this node has 2'):
            common.setup(argparse.Namespace(device='cuda', seed=0))


@pytest.mark.parametrize('script', SCRIPTS)
def test_amp_runs_every_training_step_in_bfloat16_and_scores_in_float32(script, data_dir, tmp_path, monkeypatch):
    """--amp on the CPU: what the first convolution computes in the training steps (train mode)
    is bfloat16, what it computes for the validation and test predictions (eval mode, no
    gradient) float32. A step that builds the autocast context but never enters it fails."""
    seen = []
    real = common.build_model

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        first.register_forward_hook(lambda m, i, out: seen.append((m.training, torch.is_grad_enabled(), out.dtype)))
        return model
    monkeypatch.setattr(common, 'build_model', spy)
    run_ok(script, '--data-dir', data_dir, *QUICK, *OWN.get(script, []), '--amp', '--out', tmp_path / 'r')
    training = {dtype for train, _, dtype in seen if train}
    scoring = {dtype for train, grad, dtype in seen if not train and not grad}
    assert training == {torch.bfloat16}, seen
    assert torch.float32 in scoring, seen
    final = json.loads((tmp_path / 'r' / 'final.json').read_text())
    assert 0 <= final['last']['test_adv'] <= final['last']['test_nat'] <= 100


def test_per_image_draws_are_per_process_and_decisions_shared(monkeypatch):
    """Under several processes each process re-seeds its own RNG per epoch (random starts, crops,
    flips: rank 0's equal one process's), and the shared generator (the shuffle, AGAIN's coin) is
    seeded alike on every process."""
    args = argparse.Namespace(seed=8, lr=0.1, milestones=[])
    draws, shared = [], []
    for rank in (0, 1):
        monkeypatch.setattr(common.DIST, 'rank', rank)
        monkeypatch.setattr(common.DIST, 'shared', torch.Generator())
        common.start_epoch(3, args)
        draws.append(torch.rand(4))
        shared.append(torch.rand(4, generator=common.DIST.shared))
    monkeypatch.setattr(common.DIST, 'rank', 0)
    monkeypatch.setattr(common.DIST, 'shared', None)
    common.start_epoch(3, args)
    assert torch.equal(draws[0], torch.rand(4)) and not torch.equal(draws[0], draws[1])
    assert torch.equal(shared[0], shared[1])


def test_shards_cover_every_batch_once_in_the_same_order(monkeypatch):
    split = common.Split(torch.arange(50, dtype=torch.uint8).reshape(50, 1, 1, 1), torch.arange(50))
    for world in (1, 2, 3):
        shards = []
        for rank in range(world):
            monkeypatch.setattr(common.DIST, 'rank', rank)
            monkeypatch.setattr(common.DIST, 'world', world)
            monkeypatch.setattr(common.DIST, 'shared', torch.Generator().manual_seed(5) if world > 1 else None)
            torch.manual_seed(5)
            shards.append([y.tolist() for _, y in common.batches(split, 25, shuffle=True)])
        for b in range(2):
            rows = [shards[r][b] for r in range(world)]
            assert sorted(sum(rows, [])) == sorted(shards[0][b] if world == 1 else sum(rows, []))
            assert max(map(len, rows)) - min(map(len, rows)) <= 1
        whole = [sum((shards[r][b] for r in range(world)), []) for b in range(2)]
        if world == 1:
            one = whole
        assert whole == one                   # the same order and batches as one process


# host-device synchronisations a training step may make: the one read of the progress line
# (common.check_finite); AGAIN reads its i/N draw (a CPU scalar, no device sync) as well; AELFs
# trains as many steps again in its ST phase, each with its own read
SYNCS_PER_STEP = {'train_again.py': 2, 'train_aelfs.py': 2}


@pytest.mark.parametrize('script', SCRIPTS)
def test_a_training_step_reads_the_device_once(script, data_dir, tmp_path, monkeypatch):
    """Counts Tensor.item / tolist / __float__ / __int__ (each a host-device sync on a
    GPU) over 2 and over 6 training steps of one epoch: the 4 steps more may add one read each
    (AELFs' CollapseWatch included: it reads the device only at its checks)."""
    counts = []
    for train_size in (64, 192):
        calls = [0]
        for name in ('item', 'tolist', '__float__', '__int__'):
            real = getattr(torch.Tensor, name)

            def counted(self, *a, _real=real, **k):
                calls[0] += 1
                return _real(self, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, counted)
        run_ok(script, '--data-dir', data_dir, *QUICK, *OWN.get(script, []), '--train-size', train_size,
               '--val-size', '0', '--out', tmp_path / str(train_size))
        monkeypatch.undo()
        counts.append(calls[0])
    per_step = (counts[1] - counts[0]) / 4
    assert per_step <= SYNCS_PER_STEP.get(script, 1), f"{per_step} host-device reads per training step"


@pytest.mark.parametrize('script', SCRIPTS + ['train_at.py --standard'])
def test_every_script_keeps_best_pt_by_its_validation_score(script, data_dir, tmp_path, monkeypatch):
    """best.pt is chosen by val_worst (ST: val_nat), never val_adv: validation_metrics gives three
    different numbers, and every call of Run.save must hand on the right one."""
    script, *flags = script.split()
    monkeypatch.setattr(common, 'validation_metrics',
                        lambda model, val, attack, args: {'val_nat': 1.0, 'val_adv': 2.0, 'val_worst': 3.0}
                        if attack is not None else {'val_nat': 1.0})
    scores = []
    real = common.Run.save

    def spy(self, *args, **kwargs):
        scores.append(kwargs['score'] if 'score' in kwargs else args[4])
        return real(self, *args, **kwargs)
    monkeypatch.setattr(common.Run, 'save', spy)
    run_ok(script, '--data-dir', data_dir, *QUICK, *OWN.get(script, []), *flags, '--out', tmp_path / 'r')
    assert scores == [1.0 if flags else 3.0], scores
