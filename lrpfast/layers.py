"""Seed-compatible relevance layers: wrap a torch layer, run its forward, call `.relprop(r)`.

    from lrpfast import relLinear, relConv2d, relMaxPool2d, relReLU, Reshape

Each wrapper keeps the wrapped module (parameters shared, never copied), caches the input and
output of its last forward (no clone: it checks instead that nothing modified them in place)
and computes the relevance step through `lrpfast.ops` (extension or fallback). Unlike the seed:
every batch size is right, ReLU never runs in place, nothing is squeezed, sign(0) = +1, no
autograd graph is built by relprop, and `use_rho=True` is a proper z+ rule (denominator
recomputed with the clamped weights, conservative).

Per-call state: a layer keeps its last forward's input and output (and a max pool its indices)
until relprop reads them, so one layer instance serves one forward/relprop pair at a time. Do
not share a layer (or a model built from them) between threads that run concurrently: give each
thread its own copy (copy.deepcopy). A relprop whose forward was overwritten by another
thread's forward, before or during the relprop, raises a RelevanceError instead of returning
the other call's relevance.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .ops import DEFAULT_EPS, RelevanceError


# NaN/Inf are reported where they enter, not propagated in silence: ops.check_finite (one read)
# checks what comes from outside, and tensors these layers produce from checked ones are marked
# (with their version counter, so an in-place change by the user is checked again).
def _mark_finite(t: torch.Tensor) -> torch.Tensor:
    t._lrpfast_finite = t._version
    return t


def _check_finite(where: str, name: str, t: torch.Tensor) -> None:
    if getattr(t, "_lrpfast_finite", None) == t._version or not t.is_floating_point() or t.numel() == 0:
        return
    ops.check_finite(t, f"{where}: {name} contains NaN or Inf")


# Guards the forward cache of every layer (one lock for all: a lock per layer would not survive
# copy.deepcopy or pickling, and uncontended it costs well under a microsecond per call).
_STATE_LOCK = threading.Lock()


class _RelLayer(nn.Module):
    """Shared machinery: the wrapped module, ε and stabiliser, the forward cache.

    The cache is per-call state (see the module docstring): forward stores its input and output,
    relprop reads them. `_generation` counts forwards and `_thread_generation` remembers, per
    thread, the generation of that thread's last forward, so that relprop can tell when another
    thread's forward replaced the one it belongs to."""

    _wraps: tuple = ()

    def __init__(self, module: nn.Module, eps: float = DEFAULT_EPS, stabilizer: str = "sign"):
        super().__init__()
        name = type(self).__name__
        if self._wraps and not isinstance(module, self._wraps):
            expected = " or ".join(t.__name__ for t in self._wraps)
            raise TypeError(f"{name}: expected a {expected} module, got {type(module).__name__}")
        ops.check_stabilizer(name, eps, stabilizer)
        self.module = module
        self.eps = float(eps)
        self.stabilizer = stabilizer
        self.input: Optional[torch.Tensor] = None
        self.output: Optional[torch.Tensor] = None
        self._versions = (0, 0)
        self._generation = 0
        self._thread_generation: dict = {}

    # The seed's wrappers exposed the wrapped layer's parameters as their own.
    @property
    def weight(self):
        return self.module.weight

    @property
    def bias(self):
        return self.module.bias

    def _cache(self, x: torch.Tensor, z: torch.Tensor, **extra) -> None:
        _check_finite(f"{type(self).__name__}.forward", "the input", x)
        if torch.compiler.is_compiling():  # no lock or thread ids inside a traced graph
            self.input, self.output = x.detach(), z.detach()
            self._versions = (x._version, z._version)
            for k, v in extra.items():
                setattr(self, k, v)
        else:
            with _STATE_LOCK:
                self.input, self.output = x.detach(), z.detach()
                self._versions = (x._version, z._version)
                for k, v in extra.items():
                    setattr(self, k, v)
                self._generation += 1
                gens = self._thread_generation
                if len(gens) > 256:  # threads come and go: keep the map small
                    gens.clear()
                gens[threading.get_ident()] = self._generation
        _mark_finite(z)

    def _concurrent_forward(self, what: str) -> RelevanceError:
        return RelevanceError(
            f"{type(self).__name__}.relprop: another thread ran forward on this layer {what}; a layer holds its "
            "last forward's input and output (per-call state), so each thread needs its own copy (copy.deepcopy)"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped layer's forward, with its input and output kept for relprop."""
        z = self.module(x)
        self._cache(x, z)
        return z

    @torch.no_grad()
    def relprop(self, r: torch.Tensor, use_rho: bool = False) -> torch.Tensor:
        """Relevance at this layer's input from the relevance r at its output (of this thread's
        last forward: see the module docstring on threads). r may hold K maps per sample (K*B
        rows, sample-major); the result has as many rows."""
        if torch.compiler.is_compiling():
            return _mark_finite(self._relprop(r, use_rho))
        with _STATE_LOCK:
            start = self._generation
        out = self._relprop(r, use_rho)
        with _STATE_LOCK:
            if self._generation != start:
                raise self._concurrent_forward("while this relprop ran")
        return _mark_finite(out)

    def _relprop(self, r: torch.Tensor, use_rho: bool) -> torch.Tensor:
        raise NotImplementedError

    def _cached(self, r: torch.Tensor):
        name = type(self).__name__
        if not torch.compiler.is_compiling():
            with _STATE_LOCK:
                mine = self._thread_generation.get(threading.get_ident())
                if mine is not None and mine != self._generation:
                    raise self._concurrent_forward("after this thread's forward")
        if self.input is None:
            raise RelevanceError(f"{name}.relprop: called before forward; run the layer on an input first")
        if not isinstance(r, torch.Tensor):
            raise TypeError(f"{name}.relprop: r must be a torch.Tensor, got {type(r).__name__}")
        if (self.input._version, self.output._version) != self._versions:
            raise RelevanceError(
                f"{name}.relprop: the input or output of the last forward was modified in place since "
                "(an in-place ReLU after this layer?); use inplace=False"
            )
        if r.device != self.input.device or r.dtype != self.input.dtype:
            raise RelevanceError(
                f"{name}.relprop: r is {r.dtype} on {r.device}, expected {self.input.dtype} on "
                f"{self.input.device} like the forward input"
            )
        _check_finite(f"{name}.relprop", "r", r)
        return self.input, self.output

    def extra_repr(self) -> str:
        return f"eps={self.eps}, stabilizer={self.stabilizer!r}"


def _zplus(step, r, x, weight, bias, forward, eps, stabilizer):
    """z+ rule (= α1β0): z+ = x+ w+ + x- w- + b+, R = x+ ⊙ w+ᵀ s + x- ⊙ w-ᵀ s, s = r / stab(z+)."""
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    zp = forward(xp, wp, None if bias is None else bias.clamp(min=0)) + forward(xn, wn, None)
    return step(r, xp, zp, wp, eps, stabilizer) + step(r, xn, zp, wn, eps, stabilizer)


class relLinear(_RelLayer):
    """Linear layer with `.relprop(r, use_rho=False)` (ε rule; use_rho=True: z+ rule)."""

    _wraps = (nn.Linear,)

    def _relprop(self, r: torch.Tensor, use_rho: bool) -> torch.Tensor:
        x, z = self._cached(r)
        w = self.module.weight.detach()
        if use_rho:
            b = None if self.module.bias is None else self.module.bias.detach()
            step = lambda r_, x_, z_, w_, e, s: ops.linear_relprop(r_, x_, z_, w_, e, s, where="relLinear.relprop")  # noqa: E731
            return _zplus(step, r, x, w, b, F.linear, self.eps, self.stabilizer)
        return ops.linear_relprop(r, x, z, w, self.eps, self.stabilizer, where="relLinear.relprop")


class _relConv(_RelLayer):
    _wraps = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.module.padding_mode != "zeros":
            raise RelevanceError(
                f"{type(self).__name__}: padding_mode={self.module.padding_mode!r} is not supported; "
                "expected 'zeros'"
            )
        z = self.module(x)
        self._cache(x, z)
        return z

    def _relprop(self, r: torch.Tensor, use_rho: bool) -> torch.Tensor:
        x, z = self._cached(r)
        m = self.module
        where = f"{type(self).__name__}.relprop"

        def step(r_, x_, z_, w_, eps, stabilizer):
            return ops.conv_relprop(r_, x_, z_, w_, m.stride, m.padding, m.dilation, m.groups, eps, stabilizer,
                                    where=where)

        w = m.weight.detach()
        if use_rho:
            b = None if m.bias is None else m.bias.detach()
            fwd = lambda x_, w_, b_: m._conv_forward(x_, w_, b_)  # noqa: E731  (same geometry as the layer)
            return _zplus(step, r, x, w, b, fwd, self.eps, self.stabilizer)
        return step(r, x, z, w, self.eps, self.stabilizer)


class relConv1d(_relConv):
    """Conv1d with `.relprop(r, use_rho=False)`."""

    _wraps = (nn.Conv1d,)


class relConv2d(_relConv):
    """Conv2d with `.relprop(r, use_rho=False)` (stride, padding incl. 'same', dilation, groups)."""

    _wraps = (nn.Conv2d,)


class relConv3d(_relConv):
    """Conv3d with `.relprop(r, use_rho=False)`."""

    _wraps = (nn.Conv3d,)


_MAX_POOL = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}


