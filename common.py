"""Small shared plumbing for every train_*.py and eval.py: data, device, flags, checkpoints, logs.

Nothing here knows about a method: losses, update orders and schedules live in the scripts.

Data path: the whole split is held as a uint8 tensor on the training device; batches are index
slices of it, converted to float in [0, 1] (and, for CIFAR, randomly cropped and flipped) on the
device. There is no DataLoader and no per-sample Python in the hot loop.
"""
import argparse
import atexit
import functools
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import attacks
import models
from attacks import pgd


class UserError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a job scheduler's stop), raised where the program is, like Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


COMMAND = []     # the running script's command line (script file and its arguments)


def command_line(add=(), drop=('--overwrite',)):
    """The running script's command as a user would type it again, with the flags ``add``
    (and without ``drop``)."""
    words = [w for w in COMMAND if w not in drop] + [a for a in add if a not in COMMAND]
    return 'python ' + shlex.join(words)


def main_guard(main):
    """Run ``main`` so that a UserError ends the program with one line, and Ctrl-C (SIGINT) or
    SIGTERM with one line saying what the run folder keeps and the command that continues it.
    Either way the folder's lock is released and no temporary file is left."""
    @functools.wraps(main)
    def wrapper(argv=None):
        # torchrun: the processes other than rank 0 print nothing (the flags, the run folder
        # and the errors are rank 0's too) but a traceback of their own, and the first process
        # of every other node its one-line error (its own disk may lack the data, its node the
        # GPUs): "error (rank R): ...", the line torchrun's report of a failed rank leaves out
        quiet = os.environ.get('RANK', '0') not in ('', '0')
        streams = sys.stdout, sys.stderr
        if quiet:
            sys.stdout = sys.stderr = open(os.devnull, 'w')
        try:
            return guarded(argv, streams[1] if quiet and os.environ.get('LOCAL_RANK') == '0' else None)
        finally:
            if quiet:
                sys.stdout.close()
                sys.stdout, sys.stderr = streams

    def guarded(argv, node_errors):
        held, runs = len(FolderLock.held), len(Run.active)
        script = os.path.basename(getattr(sys.modules.get(main.__module__), '__file__', None) or 'script.py')
        COMMAND[:] = [script, *map(str, sys.argv[1:] if argv is None else argv)]
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            if node_errors:
                print(f"error (rank {os.environ['RANK']}): {e}", file=node_errors, flush=True)
            sys.exit(2)
        except KeyboardInterrupt as e:
            name = 'SIGTERM' if isinstance(e, Terminated) else 'SIGINT'
            run = Run.active[-1] if len(Run.active) > runs else None
            if run is None:
                print(f"interrupted ({name})", file=sys.stderr)
            elif run.saved_epoch:
                print(f"interrupted ({name}): {run.dir} keeps epoch {run.saved_epoch} in last.pt; "
                      f"continue with: {command_line(['--resume'])}", file=sys.stderr)
            else:
                print(f"interrupted ({name}) before the first epoch ended: {run.dir} holds no "
                      f"checkpoint; run the same command again", file=sys.stderr)
            sys.exit(143 if name == 'SIGTERM' else 130)
        finally:       # the run folders this call locked are free again (main called in-process)
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
            del Run.active[runs:]
            for lock in FolderLock.held[held:]:
                lock.release()
    return wrapper


# ----------------------------------------------------------------------------------- datasets

@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    in_channels: int
    native_size: int
    files: tuple   # what torchvision expects on disk, relative to --data-dir


DATASETS = {
    'mnist': DatasetInfo(10, 1, 28, ('MNIST/raw/train-images-idx3-ubyte', 'MNIST/raw/train-labels-idx1-ubyte',
                                     'MNIST/raw/t10k-images-idx3-ubyte', 'MNIST/raw/t10k-labels-idx1-ubyte')),
    'cifar10': DatasetInfo(10, 3, 32, tuple(f'cifar-10-batches-py/{f}' for f in
                                            ['data_batch_1', 'data_batch_2', 'data_batch_3',
                                             'data_batch_4', 'data_batch_5', 'test_batch',
                                             'batches.meta'])),
    'cifar100': DatasetInfo(100, 3, 32, ('cifar-100-python/train', 'cifar-100-python/test',
                                         'cifar-100-python/meta')),
}


@dataclass
class Split:
    """A dataset split held on the device: x uint8 (N x C x H x W), y int64 (N)."""
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self):
        return self.y.shape[0]

    def head(self, n):
        """The first n examples (all when n is None or larger than the split)."""
        if n is None or n >= len(self):
            return self
        return Split(self.x[:n], self.y[:n])


def _torchvision_dataset(name, root, train):
    """Load through torchvision, downloading when the files are missing."""
    from torchvision import datasets
    if name == 'mnist':
        return datasets.MNIST(root, train=train, download=True)
    # torchvision verifies CIFAR files by md5 before it will read them; here a file that
    # exists is read as is (so hand-placed or synthetic files in the same layout load), and
    # torchvision's download (which does check the archive's md5) runs only when files are missing.
    base = datasets.CIFAR10 if name == 'cifar10' else datasets.CIFAR100

    class Cifar(base):
        def _check_integrity(self):
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f))
                       for f, _ in self.train_list + self.test_list + [(self.meta['filename'], '')])

        def _load_meta(self):
            with open(os.path.join(self.root, self.base_folder, self.meta['filename']), 'rb') as f:
                self.classes = pickle.load(f, encoding='latin1')[self.meta['key']]
    return Cifar(root, train=train, download=True)


