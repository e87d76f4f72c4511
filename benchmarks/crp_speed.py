"""CRP speed, side by side in one process: 32 conditional heatmaps of vgg16 (torchvision, random
weights, EpsilonPlusFlat, float32) on one image and on a batch of 8.

    lrpfast     lrpfast.crp.CondAttribution: ONE call with the 32 conditions (one forward, the pass
                above the conditioned layer once, 32 masked copies below it)
    separate    32 lrpfast calls, one condition each (a forward and a whole pass each)
    zennit-crp  crp.attribution.CondAttribution.generate (zennit-crp 0.6: one forward per image,
                the backward graph kept, batches of `--crp-batch` conditions per backward), per image

Targets (issue 16): lrpfast ≥ 5x faster than zennit-crp, and ≤ 0.4x the 32 separate calls.

Run in the CRP environment (benchmarks/crp_env.sh), on a quiet machine:

    .venv-crp/bin/python benchmarks/crp_speed.py                       # 224x224, batch 1 and 8
    .venv-crp/bin/python benchmarks/crp_speed.py --size 112 --repeats 1 --batches 1   # a quick look

Each row: the median wall time of --repeats interleaved rounds (implementations alternate within a
round, so machine noise hits all alike), after one small warm-up call each (the first image, two
conditions). The results, with every round's wall and CPU times, also go to --out (JSON). The
conditions: {"y": the predicted class, <--layer>: [channel]} for 32 channels (the layer's most
relevant ones for the first image: the usual CRP question). The first timed round's heatmaps are
checked: the separate calls and zennit-crp against the one call (relative L2, printed and saved).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torchvision  # noqa: E402

import lrpfast  # noqa: E402
from lrpfast.crp import CondAttribution  # noqa: E402


def rel_l2(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_zennit_crp(model):
    try:
        from crp.attribution import CondAttribution as ZCond
        from zennit.composites import EpsilonPlusFlat
        from zennit.torchvision import VGGCanonizer
    except ImportError as exc:
        print(f"zennit-crp not importable ({exc}): run in .venv-crp (benchmarks/crp_env.sh); skipping it")
        return None
    attr = ZCond(model, no_param_grad=True)
    composite = EpsilonPlusFlat(canonizers=[VGGCanonizer()])

    def run(x, conds, batch):
        heat = []
        for b in range(x.shape[0]):
            xb = x[b:b + 1].clone().requires_grad_(True)
            parts = [r.heatmap.detach() for r in attr.generate(xb, conds[b], composite, batch_size=batch,
                                                                    verbose=False)]
            heat.append(torch.cat(parts)[:len(conds[b])])
        return torch.stack(heat)

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--conditions", type=int, default=32)
    ap.add_argument("--layer", default="features.28", help="the conditioned layer (vgg16's last conv)")
    ap.add_argument("--crp-batch", type=int, default=16, help="zennit-crp generate's batch_size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-separate", action="store_true")
    ap.add_argument("--skip-zennit-crp", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out", "crp_speed.json"))
    args = ap.parse_args()
    command = " ".join(["python", "benchmarks/crp_speed.py", *sys.argv[1:]])
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.vgg16().eval()
    attr = CondAttribution(model, composite="epsilon_plus_flat")
    zcrp = None if args.skip_zennit_crp else make_zennit_crp(model)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, 3, args.size, args.size, generator=g)
        with torch.no_grad():
            pred = model(x).argmax(1)
        top = attr.rank(x[:1], args.layer, k=args.conditions, heatmaps=False).channels[0].tolist()
        # each image's predicted class ("y" left out: lrpfast takes each sample's prediction; zennit-crp
        # gets it per image), the same channels for every image
        conds = [{args.layer: [c]} for c in top]
        per_image = [[{"y": [int(pred[i])], args.layer: [c]} for c in top] for i in range(batch)]
        impls = {"lrpfast": lambda x, conds, per_image: attr(x, conds).heatmap}
        if not args.skip_separate:
            impls["separate"] = lambda x, conds, per_image: torch.cat([attr(x, [c]).heatmap for c in conds], 1)
        if zcrp is not None:
            impls["zennit-crp"] = lambda x, conds, per_image: zcrp(x, per_image, args.crp_batch)
        for fn in impls.values():   # warm-up: first-call allocations, per-shape plans, zennit's hooks
            fn(x[:1], conds[:2], [per_image[0][:2]])
        times = {n: [] for n in impls}
        cpu = {n: [] for n in impls}
        check = {}
        for r in range(args.repeats):
            ref = None
            for name, fn in impls.items():
                t0, c0 = time.perf_counter(), time.process_time()
                heat = fn(x, conds, per_image)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                if r == 0:   # the first round's maps, against the one call's
                    if name == "lrpfast":
                        ref = heat
                    else:
                        check[name] = rel_l2(heat, ref)
                        print(f"batch {batch}: {name} vs lrpfast heatmaps: relative L2 {check[name]:.2e}", flush=True)
                heat = None
            print(f"batch {batch}, round {r + 1}: " + ", ".join(f"{n} {v[-1]:.2f}s" for n, v in times.items()),
                  flush=True)
        med = {n: statistics.median(v) for n, v in times.items()}
        row = {"batch": batch, "size": args.size, "conditions": len(top), "layer": args.layer,
               "crp_batch": args.crp_batch, "repeats": args.repeats, "statistic": "median of interleaved rounds",
               "seconds": med, "all_seconds": times, "cpu_seconds": cpu, "agreement_rel_l2": check}
        if "separate" in med:
            row["lrpfast_over_separate"] = med["lrpfast"] / med["separate"]
            row["round_lrpfast_over_separate"] = [a / b for a, b in zip(times["lrpfast"], times["separate"])]
        if "zennit-crp" in med:
            row["zennit_crp_over_lrpfast"] = med["zennit-crp"] / med["lrpfast"]
            row["round_zennit_crp_over_lrpfast"] = [a / b for a, b in zip(times["zennit-crp"], times["lrpfast"])]
        rows.append(row)
        print(f"batch {batch}, {len(top)} conditions at {args.layer}, {args.size}x{args.size}: "
              + ", ".join(f"{n} {t:.2f}s" for n, t in med.items())
              + (f"; lrpfast/separate {row['lrpfast_over_separate']:.3f} (target <= 0.4)" if "separate" in med else "")
              + (f"; zennit-crp/lrpfast {row['zennit_crp_over_lrpfast']:.1f}x (target >= 5)" if "zennit-crp" in med
                 else ""), flush=True)
    out = {"command": command, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "lrpfast_build": lrpfast.build_info(), "rows": rows}
    try:
        from importlib.metadata import version
        out["zennit"], out["zennit_crp"] = version("zennit"), version("zennit-crp")
    except Exception:  # noqa: BLE001 - not installed: the zennit-crp column is skipped anyway
        pass
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
