"""The batch dimension merged with the dims after it, and split again (window attention).

Swin-style models fold windows (or tokens) into the batch: x (B, H/w, w, W/w, w, C) is viewed as
(B*nW, w, w, C), attended within each window, and unfolded again; LeViT flattens (B, N, C) to
(B*N, C) around a BatchNorm1d, MobileViT reshapes (B, C, H, W) to (B*C*H/p, p, W/p, p).

A view or reshape keeps C order, and the batch is the outermost dim of its input, so each sample's
values stay together: when the output's leading dim is B*m, rows b*m .. b*m + m-1 all belong to
sample b. Every step below then sees a batch of B*m independent rows and needs nothing new: its
leading dim is its "batch" (linear maps, norms, attention matmuls, softmax, masks broadcast over
(B, nW, heads, N, N), torch.roll on the other dims). A leading dim that is not a multiple of B would
mix samples: refused. A reshape of a tensor whose batch is not at dim 0 (after a permute) is
refused before it runs (graph.forward: ReshapeStep has no `batch_anywhere`), so an interleaved
batch never reaches this module.

Relevance messages carry K maps per forward row, as K consecutive rows (row i*K + k, lrpfast/nodes/messages.py).
A reshape that changes the number of leading rows (n_in -> n_out) reorders them: per map k, the
relevance is the forward tensor's shape, so the map's (n_out, ...) block takes the inverse reshape
to (n_in, ...) on its own, and the rows are interleaved again. The map k of a row is the map k of
its sample (all rows of a sample share its K targets), so no map crosses samples either.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def check_rows(x_shape: Sequence[int], y_shape: Sequence[int], batch: Optional[int]) -> Optional[str]:
    """Why a reshape of x into y cannot be explained, or None. `batch` is the call's true batch
    size B (None: unknown, the leading dim must then stay as it is)."""
    if len(y_shape) == 0:
        return "to a scalar: it must keep a leading dim with the batch in it"
    n_in, n_out = x_shape[0], y_shape[0]
    if n_in == n_out:
        return None
    if batch is None or batch <= 0 or n_in % batch or n_out % batch:
        return (f"to a leading dim of {n_out} that is not a multiple of the batch size {batch}, so its rows "
                "would mix samples. A reshape may merge the batch with the dims after it (leading dim "
                "B*m, the batch outermost, as window attention does) or split it again, nothing else")
    return None


def regroup(a: torch.Tensor, n_out: int, n_in: int, in_inner: Sequence[int]) -> torch.Tensor:
    """A message at the reshape's output, (n_out*K, *out_inner) with row j*K + k, as the message
    at its input, (n_in*K, *in_inner) with row i*K + k: each map takes the inverse reshape."""
    if n_in == n_out:   # rows stay where they are: each row's K maps reshape on their own
        return a.reshape(a.shape[0], *in_inner)
    k = a.shape[0] // n_out
    if k == 1:
        return a.reshape(n_in, *in_inner)
    per_map = a.reshape(n_out, k, -1).transpose(0, 1).reshape(k, n_in, -1)
    return per_map.transpose(0, 1).reshape(n_in * k, *in_inner)


def per_map(a: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """A message (n*K rows, n = B*m rows of its forward tensor) as (B, K, *inner), or (B, K, m,
    *inner) where the batch is merged (m > 1): each sample's maps with its m rows (windows)."""
    m = a.shape[0] // (b * k)
    if m == 1:
        return a.reshape(b, k, *a.shape[1:])
    return a.reshape(b, m, k, *a.shape[1:]).transpose(1, 2)
