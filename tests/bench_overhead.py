"""Measure a training script's speed against the bare model work it does (README "Speed").

    OMP_NUM_THREADS=1 taskset -c 0 python tests/bench_overhead.py --script train_jt.py
    python tests/bench_overhead.py --script train_att_id.py --profile -- --model cnn_b
    python tests/bench_overhead.py --script train_at.py --compile        # torch.compile'd model

Runs the real script in this process for two epochs on the first ``--batches`` x 128 real
MNIST training images (../shared/data), cnn_b at ``--width`` (0.25, the README's CPU protocol),
with the script's own defaults otherwise; flags after ``--`` go to the script. While it runs,
a forward pre-hook on the model's first stage records every pass the training loop of epoch 2
makes, as (kind, batch shape):

    attack   eval mode, gradients on (a PGD step: forward + gradient w.r.t. the input)
    train    train mode, gradients on (a forward whose loss is backpropagated to the weights)
    forward  gradients off (e.g. TRADES' clean logits for its KL attack)

"Bare" replays exactly those passes on random batches already in memory, with nothing else
between them: each attack pass is a forward and ``torch.autograd.grad`` w.r.t. the input, each
run of train passes is summed into one loss with one backward and one SGD step; it is timed
``--reps`` times and the median kept. "Script" is the images per second the script logs for
epoch 2 (its epoch 1 pays the one-off warm-up). The gap is the loop's overhead (data slicing,
``.item()`` syncs, logging, the method's extra arithmetic). Timings on a shared 2-core
machine move by about 10%, so read small overheads as noise.

With ``--profile`` the training loop of epoch 2 runs under torch.profiler and the operators
that take the most time are printed (the overhead column is then left out: the profiler
slows the script, not the bare loop).

With ``--compile MODE`` the script's model and the bare loop's model are compiled with
``common.compile_model`` (torch.compile of ``features`` / ``forward_heads``; MODE default,
reduce-overhead or max-autotune); epoch 1 of the script pays the compilation, epoch 2 is the
compiled steady state, and the output adds the script's epoch-1 seconds and whole wall time.
The bare loop's attack passes then hold the weights as constants, as attacks.pgd does.

Not a test (pytest does not collect it). AELFs needs an ST checkpoint: one epoch of
``train_at.py --standard`` on the same images is run first and passed as ``--init``.
"""
import argparse
import collections
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import cifar_as_is  # noqa: E402,F401  (the GPU script's synthetic CIFAR files load; tests/ is on the path)


class PassRecorder:
    """Patches common.build_model / start_epoch / accuracy to record the training passes of the
    epoch ``record_epoch`` (0-based) and, optionally, profile them."""

    def __init__(self, record_epoch=1, profile=False, hook=True):
        self.record_epoch, self.profile, self.use_hook = record_epoch, profile, hook
        self.passes, self.recording, self.args, self.profiler = [], False, None, None
        self._originals = {}

    @torch._dynamo.disable     # under --compile: runs eagerly, outside (and not guarding) the graph
    def _hook(self, module, inputs):
        if not self.recording:
            return
        x = inputs[0]
        if not torch.is_grad_enabled():
            kind = 'forward'
        elif module.training:
            kind = 'train'
        else:
            kind = 'attack'
        self.passes.append((kind, tuple(x.shape)))

    def __enter__(self):
        build_model, start_epoch, accuracy = common.build_model, common.start_epoch, common.accuracy
        self._originals = dict(build_model=build_model, start_epoch=start_epoch, accuracy=accuracy)

        def recording_build_model(args, device, **extra):
            model = build_model(args, device, **extra)
            self.args = args
            if self.use_hook:
                model.stages[0].register_forward_pre_hook(self._hook)
            return model

        def recording_start_epoch(epoch, *a, **kw):
            self.recording = epoch == self.record_epoch
            if self.recording:
                self.passes = []
                if self.profile:
                    self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    self.profiler.__enter__()
            return start_epoch(epoch, *a, **kw)

        def recording_accuracy(*a, **kw):
            self.recording = False
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                self.table = self.profiler.key_averages().table(sort_by='self_cpu_time_total', row_limit=15)
                self.total_us = sum(e.self_cpu_time_total for e in self.profiler.key_averages())
                self.profiler = None
            return accuracy(*a, **kw)

        common.build_model, common.start_epoch, common.accuracy = (
            recording_build_model, recording_start_epoch, recording_accuracy)
        return self

    def __exit__(self, *exc):
        for name, fn in self._originals.items():
            setattr(common, name, fn)


