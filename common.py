"""Small shared plumbing for every train_*.py and eval.py: flags, data, device, several processes, checkpoints, the run
folder. Nothing here knows a method: losses, update orders and schedules live in the scripts. A split lives on the
device as uint8; batches are index slices, made float (for CIFAR cropped, flipped) there: no DataLoader.
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
from collections import namedtuple
from dataclasses import dataclass

import torch

import models
from attacks import pgd


class UserError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


COMMAND = []     # the running script's command line (script file and its arguments)


def command_line(add=(), drop=('--overwrite',)):
    """The running script's command as a user would type it again, with ``add``, without ``drop``."""
    return 'python ' + shlex.join([w for w in COMMAND if w not in drop] + [a for a in add if a not in COMMAND])


def main_guard(main):
    """``main`` ended by a UserError with one line, by Ctrl-C or SIGTERM with what the run folder keeps and
    the command that continues it. Under torchrun only rank 0 prints, and each node's first its error."""
    @functools.wraps(main)
    def wrapper(argv=None):
        quiet, streams, runs = os.environ.get('RANK', '0') not in ('', '0'), (sys.stdout, sys.stderr), len(Run.active)
        if quiet:
            sys.stdout = sys.stderr = open(os.devnull, 'w')
        script = os.path.basename(getattr(sys.modules.get(main.__module__), '__file__', None) or 'script.py')
        COMMAND[:] = [script, *map(str, sys.argv[1:] if argv is None else argv)]
        def terminate(signum, frame):   # SIGTERM (kill, a job scheduler's stop), raised where the program is
            raise KeyboardInterrupt('SIGTERM')
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, terminate) if in_main_thread else None
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            if quiet and os.environ.get('LOCAL_RANK') == '0':
                print(f"error (rank {os.environ['RANK']}): {e}", file=streams[1], flush=True)
            sys.exit(2)
        except KeyboardInterrupt as e:
            name = 'SIGTERM' if e.args == ('SIGTERM',) else 'SIGINT'
            run = Run.active[-1] if len(Run.active) > runs else None
            print(f"interrupted ({name})" + ('' if run is None else
                  f": {run.dir} keeps epoch {run.saved_epoch} in last.pt; continue with: {command_line(['--resume'])}"
                  if run.saved_epoch else f" before the first epoch ended: {run.dir} holds no checkpoint; run the "
                  f"same command again"), file=sys.stderr)
            sys.exit(143 if name == 'SIGTERM' else 130)
        finally:       # the run folders this call locked are free again (main called in-process)
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)
            for run in Run.active[runs:]:
                run.release()
            del Run.active[runs:]
            if quiet:
                sys.stdout.close()
                sys.stdout, sys.stderr = streams
    return wrapper


DatasetInfo = namedtuple('DatasetInfo', 'num_classes in_channels native_size files')   # files: torchvision's, on disk
DATASETS = {
    'mnist': DatasetInfo(10, 1, 28, tuple(f'MNIST/raw/{s}-{k}-idx{d}-ubyte' for s in ('train', 't10k')
                                          for k, d in (('images', 3), ('labels', 1)))),
    'cifar10': DatasetInfo(10, 3, 32, tuple(f'cifar-10-batches-py/{f}' for f in
                                            [*(f'data_batch_{i}' for i in range(1, 6)), 'test_batch', 'batches.meta'])),
    'cifar100': DatasetInfo(100, 3, 32, tuple(f'cifar-100-python/{f}' for f in ('train', 'test', 'meta'))),
}


@dataclass
class Split:                         # a dataset split on the device: x uint8 (N x C x H x W), y int64 (N)
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self):
        return self.y.shape[0]


def read_split(name, data_dir, train):
    """(x uint8 N x C x H x W, y int64) of a whole split on the CPU, read (downloaded if missing) by torchvision."""
    from torchvision import datasets
    try:
        ds = getattr(datasets, name.upper())(data_dir, train=train, download=True)       # MNIST, CIFAR10, CIFAR100
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load {name} from {data_dir!r} ({reason}); when offline, place torchvision's files "
                        f"there by hand: {', '.join(os.path.join(data_dir, f) for f in DATASETS[name].files)}") from None
    x = torch.as_tensor(ds.data)
    return (x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)), torch.as_tensor(ds.targets, dtype=torch.long)


