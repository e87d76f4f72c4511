"""Composites: which LRP rule each Linear/Conv layer gets.

    lrpfast.composites.get("epsilon_gamma_box", low=lo, high=hi, gamma=0.25)
    lrpfast.LRP(model, composite="epsilon_plus_flat")              # the whole-model pass resolves it

The names and meanings are zennit's (0.5.1, zennit/composites.py), so results can be compared:

    name                        first layer            other Conv*d          Linear
    epsilon                     -                      ε                     ε
    epsilon_plus                -                      z+                    ε
    epsilon_plus_flat           flat (Conv or Linear)  z+                    ε
    epsilon_gamma_box           z^B (if a Conv)        γ                     ε
    epsilon_alpha2_beta1        -                      α2β1                  ε
    epsilon_alpha2_beta1_flat   flat (Conv or Linear)  α2β1                  ε

"epsilon" is not a zennit composite: ε on every layer (zennit: EpsilonAlpha2Beta1 with its
Convolution entry mapped to Epsilon). The first layer is the one that sees the model input
(LayerContext.is_first); zennit takes the first matching module in registration order, the same
layer for every feed-forward model. The parameter-free layers get what zennit gives them:
activations pass relevance, residual sums and average pools the ε-normalisation ("Norm", the
whole-model pass's eps), BatchNorm is folded into the layer before it (zennit's canonizers:
SequentialMergeBatchNorm, VGGCanonizer, ResNetCanonizer; lrpfast.LRP canonizes by itself).

Parameters (keywords):
    eps=1e-6          ε of the ε rule (zennit: `epsilon`)
    rule_eps=1e-6     stabiliser of z+, γ, αβ, z^B and flat (zennit: `stabilizer`)
    stabilizer="sign" how eps enters every rule: z + eps·sign(z) (sign(0) = +1) or z + eps
    gamma=0.25        epsilon_gamma_box
    low=, high=       epsilon_gamma_box (required): bounds of the input, broadcastable to it
    alpha=2, beta=1   the alpha2_beta1 composites (any α − β = 1)
    first=Rule        the rule of the first layer (any composite; replaces flat / z^B there)
    rules=...         a user mapping, checked before the composite's own: a dict whose keys are
                      layer names (str: exact, or a glob like "features.*"), module types (or
                      tuples of types) and values Rules; or a callable (name, module, ctx) ->
                      Rule or None; or a list of those, tried in order. Names are the whole-model
                      pass's graph node names (torch.fx: "layer1_0_conv1", "_0"; a module used
                      twice has "name" and "name_1") or module paths ("layer1.0.conv1", "0"):
                      either form matches either, compared as torch.fx node names.
Order: user names, user callables, the first-layer rule, user types, the composite's types.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from .ops import DEFAULT_EPS, RelevanceError
from .rules import AlphaBeta, Epsilon, Flat, Gamma, Rule, ZBox, ZPlus

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEAR_TYPES = (nn.Linear,)

RuleMap = Union[Dict[object, Rule], Callable, Sequence[Union[Dict[object, Rule], Callable]]]


_NOT_IDENTIFIER = re.compile(r"[^0-9a-zA-Z_*?\[\]]+")


def _node_name(path: str) -> str:
    """A module path as torch.fx names its node ("layer1.0.conv1" -> "layer1_0_conv1", "0" -> "_0"),
    glob characters kept, so that a user's key matches the layer in either spelling."""
    try:
        from torch.fx.graph import _snake_case
        path = _snake_case(path)
    except ImportError:  # pragma: no cover - private helper moved
        pass
    name = _NOT_IDENTIFIER.sub("_", path)
    return f"_{name}" if name[:1].isdigit() else name


def _kind(module, ctx) -> Optional[str]:
    if ctx is not None and getattr(ctx, "kind", None) in ("linear", "conv"):
        return ctx.kind
    if isinstance(module, CONV_TYPES):
        return "conv"
    if isinstance(module, LINEAR_TYPES):
        return "linear"
    return None


def _check_rule(where: str, rule) -> Rule:
    if not isinstance(rule, Rule):
        raise RelevanceError(f"{where}: expected an lrpfast.rules.Rule, got {type(rule).__name__} ({rule!r})")
    return rule


class Composite:
    """Assigns a rule per layer. `rule_for(name, module, ctx)` returns a Rule, or None for the
    whole-model pass's default (Epsilon with its eps).

    layer_rules: {"conv": Rule, "linear": Rule} by layer kind; first: the first layer's rule,
    first_kinds: the kinds it applies to; rules: the user mapping (see the module docstring)."""

    def __init__(self, rules: Optional[RuleMap] = None, first: Optional[Rule] = None,
                 layer_rules: Optional[Dict[str, Rule]] = None, first_kinds: Iterable[str] = ("conv", "linear"),
                 name: str = "custom"):
        self.name = name
        self.layer_rules = {k: _check_rule(f"composite {name!r}", v) for k, v in (layer_rules or {}).items()}
        self.first = None if first is None else _check_rule(f"composite {name!r}: first", first)
        self.first_kinds = tuple(first_kinds)
        self._names: List[Tuple[str, Rule]] = []
        self._types: List[Tuple[tuple, Rule]] = []
        self._callables: List[Callable] = []
        for m in ([] if rules is None else rules if isinstance(rules, (list, tuple)) else [rules]):
            self._add(m)

    def _add(self, mapping) -> None:
        where = f"composite {self.name!r}: rules"
        if callable(mapping) and not isinstance(mapping, (dict, type)):
            self._callables.append(mapping)
            return
        if not isinstance(mapping, dict):
            raise RelevanceError(f"{where}: expected a dict, a callable (name, module, ctx) -> Rule, or a list of "
                                 f"them; got {type(mapping).__name__}")
        for key, rule in mapping.items():
            _check_rule(f"{where}[{key!r}]", rule)
            if isinstance(key, str):
                self._names.append((key, rule))
            elif isinstance(key, type) or (isinstance(key, tuple) and key and all(isinstance(t, type) for t in key)):
                self._types.append((key if isinstance(key, tuple) else (key,), rule))
            else:
                raise RelevanceError(f"{where}: key {key!r} is neither a module name nor a module type")

    def rule_for(self, name: str, module: nn.Module, ctx=None) -> Optional[Rule]:
        node = _node_name(name) if self._names else name
        for pattern, rule in self._names:
            if name == pattern or fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(node, _node_name(pattern)):
                return rule
        for fn in self._callables:
            rule = fn(name, module, ctx)
            if rule is not None:
                return _check_rule(f"composite {self.name!r}: rule callable for {name!r}", rule)
        kind = _kind(module, ctx)
        if self.first is not None and ctx is not None and getattr(ctx, "is_first", False) and kind in self.first_kinds:
            return self.first
        for types, rule in self._types:
            if isinstance(module, types):
                return rule
        return self.layer_rules.get(kind)

    def __repr__(self):
        parts = [f"{k}={v!r}" for k, v in self.layer_rules.items()]
        if self.first is not None:
            parts.append(f"first={self.first!r}")
        if self._names or self._types or self._callables:
            parts.append(f"user_rules={len(self._names) + len(self._types) + len(self._callables)}")
        return f"Composite({self.name!r}, {', '.join(parts)})"


