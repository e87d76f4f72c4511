"""The explained rows first: a gather of one row per sample moved down the graph, through every op
that treats the rows independently.

A causal LM is explained at one position per sample: the explained function ends in
`logits.gather(1, P.expand(-1, -1, V))` (lrpfast/hf.py, P a buffer of one position per sample). The
LM head, the final norm and the last block's MLP, norm and output projection all act on each
position alone, so selecting the row first gives the same values row for row:

    gather(f(h), d, P) = f(gather(h, d, P))       for f row-wise along d

and the same relevance: every rule of a row-wise op is row-local, and the rows the gather drops get
no relevance either way. Those layers then run on B rows instead of B·L, in the forward and in the
relevance pass. The gather stops where an op mixes rows (attention, a reshape across d) or where a
tensor is also read by ops that need every row (the residual stream entering the last block's
attention); it is inserted there, once per such tensor.

Row-wise ops (by the traced shapes, node.meta["example"] from lrpfast/shape_trace.py):
- nn.Linear, LayerNorm/RMSNorm/GroupNorm-free norms over the last dim only, activation and
  dropout modules;
- elementwise functions and methods (sums, products, quotients, powers, casts, activations), each
  operand either carrying the rows (it is gathered too) or broadcast along d (a weight, a
  per-sample scalar);
- mean/sum over dims other than d with keepdim=True;
- slicing that keeps dim d whole (HF's `hidden[:, slice(0, None), :]`).
Anything else ends the region. Without traced shapes (a shape-agnostic trace) only the LM head
moves (the form with the Linear's own in_features).
"""
from __future__ import annotations

import operator
from typing import Dict, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..activations import ACTIVATIONS as _ACTIVATION_MODULES

_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.neg, torch.pow,
    torch.rsqrt, torch.sqrt, torch.exp, torch.log, torch.tanh, torch.sigmoid, torch.relu, torch.square,
    torch.abs, torch.erf, torch.reciprocal,
    F.relu, F.gelu, F.silu, F.mish, F.tanh, F.sigmoid, F.softplus, F.leaky_relu, F.elu, F.hardswish,
    F.dropout,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "true_divide", "neg", "pow", "rsqrt", "sqrt", "exp", "log", "tanh", "sigmoid",
    "relu", "square", "abs", "erf", "reciprocal",
    "to", "float", "double", "half", "bfloat16", "type_as", "contiguous", "clone",
}
_REDUCTIONS = {torch.mean, torch.sum, "mean", "sum"}
# (PReLU's weight runs along dim 1: a per-row factor where dim 1 is the sequence)
_ROW_MODULES = (nn.Linear, nn.Dropout, nn.Identity, *(m for m in _ACTIVATION_MODULES if m is not nn.PReLU))


def _example(node) -> Optional[torch.Tensor]:
    v = node.meta.get("example") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


class _Rows:
    """The gather: dim d, the position buffer P (its size at d: rows kept per sample), the row count
    L of the tensors it selects from."""

    def __init__(self, gm, g: fx.Node):
        self.ok = False
        if not (g.op in ("call_method", "call_function") and g.target in ("gather", torch.gather)
                and len(g.args) == 3 and not g.kwargs):
            return
        src, dim, idx = g.args
        if not (isinstance(src, fx.Node) and isinstance(dim, int) and isinstance(idx, fx.Node)
                and idx.op == "call_method" and idx.target == "expand" and not idx.kwargs and len(idx.args) >= 3
                and all(type(a) is int for a in idx.args[1:])):
            return
        p = idx.args[0]
        if not (isinstance(p, fx.Node) and p.op == "get_attr"):
            return
        buf = gm
        for part in p.target.split("."):
            buf = getattr(buf, part, None)
        ndim = len(idx.args) - 1
        if not isinstance(buf, torch.Tensor) or buf.dim() != ndim or buf.shape[-1] != 1 or dim % ndim == ndim - 1:
            return
        self.g, self.src, self.idx, self.p, self.buf = g, src, idx, p, buf
        self.ndim, self.d = ndim, dim % ndim
        self.sizes = list(idx.args[1:])   # the expand's sizes: -1 (P's own) but the last
        ex = _example(src)
        self.rows = ex.shape[self.d] if ex is not None and ex.dim() == ndim else None
        self.ok = True

    def carries(self, t: torch.Tensor) -> Optional[bool]:
        """True: t has the rows (gather it too); False: t is broadcast along d (use it as it is);
        None: neither (t has the rows at another rank, or other leading sizes than P: not moved)."""
        k = t.dim()
        at = self.d - (self.ndim - k)
        if at < 0 or t.shape[at] == 1:
            return False
        if k != self.ndim or t.shape[at] != self.rows:
            return None
        for j in range(k - 1):
            if j != self.d and (self.buf.shape[j] if self.sizes[j] == -1 else self.sizes[j]) != t.shape[j]:
                return None   # the gather would read other positions of dim j than t has
        return True


def _reduced_dims(node: fx.Node) -> Optional[tuple]:
    args = list(node.args[1:])   # (x, dim, keepdim) for the function and the method alike
    dim = node.kwargs.get("dim", args[0] if args else None)
    keep = node.kwargs.get("keepdim", args[1] if len(args) > 1 else False)
    if dim is None or keep is not True:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim) if isinstance(dim, (tuple, list)) else None
    return dims if dims is not None and all(type(x) is int for x in dims) else None


