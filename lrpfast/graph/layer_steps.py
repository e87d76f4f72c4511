"""Planning the steps of layers and their functional twins: Linear/Conv, BatchNorm, pooling,
activations, LayerNorm, attention (nn.MultiheadAttention, SDPA), LSTM/GRU.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import canonize, op_rules, recurrent
from .. import layers as rel_layers
from .. import nodes as N
from .. import transformer as T
from ..activations import ACTIVATIONS as _ACTIVATIONS
from ..ops import RelevanceError
from .node_args import (
    _bind,
    _constant,
    _constant_tensor,
    _load,
    _loader,
    _module_path,
    _module_without_inplace,
    _Ref,
    _target_name,
    ref_args,
    where,
)
from .trace import _ADAPTIVE_AVG, _ADAPTIVE_MAX, _AVGPOOL, _CONV, _DROPOUT, _MAXPOOL, SUPPORTED


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
    # enable_gqa=True: query heads share key/value heads (grouped-query attention)
    kind = T.GroupedQueryAttentionStep if _constant(node, "enable_gqa", b["enable_gqa"]) else \
        T.ScaledDotProductAttentionStep
    step = kind(node.name, _loader(fixed), _constant(node, "is_causal", b["is_causal"]),
                _constant(node, "scale", b["scale"]), eps, stabilizer, plan.attention)
    add(step, node, b["value"])
    step.value_src = step.src
    step.query_src, step.key_src = fixed["query"].i, fixed["key"].i
    if plan.attention == "attnlrp":
        step.inputs = list(dict.fromkeys([step.query_src, step.key_src, step.value_src]))
    return step


_CONTRACTION_FUNCTIONS = {F.linear: 0, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


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