# ----------------------------------------------------------------------------- the named composites

_COMMON = ("eps", "rule_eps", "stabilizer", "first", "rules")


def _epsilon(p):
    return {"conv": Epsilon(p["eps"], p["stabilizer"]), "linear": Epsilon(p["eps"], p["stabilizer"])}, None, ()


def _plus(p, flat: bool):
    layer = {"conv": ZPlus(p["rule_eps"], p["stabilizer"]), "linear": Epsilon(p["eps"], p["stabilizer"])}
    return layer, (Flat(p["rule_eps"], p["stabilizer"]) if flat else None), ("conv", "linear")


def _alpha_beta(p, flat: bool):
    ab = AlphaBeta(p.get("alpha", 2.0), p.get("beta", 1.0), p["rule_eps"], p["stabilizer"])
    layer = {"conv": ab, "linear": Epsilon(p["eps"], p["stabilizer"])}
    return layer, (Flat(p["rule_eps"], p["stabilizer"]) if flat else None), ("conv", "linear")


def _gamma_box(p):
    layer = {"conv": Gamma(p.get("gamma", 0.25), p["rule_eps"], p["stabilizer"]),
             "linear": Epsilon(p["eps"], p["stabilizer"])}
    first = None
    if p.get("first") is None:
        if p.get("low") is None or p.get("high") is None:
            raise RelevanceError("composite 'epsilon_gamma_box': needs low= and high=, the bounds of the input "
                                 "(tensors broadcastable to it, e.g. shape (1, C, 1, 1), or floats) for the z^B rule of "
                                 "the first layer; or pass first=<Rule> to use another rule there")
        first = ZBox(p["low"], p["high"], p["rule_eps"], p["stabilizer"])
    return layer, first, ("conv",)


# name -> (builder, its own keywords)
_REGISTRY: Dict[str, Tuple[Callable, Tuple[str, ...]]] = {
    "epsilon": (_epsilon, ()),
    "epsilon_plus": (lambda p: _plus(p, False), ()),
    "epsilon_plus_flat": (lambda p: _plus(p, True), ()),
    "epsilon_gamma_box": (_gamma_box, ("gamma", "low", "high")),
    "epsilon_alpha2_beta1": (lambda p: _alpha_beta(p, False), ("alpha", "beta")),
    "epsilon_alpha2_beta1_flat": (lambda p: _alpha_beta(p, True), ("alpha", "beta")),
}


def names() -> List[str]:
    """The composites `get` knows by name."""
    return list(_REGISTRY)


def get(composite: Union[str, Composite, RuleMap, None] = "epsilon", **params) -> Composite:
    """The Composite for a name (with its keyword parameters), an existing Composite (returned
    as is; no parameters), or a user mapping / callable (a Composite with ε elsewhere)."""
    if isinstance(composite, Composite):
        if params:
            raise RelevanceError(f"composites.get: parameters {sorted(params)} given with a ready Composite; "
                                 "pass them when building it")
        return composite
    if composite is None:
        composite = "epsilon"
    if not isinstance(composite, str):
        unknown = set(params) - set(_COMMON) - {"first"}
        if unknown:
            raise RelevanceError(f"composites.get: unknown parameters {sorted(unknown)} for a user mapping; "
                                 f"expected some of {list(_COMMON)}")
        params = {**params, "rules": composite}
        composite = "epsilon"
    key = composite.lower()
    if key not in _REGISTRY:
        raise RelevanceError(f"composites.get: unknown composite {composite!r}; expected one of {names()}")
    build, own = _REGISTRY[key]
    unknown = set(params) - set(_COMMON) - set(own)
    if unknown:
        raise RelevanceError(f"composite {key!r}: unknown parameter(s) {sorted(unknown)}; it takes "
                             f"{sorted(set(_COMMON) | set(own))}")
    p = {"eps": DEFAULT_EPS, "rule_eps": DEFAULT_EPS, "stabilizer": "sign", **params}
    layer_rules, first, first_kinds = build(p)
    if p.get("first") is not None:
        first, first_kinds = p["first"], ("conv", "linear")
    return Composite(rules=p.get("rules"), first=first, layer_rules=layer_rules, first_kinds=first_kinds or ("conv",
                                                                                                             "linear"),
                     name=key)
