"""One Python name per lrpfast op.

Each function validates its arguments (errors name the op and the argument), then runs
`torch.ops.lrpfast.<name>` (C++ CPU / CUDA kernels) when the extension is active, else
`lrpfast._fallback.<name>` (pure torch). The names are the same in the schema
(csrc/lrpfast.cpp), the kernels (csrc/cpu, csrc/cuda), the fallback and the tests.

Fused primitives:   stab_div, mul_input, mul_stab_div
Layer steps:        linear_relprop, conv_relprop, max_pool_relprop, avg_pool_relprop,
                    adaptive_avg_pool_relprop
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from . import _ext, _fallback

STABILIZERS = ("sign", "plus")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DEFAULT_EPS = 1e-6


class RelevanceError(ValueError):
    """Bad input to a relevance step: the message names the op/layer and what it expected."""


# ----------------------------------------------------------------------------- validation


def check_stabilizer(where: str, eps: float, stabilizer: str) -> None:
    if stabilizer not in STABILIZERS:
        raise RelevanceError(f"{where}: stabilizer must be one of {STABILIZERS}, got {stabilizer!r}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise RelevanceError(f"{where}: eps must be a finite float >= 0, got {eps!r}")


def _check_tensor(where: str, name: str, t, ref: Optional[torch.Tensor] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{where}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if ref is not None:
        if t.dtype != ref.dtype:
            raise TypeError(f"{where}: {name} has dtype {t.dtype}, expected {ref.dtype} like the relevance")
        if t.device != ref.device:
            raise RelevanceError(f"{where}: {name} is on {t.device}, expected {ref.device} like the relevance")


def _check_rows(where: str, r: torch.Tensor, name: str, shared: torch.Tensor, inner_shape) -> None:
    """r must be (K*B, *inner_shape) for the B rows of `shared` (K >= 1 targets per sample)."""
    if r.dim() == 0 or tuple(r.shape[1:]) != tuple(inner_shape):
        raise RelevanceError(
            f"{where}: relevance has shape {tuple(r.shape)}, expected (K*B, {', '.join(map(str, inner_shape))}) "
            f"to match {name} of shape {tuple(shared.shape)}"
        )
    b = shared.shape[0]
    if (b == 0 and r.shape[0] != 0) or (b and r.shape[0] % b):
        raise RelevanceError(
            f"{where}: relevance has {r.shape[0]} rows, expected a multiple of the batch {b} of {name}"
        )


def _impl(name: str):
    return getattr(torch.ops.lrpfast, name) if _ext._use_ext else getattr(_fallback, name)


def _ints(where: str, name: str, v, dims: int):
    v = [v] * dims if isinstance(v, int) else list(v)
    if len(v) != dims:
        raise RelevanceError(f"{where}: {name} must have {dims} entries, got {v}")
    return [int(i) for i in v]


# ----------------------------------------------------------------------------- primitives


def stab_div(r: torch.Tensor, z: torch.Tensor, eps: float = DEFAULT_EPS, stabilizer: str = "sign") -> torch.Tensor:
    """s = r / stab(z), fused. r may hold K maps per row of z (shape (K*B, *z.shape[1:]))."""
    where = "lrpfast.stab_div"
    _check_tensor(where, "r", r)
    _check_tensor(where, "z", z, r)
    _check_rows(where, r, "z", z, z.shape[1:])
    check_stabilizer(where, eps, stabilizer)
    return _impl("stab_div")(r, z, float(eps), stabilizer)


def mul_input(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """R = x * c, fused; c may hold K maps per row of x."""
    where = "lrpfast.mul_input"
    _check_tensor(where, "c", c)
    _check_tensor(where, "x", x, c)
    _check_rows(where, c, "x", x, x.shape[1:])
    return _impl("mul_input")(c, x)


def mul_stab_div(c: torch.Tensor, x: torch.Tensor, z: torch.Tensor, eps: float = DEFAULT_EPS,
                 stabilizer: str = "sign") -> torch.Tensor:
    """s = (x * c) / stab(z) in one pass (cross-layer fusion across a ReLU)."""
    where = "lrpfast.mul_stab_div"
    _check_tensor(where, "c", c)
    _check_tensor(where, "x", x, c)
    _check_tensor(where, "z", z, c)
    if x.shape != z.shape:
        raise RelevanceError(f"{where}: x has shape {tuple(x.shape)} but z has {tuple(z.shape)}; expected equal")
    _check_rows(where, c, "x", x, x.shape[1:])
    check_stabilizer(where, eps, stabilizer)
    return _impl("mul_stab_div")(c, x, z, float(eps), stabilizer)


# ----------------------------------------------------------------------------- layer steps


def linear_relprop(r, x, z, weight, eps: float = DEFAULT_EPS, stabilizer: str = "sign", where: str = "linear_relprop"):
    """ε-rule step of a Linear layer: R_in = x * (W^T (r / stab(z)))."""
    for n, t in (("r", r), ("x", x), ("z", z), ("weight", weight)):
        _check_tensor(where, n, t, r)
    if weight.dim() != 2 or x.shape[-1:] != weight.shape[1:] or z.shape != (*x.shape[:-1], weight.shape[0]):
        raise RelevanceError(
            f"{where}: expected x (B, *, {weight.shape[1] if weight.dim() == 2 else 'in'}), z (B, *, out) and "
            f"weight (out, in); got x {tuple(x.shape)}, z {tuple(z.shape)}, weight {tuple(weight.shape)}"
        )
    _check_rows(where, r, "z", z, z.shape[1:])
    check_stabilizer(where, eps, stabilizer)
    return _impl("linear_relprop")(r, x, z, weight, float(eps), stabilizer)


def conv_relprop(r, x, z, weight, stride=1, padding: Union[int, Sequence[int], str] = 0, dilation=1, groups: int = 1,
                 eps: float = DEFAULT_EPS, stabilizer: str = "sign", where: str = "conv_relprop"):
    """ε-rule step of a Conv1d/2d/3d layer: R_in = x * convT(r / stab(z), W). Padding may be
    'valid', 'same' (asymmetric when the kernel is even) or ints."""
    for n, t in (("r", r), ("x", x), ("z", z), ("weight", weight)):
        _check_tensor(where, n, t, r)
    dims = weight.dim() - 2
    if dims not in (1, 2, 3) or x.dim() != dims + 2 or z.dim() != dims + 2:
        raise RelevanceError(
            f"{where}: expected a {dims}d convolution with x and z of {dims + 2} dims, got "
            f"x {tuple(x.shape)}, z {tuple(z.shape)}, weight {tuple(weight.shape)}"
        )
    stride = _ints(where, "stride", stride, dims)
    dilation = _ints(where, "dilation", dilation, dims)
    if x.shape[1] != weight.shape[1] * groups or z.shape[1] != weight.shape[0] or x.shape[0] != z.shape[0]:
        raise RelevanceError(
            f"{where}: channels do not match: x {tuple(x.shape)}, z {tuple(z.shape)}, weight "
            f"{tuple(weight.shape)}, groups {groups}"
        )
    _check_rows(where, r, "z", z, z.shape[1:])
    check_stabilizer(where, eps, stabilizer)
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0] * dims
        elif padding == "same":
            total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            lo = [t // 2 for t in total]
            if any(t % 2 for t in total):
                # Asymmetric 'same' padding (even kernel): explain the explicitly padded input,
                # then drop the padding (its x is 0, so it holds no relevance).
                pad = []
                for t, l in zip(reversed(total), reversed(lo)):
                    pad += [l, t - l]
                xp = torch.nn.functional.pad(x, pad)
                rp = _impl("conv_relprop")(r, xp, z, weight, stride, [0] * dims, dilation, int(groups), float(eps), stabilizer)
                idx = (slice(None), slice(None)) + tuple(slice(l, l + n) for l, n in zip(lo, x.shape[2:]))
                return rp[idx].contiguous(memory_format=_fallback._memory_format(x))
            padding = lo
        else:
            raise RelevanceError(f"{where}: padding must be 'valid', 'same' or ints, got {padding!r}")
    padding = _ints(where, "padding", padding, dims)
    return _impl("conv_relprop")(r, x, z, weight, stride, padding, dilation, int(groups), float(eps), stabilizer)


def max_pool_relprop(r, indices, input_size: Sequence[int], where: str = "max_pool_relprop"):
    """Winner-take-all step of a MaxPool1d/2d/3d layer from its forward's indices."""
    _check_tensor(where, "r", r)
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64:
        raise TypeError(f"{where}: indices must be the int64 indices of the forward (return_indices=True)")
    if indices.device != r.device:
        raise RelevanceError(f"{where}: indices are on {indices.device}, expected {r.device}")
    input_size = [int(v) for v in input_size]
    if len(input_size) != indices.dim() or input_size[:2] != list(indices.shape[:2]):
        raise RelevanceError(
            f"{where}: input_size {input_size} does not match indices of shape {tuple(indices.shape)}"
        )
    _check_rows(where, r, "indices", indices, indices.shape[1:])
    return _impl("max_pool_relprop")(r, indices.contiguous(), input_size)


