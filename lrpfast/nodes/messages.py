"""How relevance travels between steps, and the state of one call.

The whole-model pass (lrpfast/graph/passes.py) runs `forward` for every step in graph order, then
`relprop` in reverse order. Relevance travels between steps as a Msg:

    DENSE    a = R                      the relevance itself
    LAZY     a = c, x:  R = x ⊙ c        the product with a layer's input not yet taken: the
                                        next lower step with a denominator z takes it inside its
                                        division, s = (x ⊙ c) / stab(z), one fused pass
                                        (ops.mul_stab_div) across the ReLU in between
    DIVIDED  a = s = R / stab(z') of    a max pooling above that step already divided (the
             the step numbered x        division fused with the winner-take-all scatter)

`owned` says that `a` is a temporary of this pass that a step may overwrite in place. x and z are
shared by the K maps of a sample: a relevance tensor has K*B rows (row b*K + k), x and z have B.

The batch dimension of a forward tensor may sit elsewhere than dim 0 (a sequence-first transformer:
x.transpose(0, 1) before nn.MultiheadAttention(batch_first=False)). `Call.bdim` records where, for
the steps whose output has it elsewhere; only steps with `batch_anywhere` accept such inputs, and
messages stay batch-first (K*B rows leading) whatever the forward layout: those steps save their
x and z as batch-first views (`Call.batch_first`).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from .. import ops
from ..ops import RelevanceError

DENSE, LAZY, DIVIDED = 0, 1, 2


class Msg(NamedTuple):
    kind: int
    a: torch.Tensor
    x: object = None
    owned: bool = False


def materialize(msg: Msg) -> torch.Tensor:
    if msg.kind == DENSE:
        return msg.a
    if msg.kind == LAZY:
        return ops.mul_input(msg.a, msg.x)
    raise RelevanceError("LRP internal error: a divided relevance reached a step without its denominator")


def per_sample(a: torch.Tensor, b: int) -> torch.Tensor:
    """(K*B, ...) as (B, K, ...): sample-major rows, so a view."""
    return a.view(b, a.shape[0] // b, *a.shape[1:])


def _dense_order(z: torch.Tensor):
    """The permutation that makes z contiguous, where z is a permuted dense tensor with its batch
    dim first (a (B, heads, L, D) view of a (B, L, heads, D) tensor); else None."""
    if z.dim() < 3 or z.is_contiguous() or torch.compiler.is_compiling():
        return None
    order = sorted(range(z.dim()), key=lambda d: (-z.stride(d), d))
    if order[0] != 0 or not z.permute(order).is_contiguous():
        return None
    return order


def divide(msg: Msg, z: torch.Tensor, eps: float, stabilizer: str) -> torch.Tensor:
    """s = R / stab(z), fused with the pending product when R is LAZY. Tensors laid out alike in
    a permuted order are divided in that order (the fused kernels would copy each to contiguous)."""
    if msg.kind == LAZY and msg.x.shape == z.shape:
        order = _dense_order(z)
        if order is not None and msg.a.permute(order).is_contiguous() and msg.x.permute(order).is_contiguous():
            s = ops.mul_stab_div(msg.a.permute(order), msg.x.permute(order), z.permute(order), eps, stabilizer)
            return s.permute([order.index(d) for d in range(z.dim())])
        return ops.mul_stab_div(msg.a, msg.x, z, eps, stabilizer)
    return ops.stab_div(materialize(msg), z, eps, stabilizer)


def combine(msgs: List[Msg]) -> Msg:
    """The relevance at a tensor used by several steps: the sum of what each sends back. LAZY
    messages with the same x add their c (x ⊙ c1 + x ⊙ c2 = x ⊙ (c1 + c2))."""
    if len(msgs) == 1:
        return msgs[0]
    first = msgs[0]
    if all(m.kind == LAZY and m.x is first.x for m in msgs):
        kind, x = LAZY, first.x
        parts = [m for m in msgs]
    elif all(m.kind == LAZY and m.a.shape == m.x.shape and m.a.dtype == m.x.dtype for m in msgs) \
            and not torch.compiler.is_compiling():
        # R = Σ x_i ⊙ c_i: the first product, then each further one added in the same pass (addcmul)
        acc = ops.mul_input(first.a, first.x)
        for m in msgs[1:]:
            acc.addcmul_(m.a, m.x)
        return Msg(DENSE, acc, None, True)
    else:
        kind, x = DENSE, None
        parts = [m if m.kind == DENSE else Msg(DENSE, materialize(m), None, True) for m in msgs]
    # Accumulate into a temporary of this pass when there is one (a residual's skip relevance
    # arrives as the shared, unowned s; the branch's c is ours to overwrite).
    first = next((i for i, m in enumerate(parts) if m.owned and m.a.is_contiguous()), 0)
    parts.insert(0, parts.pop(first))
    acc, owned = parts[0].a, parts[0].owned
    for m in parts[1:]:
        if owned and acc.shape == m.a.shape and acc.is_contiguous():
            acc.add_(m.a)
        else:
            acc, owned = acc + m.a, True
    return Msg(kind, acc, x, owned)


def relevance_sum(msg: Msg, b: int, k: int) -> torch.Tensor:
    """Σ R per map: (B, K) for a message of n*K rows, n = B*m (a merged batch: m rows per sample,
    lrpfast/merged_batch.py). A LAZY message is summed without forming x ⊙ c."""
    n = msg.a.shape[0] // k
    if msg.kind == LAZY:
        c = msg.a.reshape(n, k, -1)
        s = torch.bmm(c, msg.x.reshape(n, -1, 1).to(c.dtype)).squeeze(-1)
    else:
        s = materialize(msg).reshape(n, k, -1).sum(-1)
    return s.view(b, n // b, k).sum(1)


class Call:
    """The state of one call: what each step saved in its forward, denominators asked for."""

    __slots__ = ("saved", "dens", "fuse_pools", "steps", "logits", "bdim", "batch", "pending", "remat")

    def __init__(self, steps, fuse_pools: bool, batch: Optional[int] = None):
        self.steps = steps
        self.batch = batch   # B, the input's rows (a merged batch has B*m: lrpfast/merged_batch.py)
        self.saved = [None] * len(steps)
        self.dens = {}
        # step index -> its output recomputed in the relevance pass (None: not yet), for the steps
        # that keep no output for it (Step.remat: `value`)
        self.remat = {}
        self.fuse_pools = fuse_pools
        self.logits = None
        self.bdim = {}   # step index -> the batch dim of its output, where it is not 0
        self.pending = None   # during the relevance pass: step index -> messages waiting for it

    def batch_first(self, i: int, t):
        """Step i's output t (or a tensor laid out like it) as a batch-first view."""
        d = self.bdim.get(i, 0)
        return t.movedim(d, 0) if d and isinstance(t, torch.Tensor) else t

    def denominator(self, index: int):
        if index not in self.dens:
            self.dens[index] = self.steps[index].denominator(self)
        return self.dens[index]
