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
import numbers
import operator
from typing import Optional, Sequence, Union

import torch

from . import _ext, _fallback

STABILIZERS = ("sign", "plus")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DEFAULT_EPS = 1e-6


class RelevanceError(ValueError):
    """Bad input to a relevance step: the message names the op/layer and what it expected."""


# ----------------------------------------------------------------------------- validation


def check_finite(t: torch.Tensor, message: str) -> None:
    """Raise RelevanceError(message) if t holds NaN or Inf. One read of t, a sum (NaN and Inf
    survive it; a finite sum can still overflow, so a non-finite one is confirmed element-wise
    before anything is reported): a full isfinite() pass per layer cost a third of a relevance
    chain. One host sync on an accelerator; inside torch.compile an asynchronous assert instead,
    so the graph does not break."""
    total = t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
    if torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(total), message)
    elif not bool(torch.isfinite(total)) and not bool(torch.isfinite(t).all()):
        raise RelevanceError(message)


def check_stabilizer(where: str, eps: float, stabilizer: str) -> None:
    if stabilizer not in STABILIZERS:
        raise RelevanceError(f"{where}: stabilizer must be one of {STABILIZERS}, got {stabilizer!r}")
    # Comparisons rather than math.isfinite: under torch.compile(dynamic=True) eps is a SymFloat.
    if not isinstance(eps, (int, float)) or not -math.inf < eps < math.inf or eps < 0:
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


# Inside LRP(model, compile=...)'s own graph (lrpfast/compiled.py sets this around its calls) the
# elementwise ops run as their pure-torch twins: inductor then fuses them into the loops around
# them and reads x and z where they lie. An opaque custom op needs its inputs materialised, and
# inductor computes those copies early (inside the forward's kernels) and keeps them alive until
# the relevance pass: more memory, and a kernel call more, for the same arithmetic.
INLINE_ELEMENTWISE = False
_ELEMENTWISE = frozenset({"stab_div", "mul_input", "mul_stab_div"})


def _impl(name: str):
    if INLINE_ELEMENTWISE and name in _ELEMENTWISE and torch.compiler.is_compiling():
        return getattr(_fallback, name)
    return getattr(torch.ops.lrpfast, name) if _ext._use_ext else getattr(_fallback, name)


def _ints(where: str, name: str, v, dims: int, minimum: Optional[int] = None):
    """v (an int or `dims` ints) as a list of `dims` ints, each >= minimum when given."""
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = [v] * dims
    else:
        try:
            v = list(v)
        except TypeError:
            raise RelevanceError(f"{where}: {name} must be an int or {dims} ints, got {v!r}") from None
    if len(v) != dims:
        raise RelevanceError(f"{where}: {name} must have {dims} entries, got {v}")
    try:
        out = [operator.index(i) for i in v]
        if any(isinstance(i, bool) for i in v):
            raise TypeError
    except TypeError:
        raise RelevanceError(f"{where}: {name} must hold ints, got {v}") from None
    if minimum is not None and any(i < minimum for i in out):
        raise RelevanceError(f"{where}: {name} must be >= {minimum} in every dimension, got {out}")
    return out


def _check_groups(where: str, groups, out_channels: int) -> int:
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1 or out_channels % groups:
        raise RelevanceError(f"{where}: groups must be a positive int dividing the {out_channels} output channels "
                             f"of weight, got {groups!r}")
    return int(groups)


