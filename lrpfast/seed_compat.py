"""The seed's model-level call, on top of lrpfast.LRP:

    lrp = lrpMNIST(model)                  # or lrpMNIST(model, load_path="cnn-relu.pt")
    r = lrp.relprop(x, store=True)         # relevance at the input, (B, 1, 28, 28)
    lrp.activation_maps                    # {"(6) relConv2d": ..., "(9) relConv2d": ...}

Like the seed (../shared/seed/SEED-REFERENCE.md §3): argmax target, the target logit as initial
relevance, `store=True` keeps the relevance at every Conv2d's input keyed by the layer's index
counted from the output. Unlike it: right for every batch size (no bug B1), no autograd graph,
the returned tensor is detached, the model given is not modified (the seed deep-copied it; the
LRP object only reads it), and `use_rho=True` is a proper z+ rule on Linear and Conv layers.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn

from .lrp import LRP
from .ops import DEFAULT_EPS, RelevanceError


class _RuleEverywhere:
    """A composite giving one rule to every Linear/Conv layer."""

    def __init__(self, rule):
        self.rule = rule

    def rule_for(self, name, module, ctx):
        return self.rule


class lrpMNIST(nn.Module):
    """Seed-compatible wrapper: `forward(x)` gives logits, `relprop(x, store=False,
    use_rho=False)` the input relevance. `model` is an nn.Sequential, or a module with a `layers`
    Sequential (the seed's MNISTmodel).

    `activation_maps` is per-call state: each relprop(store=True) rewrites it, so threads that
    store maps concurrently need one wrapper each (copy.deepcopy)."""

    def __init__(self, model: nn.Module, load_path: Optional[str] = None, eps: float = DEFAULT_EPS,
                 stabilizer: str = "sign"):
        super().__init__()
        if load_path is not None:
            import copy

            model = copy.deepcopy(model)  # like the seed: the loaded weights go into a copy
            model.load_state_dict(torch.load(load_path, map_location="cpu"))
        layers = model if isinstance(model, nn.Sequential) else getattr(model, "layers", None)
        if not isinstance(layers, nn.Sequential):
            raise RelevanceError(f"lrpMNIST: expected an nn.Sequential or a module with a `layers` Sequential, got "
                                 f"{type(model).__name__}")
        self.model = model
        self.layers = layers
        self.eps, self.stabilizer = eps, stabilizer
        self.activation_maps: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._lrp = {False: LRP(layers, eps=eps, stabilizer=stabilizer)}

    def _engine(self, use_rho: bool) -> LRP:
        if use_rho not in self._lrp:
            from . import rules

            zplus = getattr(rules, "ZPlus", None)
            if zplus is None:
                raise RelevanceError("lrpMNIST.relprop: use_rho=True needs lrpfast.rules.ZPlus")
            self._lrp[use_rho] = LRP(self.layers, eps=self.eps, stabilizer=self.stabilizer,
                                     composite=_RuleEverywhere(zplus(self.eps, self.stabilizer)))
        return self._lrp[use_rho]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.layers(x)

    def relprop(self, x: torch.Tensor, store: bool = False, use_rho: bool = False) -> torch.Tensor:
        lrp = self._engine(bool(use_rho))
        if not store:
            return lrp(x)
        e = lrp.explain(x, keep_layers=True)
        # The seed's key: "(i) relConv2d", i = the layer's index counted from the last layer.
        n = len(self.layers)
        by_name = {s.name: s for s in lrp.plan.steps}
        for pos, (child_name, module) in enumerate(self.layers.named_children()):
            if isinstance(module, nn.Conv2d):
                node = next((s.name for s in by_name.values() if getattr(s, "module", None) is module), None)
                if node is not None and node in e.layers:
                    self.activation_maps[f"({n - 1 - pos}) relConv2d"] = e.layers[node]
        return e.relevance
