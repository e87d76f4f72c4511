"""Tracing with the input's shape known: for forwards whose Python branches on shapes.

torch.fx's symbolic tracing sees `x.shape[-1] % patch`, `if H != self.img_size:` or a padding
computed from the size as control flow on a Proxy and gives up, although for one input shape
every such branch is fixed. Here every Proxy carries an example value (a FakeTensor: shapes,
dtypes, no data), computed by running each traced call on the examples, and shape queries
(`.shape`, `.size()`, `.dim()`, `len()`, unpacking a tuple) answer with plain Python values.
Branches on shapes then resolve while tracing; a branch on data (`if x.sum() > 0`) still fails,
as it must. The graph holds the shapes as constants: it is valid for that input shape only, and
lrpfast.LRP keeps one plan per input shape (`LRP._plan_for`).
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

_SHAPE_ATTRS = ("shape", "ndim", "dtype", "device", "is_cuda", "layout")
_SHAPE_METHODS = ("size", "dim", "numel", "ndimension", "nelement")


def written(dst, method, *args, **kwargs):
    """dst after `dst.<method>(*args, **kwargs)` (an in-place write: `t[i] = v`, `t.masked_fill_(...)`),
    as a new tensor: dst itself is left as it was."""
    out = dst.clone()
    getattr(out, method)(*args, **kwargs)
    return out


# Tensors made from Python numbers alone (HF's `causal_mask = torch.full(...)`, `torch.arange(L)`)
# would be real tensors while tracing: ops on them run eagerly, and a later write of traced values
# into them (the padding mask) cannot be followed. While tracing for a shape they are traced too.
_FACTORIES = ("arange", "full", "ones", "zeros", "empty", "tensor", "eye", "linspace")


_LIKE = {torch.zeros_like: torch.zeros, torch.ones_like: torch.ones, torch.empty_like: torch.empty,
         torch.full_like: torch.full}


def _dtype_only(kind, target, args, kwargs):
    """A call that reads only the shape, dtype or device of a traced tensor (`mask.to(query)`,
    `y.type_as(x)`, `torch.zeros_like(x)`) is written with those as constants: its value does not
    depend on that tensor's data, so a mask cast to the query's dtype stays a constant of the graph."""
    if kind == "call_method" and target in ("to", "type_as") and len(args) >= 2:
        ex = _example(args[1])
        if isinstance(args[1], fx.Proxy) and isinstance(ex, torch.Tensor):
            if target == "type_as":
                return kind, "to", (args[0], ex.dtype), kwargs
            return kind, "to", (args[0], ex.device, ex.dtype, *args[2:]), kwargs
    if kind == "call_function" and target in _LIKE and args and isinstance(args[0], fx.Proxy):
        ex = _example(args[0])
        if isinstance(ex, torch.Tensor) and not kwargs.get("memory_format"):
            kw = {"dtype": ex.dtype, "device": ex.device, **kwargs}
            kw.pop("memory_format", None)
            return kind, _LIKE[target], (tuple(ex.shape), *args[1:]), kw
    return kind, target, args, kwargs


def _in_place(kind, target) -> Optional[str]:
    """The method name of an in-place write, or None."""
    if kind == "call_function" and target is operator.setitem:
        return "__setitem__"
    if kind == "call_method" and isinstance(target, str) and (
            target in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__")
            or (target.endswith("_") and not target.endswith("__"))):
        return target
    return None


_AUGMENTED = {"__iadd__": operator.add, "__isub__": operator.sub, "__imul__": operator.mul,
              "__itruediv__": operator.truediv}


def functional_call(method: str, args) -> tuple:
    """(kind, target, args) of the call computing the value an in-place `method` leaves in dst
    (args[0]): its out-of-place twin (x.add_(y) -> x.add(y), x += y -> x + y), or, for a write
    that keeps part of dst (t[i] = v, copy_, fill_), `written(dst, method, ...)`."""
    if method in _AUGMENTED:
        return "call_function", _AUGMENTED[method], tuple(args)
    twin = method[:-1]
    if method.endswith("_") and not method.endswith("__") and callable(getattr(torch.Tensor, twin, None)):
        return "call_method", twin, tuple(args)
    return "call_function", written, (args[0], method, *args[1:])


def functional_write(create, kind, target, args, kwargs, name=None, type_expr=None):
    """An in-place write on a traced tensor as a new value (functional_call, made by `create`); the
    Proxy written to then stands for it, so later uses of dst read it. Otherwise fx records a node
    without users, dropped as dead code, and later uses read dst unchanged (a graph that computes
    another function). Returns dst, now the new value, or None for no write."""
    method = _in_place(kind, target)
    if method is None or not args or not isinstance(args[0], fx.Proxy):
        return None
    dst = args[0]
    dst.node = create(*functional_call(method, args), kwargs, name, type_expr).node
    return dst   # (in-place ops return their tensor: x.mul_(3).div_(2) writes x twice)


def _example(v):
    return v.node.meta.get("example") if isinstance(v, fx.Proxy) else v


class ShapeProxy(fx.Proxy):
    """A Proxy whose shape questions are answered from its example value."""

    def _ex(self):
        node = self.__dict__.get("node")
        return None if node is None else node.meta.get("example")

    def __getattr__(self, k):
        if k in _SHAPE_ATTRS:
            ex = self._ex()
            if isinstance(ex, torch.Tensor):
                return getattr(ex, k)
        return super().__getattr__(k)

    def __setitem__(self, index, value):   # a write, made functional by the tracer's create_proxy
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})

    def __len__(self):
        ex = self._ex()
        if isinstance(ex, (torch.Tensor, tuple, list)):
            return len(ex)
        return super().__len__()

    def __iter__(self):
        ex = self._ex()
        if isinstance(ex, (tuple, list)) or (isinstance(ex, torch.Tensor) and ex.dim() > 0):
            return iter([self[i] for i in range(len(ex))])
        return super().__iter__()


class _unpatched_modules:
    """While fx traces, Module.__call__ and Module.__getattr__ are patched to record calls and
    hand out proxies for parameters; computing an example runs the real ones."""

    def __enter__(self):
        from torch.fx import _symbolic_trace as st
        M = torch.nn.Module
        self.saved = (M.__call__, M.__getattr__)
        M.__call__, M.__getattr__ = st._orig_module_call, st._orig_module_getattr

    def __exit__(self, *exc):
        torch.nn.Module.__call__, torch.nn.Module.__getattr__ = self.saved
        return False


def make_tracer(base: type, example: torch.Tensor):
    """A subclass of the tracer `base` that traces for `example`'s shape (module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class ShapeTracer(base):
        def __init__(self):
            super().__init__()
            self.mode = FakeTensorMode(allow_non_fake_inputs=True)
            self.fake_input = self.mode.from_tensor(example)
            self.placeholders = 0
            self.failures = []   # calls that gave no example (their shapes stay symbolic)
            self.evaluating = False
            self.writes = {}     # id(constant tensor) -> (it, the Proxy of its value after in-place writes)

        def proxy(self, node):
            return ShapeProxy(node, self)

        def trace(self, root, concrete_args=None):
            saved = {n: getattr(torch, n) for n in _FACTORIES}

            def traced(fn):
                def factory(*args, **kwargs):
                    if self.evaluating:   # an example being computed: the real function
                        return fn(*args, **kwargs)
                    return self.create_proxy("call_function", fn, args, kwargs)
                return factory

            try:
                for n, fn in saved.items():
                    setattr(torch, n, traced(fn))
                return super().trace(root, concrete_args)
            finally:
                for n, fn in saved.items():
                    setattr(torch, n, fn)

        def create_arg(self, a):
            if isinstance(a, torch.Tensor) and not isinstance(a, fx.Proxy):
                w = self.writes.get(id(a))
                if w is not None and w[0] is a:
                    return w[1].node   # a constant written with traced values: its traced version
            return super().create_arg(a)

        def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
            kind, target, args, kwargs = _dtype_only(kind, target, args, kwargs)
            method = _in_place(kind, target)
            if method is not None and args:
                # An in-place write (HF's padding mask: `causal_mask[..., :n] = causal_mask[..., :n]
                # .masked_fill(padding, min)` on a tensor made without the input) would be a node
                # without users, dropped as dead code, leaving the value of the traced call as a
                # constant. It becomes a new value (functional_call), and later uses of dst (its
                # Proxy, or the real tensor) read that value.
                dst = args[0]
                if isinstance(dst, fx.Proxy):
                    return functional_write(self.create_proxy, kind, target, args, kwargs, name, type_expr)
                p = self.create_proxy(*functional_call(method, args), kwargs, name, type_expr, proxy_factory_fn)
                if isinstance(dst, torch.Tensor):
                    self.writes[id(dst)] = (dst, p)
                return p
            p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
            value = self._evaluate(kind, target, args, kwargs, p)
            p.node.meta["example"] = value
            if value is not None and ((kind == "call_method" and target in _SHAPE_METHODS) or
                                      (kind == "call_function" and target is getattr and args[1] in _SHAPE_ATTRS)):
                return value   # a plain int / torch.Size: Python branches on it resolve now
            return p

        def _evaluate(self, kind, target, args, kwargs, proxy):
            if kind == "placeholder":
                self.placeholders += 1
                if self.placeholders == 1:
                    return self.fake_input
                return proxy.node.args[0] if proxy.node.args else None   # an optional argument's default
            if kind == "get_attr":   # read past fx's patched Module.__getattr__ (it makes proxies)
                value = self.root
                for part in target.split("."):
                    d = value.__dict__
                    for table in ("_parameters", "_buffers", "_modules"):
                        if part in d.get(table, {}):
                            value = d[table][part]
                            break
                    else:
                        value = d.get(part)
                return value
            a = fx.node.map_aggregate(args, _example)
            k = fx.node.map_aggregate(kwargs, _example)
            with _unpatched_modules(), self.mode, torch.no_grad():
                self.evaluating = True
                try:
                    if kind == "call_function":
                        return target(*a, **k)
                    if kind == "call_method":
                        return getattr(a[0], target)(*a[1:], **k)
                    if kind == "call_module":
                        # forward, not __call__: fx patches Module.__call__ while it traces
                        return self.root.get_submodule(target).forward(*a, **k)
                except Exception as exc:  # noqa: BLE001 (no example: shape questions on it fall back to fx's)
                    self.failures.append(f"{target}: {type(exc).__name__}: {exc}")
                    return None
                finally:
                    self.evaluating = False
            return None

    return ShapeTracer
