"""The figures issue 7 asks for, measured in one run on one device:
- each fused elementwise op's achieved bandwidth (bytes read + written / time) against a plain
  device-to-device copy measured beside it, on tensors of at least 256 MB;
- ε LRP(model) against the floor (DESIGN.md §2: forward with autograd + input gradient) on vgg16
  and resnet50 (and, last, vit_b_16) at batch 64, float32 and bfloat16, interleaved rounds, medians;
- agreement: each map against CPU float64 on a few samples; for bfloat16 beside the error of the
  bfloat16 input gradient (the dtype's own tolerance on the same network).
Writes JSON (--out) and a short text table beside it (figures.txt). --tiny: CPU-sized dry run."""
import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

import lrpfast
from lrpfast import ops


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, reps):
        times = []
        for _ in range(reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return times


def kernel_bandwidth(device, nbytes, reps, out=None):
    """Fills and returns `out`: {dtype: {op: figures}}, one dtype at a time."""
    timer = Timer(device)
    out = {} if out is None else out
    for dtype in (torch.float32, torch.bfloat16):
        n = nbytes // torch.tensor([], dtype=dtype).element_size()
        es = torch.tensor([], dtype=dtype).element_size()
        a = torch.randn(n, device=device, dtype=dtype)
        b = torch.randn(n, device=device, dtype=dtype)
        c = torch.randn(n, device=device, dtype=dtype)
        dst = torch.empty_like(a)
        a2, b2, c2 = a.view(64, -1), b.view(64, -1), c.view(64, -1)
        cases = {
            "copy": (lambda: dst.copy_(a), 2 * n * es),
            "stab_div": (lambda: ops.stab_div(a2, b2), 3 * n * es),
            "mul_input": (lambda: ops.mul_input(a2, b2), 3 * n * es),
            "mul_stab_div": (lambda: ops.mul_stab_div(a2, b2, c2), 4 * n * es),
        }
        # max pool 2x2: pooled r and indices read, the 4x larger input-sized map written once
        side = int((n // 64 // 4) ** 0.5)
        x = torch.randn(64, 1, 2 * side, 2 * side, device=device, dtype=dtype)
        zp, idx = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
        x_shape, x_numel = x.shape, x.numel()
        del x
        # geometry given (2x2 stride 2: disjoint windows): the cell kernel; without it, the zero
        # fill and atomic scatter of any geometry (the before, side by side; same bytes counted)
        cases["max_pool_relprop"] = (lambda: ops.max_pool_relprop(zp, idx, x_shape, kernel_size=2),
                                     zp.numel() * (es + 8) + x_numel * es)
        cases["max_pool_relprop (scatter)"] = (lambda: ops.max_pool_relprop(zp, idx, x_shape),
                                               zp.numel() * (es + 8) + x_numel * es)
        # the rule ops (csrc/cuda/rules.cu) on a conv-like (64, 64, L) layout, channels at dim 1;
        # a paired tensor (two branches) is twice an unpaired one
        r3, z3, p3 = a.view(64, 64, -1), b.view(64, 64, -1), c.view(64, 64, -1)
        zplus = p3.abs()
        paired_c = torch.randn(64, 128, r3.shape[-1], device=device, dtype=dtype)
        cases.update({
            "sign_split": (lambda: ops.sign_split(r3, 1), 3 * n * es),
            "sign_split_mul_input": (lambda: ops.sign_split_mul_input(paired_c, r3, 1), 4 * n * es),
            "bounds_mul_input": (lambda: ops.bounds_mul_input(paired_c, r3, z3, p3, 1), 6 * n * es),
            "alpha_beta_stab_div": (lambda: ops.alpha_beta_stab_div(r3, z3, zplus, 1), 5 * n * es),
            "gamma_stab_div": (lambda: ops.gamma_stab_div(r3, z3, p3, 1), 5 * n * es),
        })
        # The same ops one element a step: inputs offset by one element are not 16-byte aligned,
        # so the kernels take their scalar path (the before of the vectorisation, side by side).
        def offset(t):
            flat = torch.empty(t.numel() + 1, device=device, dtype=dtype)
            flat[1:].copy_(t.reshape(-1))
            return flat[1:].view(t.shape)

        ua2, ub2, uc2, ur3, uz3, up3 = (offset(t) for t in (a2, b2, c2, r3, z3, p3))
        uzplus, upaired_c = offset(zplus), offset(paired_c)
        cases.update({
            "stab_div (scalar path)": (lambda: ops.stab_div(ua2, ub2), 3 * n * es),
            "mul_stab_div (scalar path)": (lambda: ops.mul_stab_div(ua2, ub2, uc2), 4 * n * es),
            "sign_split_mul_input (scalar path)": (lambda: ops.sign_split_mul_input(upaired_c, ur3, 1), 4 * n * es),
            "gamma_stab_div (scalar path)": (lambda: ops.gamma_stab_div(ur3, uz3, up3, 1), 5 * n * es),
            "alpha_beta_stab_div (scalar path)": (lambda: ops.alpha_beta_stab_div(ur3, uz3, uzplus, 1), 5 * n * es),
        })
        res = {}
        for name, (fn, bytes_moved) in cases.items():
            fn()
            t = statistics.median(timer(fn, reps))
            res[name] = {"seconds": t, "bytes": bytes_moved, "GB_per_s": bytes_moved / t / 1e9}
        for name in res:
            res[name]["fraction_of_copy"] = res[name]["GB_per_s"] / res["copy"]["GB_per_s"]
        out[str(dtype).replace("torch.", "")] = res
        del a, b, c, dst, a2, b2, c2, zp, idx, r3, z3, p3, zplus, paired_c, cases, ua2, ub2, uc2, ur3, uz3, up3, uzplus, upaired_c
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def floor_fn(model, x, t):
    xg = x.detach().requires_grad_(True)
    logits = model(xg)
    return torch.autograd.grad(logits.gather(1, t[:, None]).sum(), xg)[0]


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def model_figures(device, name, batch, size, rounds, res=None, attention="cp"):
    """Fills and returns `res`: {dtype: figures}, one dtype at a time. attention: LRP's rule of
    attention blocks (transformers)."""
    from lrpfast.bench.workloads import torchvision_model

    def build():  # a ViT fixes its image size (16x16 patches): built for `size`
        kwargs = {"image_size": size} if name.startswith("vit") else {}
        return torchvision_model(name, **kwargs).eval()

    torch.manual_seed(0)
    model = build()
    res = {} if res is None else res
    x_cpu = torch.randn(batch, 3, size, size)
    # The reference: CPU float64 on the first two samples.
    model64 = build()
    model64.load_state_dict(model.state_dict())
    model64 = model64.double()
    with torch.no_grad():
        t_all = model(x_cpu[:2]).argmax(1)
    ref_lrp = lrpfast.LRP(model64, attention=attention)(x_cpu[:2].double(), t_all)
    ref_grad = floor_fn(model64, x_cpu[:2].double(), t_all)
    del model64
    timer = Timer(device)
    for dtype in (torch.float32, torch.bfloat16):
        m = build()
        m.load_state_dict(model.state_dict())
        m = m.to(device, dtype)
        x = x_cpu.to(device, dtype)
        with torch.no_grad():
            t = m(x).argmax(1)
        lrp = lrpfast.LRP(m, attention=attention)
        impls = {"floor": lambda: floor_fn(m, x, t), "lrpfast": lambda: lrp(x, t)}
        for fn in impls.values():  # warm-up (cuDNN heuristics, allocator)
            fn(), fn()
        times = {k: [] for k in impls}
        for _ in range(rounds):  # interleaved rounds
            for k, fn in impls.items():
                times[k] += timer(fn, 1)
        med = {k: statistics.median(v) for k, v in times.items()}
        # agreement on the reference samples (targets from the float64 model)
        tt = t_all.to(device)
        err_lrp = rel_err(lrp(x[:2], tt), ref_lrp)
        err_grad = rel_err(floor_fn(m, x[:2], tt), ref_grad)
        exact = {}
        if dtype == torch.float32 and device.type == "cuda":
            # cuDNN convolutions default to TF32 (10-bit mantissa) on Hopper, for LRP and the floor
            # alike: the errors above are that arithmetic's. Once more in true float32.
            saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            try:
                exact = {"rel_err_lrp_vs_cpu_f64_no_tf32": rel_err(lrp(x[:2], tt), ref_lrp),
                         "rel_err_grad_vs_cpu_f64_no_tf32": rel_err(floor_fn(m, x[:2], tt), ref_grad)}
            finally:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
        res[str(dtype).replace("torch.", "")] = {
            "batch": batch, "size": size, "median_s": med,
            "spread_s": {k: [min(v), max(v)] for k, v in times.items()},
            "ratio_to_floor": med["lrpfast"] / med["floor"],
            "rel_err_lrp_vs_cpu_f64": err_lrp, "rel_err_grad_vs_cpu_f64": err_grad, **exact,
        }
        del m, x, lrp
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def _interleaved(timer, impls, rounds):
    """Median seconds per impl, rounds interleaved (drift hits every impl alike), after warm-up."""
    for fn in impls.values():
        fn(), fn()
    times = {k: [] for k in impls}
    for _ in range(rounds):
        for k, fn in impls.items():
            times[k] += timer(fn, 1)
    return {k: statistics.median(v) for k, v in times.items()}


def latency_figures(device, names, batches, size, rounds, res=None):
    """Small batches, float32: where launch overhead rather than bandwidth could decide the ratio
    to the floor (the case for CUDA graphs). Fills `res`: {"name b": {floor, lrpfast, ratio}}."""
    from lrpfast.bench.workloads import torchvision_model

    res = {} if res is None else res
    timer = Timer(device)
    for name in names:
        torch.manual_seed(0)
        m = torchvision_model(name).eval().to(device)
        lrp = lrpfast.LRP(m)
        for b in batches:
            x = torch.randn(b, 3, size, size, device=device)
            with torch.no_grad():
                t = m(x).argmax(1)
            med = _interleaved(timer, {"floor": lambda: floor_fn(m, x, t), "lrpfast": lambda: lrp(x, t)}, rounds)
            res[f"{name} b{b}"] = dict(med, ratio=med["lrpfast"] / med["floor"])
    return res


def max_pool_ab(device, batch, size, rounds, res=None):
    """vgg16 ε LRP, float32, with max_pool_relprop's cell kernel (the layers pass the pooling
    geometry) against the zero fill + atomic scatter (geometry withheld), side by side."""
    from lrpfast import ops
    from lrpfast.bench.workloads import torchvision_model

    res = {} if res is None else res
    torch.manual_seed(0)
    m = torchvision_model("vgg16").eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        t = m(x).argmax(1)
    lrp = lrpfast.LRP(m)
    cells = ops._disjoint_cells

    def scatter():
        ops._disjoint_cells = lambda *a, **k: ([], [])
        try:
            return lrp(x, t)
        finally:
            ops._disjoint_cells = cells

    med = _interleaved(Timer(device), {"cells": lambda: lrp(x, t), "scatter": scatter}, rounds)
    res.update(med, batch=batch, ratio=med["cells"] / med["scatter"])
    # The two pooling kernels give the same map bit for bit (tests/test_ops.py); the whole model's
    # map also goes through cuDNN, whose default algorithms may differ from run to run (H100,
    # 2026-11-26: torch.equal of the two model maps was False). So: the difference between the
    # kernels next to the run-to-run difference of one, and bitwise equality under deterministic
    # cuDNN.
    a1, a2, b = lrp(x, t), lrp(x, t), scatter()
    res.update(rel_diff_cells_vs_scatter=rel_err(b, a1), rel_diff_run_to_run=rel_err(a2, a1))
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        res["same_map_deterministic"] = bool(torch.equal(lrp(x, t), scatter()))
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
    return res


def profile_table(prof, cuda: bool):
    """(sort key, top-20 table) of a finished torch.profiler run: by device time on a GPU. The
    column is "device_time_total" since torch 2.4 ("cuda_time_total" before, still accepted as an
    alias by newer versions): the first key the installed torch sorts by is used."""
    keys = ("device_time_total", "cuda_time_total") if cuda else ("cpu_time_total",)
    errors = []
    for key in keys:
        try:
            return key, prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60)
        except Exception as e:  # noqa: BLE001 (a profiler without this column: try the next name)
            errors.append(f"{key}: {type(e).__name__}: {e}")
    return keys[0], "(no table: " + "; ".join(errors) + ")"


def profile_breakdown(device, name, batch, size, path):
    """Where the time of one ε LRP call and one floor call goes (float32), by kernel: what to tune
    if the ratio to the floor misses. torch.profiler, one call each after a warm-up."""
    import torchvision
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(weights=None).eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        t = m(x).argmax(1)
    lrp = lrpfast.LRP(m)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = []
    for label, fn in (("lrpfast", lambda: lrp(x, t)), ("floor", lambda: floor_fn(m, x, t))):
        fn(), fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=acts) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        key, table = profile_table(prof, device.type == "cuda")
        out.append(f"==== {name} float32 b{batch} {label}: top kernels/ops by {key}\n")
        out.append(table)
        out.append("\n")
    with open(path, "w") as f:
        f.write("".join(out))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="CPU-sized dry run")
    p.add_argument("--out", default="figures.json")
    p.add_argument("--only", default="", help="comma-separated parts to run (kernels, vgg16, resnet50, profile, "
                                              "latency, max_pool_ab, vit_b_16, vit_b_16_attnlrp): a part cut or missed before, "
                                              "alone")
    args = p.parse_args()
    device = torch.device(args.device)
    tiny = args.tiny
    info = {"build_info": lrpfast.build_info(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M"),
            # torch's defaults are kept (a user's setting): cuDNN convolutions may use TF32, for the
            # floor and lrpfast alike; the errors below are against float64 under that setting.
            "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}}
    out_dir = os.path.dirname(os.path.abspath(args.out))
    errors = []

    def save():
        # after every part: a later part that crashes or is cut by the step's time cap (gpu_check.sh)
        # leaves the figures measured before it on disk
        lines = summary_lines(info, errors)
        with open(args.out, "w") as f:
            json.dump(dict(info, errors=errors), f, indent=1)
        with open(os.path.join(out_dir, "figures.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        return lines

    info["kernels"], info["models"] = {}, {}
    parts = [("kernels", lambda: kernel_bandwidth(device, (1 << 20) if tiny else (256 << 20) * 2, 3 if tiny else 20,
                                                  out=info["kernels"]))]
    if hasattr(lrpfast, "LRP"):
        parts += [(name, lambda name=name: model_figures(device, name, 2 if tiny else 64, 32 if tiny else 224,
                                                         2 if tiny else 10, res=info["models"].setdefault(name, {})))
                  for name in ("vgg16", "resnet50")]
        parts.append(("profile", lambda: profile_breakdown(device, "vgg16", 2 if tiny else 64, 32 if tiny else 224,
                                                           os.path.join(out_dir, "profile.txt"))))
        info["latency"], info["max_pool_ab"] = {}, {}
        parts.append(("latency", lambda: latency_figures(device, ("vgg16", "resnet50"), (1, 8), 32 if tiny else 224,
                                                         3 if tiny else 20, res=info["latency"])))
        parts.append(("max_pool_ab", lambda: max_pool_ab(device, 2 if tiny else 64, 32 if tiny else 224,
                                                         2 if tiny else 10, res=info["max_pool_ab"])))
        # a transformer (LayerNorm, attention: lrpfast/transformer.py), last: the first part a
        # time cap cuts (no target in issue 7; the ratio is for RESULTS.md)
        parts.append(("vit_b_16", lambda: model_figures(device, "vit_b_16", 2 if tiny else 64, 32 if tiny else 224,
                                                        2 if tiny else 10,
                                                        res=info["models"].setdefault("vit_b_16", {}))))
        # AttnLRP (relevance through the softmax): two more attention-sized products per block
        parts.append(("vit_b_16_attnlrp", lambda: model_figures(
            device, "vit_b_16", 2 if tiny else 64, 32 if tiny else 224, 2 if tiny else 10,
            res=info["models"].setdefault("vit_b_16 attnlrp", {}), attention="attnlrp")))
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {name for name, _ in parts}
        if unknown:
            p.error(f"--only: no part named {', '.join(sorted(unknown))}")
        parts = [(name, part) for name, part in parts if name in wanted]
    try:
        for name, part in parts:
            try:  # one part failing (a bug on this device) must not cost the other parts' figures
                part()
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                errors.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:  # also on KeyboardInterrupt (gpu_check.sh's time cap): what was measured so far
        lines = save()
    print("\n".join(lines))
    return 1 if errors else 0


def summary_lines(info, errors=()):
    lines = [f"device: {info['device']}  torch {info['torch']}"]
    for dt, res in info.get("kernels", {}).items():
        lines.append(f"kernels {dt}: copy {res['copy']['GB_per_s']:.0f} GB/s; " + "; ".join(
            f"{k} {v['GB_per_s']:.0f} GB/s ({100 * v['fraction_of_copy']:.0f}%)" for k, v in res.items() if k != "copy"))
    for name, per in info.get("models", {}).items():
        for dt, r in per.items():
            lines.append(f"{name} {dt} b{r['batch']}: floor {1e3 * r['median_s']['floor']:.2f} ms, lrpfast "
                         f"{1e3 * r['median_s']['lrpfast']:.2f} ms, ratio {r['ratio_to_floor']:.3f}; rel err vs CPU f64: "
                         f"lrp {r['rel_err_lrp_vs_cpu_f64']:.1e} (grad {r['rel_err_grad_vs_cpu_f64']:.1e})"
                         + (f"; TF32 off: lrp {r['rel_err_lrp_vs_cpu_f64_no_tf32']:.1e} "
                            f"(grad {r['rel_err_grad_vs_cpu_f64_no_tf32']:.1e})"
                            if "rel_err_lrp_vs_cpu_f64_no_tf32" in r else ""))
    lat = info.get("latency", {})
    if lat:
        lines.append("latency float32: " + "; ".join(
            f"{k}: floor {1e3 * v['floor']:.2f} ms, lrpfast {1e3 * v['lrpfast']:.2f} ms ({v['ratio']:.2f}x)"
            for k, v in lat.items()))
    ab = info.get("max_pool_ab", {})
    if "ratio" in ab:
        lines.append(f"vgg16 float32 b{ab['batch']} LRP: max-pool cells {1e3 * ab['cells']:.2f} ms, scatter "
                     f"{1e3 * ab['scatter']:.2f} ms ({ab['ratio']:.3f}x); maps differ by "
                     f"{ab.get('rel_diff_cells_vs_scatter', float('nan')):.1e} (run to run "
                     f"{ab.get('rel_diff_run_to_run', float('nan')):.1e}); bitwise equal under deterministic "
                     f"cuDNN: {ab.get('same_map_deterministic')}")
    lines += [f"FAILED {e}" for e in errors]
    return lines


if __name__ == "__main__":
    sys.exit(main())
