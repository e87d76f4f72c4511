"""Faithfulness of relevance maps: pixel flipping (region perturbation) and its AOPC, and an
`explain_func` for Quantus.

    res = lrpfast.pixel_flipping(model, x, relevance, target, patch_size=4, steps=49)
    res.scores        # (B, steps + 1): the target's score as more regions are perturbed
    res.aopc          # (B,): mean over steps of score[0] - score[k]; higher = more faithful (MoRF)
    lrpfast.compare_rules(model, x, ["epsilon", "epsilon_plus_flat"])   # mean AOPC per composite

Region perturbation (Samek et al. 2017, "Evaluating the visualization of what a deep neural
network has learned"): the input is cut into patch_size regions; regions are perturbed in order of
their summed relevance, most relevant first ("morf"), least relevant first ("lerf") or in random
order ("random", the baseline a rule should beat); after every step the model scores the target.
All B·(steps + 1) perturbed inputs are built and scored in batches on x's device.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from .ops import RelevanceError

ORDERS = ("morf", "lerf", "random")
SCORES = ("logit", "softmax", "log_softmax")
PERTURBATIONS = ("zero", "mean", "uniform", "gaussian")


@dataclass
class PixelFlippingResult:
    """fractions (steps + 1,): share of the regions perturbed at each point of the curve;
    scores (B, steps + 1): the target's score there; aopc (B,): mean of scores[:, :1] - scores."""

    fractions: torch.Tensor
    scores: torch.Tensor
    aopc: torch.Tensor

    @property
    def curve(self) -> torch.Tensor:
        """The mean score over the samples at each step."""
        return self.scores.mean(0)


def aopc(scores: torch.Tensor) -> torch.Tensor:
    """Area over the perturbation curve, per sample: (1 / (L + 1)) Σ_k (f(x⁽⁰⁾) − f(x⁽ᵏ⁾)) for
    scores (B, L + 1) whose first column is the unperturbed input."""
    return (scores[:, :1] - scores).mean(1)


def _region_ids(spatial: Sequence[int], patch: Sequence[int], device) -> "tuple[torch.Tensor, int]":
    """Region id of every spatial position (regions are patch-sized blocks; border blocks may be
    smaller) and the number of regions."""
    counts = [math.ceil(s / p) for s, p in zip(spatial, patch)]
    ids = torch.zeros(spatial, dtype=torch.long, device=device)
    stride = 1
    for d in reversed(range(len(spatial))):
        coord = torch.arange(spatial[d], device=device) // patch[d]
        shape = [1] * len(spatial)
        shape[d] = spatial[d]
        ids = ids + coord.view(shape) * stride
        stride *= counts[d]
    return ids, stride


def _baseline(x: torch.Tensor, perturbation, generator) -> torch.Tensor:
    """What a perturbed region is replaced with (x's shape). Random baselines are drawn once per
    sample, so the curve perturbs a growing set of regions of one fixed replacement image."""
    if callable(perturbation):
        base = perturbation(x)
    elif isinstance(perturbation, torch.Tensor):
        base = perturbation.to(x)
    elif isinstance(perturbation, (int, float)) and not isinstance(perturbation, bool):
        base = torch.full_like(x, float(perturbation))
    elif perturbation == "zero":
        base = torch.zeros_like(x)
    elif perturbation == "mean":  # per sample and channel
        base = x.mean(dim=tuple(range(2, x.dim())), keepdim=True).expand_as(x)
    elif perturbation in ("uniform", "gaussian"):
        dims = tuple(range(1, x.dim()))
        if perturbation == "uniform":  # within each sample's value range
            lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
            base = lo + (hi - lo) * noise
        else:  # with each sample's mean and std
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
            base = x.mean(dim=dims, keepdim=True) + x.std(dim=dims, keepdim=True) * noise
    else:
        raise RelevanceError(f"pixel_flipping: perturbation must be one of {PERTURBATIONS}, a number, a tensor or "
                             f"a callable, got {perturbation!r}")
    try:
        return torch.broadcast_to(base, x.shape)
    except RuntimeError:
        raise RelevanceError(f"pixel_flipping: the perturbation baseline has shape {tuple(base.shape)}, not "
                             f"broadcastable to x {tuple(x.shape)}") from None