def read_split(name, data_dir, train):
    """(x uint8 N x C x H x W, y int64) of a whole split, on the CPU, at its native size."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose from {', '.join(DATASETS)}")
    info = DATASETS[name]
    try:
        ds = _torchvision_dataset(name, data_dir, train)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
        expected = ', '.join(os.path.join(data_dir, f) for f in info.files)
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load {name} from {data_dir!r} ({reason}); when offline, "
                        f"place torchvision's files there by hand: {expected}") from None
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # N x C x H x W
    return x, torch.as_tensor(ds.targets, dtype=torch.long)


def make_split(x, y, image_size=None, device='cpu'):
    """A Split of (x, y) on ``device``, resized (bilinear, once) when ``image_size`` differs from
    the native size (MNIST 28 -> 32 for CNN_B, AELF Appendix C)."""
    if image_size and image_size != x.shape[-1]:
        out = []
        for chunk in x.split(8192):
            r = torch.nn.functional.interpolate(chunk.float(), size=(image_size, image_size),
                                                mode='bilinear', align_corners=False)
            out.append(r.round_().clamp_(0, 255).to(torch.uint8))
        x = torch.cat(out) if out else x.new_zeros((0, x.shape[1], image_size, image_size))
    return Split(x.contiguous().to(device), y.to(device))


def load_split(name, data_dir, train, image_size=None, device='cpu', size=None):
    """Return a Split of dataset ``name`` ('mnist', 'cifar10', 'cifar100') on ``device``:
    the first ``size`` examples (all when None), resized to ``image_size`` (see make_split)."""
    x, y = read_split(name, data_dir, train)
    if size is not None:
        x, y = x[:size], y[:size]
    return make_split(x, y, image_size, device)


def to_float(x_uint8, channels_last=False):
    """uint8 batch -> float32 in [0, 1] (on the batch's device)."""
    x = x_uint8.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def augment(x, padding):
    """CIFAR augmentation on a float batch, on its device: random crop with zero padding
    ``padding`` and random horizontal flip, each drawn per sample from the global RNG."""
    b, c, h, w = x.shape
    if padding > 0:
        xp = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
        dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        bidx = torch.arange(b, device=x.device)[:, None, None, None]
        cidx = torch.arange(c, device=x.device)[None, :, None, None]
        x = xp[bidx, cidx, rows, cols]
    flip = torch.rand(b, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def batches(split, batch_size, shuffle=False, padding=None, channels_last=False):
    """Yield (x float in [0, 1], y) mini-batches sliced from a Split on its device.
    ``shuffle`` draws the order from the global RNG (seeded per epoch by ``seed_epoch``);
    ``padding`` (not None) turns on the CIFAR crop + flip augmentation.

    Under torchrun (several processes, README "Several GPUs") ``batch_size`` is the global
    batch: every process draws the same order and augmentation for the whole batch, keeps its
    rows of it (``DIST.bounds``) and records them in ``attacks.BATCH_ROWS``, so that random
    starts are drawn for the whole batch too (``attacks.noise_like``)."""
    n = len(split)
    order = torch.randperm(n, device=split.y.device) if shuffle else None
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        idx = rows if order is None else order[rows]
        total = rows.stop - rows.start
        lo, hi = DIST.bounds(total)
        if padding is None and DIST.active:      # no per-image draw: slice before converting
            idx, lo, hi = (slice(start + lo, start + hi) if order is None else idx[lo:hi]), 0, hi - lo
        xb, yb = to_float(split.x[idx]), split.y[idx]
        if padding is not None:
            xb = augment(xb, padding)
        if DIST.active:
            xb, yb = xb[lo:hi], yb[lo:hi]
            attacks.BATCH_ROWS = DIST.bounds(total) + (total,)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yield xb, yb
    attacks.BATCH_ROWS = None


# ------------------------------------------------------------------------ device, seed, amp

def get_device(name):
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available: use --device cpu")
    return torch.device(name)


# --------------------------------------------------------- several processes (torchrun, DDP)

class Distributed:
    """The processes of one run launched by ``torchrun --nproc_per_node N script.py FLAGS``
    (nanoGPT's pattern; README "Several GPUs"): torchrun's RANK / LOCAL_RANK / WORLD_SIZE say
    which one this is; plain ``python script.py`` is rank 0 of 1 and nothing below changes it.

    Data parallel, written out instead of wrapped (``DistributedDataParallel`` would hide the
    model behind ``.module`` from the attacks and refuses AELF's two backward passes of one
    step): every process holds the data and the model, draws the same random numbers for the
    whole batch, trains on its rows of it (``bounds``), and before each optimizer step the
    gradients are summed over the processes, each weighted by its share of the batch
    (``sync_gradients``), so a step equals one process's step on the whole batch up to float
    summation order. BatchNorm's batch statistics are the whole batch's (``sync_batchnorm``).
    Rank 0 alone writes the run folder and prints."""
    rank, local_rank, world, device = 0, 0, 1, None

    @property
    def active(self):
        return self.world > 1

    @property
    def main(self):
        return self.rank == 0

    def bounds(self, n):
        """(start, stop) of this process's rows of a batch of ``n``: consecutive, as even as
        possible (torch.tensor_split's rule)."""
        q, r = divmod(n, self.world)
        start = self.rank * q + min(self.rank, r)
        return start, start + q + (self.rank < r)

    def all_reduce(self, tensor):
        """Sum ``tensor`` over the processes, in place (a no-op for one process)."""
        if self.active:
            self._together(torch.distributed.all_reduce, tensor)
        return tensor

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process (pickled; for decisions and checkpoints)."""
        if not self.active:
            return obj
        box = [obj if self.main else None]
        self._together(torch.distributed.broadcast_object_list, box, src=0)
        return box[0]

    @staticmethod
    def _together(collective, *args, **kwargs):
        """A collective; when it fails (most often a process that stopped: gloo's "Connection
        closed by peer"), one line instead of a traceback on every other process."""
        try:
            collective(*args, **kwargs)
        except RuntimeError as e:
            reason = re.sub(r'^\[[^\]]*\]\s*', '', (str(e).strip().splitlines() or [type(e).__name__])[0])[:200]
            raise UserError(f"the run's processes lost each other, most often because one stopped "
                            f"(its line 'error (rank R): ...' or its traceback says why): {reason}") from None


DIST = Distributed()


def setup_distributed(device_name):
    """The device of this process (``get_device``), and under torchrun the process group: NCCL on
    CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on the CPU. Every script calls it first."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return get_device(device_name)
    DIST.rank, DIST.local_rank, DIST.world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), world
    device = get_device(device_name)
    if device.type == 'cuda':
        local_world = int(os.environ.get('LOCAL_WORLD_SIZE', DIST.local_rank + 1))
        if local_world > torch.cuda.device_count():     # said alike by every process of the node
            raise UserError(f"--nproc-per-node {local_world} asks for a GPU per process but this node "
                            f"has {torch.cuda.device_count()}: at most {torch.cuda.device_count()}")
        device = torch.device('cuda', DIST.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        atexit.register(torch.distributed.destroy_process_group)
    DIST.device = device
    return device


def sync_gradients(params):
    """Sum the ``.grad`` of ``params`` over the processes, each weighted by its share of the
    current batch (``attacks.BATCH_ROWS``): the gradient of the whole batch's mean loss. One
    all-reduce of one flat buffer; a gradient that is None on every process stays None."""
    params = [p for p in params if p.requires_grad]
    share = _batch_share()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [has]).mul_(share)
    DIST.all_reduce(flat)
    used = flat[-len(params):] > 0
    for p, g, u in zip(params, flat[:-len(params)].split([g.numel() for g in grads]), used.tolist()):
        p.grad = g.view_as(p).clone() if u else None


def distributed_optimizer(optimizer):
    """``optimizer``, whose ``step`` first sums its parameters' gradients over the processes
    (``sync_gradients``) under torchrun; unchanged for one process. Wrap every optimizer whose
    gradients come from the batch (AWP's proxy included)."""
    if DIST.active:
        params = [p for group in optimizer.param_groups for p in group['params']]
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: sync_gradients(params))
    return optimizer


def _batch_share():
    """This process's share of the current batch (its rows / the batch's)."""
    rows = attacks.BATCH_ROWS
    return (rows[1] - rows[0]) / rows[2] if rows else 1.0 / DIST.world


class _SumOverProcesses(torch.autograd.Function):
    """all-reduce (sum) with its gradient. Each process backpropagates its own mean loss and
    ``sync_gradients`` weights the result by its share w of the batch afterwards, so the gradient
    arriving here from the other processes is weighted by theirs and divided by ours:
    (sum_r w_r g_r) / w, which ``sync_gradients``' weighting turns back into sum_r w_r g_r."""
    @staticmethod
    def forward(ctx, x):
        return DIST.all_reduce(x.clone())

    @staticmethod
    def backward(ctx, grad):
        share = _batch_share()
        return DIST.all_reduce(grad * share) / share


def _synced_batch_norm(self, x):
    """BatchNorm2d's training forward with the statistics of the whole batch: the per-channel
    sums, then the sums of squared deviations, all-reduced (with their gradient) over the
    processes (two passes, as exact as one process's)."""
    if not self.training:
        return torch.nn.BatchNorm2d.forward(self, x)
    xf = x.float()
    c = x.shape[1]
    sums = _SumOverProcesses.apply(torch.cat([xf.sum((0, 2, 3)), xf.new_full((1,), x.numel() / c)]))
    n = sums[-1]
    mean = sums[:c] / n
    centred = xf - mean[None, :, None, None]
    var = _SumOverProcesses.apply((centred * centred).sum((0, 2, 3))) / n
    with torch.no_grad():
        self.num_batches_tracked += 1
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - m).add_(m * mean.detach())
        self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1))
    out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
    if self.affine:
        out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
    return out.to(x.dtype)


