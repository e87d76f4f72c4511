"""Pure-torch definition of every lrpfast op: the readable specification, the CPU path when the
extension is not compiled, and the oracle the kernels are tested against.

Conventions shared with the kernels (csrc/common/relevance_math.h):
- stab(z) = z + eps*sign(z) with sign(0) = +1 ("sign"), or z + eps ("plus", seed parity);
- a division by an exact 0 gives 0 (a unit whose denominator vanishes passes no relevance);
- half types are computed in float32 and stored back in their own dtype;
- K targets: a relevance tensor may have K*B rows for the B rows of x and z, laid out
  sample-major (row b*K + k); x and z are shared by the K maps, never copied.
Arguments are validated by `lrpfast.ops` before they get here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _HALF else t


def _split_k(r: torch.Tensor, shared: torch.Tensor):
    """View r (K*B, ...) as (B, K, ...) and shared (B, ...) as (B, 1, ...) for broadcasting."""
    b = shared.shape[0]
    k = r.shape[0] // b if b else 1
    return r.reshape(b, k, *r.shape[1:]), shared.unsqueeze(1), k


def stabilize(z: torch.Tensor, eps: float, stabilizer: str) -> torch.Tensor:
    if stabilizer == "plus":
        return z + eps
    return torch.where(z >= 0, z + eps, z - eps)


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b == 0, torch.zeros_like(a), a / b)


def _memory_format(t: torch.Tensor):
    # The same choice as the C++ ops: keep channels_last when the reference tensor has it.
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _finish(out: torch.Tensor, like: torch.Tensor, dtype) -> torch.Tensor:
    return out.to(dtype).contiguous(memory_format=_memory_format(like))


def stab_div(r, z, eps: float, stabilizer: str):
    """s = r / stab(z)."""
    rk, zk, _ = _split_k(_acc(r), _acc(z))
    s = safe_div(rk, stabilize(zk, eps, stabilizer))
    return _finish(s.reshape(r.shape), z, r.dtype)


def mul_input(c, x):
    """R = x * c (c may carry K maps per sample)."""
    ck, xk, _ = _split_k(_acc(c), _acc(x))
    return _finish((ck * xk).reshape(c.shape), x, c.dtype)


def mul_stab_div(c, x, z, eps: float, stabilizer: str):
    """s = (x * c) / stab(z): an upper layer's product with its input, a ReLU that passes
    relevance, and the lower layer's division, in one step."""
    ck, xk, _ = _split_k(_acc(c), _acc(x))
    zk = _acc(z).unsqueeze(1)
    s = safe_div(ck * xk, stabilize(zk, eps, stabilizer))
    return _finish(s.reshape(c.shape), z, c.dtype)


def _batched_like(x: torch.Tensor, rows: int) -> torch.Tensor:
    # Only the shape of the layer input matters to an input-gradient contraction.
    return x if rows == x.shape[0] else x.new_empty((rows, *x.shape[1:]))


# ----------------------------------------------------------------------------- layer ops
# Each: s = r / stab(z)   (fused),  c = rho(W)^T s  (ATen),  R = x * c   (fused).


def linear_relprop(r, x, z, weight, eps: float, stabilizer: str):
    s = stab_div(r, z, eps, stabilizer)
    c = s.matmul(weight)  # (.., out) @ (out, in): W^T s for every row
    return mul_input(c, x)


def conv_output_padding(in_size, out_size, kernel, stride, padding, dilation):
    """The output_padding that makes the transposed convolution recover the input size."""
    return [
        i - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
        for i, o, k, s, p, d in zip(in_size, out_size, kernel, stride, padding, dilation)
    ]


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_relprop(r, x, z, weight, stride, padding, dilation, groups: int, eps: float, stabilizer: str):
    s = stab_div(r, z, eps, stabilizer)
    dims = weight.dim() - 2
    out_pad = conv_output_padding(x.shape[2:], z.shape[2:], weight.shape[2:], stride, padding, dilation)
    w = weight.to(s.dtype)
    c = _CONV_T[dims](s, w, None, list(stride), list(padding), out_pad, groups, list(dilation))
    return mul_input(c, x)


