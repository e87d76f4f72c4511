"""Helper for tests/test_dataset.py (not a test module): the toy model and data shared by the
test process and the ranks that `python -m torch.distributed.run` starts.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dataset_worker.py OUT_DIR DEVICE [CHANGE]

DEVICE is "cpu" (gloo) or "cuda" (NCCL, one GPU per rank). The ranks require the process group
(distributed=True), so a single rank on CUDA still goes through NCCL. CHANGE: the index of a
sample to change (1 - x), to test resuming on changed data. A RelevanceError is printed as
"rank R error: MESSAGE" and exits with status 3.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn

N_SAMPLES, SHARD_SIZE, BATCH_SIZE = 45, 8, 3


def toy_model() -> nn.Module:
    g = torch.Generator().manual_seed(1234)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def toy_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    return torch.rand(N_SAMPLES, 1, 10, 10, generator=g)


def main(out_dir: str, device: str, change=None) -> int:
    torch.set_num_threads(1)
    from lrpfast.dataset import explain_dataset
    from lrpfast.ops import RelevanceError

    x = toy_inputs()
    if change is not None:
        x[int(change)] = 1 - x[int(change)]
    try:
        summary = explain_dataset(toy_model(), x, out_dir, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE,
                                  device=device, progress=False, distributed=True)
    except RelevanceError as exc:
        # one write per line: the two ranks share the pipe, and print's text and newline are two
        sys.stdout.write(f"rank {os.environ.get('RANK', '?')} error: {exc}\n")
        sys.stdout.flush()
        return 3
    print(f"rank {summary['rank']}/{summary['world_size']} wrote shards {summary['shards_written']} "
          f"(backend {summary['backend']})", flush=True)
    return 0


if __name__ == "__main__":
    status = main(*sys.argv[1:4])
    # Every shard is written and the group destroyed; leave without the interpreter's teardown.
    # Rarely (1 of ~20 runs, under CI load, torch 2.14 gloo), a rank aborted there, after
    # explain_dataset had returned ("terminate called without an active exception" from a C++
    # thread object destroyed at exit), which failed the run though its output was complete.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