def sync_batchnorm(model):
    """Under torchrun, every BatchNorm2d of ``model`` normalises with the whole batch's
    statistics (SyncBatchNorm's rule, which torch offers on GPUs only); the state dict is
    unchanged. A no-op for one process."""
    import types
    if DIST.active:
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.track_running_stats:
                m.forward = types.MethodType(_synced_batch_norm, m)
    return model


def batch_means(n, *losses):
    """The floats the progress line and the NaN guard read: each loss (a batch mean on this
    process's ``n`` rows) as the mean over the whole batch, the same on every process. One
    host-device synchronisation for all of them."""
    values = torch.stack([l.detach().float().reshape(()) for l in losses])
    if DIST.active:
        rows = attacks.BATCH_ROWS
        DIST.all_reduce(values.mul_(n / rows[2] if rows else 1.0 / DIST.world))
    return values.tolist()


def sum_over_processes(*numbers):
    """Per-epoch counts and sums (loss sum, correct, seen ...) summed over the processes."""
    if not DIST.active:
        return numbers
    t = DIST.all_reduce(torch.tensor(numbers, dtype=torch.float64, device=DIST.device))
    return tuple(type(v)(s) for v, s in zip(numbers, t.tolist()))


def seed_everything(seed):
    torch.manual_seed(seed)


def seed_epoch(seed, epoch):
    """Re-seed the global RNG at the start of each epoch, so that shuffling, augmentation and
    random starts of epoch e are the same whether or not the run was resumed before e."""
    torch.manual_seed(seed * 100003 + epoch)


def autocast(device, enabled):
    """bfloat16 autocast when ``enabled`` (--amp), on CUDA and on the CPU alike (the CPU path is
    what the tests run; on a CPU without bfloat16 instructions it is slower, not faster)."""
    device = torch.device(device)
    if enabled and device.type in ('cuda', 'cpu'):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def use_channels_last(device):
    """Whether models and batches use the channels_last (NHWC) memory format on ``device``:
    on CUDA (cuDNN's fast convolutions) and on CPU (oneDNN's: about 1.3x faster training of the
    --quick cnn_b, README "Speed"). Outputs are the same up to float
    rounding (tests/test_models.py)."""
    return torch.device(device).type in ('cuda', 'cpu')


def prepare_model(model, device):
    """Move to device, in channels_last where ``use_channels_last`` says so."""
    device = torch.device(device)
    model = model.to(device)
    if use_channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    return sync_batchnorm(model)      # several processes: the whole batch's BatchNorm statistics


COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune')


