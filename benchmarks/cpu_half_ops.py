"""CPU timings of the elementwise and rule ops per dtype, with torch's own `a * b` as a reference.

    python benchmarks/cpu_half_ops.py [--lib path/to/_C.so] [--calls 20] [--repeats 1]

One torch thread, (64, 64, 64) tensors in the conv layout (channels at dim 1, paired tensors
(64, 128, 64)), minimum over `--calls` calls of torch.ops.lrpfast.* (the kernels without the
Python checks). --lib loads another build of the extension instead of lrpfast._C (one build per
process: both register the same operators), so an old .so can be timed against the new one.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def load(lib):
    if lib:
        torch.ops.load_library(lib)
    else:
        import lrpfast._C  # noqa: F401


def cases(dtype):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    x, z, r, c = rnd(64, 64, 64), rnd(64, 64, 64), rnd(64, 64, 64), rnd(64, 64, 64)
    cp = rnd(64, 128, 64)
    _, idx = F.max_pool1d(torch.randn(64, 64, 64, generator=g), 2, return_indices=True)
    rp = rnd(64, 64, 32)
    op = torch.ops.lrpfast
    return {
        "stab_div": lambda: op.stab_div(r, z, 1e-6, "sign"),
        "mul_input": lambda: op.mul_input(c, x),
        "mul_stab_div": lambda: op.mul_stab_div(c, x, z, 1e-6, "sign"),
        "sign_split": lambda: op.sign_split(x, 1, 1),
        "sign_split_mul_input": lambda: op.sign_split_mul_input(cp, x, 1, 1),
        "bounds_mul_input": lambda: op.bounds_mul_input(cp, x, z, r, 1, 1),
        "alpha_beta_stab_div": lambda: op.alpha_beta_stab_div(r, z, c, 1, 1, 2.0, 1.0, 1e-6, "sign"),
        "gamma_stab_div": lambda: op.gamma_stab_div(r, z, c, 1, 1, 0.25, 1e-6, "sign"),
        "max_pool_relprop": lambda: op.max_pool_relprop(rp, idx, [64, 64, 64]),
        "torch a*b": lambda: x * c,
    }


def best_ms(fn, calls):
    fn()
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lib", default="")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--repeats", type=int, default=1, help="print one line per op and dtype per repeat")
    args = p.parse_args()
    torch.set_num_threads(1)
    load(args.lib)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for name, fn in cases(dtype).items():
            times = [best_ms(fn, args.calls) for _ in range(args.repeats)]
            print(f"{name:22s} {str(dtype)[6:]:9s} " + " ".join(f"{t:.3f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