def avg_pool_relprop(r, x, z, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                     count_include_pad: bool = True, divisor_override: Optional[int] = None,
                     eps: float = DEFAULT_EPS, stabilizer: str = "sign", where: str = "avg_pool_relprop"):
    """ε-rule step of an AvgPool1d/2d/3d layer (each input's share of the window mean)."""
    for n, t in (("r", r), ("x", x), ("z", z)):
        _check_tensor(where, n, t, r)
    dims = x.dim() - 2
    if dims not in (1, 2, 3) or z.dim() != x.dim() or z.shape[:2] != x.shape[:2]:
        raise RelevanceError(f"{where}: expected x and z of shape (B, C, *spatial), got {tuple(x.shape)}, {tuple(z.shape)}")
    kernel_size = _ints(where, "kernel_size", kernel_size, dims)
    stride = kernel_size if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _ints(where, "stride", stride, dims)
    padding = _ints(where, "padding", padding, dims)
    _check_rows(where, r, "z", z, z.shape[1:])
    check_stabilizer(where, eps, stabilizer)
    return _impl("avg_pool_relprop")(r, x, z, kernel_size, stride, padding, bool(ceil_mode), bool(count_include_pad),
                                     divisor_override, float(eps), stabilizer)


def adaptive_avg_pool_relprop(r, x, z, eps: float = DEFAULT_EPS, stabilizer: str = "sign",
                              where: str = "adaptive_avg_pool_relprop"):
    """ε-rule step of an AdaptiveAvgPool1d/2d/3d layer."""
    for n, t in (("r", r), ("x", x), ("z", z)):
        _check_tensor(where, n, t, r)
    if x.dim() not in (3, 4, 5) or z.dim() != x.dim() or z.shape[:2] != x.shape[:2]:
        raise RelevanceError(f"{where}: expected x and z of shape (B, C, *spatial), got {tuple(x.shape)}, {tuple(z.shape)}")
    _check_rows(where, r, "z", z, z.shape[1:])
    check_stabilizer(where, eps, stabilizer)
    return _impl("adaptive_avg_pool_relprop")(r, x, z, float(eps), stabilizer)


