"""Layer names (modules of model.named_modules()) -> the plan step whose output is that module's output.

A leaf layer is one graph node (graph._Tracer keeps it whole); a container or a layer traced
through (a ResNet block, a Sequential, a timm layer with its own forward) is the set of nodes
whose module stack holds its name, and its output is the one node of that set read outside it.
A BatchNorm folded into the Linear/Conv before it has no step of its own: its node maps to the
folded step (graph._batch_norm_step), whose output is the BatchNorm's.
"""
from __future__ import annotations

import difflib
from typing import Dict, List, Optional

from .. import nodes as N
from ..ops import RelevanceError

OUTPUT = "y"


class LayerIndex:
    """name -> step index for one plan, or the reason the name cannot be conditioned on."""

    def __init__(self, plan, model):
        self.plan = plan
        steps = plan.steps
        by_name: Dict[str, int] = {s.name: s.index for s in steps}
        for s in steps:
            if isinstance(s, N.ContractionStep) and s.bn_name:
                by_name[s.bn_name] = s.index   # the folded BatchNorm is that layer's output
        self._modules = dict(model.named_modules())
        nodes = [n for n in plan.gm.graph.nodes if n.name in by_name]
        self._first: Dict[str, int] = {}   # where a module first appears: the order of names() within a step
        members: Dict[str, List] = {}
        calls: Dict[str, List] = {}
        for n in nodes:
            if n.op == "call_module":
                calls.setdefault(n.target, []).append(n)
            for path, _ in (n.meta.get("nn_module_stack") or {}).values():
                members.setdefault(path, []).append(n)
                self._first.setdefault(path, len(self._first))
        self._steps: Dict[str, int] = {}
        self._why: Dict[str, str] = {}
        usable = lambda i: steps[i].tensor_output and not isinstance(steps[i], (N.ConstStep, N.MetaStep))  # noqa: E731
        for path, group in members.items():
            leaf_calls = calls.get(path, [])
            if len(leaf_calls) > 1:
                self._why[path] = (f"module {path!r} is called {len(leaf_calls)} times in the forward (nodes "
                                   f"{', '.join(n.name for n in leaf_calls)}), so its output is ambiguous; name the "
                                   "layer before each call or the block around it")
                continue
            inside = set(group)
            outs = [n for n in group if usable(by_name[n.name])
                    and any(u not in inside for u in n.users)]
            # a folded BatchNorm and its conv are one step: count steps, not nodes
            out_steps = list(dict.fromkeys(by_name[n.name] for n in outs))
            if len(out_steps) != 1:
                self._why[path] = (f"module {path!r} has {len(out_steps)} outputs in the traced graph "
                                   f"({', '.join(n.name for n in outs) or 'none'}); CRP conditions on one tensor")
                continue
            self._steps[path] = out_steps[0]

    def names(self) -> List[str]:
        """Accepted names, in forward order of their outputs."""
        return sorted(self._steps, key=lambda p: (self._steps[p], self._first[p]))

    def step(self, name: str, what: str = "layer") -> int:
        if not isinstance(name, str):
            raise TypeError(f"CRP: {what} names must be strings (module names), got {type(name).__name__}")
        if name == OUTPUT:
            raise RelevanceError(f"CRP: {what} {name!r} is the model output's key (the target class); it is not a "
                                 "layer")
        if name in self._steps:
            return self._steps[name]
        if name in self._why:
            raise RelevanceError(f"CRP: {what} {name!r}: {self._why[name]}")
        if name in self._modules:
            raise RelevanceError(f"CRP: {what} {name!r} ({type(self._modules[name]).__name__}) is not called in the "
                                 "traced forward, so it has no relevance" if name else
                                 f"CRP: {what} '' is the whole model; use {OUTPUT!r} for its output")
        close = difflib.get_close_matches(name, list(self._steps), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else \
            f"; layers are module names such as {', '.join(map(repr, self.names()[:5]))}"
        raise RelevanceError(f"CRP: unknown {what} {name!r}: no module of that name in the model{hint} "
                             "(CondAttribution.layer_names() lists them)")


def index_for(cache: dict, plan, model) -> LayerIndex:
    """One LayerIndex per plan (models traced per input shape have several)."""
    key = id(plan)
    found: Optional[LayerIndex] = cache.get(key)
    if found is None or found.plan is not plan:
        found = cache[key] = LayerIndex(plan, model)
    return found
