"""Planning the steps of function and method calls: sums, products, layout ops, indexing, and
the op table (lrpfast/op_rules.py) and derived rules (lrpfast/derived.py).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import derived, fusion, merged_repeat, op_rules, recurrent, stacking
from .. import nodes as N
from .. import transformer as T
from ..activations import FUNCTIONAL_ACTIVATIONS as _FUNCTIONAL_ACTIVATIONS
from ..activations import METHOD_ACTIVATIONS as _METHOD_ACTIVATIONS
from ..activations import RELU_FUNCTIONS as _RELU_FUNCTIONS
from ..ops import RelevanceError
from .layer_steps import _CONTRACTION_FUNCTIONS, _functional_batch_norm_step, _functional_contraction_step, _sdpa_step
from .node_args import (
    _bind,
    _callable,
    _constant,
    _constant_tensor,
    _load,
    _module_without_inplace,
    _no_inplace,
    _permutation,
    _Ref,
    _target_name,
    where,
)
from .trace import (
    _ADAPTIVE_AVG_FUNCTIONS,
    _AVGPOOL_FUNCTIONS,
    _CAT_FUNCTIONS,
    _IDENTITY_FUNCTIONS,
    _IDENTITY_METHODS,
    _LAYER_NORM_FUNCTIONS,
    _MAXPOOL_FUNCTIONS,
    _RESHAPE_FUNCTIONS,
    _RESHAPE_METHODS,
    _SDPA_FUNCTIONS,
    SUPPORTED,
)


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
    rule = op_rules.lookup(node.op, t, node.args)
    if rule is not None:
        return _linear_op_step(plan, node, index, add, ref, rule, eps, stabilizer)

    raise RelevanceError(f"LRP: node {name!r}{where(node)} calls {what}, which has no relevance rule. "
                         f"Supported: {SUPPORTED}")
