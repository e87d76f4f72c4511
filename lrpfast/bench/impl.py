"""What a benchmark builder takes (a Workload) and returns (an Impl, or Skip with the reason):
shared by implementations.py (lrpfast, the seed, the floor) and peers.py (zennit, captum), which
both build on it and so need no import of each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict

import torch
import torch.nn as nn


class Skip(Exception):
    """This implementation does not apply to this workload; the message says why."""


@dataclass
class Workload:
    model_name: str
    model: nn.Module  # eval mode, benchmark dtype and device; shared, never modified
    x: torch.Tensor
    target: torch.Tensor  # (B,) int64
    composite: str  # "epsilon" or a zennit composite name
    eps: float = 1e-6
    stabilizer: str = "sign"
    init: str = "logit"  # initial relevance: target logit ("logit") or 1 ("onehot") at the target
    params: Dict[str, float] = field(default_factory=dict)  # composite parameters (low, high, gamma)


@dataclass
class Impl:
    name: str
    call: Callable[[], torch.Tensor]
    note: str = ""
    close: Callable[[], None] = lambda: None
    is_relevance: bool = True  # False for the floor: a gradient, compared with the float64 gradient


def initial_relevance(logits: torch.Tensor, target: torch.Tensor, init: str) -> torch.Tensor:
    """The relevance at the output: one-hot at the target, times the logit for init="logit"."""
    onehot = torch.zeros_like(logits).scatter_(1, target.view(-1, 1), 1)
    return onehot * logits if init == "logit" else onehot