def make_split(x, y, image_size=None, device='cpu'):
    """A Split on ``device``, resized once (bilinear) to ``image_size`` (MNIST 28 -> 32 for CNN_B, AELF App. C)."""
    if image_size and image_size != x.shape[-1]:
        x = torch.cat([torch.nn.functional.interpolate(c.float(), size=(image_size, image_size), mode='bilinear',
                                                       align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
                       for c in x.split(8192)] or [x.new_zeros((0, x.shape[1], image_size, image_size))])
    return Split(x.contiguous().to(device), y.to(device))


def load_split(name, data_dir, train, image_size=None, device='cpu', size=None):
    """The first ``size`` examples (None: all) of a split, resized to ``image_size``, on ``device``."""
    return make_split(*(t[:size] for t in read_split(name, data_dir, train)), image_size, device)


def to_float(x_uint8):      # float32 in [0, 1], channels_last (NHWC: cuDNN's and oneDNN's fast layout)
    return x_uint8.float().div_(255.0).contiguous(memory_format=torch.channels_last)


def augment(x, padding):
    """CIFAR's random crop (zero padding ``padding``) and horizontal flip, per image, on the device."""
    b, c, h, w = x.shape
    if padding > 0:
        dy, dx = (torch.randint(0, 2 * padding + 1, (b,), device=x.device) for _ in range(2))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = torch.nn.functional.pad(x, (padding,) * 4)[torch.arange(b, device=x.device)[:, None, None, None],
                                                        torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    flip = torch.rand(b, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x).contiguous(memory_format=torch.channels_last)


def batches(split, batch_size, shuffle=False, padding=None):
    """(x float in [0, 1], y) mini-batches of a Split on its device, shuffled, with CIFAR's crop and flip when
    ``padding`` is not None. Under torchrun every process draws the same order and keeps its share of each."""
    g, order = DIST.shared, None
    if shuffle:
        order = torch.randperm(len(split), generator=g, device='cpu' if g else split.y.device).to(split.y.device)
    for start in range(0, len(split), batch_size):
        idx = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
        if DIST.world > 1:
            idx = torch.arange(len(split), device=split.y.device)[idx].tensor_split(DIST.world)[DIST.rank]
        x = to_float(split.x[idx])
        yield (x if padding is None else augment(x, padding)), split.y[idx]


def validation_indices(n, val_size):     # the held-out images: their own seed, the same for every script and --seed
    return torch.randperm(n, generator=torch.Generator().manual_seed(20260101))[:val_size].sort().values


def load_data(args, device):
    """(train, val, test) on ``device``: val, --val-size training images never trained on; train, the first
    --train-size of the others; test, the first --test-size test images (read only by Run.finish)."""
    x, y = read_split(args.dataset, args.data_dir, True)
    if len(y) - args.val_size < args.batch_size:
        raise UserError(f"--val-size {args.val_size} leaves {max(len(y) - args.val_size, 0)} of the {len(y)} images of {args.dataset}'s "
                        f"training split for training, fewer than one batch (--batch-size {args.batch_size}): choose a smaller --val-size")
    held = validation_indices(len(y), args.val_size)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[held] = False
    rest = keep.nonzero().squeeze(1)[:args.train_size]
    return (make_split(x[rest], y[rest], args.image_size, device), make_split(x[held], y[held], args.image_size, device),
            load_split(args.dataset, args.data_dir, False, args.image_size, device, size=args.test_size))


class Processes:      # torchrun's (README "Several GPUs"); shared: a generator every process draws alike
    rank, world, shared, device = 0, 1, None, 'cpu'    # (the shuffle, AGAIN's coin); one process: None


DIST = Processes()


def setup(args):
    """This process's device, seeded; under torchrun the process group (NCCL, a GPU per process; CPU: gloo)."""
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available: use --device cpu")
    device = torch.device(args.device if args.device != 'auto' else 'cuda' if torch.cuda.is_available() else 'cpu')
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        DIST.rank, DIST.world, DIST.shared = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), torch.Generator()
        if device.type == 'cuda':
            if (n := int(os.environ.get('LOCAL_WORLD_SIZE', 1))) > torch.cuda.device_count():   # every process of a node
                raise UserError(f"--nproc-per-node {n} asks for a GPU per process but this node has "
                                f"{torch.cuda.device_count()}: at most {torch.cuda.device_count()}")
            device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
            atexit.register(torch.distributed.destroy_process_group)
        DIST.device = device
    torch.manual_seed(args.seed)
    return device


def _collective(op, *args, **kwargs):
    """A collective; when it fails (most often a process that stopped), one line, not a traceback."""
    try:
        return op(*args, **kwargs) if DIST.world > 1 else None
    except RuntimeError as e:
        reason = re.sub(r'^\[[^\]]*\]\s*', '', (str(e).strip().splitlines() or [type(e).__name__])[0])[:200]
        raise UserError(f"the run's processes lost each other, most often because one stopped "
                        f"(its line 'error (rank R): ...' or its traceback says why): {reason}") from None


def all_sum(*numbers):
    """Numbers (or one tensor, in place) summed over the processes; unchanged for one process."""
    tensor = torch.is_tensor(numbers[0])
    t = numbers[0] if tensor or DIST.world == 1 else torch.tensor(numbers, dtype=torch.float64, device=DIST.device)
    _collective(torch.distributed.all_reduce, t)
    return t if tensor else tuple(type(v)(s) for v, s in zip(numbers, t.tolist())) if DIST.world > 1 else numbers


def broadcast(obj):              # rank 0's ``obj`` on every process (the decisions about the run folder)
    box = [obj]
    _collective(torch.distributed.broadcast_object_list, box, src=0)
    return box[0]


def distributed_optimizer(optimizer):
    """``optimizer`` whose ``step`` first averages the gradients over the processes (CleanRL's flat all-reduce / world)."""
    params = [p for group in optimizer.param_groups for p in group['params']]

    def average(opt, args, kwargs):
        flat = torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten() for p in params]
                         + [torch.tensor([p.grad is not None for p in params], dtype=params[0].dtype, device=params[0].device)])
        all_sum(flat)
        for p, g, used in zip(params, flat[:-len(params)].split([p.numel() for p in params]), flat[-len(params):]):
            p.grad = (g / DIST.world).view_as(p).clone() if used > 0 else None
    if DIST.world > 1:
        optimizer.register_step_pre_hook(average)
    return optimizer