class _relMaxPool(_RelLayer):
    _wraps = tuple(_MAX_POOL)

    def forward(self, x: torch.Tensor):
        m = self.module
        # Always keep the forward's indices: winner-take-all needs them, and recomputing them
        # (the seed's way) costs a second pooling pass.
        z, idx = _MAX_POOL[type(m)](x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)
        self._cache(x, z, indices=idx)
        return (z, idx) if m.return_indices else z

    def _relprop(self, r: torch.Tensor, use_rho: bool) -> torch.Tensor:
        x, _ = self._cached(r)
        m = self.module
        return ops.max_pool_relprop(r, self.indices, x.shape, where=f"{type(self).__name__}.relprop",
                                    kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                                    dilation=m.dilation)


class relMaxPool1d(_relMaxPool):
    _wraps = (nn.MaxPool1d,)


class relMaxPool2d(_relMaxPool):
    """MaxPool2d with `.relprop(r)`: winner-take-all by the forward's indices. Returns
    (output, indices) when the wrapped pool has return_indices=True, like the seed."""

    _wraps = (nn.MaxPool2d,)


class relMaxPool3d(_relMaxPool):
    _wraps = (nn.MaxPool3d,)


class relAvgPool2d(_RelLayer):
    """AvgPool1d/2d/3d with `.relprop(r)` (ε rule over each window)."""

    _wraps = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)

    def _relprop(self, r, use_rho: bool):
        x, z = self._cached(r)
        m = self.module
        return ops.avg_pool_relprop(r, x, z, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                                    getattr(m, "divisor_override", None), self.eps, self.stabilizer,
                                    where="relAvgPool.relprop")


