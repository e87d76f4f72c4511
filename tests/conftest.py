"""Shared test matrix (device x dtype x implementation) and the comparison helpers.

Every relevance test runs under both implementations of the ops ("extension": the compiled
torch.ops.lrpfast kernels, "fallback": the pure-torch spec), on CPU and, where a GPU is visible,
on CUDA. The reference is always the fallback in float64 on the same inputs upcast.
"""
from __future__ import annotations

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


# Tolerances by dtype. Same-dtype comparisons (implementation vs fallback, both in `dtype`):
SAME_DTYPE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
# Against the float64 reference: float32 rounding of inputs is already in the reference (the
# inputs are upcast), so only the arithmetic's own rounding remains.
VS_FLOAT64_RTOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def assert_close(actual, expected, rtol: float, what: str = "") -> None:
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.3g}"


def assert_matches_reference(out: torch.Tensor, ref64: torch.Tensor, fallback_same_dtype: torch.Tensor,
                             dtype: torch.dtype, what: str = "") -> None:
    """The implementation's result `out` (in `dtype`) against the float64 fallback `ref64` and
    the fallback run in the same dtype:
    - float32 / float64: within SAME_DTYPE_RTOL of the same-dtype fallback, and near ref64;
    - float16 / bfloat16: error vs ref64 at most 2x the fallback's own error vs ref64, plus a
      floor of a quarter ulp of the largest value (both can be exact at some elements)."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)}, expected {tuple(ref64.shape)}"
    assert out.device == ref64.device
    if dtype in HALF_TYPES:
        assert torch.isfinite(out).all(), f"{what}: NaN/Inf in {dtype} result"
        err, fb_err = abs_err(out, ref64), abs_err(fallback_same_dtype, ref64)
        scale = ref64.abs().max().item() if ref64.numel() else 0.0
        floor = 0.25 * torch.finfo(dtype).eps * scale
        assert err <= 2 * fb_err + floor, (
            f"{what}: {dtype} error {err:.3g} vs float64 exceeds 2x the fallback's {fb_err:.3g} (+ floor {floor:.3g})"
        )
    else:
        assert_close(out, fallback_same_dtype, SAME_DTYPE_RTOL[dtype], f"{what} vs fallback in {dtype}")
        assert_close(out, ref64, VS_FLOAT64_RTOL[dtype], f"{what} vs float64 fallback")


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
