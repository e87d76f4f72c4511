"""The relevance pass of CRP: graph.relevance's loop, stoppable at one step and resumable from it,
with a hook at every step's output.

A CRP pass runs from the output to the highest conditioned layer once (one row per distinct
"y" per sample), stops there, and then, per group of conditions, fans the pending messages out
to the group's rows (row b*G + g) and runs on to the input. Messages are masked as they are
(DENSE R, LAZY c with R = x ⊙ c, DIVIDED s = R / stab(z)): a mask is elementwise on the layer's
output, so it commutes with the pending product and with the division.

This mirrors graph.relevance step for step (tests/test_crp.py checks the unconditioned pass
against lrpfast.LRP, so a change there that is not mirrored here fails).
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .. import nodes as N
from ..ops import RelevanceError
from .layer_tap import stabilized


def propagate(plan, call, incoming: list, start: int, stop: Optional[int] = None,
              at_step: Optional[Callable] = None, keep_denominators: bool = False):
    """Run the pass over steps start, start-1, ... 0 with the messages in `incoming` (a list of
    Msg lists per step, consumed). With `stop`, return None as soon as step `stop` is next, its
    messages combined into incoming[stop] = [msg] (None: nothing reached it); else the relevance at the input (None when
    nothing reaches it). at_step(i, msg, incoming) -> msg (or None: nothing flows on from i) sees
    the relevance at step i's output before its relevance step. keep_denominators: leave each
    step's stabilised denominator in call.dens after its step (another group of conditions runs
    the same steps next and reuses them: for the z+ rule each is a convolution of the forward's
    size), instead of freeing it."""
    steps = plan.steps
    result = None
    for i in range(start, -1, -1):
        msgs = incoming[i]
        if i == stop:
            if msgs is not None:
                incoming[i] = [N.combine(msgs)]
            return None
        if msgs is None:
            continue
        incoming[i] = None
        if i == plan.input:
            result = N.materialize(N.combine(msgs))
            continue
        step = steps[i]
        msg, msgs = N.combine(msgs), None
        if at_step is not None:
            msg = at_step(i, msg, incoming)
        if msg is not None:
            outs = step.relprop(msg, call)
            msg = None
            for j, m in outs:
                if steps[j].tensor_output and not isinstance(steps[j], N.ConstStep):
                    if incoming[j] is None:
                        incoming[j] = [m]
                    else:
                        incoming[j].append(m)
            outs = m = None
        call.saved[i] = None
        if not keep_denominators:
            call.dens.pop(i, None)
    return result


def relevance_of(msg: N.Msg, call) -> torch.Tensor:
    """The relevance R a message stands for (a DIVIDED s times the stabilised denominator it was
    divided by: R up to rounding)."""
    if msg.kind == N.DIVIDED:
        den = call.denominator(msg.x)
        if den is None:
            raise RelevanceError("CRP internal error: a divided relevance without its denominator")
        zd, eps, stabilizer = den
        rows = msg.a.shape[0] // zd.shape[0]
        st = stabilized(zd, eps, stabilizer)
        return (msg.a.view(zd.shape[0], rows, *zd.shape[1:]) * st.unsqueeze(1)).view(msg.a.shape)
    return N.materialize(msg)


def check_rows(msg: N.Msg, b: int, rows: int, where: str) -> None:
    if msg.a.shape[0] != b * rows:
        raise RelevanceError(f"CRP: the relevance at {where} has {msg.a.shape[0]} rows, expected {b}x{rows} "
                             "(batch x maps); layers whose batch is merged with other dims (window attention) "
                             "cannot be conditioned on")


def fan(msg: N.Msg, b: int, rows: int, index: torch.Tensor) -> N.Msg:
    """(B*rows) -> (B*len(index)) rows: row b*G + g is row b*rows + index[g]. A new tensor."""
    a = msg.a
    shape = a.shape[1:]
    if rows == 1:
        out = a.view(b, 1, *shape).expand(b, index.numel(), *shape).reshape(b * index.numel(), *shape)
        if out.data_ptr() == a.data_ptr():
            out = out.clone()
    else:
        out = a.view(b, rows, *shape).index_select(1, index).view(b * index.numel(), *shape)
    return N.Msg(msg.kind, out, msg.x, True)


def scale(msg: N.Msg, b: int, rows: int, mult: torch.Tensor) -> N.Msg:
    """Each map times mult: (Bm, rows, *m) with Bm 1 or B, m broadcast over the map's shape
    from its first (channel) dim on. A new tensor unless the message is ours to overwrite."""
    a = msg.a
    shape = a.shape[1:]
    m = mult.reshape(*mult.shape, *([1] * (len(shape) - (mult.dim() - 2))))
    view = a.view(b, rows, *shape)
    if msg.owned and a.is_contiguous():
        view.mul_(m)
        return msg
    return N.Msg(msg.kind, (view * m).view(a.shape), msg.x, True)


def scale_pending(incoming: list, below: int, b: int, rows: int, keep: Optional[torch.Tensor]) -> None:
    """Messages waiting for steps below `below`: keep=None drops them all, else each map times
    keep (rows,) (0 drops it)."""
    for j in range(below):
        msgs = incoming[j]
        if msgs is None:
            continue
        if keep is None:
            incoming[j] = None
        else:
            incoming[j] = [scale(m, b, rows, keep.view(1, rows)) for m in msgs]


def fan_pending(incoming: list, below: int, b: int, rows: int, index: torch.Tensor) -> List:
    """A fanned copy of the messages waiting for steps below `below` (the originals stay)."""
    out: list = [None] * len(incoming)
    for j in range(below):
        if incoming[j] is not None:
            out[j] = [fan(m, b, rows, index) for m in incoming[j]]
    return out