def _full_slices(node: fx.Node, rows: _Rows) -> bool:
    """x[i0, i1, ...] with slices only, the ones up to dim d whole."""
    index = node.args[1] if len(node.args) == 2 else None
    index = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, slice) for i in index):
        return False
    for i in index[:rows.d + 1]:
        if i.start not in (None, 0) or i.stop is not None or i.step not in (None, 1):
            return False
    return True


def _row_wise(gm, node: fx.Node, rows: _Rows) -> bool:
    """node acts on each row along d alone (module docstring), judged by its traced shapes."""
    out = _example(node)
    if out is None or out.dim() != rows.ndim or out.shape[rows.d] != rows.rows:
        return False
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.LayerNorm):
            row = len(m.normalized_shape) == 1
        elif isinstance(m, getattr(nn, "RMSNorm", ())):
            row = len(m.normalized_shape) == 1
        else:
            row = isinstance(m, _ROW_MODULES) and type(m).forward in {c.forward for c in _ROW_MODULES}
        return row and len(node.args) == 1 and not node.kwargs
    if node.op not in ("call_function", "call_method"):
        return False
    t = node.target
    if t in _ELEMENTWISE_FUNCTIONS or t in _ELEMENTWISE_METHODS:
        pass
    elif t in _REDUCTIONS:
        # keepdim=True, so a reduction over d itself has size 1 there and failed the shape test above
        if _reduced_dims(node) is None:
            return False
    elif t is operator.getitem:
        if not _full_slices(node, rows):
            return False
    else:
        return False
    ok = [True]

    def check(a):
        ex = _example(a)
        if ex is None or rows.carries(ex) is None:
            ok[0] = False
        return a

    fx.node.map_arg((node.args, node.kwargs), check)
    return ok[0]


def sink_row_gather(gm: fx.GraphModule) -> bool:
    """Move each row gather of the explained output (module docstring) as far down as rows stay
    independent. Returns whether the graph changed."""
    changed = False
    for g in list(gm.graph.nodes):
        rows = _Rows(gm, g)
        if rows.ok and _sink(gm, rows):
            changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return changed


def _sink(gm: fx.GraphModule, rows: _Rows) -> bool:
    graph, g = gm.graph, rows.g
    order = {n: i for i, n in enumerate(graph.nodes)}
    region = set()
    if rows.rows is not None:
        # reverse graph order: a node's users are decided before it
        for n in sorted((n for n in graph.nodes if order[n] < order[g]), key=order.get, reverse=True):
            users = set(n.users)
            if n is rows.src:
                users.discard(g)
            elif not users:
                continue
            if users <= region and _row_wise(gm, n, rows):
                region.add(n)
        if rows.src not in region:
            region = set()
    if not region:
        return _head_only(gm, rows)
    new: Dict[fx.Node, fx.Node] = {}
    gathered: Dict[fx.Node, fx.Node] = {}

    def gather_of(a: fx.Node) -> fx.Node:
        if a not in gathered:
            idx = graph.call_method("expand", (rows.p, *rows.sizes[:-1], _example(a).shape[-1]))
            gathered[a] = graph.create_node(g.op, g.target, (a, rows.d, idx), {}, name=a.name + "_rows")
            gathered[a].meta = _narrowed(a.meta, rows)
        return gathered[a]

    def mapped(a):
        if a in new:
            return new[a]
        return gather_of(a) if rows.carries(_example(a)) else a

    with graph.inserting_before(g):
        for n in sorted(region, key=order.get):
            args = fx.node.map_arg(n.args, mapped)
            kwargs = fx.node.map_arg(n.kwargs, mapped)
            m = graph.create_node(n.op, n.target, args, kwargs, name=n.name + "_rows")
            m.meta = _narrowed(n.meta, rows)
            new[n] = m
    g.replace_all_uses_with(new[rows.src])
    graph.erase_node(g)
    if not rows.idx.users:
        graph.erase_node(rows.idx)
    for n in sorted(region, key=order.get, reverse=True):
        graph.erase_node(n)
    return True


def _narrowed(meta: dict, rows: _Rows) -> dict:
    """A node's meta for its gathered twin: its traced example narrowed to the kept rows."""
    meta = dict(meta)
    ex = meta.get("example")
    if isinstance(ex, torch.Tensor) and ex.dim() == rows.ndim:
        meta["example"] = ex.narrow(rows.d, 0, rows.buf.shape[rows.d])
    return meta


def _head_only(gm: fx.GraphModule, rows: _Rows) -> bool:
    """Without traced shapes: gather(linear(h)) -> linear(gather(h)) for an nn.Linear read by the
    gather alone (its in_features give the expand's last size)."""
    g, lin = rows.g, rows.src
    if not (lin.op == "call_module" and len(lin.users) == 1 and len(lin.args) == 1 and not lin.kwargs):
        return False
    m = gm.get_submodule(lin.target)
    if type(m) is not nn.Linear or rows.sizes[-1] != m.out_features:
        return False
    graph = gm.graph
    with graph.inserting_before(g):
        idx2 = graph.call_method("expand", (rows.p, *rows.sizes[:-1], m.in_features))
        g2 = graph.create_node(g.op, g.target, (lin.args[0], rows.d, idx2), {}, name=g.name + "_rows")
    g2.meta = dict(g.meta)
    g2.append(lin)         # the layer (its node and name kept) now reads the gathered rows
    lin.args = (g2,)
    g.replace_all_uses_with(lin)
    graph.erase_node(g)
    graph.erase_node(rows.idx)
    return True
