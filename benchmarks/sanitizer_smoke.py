"""Every lrpfast kernel once on small inputs (all dtypes, vectorised and scalar paths, K > 1,
channels_last, overlapping and disjoint max-pool windows), checked against the float64 fallback. Small on
purpose: it runs under compute-sanitizer memcheck/racecheck in benchmarks/gpu_check.sh."""
import argparse
import sys

import torch

import lrpfast
from lrpfast import _fallback, ops


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    dev = torch.device(args.device)
    if not lrpfast.HAS_EXT:
        print("extension not loaded"); return 1
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = False  # compare true float32 arithmetic with float64
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 5e-3, torch.bfloat16: 3e-2}
    failures = []

    def check(name, got, ref, dtype):
        e = rel_err(got, ref)
        ok = e <= tol[dtype] and torch.isfinite(got).all().item()
        print(f"{name:<40} {str(dtype):<15} rel err {e:.2e} {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(name)

    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for n, k in ((1000, 1), (1003, 1), (1000, 3), (1001, 2)):  # vectorised, tail, K maps, odd K rows
            b = 2
            # |z| >= 0.05: r / stab(z) of a z near 0 overflows float16 (65504) where float64 does not,
            # a dtype limit, not a kernel fault (randn gave exact zeros in float16 under torch 2.11)
            z = torch.randn(b, n, device=dev)
            z = (torch.where(z < 0, -1.0, 1.0) * z.abs().clamp_min(0.05)).to(dtype)
            x = torch.randn(b, n, device=dev, dtype=dtype)
            r = torch.randn(b * k, n, device=dev, dtype=dtype)
            d = lambda t: t.double()  # noqa: E731
            check(f"stab_div n={n} k={k}", ops.stab_div(r, z), _fallback.stab_div(d(r), d(z), 1e-6, "sign"), dtype)
            check(f"mul_input n={n} k={k}", ops.mul_input(r, x), _fallback.mul_input(d(r), d(x)), dtype)
            check(f"mul_stab_div n={n} k={k}", ops.mul_stab_div(r, x, z, 1e-6, "plus"),
                  _fallback.mul_stab_div(d(r), d(x), d(z), 1e-6, "plus"), dtype)
        # max pool with overlapping windows (kernel 3, stride 2), K = 2 maps per sample
        x = torch.randn(2, 3, 9, 9, device=dev, dtype=dtype)
        zp, idx = torch.nn.functional.max_pool2d(x, 3, 2, 1, return_indices=True)
        r = torch.randn(4, *zp.shape[1:], device=dev, dtype=dtype)
        check("max_pool_relprop 2d overlap k=2", ops.max_pool_relprop(r, idx, x.shape),
              _fallback.max_pool_relprop(r.double(), idx, list(x.shape)), dtype)
        # disjoint windows (the cell kernel: every input element written once, no zero fill):
        # 2x2 on an odd-sized plane (uncovered tail), 1d with gaps and padding, 3d; K = 2 maps
        for dims, size, kw in ((2, (9, 10), dict(kernel_size=2)),
                               (1, (11,), dict(kernel_size=2, stride=3, padding=1)),
                               (3, (5, 4, 6), dict(kernel_size=(1, 2, 3), stride=(2, 2, 3), padding=(0, 1, 1)))):
            x = torch.randn(2, 3, *size, device=dev, dtype=dtype)
            pool = getattr(torch.nn.functional, f"max_pool{dims}d")
            zp, idx = pool(x, **kw, return_indices=True)
            r = torch.randn(4, *zp.shape[1:], device=dev, dtype=dtype)
            check(f"max_pool_relprop {dims}d disjoint k=2", ops.max_pool_relprop(r, idx, x.shape, **kw),
                  _fallback.max_pool_relprop(r.double(), idx, list(x.shape)), dtype)
        # a conv layer step in channels_last (exercises the layout handling and cuDNN in between)
        conv = torch.nn.Conv2d(3, 8, 3, padding=1).to(dev, dtype).to(memory_format=torch.channels_last)
        xc = torch.randn(2, 3, 8, 8, device=dev, dtype=dtype).to(memory_format=torch.channels_last)
        with torch.no_grad():
            zc = conv(xc)
        rc = torch.randn_like(zc)
        got = ops.conv_relprop(rc, xc, zc, conv.weight, 1, 1, 1, 1)
        ref = _fallback.conv_relprop(rc.double(), xc.double(), zc.double(), conv.weight.double(), [1, 1], [1, 1], [1, 1], 1, 1e-6, "sign")
        check("conv_relprop 2d channels_last", got, ref, dtype)
        # the rule kernels (csrc/cuda/rules.cu): paired layouts at dim 1 (conv, grouped) and -1
        # (linear), K = 2 relevance maps per sample, sizes with and without a vector tail
        for shape, dim, groups in (((6, 5, 4), 1, 1), ((6, 5, 4), 1, 3), ((8,), -1, 1), ((4, 9), -1, 1)):
            b, k = 2, 2
            x = torch.randn(b, *shape, device=dev, dtype=dtype)
            # denominators kept away from zero, so float16 is compared where it can represent the result
            pos = lambda: torch.rand(b, *shape, device=dev) + 0.5  # noqa: E731
            z_plus = pos()
            z_ab = (z_plus - pos()).to(dtype)  # z = z+ + z-, with z- = z - z+ <= -0.5
            z = torch.where(torch.rand(b, *shape, device=dev) < 0.5, -1.0, 1.0) * pos()
            zp = (z + 0.25 * pos()).to(dtype)  # gamma: zp = z + γ z+, so (2+γ) z - zp stays away from 0 where z < 0
            z, z_plus = z.to(dtype), z_plus.to(dtype)
            r = torch.randn(b * k, *shape, device=dev, dtype=dtype)
            c = torch.randn(b * k, *ops.paired_shape(shape, dim if dim < 0 else dim - 1), device=dev, dtype=dtype)
            low, high = x - 1, x + 1
            d = lambda t: t.double()  # noqa: E731
            tag = f"dim={dim} g={groups} {shape}"
            check(f"sign_split {tag}", ops.sign_split(x, dim, groups), _fallback.sign_split(d(x), dim, groups), dtype)
            check(f"sign_split_mul_input {tag}", ops.sign_split_mul_input(c, x, dim, groups),
                  _fallback.sign_split_mul_input(d(c), d(x), dim, groups), dtype)
            check(f"bounds_mul_input {tag}", ops.bounds_mul_input(c, x, low, high, dim, groups),
                  _fallback.bounds_mul_input(d(c), d(x), d(low), d(high), dim, groups), dtype)
            check(f"alpha_beta_stab_div {tag}", ops.alpha_beta_stab_div(r, z_ab, z_plus, dim, groups),
                  _fallback.alpha_beta_stab_div(d(r), d(z_ab), d(z_plus), dim, groups, 2.0, 1.0, 1e-6, "sign"), dtype)
            check(f"gamma_stab_div {tag}", ops.gamma_stab_div(r, z, zp, dim, groups),
                  _fallback.gamma_stab_div(d(r), d(z), d(zp), dim, groups, 0.25, 1e-6, "sign"), dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print("FAILED: " + ", ".join(failures) if failures else "all kernels agree with the float64 fallback")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
