"""Planning: a traced model (trace.py) becomes a list of steps (lrpfast/nodes/), one per fx node,
and the decisions below are taken once per LRP object.

    plan = build_plan(model, rule_for, eps, stabilizer)   once per LRP object
    call = forward(plan, x, fuse_pools)                    (passes.py) logits; every step saves what it needs
    rel  = relevance(plan, call, r0, record)               (passes.py) relevance at the input, K*B rows

A node's step is made by layer_steps.py (layers and their functional twins, attention, recurrent
layers) or function_steps.py (function and method calls: the op table, derived rules, layout ops).
Transformer nodes (LayerNorm, attention) have their steps in lrpfast/transformer.py; torch's
nn.TransformerEncoder/Decoder(Layer) are traced through their slow path (torch_transformers.py).

Tracing is torch.fx's symbolic tracing, with every layer lrpfast has a rule for kept as one node
(also subclasses of those layers and lrpfast's rel* wrappers). Nested containers are traced
through; a module called twice gives two nodes (two steps, two entries in the per-layer report).

Decisions taken once, from the graph (see lrpfast/nodes/ for what they buy):
- BatchNorm right after a Linear/Conv that feeds nothing else is folded into it (canonize.py);
  other BatchNorms are per-channel affine steps with the ε rule.
- A ReLU runs in place on its input's buffer when nothing else reads that buffer, the producing
  step does not need the unrectified output, and no relevance can arrive where the ReLU outputs 0
  (every consumer's relevance is proportional to its input). Then the producer's z and the next
  layer's x are one tensor: less memory, and the fused division reads one tensor, not two.
- A max pooling on top of a step with a denominator (through activations only) does that step's
  division itself, on the pooled tensor, before the scatter.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import derived, fusion
from .. import nodes as N
from .. import transformer as T
from ..activations import ACTIVATIONS as _ACTIVATIONS
from ..ops import RelevanceError
from .function_steps import _derived_step, _function_step
from .layer_steps import _module_step
from .node_args import _callable, _is_meta_call, _load, _Ref, _target_name
from .row_gather import sink_row_gather
from .trace import trace

# ============================================================================= the plan


class Plan:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.steps: List[N.Step] = []
        self.input = -1
        self.output = -1
        self.free_after: List[List[int]] = []
        self._zp: List[Optional[bool]] = []
        self.attention = "cp"   # the attention steps' rule (lrpfast/transformer.py)
        self.verified: set = set()   # input shapes whose logits were checked against model(x) (LRP._verify)

    def users_zero_preserving(self, i: int) -> bool:
        """Every consumer of step i sends 0 relevance where step i's output is 0 (and i is not the
        model output, whose initial relevance may sit on a zero logit)."""
        if i == self.output:
            return False
        return all(self._zp[u] for u in self.steps[i].users)

    def describe(self) -> str:
        lines = []
        for s in self.steps:
            extra = ""
            if isinstance(s, N.ContractionStep):
                extra = f"  rule={s.rule!r}"
            elif isinstance(s, N.PassStep) and s.is_relu and s.inplace:
                extra = "  (in place)"
            elif isinstance(s, N.MaxPoolStep) and s.prediv is not None:
                extra = f"  (divides for {self.steps[s.prediv].name})"
            lines.append(f"{s.name:<28} {s.op}{extra}")
        return "\n".join(lines)


def build_plan(model: nn.Module, rule_for: Callable, eps: float, stabilizer: str, attention: str = "cp",
               example: Optional[torch.Tensor] = None) -> Plan:
    gm = trace(model, example)
    sink_row_gather(gm)   # the LM head and the rows' own layers on the explained rows only
    plan = Plan(gm)
    plan.attention = T.check_attention_rule("LRP", attention)
    # tensors computed from one tensor alone: written-out activations, normalisers (derived.py)
    plan.derived = derived.Derivation(gm, _is_meta_call, tuple(_ACTIVATIONS))
    # regions that are one linear map of one tensor: one step each (fusion.py)
    regions = fusion.find(gm, plan.derived)
    index = {}        # fx node -> step index
    steps = plan.steps

    def ref(a):
        return fx.node.map_arg(a, lambda n: _Ref(index[n]))

    def tensor_deps(a):
        found = []
        fx.node.map_arg(a, lambda n: found.append(index[n]))
        return found

    def add(step: N.Step, node: fx.Node, src: Optional[fx.Node] = None, inputs=None):
        step.index = len(steps)
        deps = tensor_deps((node.args, node.kwargs))
        step.deps = list(dict.fromkeys(deps))
        if src is not None:
            step.src = index[src]
        if inputs is None:
            inputs = [] if step.src is None else [step.src]
        step.inputs = inputs
        steps.append(step)
        index[node] = step.index
        return step

    def meta_only(node):
        deps = tensor_deps((node.args, node.kwargs))
        return deps and all(not steps[d].tensor_output for d in deps)

    def const_only(node):
        """Computed from parameters/buffers (and shapes) only: a constant, no relevance."""
        deps = tensor_deps((node.args, node.kwargs))
        const = [d for d in deps if isinstance(steps[d], N.ConstStep)]
        return (const or not deps) and all(isinstance(steps[d], N.ConstStep) or not steps[d].tensor_output
                                           for d in deps)

    def first_node_arg(node):
        a = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        if not isinstance(a, fx.Node):
            raise RelevanceError(f"LRP: node {node.name!r} ({_target_name(node)}) expects a tensor first argument")
        return a

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if plan.input >= 0 and node.args:   # an optional argument, traced at its default
                add(N.ConstStep(node.name, node.args[0]), node)
                continue
            if plan.input >= 0:
                raise RelevanceError(f"LRP: the model takes more than one input ({node.name!r}); LRP explains one "
                                     "input tensor")
            step = N.InputStep(node.name)
            add(step, node)
            plan.input = step.index
        elif node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            add(N.ConstStep(node.name, value), node)
        elif node in regions:
            fusion.build(regions[node], node, plan, index, add, ref, _load, _callable, eps, stabilizer)
        elif node.op in ("call_module", "call_function", "call_method") and plan.derived.needs_step(node):
            _derived_step(plan, gm, node, ref, add)
        elif node.op == "call_module":
            if (const_only(node) and tensor_deps((node.args, node.kwargs))) or meta_only(node):
                # a layer applied to constants (CP-LRP's attention weights through a talking-heads
                # conv) or to tensors computed from shapes alone (xcit's Fourier position encoding,
                # a conv of torch.arange(H)): its output is a constant too, with no relevance
                mod = gm.get_submodule(node.target)
                add(N.ConstExprStep(node.name, lambda *a, mod=mod, **k: mod(*a, **k), ref(node.args), ref(node.kwargs),
                                    _load, f"{type(mod).__name__} of constants"), node)
            else:
                _module_step(plan, gm, node, index, add, eps, stabilizer, first_node_arg)
        elif node.op in ("call_function", "call_method"):
            if meta_only(node) or _is_meta_call(node) or (node.op == "call_function" and node.target is torch._assert):
                add(N.MetaStep(node.name, _callable(node), ref(node.args), ref(node.kwargs), _load), node)
            elif const_only(node):
                add(N.ConstExprStep(node.name, _callable(node), ref(node.args), ref(node.kwargs), _load,
                                    _target_name(node)), node)
            else:
                _function_step(plan, node, index, add, ref, eps, stabilizer, first_node_arg)
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node) or not steps[index[out]].tensor_output:
                raise RelevanceError("LRP: the model must return one tensor of logits (B, classes); it returns "
                                     f"{type(out).__name__}")
            plan.output = index[out]
            if out.target in (F.softmax, torch.softmax, "softmax") or (isinstance(steps[plan.output], N.ConstStep)
                                                                       and not _reads_input(plan, plan.output)):
                raise RelevanceError(f"LRP: the model returns {out.name!r} ({_target_name(out)}), "
                                     + ("a softmax: LRP explains the logits before it; return those"
                                        if out.target in (F.softmax, torch.softmax, "softmax") else
                                        "a constant (it does not depend on the input)"))
    if plan.input < 0:
        raise RelevanceError("LRP: the traced model has no input")
    fusion.relax(plan)
    fusion.cache_constants(plan)
    _finish(plan, rule_for)
    fusion.rematerialize(plan)
    return plan


def _reads_input(plan, i) -> bool:
    """Step i is computed from the input's values (not its shape alone). A constant that is (a
    LayerNorm over one element, CP's held weights) is an exact function that does not change with
    x: its map is 0, as gradient × input says, not a tracing accident to refuse."""
    seen, todo = set(), [i]
    while todo:
        j = todo.pop()
        if j == plan.input:
            return True
        if j not in seen and plan.steps[j].tensor_output:
            seen.add(j)
            todo.extend(plan.steps[j].deps)
    return False


# ============================================================================= analyses


def _finish(plan: Plan, rule_for: Callable) -> None:
    steps = plan.steps
    n = len(steps)
    # users (steps reading a step's output during the forward), and when each output dies
    last_use = list(range(n))
    for s in steps:
        for d in s.deps:
            steps[d].users.append(s.index)
            last_use[d] = max(last_use[d], s.index)
    plan.free_after = [[] for _ in range(n)]
    for i, last in enumerate(last_use):
        if i != plan.output and i != plan.input:
            plan.free_after[last].append(i)

    raw_input = [False] * n        # the step's output is the model input up to pooling/reshaping
    nonneg = [False] * n           # the step's output is >= 0
    for s in steps:
        i = s.index
        srcs = s.inputs
        if isinstance(s, N.InputStep):
            raw_input[i] = True
        elif isinstance(s, (N.ContractionStep, N.BatchNormStep, N.ConstStep, N.MetaStep)):
            raw_input[i] = False
        else:
            raw_input[i] = any(raw_input[j] for j in srcs)
        if isinstance(s, N.PassStep) and not s.preserves_values:
            nonneg[i] = s.nonnegative_output
        elif s.sign_preserving or isinstance(s, N.PassStep):
            nonneg[i] = bool(srcs) and all(nonneg[j] for j in srcs)
        else:   # a LayerNorm, attention, a product with a constant, anything not known to keep signs
            nonneg[i] = False

    # rules, from the composite, once per layer (the context has no tensors yet)
    for s in steps:
        if isinstance(s, N.ContractionStep):
            s.is_first = raw_input[s.src]
            s.x_nonnegative = nonneg[s.src]
            w, b = s.params()
            s.rule = rule_for(s.module_path, s.module, s.context(weight=w, bias=b))

    # zero-preserving, from the output backwards (users come later in graph order)
    plan._zp = [None] * n
    for s in reversed(steps):
        plan._zp[s.index] = bool(s.zero_preserving(plan))

    def single_user(i):
        return len(steps[i].users) == 1 and i != plan.output

    # in-place ReLUs, and the layers whose output feeds a ReLU
    for s in steps:
        if not (isinstance(s, N.PassStep) and s.is_relu):
            continue
        p = s.src
        while isinstance(steps[p], N.PassStep) and steps[p].identity and single_user(p):
            p = steps[p].src
        prod = steps[p]
        if prod.fresh_output and single_user(p) and plan.users_zero_preserving(s.index) \
                and not getattr(getattr(prod, "rule", None), "needs_raw_z", False):
            s.inplace = True
    for s in steps:
        if isinstance(s, N.ContractionStep):
            i = s.index
            while single_user(i) and isinstance(steps[steps[i].users[0]], (N.PassStep, N.MaxPoolStep)):
                nxt = steps[steps[i].users[0]]
                if isinstance(nxt, N.PassStep) and nxt.is_relu:
                    s.output_feeds_relu = plan.users_zero_preserving(nxt.index)
                    break
                if isinstance(nxt, N.PassStep) and not nxt.identity:
                    break
                i = nxt.index

    # max poolings that take over the division of the step below them
    for s in steps:
        if not isinstance(s, N.MaxPoolStep):
            continue
        p, same = s.src, True
        while isinstance(steps[p], (N.PassStep,)) and single_user(p):
            same = same and (steps[p].identity or (steps[p].is_relu and steps[p].inplace))
            p = steps[p].src
        if steps[p].has_denominator and single_user(p):
            s.prediv, s.prediv_same_tensor = p, same