def compile_model(model, mode):
    """torch.compile the model's passes in place (``--compile MODE``); ``mode`` None leaves it
    eager. README "Speed" has what it gains and costs per script.

    The feature extractor ``model.features`` (c of the c/w split: every conv, norm and pool) and,
    for AGAIN's models, ``model.forward_heads`` are replaced on this instance by compiled
    versions of themselves; ``model(x)`` runs the compiled ``features`` and the eager linear
    ``fc``. The parameters, buffers, state_dict, train()/eval() and the c/w split are the
    model's own, so checkpoints and the scripts' code are unchanged. Call it last: a deepcopy
    made afterwards would share the compiled passes of this instance. Each combination of
    train/eval mode, gradient mode and frozen weights compiles once, for every batch size (the
    first batches of each are slow);
    ``mode='reduce-overhead'`` adds CUDA graphs on a GPU."""
    if not mode:
        return model
    if mode not in COMPILE_MODES:
        raise UserError(f"--compile {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    import torch._dynamo
    config = torch._dynamo.config
    for name in ('recompile_limit', 'cache_size_limit'):    # (modes x grad x shapes) > 8 entries
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
    # One graph per phase (train/eval mode x gradient mode x weights frozen by an attack), not per
    # batch shape: the batch dimension is symbolic, so the epoch's last, smaller batch, the
    # evaluation batches and a process's shard reuse it (a batch of 1 specialises: its own graph).
    # fullgraph=True: a graph break is an error, not a silent fall-back to eager code.
    model.features = _batch_generic(torch.compile(model.features, mode=mode, fullgraph=True))
    if getattr(model, 'ase', None) is not None:
        model.forward_heads = _batch_generic(torch.compile(model.forward_heads, mode=mode, fullgraph=True))
    model.compiled = mode         # attacks.pgd then traces its passes with the weights as constants
    return model


def _batch_generic(compiled):
    """``compiled`` called with dimension 0 of its tensor arguments (the batch) marked dynamic."""
    import torch._dynamo

    def call(*args, **kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and a.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return compiled(*args, **kwargs)
    return call


def lr_at(epoch, base_lr, milestones, gamma=0.1):
    """Multi-step schedule: base_lr * gamma^(number of milestones <= epoch), epochs from 0.
    E.g. milestones [20, 40]: epochs 0-19 at lr, 20-39 at lr/10, 40+ at lr/100 (AELF App. C)."""
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr


def check_finite(loss, epoch, step):
    """Stop with one line on a NaN/inf loss instead of training on garbage."""
    if not math.isfinite(float(loss)):
        raise UserError(f"loss became {float(loss)} at epoch {epoch + 1}, step {step}: lower "
                        f"--lr, or turn off --amp; the run folder keeps the last finished epoch")


@torch.no_grad()
def _predict(model, x):
    return model(x).argmax(1)


def correct(model, split, attack=None, batch_size=500, device=None, amp=False):
    """Per-example correctness (bool tensor) of ``model`` on ``split`` in eval mode; ``attack``
    is a callable (model, x, y) -> x_adv applied to each batch first."""
    device = torch.device(device or split.y.device)
    was_training = model.training
    model.eval()
    out = []
    try:
        for x, y in batches(split, batch_size, channels_last=use_channels_last(device)):
            with autocast(device, amp):
                if attack is not None:
                    x = attack(model, x, y)
                out.append(_predict(model, x) == y)
    finally:
        model.train(was_training)
    mine = torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=device)
    if not DIST.active:
        return mine
    # several processes: each judged its rows of every batch; put them in place and sum
    rows = [torch.arange(start + DIST.bounds(min(batch_size, len(split) - start))[0],
                         start + DIST.bounds(min(batch_size, len(split) - start))[1])
            for start in range(0, len(split), batch_size)]
    every = torch.zeros(len(split), dtype=torch.int32, device=device)
    if rows:
        every[torch.cat(rows).to(device)] = mine.int()
    return DIST.all_reduce(every).bool()


def accuracy(model, split, attack=None, batch_size=500, amp=False):
    """Accuracy in percent (eval mode, batched); see ``correct``."""
    c = correct(model, split, attack, batch_size, amp=amp)
    return 100.0 * c.sum().item() / len(c) if len(c) else float('nan')


def validation_metrics(model, val_set, attack, args):
    """The per-epoch validation numbers: natural accuracy (val_nat), accuracy under the script's
    PGD ``attack`` (val_adv), and the per-image worst case of that PGD and of a PGD on the CW
    margin from a random start with the same eps, steps and step size (val_worst), which chooses
    best.pt. A model that masks its gradients (a saturated softmax gives the cross-entropy no
    gradient, a training attack's fixed start no direction) keeps a high val_adv that val_worst
    does not give it: the margin has a gradient where the softmax is flat, and the random start
    leaves the point where the gradient was trained away (tests/test_common.py builds such a
    model by hand)."""
    def cw_random_start(m, x, y):
        return pgd(m, x, y, args.eps, args.steps, args.step_size, random_start=True, loss='cw')
    by_pgd = correct(model, val_set, attack)          # float32 even under --amp, as eval.py
    by_cw = correct(model, val_set, cw_random_start)
    return {'val_nat': accuracy(model, val_set),
            'val_adv': 100.0 * by_pgd.sum().item() / len(by_pgd),
            'val_worst': 100.0 * (by_pgd & by_cw).sum().item() / len(by_pgd)}


# ----------------------------------------------------------- the embedding-collapse guard

class CollapseWatch:
    """Watches a run whose loss penalises the embedding norm (AELFs, JT*) for the collapse a too
    large beta causes: the embeddings shrink towards 0 and the frozen classifier sees uniform
    logits. Per epoch it gives the mean l2 norms of f (natural) and f' (adversarial) and the
    natural-half training accuracy for log.jsonl. It prints one warning line (once per run) when
    the natural training accuracy over the last ``window`` steps stays near chance (below twice
    chance) or the mean ||f|| over the last ``norm_window`` steps is below a tenth of its value
    at the first step (the norm is smooth, so a short window sees a collapse that happens late in
    an epoch, which a 20-step window averages with the steps before it). It checks at the end of every epoch and, so that a long
    first epoch does not hide a collapse, after step ``early_check`` of the first."""

    def __init__(self, num_classes, hint, window=20, norm_window=5, early_check=50):
        self.num_classes, self.hint = num_classes, hint
        self.window, self.norm_window, self.early_check = window, norm_window, early_check
        self.start = None           # the first step's sums (below)
        self.warned = False
        self.recent = []            # the sums of the last steps
        self.epoch_steps = 0
        self._reset()

    def _reset(self):
        self.epoch = 0              # sum ||f||, images, sum ||f'||, adversarial images, correct
        self.epoch_steps = 0

    @torch.no_grad()
    def step(self, f, f_adv, logits_nat, y_nat, epoch_index=None):
        """One training step's embeddings, kept on the device (read only at the checks) as sums
        over this process's rows: under torchrun the checks sum them over the processes, so the
        numbers are the whole batch's."""
        norms = f.float().flatten(1).norm(dim=1)
        adv = f_adv.float().flatten(1).norm(dim=1)
        sums = torch.stack([norms.sum(), norms.new_full((), len(norms)), adv.sum(),
                            adv.new_full((), len(adv)), (logits_nat.argmax(1) == y_nat).sum().float()])
        if self.start is None:
            self.start = sums
        self.epoch = self.epoch + sums
        self.recent = (self.recent + [sums])[-self.window:]
        self.epoch_steps += 1
        if epoch_index == 0 and self.epoch_steps == self.early_check:
            self.check()

    def check(self):
        """True when the recent steps look collapsed; warns the first time."""
        if not self.recent:
            return False
        sums = DIST.all_reduce(torch.stack([self.start, *self.recent])).tolist()
        start_norm = sums[0][0] / max(sums[0][1], 1)
        recent = [(s[0] / max(s[1], 1), 100.0 * s[4] / max(s[1], 1)) for s in sums[1:]]
        last = recent[-self.norm_window:]
        norm = sum(n for n, _ in last) / len(last)
        acc = sum(a for _, a in recent) / len(recent)
        chance = 100.0 / self.num_classes
        reasons = []
        if acc < 2 * chance:
            reasons.append(f"natural training accuracy {acc:.1f}% is near chance ({chance:.0f}%)")
        if start_norm and norm < 0.1 * start_norm:
            reasons.append(f"mean ||f|| fell from {start_norm:.3g} to {norm:.3g}")
        if reasons and not self.warned:
            self.warned = True
            print(f"WARNING: the embeddings are collapsing ({'; '.join(reasons)}): {self.hint}",
                  flush=True)
        return bool(reasons)

    def end_epoch(self, epoch_index):
        """Fields for the epoch's log record; prints the warning (once per run) if needed."""
        f, n, f_adv, n_adv, correct = (DIST.all_reduce(self.epoch.clone()).tolist()
                                       if torch.is_tensor(self.epoch) else [0.0] * 5)
        record = {'f_norm': f / max(n, 1), 'f_adv_norm': f_adv / max(n_adv, 1),
                  'train_acc_nat': 100.0 * correct / max(n, 1), 'collapse_warning': self.check()}
        self._reset()
        return record


# ------------------------------------------------------------------------------------- flags

def aelf_protocol(dataset, model=None, standard=False):
    """Defaults of AELF Appendix C for ``dataset`` (shared by AT, ST, JT, TRADES, AELF, AELFs).
    MNIST: CNN_B at 32x32, 50 epochs, lr 0.1 x0.1 after 20 and 40, PGD(0.3, 16, 0.02).
    CIFAR-10: CNN_B, crop (padding 2) + flip, 160 epochs (ST: 100), lr steps at 50, 100 (ST: 40,
    80), PGD(0.031, 5, 0.01), weight decay 2e-4 for CNN_B. CIFAR-100: WRN-28-10, PGD(0.03, 7,
    0.0075). Batch 128, SGD momentum 0.9, lr 0.1, weight decay 5e-4, seed 8, no random start."""
    p = dict(batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, seed=8, random_start=False,
             val_size=1000)
    if dataset == 'mnist':
        p.update(model='cnn_b', epochs=50, milestones=[20, 40], eps=0.3, steps=16, step_size=0.02,
                 padding=None)
    elif dataset in ('cifar10', 'cifar100'):
        p.update(model='cnn_b' if dataset == 'cifar10' else 'wrn', padding=2)
        p.update(epochs=100, milestones=[40, 80]) if standard else p.update(epochs=160, milestones=[50, 100])
        if dataset == 'cifar10':
            p.update(eps=0.031, steps=5, step_size=0.01)
        else:
            p.update(eps=0.03, steps=7, step_size=0.0075, depth=28, widen_factor=10)
        if dataset == 'cifar10' and (model or p['model']) == 'cnn_b':
            p.update(weight_decay=2e-4)
    return p


def doc_title(doc):
    """A script's --help description: the first paragraph of its docstring, in one line."""
    return ' '.join(doc.split('\n\n')[0].split())


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with the value every flag takes: its default, or, for a flag whose default depends
    on the dataset (argparse default None), the values protocol_help wrote into its help."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help or ''
        return super()._get_help_string(action)


DATASET_VARIANTS = {name: ['--dataset', name] for name in DATASETS}


def _show(value):
    if value is None:
        return 'none'
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ' '.join(map(_show, value)) if value else 'none'
    return str(value)


def protocol_help(parser, resolve, variants=None):
    """Write into the help of every flag that a dataset's protocol fills in (argparse default
    None) the value it takes for each variant ({label: argv}, default: each dataset), found by
    resolving that argv with the script's own ``resolve`` (what parse_args runs), so that help
    and behaviour cannot disagree (tests/test_train_at.py checks it)."""
    variants = {**(variants or DATASET_VARIANTS), 'quick': ['--quick']}
    resolved = {label: vars(resolve(parser.parse_args(argv))) for label, argv in variants.items()}
    for action in parser._actions:
        if action.default is not None or not action.option_strings or action.dest == 'help':
            continue
        values = {label: r.get(action.dest) for label, r in resolved.items()}
        if all(v is None for v in values.values()):
            continue
        shown = {label: 'all' if v is None and action.dest.endswith('_size') else _show(v)
                 for label, v in values.items()}
        if len(set(shown.values())) == 1:
            text = f"default: {next(iter(shown.values()))}"
        else:
            text = 'default: ' + '; '.join(f"{label} {v}" for label, v in shown.items())
        action.help = f"{action.help} ({text})" if action.help else f"({text})"
    return resolved


def add_common_args(parser):
    """The flags every train_*.py shares. Defaults left as None are filled by the script's
    protocol (``finish_args``) for the chosen dataset."""
    g = parser.add_argument_group('data and model')
    g.add_argument('--dataset', default='mnist', choices=sorted(DATASETS), help='dataset')
    g.add_argument('--data-dir', default='./data', help='torchvision root')
    g.add_argument('--model', choices=sorted(models.ARCHITECTURES), help='architecture')
    g.add_argument('--act', choices=['relu', 'leakyrelu'], help='activation (cnn_b, resnet18, vgg16, wrn)')
    g.add_argument('--slope', type=float, default=0.01, help='LeakyReLU negative slope')
    g.add_argument('--width', type=float, help='channel multiplier (cnn_b, resnet18, vgg16)')
    g.add_argument('--depth', type=int, help='WRN depth (34, 28, 40)')
    g.add_argument('--widen-factor', type=int, help='WRN widen factor')
    g.add_argument('--dropout', type=float, default=0.0, help='WRN dropout')
    g.add_argument('--blocks', type=int, default=5,
                   help='residual blocks per stage of cifar_resnet / att_resnet')
    g.add_argument('--image-size', type=int, help='input side (MNIST: 32 for cnn_b, 28 otherwise)')
    g.add_argument('--padding', type=int, help='CIFAR random-crop zero padding')
    g.add_argument('--train-size', type=int, help='use the first N training images')
    g.add_argument('--test-size', type=int, help='use the first N test images')
    g.add_argument('--val-size', type=int,
                   help='training images held out as the validation split (the same seeded choice '
                        'for every script and seed), never trained on: evaluated after each epoch '
                        'and used to choose best.pt; 0: no validation, last.pt only')
    g = parser.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, help='training epochs')
    g.add_argument('--lr', type=float, help='learning rate')
    g.add_argument('--milestones', type=int, nargs='*', help='epochs where lr is multiplied by 0.1')
    g.add_argument('--batch-size', type=int, help='mini-batch size')
    g.add_argument('--momentum', type=float, help='SGD momentum')
    g.add_argument('--weight-decay', type=float, help='weight decay')
    g = parser.add_argument_group('training attack (l-inf PGD)')
    g.add_argument('--eps', type=float, help='l-inf radius')
    g.add_argument('--steps', type=int, help='PGD steps')
    g.add_argument('--step-size', type=float, help='PGD step size')
    g.add_argument('--eps-warmup', type=int, metavar='E',
                   help='training attack: eps and step size scaled by epoch/E over the first E epochs '
                        '(epochs counted from 1; 0: the full eps from the start)')
    g.add_argument('--random-start', action=argparse.BooleanOptionalAction, default=None,
                   help='start PGD at a uniform random point of the ball')
    g = parser.add_argument_group('run')
    g.add_argument('--quick', action='store_true',
                   help='MNIST on a laptop CPU: the protocol of the README\'s results table (cnn_b '
                        'width 0.25, 8,000 training images, 8 epochs, lr x0.1 after 4 and 6, the '
                        'papers\' 16 PGD steps of eps/15 but at eps 0.2, not their 0.3: step 0.0133; the '
                        'test on the first 1,000 test images), not the paper\'s; '
                        'any flag given overrides it')
    g.add_argument('--seed', type=int, help='random seed')
    g.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'], help='auto: cuda if available')
    g.add_argument('--amp', action='store_true',
                   help='bfloat16 autocast of the training steps (CUDA and CPU); validation and test in float32')
    g.add_argument('--compile', nargs='?', const='default', choices=COMPILE_MODES, metavar='MODE',
                   help='torch.compile the model; bare --compile means "default" (README "Speed": '
                        'faster on the CPU after a compilation of 10-50 s; reduce-overhead adds '
                        'CUDA graphs on a GPU; %(choices)s)')
    g.add_argument('--out', help='run folder (default runs/<script>-<dataset>-<model>-s<seed>)')
    g.add_argument('--resume', action='store_true', help='continue from <out>/last.pt')
    g.add_argument('--overwrite', action='store_true', help='replace a finished run in <out>')
    return parser


