"""Helper for tests/test_crp_maximization.py (not a test module): the toy model and data shared by
the test process and the ranks that `python -m torch.distributed.run` starts.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/crp_index_worker.py OUT_DIR

Builds the concept index of LAYERS with distributed=True; a RelevanceError is printed as
"rank R error: MESSAGE" and exits with status 3.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

N_SAMPLES, SHARD_SIZE, BATCH_SIZE, N_TOP = 45, 8, 3, 6
LAYERS = ["0", "3", "5"]   # conv (4 channels, 8x8), conv (6 channels, 2x2), linear (5 outputs)


def toy_model() -> nn.Module:
    g = torch.Generator().manual_seed(4321)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.Flatten(),
                          nn.Linear(6 * 2 * 2, 5)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model.eval()


def toy_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(77)
    return torch.rand(N_SAMPLES, 1, 10, 10, generator=g, dtype=torch.float64)


def build(out_dir, **kwargs):
    from lrpfast.crp.maximization import relevance_maximization

    kwargs = {"n_top": N_TOP, "shard_size": SHARD_SIZE, "batch_size": BATCH_SIZE, "progress": False, **kwargs}
    return relevance_maximization(toy_model(), kwargs.pop("data", toy_inputs()), out_dir, LAYERS, **kwargs)


def main(out_dir: str) -> int:
    torch.set_num_threads(1)
    from lrpfast.ops import RelevanceError

    try:
        summary = build(out_dir, distributed=True)
    except RelevanceError as exc:
        sys.stdout.write(f"rank {os.environ.get('RANK', '?')} error: {exc}\n")
        sys.stdout.flush()
        return 3
    print(f"rank {summary['rank']}/{summary['world_size']} wrote shards {summary['shards_written']} "
          f"(backend {summary['backend']})", flush=True)
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)   # as tests/dataset_worker.py: skip the interpreter's teardown (a rare gloo abort there)