def average_buffers(model):
    """BatchNorm's running statistics averaged over the processes (on the CPU each normalises its own share)."""
    for b in model.buffers() if DIST.world > 1 else []:
        if b.is_floating_point():
            b.copy_(all_sum(b.clone()) / DIST.world)


def autocast(device, enabled):      # --amp: bfloat16 autocast, on CUDA and on the CPU alike
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def prepare_model(model, device):
    """On ``device`` in channels_last (1.3x faster on the CPU, README "Speed"); SyncBatchNorm under torchrun on CUDA."""
    model = model.to(device, memory_format=torch.channels_last)
    if torch.device(device).type == 'cuda':
        torch.backends.cudnn.benchmark = True
        if DIST.world > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_model(args, device, **extra):        # the model the flags describe, on ``device``
    info = DATASETS[args.dataset]
    try:
        return prepare_model(models.build(args.model, info.num_classes, info.in_channels, **model_kwargs(args), **extra), device)
    except ValueError as e:
        raise UserError(str(e)) from None


COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune')


def compile_model(model, mode):
    """--compile: ``features`` and AGAIN's ``forward_heads`` compiled in place, one graph per phase (batch dimension
    symbolic, fullgraph). An attack's pass (eval mode, gradients on) freezes the weights (faster: README "Speed")."""
    if not mode:
        return model
    import torch._dynamo
    for name in {'recompile_limit', 'cache_size_limit'} & set(dir(torch._dynamo.config)):   # phases > 8 graphs
        setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))

    def compiled(fn):
        graph = torch.compile(fn, mode=mode, fullgraph=True)

        def call(*args, **kwargs):
            for a in (*args, *kwargs.values()):
                if isinstance(a, torch.Tensor) and a.dim() > 0:
                    torch._dynamo.maybe_mark_dynamic(a, 0)
            frozen = [] if model.training or not torch.is_grad_enabled() else [p for p in model.parameters() if p.requires_grad]
            for p in frozen:
                p.requires_grad_(False)
            try:
                return graph(*args, **kwargs)
            finally:
                for p in frozen:
                    p.requires_grad_(True)
        return call
    model.features = compiled(model.features)
    if getattr(model, 'ase', None) is not None:
        model.forward_heads = compiled(model.forward_heads)
    return model


def start_epoch(epoch, args, *optimizers, seed=None, milestones=None):
    """Re-seed for epoch ``epoch`` (a --resume'd run equals an uninterrupted one; each process its own per-image
    draws), set the optimizers' lr (x0.1 at each milestone passed, epochs from 0) and return it."""
    seed = (args.seed if seed is None else seed) * 100003 + epoch
    torch.manual_seed(seed + 7919 * DIST.rank)
    if DIST.shared is not None:
        DIST.shared.manual_seed(seed)
    lr = args.lr * 0.1 ** sum(epoch >= m for m in (args.milestones if milestones is None else milestones))   # App. C
    for group in (g for optimizer in optimizers for g in optimizer.param_groups):
        group['lr'] = lr
    return lr


def check_finite(epoch, step, *losses):
    """The losses as floats (the processes' mean; one device read), stopping with one line on a NaN or inf."""
    values = (all_sum(torch.stack([l.detach().float().reshape(()) for l in losses])) / DIST.world).tolist()
    if not all(map(math.isfinite, values)):
        raise UserError(f"loss became {values[0] if len(values) == 1 else values} at epoch {epoch + 1}, step "
                        f"{step}: lower --lr, or turn off --amp; the run folder keeps the last finished epoch")
    return values


def correct(model, split, attack=None, batch_size=500):
    """Per-image correctness in eval mode after ``attack(model, x, y)`` (under torchrun: this process's share)."""
    was_training, out = model.training, []
    model.eval()
    try:
        for x, y in batches(split, batch_size):
            x = x if attack is None else attack(model, x, y)
            with torch.no_grad():
                out.append(model(x).argmax(1) == y)
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=split.y.device)


def accuracy(model, split, attack=None, batch_size=500):
    hits = correct(model, split, attack, batch_size).sum().item()
    return 100.0 * all_sum(hits)[0] / len(split) if len(split) else float('nan')