# --quick: the small MNIST protocol of the README's results table, on top of a script's protocol
# and its AutoAttack. Its PGD keeps the papers' 16 steps of eps/15 but at eps 0.2, not their 0.3: at
# 0.3 and this length TRADES, AELF and AT-id leave with masked gradients (AutoAttack 8-62% where
# PGD-20 says 36-72%), at 0.2 AutoAttack stays within 5 points of PGD-20 (README, "Masked gradients")
QUICK = dict(width=0.25, train_size=8000, test_size=1000, epochs=8, milestones=[4, 6],
             eps=0.2, step_size=0.0133)
QUICK_PAPER_EPS = 0.3       # the papers' MNIST eps, which --quick departs from (start-up line)


# The values every numeric flag of the train_*.py scripts may take, as intervals ('inf' =
# unbounded). Outside them a run stops at parse time with one line: NaN, infinities and signs
# that mean nothing (a negative lr, a momentum of 1 or more, an eps beyond the [0, 1] pixel
# range) never reach the training loop. Upper bounds keep out values that cannot be meant
# (a width or an image side that would not fit in any memory). Each script adds its own flags.
RANGES = {
    'width': '(0, 16]', 'slope': '[0, 1)', 'depth': '[10, 100]', 'widen_factor': '[1, 20]',
    'dropout': '[0, 1)', 'blocks': '[1, 50]', 'image_size': '[8, 512]', 'padding': '[0, 32]',
    'train_size': '[1, inf)', 'test_size': '[1, inf)', 'val_size': '[0, inf)',
    'epochs': '[1, 100000]', 'lr': '(0, 10]', 'milestones': '[1, 100000]',
    'batch_size': '[1, 100000]', 'momentum': '[0, 1)', 'weight_decay': '[0, 1)',
    'eps': '[0, 1]', 'steps': '[0, 10000]', 'step_size': '[0, 1]', 'seed': '[0, 4294967295]',
    'eps_warmup': '[0, 100000]',
}


