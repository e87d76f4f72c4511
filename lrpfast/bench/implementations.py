"""The implementations `lrpfast bench` times side by side, each built for one workload.

A builder takes a Workload and returns an Impl (a no-argument call giving the input relevance,
plus a close() for what it set up), or raises Skip with the reason it does not apply (a line in
the table, never a crash). Peers (zennit, captum) live in peers.py.

  lrpfast, lrpfast-fallback   lrpfast.LRP(model, ...)(x, target), extension / pure-torch fallback
  rel-chain, ...-fallback     the seed-compatible rel* layers chained by hand: forward, then
                              .relprop layer by layer (issue 2's measurement; ε rule, plain chains)
  seed-baseline               the seed's algorithm (seed_baseline.py)
  floor                       forward with autograd + input gradient of the target logits
                              (DESIGN.md §2): what LRP should cost
  zennit, captum              the peers with the matching rule (peers.py)
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List

import torch
import torch.nn as nn

from .. import _ext
from .. import layers as L
from .impl import Impl, Skip, Workload, initial_relevance  # noqa: F401  (re-exported: runner, tests)
from .peers import captum_impl, zennit_impl
from .seed_baseline import SEED_EPS, SeedStyleLRP
from .workloads import chain_layers


def floor(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DESIGN.md §2: one forward with autograd and the gradient of the target logits with respect
    to the input only (no weight gradients). Returns that gradient."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), x)
    return grad


# ----------------------------------------------------------------------------- lrpfast.LRP


def lrp_available() -> bool:
    import lrpfast

    return hasattr(lrpfast, "LRP")


def make_lrp(model: nn.Module, w: Workload):
    """lrpfast.LRP on its own copy of the model (it may hook or canonise the model it gets)."""
    import lrpfast

    if not hasattr(lrpfast, "LRP"):
        raise Skip("lrpfast.LRP does not exist yet in this checkout")
    kwargs = dict(eps=w.eps, stabilizer=w.stabilizer, init=w.init)
    if w.composite != "epsilon":
        kwargs["composite"] = w.composite
        kwargs.update(w.params)
    try:
        return lrpfast.LRP(model, **kwargs)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise Skip(f"lrpfast.LRP({w.composite}): {exc}") from exc


def _lrp(w: Workload, implementation: str) -> Impl:
    if implementation == "extension" and not _ext.HAS_EXT:
        raise Skip(f"extension not loaded ({_ext._LOAD_ERROR})")
    lrp = make_lrp(copy.deepcopy(w.model), w)

    def call():
        with _ext.use_implementation(implementation):
            return lrp(w.x, w.target)

    return Impl("lrpfast" if implementation == "extension" else "lrpfast-fallback", call)


# ----------------------------------------------------------------------------- rel* layer chain

_REL = {
    nn.Linear: L.relLinear, nn.Conv1d: L.relConv1d, nn.Conv2d: L.relConv2d, nn.Conv3d: L.relConv3d,
    nn.MaxPool1d: L.relMaxPool1d, nn.MaxPool2d: L.relMaxPool2d, nn.MaxPool3d: L.relMaxPool3d,
    nn.AvgPool2d: L.relAvgPool2d, nn.AdaptiveAvgPool2d: L.relAdaptiveAvgPool2d, nn.ReLU: L.relReLU,
}


class RelChain:
    """The model's layers wrapped in lrpfast's rel* layers: forward without autograd, then
    `.relprop` from the output back to the input (ε rule everywhere, winner-take-all pooling)."""

    def __init__(self, model: nn.Module, eps: float = 1e-6, stabilizer: str = "sign"):
        self.layers: List[nn.Module] = []
        for m in chain_layers(model):
            if isinstance(m, nn.Dropout):
                continue  # identity in eval mode
            if isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise NotImplementedError("Flatten other than (start_dim=1) has no rel* layer")
                self.layers.append(L.Reshape())
            elif type(m) in _REL:
                self.layers.append(_REL[type(m)](m, eps=eps, stabilizer=stabilizer))
            else:
                raise NotImplementedError(f"no rel* layer for {type(m).__name__}")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, target: torch.Tensor, init: str = "logit") -> torch.Tensor:
        h = x
        for layer in self.layers:
            h = layer(h)
        r = initial_relevance(h, target, init)
        for layer in reversed(self.layers):
            r = layer.relprop(r)
        return r


def _rel_chain(w: Workload, implementation: str) -> Impl:
    name = "rel-chain" if implementation == "extension" else "rel-chain-fallback"
    if w.composite != "epsilon":
        raise Skip("the rel* layers apply the ε rule only")
    if implementation == "extension" and not _ext.HAS_EXT:
        raise Skip(f"extension not loaded ({_ext._LOAD_ERROR})")
    try:
        chain = RelChain(w.model, w.eps, w.stabilizer)
    except NotImplementedError as exc:
        raise Skip(str(exc)) from exc

    def call():
        with _ext.use_implementation(implementation):
            return chain(w.x, w.target, w.init)

    return Impl(name, call)


# ----------------------------------------------------------------------------- seed, floor


def _seed(w: Workload) -> Impl:
    if w.composite != "epsilon":
        raise Skip("the seed knows the ε rule only")
    if w.init != "logit":
        raise Skip("the seed's initial relevance is the logit")
    try:
        seed = SeedStyleLRP(chain_layers(w.model))
    except NotImplementedError as exc:
        raise Skip(str(exc)) from exc
    notes = []
    if w.stabilizer != "plus" or w.eps != SEED_EPS:
        notes.append(f"seed's own stabiliser z+{SEED_EPS:g}")
    notes.append("max-pool x/(x+ε) factor")
    return Impl("seed-baseline", lambda: seed(w.x, w.target), note="; ".join(notes))


def _floor(w: Workload) -> Impl:
    return Impl("floor", lambda: floor(w.model, w.x, w.target),
                note="input gradient; agreement: vs the float64 gradient", is_relevance=False)


def _zennit(w: Workload) -> Impl:
    return zennit_impl(w)


def _captum(w: Workload) -> Impl:
    return captum_impl(w)


BUILDERS: Dict[str, Callable[[Workload], Impl]] = {
    "lrpfast": lambda w: _lrp(w, "extension"),
    "lrpfast-fallback": lambda w: _lrp(w, "fallback"),
    "rel-chain": lambda w: _rel_chain(w, "extension"),
    "rel-chain-fallback": lambda w: _rel_chain(w, "fallback"),
    "seed-baseline": _seed,
    "floor": _floor,
    "zennit": _zennit,
    "captum": _captum,
}
IMPLEMENTATIONS = tuple(BUILDERS)


# ----------------------------------------------------------------------------- the reference


def reference(w: Workload):
    """lrpfast's float64 fallback on the same inputs (upcast), with the same rule: through
    lrpfast.LRP when it exists, else through the rel* chain. Returns (map, label) or (None, why)."""
    model64 = copy.deepcopy(w.model).double()
    x64 = w.x.double()
    with _ext.use_implementation("fallback"):
        if lrp_available():
            try:
                w64 = Workload(**{**w.__dict__, "model": model64, "x": x64})
                lrp = make_lrp(model64, w64)
                return lrp(x64, w.target).detach(), "lrpfast.LRP, float64 fallback"
            except Skip as exc:
                return None, str(exc)
        if w.composite != "epsilon":
            return None, "no float64 reference: lrpfast.LRP missing and the rel* chain is ε only"
        try:
            chain = RelChain(model64, w.eps, w.stabilizer)
        except NotImplementedError as exc:
            return None, f"no float64 reference: lrpfast.LRP missing and {exc}"
        return chain(x64, w.target, w.init), "rel* chain, float64 fallback (lrpfast.LRP missing)"


def gradient_reference(w: Workload) -> torch.Tensor:
    """The floor's input gradient in float64 on the same inputs: the floor row's agreement, i.e.
    how far the dtype alone moves a plain gradient through this network (the yardstick for the
    relevance maps' errors in float16/bfloat16)."""
    return floor(copy.deepcopy(w.model).double(), w.x.double(), w.target)


def relative_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64 (nan when shapes differ)."""
    if a.shape != ref.shape:
        return float("nan")
    a64, r64 = a.detach().double(), ref.detach().double().to(a.device)
    den = torch.linalg.vector_norm(r64)
    return float(torch.linalg.vector_norm(a64 - r64) / den) if float(den) else float("nan")
