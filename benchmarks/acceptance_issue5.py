"""Issue 5's acceptance measurement, on this machine, in one run:
- ε at batch 256 on seed_mnist_cnn("conv3x2"): LRP(model) <= 1.10x the floor and >= 1.5x faster
  than the seed-style baseline;
- vgg16 at batch 8: LRP(model) >= 1.8x faster than zennit's ε and >= 1.6x faster than captum's LRP.
All ratios are paired medians over round-robin rounds (`lrpfast bench`'s machinery).

    python benchmarks/acceptance_issue5.py [--repeats-mnist 15] [--repeats-vgg 5] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lrpfast.bench.implementations import lrp_available  # noqa: E402
from lrpfast.bench.machine import describe, machine_info  # noqa: E402
from lrpfast.bench.progress import Progress  # noqa: E402
from lrpfast.bench.report import format_config, write_json  # noqa: E402
from lrpfast.bench.runner import measure  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats-mnist", type=int, default=15)
    p.add_argument("--repeats-vgg", type=int, default=5)
    p.add_argument("--vgg-batch", type=int, default=8)
    p.add_argument("--json", default="bench_out/acceptance_issue5.json")
    args = p.parse_args(argv)
    if not lrp_available():
        print("lrpfast.LRP is not available in this checkout: nothing to accept", file=sys.stderr)
        return 2
    import torch

    machine = machine_info(torch.device("cpu"))
    print(f"machine: {describe(machine)}")
    progress = Progress()
    checks = []
    progress.set_description("conv3x2 b256")
    mnist = measure("mnist-conv3x2", 256, impls=["lrpfast", "seed-baseline", "floor"], warmup=2,
                    repeats=args.repeats_mnist, progress=progress)
    progress.write(format_config(mnist) + "\n")
    rows = {r["name"]: r for r in mnist["implementations"]}
    checks.append(("conv3x2 b256: LRP / floor", rows["lrpfast"].get("x_floor"), "<=", 1.10))
    checks.append(("conv3x2 b256: seed-style baseline / LRP", mnist["speedups"].get("seed-baseline"), ">=", 1.5))
    progress.set_description(f"vgg16 b{args.vgg_batch}")
    vgg = measure("vgg16", args.vgg_batch, impls=["lrpfast", "zennit", "captum", "floor"], warmup=1,
                  repeats=args.repeats_vgg, progress=progress)
    progress.write(format_config(vgg) + "\n")
    checks.append((f"vgg16 b{args.vgg_batch}: zennit ε / LRP", vgg["speedups"].get("zennit"), ">=", 1.8))
    checks.append((f"vgg16 b{args.vgg_batch}: captum / LRP", vgg["speedups"].get("captum"), ">=", 1.6))
    progress.close()
    lines = []
    for what, value, op, target in checks:
        ok = value is not None and (value <= target if op == "<=" else value >= target)
        lines.append(f"{what:40s} {'-' if value is None else f'{value:.2f}'}x  (target {op} {target})  "
                     f"{'PASS' if ok else 'FAIL'}")
    print("\n".join(lines))
    write_json(args.json, {"tool": "benchmarks/acceptance_issue5.py", "machine": machine, "settings": vars(args),
                           "configs": [mnist, vgg], "verdicts": lines})
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