def check_ranges(parser, args, ranges):
    """Stop with argparse's one-line usage error when a flag's value (each value of a list) is
    not a finite number inside its interval of ``ranges`` ({dest: '[lo, hi)' ...}); unset
    (None) values are skipped."""
    for dest, interval in ranges.items():
        value = getattr(args, dest, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        left, lo, hi, right = re.fullmatch(r'([\[(])\s*(\S+),\s*(\S+)\s*([\])])', interval).groups()
        lo, hi = float(lo), float(hi)
        for v in values:
            if v is None:
                continue
            inside = (math.isfinite(v) and (v >= lo if left == '[' else v > lo)
                      and (v <= hi if right == ']' else v < hi))
            if not inside:
                parser.error(f"--{dest.replace('_', '-')} {v:g}: must be a number in {interval}")


def finish_args(parser, args, protocol):
    """Fill every flag left unset from ``protocol`` (a dict of defaults; with --quick, QUICK
    over it), then validate. Bad values end with argparse's one-line usage error."""
    if args.quick:
        if args.dataset != 'mnist':
            parser.error('--quick is an MNIST preset: leave it out for --dataset ' + args.dataset)
        protocol = {**protocol, **QUICK}
    for key, value in protocol.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.width is None:
        args.width = 1.0
    if args.eps_warmup is None:
        args.eps_warmup = 0
    if args.act is None:
        args.act = 'leakyrelu' if args.model == 'cnn_b' else 'relu'
    if args.depth is None:
        args.depth = 34
    if args.widen_factor is None:
        args.widen_factor = 10
    if args.image_size is None:
        args.image_size = 32 if args.model != 'madry_cnn' else DATASETS[args.dataset].native_size
    check_ranges(parser, args, RANGES)
    checks = [
        (list(args.milestones) == sorted(args.milestones), '--milestones must be increasing'),
        (not (args.resume and args.overwrite), '--resume and --overwrite exclude each other'),
        (args.image_size % 8 == 0 or args.model not in ('cnn_b',), 'cnn_b needs --image-size a multiple of 8'),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return args


def model_kwargs(args):
    """Constructor arguments of the model the flags describe."""
    if args.model == 'cnn_b':
        return dict(width=args.width, act=args.act, slope=args.slope)
    if args.model == 'madry_cnn':
        return dict(image_size=args.image_size)
    if args.model in ('resnet18', 'vgg16'):
        return dict(width=args.width, act=args.act, slope=args.slope)
    if args.model == 'wrn':
        return dict(depth=args.depth, widen_factor=args.widen_factor, dropout=args.dropout,
                    act=args.act, slope=args.slope)
    if args.model in ('cifar_resnet', 'att_resnet'):
        return dict(blocks=args.blocks)
    raise UserError(f"unknown model {args.model!r}")


def build_model(args, **extra):
    info = DATASETS[args.dataset]
    try:
        return models.build(args.model, info.num_classes, info.in_channels,
                            **model_kwargs(args), **extra)
    except ValueError as e:
        raise UserError(str(e)) from None


VAL_SEED = 20260101     # the validation split's own seed: one split per dataset, whatever --seed


def validation_indices(n, val_size):
    """Indices (sorted) of the ``val_size`` training images held out of ``n``: a random choice
    fixed by VAL_SEED, so every script and every --seed holds out the same images."""
    g = torch.Generator().manual_seed(VAL_SEED)
    return torch.randperm(n, generator=g)[:val_size].sort().values


def load_data(args, device):
    """(train, val, test) Splits on ``device`` as the flags describe. ``val``: --val-size images
    of the training split, held out (validation_indices) and never trained on; ``train``: the
    first --train-size of the remaining training images, in their order; ``test``: the first
    --test-size test images, read only after the last epoch (Run.finish)."""
    x, y = read_split(args.dataset, args.data_dir, True)
    if len(y) - args.val_size < args.batch_size:
        left = max(len(y) - args.val_size, 0)
        raise UserError(f"--val-size {args.val_size} leaves {left} of the {len(y)} images of "
                        f"{args.dataset}'s training split for training, fewer than one batch "
                        f"(--batch-size {args.batch_size}): choose a smaller --val-size")
    held = validation_indices(len(y), args.val_size)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[held] = False
    rest = keep.nonzero().squeeze(1)[:args.train_size]
    val = make_split(x[held], y[held], args.image_size, device)
    train = make_split(x[rest], y[rest], args.image_size, device)
    test = load_split(args.dataset, args.data_dir, False, args.image_size, device, size=args.test_size)
    return train, val, test


def data_summary(train, val, test):
    """The start-up line's account of the data: what is trained on, held out and tested."""
    held = f"{len(val)} held out for validation" if len(val) else "no validation split: last.pt only"
    return f"{len(train)} train, {held}, {len(test)} test"


def attack_summary(args):
    warmup = f" (eps warm-up over {args.eps_warmup} epochs)" if getattr(args, 'eps_warmup', 0) else ''
    return f"PGD({args.eps:g}, {args.steps}, {args.step_size:g}{', rand' if args.random_start else ''}){warmup}"


def eps_scale(epoch, warmup):
    """The eps warm-up (--eps-warmup E): the factor on the training attack's eps and step size in
    epoch ``epoch`` (counted from 0): (epoch + 1) / E for the first E epochs, then 1. Validation
    and test attacks always take the full eps."""
    return 1.0 if warmup <= 0 else min(1.0, (epoch + 1) / warmup)


# ----------------------------------------------------------------------------------- writes

RESUME_HINT = "the run folder keeps its last finished epoch: free some space, then add --resume"


def _free_space(path):
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path)) or '.').free
    except OSError:
        return 'unknown space'
    for unit in ('bytes', 'KB', 'MB', 'GB'):
        if free < 1024 or unit == 'GB':
            return f"{free:.0f} {unit}" if unit == 'bytes' else f"{free:.1f} {unit}"
        free /= 1024


def write_failed(path, error, hint=RESUME_HINT):
    """The one-line UserError for a write of ``path`` that failed (a full disk, a missing or
    read-only folder): the reason, the free space where the file goes, and what to do."""
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:        # torch.save reports a full disk as a RuntimeError ('... file write failed')
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    return UserError(f"cannot write {path}: {reason} ({_free_space(path)} free there); {hint}")


def write_atomically(path, write, hint=RESUME_HINT):
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``: the
    previous file stays whole until the new one is complete. If the write fails (a full disk)
    or is interrupted, the temporary file is removed and a write failure is one line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, (OSError, RuntimeError)):
            raise write_failed(path, e, hint) from None
        raise


def write_text(path, text, hint=RESUME_HINT):
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    write_atomically(path, write, hint)


def append_line(path, line, hint=RESUME_HINT):
    """Append one line; if the write fails, the file is cut back to what it held before."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, 'a') as f:
            f.write(line + '\n')
    except OSError as e:
        try:
            os.truncate(path, size)
        except OSError:
            pass
        raise write_failed(path, e, hint) from None


def save_picture(tensor, path, **kwargs):
    """torchvision's save_image, written atomically (one line if the disk is full)."""
    from torchvision.utils import save_image
    ext = os.path.splitext(path)[1].lstrip('.').lower() or 'png'
    write_atomically(path, lambda tmp: save_image(tensor, tmp, format=ext, **kwargs),
                     hint='free some space and run eval.py again')


# ------------------------------------------------------------------------------ checkpoints

CKPT_FORMAT = 'adv-training-checkpoint-v1'