def validation_metrics(model, val_set, attack, args):
    """val_nat, val_adv (the script's PGD ``attack``) and val_worst: the per-image worst of it and of a CW-margin
    PGD from a random start, which chooses best.pt (a masking model keeps a high val_adv, not val_worst)."""
    average_buffers(model)
    if attack is None:
        return {'val_nat': accuracy(model, val_set)}
    by_pgd = correct(model, val_set, attack)          # float32 even under --amp, as eval.py
    by_cw = correct(model, val_set, lambda m, x, y: pgd(m, x, y, args.eps, args.steps, args.step_size,
                                                        random_start=True, loss='cw'))
    counts = all_sum(correct(model, val_set).sum().item(), by_pgd.sum().item(), (by_pgd & by_cw).sum().item())
    return {name: 100.0 * c / len(val_set) for name, c in zip(('val_nat', 'val_adv', 'val_worst'), counts)}


class CollapseWatch:
    """AELFs' and JT*'s embedding collapse (too large a beta): per epoch mean ||f||, ||f'||, natural accuracy; one warning
    when the last ``window`` steps' accuracy is under twice chance or the last ``norm_window``'s ||f|| under a tenth
    of the first step's, checked at epoch ends and step ``early_check``. Per-step sums stay on the device."""
    window, norm_window, early_check = 20, 5, 50

    def __init__(self, dataset, hint):
        self.num_classes, self.hint, self.warned, self.steps, self.epoch_start = DATASETS[dataset].num_classes, hint, False, [], 0

    @torch.no_grad()
    def step(self, f, f_adv, logits_nat, y_nat, epoch_index=None):
        norms, adv = f.float().flatten(1).norm(dim=1), f_adv.float().flatten(1).norm(dim=1)
        self.steps.append(torch.stack([norms.sum(), norms.new_full((), len(norms)), adv.sum(),
                                       adv.new_full((), len(adv)), (logits_nat.argmax(1) == y_nat).sum().float()]))
        if epoch_index == 0 and len(self.steps) == self.early_check:
            self.check()

    def check(self):
        """True when the recent steps look collapsed; warns the first time."""
        if not self.steps:
            return False
        first, *recent = all_sum(torch.stack([self.steps[0], *self.steps[-self.window:]])).tolist()
        norms, accs = [s[0] / max(s[1], 1) for s in recent], [100.0 * s[4] / max(s[1], 1) for s in recent]
        start, norm = first[0] / max(first[1], 1), sum(norms[-self.norm_window:]) / len(norms[-self.norm_window:])
        acc, chance = sum(accs) / len(accs), 100.0 / self.num_classes
        reasons = ([f"natural training accuracy {acc:.1f}% is near chance ({chance:.0f}%)"] if acc < 2 * chance else []) \
            + ([f"mean ||f|| fell from {start:.3g} to {norm:.3g}"] if start and norm < 0.1 * start else [])
        if reasons and not self.warned:
            self.warned = True
            print(f"WARNING: the embeddings are collapsing ({'; '.join(reasons)}): {self.hint}", flush=True)
        return bool(reasons)

    def end_epoch(self, epoch_index):
        epoch, self.epoch_start = self.steps[self.epoch_start:], len(self.steps)
        f, n, f_adv, n_adv, hits = all_sum(torch.stack(epoch).sum(0)).tolist() if epoch else [0.0] * 5
        return {'f_norm': f / max(n, 1), 'f_adv_norm': f_adv / max(n_adv, 1),
                'train_acc_nat': 100.0 * hits / max(n, 1), 'collapse_warning': self.check()}


def aelf_protocol(dataset, model=None, standard=False):
    """AELF Appendix C for ``dataset`` (AT, ST, JT, TRADES, AELF, AELFs), and 1,000 validation images."""
    p = dict(batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, seed=8, random_start=False, val_size=1000)
    if dataset == 'mnist':
        return {**p, 'model': 'cnn_b', 'epochs': 50, 'milestones': [20, 40], 'eps': 0.3, 'steps': 16, 'step_size': 0.02}
    p.update(model='cnn_b' if dataset == 'cifar10' else 'wrn', padding=2)
    p.update(epochs=100, milestones=[40, 80]) if standard else p.update(epochs=160, milestones=[50, 100])
    if dataset == 'cifar10':
        p.update(eps=0.031, steps=5, step_size=0.01, **({'weight_decay': 2e-4} if (model or 'cnn_b') == 'cnn_b' else {}))
    else:
        p.update(eps=0.03, steps=7, step_size=0.0075, depth=28, widen_factor=10)
    return p


# --quick: the small MNIST protocol of the README's results table, over a script's protocol. Its
# PGD keeps the papers' 16 steps of eps/15 but at eps 0.2, not their 0.3: at 0.3 TRADES, AELF and
# AT-id leave with masked gradients (README, "Masked gradients")
QUICK = dict(width=0.25, train_size=8000, test_size=1000, epochs=8, milestones=[4, 6], eps=0.2, step_size=0.0133)


