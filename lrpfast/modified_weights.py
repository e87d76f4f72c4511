"""Modified weights of the LRP rules (w+, w-, w + γw+, their concatenations), computed once per layer
and parameter version, not on every call.

The cache is keyed by the layer's module (weakly: it goes with the module) and, per entry, by a
stamp of the tensors it was computed from: data_ptr, `_version` (bumped by every in-place change
made through autograd-visible ops: optimizer steps, `load_state_dict`, `with no_grad(): w.mul_()`),
dtype, device and shape. The entry holds those tensors, so their memory cannot be reused by other
tensors while the stamp is alive (a freed-and-reused address would otherwise look unchanged).
Not seen: writes through `param.data` (a separate version counter); call `clear()` after those.

Inside torch.compile there is no cache: `cached` just builds, so the modified weights are computed
in the graph on every call. The stamp cannot be traced (`_version` and `data_ptr` of a traced
tensor are not known at trace time: `_version` becomes an unbacked symbol and a comparison on it
fails with fullgraph=True), and a hit decided at trace time would tie the graph to the tensors
cached then, stale after an in-place change of the parameter (dynamo does not guard on
`_version`, so nothing recompiles). The parameters are graph inputs, so building in the graph is
correct for every call; it costs an elementwise pass over the weights (and, for z^B, flat and w²,
a one-row forward), small next to the layer's contractions. Eager calls keep the cache.

Concatenations ("paired" channels, csrc/rule_args.h) follow the channel groups of the layer:
    out_pair(a, b)  (2·O, C/g, ...)   per group: a's output channels, then b's
    in_pair(a, b)   (O, 2·C/g, ...)   per group: a's input channels, then b's
    quad(a, b)      (2·O, 2·C/g, ...) [[a, b], [b, a]]: output branch × input branch
"""
from __future__ import annotations

import weakref
from typing import Callable, Hashable, Optional

import torch

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _stamp(t: Optional[torch.Tensor]):
    if t is None:
        return None
    return (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))


def cached(module, key: Hashable, tensors, build: Callable[[], object]):
    """build() once per (module, key) and version of `tensors`; recomputed when one changes.
    While torch.compile traces: build() every time (see the module docstring)."""
    if torch.compiler.is_compiling():
        return build()
    try:
        stamp = tuple(_stamp(t) for t in tensors)
        store = _CACHE.get(module)
        if store is None:
            store = _CACHE[module] = {}
    except (RuntimeError, TypeError):  # inference tensors (no version counter), odd modules
        return build()
    hit = store.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[2]
    value = build()
    store[key] = (stamp, tuple(tensors), value)
    return value


def clear(module=None) -> None:
    """Drop the cached weights of `module` (all modules when None)."""
    if module is None:
        _CACHE.clear()
    else:
        _CACHE.pop(module, None)


def cache_size(module) -> int:
    """Entries cached for `module` (tests, diagnostics)."""
    return len(_CACHE.get(module, {}))


# ----------------------------------------------------------------------------- concatenations


def out_pair(a: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    o = a.shape[0]
    rest = a.shape[1:]
    return torch.cat([a.reshape(groups, o // groups, *rest), b.reshape(groups, o // groups, *rest)], 1).reshape(
        2 * o, *rest)


def in_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, b], 1)


def quad(a: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    return out_pair(in_pair(a, b), in_pair(b, a), groups)


def positive(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.clamp(min=0)


def negative(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.clamp(max=0)
