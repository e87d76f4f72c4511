"""Conditions (zennit-crp's list of dicts, or one dict of K conditions) -> targets and masks.

Parsing happens before the forward (names and types); masks are built after it, when each
layer's output shape is known (channel ranges, mask shapes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..ops import RelevanceError
from .layers import OUTPUT

PREDICTED = None   # "y" absent: each sample's predicted class


@dataclass
class Conditions:
    k: int
    ys: List[object]                 # per condition: None (predicted), a tuple of classes, or a (B,) tensor
    layers: Dict[str, List[object]]  # name -> per condition: None (not conditioned there) or its spec


def _classes(v, where: str):
    if v is None:
        return PREDICTED
    if isinstance(v, bool):
        raise TypeError(f"CRP: {where} must be class indices, got a bool")
    if isinstance(v, int):
        return (v,)
    if isinstance(v, torch.Tensor):
        if v.dtype.is_floating_point or v.dtype == torch.bool or v.dtype.is_complex:
            raise TypeError(f"CRP: {where} must hold integer class indices, got dtype {v.dtype}")
        return tuple(int(c) for c in v.flatten().tolist())
    if isinstance(v, (list, tuple)) or hasattr(v, "__iter__"):
        out = []
        for c in v:
            if isinstance(c, bool) or not isinstance(c, int) and not (hasattr(c, "__index__")):
                raise TypeError(f"CRP: {where} must be class indices, got {c!r}")
            out.append(int(c))
        if not out:
            raise RelevanceError(f"CRP: {where} is empty; give at least one class (or leave 'y' out: the predicted "
                                 "class)")
        return tuple(out)
    if hasattr(v, "__index__"):
        return (int(v),)
    raise TypeError(f"CRP: {where} must be an int or a list of class indices, got {type(v).__name__}")


def _channel_spec(v, where: str):
    """A channel list (tuple of ints) or a mask tensor, as given for one condition."""
    if isinstance(v, torch.Tensor):
        if v.dtype.is_complex:
            raise TypeError(f"CRP: {where}: a mask must be real, got {v.dtype}")
        if v.dim() == 0:
            if v.dtype.is_floating_point or v.dtype == torch.bool:
                raise RelevanceError(f"CRP: {where}: a mask needs the channel dim (shape (C,) or (C, ...)), got a "
                                     "scalar")
            return (int(v),)
        if not (v.dtype.is_floating_point or v.dtype == torch.bool):
            return tuple(int(c) for c in v.flatten().tolist())   # integer tensors are channel indices
        return v
    if isinstance(v, bool):
        raise TypeError(f"CRP: {where} must be channel indices or a mask, got a bool")
    if isinstance(v, int) or (hasattr(v, "__index__") and not hasattr(v, "__iter__")):
        return (int(v),)
    if isinstance(v, (list, tuple, range)):
        if not len(v):
            raise RelevanceError(f"CRP: {where} lists no channels; give at least one, or leave the layer out")
        out = []
        for c in v:
            if isinstance(c, bool) or not hasattr(c, "__index__"):
                raise TypeError(f"CRP: {where} must be channel indices (ints) or a mask tensor, got {c!r}")
            out.append(int(c))
        return tuple(out)
    raise TypeError(f"CRP: {where} must be channel indices or a mask tensor, got {type(v).__name__}")


def parse(conditions) -> Conditions:
    if isinstance(conditions, dict):
        return _parse_batched(conditions)
    if not isinstance(conditions, (list, tuple)) or not conditions:
        raise TypeError("CRP: conditions must be a non-empty list of condition dicts ({'y': class, 'layer': "
                        f"channels}}) or one dict of K conditions, got {type(conditions).__name__}"
                        + (" (empty)" if isinstance(conditions, (list, tuple)) else ""))
    k = len(conditions)
    ys: List[object] = []
    layers: Dict[str, List[object]] = {}
    for n, cond in enumerate(conditions):
        if not isinstance(cond, dict):
            raise TypeError(f"CRP: condition {n} must be a dict {{'y': class, 'layer': channels}}, got "
                            f"{type(cond).__name__}")
        ys.append(_classes(cond.get(OUTPUT), f"condition {n}: 'y'"))
        for name, v in cond.items():
            if name == OUTPUT:
                continue
            if not isinstance(name, str):
                raise TypeError(f"CRP: condition {n}: layer names must be strings, got {name!r}")
            layers.setdefault(name, [None] * k)[n] = _channel_spec(v, f"condition {n}, layer {name!r}")
    return Conditions(k, ys, layers)


def _parse_batched(conditions: dict) -> Conditions:
    """{"y": int or K classes, layer: (K, C[, ...]) mask or K channel lists}."""
    k = None
    for name, v in conditions.items():
        if name == OUTPUT:
            continue
        n = v.shape[0] if isinstance(v, torch.Tensor) and v.dim() >= 2 else \
            len(v) if isinstance(v, (list, tuple)) and v and all(isinstance(e, (list, tuple, range)) for e in v) else None
        if n is None:
            k = 1 if k is None else k
            continue
        if k not in (None, 1, n) or n == 0:
            raise RelevanceError(f"CRP: conditions: layer {name!r} has {n} conditions, another layer {k}; give each "
                                 "layer one mask row (or channel list) per condition")
        k = n
    y = conditions.get(OUTPUT)
    if isinstance(y, torch.Tensor) and y.dim() == 1 and y.numel() > 1 and k in (None, 1):
        k = y.numel()   # only targets: K conditions of one class each
    k = k or 1
    if y is None or isinstance(y, int) or (isinstance(y, torch.Tensor) and y.dim() == 0):
        ys = [_classes(y, "'y'")] * k
    else:
        seq = list(y) if not isinstance(y, torch.Tensor) else list(y.unbind(0))
        if len(seq) != k:
            raise RelevanceError(f"CRP: conditions: 'y' has {len(seq)} entries for {k} conditions; give one class "
                                 "(list) per condition or a single int")
        ys = [_classes(v, f"'y'[{i}]") for i, v in enumerate(seq)]
    layers: Dict[str, List[object]] = {}
    for name, v in conditions.items():
        if name == OUTPUT:
            continue
        if not isinstance(name, str):
            raise TypeError(f"CRP: layer names must be strings, got {name!r}")
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            rows = list(v.unbind(0))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(e, (list, tuple, range)) for e in v):
            rows = list(v)
        else:
            rows = [v] * k
        layers[name] = [_channel_spec(r, f"condition {i}, layer {name!r}") for i, r in enumerate(rows)]
    return Conditions(k, ys, layers)


def build_mask(name: str, per_condition: Sequence[object], out_shape: Tuple[int, ...], dtype, device
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(1, K, *m) mask and (K,) bool 'conditioned here' for one layer whose output is
    (B, *out_shape): m = (C,) when every condition gives channels or (C,) masks, else out_shape."""
    if len(out_shape) == 0:
        raise RelevanceError(f"CRP: layer {name!r} outputs one value per sample (shape (B,)); it has no channels "
                             "to condition on")
    c = out_shape[0]
    k = len(per_condition)
    full = any(isinstance(v, torch.Tensor) and v.dim() > 1 for v in per_condition)
    mshape = tuple(out_shape) if full else (c,)
    mask = torch.ones((1, k, *mshape), dtype=dtype, device=device)
    has = torch.zeros(k, dtype=torch.bool, device=device)
    for i, v in enumerate(per_condition):
        if v is None:
            continue
        has[i] = True
        if isinstance(v, tuple):
            bad = [ch for ch in v if not -c <= ch < c]
            if bad:
                raise RelevanceError(f"CRP: condition {i}, layer {name!r}: channel {bad[0]} is out of range for the "
                                     f"layer's {c} channels (valid: 0..{c - 1}; output shape (B, "
                                     f"{', '.join(map(str, out_shape))}))")
            row = torch.zeros(c, dtype=dtype, device=device)
            row[list(v)] = 1
            mask[0, i] = row.view(c, *([1] * (len(mshape) - 1)))
        else:
            if v.dim() == 1:
                if v.shape[0] != c:
                    raise RelevanceError(f"CRP: condition {i}, layer {name!r}: a mask of shape {tuple(v.shape)} does "
                                         f"not fit the layer's {c} channels (output shape (B, "
                                         f"{', '.join(map(str, out_shape))})); expected ({c},) or "
                                         f"{tuple(out_shape)}, or (K, ...) for K conditions")
                mask[0, i] = v.to(dtype=dtype, device=device).view(c, *([1] * (len(mshape) - 1)))
            else:
                if tuple(v.shape) != tuple(out_shape):
                    raise RelevanceError(f"CRP: condition {i}, layer {name!r}: a mask of shape {tuple(v.shape)} does "
                                         f"not fit the layer's output (B, {', '.join(map(str, out_shape))}); expected "
                                         f"({c},) or {tuple(out_shape)}, or (K, ...) for K conditions")
                mask[0, i] = v.to(dtype=dtype, device=device)
            if not bool(torch.isfinite(mask[0, i]).all()):
                raise RelevanceError(f"CRP: condition {i}, layer {name!r}: the mask holds NaN or Inf")
    return mask, has