def max_pool_relprop(r, indices, input_size: Sequence[int], stride: Sequence[int] = (),
                     padding: Sequence[int] = ()):
    """Winner-take-all: each window's relevance goes to the input its forward picked (the
    indices of max_pool*d(return_indices=True)); overlapping windows add up. stride/padding
    (given when the windows are disjoint) only let a kernel skip the zero fill: the map is the
    same, so the scatter here ignores them."""
    b, c = indices.shape[:2]
    k = r.shape[0] // b if b else 1
    plane_in = 1
    for n in input_size[2:]:
        plane_in *= n
    plane_out = 1  # explicit (not -1, which is ambiguous for empty tensors)
    for n in indices.shape[2:]:
        plane_out *= n
    out = torch.zeros((b, k, c, plane_in), dtype=_acc(r).dtype, device=r.device)
    idx = indices.reshape(b, 1, c, plane_out).expand(b, k, c, plane_out)
    out.scatter_add_(3, idx, _acc(r).reshape(b, k, c, plane_out))
    return out.reshape(r.shape[0], c, *input_size[2:]).to(r.dtype)


def _as_2d(t: torch.Tensor, dims: int) -> torch.Tensor:
    return t.unsqueeze(-2) if dims == 1 else t


def avg_pool_contract(s, x, kernel_size, stride, padding, ceil_mode: bool, count_include_pad: bool,
                      divisor_override: Optional[int]):
    """The input-gradient contraction of an AvgPool1d/2d/3d: each window's s spread over its
    inputs (s may carry K rows per row of x). Shared with the whole-model pass (lrpfast/nodes/)."""
    dims = x.dim() - 2
    like = _batched_like(x, s.shape[0])
    if dims == 3:
        return torch.ops.aten.avg_pool3d_backward(s, like, kernel_size, stride, padding, ceil_mode,
                                                  count_include_pad, divisor_override)
    one = lambda v: ([1] if dims == 1 else []) + list(v)  # noqa: E731  (1d pools as 2d, height 1)
    pad0 = ([0] if dims == 1 else []) + list(padding)
    if like.is_cuda and dims == 2 and like.is_contiguous(memory_format=torch.channels_last):
        # CUDA's channels_last avg_pool2d backward is wrong with padding (torch 2.11): use the
        # NCHW kernel, chosen by the layout of `like` (only its sizes are read).
        like = like.new_empty(like.shape)
    c = torch.ops.aten.avg_pool2d_backward(_as_2d(s, dims), _as_2d(like, dims), one(kernel_size),
                                           one(stride), pad0, ceil_mode, count_include_pad, divisor_override)
    return c.squeeze(-2) if dims == 1 else c


def adaptive_avg_pool_contract(s, x):
    """The input-gradient contraction of an AdaptiveAvgPool1d/2d/3d (s may carry K rows per row of x)."""
    dims = x.dim() - 2
    like = _batched_like(x, s.shape[0])
    if dims == 3:
        return torch.ops.aten._adaptive_avg_pool3d_backward(s, like)
    c = torch.ops.aten._adaptive_avg_pool2d_backward(_as_2d(s, dims), _as_2d(like, dims))
    return c.squeeze(-2) if dims == 1 else c


