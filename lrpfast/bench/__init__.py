"""`lrpfast bench`: how much faster than the seed-style baseline and the peers, and still right?

Times, side by side in one run on the same inputs (round-robin, after a warm-up):
lrpfast with the extension and with the fallback, the rel* layer chain, the seed-style baseline,
the floor (forward + input gradient, DESIGN.md §2), zennit and captum with the matching rule.
Beside every time: the relative L2 difference of the input maps from lrpfast's float64 fallback.
Writes a table to the terminal, a JSON file with every figure and the machine, and a PNG plot.

`lrpfast bench --kernels`: bandwidth of each fused elementwise op against a device copy.

Only torch is needed; torchvision (vgg16, resnet50), zennit, captum, matplotlib and tqdm are
used when installed, and a line says what was skipped when they are not.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

from .implementations import IMPLEMENTATIONS
from .workloads import MODELS

DTYPES = ("float32", "float64", "bfloat16", "float16")
COMPOSITES = ("epsilon", "epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1",
              "epsilon_alpha2_beta1_flat")
DEFAULT_MODELS = "mnist-conv3x2,mnist-notebook,vgg16"
DEFAULT_IMPLS = "lrpfast,lrpfast-fallback,rel-chain,seed-baseline,floor,zennit,captum"


def _list(kind, choices=None):
    def parse(text: str):
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if choices is not None and s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{kind}: unknown {', '.join(bad) or '(empty)'}; expected a comma list of "
                                             f"{', '.join(choices)}")
        return items
    return parse


def _ints(text: str):
    try:
        v = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        v = []
    if not v or any(i < 1 for i in v):
        raise argparse.ArgumentTypeError(f"batch sizes: expected a comma list of positive ints, got {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to run")
    g.add_argument("--models", type=_list("models", tuple(MODELS)), default=DEFAULT_MODELS,
                   help=f"comma list of {', '.join(MODELS)} (default: %(default)s)")
    g.add_argument("--batch-sizes", type=_ints, default=None,
                   help="comma list; default per model: " + ", ".join(f"{k} {','.join(map(str, v[2]))}" for k, v in MODELS.items()))
    g.add_argument("--rules", "--composites", dest="composites", type=_list("rules", COMPOSITES), default="epsilon",
                   help=f"comma list of {', '.join(COMPOSITES)} (zennit's names; 'epsilon' = ε everywhere; "
                        "default: %(default)s)")
    g.add_argument("--impls", type=_list("implementations", IMPLEMENTATIONS), default=DEFAULT_IMPLS,
                   help=f"comma list of {', '.join(IMPLEMENTATIONS)} (default: %(default)s)")
    g.add_argument("--dtype", type=_list("dtypes", DTYPES), default="float32",
                   help="comma list of " + ", ".join(DTYPES) + " (default: %(default)s)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--quick", action="store_true",
                   help="a dry run in seconds: mnist-notebook at batch 4 (kernels: 4 MiB), 1 repeat")
    g = p.add_argument_group("rule")
    g.add_argument("--eps", type=float, default=1e-6, help="ε of the rules (default: %(default)s)")
    g.add_argument("--stabilizer", choices=("sign", "plus"), default="sign",
                   help="z + eps·sign(z) (default), or the seed's z + eps (seed-parity mode)")
    g.add_argument("--init", choices=("logit", "onehot"), default="logit",
                   help="initial relevance at the target: the logit (the seed's, default) or 1 (zennit's)")
    g.add_argument("--low", type=float, default=-3.0, help="epsilon_gamma_box: lowest input value (default: %(default)s)")
    g.add_argument("--high", type=float, default=3.0, help="epsilon_gamma_box: highest input value (default: %(default)s)")
    g.add_argument("--gamma", type=float, default=0.25, help="epsilon_gamma_box: γ (default: %(default)s)")
    g = p.add_argument_group("timing")
    g.add_argument("--repeats", type=int, default=5, help="timed calls per implementation, after the warm-up (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=1, help="untimed calls per implementation first (default: %(default)s)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    g = p.add_argument_group("kernel mode")
    g.add_argument("--kernels", action="store_true", help="bandwidth of the fused elementwise ops vs a device copy")
    g.add_argument("--kernel-mib", type=float, default=256.0, help="size of each tensor in MiB; >= 256 for the real figure (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="bench_out", help="folder for the JSON and the plot (default: %(default)s)")
    g.add_argument("--json", default=None, help="JSON path (default: OUT/bench-<time>.json)")
    g.add_argument("--plot", default=None, help="PNG path (default: beside the JSON)")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    from .machine import describe, machine_info
    from .progress import Progress
    from .report import format_config, format_kernels, write_json, write_plot

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("lrpfast bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # cuda:N: the timing events go on that device's stream
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.warmup = 1, 1
        args.kernel_mib = min(args.kernel_mib, 4.0)
    if args.repeats < 1 or args.warmup < 0:
        print("lrpfast bench: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    machine = machine_info(device)
    print(f"machine: {describe(machine)}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.json or os.path.join(args.out, f"bench-{'kernels-' if args.kernels else ''}{stamp}.json")
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    progress = Progress(enabled=not args.no_progress)
    try:
        if args.kernels:
            from .kernels import run_kernels

            results = []
            for dtype_name in args.dtype:
                progress.set_description(f"kernels {dtype_name}")
                k = run_kernels(args.kernel_mib, getattr(torch, dtype_name), device, args.warmup, args.repeats,
                                args.eps, progress)
                results.append(k)
                progress.write(format_kernels(k))
                if k["tensor_mib"] < 256:
                    progress.write(f"note: tensors of {k['tensor_mib']:.0f} MiB (< 256 MiB): a dry run, not the "
                                   "bandwidth figure")
            progress.close()
            write_json(json_path, {"tool": "lrpfast bench --kernels", "machine": machine, "settings": settings,
                                   "kernels": results})
            print(f"JSON: {json_path}")
            return 0
        return _run_models(args, device, machine, settings, json_path, progress, describe, format_config,
                           write_json, write_plot)
    finally:
        progress.close()


def _run_models(args, device, machine, settings, json_path, progress, describe, format_config, write_json,
                write_plot) -> int:
    import torch

    from .implementations import lrp_available
    from .runner import measure
    from .workloads import build_model, default_batches

    models = ["mnist-notebook"] if args.quick else args.models
    notes = []
    if not lrp_available():
        notes.append("lrpfast.LRP does not exist in this checkout: the lrpfast rows are skipped; the rel* "
                     "layer chain stands in for lrpfast and the float64 reference")
    for peer in ("zennit", "captum"):
        if peer in args.impls:
            try:
                __import__(peer)
            except ImportError:
                notes.append(f"{peer} is not installed: its rows are skipped (pip install {peer})")
    for line in notes:
        print(f"note: {line}")
    configs = []
    params = {"low": args.low, "high": args.high, "gamma": args.gamma}
    for name in models:
        try:
            model = build_model(name)
        except ImportError as exc:
            line = f"skipping {name}: {exc}"
            notes.append(line)
            progress.write(line)
            continue
        batches = [4] if args.quick else (args.batch_sizes or default_batches(name))
        for dtype_name in args.dtype:
            dtype = getattr(torch, dtype_name)
            for composite in args.composites:
                for batch in batches:
                    progress.set_description(f"{name} {composite} {dtype_name} b{batch}")
                    c = measure(name, batch, composite, dtype, device, args.impls, args.warmup, args.repeats,
                                args.eps, args.stabilizer, args.init,
                                params if composite == "epsilon_gamma_box" else None,
                                memory=not args.no_memory, progress=progress, model=model)
                    configs.append(c)
                    progress.write(format_config(c) + "\n")
        del model
    progress.close()
    payload = {"tool": "lrpfast bench", "machine": machine, "settings": settings, "notes": notes, "configs": configs}
    write_json(json_path, payload)
    print(f"JSON: {json_path}")
    if not args.no_plot:
        plot_path = args.plot or os.path.splitext(json_path)[0] + ".png"
        why = write_plot(plot_path, configs, title=describe(machine))
        print(f"plot: {plot_path}" if why is None else f"plot skipped: {why}")
    return 0
