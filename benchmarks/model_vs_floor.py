"""LRP ε on whole models against the floor (DESIGN.md §2), side by side in one process.

The floor: x.requires_grad_(); logits = model(x); torch.autograd.grad(logits.gather(1, t).sum(), x)
(one forward with autograd + the input gradient only). Every round times each contender once, in
turn (interleaved, in alternating order, so that load from other processes hits all of them
alike); the table shows medians and the ratio to the floor of the same round set.

    python benchmarks/model_vs_floor.py                       # all cases of issue 3
    python benchmarks/model_vs_floor.py --cases seed64 k10 --rounds 15
    python benchmarks/model_vs_floor.py --json out.json

Cases (issue 3 targets): seed64/seed256/seed1024 = seed_mnist_cnn("conv3x2") at batch 64/256/1024
(≤ 1.10×), vgg16 batch 8 at 224×224 (≤ 1.10×), resnet50 batch 8 (≤ 1.15×), k10 = 10 targets in
one call vs ten single calls on seed_mnist_cnn("conv3x2") batch 64 (≤ 0.6×). vit = torchvision's
vit_b_16 (random weights) at batch 8, 224×224, CP-LRP (σ and attention weights constant; ≤ 1.30×);
vit_attnlrp the same with attention="attnlrp" (relevance through the softmax too; no issue target,
1.50× listed as the expectation: two more attention-sized products per block than CP-LRP).

    python benchmarks/model_vs_floor.py --large            # 10,000 MNIST images, 512 vgg16 images,
                                                           # one call each, with a memory budget
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lrpfast  # noqa: E402
from lrpfast.models import seed_mnist_cnn  # noqa: E402

TARGETS = {"seed64": 1.10, "seed256": 1.10, "seed1024": 1.10, "vgg16": 1.10, "resnet50": 1.15, "k10": 0.60,
           "vit": 1.30, "vit_attnlrp": 1.50}


def floor_fn(model):
    def run(x):
        x = x.detach().requires_grad_()
        logits = model(x)
        t = logits.argmax(1, keepdim=True)
        return torch.autograd.grad(logits.gather(1, t).sum(), x)[0]

    return run


def make_case(name):
    torch.manual_seed(0)
    if name.startswith("seed") or name == "k10":
        model = seed_mnist_cnn("conv3x2")
        batch = 64 if name == "k10" else int(name[4:])
        shape = (1, 28, 28)
    else:
        import torchvision

        vit = name.startswith("vit")
        model = getattr(torchvision.models, "vit_b_16" if vit else name)(weights=None)
        batch, shape = 8, (3, 224, 224)
        if vit:  # torchvision starts the head at 0: every logit 0, nothing to explain
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, *shape)
    lrp = lrpfast.LRP(model, attention="attnlrp" if name == "vit_attnlrp" else "cp")
    if name == "k10":
        targets = torch.arange(10).repeat(batch, 1)
        one = lambda x: lrp(x, target=targets)  # noqa: E731

        def ten(x):
            for k in range(10):
                lrp(x, target=k)

        return x, {"ten single calls": ten, "K=10 one call": one}, "ten single calls"
    return x, {"floor": floor_fn(model), "LRP": lrp}, "floor"


def measure(fns, x, rounds, warmup=2):
    times = {k: [] for k in fns}
    for _ in range(warmup):
        for f in fns.values():
            f(x)
    items = list(fns.items())
    for r in range(rounds):
        # alternate the order (ABBA...), so that neither contender always runs right after the other
        for k, f in (items if r % 2 == 0 else items[::-1]):
            t0 = time.perf_counter()
            f(x)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, times


LARGE = {  # name: (model, batch, input shape, memory budget)
    "mnist10k": ("conv3x2", 10000, (1, 28, 28), "2GiB"),
    "vgg16x512": ("vgg16", 512, (3, 224, 224), "6GiB"),
}


def run_large(name):
    """One big call in this (fresh) process: wall time and the process's peak RSS."""
    import resource

    kind, batch, shape, budget = LARGE[name]
    torch.manual_seed(0)
    if kind == "conv3x2":
        model = seed_mnist_cnn("conv3x2").eval()
    else:
        import torchvision

        model = getattr(torchvision.models, kind)(weights=None).eval()
    x = torch.randn(batch, *shape)
    lrp = lrpfast.LRP(model, memory_budget=budget)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    r = lrp(x)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    chunk = lrp._chunk(x, 1)
    print(json.dumps({"case": name, "batch": batch, "budget": budget, "chunk": chunk, "wall_s": wall,
                      "peak_rss_gib": peak / 2 ** 20, "rss_before_gib": base / 2 ** 20,
                      "finite": bool(torch.isfinite(r).all())}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default: by case size)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the raw timings here")
    ap.add_argument("--large", nargs="*", choices=list(LARGE), default=None,
                    help="instead: explain one huge batch in one call with a memory budget (each in a fresh "
                         "process, reporting its peak RSS): " + ", ".join(LARGE))
    ap.add_argument("--_run-large", dest="run_large", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run_large:
        run_large(args.run_large)
        return 0
    if args.large is not None:
        import subprocess

        print("| case | batch | memory_budget | chunk | wall (s) | peak RSS (GiB) |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in args.large or list(LARGE):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_run-large", name],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {name} | {r['batch']} | {r['budget']} | {r['chunk']} | {r['wall_s']:.1f} | "
                  f"{r['peak_rss_gib']:.2f} |", flush=True)
        return 0
    print(f"# LRP ε vs floor — {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, extension={lrpfast.HAS_EXT}")
    print("| case | baseline (ms) | LRP (ms) | ratio | target |")
    print("|---|---:|---:|---:|---:|")
    out = {}
    for name in args.cases:
        x, fns, base = make_case(name)
        rounds = args.rounds or {"seed64": 21, "seed256": 11, "seed1024": 7, "k10": 11}.get(name, 7)
        med, raw = measure(fns, x, rounds)
        other = next(k for k in fns if k != base)
        ratio = med[other] / med[base]
        flag = "ok" if ratio <= TARGETS[name] else "MISS"
        print(f"| {name} ({base} vs {other}) | {med[base] * 1e3:.1f} | {med[other] * 1e3:.1f} | {ratio:.3f} | "
              f"≤ {TARGETS[name]:.2f} {flag} |", flush=True)
        out[name] = {"median_s": med, "raw_s": raw, "ratio": ratio, "target": TARGETS[name], "rounds": rounds}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