def conv_geometry(where: str, x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                  groups):
    """The one check of a convolution step's geometry, before either implementation runs (the
    extension and the fallback then see the same valid arguments): stride >= 1, dilation >= 1,
    padding >= 0 (or 'valid', or 'same' with stride 1), groups dividing the channels, x's
    channels matching weight, and z's spatial size the one the convolution of x gives.
    Returns (stride, padding before, padding after, dilation, groups), lists per spatial dim."""
    dims = weight.dim() - 2
    if dims not in (1, 2, 3) or x.dim() != dims + 2 or z.dim() != dims + 2:
        raise RelevanceError(
            f"{where}: expected a {dims}d convolution with x and z of {dims + 2} dims, got "
            f"x {tuple(x.shape)}, z {tuple(z.shape)}, weight {tuple(weight.shape)}"
        )
    stride = _ints(where, "stride", stride, dims, minimum=1)
    dilation = _ints(where, "dilation", dilation, dims, minimum=1)
    groups = _check_groups(where, groups, weight.shape[0])
    if x.shape[1] != weight.shape[1] * groups or z.shape[1] != weight.shape[0] or x.shape[0] != z.shape[0]:
        raise RelevanceError(
            f"{where}: channels do not match: x {tuple(x.shape)}, z {tuple(z.shape)}, weight "
            f"{tuple(weight.shape)}, groups {groups}"
        )
    kernel = list(weight.shape[2:])
    if isinstance(padding, str):
        if padding == "valid":
            lo = hi = [0] * dims
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise RelevanceError(f"{where}: padding='same' needs stride 1, got stride {stride}")
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            lo = [t // 2 for t in total]
            hi = [t - l for t, l in zip(total, lo)]
        else:
            raise RelevanceError(f"{where}: padding must be 'valid', 'same' or ints, got {padding!r}")
    else:
        lo = hi = _ints(where, "padding", padding, dims, minimum=0)
    want = [(i + a + b - d * (k - 1) - 1) // s + 1
            for i, a, b, d, k, s in zip(x.shape[2:], lo, hi, dilation, kernel, stride)]
    if any(w < 1 for w in want):
        raise RelevanceError(
            f"{where}: the kernel {tuple(kernel)} (dilation {dilation}) is larger than x's padded spatial size "
            f"(x {tuple(x.shape)}, padding {padding if isinstance(padding, str) else lo})"
        )
    if list(z.shape[2:]) != want:
        raise RelevanceError(
            f"{where}: z has spatial size {tuple(z.shape[2:])}, expected {tuple(want)}: the convolution of x "
            f"{tuple(x.shape)} with weight {tuple(weight.shape)}, stride {stride}, padding "
            f"{padding if isinstance(padding, str) else lo}, dilation {dilation}"
        )
    return stride, lo, hi, dilation, groups


def pool_output_size(where: str, x: torch.Tensor, kernel_size, stride, padding, dilation=1, ceil_mode: bool = False):
    """Validated (kernel_size, stride, padding, dilation) of a pooling over x's spatial dims, and
    the output spatial size torch's pooling gives: kernel, stride, dilation >= 1, 0 <= padding
    <= half the effective kernel."""
    dims = x.dim() - 2
    kernel_size = _ints(where, "kernel_size", kernel_size, dims, minimum=1)
    stride = kernel_size if stride is None or (not isinstance(stride, numbers.Integral) and len(stride) == 0) \
        else _ints(where, "stride", stride, dims, minimum=1)
    padding = _ints(where, "padding", padding, dims, minimum=0)
    dilation = _ints(where, "dilation", dilation, dims, minimum=1)
    if any(2 * p > d * (k - 1) + 1 for p, k, d in zip(padding, kernel_size, dilation)):
        raise RelevanceError(f"{where}: padding {padding} must be at most half the kernel_size {kernel_size}")
    out = []
    for i, k, s, p, d in zip(x.shape[2:], kernel_size, stride, padding, dilation):
        o = (i + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (o - 1) * s >= i + p:
            o -= 1
        out.append(o)
    if any(o < 1 for o in out):
        raise RelevanceError(f"{where}: kernel_size {kernel_size} is larger than x's padded spatial size "
                             f"(x {tuple(x.shape)}, padding {padding})")
    return kernel_size, stride, padding, dilation, out


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
    stride, lo, hi, dilation, groups = conv_geometry(where, x, z, weight, stride, padding, dilation, groups)
    _check_rows(where, r, "z", z, z.shape[1:])
    check_stabilizer(where, eps, stabilizer)
    if lo != hi:
        # Asymmetric 'same' padding (even kernel): explain the explicitly padded input, then drop
        # the padding (its x is 0, so it holds no relevance).
        pad = []
        for l, h in zip(reversed(lo), reversed(hi)):
            pad += [l, h]
        xp = torch.nn.functional.pad(x, pad)
        rp = _impl("conv_relprop")(r, xp, z, weight, stride, [0] * len(lo), dilation, groups, float(eps), stabilizer)
        idx = (slice(None), slice(None)) + tuple(slice(l, l + n) for l, n in zip(lo, x.shape[2:]))
        return rp[idx].contiguous(memory_format=_fallback._memory_format(x))
    return _impl("conv_relprop")(r, x, z, weight, stride, lo, dilation, groups, float(eps), stabilizer)


def max_pool_relprop(r, indices, input_size: Sequence[int], where: str = "max_pool_relprop", *,
                     kernel_size=None, stride=None, padding=0, dilation=1):
    """Winner-take-all step of a MaxPool1d/2d/3d layer from its forward's indices.

    kernel_size/stride/padding/dilation: the forward's (optional). When its windows do not overlap
    (dilation*(kernel-1)+1 <= stride in every dim, e.g. 2x2 stride 2), the CUDA kernel writes each
    input element once instead of zero-filling the map and scattering atomic adds into it; any
    geometry gives the same map."""
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
    cells = _disjoint_cells(where, indices.dim() - 2, kernel_size, stride, padding, dilation)
    return _impl("max_pool_relprop")(r, indices.contiguous(), input_size, *cells)


def _disjoint_cells(where: str, dims: int, kernel_size, stride, padding, dilation):
    """(stride, padding) of a pooling whose windows do not overlap, else ([], []): the cells
    [c*stride - padding, c*stride - padding + stride) then hold one window each."""
    if kernel_size is None or dims < 1:
        return [], []
    kernel_size = _ints(where, "kernel_size", kernel_size, dims, minimum=1)
    stride = kernel_size if stride is None or (not isinstance(stride, int) and len(stride) == 0) else \
        _ints(where, "stride", stride, dims, minimum=1)
    padding = _ints(where, "padding", padding, dims, minimum=0)
    dilation = _ints(where, "dilation", dilation, dims, minimum=1)
    disjoint = all(d * (k - 1) + 1 <= s and 0 <= p < s
                   for k, s, p, d in zip(kernel_size, stride, padding, dilation))
    return (stride, padding) if disjoint else ([], [])


def avg_pool_relprop(r, x, z, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                     count_include_pad: bool = True, divisor_override: Optional[int] = None,
                     eps: float = DEFAULT_EPS, stabilizer: str = "sign", where: str = "avg_pool_relprop"):
    """ε-rule step of an AvgPool1d/2d/3d layer (each input's share of the window mean)."""
    for n, t in (("r", r), ("x", x), ("z", z)):
        _check_tensor(where, n, t, r)
    dims = x.dim() - 2
    if dims not in (1, 2, 3) or z.dim() != x.dim() or z.shape[:2] != x.shape[:2]:
        raise RelevanceError(f"{where}: expected x and z of shape (B, C, *spatial), got {tuple(x.shape)}, {tuple(z.shape)}")
    kernel_size, stride, padding, _, want = pool_output_size(where, x, kernel_size, stride, padding, 1, ceil_mode)
    if list(z.shape[2:]) != want:
        raise RelevanceError(
            f"{where}: z has spatial size {tuple(z.shape[2:])}, expected {tuple(want)}: the pooling of x "
            f"{tuple(x.shape)} with kernel_size {kernel_size}, stride {stride}, padding {padding}, ceil_mode {bool(ceil_mode)}"
        )
    if divisor_override is not None and (isinstance(divisor_override, bool) or not isinstance(divisor_override, int)
                                         or divisor_override < 1):
        raise RelevanceError(f"{where}: divisor_override must be None or a positive int, got {divisor_override!r}")
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
    def _(r, indices, input_size, stride=(), padding=()):
        return r.new_empty((r.shape[0], *input_size[1:]))

    @register_fake("lrpfast::avg_pool_relprop")
    def _(r, x, z, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, eps, stabilizer):
        return rows_like_x(r, x)

    @register_fake("lrpfast::adaptive_avg_pool_relprop")
    def _(r, x, z, eps, stabilizer):
        return rows_like_x(r, x)


if _ext.HAS_EXT:
    _register_fakes()


# ============================================================================= rule ops (issue 4)
# Elementwise steps of the z+/αβ/γ/z^B rules (lrpfast/rules.py) around their one contraction.
# "Paired" tensors hold two branches per channel group along `dim` (1 for convolutions, -1 for
# Linear): the layout of csrc/rule_args.h and lrpfast/_fallback.py's rule section.
#   sign_split(x)                       -> paired [x+, x-]
#   sign_split_mul_input(c, x)          -> x+ * c0 + x- * c1
#   bounds_mul_input(c, x, low, high)   -> (x - low) * c0 + (x - high) * c1
#   alpha_beta_stab_div(r, z, z_plus)   -> paired [α r/stab(z+), -β r/stab(z - z+)]
#   gamma_stab_div(r, z, zp)            -> paired [r[z>0]/stab(zp), r[z<0]/stab((2+γ)z - zp)]

RULE_OPS = ("sign_split", "sign_split_mul_input", "bounds_mul_input", "alpha_beta_stab_div", "gamma_stab_div")
_stale_warned = False


def _ext_has(name: str) -> bool:
    try:
        getattr(torch.ops.lrpfast, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _rule_impl(name: str):
    """The extension's kernel, or the fallback when the loaded _C predates the rule ops (a
    stale build: warned once; tests/test_rule_ops.py fails on it)."""
    global _stale_warned
    if not _ext._use_ext:
        return getattr(_fallback, name)
    if _ext_has(name):
        return getattr(torch.ops.lrpfast, name)
    if not _stale_warned:
        import warnings

        warnings.warn(f"lrpfast: the loaded extension has no op {name!r} (built before the rule ops); using the "
                      "fallback for the rule ops. Rebuild lrpfast.", RuntimeWarning, stacklevel=3)
        _stale_warned = True
    return getattr(_fallback, name)


def _pair_dim(where: str, t: torch.Tensor, dim: int, groups: int) -> int:
    if t.dim() < 2:
        raise RelevanceError(f"{where}: expected a tensor (B, ...) with a channel dimension, got shape {tuple(t.shape)}")
    d = dim + t.dim() if dim < 0 else dim
    if not 1 <= d < t.dim():
        raise RelevanceError(f"{where}: dim {dim} is not a channel dimension of shape {tuple(t.shape)}")
    if not isinstance(groups, int) or groups < 1 or t.shape[d] % groups:
        raise RelevanceError(f"{where}: {t.shape[d]} channels (dim {dim}) do not split into groups={groups!r}")
    return d


def paired_shape(shape, dim: int, rows: Optional[int] = None):
    """The shape of a paired tensor for the unpaired `shape` (channel dim doubled)."""
    out = list(shape)
    d = dim % len(out)
    out[d] *= 2
    if rows is not None:
        out[0] = rows
    return out


def _check_paired(where: str, name: str, t: torch.Tensor, unpaired: torch.Tensor, dim: int) -> None:
    want = paired_shape(unpaired.shape, dim)
    if t.dim() != len(want) or list(t.shape[1:]) != want[1:]:
        raise RelevanceError(f"{where}: {name} has shape {tuple(t.shape)}, expected (K*B, {', '.join(map(str, want[1:]))}) "
                             f"(paired along dim {dim})")
    b = unpaired.shape[0]
    if (b == 0 and t.shape[0] != 0) or (b and t.shape[0] % b):
        raise RelevanceError(f"{where}: {name} has {t.shape[0]} rows, expected a multiple of the batch {b}")


def sign_split(x: torch.Tensor, dim: int = 1, groups: int = 1) -> torch.Tensor:
    """Paired [x+, x-] along `dim` (per channel group): the input of a contraction that meets the
    positive and the negative part of a signed input with different weights."""
    where = "lrpfast.sign_split"
    _check_tensor(where, "x", x)
    _pair_dim(where, x, dim, groups)
    return _rule_impl("sign_split")(x, int(dim), int(groups))


def sign_split_mul_input(c: torch.Tensor, x: torch.Tensor, dim: int = 1, groups: int = 1) -> torch.Tensor:
    """R = x+ * c[branch 0] + x- * c[branch 1]; c paired, with K maps per row of x."""
    where = "lrpfast.sign_split_mul_input"
    _check_tensor(where, "c", c)
    _check_tensor(where, "x", x, c)
    _pair_dim(where, x, dim, groups)
    _check_paired(where, "c", c, x, dim)
    return _rule_impl("sign_split_mul_input")(c, x, int(dim), int(groups))


def bounds_mul_input(c: torch.Tensor, x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, dim: int = 1,
                     groups: int = 1) -> torch.Tensor:
    """z^B's product: R = (x - low) * c[branch 0] + (x - high) * c[branch 1]; low/high shaped like
    x with 1 row or x's rows."""
    where = "lrpfast.bounds_mul_input"
    _check_tensor(where, "c", c)
    for n, t in (("x", x), ("low", low), ("high", high)):
        _check_tensor(where, n, t, c)
    _pair_dim(where, x, dim, groups)
    _check_paired(where, "c", c, x, dim)
    for n, t in (("low", low), ("high", high)):
        if t.shape[1:] != x.shape[1:] or t.shape[0] not in (1, x.shape[0]):
            raise RelevanceError(f"{where}: {n} has shape {tuple(t.shape)}, expected (1 or {x.shape[0]}, "
                                 f"{', '.join(map(str, x.shape[1:]))}) like x")
    if low.shape[0] != high.shape[0]:
        raise RelevanceError(f"{where}: low has {low.shape[0]} rows and high {high.shape[0]}; expected equal")
    return _rule_impl("bounds_mul_input")(c, x, low, high, int(dim), int(groups))


def _check_div(where, r, z, z2, name2, dim, groups, eps, stabilizer):
    _check_tensor(where, "r", r)
    _check_tensor(where, "z", z, r)
    _check_tensor(where, name2, z2, r)
    if z2.shape != z.shape:
        raise RelevanceError(f"{where}: {name2} has shape {tuple(z2.shape)}, expected {tuple(z.shape)} like z")
    _pair_dim(where, z, dim, groups)
    _check_rows(where, r, "z", z, z.shape[1:])
    check_stabilizer(where, eps, stabilizer)


def alpha_beta_stab_div(r, z, z_plus, dim: int = 1, groups: int = 1, alpha: float = 2.0, beta: float = 1.0,
                        eps: float = DEFAULT_EPS, stabilizer: str = "sign") -> torch.Tensor:
    """Paired [α r / stab(z+), -β r / stab(z - z+)]: the αβ rule's division (z- = z - z+)."""
    where = "lrpfast.alpha_beta_stab_div"
    _check_div(where, r, z, z_plus, "z_plus", dim, groups, eps, stabilizer)
    return _rule_impl("alpha_beta_stab_div")(r, z, z_plus, int(dim), int(groups), float(alpha), float(beta),
                                             float(eps), stabilizer)


def gamma_stab_div(r, z, zp, dim: int = 1, groups: int = 1, gamma: float = 0.25, eps: float = DEFAULT_EPS,
                   stabilizer: str = "sign") -> torch.Tensor:
    """Paired [r [z>0] / stab(zp), r [z<0] / stab((2+γ) z - zp)]: the generalised γ rule's
    division, zp = z + γ z+ from one contraction (zn = z + γ z- = (2+γ) z - zp)."""
    where = "lrpfast.gamma_stab_div"
    _check_div(where, r, z, zp, "zp", dim, groups, eps, stabilizer)
    return _rule_impl("gamma_stab_div")(r, z, zp, int(dim), int(groups), float(gamma), float(eps), stabilizer)


def _register_rule_fakes() -> None:
    from torch.library import register_fake

    def paired(t, dim, rows):
        return t.new_empty(paired_shape(t.shape, dim, rows))

    def unpaired(t, rows):
        return t.new_empty((rows, *t.shape[1:]))

    fakes = {
        "sign_split": lambda x, dim, groups: paired(x, dim, x.shape[0]),
        "sign_split_mul_input": lambda c, x, dim, groups: unpaired(x, c.shape[0]),
        "bounds_mul_input": lambda c, x, low, high, dim, groups: unpaired(x, c.shape[0]),
        "alpha_beta_stab_div": lambda r, z, z_plus, dim, groups, alpha, beta, eps, stabilizer: paired(z, dim, r.shape[0]),
        "gamma_stab_div": lambda r, z, zp, dim, groups, gamma, eps, stabilizer: paired(z, dim, r.shape[0]),
    }
    for name, fn in fakes.items():
        if _ext_has(name):
            register_fake(f"lrpfast::{name}", fn)


if _ext.HAS_EXT:
    _register_rule_fakes()