def _score(logits: torch.Tensor, t: torch.Tensor, score: str) -> torch.Tensor:
    if score == "softmax":
        logits = logits.softmax(1)
    elif score == "log_softmax":
        logits = logits.log_softmax(1)
    return logits.gather(1, t[:, None])[:, 0]


@torch.no_grad()
def pixel_flipping(model: nn.Module, x: torch.Tensor, relevance: torch.Tensor, target=None, *,
                   patch_size: Union[int, Sequence[int]] = 1, steps: Optional[int] = None,
                   order: str = "morf", perturbation="zero", score: str = "logit", batch_size: int = 256,
                   seed: int = 0) -> PixelFlippingResult:
    """Region-perturbation curve of `relevance` (x's shape, or with the channel axis summed:
    (B, 1, ...) or (B, ...spatial)) for `model` on x (B, C, ...spatial).

    target: None (the model's argmax on x), an int, or (B,) indices. steps: points after the
    first (default: every region, at most 100). perturbation: "zero", "mean" (per channel),
    "uniform" (noise in the sample's range), "gaussian", a number, a tensor or callable(x).
    score: "logit", "softmax" or "log_softmax" of the target. seed: random order / noise."""
    if order not in ORDERS:
        raise RelevanceError(f"pixel_flipping: order must be one of {ORDERS}, got {order!r}")
    if score not in SCORES:
        raise RelevanceError(f"pixel_flipping: score must be one of {SCORES}, got {score!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        raise RelevanceError(f"pixel_flipping: x must be a (B, C, ...spatial) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    b, spatial = x.shape[0], tuple(x.shape[2:])
    r = torch.as_tensor(relevance).to(device=x.device, dtype=torch.float64)
    if r.shape[0] != b or tuple(r.shape[-len(spatial):]) != spatial or r.dim() not in (len(spatial) + 1, len(spatial) + 2):
        raise RelevanceError(f"pixel_flipping: relevance has shape {tuple(r.shape)}, expected {tuple(x.shape)} "
                             f"or (B, 1, ...) / (B, ...) with the spatial size {spatial}")
    # NaN/Inf would make the region order arbitrary (sorting them) and the curve meaningless
    for name, t in (("relevance", r), ("x", x)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RelevanceError(f"pixel_flipping: {name} contains NaN or Inf")
    if r.dim() == len(spatial) + 2:
        r = r.sum(1)
    patch = [int(patch_size)] * len(spatial) if isinstance(patch_size, int) else [int(p) for p in patch_size]
    if len(patch) != len(spatial) or min(patch) < 1:
        raise RelevanceError(f"pixel_flipping: patch_size must be a positive int or {len(spatial)} of them, got {patch_size!r}")
    if batch_size < 1:
        raise RelevanceError(f"pixel_flipping: batch_size must be >= 1, got {batch_size}")

    ids, n_regions = _region_ids(spatial, patch, x.device)
    region_r = torch.zeros(b, n_regions, dtype=torch.float64, device=x.device)
    region_r.scatter_add_(1, ids.flatten().expand(b, -1), r.reshape(b, -1))
    g = torch.Generator().manual_seed(seed)
    if order == "random":
        key = torch.rand(b, n_regions, generator=g, dtype=torch.float64).to(x.device)
    else:
        key = -region_r if order == "morf" else region_r
    # rank[b, region] = when that region is perturbed (0 = first); a stable sort breaks ties by index.
    perm = torch.sort(key, dim=1, stable=True).indices
    rank = torch.empty_like(perm).scatter_(1, perm, torch.arange(n_regions, device=x.device).expand(b, -1))
    pixel_rank = rank.gather(1, ids.flatten().expand(b, -1)).view(b, 1, *spatial)  # broadcast over channels

    steps = min(n_regions, 100) if steps is None else int(steps)
    if not 1 <= steps <= n_regions:
        raise RelevanceError(f"pixel_flipping: steps must be in 1..{n_regions} (the number of regions), got {steps}")
    n_flipped = torch.round(torch.arange(steps + 1, dtype=torch.float64) * n_regions / steps).long().to(x.device)

    base = _baseline(x, perturbation, g)
    if target is None:
        t = model(x).argmax(1)
    else:
        t = torch.as_tensor(target, device=x.device).long().flatten()
        t = t.expand(b) if t.numel() == 1 else t
        if t.numel() != b:
            raise RelevanceError(f"pixel_flipping: target must be an int or (B,) indices, got {tuple(t.shape)}")

    scores = torch.empty(b * (steps + 1), dtype=torch.float64, device=x.device)
    sample = torch.arange(b, device=x.device).repeat_interleave(steps + 1)
    step = torch.arange(steps + 1, device=x.device).repeat(b)
    for lo in range(0, b * (steps + 1), batch_size):
        sb, kb = sample[lo:lo + batch_size], step[lo:lo + batch_size]
        mask = pixel_rank[sb] < n_flipped[kb].view(-1, *([1] * (x.dim() - 1)))
        xp = torch.where(mask, base[sb], x[sb])
        scores[lo:lo + len(sb)] = _score(model(xp), t[sb], score).double()
    scores = scores.view(b, steps + 1)
    return PixelFlippingResult(fractions=(n_flipped.double() / n_regions).cpu(), scores=scores, aopc=aopc(scores))


def compare_rules(model: nn.Module, x: torch.Tensor, composites: Iterable = ("epsilon", "epsilon_plus_flat"),
                  target=None, *, eps: float = 1e-6, random_baseline: bool = True,
                  composite_params: Optional[Dict[str, dict]] = None, **flip_kwargs) -> Dict[str, float]:
    """Mean AOPC (most relevant first) of each composite's maps on x, and of a random order
    ("random") for reference: a rule that explains the model should lose the score faster."""
    from .dataset import make_lrp

    with torch.no_grad():
        t = model(x).argmax(1) if target is None else torch.as_tensor(target, device=x.device).long()
    out = {}
    for name in composites:
        params = (composite_params or {}).get(name, {})
        lrp = make_lrp(model, eps=eps, composite=name, **params)
        rel = lrp(x, t)
        out[name] = pixel_flipping(model, x, rel, t, **flip_kwargs).aopc.mean().item()
    if random_baseline:
        kw = dict(flip_kwargs, order="random")
        out["random"] = pixel_flipping(model, x, torch.zeros_like(x), t, **kw).aopc.mean().item()
    return out


# ----------------------------------------------------------------------------- Quantus

_LRP_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def quantus_explain_func(model, inputs, targets, *, composite=None, eps: float = 1e-6, device=None,
                         channel_reduce: bool = False, **lrp_kwargs):
    """LRP relevance in Quantus's `explain_func` convention: numpy (or tensor) inputs (B, C, ...)
    and targets (B,) in, a float32 numpy array of the inputs' shape out ((B, 1, ...) with
    channel_reduce=True). Use as `metric(..., explain_func=lrpfast.quantus_explain_func,
    explain_func_kwargs={"composite": "epsilon_plus_flat"})`. The LRP object is built once per
    model and settings (a model's trace is reused across Quantus's batches)."""
    import numpy as np

    from .dataset import make_lrp

    if not isinstance(model, nn.Module) and callable(getattr(model, "get_model", None)):
        model = model.get_model()  # a Quantus ModelInterface
    if not isinstance(model, nn.Module):
        raise RelevanceError(f"quantus_explain_func: expected a torch nn.Module, got {type(model).__name__}")
    ref = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (ref.device if ref is not None else torch.device("cpu"))
    dtype = ref.dtype if ref is not None else torch.float32
    x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs).to(dev, dtype)
    t = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor) else targets).to(dev).long().flatten()
    key = (composite if composite is None or isinstance(composite, str) else id(composite), float(eps),
           tuple(sorted((k, repr(v)) for k, v in lrp_kwargs.items())))
    per_model = _LRP_CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = make_lrp(model, eps=eps, composite=composite, **lrp_kwargs)
    rel = per_model[key](x, t if t.numel() == len(x) else t.expand(len(x)))
    if channel_reduce:
        rel = rel.sum(1, keepdim=True)
    return rel.detach().float().cpu().numpy()
