"""The two passes of one call: the forward (every step in graph order, keeping what the
relevance pass needs) and the relevance pass (in reverse, messages combined per tensor).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import nodes as N
from ..ops import RelevanceError
from .plan import Plan

# ============================================================================= the passes


def forward(plan: Plan, x: torch.Tensor, fuse_pools: bool = True, sizes: Optional[list] = None,
            extra: Optional[list] = None, scratch: Optional[list] = None,
            observe: Optional[Callable] = None) -> N.Call:
    """Run the model's forward step by step; returns the call state (logits in call.logits).
    `sizes` (a list) receives the bytes of every step's output tensors, `extra` those of what
    steps keep besides (Step.saved_extra: attention weights), `scratch` what their relevance
    pass will hold per map (Step.relprop_scratch). `observe(i, value)` sees every step's output
    as it is computed (CRP's layer outputs; a later in-place ReLU may still rectify it)."""
    steps = plan.steps
    call = N.Call(steps, fuse_pools, x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else None)
    env: list = [None] * len(steps)
    env[plan.input] = x
    free_after = plan.free_after
    for s in steps:
        i = s.index
        if i != plan.input:
            if call.bdim and not s.batch_anywhere:
                moved = next((j for j in s.deps if call.bdim.get(j, 0)), None)
                if moved is not None:
                    raise RelevanceError(
                        f"LRP: {s.describe()} needs the batch dimension first, but {steps[moved].describe()} has it "
                        f"at dim {call.bdim[moved]}. With the batch elsewhere (sequence-first transformers) "
                        "supported are: Linear, LayerNorm, elementwise activations, Dropout, residual add, "
                        "nn.MultiheadAttention(batch_first=False), basic indexing, permute/transpose, torch.cat and "
                        "mean over other dims")
            try:
                env[i] = s.forward(env, call)
            except RelevanceError:
                raise
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                shapes = [tuple(env[j].shape) for j in s.deps if isinstance(env[j], torch.Tensor)]
                raise RelevanceError(f"LRP: {s.describe()} failed on input(s) of shape "
                                     f"{', '.join(map(str, shapes)) or '()'}: {exc}") from exc
            if call.bdim and s.batch_anywhere and i not in call.bdim and s.src is not None \
                    and call.bdim.get(s.src, 0) and not isinstance(s, (N.PermuteStep, N.IndexStep)):
                call.bdim[i] = call.bdim[s.src]  # layout-preserving: the batch stays where it was
            if observe is not None:
                observe(i, env[i])
        if sizes is not None and i != plan.input and not isinstance(s, N.ConstStep):
            v = env[i]
            sizes.extend(t.numel() * t.element_size() for t in (v if isinstance(v, tuple) else (v,))
                         if isinstance(t, torch.Tensor))
            if extra is not None:
                extra.extend(t.numel() * t.element_size() for t in s.saved_extra(call))
            if scratch is not None:
                scratch.append(s.relprop_scratch(call))
        for j in free_after[i]:
            env[j] = None
    if call.bdim.get(plan.output, 0):
        raise RelevanceError(f"LRP: the model output ({steps[plan.output].describe()}) has the batch at dim "
                             f"{call.bdim[plan.output]}; expected logits (B, classes)")
    call.logits = env[plan.output]
    return call


def relevance(plan: Plan, call: N.Call, r0: torch.Tensor, record: Optional[Callable] = None) -> torch.Tensor:
    """Propagate r0 (K*B rows at the output) back to the input; `record(step, outs)` sees every
    step's messages to its inputs (per-layer relevances, conservation)."""
    steps = plan.steps
    incoming: list = [None] * len(steps)
    incoming[plan.output] = [N.Msg(N.DENSE, r0, None, True)]
    call.pending = incoming if record is None else None   # (a recorded step must return its messages)
    result = None
    for i in range(len(steps) - 1, -1, -1):
        msgs = incoming[i]
        if msgs is None:
            continue
        incoming[i] = None
        if i == plan.input:
            result = N.materialize(N.combine(msgs))
            continue
        step = steps[i]
        msg, msgs = N.combine(msgs), None
        outs = step.relprop(msg, call)
        msg = None
        call.saved[i] = None     # this step's x, z, indices: free them now
        call.dens.pop(i, None)
        if record is not None:
            record(step, outs)
        for j, m in outs:
            if steps[j].tensor_output and not isinstance(steps[j], N.ConstStep):
                if incoming[j] is None:
                    incoming[j] = [m]
                else:
                    incoming[j].append(m)
        outs = m = None  # hold nothing beyond the messages waiting in `incoming`
    return result