def number(interval, kind=float):
    """An argparse ``type``: a finite number of ``kind`` inside ``interval`` ('[0, 1)', 'inf' unbounded)."""
    lo, hi = (float(v) for v in interval[1:-1].split(','))

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: not a {'whole ' if kind is int else ''}number") from None
        if math.isfinite(v) and (lo <= v if interval[0] == '[' else lo < v) and (v <= hi if interval[-1] == ']' else v < hi):
            return v
        raise argparse.ArgumentTypeError(f"{text}: must be a number in {interval}")
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):   # each default said once: not None, not twice
    def _get_help_string(self, action):
        text = action.help or ''
        return text if action.default is None or 'default' in text else super()._get_help_string(action)


def parser(doc):
    """An ArgumentParser with the flags every train_*.py shares (``parse`` sets their protocol's defaults)."""
    p = argparse.ArgumentParser(description=' '.join(doc.split('\n\n')[0].split()), formatter_class=HelpFormatter,
                                epilog="Defaults shown are those of the --dataset (--model, --quick) on the command "
                                       "line: add --dataset cifar10 --help for CIFAR-10's.")
    g = p.add_argument_group('data and model')
    g.add_argument('--dataset', default='mnist', choices=sorted(DATASETS), help='dataset')
    g.add_argument('--data-dir', default='./data', help='torchvision root')
    g.add_argument('--model', choices=sorted(models.ARCHITECTURES), help='architecture')
    g.add_argument('--act', choices=['relu', 'leakyrelu'], help='activation (cnn_b, resnet18, vgg16, wrn)')
    g.add_argument('--slope', type=number('[0, 1)'), default=0.01, help='LeakyReLU negative slope')
    g.add_argument('--width', type=number('(0, 16]'), default=1.0, help='channel multiplier (cnn_b, resnet18, vgg16)')
    g.add_argument('--depth', type=number('[10, 100]', int), default=34, help='WRN depth (34, 28, 40)')
    g.add_argument('--widen-factor', type=number('[1, 20]', int), default=10, help='WRN widen factor')
    g.add_argument('--dropout', type=number('[0, 1)'), default=0.0, help='WRN dropout')
    g.add_argument('--blocks', type=number('[1, 50]', int), default=5, help='residual blocks per stage of cifar_resnet / att_resnet')
    g.add_argument('--image-size', type=number('[8, 512]', int), help='input side (MNIST: 32 for cnn_b, 28 otherwise)')
    g.add_argument('--padding', type=number('[0, 32]', int), help='CIFAR random-crop zero padding (none: no augmentation)')
    g.add_argument('--train-size', type=number('[1, inf)', int), help='use the first N training images (none: all)')
    g.add_argument('--test-size', type=number('[1, inf)', int), help='use the first N test images (none: all)')
    g.add_argument('--val-size', type=number('[0, inf)', int), help='training images held out (the same for every script '
                   'and seed), never trained on: evaluated after each epoch, they choose best.pt; 0: last.pt only')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=number('[1, 100000]', int), help='training epochs')
    g.add_argument('--lr', type=number('(0, 10]'), help='learning rate')
    g.add_argument('--milestones', type=number('[1, 100000]', int), nargs='*', help='epochs where lr is multiplied by 0.1')
    g.add_argument('--batch-size', type=number('[1, 100000]', int), help='mini-batch size')
    g.add_argument('--momentum', type=number('[0, 1)'), help='SGD momentum')
    g.add_argument('--weight-decay', type=number('[0, 1)'), help='weight decay')
    g = p.add_argument_group('training attack (l-inf PGD)')
    g.add_argument('--eps', type=number('[0, 1]'), help='l-inf radius')
    g.add_argument('--steps', type=number('[0, 10000]', int), help='PGD steps')
    g.add_argument('--step-size', type=number('[0, 1]'), help='PGD step size')
    g.add_argument('--eps-warmup', type=number('[0, 100000]', int), default=0, metavar='E', help='training attack: '
                   'eps and step size x epoch/E over the first E epochs (counted from 1; 0: the full eps from the start)')
    g.add_argument('--random-start', action=argparse.BooleanOptionalAction, help='start PGD at a uniform random point of the ball')
    g = p.add_argument_group('run')
    g.add_argument('--quick', action='store_true', help="MNIST on a laptop CPU: the README Results' protocol, not the "
                   "paper's (--quick --help shows its values: the papers' 16 PGD steps at eps 0.2, not 0.3); flags given override it")
    g.add_argument('--seed', type=number('[0, 4294967295]', int), help='random seed')
    g.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'], help='auto: cuda if available')
    g.add_argument('--amp', action='store_true', help='bfloat16 autocast of the training steps (CUDA, CPU); scoring in float32')
    g.add_argument('--compile', nargs='?', const='default', choices=COMPILE_MODES, metavar='MODE', help='torch.compile '
                   '(bare: "default"; README "Speed": 10-50 s to compile; reduce-overhead adds CUDA graphs; %(choices)s)')
    g.add_argument('--out', help='run folder (none: runs/<script>-<dataset>-<model>-s<seed>)')
    g = g.add_mutually_exclusive_group()
    g.add_argument('--resume', action='store_true', help='continue from <out>/last.pt')
    g.add_argument('--overwrite', action='store_true', help='replace a finished run in <out>')
    return p


