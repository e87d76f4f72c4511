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


def max_pool_relprop(r, indices, input_size: Sequence[int]):
    """Winner-take-all: each window's relevance goes to the input its forward picked (the
    indices of max_pool*d(return_indices=True)); overlapping windows add up."""
    b, c = indices.shape[:2]
    k = r.shape[0] // b if b else 1
    plane_in = 1
    for n in input_size[2:]:
        plane_in *= n
    out = torch.zeros((b, k, c, plane_in), dtype=_acc(r).dtype, device=r.device)
    idx = indices.reshape(b, 1, c, -1).expand(b, k, c, -1)
    out.scatter_add_(3, idx, _acc(r).reshape(b, k, c, -1))
    return out.reshape(r.shape[0], c, *input_size[2:]).to(r.dtype)


def _as_2d(t: torch.Tensor, dims: int) -> torch.Tensor:
    return t.unsqueeze(-2) if dims == 1 else t


def avg_pool_relprop(r, x, z, kernel_size, stride, padding, ceil_mode: bool, count_include_pad: bool,
                     divisor_override: Optional[int], eps: float, stabilizer: str):
    s = stab_div(r, z, eps, stabilizer)
    dims = x.dim() - 2
    like = _batched_like(x, r.shape[0])
    if dims == 3:
        c = torch.ops.aten.avg_pool3d_backward(s, like, kernel_size, stride, padding, ceil_mode,
                                               count_include_pad, divisor_override)
    else:
        one = lambda v: ([1] if dims == 1 else []) + list(v)  # noqa: E731  (1d pools as 2d, height 1)
        pad0 = ([0] if dims == 1 else []) + list(padding)
        c = torch.ops.aten.avg_pool2d_backward(_as_2d(s, dims), _as_2d(like, dims), one(kernel_size),
                                               one(stride), pad0, ceil_mode, count_include_pad,
                                               divisor_override)
        c = c.squeeze(-2) if dims == 1 else c
    return mul_input(c, x)


def adaptive_avg_pool_relprop(r, x, z, eps: float, stabilizer: str):
    s = stab_div(r, z, eps, stabilizer)
    dims = x.dim() - 2
    like = _batched_like(x, r.shape[0])
    if dims == 3:
        c = torch.ops.aten._adaptive_avg_pool3d_backward(s, like)
    else:
        c = torch.ops.aten._adaptive_avg_pool2d_backward(_as_2d(s, dims), _as_2d(like, dims))
        c = c.squeeze(-2) if dims == 1 else c
    return mul_input(c, x)
