"""Measure a training script's per-step cost against the bare model work it does.

    python tests/bench_overhead.py --script train_at.py [--width 1.0] [--batches 6]

Bare loop: for each batch, `steps` PGD passes (forward + gradient w.r.t. the input) and one
training pass (forward, backward, SGD step) of cnn_b on a random batch already on the device,
with nothing else. Script: the real script on the first `batches` x 128 real MNIST training
images (../shared/data), one epoch; its images per second is read from log.jsonl.
Not a test (pytest does not collect it); the README's speed table comes from it.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import models  # noqa: E402


def bare(width, batches, pgd_steps, batch_size, device, extra_passes=0):
    torch.manual_seed(0)
    model = models.build('cnn_b', 10, 1, width=width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(batch_size, 1, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def step():
        model.eval()
        xa = x.clone()
        for _ in range(pgd_steps):
            xa.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y, reduction='sum'), xa)
            xa = (xa.detach() + 0.01 * g.sign())
        model.train()
        opt.zero_grad()
        loss = F.cross_entropy(model(xa), y)
        for _ in range(extra_passes):
            loss = loss + F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    step()  # warm-up
    if device.type == 'cuda':
        torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(batches):
        step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return batches * batch_size / (time.time() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--script', default='train_at.py')
    p.add_argument('--script-args', default='', help='extra flags for the script')
    p.add_argument('--width', type=float, default=1.0)
    p.add_argument('--batches', type=int, default=6)
    p.add_argument('--pgd-steps', type=int, default=16)
    p.add_argument('--extra-passes', type=int, default=0, help='extra clean forward/backward passes')
    p.add_argument('--device', default='cpu')
    p.add_argument('--data-dir', default=str(ROOT.parent / 'shared' / 'data'))
    a = p.parse_args()
    device = torch.device(a.device)
    bare_ips = bare(a.width, a.batches, a.pgd_steps, 128, device, a.extra_passes)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / a.script), '--data-dir', a.data_dir, '--width', str(a.width),
               '--train-size', str(128 * (a.batches + 1)), '--test-size', '128', '--eval-size', '128',
               '--epochs', '1', '--device', a.device, '--out', tmp + '/run', *a.script_args.split()]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rec = [json.loads(l) for l in open(tmp + '/run/log.jsonl')][-1]
    script_ips = rec['images_per_s']
    print(json.dumps({'script': a.script, 'args': a.script_args, 'width': a.width, 'device': a.device,
                      'bare_images_per_s': round(bare_ips, 1), 'script_images_per_s': round(script_ips, 1),
                      'overhead_percent': round(100 * (bare_ips / script_ips - 1), 1)}))


if __name__ == '__main__':
    main()
