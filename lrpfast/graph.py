"""Trace a model into a plan of steps (lrpfast/nodes.py), and run the two passes over it.

    plan = build_plan(model, rule_for, eps, stabilizer)   once per LRP object
    call = forward(plan, x, fuse_pools)                    logits; every step saves what it needs
    rel  = relevance(plan, call, r0, record)               relevance at the input, K*B rows

Transformer nodes (LayerNorm, attention) have their steps in lrpfast/transformer.py; torch's
nn.TransformerEncoder/Decoder(Layer) are traced through their slow path, written out below.

Tracing is torch.fx's symbolic tracing, with every layer lrpfast has a rule for kept as one node
(also subclasses of those layers and lrpfast's rel* wrappers). Nested containers are traced
through; a module called twice gives two nodes (two steps, two entries in the per-layer report).

Decisions taken once, from the graph (see nodes.py for what they buy):
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

import inspect
import operator
from typing import Callable, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import canonize
from . import layers as rel_layers
from . import nodes as N
from . import derived, fusion, merged_repeat, op_rules, recurrent, shape_trace, stacking
from . import transformer as T
# Activations (LRP's pass rule) are a table of their own, shared with torch_transformers.py.
from .activations import (ACTIVATIONS as _ACTIVATIONS, FUNCTIONAL_ACTIVATIONS as _FUNCTIONAL_ACTIVATIONS,
                          METHOD_ACTIVATIONS as _METHOD_ACTIVATIONS, RELU_FUNCTIONS as _RELU_FUNCTIONS)
from .torch_transformers import slow_path as _slow_path
from .ops import RelevanceError

# ============================================================================= what has a rule

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MAXPOOL = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_AVGPOOL = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ADAPTIVE_AVG = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}
_ADAPTIVE_MAX = {nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
            nn.Identity)
_IDENTITY_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
_IDENTITY_METHODS = ("contiguous", "clone", "detach")
_RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
_RESHAPE_METHODS = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten", "view_as", "reshape_as")
_CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)
_MAXPOOL_FUNCTIONS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.max_pool1d_with_indices: 1,
                      F.max_pool2d_with_indices: 2, F.max_pool3d_with_indices: 3}
_AVGPOOL_FUNCTIONS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_ADAPTIVE_AVG_FUNCTIONS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}

_LAYER_NORM_FUNCTIONS = (F.layer_norm, torch.layer_norm)
_SDPA_FUNCTIONS = (F.scaled_dot_product_attention,)

SUPPORTED = ("Linear, Conv1d/2d/3d, BatchNorm1d/2d/3d (also F.linear/F.conv*d with constant weights, F.batch_norm in eval), MaxPool/AvgPool/AdaptiveAvgPool/AdaptiveMaxPool 1d-3d, "
             "elementwise activations (ReLU, ReLU6, LeakyReLU, GELU, SiLU, Tanh, Sigmoid, ...), Dropout, Identity, "
             "Flatten/Unflatten, residual add, elementwise products (a * b: a constant factor, or two computed "
             "factors by the uniform rule), torchvision's stochastic depth (eval), torch.cat, torch.chunk/split (pieces "
             "taken one by one), mean over non-batch dims, "
             "view/reshape/flatten/squeeze/unsqueeze/permute/transpose/contiguous, "
             "LayerNorm (module, F.layer_norm), MultiheadAttention (module; output [0]), LSTM/GRU (gated recurrent LRP; "
             "output and h_n/c_n), "
             "F.scaled_dot_product_attention, nn.TransformerEncoder(Layer)/TransformerDecoder(Layer) (their slow "
             "path, traced through), basic indexing x[:, ...] (ints, slices, None, ...), "
             "parameters and tensors computed from them only (expand, ...; constants: no relevance), torch._assert; "
             "and the ops of lrpfast/op_rules.py: negation, subtraction, division by constants, sum over non-batch "
             "dims, stack, expand, repeat, pad, roll, flip, interpolate, casts, masked_fill, max/min over a dim, addcmul "
             "(one computed factor), matmul/einsum (one or two "
             "computed factors), softmax (CP: constant; AttnLRP: its Taylor step), torch.unbind, GroupNorm, RMSNorm, "
             "F.normalize (σ constant), nn.Upsample/Softmax/padding modules")

_LEAVES = (nn.Linear, *_CONV, *canonize.BATCH_NORMS, *_MAXPOOL, *_AVGPOOL, *_ADAPTIVE_AVG, *_ADAPTIVE_MAX, *_DROPOUT,
           *_ACTIVATIONS, nn.Flatten, nn.Unflatten, nn.LayerNorm, nn.MultiheadAttention, *recurrent.RECURRENT,
           rel_layers._RelLayer)


class _Tracer(fx.Tracer):
    """Keeps every layer with a rule as one node, including user subclasses of those layers.
    Buffers read by the forward become graph nodes (constants), like parameters: a mask buffer
    expanded to the batch size (a traced value) must be traced itself."""

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _slow_path(m) is not None:
            return False  # traced through, by call_module below
        if isinstance(m, rel_layers._RelLayer):
            return True
        if isinstance(m, _LEAVES):
            # A layer is one node only when it computes what its class's rule assumes: a subclass
            # with a forward of its own (timm's BatchNormAct2d adds an activation, ScaledStdConv2d
            # standardises its weight, ConvNeXt's LayerNorm2d normalises over channels) is traced
            # through, so its own computation is what gets explained, or refused op by op.
            return any(isinstance(m, base) and type(m).forward is base.forward for base in _LEAVES)
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        slow = _slow_path(m)
        if slow is not None:  # torch's transformer modules: their slow path, from their own pieces
            forward = lambda *a, **k: slow(self, m, *a, **k)  # noqa: E731
        else:
            try:
                self.path_of_module(m)
            except NameError:
                # a module made inside forward (DistilBERT's `nn.ReLU()(x)`) has no path to be a
                # node under: its forward is traced through, op by op
                return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


def _optional_arguments(model: nn.Module) -> dict:
    """forward's arguments after the input that have defaults (timm's attn_mask=None): traced at
    their defaults, so that the graph has the one input LRP explains."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params[1:] if p.kind in kinds and p.default is not inspect.Parameter.empty}


