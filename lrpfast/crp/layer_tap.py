"""Per-layer reads and masks on one LRP pass, for relevance maximisation and reference crops.

A LayerTap wraps, for the duration of one `LRP.explain` call, the forward and the relevance step
of the plan steps that compute the named modules' outputs: the forward wrapper hands the layer's
output (its activation) to a callback before anything downstream (an in-place ReLU) changes it;
the relevance wrapper sees the relevance at the layer's output (the sum of what the layers above
sent back: zennit-crp's "gradient" at the module output) and may replace it by a masked copy
before the pass continues below. Nothing is copied unless a callback keeps it, so reading a few
per-channel numbers costs a reduction per layer on top of the LRP call (benchmarks/
crp_maximization_speed.py).

The wrappers are instance attributes set and removed around the call (the model is never
touched: LRP refuses hooks on it). The pass is LRP's plain call (no per-node conservation sums):
a message reaching the layer may be LAZY (x ⊙ c, taken here) or DIVIDED (s = R / stab(z), a max
pooling above already divided by the layer's denominator; R = s · stab(z) here, exact to rounding).

Masking here acts on the relevance that passes through the layer; relevance on paths parallel to
it (a residual skip around it) flows on unmasked. For sequential models (the MNIST CNN, VGG) this
is CRP's conditional relevance exactly; lrpfast.crp.CondAttribution(exclude_parallel=True)
drops the parallel part as zennit-crp does.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from .. import nodes as N


def resolve_layers(lrp, layers: Sequence[str], x: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """layer name -> the plan step computing that layer's output, with the names CondAttribution
    accepts (lrpfast/crp/layers.py: leaf modules, containers such as a ResNet block, a folded
    BatchNorm), or a RelevanceError naming the layer and what is wrong with it."""
    from .layers import index_for

    plan = lrp.prepare(x) if x is not None else lrp.plan
    cache = lrp.__dict__.setdefault("_crp_layer_index", {})
    index = index_for(cache, plan, lrp.model)
    return {name: plan.steps[index.step(name)] for name in layers}


class LayerTap:
    """Reads (and optionally masks) the named layers during lrp.explain calls.

    on_activation(layer, output)  called with each layer's forward output (B, C, ...), per chunk
    on_relevance(layer, R) -> R'  called with the relevance at each layer's output (B*K, C, ...);
                                  returning a tensor replaces it (a mask), None keeps it
    """

    def __init__(self, lrp, layers: Sequence[str], on_activation: Optional[Callable] = None,
                 on_relevance: Optional[Callable] = None):
        self.lrp, self.layers = lrp, list(layers)
        self.on_activation, self.on_relevance = on_activation, on_relevance

    def explain(self, x: torch.Tensor, target=None) -> torch.Tensor:
        """lrp(x, target) (the relevance at the input) with the callbacks called on the way."""
        steps = resolve_layers(self.lrp, self.layers, x)
        # The scheduler's one-sample profiling forward (on fake tensors, once per input shape) must
        # not reach the callbacks: run it now, before the wrappers are in place.
        self.lrp._profile(x)  # noqa: SLF001
        wrapped = []
        try:
            for name, step in steps.items():
                self._wrap(name, step)
                wrapped.append(step)
            return self.lrp(x, target)
        finally:
            for step in wrapped:
                for attr in ("forward", "relprop"):
                    step.__dict__.pop(attr, None)

    def _wrap(self, name, step):
        forward, relprop = step.forward, step.relprop
        on_act, on_rel = self.on_activation, self.on_relevance
        if on_act is not None:
            def fwd(env, call):
                out = forward(env, call)
                on_act(name, out)
                return out

            step.forward = fwd
        if on_rel is not None:
            def rel(msg, call):
                r = _relevance(msg, call)
                masked = on_rel(name, r)
                if masked is not None:
                    msg = N.Msg(N.DENSE, masked, None, True)
                return relprop(msg, call)

            step.relprop = rel


def _relevance(msg, call) -> torch.Tensor:
    """The relevance a message carries, as a tensor."""
    if msg.kind != N.DIVIDED:
        return N.materialize(msg)
    z, eps, stabilizer = call.denominator(msg.x)
    st = stabilized(z, eps, stabilizer)
    if st.shape == msg.a.shape and st.dtype == msg.a.dtype:
        return st.mul_(msg.a)
    return msg.a * st   # K maps per sample of one sample (broadcast), or another dtype


def stabilized(z: torch.Tensor, eps: float, stabilizer: str) -> torch.Tensor:
    """stab(z), a new tensor, equal bit for bit to _fallback.stabilize: "plus" z + eps, "sign"
    z + eps·sign(z) with sign(0) = sign(-0.0) = +1 (ops.stab_div). For float32/float64 without
    torch.where, whose CPU kernel costs about 25 adds (2.8 ms against 0.11 ms at 800k floats):
    sign(sign(z) + 0.5) is that sign (NaN stays NaN), times eps (exact), plus z, one rounding
    like z ± eps. Other dtypes round eps first there, so they take torch.where."""
    if stabilizer == "plus":
        return z + eps
    if z.dtype not in (torch.float32, torch.float64):
        return torch.where(z >= 0, z + eps, z - eps)
    return torch.sign(z).add_(0.5).sign_().mul_(eps).add_(z)


def channel_view(t: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) as (B, C, S): the channel dim is 1 (zennit-crp's ChannelConcept); a (B, C)
    output (a Linear layer) has S = 1."""
    return t.reshape(t.shape[0], t.shape[1], -1)
