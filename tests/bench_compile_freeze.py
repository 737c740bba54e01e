"""What common.compile_model's weight freeze in attack passes buys (README "Speed"): seconds of a
PGD-16 (batch 128, --quick cnn_b) on the compiled model, with the freeze and with the same compiled
pass without it. Not a test.

    OMP_NUM_THREADS=1 taskset -c 1 python tests/bench_compile_freeze.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import models  # noqa: E402
from attacks import pgd  # noqa: E402


def compiled_model(freeze):
    torch.manual_seed(0)
    model = common.prepare_model(models.build('cnn_b', 10, 1, width=0.25), 'cpu')
    if freeze:
        return common.compile_model(model, 'default')
    graph = torch.compile(model.features, fullgraph=True)       # the same pass, weights left as they are

    def features(x):
        torch._dynamo.maybe_mark_dynamic(x, 0)
        return graph(x)
    model.features = features
    return model


def main():
    torch.manual_seed(0)
    x = torch.rand(128, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    seconds = {}
    for freeze in (True, False):
        model = compiled_model(freeze)
        for _ in range(2):                                       # compile and warm up
            pgd(model, x, y, 0.2, 2, 0.01)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            pgd(model, x, y, 0.2, 16, 0.0133)
            times.append(time.perf_counter() - t0)
        seconds[freeze] = min(times)
    print(f"PGD-16 on 128 images: {seconds[True]:.2f} s with the freeze, {seconds[False]:.2f} s without: "
          f"{seconds[False] / seconds[True]:.2f}x (torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == '__main__':
    main()