# ----------------------------------------------------------------------------- fake kernels
# Shapes/dtypes/layouts of every op without computing, so torch.compile and opcheck can trace
# the compiled ops. Registered only when the extension defined the schemas.


def _register_fakes() -> None:
    from torch.library import register_fake

    def like(r, ref):
        return torch.empty(r.shape, dtype=r.dtype, device=r.device, memory_format=_fallback._memory_format(ref))

    @register_fake("lrpfast::stab_div")
    def _(r, z, eps, stabilizer):
        return like(r, z)

    @register_fake("lrpfast::mul_input")
    def _(c, x):
        return like(c, x)

    @register_fake("lrpfast::mul_stab_div")
    def _(c, x, z, eps, stabilizer):
        return like(c, z)

    def rows_like_x(r, x):
        return torch.empty((r.shape[0], *x.shape[1:]), dtype=r.dtype, device=r.device,
                           memory_format=_fallback._memory_format(x))

    @register_fake("lrpfast::linear_relprop")
    def _(r, x, z, weight, eps, stabilizer):
        return rows_like_x(r, x)

    @register_fake("lrpfast::conv_relprop")
    def _(r, x, z, weight, stride, padding, dilation, groups, eps, stabilizer):
        return rows_like_x(r, x)

    @register_fake("lrpfast::max_pool_relprop")
    def _(r, indices, input_size):
        return r.new_empty((r.shape[0], *input_size[1:]))

    @register_fake("lrpfast::avg_pool_relprop")
    def _(r, x, z, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, eps, stabilizer):
        return rows_like_x(r, x)

    @register_fake("lrpfast::adaptive_avg_pool_relprop")
    def _(r, x, z, eps, stabilizer):
        return rows_like_x(r, x)


if _ext.HAS_EXT:
    _register_fakes()
