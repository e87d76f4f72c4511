"""BatchNorm canonization: eval-mode BatchNorm as a per-channel affine map, folded into the
Linear/Conv before it when it can be.

    fold(weight, bias, bn)     the weight and bias of "contraction, then bn" as one layer
    affine(bn)                 (scale, shift) with bn(x) = scale * x + shift per channel

Both read the module's parameters and running statistics and return new tensors: the user's
modules are never modified. `source_version(...)` stamps the tensors a result was computed from,
so that the engine recomputes it after the user changes the model (optimizer step,
load_state_dict).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from .ops import RelevanceError

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def check_batch_norm(name: str, bn: nn.Module) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise RelevanceError(
            f"LRP: node {name!r} ({type(bn).__name__}) has no running statistics (track_running_stats=False), "
            "so its eval-mode output depends on the batch; LRP needs a fixed per-channel affine map"
        )


def affine(bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each of shape (C,): bn(x) = scale * x + shift in eval mode."""
    with torch.no_grad():
        inv_std = torch.rsqrt(bn.running_var.detach() + bn.eps)
        scale = inv_std if bn.weight is None else bn.weight.detach() * inv_std
        shift = -bn.running_mean.detach() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.detach()
    return scale, shift


def fold(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of bn(contraction(x)): the output channel (dim 0 of the weight) scaled,
    the bias shifted. Computed in the weight's dtype."""
    scale, shift = affine(bn)
    with torch.no_grad():
        scale = scale.to(weight.dtype)
        w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        b = shift.to(weight.dtype) if bias is None else bias.detach() * scale + shift.to(weight.dtype)
    return w.contiguous(), b.contiguous()


def source_version(*tensors) -> tuple:
    """A stamp of the tensors a folded result depends on: it changes when one is modified in place
    (optimizer steps and load_state_dict bump `_version`) or replaced."""
    return tuple(None if t is None else (id(t), t._version) for t in tensors)


def bn_tensors(bn: nn.Module) -> tuple:
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var)