def parse(p, argv=None, protocol=None):
    """The flags, with the defaults of the chosen --dataset set before parsing (so --help prints them): AELF App. C,
    ``protocol(first, defaults)`` (a script's own, seeing --quick's; ``first``: the flags as given), --quick over both."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    first, _ = p.parse_known_args([a for a in argv if a not in ('-h', '--help')])
    defaults = {**aelf_protocol(first.dataset, first.model, getattr(first, 'standard', False)), **(QUICK if first.quick else {})}
    if protocol:
        protocol(first, defaults)
    if first.quick and first.dataset != 'mnist':
        p.error('--quick is an MNIST preset: leave it out for --dataset ' + first.dataset)
    defaults.update(QUICK if first.quick else {})
    model = first.model or defaults['model']
    defaults.setdefault('act', 'leakyrelu' if model == 'cnn_b' else 'relu')
    defaults.setdefault('image_size', 32 if model != 'madry_cnn' else DATASETS[first.dataset].native_size)
    p.set_defaults(**defaults)
    args = p.parse_args(argv)
    if list(args.milestones) != sorted(args.milestones):
        p.error('--milestones must be increasing')
    if args.image_size % 8 and args.model == 'cnn_b':
        p.error('cnn_b needs --image-size a multiple of 8')
    if args.quick:
        shown = ', '.join(f"{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in QUICK.items())
        print(f"--quick: a small MNIST protocol ({shown}), not the paper's protocol (its eps: 0.3): "
              f"the README's Results give its expected numbers", flush=True)
    return args


def model_kwargs(args):                          # constructor arguments of the model the flags describe
    names = {'madry_cnn': 'image_size', 'wrn': 'depth widen_factor dropout act slope', 'cifar_resnet': 'blocks',
             'att_resnet': 'blocks'}.get(args.model, 'width act slope')       # cnn_b, resnet18, vgg16
    return {name: getattr(args, name) for name in names.split()}


def describe(name, kwargs):                     # 'cnn_b(act=..., width=...)'
    return f"{name}({', '.join(f'{k}={v}' for k, v in sorted(kwargs.items()))})"


def summary(args, model, train, val, test, attack=None):
    """The start-up line's account of the data, the model and the training attack (or ``attack``)."""
    held = f"{len(val)} held out for validation" if len(val) else "no validation split: last.pt only"
    attack = attack or f"PGD({args.eps:g}, {args.steps}, {args.step_size:g}{', rand' if args.random_start else ''})" + (
        f" (eps warm-up over {args.eps_warmup} epochs)" if args.eps_warmup else '')
    return f"on {args.dataset} ({len(train)} train, {held}, {len(test)} test), {describe(model.arch_name, model.arch_kwargs)}, {attack}"


RESUME_HINT = "the run folder keeps its last finished epoch: free some space, then add --resume"


def write_failed(path, error, hint=RESUME_HINT):
    """The one line for a failed write of ``path`` (a full disk...): the reason, the free space there, what to do."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else \
        (str(error).strip().splitlines() or [type(error).__name__])[0][:160]   # torch.save: RuntimeError
    try:
        space = f"{shutil.disk_usage(os.path.dirname(os.path.abspath(path)) or '.').free / 2 ** 20:.1f} MB"
    except OSError:
        space = 'unknown space'
    return UserError(f"cannot write {path}: {reason} ({space} free there); {hint}")


def write_atomically(path, write, hint=RESUME_HINT):
    """``write(tmp)`` beside ``path``, then renamed over it: the old file stays whole until the new one is."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):
            raise write_failed(path, e, hint) from None
        raise


def write_text(path, text, hint=RESUME_HINT):
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    write_atomically(path, write, hint)


CKPT_FORMAT = 'adv-training-checkpoint-v1'


def save_checkpoint(path, model, args, epoch, optimizer=None, metrics=None, finished=False, **extra):
    """Atomically write what rebuilds and continues a run (tensors on the CPU: it loads without the GPU)."""
    on_cpu = functools.partial(torch.utils._pytree.tree_map, lambda t: t.detach().cpu() if torch.is_tensor(t) else t)
    payload = {'format': CKPT_FORMAT, 'model': model.arch_name, 'model_kwargs': dict(model.arch_kwargs),
               'state_dict': on_cpu(dict(model.state_dict())), 'args': dict(vars(args)), 'epoch': epoch,
               'optimizer': on_cpu(optimizer), 'metrics': metrics or {}, 'finished': finished, **extra}
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


def resolve_checkpoint(path):
    """``path``, or for a run folder its best.pt (else last.pt), said in one line."""
    path = str(path)
    if not os.path.isdir(path):
        return path
    for candidate in (os.path.join(path, 'best.pt'), os.path.join(path, 'last.pt')):
        if os.path.isfile(candidate):
            print(f"note: {path} is a run folder: using {candidate}", file=sys.stderr, flush=True)
            return candidate
    held = sorted(n for n in os.listdir(path) if n != '.lock')[:12] or ['nothing']
    raise UserError(f"{path} is a folder without best.pt or last.pt (it holds: {', '.join(held)}); pass a checkpoint file")