_TORCH_STATE = frozenset(vars(nn.Module()).keys())   # parameters, buffers, submodules, hooks, flags


class _StateGuard:
    """Restores every module's own attributes after tracing: a forward that caches into its module
    (timm's LeViT/EfficientFormer keep attention biases in a dict in eval mode) would otherwise
    keep an fx Proxy there, and the model would fail on its next call or trace."""

    def __init__(self, model: nn.Module):
        self.saved = []
        for m in model.modules():
            attrs = {k: v for k, v in vars(m).items() if k not in _TORCH_STATE}
            contents = {k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in attrs.items()
                        if isinstance(v, (dict, list))}
            self.saved.append((m, attrs, contents))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for m, attrs, contents in self.saved:
            for k in [k for k in vars(m) if k not in _TORCH_STATE and k not in attrs]:
                delattr(m, k)
            for k, v in attrs.items():
                m.__dict__[k] = v
                if k in contents:
                    v.clear()
                    (v.update if isinstance(v, dict) else v.extend)(contents[k])
        return False


class NeedsShapes(RelevanceError):
    """Symbolic tracing failed on Python control flow: the trace may need the input's shape
    (lrpfast/shape_trace.py); LRP then traces once per input shape, at the first call."""


def trace(model: nn.Module, example: Optional[torch.Tensor] = None) -> fx.GraphModule:
    """model's graph: shape-agnostic, or for `example`'s shape (shape_trace.py) when given."""
    tracer = _Tracer() if example is None else shape_trace.make_tracer(_Tracer, example)()
    try:
        with _StateGuard(model):   # (the GraphModule copies what tracing attached, before it is removed)
            graph = tracer.trace(model, concrete_args=_optional_arguments(model) or None)
            gm = fx.GraphModule(model, graph)
    except Exception as exc:  # noqa: BLE001 (any tracing failure becomes one clear error)
        message = (f"LRP: could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}). "
                   "LRP needs a model whose forward has no data-dependent Python control flow")
        if example is None:
            raise NeedsShapes(message + "; wrap such parts in a module, or trace a sub-model that has none") from exc
        raise RelevanceError(message + f" (traced for input shape {tuple(example.shape)}, so branches on shapes "
                             "are resolved: this one depends on the data)") from exc
    gm.graph.eliminate_dead_code()
    return gm


# ============================================================================= argument handling


class _Ref:
    """A reference to a step's output inside the stored arguments of a node."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i


def _load(env, args, kwargs):
    f = lambda a: env[a.i] if isinstance(a, _Ref) else a  # noqa: E731
    return fx.node.map_aggregate(args, f), fx.node.map_aggregate(kwargs, f)


def _bind(node: fx.Node, names, defaults) -> dict:
    """The node's arguments by name (positional and keyword), defaults filled in."""
    out = dict(defaults)
    if len(node.args) > len(names):
        raise RelevanceError(f"LRP: node {node.name!r}: too many arguments for {names}")
    out.update(zip(names, node.args))
    for k, v in node.kwargs.items():
        if k not in names:
            raise RelevanceError(f"LRP: node {node.name!r}: unexpected argument {k!r}")
        out[k] = v
    return out


def _constant(node: fx.Node, what: str, v):
    if isinstance(v, fx.Node) or (isinstance(v, (list, tuple)) and any(isinstance(i, fx.Node) for i in v)):
        raise RelevanceError(f"LRP: node {node.name!r}: {what} must be a constant, not computed in the graph")
    return v


def _target_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    mod = getattr(t, "__module__", None) or ""
    return f"{mod}.{getattr(t, '__name__', repr(t))}".lstrip(".")


