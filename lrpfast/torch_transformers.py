"""torch.nn's transformer modules for the tracer (lrpfast/graph/trace.py's _Tracer).

nn.TransformerEncoderLayer/Encoder and nn.TransformerDecoderLayer/Decoder branch on tensor
properties to choose a fused "fast path" (and the encoder may build nested tensors), which
torch.fx cannot trace. The tracer runs these functions instead: the modules' slow path, written
from their public sub-modules (self_attn, linear1, ..., the same in torch 2.11 and 2.14), so each
sub-layer is a node named by its module path. Masks reach nn.MultiheadAttention as given (bool
or float; it converts them as the modules' _canonical_mask does); is_causal is only a hint there.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn

from .activations import FUNCTIONAL_ACTIVATIONS, RELU_FUNCTIONS
from .ops import RelevanceError


def slow_path(m: nn.Module):
    """The slow-path forward to trace for m, or None (not one of these modules, or a subclass
    with its own forward)."""
    for cls, fn in ((nn.TransformerEncoderLayer, _encoder_layer), (nn.TransformerEncoder, _encoder),
                    (nn.TransformerDecoderLayer, _decoder_layer), (nn.TransformerDecoder, _decoder)):
        if isinstance(m, cls):
            # a subclass with its own forward is traced as written
            return fn if type(m).forward is cls.forward else None
    return None


def _named(tracer, name, target, *args):
    """A call_function node with a readable name (the layer's path), for explain().layers."""
    return tracer.create_proxy("call_function", target, args, {}, name=name)


def _prefix(tracer, m) -> str:
    return tracer.path_of_module(m).replace(".", "_")


def _attend(tracer, p, which, mha, dropout, q, kv, mask, padding, is_causal):
    out = mha(q, kv, kv, attn_mask=mask, key_padding_mask=padding, need_weights=False, is_causal=bool(is_causal))
    return dropout(_named(tracer, f"{p}_{which}_out", operator.getitem, out, 0))


def _feed_forward(tracer, p, m, x, dropout):
    h = m.linear1(x)
    act = m.activation
    if not isinstance(act, nn.Module) and any(act is f for f in (*RELU_FUNCTIONS, *FUNCTIONAL_ACTIVATIONS)):
        h = _named(tracer, f"{p}_activation", act, h)   # F.relu / F.gelu (activation="relu"/"gelu")
    else:
        h = act(h)  # a module (a node named by its path) or a function, traced as written
    return dropout(m.linear2(m.dropout(h)))


def _encoder_layer(tracer, m, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
    p = _prefix(tracer, m)

    def sa(x):
        return _attend(tracer, p, "self_attn", m.self_attn, m.dropout1, x, x, src_mask, src_key_padding_mask,
                       is_causal)

    x = src
    if m.norm_first:
        x = _named(tracer, f"{p}_residual1", operator.add, x, sa(m.norm1(x)))
        return _named(tracer, f"{p}_residual2", operator.add, x, _feed_forward(tracer, p, m, m.norm2(x), m.dropout2))
    x = m.norm1(_named(tracer, f"{p}_residual1", operator.add, x, sa(x)))
    return m.norm2(_named(tracer, f"{p}_residual2", operator.add, x, _feed_forward(tracer, p, m, x, m.dropout2)))


def _encoder(tracer, m, src, mask=None, src_key_padding_mask=None, is_causal=None):
    out = src
    for layer in m.layers:
        out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
    if getattr(m, "use_nested_tensor", False) and src_key_padding_mask is not None and mask is None:
        fn = _nested_padding(m)
        out = _named(tracer, f"{_prefix(tracer, m)}_padding", fn, out, src_key_padding_mask)
        fn.node_name = out.node.name   # for its error message
    if m.norm is not None:
        out = m.norm(out)
    return out


def _nested_padding(m: nn.TransformerEncoder):
    """In eval mode without autograd (as LRP runs it) TransformerEncoder's forward packs the
    unpadded tokens into a nested tensor and unpacks the output with zeros at the padded ones.
    The other tokens are the slow path's (their attention ignores padded keys either way): this
    function zeroes the padded tokens under the module's own conditions. A pass step (f(x) = x
    or 0): the padded tokens receive no relevance."""

    def nested_padding(x, padding):
        keep = padding.logical_not()   # bool: True = padding; float: 0 = attend (as the module reads it)
        mask_check = getattr(m, "mask_check", True)
        if not torch.backends.mha.get_fastpath_enabled() or m.layers[0].training or x.dim() != 3 \
                or (mask_check and torch.compiler.is_compiling()) or torch.is_autocast_enabled() \
                or x.device.type not in ("cpu", "cuda", "xpu") or keep.dim() != 2:
            return x
        if not torch._nested_tensor_from_mask_left_aligned(x, keep):
            if mask_check:
                return x   # the module checks this too, and takes the slow path
            raise RelevanceError(f"LRP: node {nested_padding.node_name!r} (TransformerEncoder padding): "
                                 "src_key_padding_mask is not left-aligned (padding only at the end) and "
                                 "mask_check=False: the module's nested-tensor path misplaces tokens. Build it "
                                 "with enable_nested_tensor=False")
        return x.masked_fill(keep.logical_not().unsqueeze(-1), 0)

    nested_padding.lrpfast_nested_padding = True
    return nested_padding


def _decoder_layer(tracer, m, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                   memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
    p = _prefix(tracer, m)

    def sa(x):
        return _attend(tracer, p, "self_attn", m.self_attn, m.dropout1, x, x, tgt_mask, tgt_key_padding_mask,
                       tgt_is_causal)

    def ca(x):
        return _attend(tracer, p, "multihead_attn", m.multihead_attn, m.dropout2, x, memory, memory_mask,
                       memory_key_padding_mask, memory_is_causal)

    x = tgt
    if m.norm_first:
        x = _named(tracer, f"{p}_residual1", operator.add, x, sa(m.norm1(x)))
        x = _named(tracer, f"{p}_residual2", operator.add, x, ca(m.norm2(x)))
        return _named(tracer, f"{p}_residual3", operator.add, x, _feed_forward(tracer, p, m, m.norm3(x), m.dropout3))
    x = m.norm1(_named(tracer, f"{p}_residual1", operator.add, x, sa(x)))
    x = m.norm2(_named(tracer, f"{p}_residual2", operator.add, x, ca(x)))
    return m.norm3(_named(tracer, f"{p}_residual3", operator.add, x, _feed_forward(tracer, p, m, x, m.dropout3)))


def _decoder(tracer, m, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
             memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
    out = tgt
    for layer in m.layers:
        out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                    memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=bool(tgt_is_causal),
                    memory_is_causal=bool(memory_is_causal))
    if m.norm is not None:
        out = m.norm(out)
    return out