def load_checkpoint(path):
    """Read a checkpoint of ``save_checkpoint`` (on the CPU; a run folder: its best.pt); one-line errors."""
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
    """Copy the weights of checkpoint ``path`` into ``model`` of the same architecture and arguments."""
    ckpt = load_checkpoint(path)
    ours, theirs = (model.arch_name, dict(model.arch_kwargs)), (ckpt.get('model'), dict(ckpt.get('model_kwargs', {})))
    if ours != theirs:
        raise UserError(f"{path!r} holds {describe(*theirs)} but this run builds {describe(*ours)}: "
                        f"pass a checkpoint trained with the same --model/--width/--act")
    model.load_state_dict(ckpt['state_dict'])
    return ckpt


class Run:
    """The run folder: last.pt, best.pt, log.jsonl (from the history last.pt keeps), final.json, the console lines;
    never silently replaced. An flock on .lock (freed even by kill -9) stops a second run. Rank 0 writes and prints."""

    active = []        # the Runs of the running main (main_guard names the folder if interrupted)

    def __init__(self, args, script):
        self.args, self.script, self.lock = args, script, None
        if args.out is None:
            args.out = os.path.join('runs', f"{script}-{args.dataset}-{args.model}-s{args.seed}")
        self.dir, self.resume_ckpt, self.best_score, self.saved_epoch = args.out, None, None, 0
        self.last, self.best, self.log = (os.path.join(self.dir, n) for n in ('last.pt', 'best.pt', 'log.jsonl'))
        Run.active.append(self)
        try:
            error = self._open(args) if DIST.rank == 0 else None
        except UserError as e:
            error = e
        error_text, self.resume_ckpt, self.best_score, self.saved_epoch = broadcast(     # the others
            (error and str(error), self.resume_ckpt, self.best_score, self.saved_epoch))  # follow rank 0
        if error_text:
            raise error or UserError(error_text)
        self.history = (self.resume_ckpt or {}).get('history', [])
        if self.resume_ckpt and 'history' not in self.resume_ckpt and os.path.exists(self.log):   # an older last.pt
            self.history = [r for r in (json.loads(l) for l in open(self.log) if l.endswith('\n')) if r['epoch'] <= self.saved_epoch]
        self.start = self.step_time = time.time()

    def _open(self, args):
        started = os.path.exists(os.path.join(self.dir, '.lock'))     # a run began here before
        try:
            os.makedirs(self.dir, exist_ok=True)
            self.lock = open(os.path.join(self.dir, '.lock'), 'a+')
            import fcntl
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.lock.truncate(0)
            self.lock.write(f"process {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
            self.lock.flush()
        except ImportError:             # no flock (Windows): run without the lock
            pass
        except BlockingIOError:
            self.lock.seek(0)
            owner = self.lock.read().strip() or 'unknown'
            self.release()
            raise UserError(f"{self.dir} is in use by another run ({owner}): wait for it to end or use another --out") from None
        except OSError as e:
            self.release()
            raise write_failed(self.lock.name if self.lock else self.dir, e, "free some space or choose another --out, "
                               "then run the same command again") from None
        if args.overwrite:
            for name in ('last.pt', 'best.pt', 'log.jsonl', 'final.json'):
                if os.path.exists(os.path.join(self.dir, name)):
                    os.remove(os.path.join(self.dir, name))
        elif os.path.exists(self.last):
            ckpt = self._read_last()
            if not args.resume:
                state = 'a finished run' if ckpt.get('finished') else f"a run stopped after epoch {ckpt['epoch']}"
                raise UserError(f"{self.dir} holds {state}: pass --resume to continue it, "
                                f"--overwrite to start again, or --out to use another folder")
            self.resume_ckpt, self.best_score, self.saved_epoch = ckpt, ckpt.get('best_score'), ckpt['epoch']
        elif args.resume and started:          # but wrote no last.pt (a full disk in epoch 1): from the start
            print(f"note: {self.last} was never written: starting at epoch 1")
        elif args.resume:
            raise UserError(f"nothing to resume: {self.last} does not exist")

    def release(self):
        if self.lock is not None:
            self.lock.close()         # the kernel drops the flock; the file stays (no unlink race)

    def _read_last(self):
        """last.pt, or one line saying it is unreadable and whether best.pt can take its place."""
        try:
            return load_checkpoint(self.last)
        except UserError as e:
            reason = str(e).split(': the file is')[0]
        try:
            best = load_checkpoint(self.best)
        except UserError:
            raise UserError(f"{reason}, and there is no readable best.pt: "
                            f"start again with {command_line(['--overwrite'], drop=('--resume',))}") from None
        raise UserError(f"{reason}; {self.best} (epoch {best['epoch']}) is intact: continue from it with  "
                        f"cp {shlex.quote(self.best)} {shlex.quote(self.last)} && {command_line(['--resume'])}")

    @property
    def start_epoch(self):
        return self.resume_ckpt['epoch'] if self.resume_ckpt else 0

    def resume(self, model, load_optimizer):
        ckpt = self.resume_ckpt
        if ckpt is not None:
            if (ckpt['model'], dict(ckpt['model_kwargs'])) != (model.arch_name, dict(model.arch_kwargs)):
                raise UserError(f"{self.last} holds {describe(ckpt['model'], ckpt['model_kwargs'])}, not "
                                f"{describe(model.arch_name, model.arch_kwargs)}: resume with the flags of the original run")
            model.load_state_dict(ckpt['state_dict'])
            load_optimizer(ckpt['optimizer'])
            print(f"resuming {self.dir} after epoch {ckpt['epoch']}")
        return ckpt

    def progress(self, step, total, images, loss, every=30.0):
        now = time.time()
        if step == 1:
            self.epoch_start = self.step_time = now
        elif now - self.step_time >= every:
            self.step_time = now
            print(f"  step {step}/{total} loss {loss:.4f} {images / max(now - self.epoch_start, 1e-9):.0f} img/s", flush=True)

    def _hint(self):     # after a failed write: --resume (before the first last.pt, from epoch 1)
        return RESUME_HINT if self.saved_epoch else f"free some space, then run {command_line(['--resume'])}"

    def log_epoch(self, record, total_epochs):
        self.history = [r for r in self.history if r['epoch'] < record['epoch']] + [record]
        if DIST.rank != 0:
            return
        write_text(self.log, ''.join(json.dumps(r) + '\n' for r in self.history), self._hint())
        eta = (time.time() - self.start) / max(record['epoch'] - self.start_epoch, 1) * (total_epochs - record['epoch'])
        parts = [f"epoch {record['epoch']}/{total_epochs}", f"lr {record['lr']:.4g}",
                 f"loss {record['train_loss']:.4f}", f"train {record['train_acc']:.2f}%"]
        parts += [f"{label} {record[k]:.2f}%" for k, label in (('val_nat', 'val nat'), ('val_adv', 'adv'),
                                                                ('val_worst', 'worst')) if record.get(k) is not None]
        if record.get('f_norm') is not None:
            parts.append(f"||f|| {record['f_norm']:.3g} ||f'|| {record['f_adv_norm']:.3g}")
        parts += [f"{record['seconds']:.1f}s", f"{record['images_per_s']:.0f} img/s", f"ETA {format_seconds(eta)}"]
        print(' | '.join(parts), flush=True)

    def save(self, model, epoch, optimizer, metrics, score, finished=False, **extra):
        """last.pt, and first best.pt when ``score`` beats the best so far (None, --val-size 0: no best.pt)."""
        average_buffers(model)
        improved = score is not None and (self.best_score is None or score > self.best_score)
        self.best_score = score if improved else self.best_score
        for path in (([self.best] if improved else []) + [self.last]) if DIST.rank == 0 else []:
            try:
                save_checkpoint(path, model, self.args, epoch, optimizer, metrics, finished, best_score=self.best_score,
                                script=self.script, history=self.history, **extra)
            except UserError as e:
                raise UserError(str(e).replace(RESUME_HINT, self._hint())) from None
        self.saved_epoch = epoch

    def finish(self, model, test_set, attack):
        """The only reading of the test split: last.pt's and best.pt's accuracy, natural and under ``attack``, in
        float32, into final.json and one line (nothing when final.json holds the last epoch)."""
        try:
            tested = json.load(open(os.path.join(self.dir, 'final.json')))['last']['epoch'] == self.args.epochs
        except (OSError, ValueError, KeyError, TypeError):
            tested = False
        if broadcast(tested and self.start_epoch >= self.args.epochs):
            return print(f"{self.dir} already holds all {self.args.epochs} epochs; nothing to do")

        def test(m):
            return {'test_nat': accuracy(m, test_set), 'test_adv': accuracy(m, test_set, attack)}
        last_epoch = broadcast(load_checkpoint(self.last)['epoch'] if DIST.rank == 0 else None)
        result = {'test_images': len(test_set), 'last': {'epoch': last_epoch, **test(model)}}
        best = broadcast(load_checkpoint(self.best) if DIST.rank == 0 and os.path.exists(self.best) else None)
        if best is not None:
            result['best'] = dict(result['last']) if best['epoch'] == last_epoch else {
                'epoch': best['epoch'], **test(model_from_checkpoint(best, next(model.parameters()).device, self.best).eval())}
            result['best']['val_score'] = best['best_score']
        if DIST.rank == 0:
            write_text(os.path.join(self.dir, 'final.json'), json.dumps(result, indent=1),
                       hint="last.pt and best.pt are complete: free some space, then add --resume to write final.json")
            print(f"done in {format_seconds(time.time() - self.start)} ({len(test_set)} test images): " + '; '.join(
                f"{name}.pt (epoch {r['epoch']}): test nat {r['test_nat']:.2f}%, adv {r['test_adv']:.2f}%"
                for name, r in ((n, result.get(n)) for n in ('last', 'best')) if r) + f" -> {self.dir}", flush=True)
        return result


def format_seconds(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