def _no_inplace(fn):
    """fn with inplace=False forced (ReLU6(inplace=True) must not overwrite the layer's z)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn
    if "inplace" not in params:
        return fn
    names = list(params)
    pos = names.index("inplace")

    def call(*args, **kwargs):
        if len(args) > pos:
            args = args[:pos] + (False,) + args[pos + 1:]
        kwargs["inplace"] = False
        return fn(*args, **kwargs)

    return call


def _module_without_inplace(m: nn.Module):
    if getattr(m, "inplace", False):
        import copy

        m = copy.copy(m)  # shallow: shares parameters; the user's module keeps inplace=True
        m.inplace = False
    return m


def _permutation(kind):
    def perm_of(ndim, args, kwargs):
        if kind == "permute":
            dims = list(args[1:]) if len(args) > 1 else list(kwargs.get("dims", ()))
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = list(dims[0])
            return [d % ndim for d in dims]
        d0 = args[1] if len(args) > 1 else kwargs["dim0"]
        d1 = args[2] if len(args) > 2 else kwargs["dim1"]
        perm = list(range(ndim))
        perm[d0 % ndim], perm[d1 % ndim] = perm[d1 % ndim], perm[d0 % ndim]
        return perm

    return perm_of


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
    fusion.gather_before_linear(gm)   # an LM head on the explained rows only (fusion.py)
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


def _derived_step(plan, gm, node, ref, add):
    """A node that derived.py takes over: computed in the forward, its relevance by rule 1 or none."""
    d = plan.derived
    fn = derived.pure_callable(node, gm, _no_inplace, _module_without_inplace)
    what = _target_name(node) if node.op != "call_module" else type(gm.get_submodule(node.target)).__name__
    if d.needs_step(node) == derived.FWD:
        return add(derived.DerivedStep(node.name, fn, ref(node.args), ref(node.kwargs), _load,
                                       f"{what}, held constant: computed from {d.describe(node)!r} alone"), node)
    target = d.activation_target(node)
    step = derived.RegionActivationStep(node.name, fn, ref(node.args), ref(node.kwargs), _load,
                                        f"{what}, an activation of {target.name!r}", False)
    add(step, node, target)
    step.deps = list(dict.fromkeys(step.deps + [step.src]))   # its forward checks the shape against it
    return step


def _is_meta_call(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel", "ndimension")
    if node.target is getattr:
        return node.args[1] in ("shape", "ndim", "dtype", "device")
    return False


def _callable(node: fx.Node):
    if node.op == "call_method":
        name = node.target
        return lambda obj, *a, **k: getattr(obj, name)(*a, **k)
    return node.target


def _module_step(plan, gm, node, index, add, eps, stabilizer, first_node_arg):
    m = gm.get_submodule(node.target)
    if isinstance(m, rel_layers._RelLayer):  # lrpfast's seed-style wrappers: the layer they wrap
        if isinstance(m, rel_layers.Reshape):
            shape = m.shape or (-1,)
            step = N.ReshapeStep(node.name, lambda x: x.reshape(x.shape[0], *shape), None, None, None, "Reshape")
            step.load = lambda env, a, k, step=step: ((env[step.src],), {})
            return add(step, node, first_node_arg(node))
        m = m.module
    if isinstance(m, nn.MultiheadAttention):
        return _attention_step(plan, node, m, index, add, eps, stabilizer)
    src = first_node_arg(node)
    if isinstance(m, recurrent.RECURRENT):
        if len(node.args) + len(node.kwargs) != 1 or not isinstance(src, fx.Node):
            raise RelevanceError(f"LRP: node {node.name!r} calls {type(m).__name__} with an initial state: only the "
                                 "default zero state is supported (its relevance would have nowhere to go)")
        return add(recurrent.RecurrentStep(node.name, m, eps, stabilizer), node, src)
    if len([a for a in node.args if isinstance(a, fx.Node)]) + len(node.kwargs) != 1:
        raise RelevanceError(f"LRP: node {node.name!r} calls {type(m).__name__} with more than one argument")
    if isinstance(m, nn.Linear) or isinstance(m, _CONV):
        step = N.ContractionStep(node.name, m, "linear" if isinstance(m, nn.Linear) else "conv", None)
        step.module_path = node.target
        return add(step, node, src)
    if isinstance(m, canonize.BATCH_NORMS):
        canonize.check_batch_norm(node.name, m)
        return _batch_norm_step(plan, node, index, add, m, type(m).__name__, src, eps, stabilizer)
    for table, make in ((_MAXPOOL, "max"), (_ADAPTIVE_MAX, "amax")):
        for cls, dims in table.items():
            if isinstance(m, cls):
                step = _max_pool_step(node.name, dims, m, make)
                return add(step, node, src)
    for cls, dims in _AVGPOOL.items():
        if isinstance(m, cls):
            step = N.AvgPoolStep(node.name, dims, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                 m.count_include_pad, getattr(m, "divisor_override", None), eps, stabilizer,
                                 type(m).__name__)
            return add(step, node, src)
    for cls, dims in _ADAPTIVE_AVG.items():
        if isinstance(m, cls):
            return add(N.AdaptiveAvgPoolStep(node.name, dims, m.output_size, eps, stabilizer, type(m).__name__), node,
                       src)
    if isinstance(m, _DROPOUT):
        return add(N.PassStep(node.name, None, None, None, None, type(m).__name__, True, identity=True), node, src)
    for cls, (zero, nonneg) in _ACTIVATIONS.items():
        if isinstance(m, cls):
            if type(m) is nn.ReLU or (isinstance(m, nn.ReLU) and type(m).forward is nn.ReLU.forward):
                step = N.PassStep(node.name, None, None, None, None, type(m).__name__, True, is_relu=True)
            else:
                fn = _module_without_inplace(m)
                step = N.PassStep(node.name, fn, None, None, None, type(m).__name__, zero)
                step.load = lambda env, a, k, step=step: ((env[step.src],), {})
            if isinstance(m, nn.Hardtanh):
                nonneg = m.min_val >= 0
                zero = m.min_val <= 0 <= m.max_val
                step.zero_at_zero = zero
            step.nonnegative_output = nonneg
            return add(step, node, src)
    if isinstance(m, nn.LayerNorm) and all(n == 1 for n in m.normalized_shape):
        # over one element x − mean(x) = 0: the output is the bias (or 0) whatever x is, a constant of
        # the graph (csatv2's 1-channel attention, whose q, k, v come from it and meet across the batch)
        return add(N.ConstExprStep(node.name, lambda *a, m=m: m(*a), ref_args(node, index), {}, _load,
                                   f"{type(m).__name__} over one element (its bias: a constant)"), node)
    if isinstance(m, nn.LayerNorm):
        affine = lambda env, m=m: (None if m.weight is None else m.weight.detach(),  # noqa: E731
                                   None if m.bias is None else m.bias.detach())
        return add(T.LayerNormStep(node.name, m.normalized_shape, m.eps, affine, eps, stabilizer, type(m).__name__),
                   node, src)
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        step = N.ReshapeStep(node.name, m, None, None, None, type(m).__name__)
        step.load = lambda env, a, k, step=step: ((env[step.src],), {})
        return add(step, node, src)
    found = op_rules.module_rule(m)
    if found is not None:   # a module that is one of the generic ops (GroupNorm, Upsample, Softmax, pads)
        rule, fn, extra = found
        step_args = ref_args(node, index)
        if rule is op_rules.SOFTMAX and plan.attention == "cp":
            return add(N.ConstExprStep(node.name, lambda x, fn=fn, extra=extra: fn(x, *extra), step_args, {}, _load,
                                       f"{type(m).__name__} (held constant: CP-LRP)"), node)
        step = op_rules.LinearOpStep(node.name, fn, step_args, {}, _load, type(m).__name__, rule, eps, stabilizer,
                                     extra)
        return add(step, node, None, [index[src]])
    raise RelevanceError(
        f"LRP: node {node.name!r} calls module {node.target!r} ({type(m).__name__}), which has no relevance rule. "
        f"Supported: {SUPPORTED}")


def ref_args(node, index):
    return fx.node.map_arg(node.args, lambda n: _Ref(index[n]))


def _constant_tensor(plan, node, index, what, a):
    """A mask or an affine parameter: None, or a tensor the graph computes from constants only."""
    if a is None:
        return None
    if isinstance(a, fx.Node):
        if not isinstance(plan.steps[index[a]], N.ConstStep):
            raise RelevanceError(f"LRP: node {node.name!r}: {what} is computed from the input ({a.name!r}); only "
                                 "constant (parameter/buffer) values are supported there")
        return _Ref(index[a])
    if isinstance(a, torch.Tensor):
        return a
    raise RelevanceError(f"LRP: node {node.name!r}: {what} must be a tensor or None, got {type(a).__name__}")


def _loader(fixed: dict):
    """env -> the bound arguments, step references resolved."""
    return lambda env: {k: env[v.i] if isinstance(v, _Ref) else v for k, v in fixed.items()}


def _attention_inputs(plan, node, index, b, masks):
    qkv = {}
    for k in ("query", "key", "value"):
        if not isinstance(b.get(k), fx.Node):
            raise RelevanceError(f"LRP: node {node.name!r}: {k} must be a tensor computed in the graph")
        qkv[k] = _Ref(index[b[k]])
    for k in masks:
        qkv[k] = _constant_tensor(plan, node, index, k, b.get(k))
    return qkv


def _attention_step(plan, node, m, index, add, eps, stabilizer):
    b = _bind(node, ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
                     "is_causal"],
              {"key_padding_mask": None, "need_weights": True, "attn_mask": None, "average_attn_weights": True,
               "is_causal": False})
    fixed = _attention_inputs(plan, node, index, b, ("key_padding_mask", "attn_mask"))
    for k in ("need_weights", "average_attn_weights", "is_causal"):
        fixed[k] = bool(_constant(node, k, b[k]))
    if fixed["is_causal"] and b["attn_mask"] is None:
        raise RelevanceError(f"LRP: node {node.name!r}: is_causal=True needs attn_mask (nn.MultiheadAttention "
                             "takes it as a hint only)")
    step = T.MultiheadAttentionStep(node.name, m, _loader(fixed), eps, stabilizer, plan.attention)
    add(step, node, b["value"])
    step.value_src = step.src
    step.qkv_steps = [fixed[k].i for k in ("query", "key", "value")]
    if plan.attention == "attnlrp":   # relevance reaches the query and key inputs too
        step.inputs = list(dict.fromkeys(step.qkv_steps))
    return step


def _sdpa_step(plan, node, index, add, eps, stabilizer):
    b = _bind(node, ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"],
              {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False})
    fixed = _attention_inputs(plan, node, index, b, ("attn_mask",))
    if _constant(node, "dropout_p", b["dropout_p"]) != 0:
        raise RelevanceError(f"LRP: node {node.name!r} (scaled_dot_product_attention) has dropout_p="
                             f"{b['dropout_p']}; LRP explains a deterministic function (dropout_p=0, as in eval)")
    if _constant(node, "enable_gqa", b["enable_gqa"]):
        raise RelevanceError(f"LRP: node {node.name!r} (scaled_dot_product_attention) uses enable_gqa=True, which has "
                             "no relevance rule")
    step = T.ScaledDotProductAttentionStep(node.name, _loader(fixed), _constant(node, "is_causal", b["is_causal"]),
                                           _constant(node, "scale", b["scale"]), eps, stabilizer, plan.attention)
    add(step, node, b["value"])
    step.value_src = step.src
    step.query_src, step.key_src = fixed["query"].i, fixed["key"].i
    if plan.attention == "attnlrp":
        step.inputs = list(dict.fromkeys([step.query_src, step.key_src, step.value_src]))
    return step


_CONTRACTION_FUNCTIONS = {F.linear: 0, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def where(node: fx.Node) -> str:
    """' in module 'path' (Class)' for a node traced inside a module's forward, else ''."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, cls = list(stack.values())[-1]
    return f" in module {path!r} ({getattr(cls, '__name__', cls)})"


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else node.name


