"""This repository's training scripts against the loop a user would otherwise run (README "Speed").

    OMP_NUM_THREADS=1 taskset -c 0 python tests/bench_reference.py --method at
    OMP_NUM_THREADS=1 taskset -c 0 python tests/bench_reference.py --method trades --reps 3

Trains the same model (cnn_b at ``--width``, 32x32 MNIST) with the same attack budget
(PGD(0.3, 16, 0.02) for AT; TRADES' KL attack with the same budget and beta 1), the same
optimiser (SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128) on the same first
``--batches`` x 128 real MNIST training images, two ways, alternating repetitions in one process:

    repo       train_at.py / train_trades.py themselves (main() in this process); their logged
               images per second of epoch 2 (epoch 1 pays the warm-up)
    reference  the loop as the reference implementations of Madry-style AT and TRADES write it,
               written here from the papers' algorithms: torchvision's MNIST dataset with
               Resize(32) + ToTensor in a torch DataLoader (shuffle, batch 128), each batch moved
               to the device, the attack as its own loop under model.eval(), then model.train()
               for the update; timed over the same two epochs, epoch 2 counted

Prints one JSON line: images per second of both (median over ``--reps``) and their ratio.
Not a test (pytest does not collect it).
"""
import argparse
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
import models  # noqa: E402

EPS, STEPS, STEP_SIZE = 0.3, 16, 0.02


def repo_images_per_s(method, data_dir, width, batches, device):
    script = ROOT / ('train_at.py' if method == 'at' else 'train_trades.py')
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with tempfile.TemporaryDirectory() as tmp:
        module.main(['--data-dir', data_dir, '--width', str(width), '--train-size', str(128 * batches),
                     '--test-size', '128', '--val-size', '128', '--epochs', '2', '--milestones',
                     '--device', device, '--out', tmp + '/run'])
        log = [json.loads(line) for line in open(tmp + '/run/log.jsonl')]
    return log[-1]['images_per_s']


def reference_images_per_s(method, data_dir, width, batches, device):
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms
    data = datasets.MNIST(data_dir, train=True, download=False,
                          transform=transforms.Compose([transforms.Resize(32), transforms.ToTensor()]))
    loader = DataLoader(Subset(data, range(128 * batches)), batch_size=128, shuffle=True)
    torch.manual_seed(8)
    model = models.build('cnn_b', 10, 1, width=width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    seconds = []
    for _ in range(2):
        t0, seen = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            model.eval()                                    # the attack, as its own loop
            if method == 'at':                              # Madry et al.: PGD on CE
                x_adv = x.clone()
                for _ in range(STEPS):
                    x_adv.requires_grad_()
                    loss = F.cross_entropy(model(x_adv), y)
                    grad = torch.autograd.grad(loss, [x_adv])[0]
                    x_adv = x_adv.detach() + STEP_SIZE * grad.sign()
                    x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
            else:                                           # TRADES Alg. 1: PGD on the KL
                with torch.no_grad():
                    p_clean = F.softmax(model(x), dim=1)
                x_adv = x + 0.001 * torch.randn_like(x)
                for _ in range(STEPS):
                    x_adv.requires_grad_()
                    loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction='sum')
                    grad = torch.autograd.grad(loss, [x_adv])[0]
                    x_adv = x_adv.detach() + STEP_SIZE * grad.sign()
                    x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
            model.train()
            optimizer.zero_grad()
            if method == 'at':
                loss = F.cross_entropy(model(x_adv.detach()), y)
            else:
                logits = model(x)
                loss = F.cross_entropy(logits, y) + F.kl_div(
                    F.log_softmax(model(x_adv.detach()), dim=1), F.softmax(logits, dim=1),
                    reduction='sum') / len(x)
            loss.backward()
            optimizer.step()
            seen += len(x)
        seconds.append(time.perf_counter() - t0)
    return seen / seconds[-1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--method', choices=['at', 'trades'], default='at')
    p.add_argument('--width', type=float, default=0.25)
    p.add_argument('--batches', type=int, default=10, help='training batches of 128 per epoch')
    p.add_argument('--reps', type=int, default=3, help='alternating repetitions of both')
    p.add_argument('--device', default='cpu')
    p.add_argument('--data-dir', default=str(ROOT.parent / 'shared' / 'data'))
    a = p.parse_args()
    repo, reference = [], []
    for _ in range(a.reps):
        repo.append(repo_images_per_s(a.method, a.data_dir, a.width, a.batches, a.device))
        reference.append(reference_images_per_s(a.method, a.data_dir, a.width, a.batches, a.device))
    r, f = statistics.median(repo), statistics.median(reference)
    print(json.dumps({'method': a.method, 'width': a.width, 'device': a.device,
                      'threads': torch.get_num_threads(), 'images': 128 * a.batches,
                      'repo_images_per_s': round(r, 1), 'reference_images_per_s': round(f, 1),
                      'ratio': round(r / f, 2), 'repo_all': repo, 'reference_all': reference}))


if __name__ == '__main__':
    main()