class relAdaptiveAvgPool2d(_RelLayer):
    """AdaptiveAvgPool1d/2d/3d with `.relprop(r)`."""

    _wraps = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)

    def _relprop(self, r, use_rho: bool):
        x, z = self._cached(r)
        return ops.adaptive_avg_pool_relprop(r, x, z, self.eps, self.stabilizer, where="relAdaptiveAvgPool.relprop")


class relReLU(_RelLayer):
    """ReLU that passes relevance unchanged (LRP's rule for activations). Never in place, even
    when the wrapped nn.ReLU has inplace=True (that was the seed's bug B2)."""

    _wraps = (nn.ReLU,)

    def __init__(self, module: Optional[nn.Module] = None, eps: float = DEFAULT_EPS, stabilizer: str = "sign"):
        super().__init__(module if module is not None else nn.ReLU(), eps, stabilizer)

    def forward(self, x):
        z = torch.relu(x)
        self._cache(x, z)
        return z

    def _relprop(self, r, use_rho: bool):
        x, _ = self._cached(r)
        if r.shape[1:] != x.shape[1:]:
            raise RelevanceError(f"relReLU.relprop: r has shape {tuple(r.shape)}, expected (K*B, {tuple(x.shape[1:])})")
        return r


class Reshape(_RelLayer):
    """Flattens (B, ...) to (B, -1) in forward; relprop restores the input shape (per row, so K
    maps per sample work too)."""

    def __init__(self, *shape: int):
        super().__init__(nn.Identity())
        self.shape = shape

    def forward(self, x):
        z = x.reshape(x.shape[0], *(self.shape or (-1,)))
        self._cache(x, z)
        return z

    def _relprop(self, r, use_rho: bool):
        x, z = self._cached(r)
        if r.shape[1:] != z.shape[1:]:
            raise RelevanceError(f"Reshape.relprop: r has shape {tuple(r.shape)}, expected (K*B, {tuple(z.shape[1:])})")
        return r.reshape(r.shape[0], *x.shape[1:])

    def extra_repr(self) -> str:
        return f"shape={self.shape or (-1,)}"
