"""Reading an fx node's arguments at plan time: references to other steps, constants, bound
signatures, in-place variants.
"""
from __future__ import annotations

import inspect

import torch
import torch.fx as fx
import torch.nn as nn

from .. import nodes as N
from ..ops import RelevanceError

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
