"""Run several train_*.py mains in one process of a torchrun launch (the DDP tests in
tests/test_distributed.py): one start-up of torch and one process group for all of them.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py RUNS.json

RUNS.json: a list of [script, arg, ...]. Each main runs as its command line would; the worker
goes on after a run that fails and writes every run's exit status, per rank, to
RUNS.json.rank<R> (so torchrun itself sees no failure and adds no report of its own). An entry
[module:function, arg, ...] calls a function of a test module (tests/) with the args instead.
"""
import importlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))


def main():
    runs = json.loads(Path(sys.argv[1]).read_text())
    codes = []
    for script, *args in runs:
        name, _, function = script.partition(':')
        module = importlib.import_module(name if function else script[:-3])
        try:
            getattr(module, function or 'main')(args)
            codes.append(0)
        except SystemExit as e:
            codes.append(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
    Path(f"{sys.argv[1]}.rank{os.environ.get('RANK', '0')}").write_text(json.dumps(codes))


if __name__ == '__main__':
    main()