def avg_pool_relprop(r, x, z, kernel_size, stride, padding, ceil_mode: bool, count_include_pad: bool,
                     divisor_override: Optional[int], eps: float, stabilizer: str):
    s = stab_div(r, z, eps, stabilizer)
    c = avg_pool_contract(s, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    return mul_input(c, x)


def adaptive_avg_pool_relprop(r, x, z, eps: float, stabilizer: str):
    s = stab_div(r, z, eps, stabilizer)
    return mul_input(adaptive_avg_pool_contract(s, x), x)


# ============================================================================= rule ops (issue 4)
# The elementwise steps of the z+/αβ/γ/z^B rules around their one contraction (lrpfast/rules.py).
# "Paired" tensors hold two branches per channel group along `dim`: one row (sample) of an
# unpaired tensor is nb blocks of `block` = (C/groups) * (elements after dim) values, and the
# paired tensor has nb blocks of 2*block (branch 0, then branch 1), the channel order a grouped
# convolution with concatenated weights reads and writes (csrc/rule_args.h says the same).


def _pair_geometry(shape, dim: int, groups: int):
    dim = dim % len(shape)
    block = shape[dim] // groups
    for n in shape[dim + 1:]:
        block *= n
    n = 1
    for v in shape[1:]:
        n *= v
    return dim, block, (n // block if block else 0)


def _paired_shape(shape, dim: int, rows: int):
    out = list(shape)
    out[0], out[dim] = rows, out[dim] * 2
    return out


def _blocks(t: torch.Tensor, nb: int, block: int, paired: bool) -> torch.Tensor:
    """t as (rows, nb, 2, block) when paired, else (rows, nb, 1, block)."""
    return t.reshape(t.shape[0], nb, 2 if paired else 1, block)


def sign_split(x, dim: int, groups: int):
    """[x+, x-] paired."""
    d, block, nb = _pair_geometry(x.shape, dim, groups)
    xb = _blocks(_acc(x), nb, block, False)
    out = torch.cat([xb.clamp(min=0), xb.clamp(max=0)], dim=2)
    return out.reshape(_paired_shape(x.shape, d, x.shape[0])).to(x.dtype)


def _paired_mul(c, x, dim, groups, combine):
    d, block, nb = _pair_geometry(x.shape, dim, groups)
    b = x.shape[0]
    k = c.shape[0] // b if b else 1
    cb = _acc(c).reshape(b, k, nb, 2, block)
    out = combine(cb[:, :, :, 0], cb[:, :, :, 1], lambda t: _acc(t).reshape(t.shape[0], 1, nb, block))
    return out.reshape(c.shape[0], *x.shape[1:]).to(c.dtype)


def sign_split_mul_input(c, x, dim: int, groups: int):
    """R = x+ * c[branch 0] + x- * c[branch 1]."""
    def combine(c_pos, c_neg, shared):
        xs = shared(x)
        return xs.clamp(min=0) * c_pos + xs.clamp(max=0) * c_neg
    return _paired_mul(c, x, dim, groups, combine)


def bounds_mul_input(c, x, low, high, dim: int, groups: int):
    """R = (x - low) * c[branch 0] + (x - high) * c[branch 1] (z^B); low/high have 1 row or x's."""
    def combine(c_pos, c_neg, shared):
        xs = shared(x)
        return (xs - shared(low)) * c_pos + (xs - shared(high)) * c_neg
    return _paired_mul(c, x, dim, groups, combine)


def _paired_div(r, z, z2, dim, groups, branches):
    d, block, nb = _pair_geometry(z.shape, dim, groups)
    b = z.shape[0]
    k = r.shape[0] // b if b else 1
    rb = _acc(r).reshape(b, k, nb, 1, block)
    zb = _acc(z).reshape(b, 1, nb, 1, block)
    z2b = _acc(z2).reshape(b, 1, nb, 1, block)
    s_pos, s_neg = branches(rb, zb, z2b)
    out = torch.cat([s_pos, s_neg], dim=3)
    return out.reshape(_paired_shape(z.shape, d, r.shape[0])).to(r.dtype)


def alpha_beta_stab_div(r, z, z_plus, dim: int, groups: int, alpha: float, beta: float, eps: float,
                        stabilizer: str):
    """Paired [α r / stab(z+), -β r / stab(z - z+)] (z- = z - z+: see relevance_math.h)."""
    def branches(rb, zb, zpb):
        return (alpha * safe_div(rb, stabilize(zpb, eps, stabilizer)),
                -beta * safe_div(rb, stabilize(zb - zpb, eps, stabilizer)))
    return _paired_div(r, z, z_plus, dim, groups, branches)


def gamma_stab_div(r, z, zp, dim: int, groups: int, gamma: float, eps: float, stabilizer: str):
    """Paired [r [z>0] / stab(zp), r [z<0] / stab((2+γ) z - zp)] (generalised γ rule)."""
    def branches(rb, zb, zpb):
        zero = torch.zeros((), dtype=rb.dtype, device=rb.device)
        s_pos = torch.where(zb > 0, safe_div(rb, stabilize(zpb, eps, stabilizer)), zero)
        s_neg = torch.where(zb < 0, safe_div(rb, stabilize((2.0 + gamma) * zb - zpb, eps, stabilizer)), zero)
        return s_pos, s_neg
    return _paired_div(r, z, zp, dim, groups, branches)
