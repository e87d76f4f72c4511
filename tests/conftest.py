"""Shared test matrix (device x dtype x implementation), the comparison helpers and the oracles.

Every relevance test runs under both implementations of the ops ("extension": the compiled
torch.ops.lrpfast kernels, "fallback": the pure-torch spec), on CPU and, where a GPU is visible,
on CUDA. The reference is never lrpfast itself: it is an independent oracle (autograd through
the real torch layer, a written-out formula, an index_add of the forward's max-pool indices),
evaluated in float64 on the same inputs upcast. The fallback is one of the implementations under
test, so comparing it with itself would prove nothing (issue 14; docs/MUTATIONS.md lists the
deliberate bugs this suite catches).
"""
from __future__ import annotations

import math
import os
from typing import Callable

import pytest
import torch

import lrpfast
from lrpfast import _ext

HAS_CUDA = torch.cuda.is_available()

# The tensors here are tiny: intra-op threads only add synchronisation, which on a busy shared
# machine costs 100x the work itself. test_ops.py::test_parallel_cpu_kernels turns threads on.
torch.set_num_threads(int(os.environ.get("LRPFAST_TEST_THREADS", "1")))
# TF32 would put float32 convolutions on a GPU 1e-3 away from float64: the tolerances below are
# for the kernels' arithmetic, so contractions run in full float32 precision.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device visible")]),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF_TYPES = (torch.float16, torch.bfloat16)
IMPLEMENTATIONS = [
    pytest.param("extension", marks=pytest.mark.skipif(not lrpfast.HAS_EXT, reason="extension not built")),
    "fallback",
]


def dtype_id(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=DTYPES, ids=dtype_id)
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request):
    """Runs the test body with lrpfast's ops switched to this implementation."""
    with lrpfast.use_implementation(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seeded():
    # Fixed inputs: a failure reproduces, and no test depends on a lucky draw.
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    # The extension on a GPU needs its CUDA kernels compiled; a CPU-only build skips those cases.
    cuda_kernels = lrpfast.HAS_EXT and _ext.cuda_compiled()
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("device") == "cuda" and params.get("impl") == "extension" and not cuda_kernels:
            item.add_marker(pytest.mark.skip(reason="extension built without CUDA kernels"))


# ----------------------------------------------------------------------------- comparisons


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of `expected` (a
    normwise measure: element-wise relative error is meaningless where sums cancel)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return 0.0
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), "result holds NaN/Inf"
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return diff / scale if scale > 0 else diff


def abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


# Tolerances by dtype, against the float64 oracle: float32 rounding of inputs is already in the
# reference (the inputs are upcast), so only the arithmetic's own rounding remains.
VS_FLOAT64_RTOL = {torch.float32: 2e-5, torch.float64: 1e-12}
# The extension against the fallback in the same dtype (an extra check, never the only one).
SAME_DTYPE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# Half types: error vs the float64 oracle at most HALF_ERR_FACTOR x the error of the same oracle
# formula evaluated naively in that dtype (plus a quarter-ulp floor: both can be exact).
HALF_ERR_FACTOR = 2.0


def assert_close(actual, expected, rtol: float, what: str = "") -> None:
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.3g}"


def assert_matches_reference(out: torch.Tensor, ref64: torch.Tensor, naive: torch.Tensor, dtype: torch.dtype,
                             what: str = "") -> None:
    """The implementation's result `out` (in `dtype`) against an independent float64 oracle `ref64`
    (never computed by lrpfast) and `naive`, the same oracle formula evaluated in `dtype`:
    - float32 / float64: within VS_FLOAT64_RTOL of ref64;
    - float16 / bfloat16: error vs ref64 at most HALF_ERR_FACTOR x the naive evaluation's own
      error vs ref64, plus a floor of a quarter ulp of the largest value (both can be exact at
      some elements). The naive evaluation rounds at least as often as the kernels (which
      accumulate in float32 and round once), so a correct kernel's error is of its order (at
      most 1.1x on this suite's cases, where the factor allows 2x); assert_rounded_once is the
      element-wise check of the steps without a contraction."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)}, expected {tuple(ref64.shape)}"
    assert out.device == ref64.device
    assert ref64.dtype == torch.float64, f"{what}: the reference must be float64"
    if dtype in HALF_TYPES:
        assert torch.isfinite(out).all(), f"{what}: NaN/Inf in {dtype} result"
        assert naive.dtype == dtype and naive.shape == ref64.shape
        err, naive_err = abs_err(out, ref64), abs_err(naive, ref64)
        scale = ref64.abs().max().item() if ref64.numel() else 0.0
        floor = 0.25 * torch.finfo(dtype).eps * scale
        assert err <= HALF_ERR_FACTOR * naive_err + floor, (
            f"{what}: {dtype} error {err:.3g} vs the float64 oracle exceeds {HALF_ERR_FACTOR}x the naive {dtype} "
            f"evaluation's {naive_err:.3g} (+ floor {floor:.3g})"
        )
    else:
        assert_close(out, ref64, VS_FLOAT64_RTOL[dtype], f"{what} vs float64 oracle")


def assert_rounded_once(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Element-wise: `out` (a half type) is the float64 oracle rounded once to `dtype`, up to the
    float32 arithmetic before that rounding: |out - ref| <= ulp(ref)/2 + 2^-20 max|ref|. What the
    elementwise kernels promise (accumulate in float32, store once); a half-type intermediate
    (two roundings) breaks it where the normwise tolerance above would not notice."""
    assert out.dtype == dtype and out.shape == ref64.shape, what
    fi = torch.finfo(dtype)
    _, exponent = torch.frexp(ref64)  # |ref| = m * 2^exponent, m in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(ref64), exponent - 1) * fi.eps
    ulp = torch.where(ref64 == 0, torch.zeros_like(ulp), ulp).clamp(min=fi.smallest_normal * fi.eps)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    err = (out.double() - ref64).abs()
    bound = 0.5 * ulp + 2.0 ** -20 * scale
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: {dtype} result is not the reference rounded once ({worst:.3g} x the bound)"