def _functional_contraction_step(plan, node, index, add, dims):
    """F.linear / F.conv1d/2d/3d with a constant weight: a Linear/Conv layer under the composite's
    rule, its weight read from the graph at every call (ContractionStep.load_wb)."""
    if dims == 0:
        b = _bind(node, ["input", "weight", "bias"], {"bias": None})
        geometry = nn.Linear(1, 1, bias=False, device="meta")
    else:
        b = _bind(node, ["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
                  {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
        vals = {k: _constant(node, k, b[k]) for k in ("stride", "padding", "dilation", "groups")}
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        try:
            geometry = conv(vals["groups"], vals["groups"], 1, stride=vals["stride"], padding=vals["padding"],
                            dilation=vals["dilation"], groups=vals["groups"], bias=False, device="meta")
        except (ValueError, RuntimeError, TypeError) as exc:
            raise RelevanceError(f"LRP: node {node.name!r} ({_target_name(node)}){where(node)}: {exc}") from exc
    if not isinstance(b["input"], fx.Node):
        raise RelevanceError(f"LRP: node {node.name!r} ({_target_name(node)}){where(node)} needs a tensor input")
    w = _constant_tensor(plan, node, index, "the weight", b["weight"])
    bias = _constant_tensor(plan, node, index, "the bias", b["bias"])
    step = N.ContractionStep(node.name, geometry, "linear" if dims == 0 else "conv", None)
    step.op = _target_name(node)
    step.module_path = _module_path(node)
    value = lambda env, v: env[v.i] if isinstance(v, _Ref) else v  # noqa: E731
    step.load_wb = lambda env: (value(env, w), value(env, bias))
    return add(step, node, b["input"])


class _BatchNormArgs:
    """The running statistics and affine parameters of an F.batch_norm call, where lrpfast's
    BatchNorm code (canonize.py, nodes.BatchNormStep) reads a module's."""

    def __init__(self, running_mean, running_var, weight, bias, eps):
        self.running_mean, self.running_var, self.weight, self.bias, self.eps = \
            running_mean, running_var, weight, bias, eps


def _functional_batch_norm_step(plan, node, index, add, eps, stabilizer):
    """F.batch_norm in eval mode (constant running statistics): the per-channel affine map of a
    BatchNorm module, folded into the Linear/Conv before it when it can be (timm's BatchNormAct2d)."""
    b = _bind(node, ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"],
              {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5})
    culprit = f"node {node.name!r} (F.batch_norm){where(node)}"
    if _constant(node, "training", b["training"]) or b["running_mean"] is None or b["running_var"] is None:
        raise RelevanceError(f"LRP: {culprit} normalises with batch statistics (training mode or no running "
                             "statistics); LRP explains a fixed function: call model.eval()")
    vals = {}
    for k in ("running_mean", "running_var", "weight", "bias"):
        a = b[k]
        if a is None:
            vals[k] = None
        elif isinstance(a, fx.Node) and type(plan.steps[index[a]]) is N.ConstStep:
            vals[k] = plan.steps[index[a]].value
        elif isinstance(a, torch.Tensor):
            vals[k] = a
        else:
            raise RelevanceError(f"LRP: {culprit}: {k} must be a parameter or buffer of the model")
    bn = _BatchNormArgs(vals["running_mean"], vals["running_var"], vals["weight"], vals["bias"],
                        float(_constant(node, "eps", b["eps"])))
    return _batch_norm_step(plan, node, index, add, bn, "F.batch_norm", b["input"], eps, stabilizer)


def _batch_norm_step(plan, node, index, add, bn, label, src, eps, stabilizer):
    """An eval BatchNorm (module, or F.batch_norm's arguments): folded into the Linear/Conv module
    before it when nothing else reads that layer's output, else a per-channel affine ε step. A
    functional layer reads its weight from the graph at every call, so it takes no fold."""
    producer = plan.steps[index[src]]
    if isinstance(producer, N.ContractionStep) and producer.bn is None and producer.load_wb is None \
            and len(src.users) == 1:
        producer.bn, producer.bn_name = bn, node.name
        producer.op += f" + {label} (folded)"
        index[node] = producer.index  # the BatchNorm node is the (folded) layer from now on
        return producer
    step = N.BatchNormStep(node.name, bn, eps, stabilizer)
    step.op = label
    return add(step, node, src)


def _linear_op_step(plan, node, index, add, ref, rule, eps, stabilizer):
    steps = plan.steps
    deps = []
    fx.node.map_arg(op_rules.data_operands(node), lambda a: deps.append(index[a]))
    computed = list(dict.fromkeys(d for d in deps if steps[d].tensor_output and not isinstance(steps[d], N.ConstStep)))
    culprit = f"node {node.name!r} ({_target_name(node)}){where(node)}"
    if any(isinstance(steps[d], N.SplitStep) for d in computed):
        raise RelevanceError(f"LRP: {culprit} takes the whole tuple of a chunk/split; take its pieces one by one")
    if rule.only_first_computed:
        # a computed divisor is a normaliser, held constant (derived.py, rule 3): R goes to the numerator
        first = []
        fx.node.map_arg(node.args[:1], lambda a: first.append(index[a]))
        computed = [d for d in computed if d in first]
        if not computed:
            raise RelevanceError(f"LRP: {culprit} divides a constant by a tensor computed from the input outside "
                                 "an elementwise function of one tensor; it has no relevance rule")
    cls = op_rules.LinearOpStep
    if node.op == "call_method" and node.target in fusion.CASTS and len(computed) == 1:
        cls = _CAST_STEP
    elif (node.op == "call_method" and node.target == "gather") or node.target is torch.gather:
        cls = _GATHER_STEP
    step = cls(node.name, _callable(node), ref(node.args), ref(node.kwargs), _load, _target_name(node), rule, eps,
               stabilizer)
    return add(step, node, None, computed)


_CAST_STEP = fusion.same_dtype_cast(op_rules.LinearOpStep)
_GATHER_STEP = fusion.direct_gather(op_rules.LinearOpStep)


def _max_pool_step(name, dims, m, kind):
    if kind == "max":
        step = N.MaxPoolStep(name, dims, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                             bool(m.return_indices), type(m).__name__)
    else:
        step = N.MaxPoolStep(name, dims, None, None, 0, 1, False, bool(m.return_indices), type(m).__name__)
        size = m.output_size
        fn = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[dims]
        step.pool = lambda x: fn(x, size, True)
    return step


def _function_step(plan, node, index, add, ref, eps, stabilizer, first_node_arg):
    t = node.target
    name = node.name
    steps = plan.steps
    what = _target_name(node)
    is_method = node.op == "call_method"

    def generic(cls, *extra, **kw):
        return cls(name, _callable(node), ref(node.args), ref(node.kwargs), _load, *extra, **kw)

    # ---- elementwise activations and identities
    if not is_method and getattr(t, "lrpfast_nested_padding", False):
        step = N.PassStep(name, t, ref(node.args), ref(node.kwargs), _load, "TransformerEncoder padding", True)
        return add(step, node, first_node_arg(node))  # relevance passes; the mask (a constant) gets none
    if (not is_method and t in _RELU_FUNCTIONS) or (is_method and t in ("relu", "relu_")):
        step = N.PassStep(name, None, None, None, None, what, True, is_relu=True)
        step.nonnegative_output = True
        return add(step, node, first_node_arg(node))
    if not is_method and t in _FUNCTIONAL_ACTIVATIONS:
        zero, nonneg = _FUNCTIONAL_ACTIVATIONS[t]
        step = N.PassStep(name, _no_inplace(t), ref(node.args), ref(node.kwargs), _load, what, zero)
        if t is F.hardtanh:
            b = _bind(node, ["input", "min_val", "max_val", "inplace"], {"min_val": -1.0, "max_val": 1.0})
            lo, hi = _constant(node, "min_val", b["min_val"]), _constant(node, "max_val", b["max_val"])
            step.zero_at_zero, nonneg = lo <= 0 <= hi, lo >= 0
        step.nonnegative_output = nonneg
        return add(step, node, first_node_arg(node))
    if is_method and t in _METHOD_ACTIVATIONS:
        zero, nonneg = _METHOD_ACTIVATIONS[t]
        method = t.rstrip("_")
        step = N.PassStep(name, lambda x, *a, **k: getattr(x, method)(*a, **k), ref(node.args), ref(node.kwargs),
                          _load, what, zero)
        step.nonnegative_output = nonneg
        return add(step, node, first_node_arg(node))
    if not is_method and getattr(t, "__module__", "") == "torchvision.ops.stochastic_depth" \
            and getattr(t, "__name__", "") == "stochastic_depth":
        # torchvision's StochasticDepth (EfficientNet, ConvNeXt): the identity in eval mode
        b = _bind(node, ["input", "p", "mode", "training"], {"training": True})
        if _constant(node, "training", b["training"]) and _constant(node, "p", b["p"]) > 0:
            raise RelevanceError(f"LRP: node {name!r} ({what}) drops residual branches at random (training=True); "
                                 "LRP explains a deterministic function: call model.eval() first")
        step = generic(N.PassStep, what, True, identity=True)
        step.preserves_values = True
        return add(step, node, first_node_arg(node))
    if (not is_method and t in _IDENTITY_FUNCTIONS) or (is_method and t in _IDENTITY_METHODS):
        # dropout: the input itself; contiguous/clone/detach: its values, maybe in a new tensor
        step = generic(N.PassStep, what, True, identity=not is_method)
        step.preserves_values = True
        return add(step, node, first_node_arg(node))

    # ---- shape
    if (not is_method and t in _RESHAPE_FUNCTIONS) or (is_method and t in _RESHAPE_METHODS):
        # (view_as / reshape_as: the other tensor only gives a shape, it receives no relevance)
        return add(generic(N.ReshapeStep, what), node, first_node_arg(node))
    if ((not is_method and t is torch.repeat_interleave) or (is_method and t == "repeat_interleave")) and \
            node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None) == 0:
        # rows repeated in place along the batch dim: a merged batch (GCViT's global query per window)
        return add(generic(merged_repeat.RepeatRowsStep, what), node, first_node_arg(node))
    if (not is_method and t in (torch.permute, torch.transpose, torch.swapaxes)) or \
            (is_method and t in ("permute", "transpose", "swapaxes")):
        kind = "permute" if (t is torch.permute or t == "permute") else "transpose"
        return add(generic(N.PermuteStep, what, _permutation(kind)), node, first_node_arg(node))

    # ---- sums and concatenation
    if (not is_method and t in N.ADD_FUNCTIONS) or (is_method and t in ("add", "add_")):
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
            raise RelevanceError(f"LRP: node {name!r} ({what}) scales a summand (alpha); only a + b is supported")
        operands = [a for a in list(node.args) + [node.kwargs.get("other")] if isinstance(a, fx.Node)]
        inputs = [index[a] for a in operands if steps[index[a]].tensor_output]
        fn = torch.add if (is_method or t is torch.add) else operator.add  # never in place
        step = N.AddStep(name, fn, ref(node.args), ref({k: v for k, v in node.kwargs.items()}), _load, eps,
                         stabilizer)
        # a sum of tensors >= 0 is >= 0; a number added may be negative (constant tensors are
        # among the inputs, and are not known to be >= 0)
        step.sign_preserving = all(isinstance(a, fx.Node) or (isinstance(a, (int, float)) and a >= 0)
                                   for a in list(node.args) + [node.kwargs.get("other", 0)])
        return add(step, node, None, inputs)
    if (not is_method and t in N.MUL_FUNCTIONS) or (is_method and t in ("mul", "mul_")):
        factors = list(node.args) + ([node.kwargs["other"]] if "other" in node.kwargs else [])
        if len(factors) != 2 or set(node.kwargs) - {"other"}:
            raise RelevanceError(f"LRP: node {name!r} ({what}) must multiply two operands")
        held = plan.derived.held.get(node, ())   # a factor computed from the other alone (derived.py)
        idx = [index[a] if isinstance(a, fx.Node) and steps[index[a]].tensor_output
               and not isinstance(steps[index[a]], N.ConstStep) and a not in held else None for a in factors]
        fn = torch.mul if (is_method or t is torch.mul) else operator.mul  # never in place
        step = N.MulStep(name, fn, ref(node.args), ref({k: v for k, v in node.kwargs.items()}), _load, eps,
                         stabilizer, idx)
        # computed factors >= 0 and positive numbers keep the sign; a parameter factor may not
        step.sign_preserving = all(i is not None or (isinstance(a, (int, float)) and a > 0)
                                   for a, i in zip(factors, idx))
        return add(step, node, None, [i for i in idx if i is not None])
    if not is_method and t in _CAT_FUNCTIONS:
        b = _bind(node, ["tensors", "dim"], {"dim": 0})
        dim = _constant(node, "dim", b["dim"])
        tensors = b["tensors"]
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(a, fx.Node) for a in tensors):
            raise RelevanceError(f"LRP: node {name!r} ({what}) must concatenate tensors from the graph")
        idx = [index[a] for a in tensors]
        step = N.CatStep(name, dim, lambda env, idx=idx: [env[i] for i in idx])
        return add(step, node, None, idx)

    # ---- layers written as functional calls (inside a layer subclass's own forward)
    if not is_method and t in _CONTRACTION_FUNCTIONS:
        return _functional_contraction_step(plan, node, index, add, _CONTRACTION_FUNCTIONS[t])
    if not is_method and t is F.batch_norm:
        return _functional_batch_norm_step(plan, node, index, add, eps, stabilizer)

    # ---- pooling
    if not is_method and t in _MAXPOOL_FUNCTIONS:
        b = _bind(node, ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"],
                  {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
        vals = {k: _constant(node, k, v) for k, v in b.items() if k != "input"}
        returns = bool(vals["return_indices"]) or t in (F.max_pool1d_with_indices, F.max_pool2d_with_indices,
                                                        F.max_pool3d_with_indices)
        step = N.MaxPoolStep(name, _MAXPOOL_FUNCTIONS[t], vals["kernel_size"], vals["stride"], vals["padding"],
                             vals["dilation"], vals["ceil_mode"], returns, what)
        return add(step, node, b["input"])
    if not is_method and t in _AVGPOOL_FUNCTIONS:
        b = _bind(node, ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                         "divisor_override"],
                  {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                   "divisor_override": None})
        vals = {k: _constant(node, k, v) for k, v in b.items() if k != "input"}
        step = N.AvgPoolStep(name, _AVGPOOL_FUNCTIONS[t], vals["kernel_size"], vals["stride"], vals["padding"],
                             vals["ceil_mode"], vals["count_include_pad"], vals["divisor_override"], eps, stabilizer,
                             what)
        return add(step, node, b["input"])
    if not is_method and t in _ADAPTIVE_AVG_FUNCTIONS:
        b = _bind(node, ["input", "output_size"], {})
        step = N.AdaptiveAvgPoolStep(name, _ADAPTIVE_AVG_FUNCTIONS[t], _constant(node, "output_size", b["output_size"]),
                                     eps, stabilizer, what)
        return add(step, node, b["input"])
    if not is_method and t is torch.stack and isinstance(node.kwargs.get("tensors", node.args[0] if node.args else None),
                                                          (list, tuple)):
        b = _bind(node, ["tensors", "dim"], {"dim": 0})
        if all(isinstance(a, fx.Node) for a in b["tensors"]):   # the batch may move (stacking.py)
            idx = [index[a] for a in b["tensors"]]
            step = stacking.StackStep(name, _constant(node, "dim", b["dim"]), lambda env, idx=idx: [env[i] for i in idx])
            return add(step, node, None, idx)
    if (not is_method and t is torch.sum) or (is_method and t == "sum"):
        b = _bind(node, ["input", "dim", "keepdim", "dtype"], {"dim": None, "keepdim": False, "dtype": None})
        dims = _constant(node, "dim", b["dim"])
        if dims is not None and b["dtype"] is None:   # over given dims, the batch anywhere: as a mean
            dims = (dims,) if isinstance(dims, int) else tuple(dims)
            step = N.MeanStep(name, dims, bool(_constant(node, "keepdim", b["keepdim"])), eps, stabilizer, total=True)
            return add(step, node, b["input"])
    if (not is_method and t is torch.mean) or (is_method and t == "mean"):
        b = _bind(node, ["input", "dim", "keepdim", "dtype"], {"dim": None, "keepdim": False, "dtype": None})
        dims = _constant(node, "dim", b["dim"])
        if dims is None or b["dtype"] is not None:
            raise RelevanceError(f"LRP: node {name!r} ({what}) must average over given non-batch dims (dim=...), "
                                 "without dtype")
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        step = N.MeanStep(name, dims, bool(_constant(node, "keepdim", b["keepdim"])), eps, stabilizer)
        return add(step, node, b["input"])

    # ---- transformers
    if not is_method and t in _LAYER_NORM_FUNCTIONS:
        b = _bind(node, ["input", "normalized_shape", "weight", "bias", "eps"],
                  {"weight": None, "bias": None, "eps": 1e-5})
        shape = _constant(node, "normalized_shape", b["normalized_shape"])
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        wb = (_constant_tensor(plan, node, index, "weight", b["weight"]),
              _constant_tensor(plan, node, index, "bias", b["bias"]))
        if all(n == 1 for n in shape):   # over one element: its bias, a constant (as nn.LayerNorm above)
            return add(N.ConstExprStep(name, t, ref(node.args), ref(node.kwargs), _load,
                                       f"{what} over one element (its bias: a constant)"), node)
        affine = lambda env, wb=wb: tuple(env[v.i] if isinstance(v, _Ref) else v for v in wb)  # noqa: E731
        step = T.LayerNormStep(name, shape, _constant(node, "eps", b["eps"]), affine, eps, stabilizer, what)
        return add(step, node, b["input"])
    if not is_method and t in _SDPA_FUNCTIONS:
        return _sdpa_step(plan, node, index, add, eps, stabilizer)

    # ---- chunk / split: a tuple of views, each taken element a piece of the source
    if (not is_method and t in (torch.chunk, torch.split)) or (is_method and t in ("chunk", "split")):
        chunk = t in (torch.chunk, "chunk")
        sizes = "chunks" if chunk else ("split_size" if "split_size" in node.kwargs else "split_size_or_sections")
        b = _bind(node, ["input", sizes, "dim"], {"dim": 0})
        if not isinstance(b["input"], fx.Node):
            raise RelevanceError(f"LRP: node {name!r} ({what}) must split a tensor from the graph")
        step = N.SplitStep(name, _callable(node), ref(node.args), ref(node.kwargs), _load, what)
        step.split_dim = _constant(node, "dim", b["dim"])
        return add(step, node, b["input"])
    if (not is_method and t is torch.unbind) or (is_method and t == "unbind"):
        # timm's attention: qkv.permute(2, 0, 3, 1, 4).unbind(0), the batch at dim 1 of the source
        b = _bind(node, ["input", "dim"], {"dim": 0})
        if not isinstance(b["input"], fx.Node):
            raise RelevanceError(f"LRP: node {name!r} ({what}) must unbind a tensor from the graph")
        step = N.SplitStep(name, _callable(node), ref(node.args), ref(node.kwargs), _load, what)
        step.split_dim, step.unbind = _constant(node, "dim", b["dim"]), True
        return add(step, node, b["input"])

    # ---- tuple outputs and indexing
    if not is_method and t is getattr and node.args[1] in ("values", "indices") and isinstance(node.args[0], fx.Node) \
            and isinstance(steps[index[node.args[0]]], op_rules.LinearOpStep) and steps[index[node.args[0]]].rule.values:
        step = N.GetItemStep(name, 0 if node.args[1] == "values" else 1)   # x.max(dim).values / .indices
        step.tensor_output = node.args[1] == "values"
        return add(step, node, node.args[0])
    if not is_method and t is operator.getitem and isinstance(node.args[0], fx.Node):
        producer = steps[index[node.args[0]]]
        item = node.args[1]
        if isinstance(producer, N.SplitStep):
            if not isinstance(item, int):
                raise RelevanceError(f"LRP: node {name!r} indexes the pieces of {producer.describe()} with {item!r}; "
                                     "take one piece at a time (an int)")
            piece = N.SelectStep if producer.unbind else N.PieceStep
            step = piece(name, producer.index, item, producer.split_dim)
            add(step, node, None, [producer.src])
            step.src = producer.src   # relevance goes straight to the split tensor
            step.deps = list(dict.fromkeys(step.deps + [producer.src]))   # x stays alive until here
            return step
        if (isinstance(producer, recurrent.RecurrentStep)
                or isinstance(producer, recurrent.RecurrentStateStep) and producer.which == "hc"):
            # (output, (h_n, c_n)) of an LSTM, (output, h_n) of a GRU
            if not (isinstance(item, int) and -2 <= item <= 1):
                raise RelevanceError(f"LRP: node {name!r} indexes the output pair of {producer.describe()} with "
                                     f"{item!r}; take one part at a time (0 or 1)")
            item %= 2
            if isinstance(producer, recurrent.RecurrentStep):
                if item == 0:
                    return add(N.GetItemStep(name, 0), node, node.args[0])   # the output sequence
                return add(recurrent.RecurrentStateStep(name, producer.index, "hc" if producer.lstm else "h", 1),
                           node, node.args[0])
            return add(recurrent.RecurrentStateStep(name, producer.producer, "hc"[item], item), node, node.args[0])
        if isinstance(producer, op_rules.LinearOpStep) and producer.rule.values and item in (0, 1):
            step = N.GetItemStep(name, item)   # x.max(dim): (values, indices); the indices carry no relevance
            step.tensor_output = item == 0
            return add(step, node, node.args[0])
        if isinstance(producer, (N.MaxPoolStep, T.MultiheadAttentionStep)) and isinstance(item, int):
            if isinstance(producer, N.MaxPoolStep) and not producer.returns_indices:
                raise RelevanceError(f"LRP: node {name!r} indexes the output of max pooling {producer.name!r} "
                                     "without return_indices; indexing a pooled tensor needs x[:, ...]")
            step = N.GetItemStep(name, item)
            if item != 0:
                step.tensor_output = False  # the pooling's indices, the attention weights: no relevance
            return add(step, node, node.args[0])
        if not producer.tensor_output:
            raise RelevanceError(f"LRP: node {name!r} ({what}) indexes {producer.describe()}, which is not a tensor")
        index_nodes = []
        fx.node.map_arg(item, index_nodes.append)
        advanced = [a.name for a in index_nodes if steps[index[a]].tensor_output]
        entries = item if isinstance(item, tuple) else (item,)
        computed = [a.name for a in index_nodes if steps[index[a]].tensor_output
                    and not isinstance(steps[index[a]], N.ConstStep)]
        if computed:
            raise RelevanceError(f"LRP: node {name!r} indexes with a tensor computed from the input "
                                 f"({', '.join(computed)}): no relevance rule (each sample would select differently); "
                                 "constant index lists/tensors on non-batch dims (x[:, idx]) are supported")
        if advanced or any(isinstance(e, (list, tuple, bool, torch.Tensor)) for e in entries):
            # constant indices: the op copies elements (op table, COPY; the batch taken whole)
            return _linear_op_step(plan, node, index, add, ref, op_rules.ADVANCED_INDEX, eps, stabilizer)
        return add(N.IndexStep(name, ref((item,)), _load), node, node.args[0])

    # ---- softmax outside attention modules (attention written by hand): CP-LRP holds the weights
    # constant (a constant of the graph from here on: no relevance, a constant factor in products);
    # AttnLRP takes the softmax's Taylor step, R = x ⊙ Jᵀ(R/z): the generic linear rule
    if (not is_method and t in (F.softmax, torch.softmax)) or (is_method and t == "softmax"):
        if plan.attention == "cp":
            def per_sample(*a, _fn=_callable(node), **k):   # held constant, yet within each sample
                dims = op_rules._softmax_dims(a, k, a[0].dim())
                if dims is None or 0 in dims:   # (or a merged batch's rows: lrpfast/merged_batch.py)
                    raise RelevanceError(f"LRP: node {name!r} ({what}) normalises along the batch dimension (dim "
                                         "0, or none given): each sample's weights would depend on the others")
                return _fn(*a, **k)
            return add(N.ConstExprStep(name, per_sample, ref(node.args), ref(node.kwargs), _load,
                                       what + " (held constant: CP-LRP)"), node)
        return _linear_op_step(plan, node, index, add, ref, op_rules.SOFTMAX, eps, stabilizer)

    # ---- every other op linear in its computed inputs: one table entry each (lrpfast/op_rules.py)
    rule = op_rules.lookup(node.op, t)
    if rule is not None:
        return _linear_op_step(plan, node, index, add, ref, rule, eps, stabilizer)

    raise RelevanceError(f"LRP: node {name!r}{where(node)} calls {what}, which has no relevance rule. "
                         f"Supported: {SUPPORTED}")


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