def _on_cpu(obj):
    """A copy of ``obj`` (nested dicts, lists, tuples) with every tensor moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def save_checkpoint(path, model, args, epoch, optimizer=None, metrics=None, finished=False, **extra):
    """Atomically write everything needed to rebuild and continue: model name and constructor
    arguments, state dict, the script's args, epoch (number of finished epochs), optimizer
    state (a state_dict or a dict of them), last metrics, ``finished``, and ``extra``."""
    payload = {
        'format': CKPT_FORMAT,
        'model': model.arch_name,
        'model_kwargs': dict(model.arch_kwargs),
        'state_dict': {k: v.detach().cpu() for k, v in model.state_dict().items()},
        'args': {k: v for k, v in vars(args).items()},
        'epoch': epoch,
        'optimizer': _on_cpu(optimizer),     # loads on a machine without the training GPU
        'metrics': metrics or {},
        'finished': finished,
        **extra,
    }
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


def resolve_checkpoint(path):
    """A checkpoint file for ``path``: the path itself, or for a run folder its best.pt (else its
    last.pt), said in one line; a folder without either is listed in the error."""
    path = str(path)
    if not os.path.isdir(path):
        return path
    for name in ('best.pt', 'last.pt'):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            print(f"note: {path} is a run folder: using {candidate}", file=sys.stderr, flush=True)
            return candidate
    held = sorted(n for n in os.listdir(path) if n != FolderLock.NAME)
    raise UserError(f"{path} is a folder without best.pt or last.pt (it holds: "
                    f"{', '.join(held[:12]) + (' ...' if len(held) > 12 else '') if held else 'nothing'}); "
                    f"pass a checkpoint file")


def load_checkpoint(path):
    """Read a checkpoint written by ``save_checkpoint`` (on CPU); one-line errors otherwise.
    A run folder stands for its best.pt (see resolve_checkpoint)."""
    path = resolve_checkpoint(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged file
        raise UserError(f"checkpoint {path!r} is not readable ({type(e).__name__}): the file is "
                        f"corrupt or not a checkpoint of this repo; re-run the training") from None
    if not isinstance(ckpt, dict) or ckpt.get('format') != CKPT_FORMAT:
        raise UserError(f"{path!r} is not a checkpoint of this repo (no '{CKPT_FORMAT}' format tag)")
    return ckpt


def model_from_checkpoint(ckpt, device='cpu', path='checkpoint'):
    """Rebuild the model a checkpoint was saved from and load its weights."""
    try:
        model = models.build(ckpt['model'], **ckpt['model_kwargs'])
        model.load_state_dict(ckpt['state_dict'])
    except (ValueError, TypeError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot rebuild the model saved in {path!r}: {first}") from None
    return prepare_model(model, device)


def load_weights_into(model, path):
    """Copy the weights of checkpoint ``path`` into ``model``, which must be the same
    architecture with the same constructor arguments (else a one-line error)."""
    ckpt = load_checkpoint(path)
    ours = (model.arch_name, dict(model.arch_kwargs))
    theirs = (ckpt.get('model'), dict(ckpt.get('model_kwargs', {})))
    if ours != theirs:
        raise UserError(f"{path!r} holds {describe(*theirs)} but this run builds {describe(*ours)}: "
                        f"pass a checkpoint trained with the same --model/--width/--act")
    model.load_state_dict(ckpt['state_dict'])
    return ckpt


def describe(name, kwargs):
    return f"{name}({', '.join(f'{k}={v}' for k, v in sorted(kwargs.items()))})"


# ------------------------------------------------------------------------------- run folder

class Run:
    """The run folder: last.pt (every epoch), best.pt (the epoch with the best validation score),
    log.jsonl (one JSON object per epoch), final.json (both tested once, after the last epoch),
    and the console lines.

    A folder that holds a checkpoint is never silently replaced: without --resume or
    --overwrite the run stops with one line. --resume continues from last.pt (RNG is re-seeded
    per epoch, so the result equals an uninterrupted run). A run holds the folder's lock (see
    FolderLock) for its whole life, so a second run on the same folder stops at once."""

    def __init__(self, args, script):
        self.args, self.script = args, script
        if args.out is None:
            args.out = os.path.join('runs', f"{script}-{args.dataset}-{args.model}-s{args.seed}")
        self.dir = args.out
        self.last, self.best = os.path.join(self.dir, 'last.pt'), os.path.join(self.dir, 'best.pt')
        self.log_path = os.path.join(self.dir, 'log.jsonl')
        self.resume_ckpt = None
        self.best_score = None
        self.saved_epoch = 0                  # the epoch last.pt holds (said if interrupted)
        Run.active.append(self)
        error = None
        if DIST.main:
            try:
                self._open(args)
            except UserError as e:
                error = e
        # several processes: rank 0 holds the folder; the others follow its decision
        error_text, self.resume_ckpt, self.best_score, self.saved_epoch = DIST.broadcast(
            (error and str(error), self.resume_ckpt, self.best_score, self.saved_epoch))
        if DIST.main and error:
            raise error
        if error_text:
            raise UserError(error_text)
        self.start = time.time()

    active = []        # the Runs of the running main (main_guard names the folder if interrupted)

    def _open(self, args):
        """Rank 0: create and lock the folder; decide between a new run, --resume and --overwrite."""
        if getattr(args, 'quick', False):
            print("--quick: a small MNIST protocol (" + ', '.join(
                f"{k.replace('_', '-')} {_show(v)}" for k, v in QUICK.items()) + "), not the paper's "
                f"protocol (its eps: {QUICK_PAPER_EPS}): the README's Results give its expected numbers",
                flush=True)
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            raise write_failed(self.dir, e, "choose another --out") from None
        self.lock = FolderLock(self.dir)      # before anything in the folder is read or removed
        if os.path.exists(self.last) and args.overwrite:
            for p in (self.last, self.best, self.log_path, os.path.join(self.dir, 'final.json')):
                if os.path.exists(p):
                    os.remove(p)
        elif os.path.exists(self.last):
            ckpt = self._read_last()
            state = 'a finished run' if ckpt.get('finished') else f"a run stopped after epoch {ckpt['epoch']}"
            if args.resume:
                self.resume_ckpt = ckpt
                self.best_score = ckpt.get('best_score')
                self.saved_epoch = ckpt['epoch']
                self._trim_log(ckpt['epoch'])
            else:
                raise UserError(f"{self.dir} holds {state}: pass --resume to continue it, "
                                f"--overwrite to start again, or --out to use another folder")
        elif args.resume:
            raise UserError(f"nothing to resume: {self.last} does not exist")

    def _read_last(self):
        """last.pt, or one line saying it is unreadable and whether best.pt can take its place."""
        try:
            return load_checkpoint(self.last)
        except UserError as e:
            reason = str(e)
        try:
            best = load_checkpoint(self.best) if os.path.exists(self.best) else None
        except UserError:
            best = None
        if best is None:
            raise UserError(f"{reason.split(': the file is')[0]}, and there is no readable best.pt: "
                            f"start again with {command_line(['--overwrite'], drop=('--resume',))}")
        raise UserError(f"{reason.split(': the file is')[0]}; {self.best} (epoch {best['epoch']}) is intact: "
                        f"continue from it with  cp {shlex.quote(self.best)} {shlex.quote(self.last)} "
                        f"&& {command_line(['--resume'])}")

    def _trim_log(self, epoch):
        """Drop log lines of epochs after the checkpoint's (a run killed between writing an
        epoch's line and its checkpoint would otherwise log that epoch twice after --resume)."""
        if not os.path.exists(self.log_path):
            return
        with open(self.log_path) as f:
            lines = f.readlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line)['epoch'] <= epoch:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                pass                      # a line cut short by the kill
        if len(keep) != len(lines):
            write_text(self.log_path, ''.join(keep))

    @property
    def tested(self):
        """final.json written after the last epoch: last.pt and best.pt of this run tested."""
        try:
            with open(os.path.join(self.dir, 'final.json')) as f:
                done = json.load(f)['last']['epoch'] == self.args.epochs
        except (OSError, ValueError, KeyError, TypeError):
            done = False
        return DIST.broadcast(done)

    @property
    def start_epoch(self):
        return self.resume_ckpt['epoch'] if self.resume_ckpt else 0

    def resume(self, model, load_optimizer):
        """Load model weights and hand the saved optimizer state to ``load_optimizer``.
        Returns the saved extra state (dict) or None when not resuming."""
        if self.resume_ckpt is None:
            return None
        ckpt = self.resume_ckpt
        ours = (model.arch_name, dict(model.arch_kwargs))
        if (ckpt['model'], dict(ckpt['model_kwargs'])) != ours:
            raise UserError(f"{self.last} holds {describe(ckpt['model'], ckpt['model_kwargs'])}, "
                            f"not {describe(*ours)}: resume with the flags of the original run")
        model.load_state_dict(ckpt['state_dict'])
        load_optimizer(ckpt['optimizer'])
        print(f"resuming {self.dir} after epoch {ckpt['epoch']}")
        return ckpt

    def log_epoch(self, record, total_epochs):
        """Append one JSON line and print one console line with an ETA (rank 0)."""
        if not DIST.main:
            return
        append_line(self.log_path, json.dumps(record))
        done = record['epoch'] - self.start_epoch
        left = total_epochs - record['epoch']
        eta = (time.time() - self.start) / max(done, 1) * left
        parts = [f"epoch {record['epoch']}/{total_epochs}", f"lr {record['lr']:.4g}",
                 f"loss {record['train_loss']:.4f}", f"train {record['train_acc']:.2f}%"]
        if record.get('val_nat') is not None:
            parts.append(f"val nat {record['val_nat']:.2f}%")
        if record.get('val_adv') is not None:
            parts.append(f"adv {record['val_adv']:.2f}%")
        if record.get('val_worst') is not None:
            parts.append(f"worst {record['val_worst']:.2f}%")
        if record.get('f_norm') is not None:
            parts.append(f"||f|| {record['f_norm']:.3g} ||f'|| {record['f_adv_norm']:.3g}")
        parts += [f"{record['seconds']:.1f}s", f"{record['images_per_s']:.0f} img/s",
                  f"ETA {format_seconds(eta)}"]
        print(' | '.join(parts), flush=True)

    def save(self, model, epoch, optimizer, metrics, score, finished=False, **extra):
        """Write last.pt every epoch, and best.pt when ``score`` (the validation split's robust
        accuracy for adversarial methods, natural accuracy for ST) beats the best so far; with
        ``score`` None (--val-size 0) there is no best.pt."""
        improved = score is not None and (self.best_score is None or score > self.best_score)
        if improved:
            self.best_score = score
        extra.update(best_score=self.best_score, script=self.script)
        # best.pt first: if a write fails (a full disk), last.pt still holds the previous epoch
        # and its best_score names the best.pt on disk or the one --resume writes again
        if DIST.main and improved:
            save_checkpoint(self.best, model, self.args, epoch, optimizer, metrics, finished, **extra)
        if DIST.main:
            save_checkpoint(self.last, model, self.args, epoch, optimizer, metrics, finished, **extra)
        self.saved_epoch = epoch

    def finish(self, model, test_set, attack):
        """After the last epoch, the only time a run reads the test split: the accuracy of
        last.pt (``model`` as it is now) and of best.pt, natural and under ``attack``, into
        final.json ({'last': {...}, 'best': {...}}, each with its epoch) and one line. Scored
        in float32 whether or not the run trained with --amp, as eval.py scores."""
        def test(m):
            return {'test_nat': accuracy(m, test_set),
                    'test_adv': accuracy(m, test_set, attack)}
        last_epoch = DIST.broadcast(load_checkpoint(self.last)['epoch'] if DIST.main else None)
        result = {'test_images': len(test_set), 'last': {'epoch': last_epoch, **test(model)}}
        best = DIST.broadcast(load_checkpoint(self.best) if DIST.main and os.path.exists(self.best) else None)
        if best is not None:
            if best['epoch'] == last_epoch:
                result['best'] = dict(result['last'])
            else:
                device = next(model.parameters()).device
                result['best'] = {'epoch': best['epoch'],
                                  **test(model_from_checkpoint(best, device, self.best).eval())}
            result['best']['val_score'] = best['best_score']
        if not DIST.main:
            return result
        write_text(os.path.join(self.dir, 'final.json'), json.dumps(result, indent=1),
                   hint="last.pt and best.pt are complete: free some space, then add --resume "
                        "to write final.json")
        parts = [f"{name}.pt (epoch {r['epoch']}): test nat {r['test_nat']:.2f}%, adv {r['test_adv']:.2f}%"
                 for name, r in ((n, result.get(n)) for n in ('last', 'best')) if r]
        print(f"done in {format_seconds(time.time() - self.start)} ({len(test_set)} test images): "
              + '; '.join(parts) + f" -> {self.dir}", flush=True)
        return result


