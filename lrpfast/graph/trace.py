"""Tracing: the model as a torch.fx graph in which every layer with a rule is one node, the
op kinds the planner recognises, and a guard that leaves the user's model as it was.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import canonize, recurrent, shape_trace
from .. import layers as rel_layers
from ..activations import ACTIVATIONS as _ACTIVATIONS
from ..ops import RelevanceError
from ..torch_transformers import slow_path as _slow_path

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
             "dims, stack, expand, repeat, pad, roll, flip, interpolate, casts, masked_fill, torch.where, max/min over a dim, addcmul "
             "(one computed factor), matmul/einsum (one or two "
             "computed factors), softmax (CP: constant; AttnLRP: its Taylor step), torch.unbind, GroupNorm, RMSNorm, "
             "F.normalize (σ constant), nn.Upsample/Softmax/padding modules; in-place ops on computed tensors "
             "(x.add_(y), x *= c, x.relu_(): as their out-of-place twins; t[:, i] = v, t.copy_(v), t.fill_(c): "
             "elements copied)")

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

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        # an in-place op on a traced tensor (x.add_(pos), x.mul_(2)): the new value, for every later use
        p = shape_trace.functional_write(self.create_proxy, kind, target, args, kwargs, name, type_expr)
        if p is not None:
            return p
        return super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)

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
