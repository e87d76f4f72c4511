"""`lrpfast bench --kernels`: the achieved bandwidth of each fused elementwise op against a plain
device-to-device copy (tensor.copy_) timed in the same run, round-robin, on large tensors.

Bandwidth = the bytes the op must move at least (each input read once, the output written
once) / median time. A copy moves 2 bytes per byte copied; an op at 100% of the copy's bandwidth
runs at the memory's speed. Tensors default to 256 MiB each (the relevance tensor's size), big
enough to defeat every cache; --kernel-mib shrinks them for a dry run.

The ops return new tensors, the copy writes into a preallocated one. On a GPU the caching
allocator makes that difference vanish; on a CPU with glibc, a large output is fresh memory on
every call and its page faults count in the op's time (DESIGN.md §2, "on CPU, memory"), so CPU
percentages understate the kernels. The figure that matters is the GPU's.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from .. import _ext, ops
from .timing import Timer, round_robin, summarize

_PLANE = 64 * 64 * 64  # elements per sample of the (B, 64, 64, 64) test tensors


def _tensors(mib: float, dtype: torch.dtype, device) -> dict:
    elt = torch.empty((), dtype=dtype).element_size()
    b = max(1, int(mib * 2**20 / elt) // _PLANE)
    shape = (b, 64, 64, 64)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd():
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    t = {"r": rnd(), "z": rnd(), "x": rnd(), "shape": shape, "n": b * _PLANE, "elt": elt}
    # Max-pool 2x2 indices into a (B, 64, 128, 128) input: one winner per window, chosen at random
    # (like the forward's), without materialising the 4x larger input.
    oh = torch.arange(64).view(64, 1)
    ow = torch.arange(64).view(1, 64)
    di = torch.randint(0, 2, shape, generator=g)
    dj = torch.randint(0, 2, shape, generator=g)
    t["indices"] = ((2 * oh + di) * 128 + 2 * ow + dj).to(device)
    t["pool_input_size"] = (b, 64, 128, 128)
    t["dst"] = torch.empty_like(t["r"])
    return t


def run_kernels(mib: float = 256, dtype: torch.dtype = torch.float32, device="cpu", warmup: int = 1,
                repeats: int = 5, eps: float = 1e-6, progress=None) -> dict:
    device = torch.device(device)
    t = _tensors(mib, dtype, device)
    n, e = t["n"], t["elt"]
    r, z, x, idx = t["r"], t["z"], t["x"], t["indices"]
    ops_under_test = {
        "stab_div": (lambda: ops.stab_div(r, z, eps, "sign"), 3 * n * e),
        "mul_input": (lambda: ops.mul_input(r, x), 3 * n * e),
        "mul_stab_div": (lambda: ops.mul_stab_div(r, x, z, eps, "sign"), 4 * n * e),
        "max_pool_relprop": (lambda: ops.max_pool_relprop(r, idx, t["pool_input_size"], kernel_size=2),
                             n * e + n * 8 + 4 * n * e),
    }
    impls = (["extension"] if _ext.HAS_EXT else []) + ["fallback"]
    calls: Dict[str, object] = {"copy_/torch": lambda: t["dst"].copy_(r)}
    nbytes = {"copy_/torch": 2 * n * e}

    def under(impl, fn):
        def call():
            with _ext.use_implementation(impl):
                return fn()
        return call

    for name, (fn, b) in ops_under_test.items():
        for impl in impls:
            calls[f"{name}/{impl}"] = under(impl, fn)
            nbytes[f"{name}/{impl}"] = b
    if progress is not None:
        progress.add_total((warmup + repeats) * len(calls))
    errors: Dict[str, str] = {}
    times = round_robin(calls, Timer(device), warmup, repeats,
                        on_error=lambda k, exc: errors.__setitem__(k, f"{type(exc).__name__}: {exc}"),
                        tick=progress.tick if progress is not None else None)
    copy_bw = None
    if "copy_/torch" in times:
        copy_bw = nbytes["copy_/torch"] / summarize(times["copy_/torch"])["median_s"]
    results: List[dict] = []
    for key in calls:
        op, impl = key.split("/")
        row = {"op": op, "impl": impl, "bytes": nbytes[key]}
        if key in times:
            s = summarize(times[key])
            row.update(s, times_s=times[key], gb_per_s=nbytes[key] / s["median_s"] / 1e9)
            row["fraction_of_copy"] = (nbytes[key] / s["median_s"]) / copy_bw if copy_bw else None
        else:
            row.update(median_s=None, iqr_s=None, error=errors.get(key))
        results.append(row)
    return {"dtype": str(dtype).replace("torch.", ""), "device": str(device), "shape": list(t["shape"]),
            "tensor_mib": n * e / 2**20, "eps": eps, "warmup": warmup, "repeats": repeats,
            "copy_gb_per_s": copy_bw / 1e9 if copy_bw else None,
            "bytes_model": {"copy_": "read n + write n", "stab_div": "read r, z + write s",
                            "mul_input": "read c, x + write R", "mul_stab_div": "read c, x, z + write s",
                            "max_pool_relprop": "read r + read int64 indices + write the 4x larger input map"},
            "results": results}