class FolderLock:
    """An exclusive lock on a run folder while the script's ``main`` runs: ``<dir>/.lock``, locked
    with flock (taken atomically by the kernel and released by it when the process ends, even
    after kill -9) and holding the owner's pid, host and start time. A second process stops at
    once with one line naming the owner; a lock file left by a process that is gone is taken
    over with one line saying so. The file is removed when ``main`` returns or fails (main_guard)
    or, at the latest, when this process exits normally. Where
    the platform has no flock (Windows), runs go without the lock."""

    NAME = '.lock'
    held = []          # the locks this process holds, oldest first

    def __init__(self, folder):
        self.path, self.fd = os.path.join(folder, self.NAME), None
        try:
            import fcntl
        except ImportError:      # no flock (Windows): run without the lock rather than not at all
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise write_failed(self.path, e, "free some space (or choose another --out), then "
                                                 "run the same command again") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._read(fd)
                os.close(fd)
                raise UserError(f"{folder} is in use by another run ({owner}): wait for it to end "
                                f"or use another --out") from None
            try:   # the file we locked must still be the one at the path (not unlinked meanwhile)
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = self._read(fd)
        if previous:
            print(f"note: {folder} had a lock of a run that is gone ({previous}); taking it over",
                  flush=True)
        try:
            self._write_owner(fd)
        except OSError as e:          # a full disk: no lock file is left behind
            os.unlink(self.path)
            os.close(fd)
            raise write_failed(self.path, e, "the run folder is as it was: free some space, then "
                                             "run the same command again") from None
        self.fd = fd
        FolderLock.held.append(self)
        atexit.register(self.release)

    @staticmethod
    def _write_owner(fd):
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                                 'started': time.strftime('%Y-%m-%d %H:%M:%S')}).encode())
        os.fsync(fd)

    @staticmethod
    def _read(fd):
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096).decode(errors='replace').strip()
        if not raw:
            return ''
        try:
            info = json.loads(raw)
            return f"process {info['pid']} on {info['host']}, started {info['started']}"
        except (ValueError, KeyError, TypeError):
            return raw[:200]

    def release(self):
        if self.fd is None:
            return
        if self in FolderLock.held:
            FolderLock.held.remove(self)
        try:
            os.unlink(self.path)           # unlink while holding the lock, then let it go
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


class Progress:
    """A short progress line inside long epochs (at most every ``every`` seconds)."""

    def __init__(self, total_steps, every=30.0):
        self.total, self.every = total_steps, every
        self.t0 = self.last = time.time()

    def step(self, i, images, loss):
        now = time.time()
        if now - self.last >= self.every:
            self.last = now
            rate = images / max(now - self.t0, 1e-9)
            print(f"  step {i}/{self.total} loss {loss:.4f} {rate:.0f} img/s", flush=True)


def format_seconds(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