def noncontiguous(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as `t` in another memory layout: 'sliced' (every other element of a
    wider buffer along the last dim), 'transposed' (last two dims stored swapped) or 'offset'
    (contiguous at a misaligned storage offset)."""
    if how == "sliced":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        out = wide[..., ::2]
        out.copy_(t)
    elif how == "transposed":
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t
    elif how == "offset":
        # Contiguous, but starting one element into its storage: not 16-byte aligned, which
        # the vectorised CUDA kernels must notice.
        out = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
        out.copy_(t)
    else:
        raise ValueError(how)
    assert torch.equal(out, t)
    return out


def channels_last(t: torch.Tensor) -> torch.Tensor:
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[t.dim()]
    return t.contiguous(memory_format=fmt)


# ----------------------------------------------------------------------------- oracles
# Written independently of lrpfast: the stabiliser spelled out, and autograd through the real torch layer.


def stab_reference(z: torch.Tensor, eps: float, stabilizer: str) -> torch.Tensor:
    """The stabiliser written out: sign(0) = +1 for "sign"; "plus" adds eps regardless."""
    if stabilizer == "plus":
        return z + eps
    sign = torch.ones_like(z)
    sign[z < 0] = -1
    return z + eps * sign


def divide_or_zero(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = a / b
    out[(b == 0).expand_as(out)] = 0
    return out


def epsilon_oracle(forward: Callable, x: torch.Tensor, r: torch.Tensor, eps: float, stabilizer: str,
                   z_given: torch.Tensor = None) -> torch.Tensor:
    """R = x * d/dx sum(z * stop_grad(r / stab(z))), z = forward(x): the ε rule by autograd.
    `z_given` (e.g. a float32 layer's own output) replaces z in the division only, so that a
    comparison measures the relevance step and not the forward's rounding divided by small z."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        z = forward(x)
        zs = z.detach() if z_given is None else z_given.to(z.dtype)
        s = divide_or_zero(r, stab_reference(zs, eps, stabilizer))
        (grad,) = torch.autograd.grad((z * s).sum(), x)
    return x.detach() * grad


def winner_take_all_oracle(forward: Callable, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Max pooling: r routed by the gradient of max pooling (overlapping windows add up)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad((forward(x) * r).sum(), x)
    return grad


def index_add_oracle(r: torch.Tensor, indices: torch.Tensor, input_size) -> torch.Tensor:
    """Max pooling from the forward's own indices: every element of r added (index_add_ on one
    flat buffer, in r's dtype) at plane * plane_size + index; r may hold K rows per row of
    `indices` (row b*K + k). Equals winner_take_all_oracle when the indices are the forward's;
    unlike it, it keeps the indices of a float64 forward when x is then rounded to a half type
    (rounding may create ties that a new forward would break the other way)."""
    b, c = indices.shape[:2]
    k = r.shape[0] // b if b else 1
    plane_in = math.prod(input_size[2:])
    idx = indices.repeat_interleave(k, 0).reshape(b * k * c, -1)
    base = torch.arange(b * k * c, device=r.device).unsqueeze(1) * plane_in
    out = torch.zeros(b * k * c * plane_in, dtype=r.dtype, device=r.device)
    out.index_add_(0, (idx + base).reshape(-1), r.reshape(-1))
    return out.reshape(b * k, c, *input_size[2:])


def per_target(oracle: Callable, r: torch.Tensor, batch: int, **shared) -> torch.Tensor:
    """Run a K = 1 oracle(r=..., **shared) once per target of r (rows b*K + k) and interleave."""
    k = r.shape[0] // batch if batch else 1
    rk = r.reshape(batch, k, *r.shape[1:])
    outs = [oracle(r=rk[:, j], **shared) for j in range(k)]
    return torch.stack(outs, 1).reshape(batch * k, *outs[0].shape[1:])
