"""Issue 2's measurement: chaining the rel* layers' .relprop over seed_mnist_cnn("conv3x2")
against the floor (DESIGN.md §2) at batch 64, 256 and 1024, and against the seed-style baseline
at batch 256, side by side in one run (round-robin rounds, paired medians).

    python benchmarks/layer_chain.py [--repeats 15] [--json bench_out/layer_chain.json]

Targets (issue 2): rel chain <= 1.2x the floor at every batch; >= 1.5x faster than the seed-style
baseline at 256. Prints the verdicts; the full figures go to the JSON (same format as `lrpfast bench`).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lrpfast.bench.machine import describe, machine_info  # noqa: E402
from lrpfast.bench.progress import Progress  # noqa: E402
from lrpfast.bench.report import format_config, write_json  # noqa: E402
from lrpfast.bench.runner import measure  # noqa: E402
from lrpfast.bench.workloads import build_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="64,256,1024")
    p.add_argument("--seed-batch", type=int, default=256, help="the batch the seed-style baseline runs at")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="bench_out/layer_chain.json")
    args = p.parse_args(argv)
    import torch

    device = torch.device(args.device)
    machine = machine_info(device)
    print(f"machine: {describe(machine)}")
    model = build_model("mnist-conv3x2")
    progress = Progress()
    configs, verdicts = [], []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        impls = ["rel-chain", "floor"] + (["seed-baseline"] if batch == args.seed_batch else [])
        progress.set_description(f"conv3x2 b{batch}")
        c = measure("mnist-conv3x2", batch, impls=impls, device=device, warmup=args.warmup, repeats=args.repeats,
                    progress=progress, model=model)
        configs.append(c)
        progress.write(format_config(c) + "\n")
        rows = {r["name"]: r for r in c["implementations"]}
        ratio = rows["rel-chain"].get("x_floor")
        verdicts.append(f"batch {batch:5d}: rel chain {ratio:.2f}x the floor (target <= 1.2): "
                        f"{'PASS' if ratio is not None and ratio <= 1.2 else 'FAIL'}")
        if "seed-baseline" in rows and c["speedups"].get("seed-baseline"):
            s = c["speedups"]["seed-baseline"]
            verdicts.append(f"batch {batch:5d}: rel chain {s:.2f}x faster than the seed-style baseline (target >= 1.5): "
                            f"{'PASS' if s >= 1.5 else 'FAIL'}")
    progress.close()
    print("\n".join(verdicts))
    write_json(args.json, {"tool": "benchmarks/layer_chain.py", "machine": machine, "settings": vars(args),
                           "configs": configs, "verdicts": verdicts})
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