def run_script(path, argv):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def bare_seconds(args, passes, device, reps, compile_mode=None):
    """Median seconds of replaying ``passes`` (one epoch's) with nothing else in between."""
    torch.manual_seed(0)
    model = common.compile_model(common.build_model(args, device), compile_mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    fmt = torch.channels_last
    inputs = {shape: torch.rand(shape, device=device).contiguous(memory_format=fmt)
              for _, shape in passes}
    labels = {shape: torch.randint(0, 10, shape[:1], device=device) for _, shape in passes}

    def weights_need_grad(flag):      # common.compile_model's passes freeze the weights in attacks
        pass

    def epoch():
        loss = None
        for i, (kind, shape) in enumerate(passes):
            x, y = inputs[shape], labels[shape]
            weights_need_grad(kind != 'attack')
            if kind == 'attack':
                model.eval()
                x = x.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
            elif kind == 'forward':
                model.eval()
                with torch.no_grad():
                    model(x)
            else:
                model.train()
                term = F.cross_entropy(model(x), y)
                loss = term if loss is None else loss + term
                if i + 1 == len(passes) or passes[i + 1][0] != 'train':
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    loss = None
        if device.type == 'cuda':
            torch.cuda.synchronize()

    epoch()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--script', default='train_at.py')
    p.add_argument('--width', type=float, default=0.25)
    p.add_argument('--batches', type=int, default=10, help='training batches of 128 per epoch')
    p.add_argument('--reps', type=int, default=15, help='timed repetitions of the bare epoch')
    p.add_argument('--device', default='cpu')
    p.add_argument('--data-dir', default=str(ROOT.parent / 'shared' / 'data'))
    p.add_argument('--profile', action='store_true', help='profile the training loop of epoch 2')
    p.add_argument('--compile', choices=common.COMPILE_MODES,
                   help='torch.compile the model (script and bare loop) with common.compile_model')
    p.add_argument('script_args', nargs='*', help='flags for the script (after --)')
    a = p.parse_args()
    device = torch.device(a.device)
    script = str(ROOT / a.script)
    prepare = common.prepare_model
    rec = PassRecorder(profile=a.profile, hook=not a.compile)

    def prepare_compiled(model, dev):
        """The script's model compiled (the bare loop's is compiled in bare_seconds). Its passes
        are recorded by wrappers around the compiled callables, outside the graphs: a hook on
        stages[0] would sit inside them and break each graph in two."""
        model = common.compile_model(prepare(model, dev), a.compile)
        for name in ('features', 'forward_heads'):
            if name in vars(model):
                def recorded(x, *args, _fn=vars(model)[name], **kw):
                    rec._hook(model, (x,))
                    return _fn(x, *args, **kw)
                setattr(model, name, recorded)
        return model
    if a.compile:
        common.prepare_model = prepare_compiled
    with tempfile.TemporaryDirectory() as tmp:
        base = ['--data-dir', a.data_dir, '--width', str(a.width), '--train-size', str(128 * a.batches),
                '--test-size', '128', '--val-size', '128', '--epochs', '2', '--batch-size', '128',
                '--device', a.device]
        extra = list(a.script_args)
        if Path(a.script).name == 'train_aelfs.py' and '--init' not in extra:
            run_script(str(ROOT / 'train_at.py'), base + ['--standard', '--epochs', '1', '--out', tmp + '/st'])
            extra += ['--init', tmp + '/st/last.pt']
        with rec:
            t0 = time.perf_counter()
            run_script(script, base + extra + ['--out', tmp + '/run'])
            script_wall = time.perf_counter() - t0
        common.prepare_model = prepare
        log = [json.loads(line) for line in open(tmp + '/run/log.jsonl')]
    script_ips = log[-1]['images_per_s']
    n_images = 128 * a.batches
    bare_ips = n_images / bare_seconds(rec.args, rec.passes, device, a.reps, a.compile)
    per_batch = collections.Counter(kind for kind, _ in rec.passes)
    out = {'script': a.script, 'script_args': extra, 'width': a.width, 'device': a.device,
           'threads': torch.get_num_threads(), 'channels_last': True,
           'passes_per_batch': {k: round(v / a.batches, 2) for k, v in per_batch.items()},
           'pass_shapes': sorted({f'{k} {list(s)}' for k, s in rec.passes}),
           'bare_images_per_s': round(bare_ips, 1), 'script_images_per_s': round(script_ips, 1),
           'script_seconds_per_batch': round(128 / script_ips, 3),
           'overhead_percent': None if a.profile else round(100 * (bare_ips / script_ips - 1), 1),
           'compile': a.compile, 'script_epoch1_seconds': round(log[0]['seconds'], 1),
           'script_wall_seconds': round(script_wall, 1)}
    if a.profile:
        print(rec.table)
        print(f"profiled self CPU time: {rec.total_us / 1e6:.2f} s")
    print(json.dumps(out))


if __name__ == '__main__':
    main()
