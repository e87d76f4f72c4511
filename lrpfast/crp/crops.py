"""Reference crops: the part of each top sample where a concept's relevance lies, as an image grid.

    from lrpfast.crp import open_index, reference_crops, save_concept_grid
    refs = reference_crops(model, dataset, open_index("index/"), "features.28", channel=7, n=8)
    save_concept_grid("concept7.png", [("features.28 ch 7", None, refs)])

The crop (our choice among zennit-crp's options; documented here): for sample i in a channel's
top-N, take the neuron the index recorded for it (channel c at the position where the sample's
map at the layer is largest) and propagate only that neuron's relevance to the input (the
conditional heatmap of one neuron, zennit-crp's `rf=True`). That heatmap lives inside the
neuron's receptive field, and inside it on the pixels that made the neuron relevant. The crop is
the bounding box of the pixels whose positive relevance is at least `threshold` x the map's
largest, widened by `margin` (a fraction of the box) and to at least `min_size` pixels. A map
without positive relevance (the neuron got none for this sample) falls back to its |relevance|,
and one with no relevance at all to the whole image. A Linear layer (no positions) propagates
the whole channel.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..ops import RelevanceError


@dataclass
class Crop:
    sample: int                      # the dataset index
    value: float                     # its value in the index (relevance or activation)
    box: Tuple[int, int, int, int]   # top, bottom, left, right (exclusive ends), in input pixels
    image: torch.Tensor              # (C, h, w) the cropped input (as the dataset gives it, [0, 1])
    heatmap: torch.Tensor            # (h, w) the neuron's conditional relevance there (channel sum)


def neuron_relevance(attr, layer: str, x: torch.Tensor, channels, positions=None, target=None,
                     shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """(B, *x.shape[1:]): for each sample b, the relevance at the input when, at `layer`'s output,
    only channel channels[b] (at flat position positions[b], if given; `shape` = the layer's
    output (C, *spatial) then) keeps its relevance: CondAttribution's conditional relevance
    (exclude_parallel=True: relevance around the layer on a residual skip is dropped, as in
    zennit-crp). attr: a CondAttribution or an lrpfast.LRP. target: None (argmax), an int or (B,)."""
    from .attribution import CondAttribution

    attr = attr if isinstance(attr, CondAttribution) else CondAttribution(attr)
    channels = torch.as_tensor(channels, dtype=torch.long).reshape(-1).tolist()
    if len(channels) != len(x):
        raise RelevanceError(f"neuron_relevance: {len(channels)} channels for {len(x)} samples")
    if positions is not None and shape is None:
        raise RelevanceError("neuron_relevance: positions need the layer's output shape (C, *spatial)")
    ys = [None] * len(x) if target is None else (
        [int(target)] * len(x) if not isinstance(target, torch.Tensor) or target.dim() == 0
        else [int(t) for t in target.reshape(-1).tolist()])
    if positions is None:   # one channel per sample: K conditions on all samples, keep the diagonal
        by_channel = sorted(set(zip(channels, ys)), key=lambda cy: (cy[0], -1 if cy[1] is None else cy[1]))
        out = torch.empty_like(x)
        for c, y in by_channel:
            rows = [b for b in range(len(x)) if channels[b] == c and ys[b] == y]
            res = attr(x[rows], [{"y": y, layer: [c]}])
            out[rows] = res.relevance[:, 0]
        return out
    n_pos = int(torch.tensor(shape[1:]).prod())
    for b, p in enumerate(positions):
        if not 0 <= int(p) < n_pos or not 0 <= channels[b] < shape[0]:
            raise RelevanceError(f"neuron_relevance: channel {channels[b]}, position {int(p)} is out of range for "
                                 f"the layer's output {tuple(shape)} (positions 0..{n_pos - 1})")
    out = []
    for b in range(len(x)):   # a neuron each: one condition per sample
        mask = torch.zeros(int(torch.tensor(shape).prod()), dtype=x.dtype, device=x.device)
        mask[channels[b] * int(torch.tensor(shape[1:]).prod()) + int(positions[b])] = 1
        out.append(attr(x[b:b + 1], [{"y": ys[b], layer: mask.view(*shape)}]).relevance[:, 0])
    return torch.cat(out)


def crop_box(heatmap: torch.Tensor, threshold: float = 0.1, margin: float = 0.15,
             min_size: int = 0) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right), ends exclusive: the box around the pixels of the (H, W) map with
    positive relevance >= threshold x its largest (module docstring)."""
    h = heatmap.detach().double()
    H, W = h.shape
    pos = h.clamp(min=0)
    if not bool((pos > 0).any()):
        pos = h.abs()
    if not bool((pos > 0).any()):
        return 0, H, 0, W
    rows, cols = torch.nonzero(pos >= threshold * pos.max(), as_tuple=True)
    top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1

    def widen(lo, hi, size):
        extra = int(round(margin * (hi - lo)))
        lo, hi = lo - extra, hi + extra
        short = max(0, min(min_size, size) - (hi - lo))
        lo, hi = lo - short // 2, hi + short - short // 2
        shift = max(0, -lo) - max(0, hi - size)
        return max(0, lo + shift), min(size, hi + shift)

    top, bottom = widen(top, bottom, H)
    left, right = widen(left, right, W)
    return top, bottom, left, right


def index_target(index, dataset, ids, target=None):
    """The targets the index was built with, for samples `ids`: None (argmax), an int, or labels
    read from the dataset's (x, y) items. A target tensor must be passed again as `target`."""
    if target is not None:
        return target
    spec = index.manifest.get("config", {}).get("target", "argmax")
    if spec == "argmax":
        return None
    if spec.startswith("index:"):
        return int(spec.split(":", 1)[1])
    if spec == "label":
        labels = []
        for i in ids:
            item = dataset[int(i)]
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise RelevanceError("reference_crops: the index was built with target 'label' but the dataset's items "
                                     "have no labels; pass target=")
            labels.append(int(item[1]))
        return torch.tensor(labels)
    raise RelevanceError(f"reference_crops: the index was built with target {spec!r}; pass the same targets as target=")


def reference_crops(lrp_or_model, dataset, index, layer: str, channel: int, *, mode: str = "relevance", n: int = 8,
                    transform=None, target=None, threshold: float = 0.1, margin: float = 0.15,
                    min_size: Optional[int] = None, device=None) -> List[Crop]:
    """The crops of channel `channel` of `layer` in its top-n samples of `index` (mode "relevance"
    or "activation"), best first. lrp_or_model: a CondAttribution or an lrpfast.LRP (reused), or
    the model the index was built from (then the ε rule; pass an LRP built like the index for
    other composites). transform: the index's per-batch normalisation (crops show the untransformed
    images). min_size: default a quarter of the image's shorter side."""
    from ..dataset import _split_item, make_lrp

    from .attribution import CondAttribution

    attr = lrp_or_model if isinstance(lrp_or_model, CondAttribution) else CondAttribution(
        lrp_or_model if hasattr(lrp_or_model, "explain") else make_lrp(lrp_or_model))
    lrp = attr.lrp
    ids, values, pos = index.top(layer, channel, mode, n)
    if len(ids) == 0:
        return []
    items = [dataset[int(i)] for i in ids]
    x_raw = torch.stack([_split_item(it)[0] if not isinstance(it, torch.Tensor) else it for it in items])
    p = next(lrp.model.parameters(), None)
    dev = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    x = x_raw.to(dev, dtype=p.dtype if p is not None else x_raw.dtype)
    if transform is not None:
        x = transform(x)
    t = index_target(index, dataset, ids, target)
    if isinstance(t, torch.Tensor):
        t = t.to(dev)
    spatial = index.spatial(layer)
    rel = neuron_relevance(attr, layer, x, [channel] * len(ids), torch.as_tensor(pos) if spatial else None, t,
                           (index.channels(layer), *spatial))
    maps = rel.sum(1) if rel.dim() == 4 else rel
    out = []
    for k in range(len(ids)):
        m = maps[k].detach().cpu()
        size = min_size if min_size is not None else max(1, min(m.shape) // 4)
        top, bottom, left, right = crop_box(m, threshold, margin, size)
        out.append(Crop(int(ids[k]), float(values[k]), (top, bottom, left, right),
                        x_raw[k, :, top:bottom, left:right].detach().cpu(), m[top:bottom, left:right]))
    return out


# ----------------------------------------------------------------------------- pictures


def _image_rgb(img: torch.Tensor) -> np.ndarray:
    a = img.detach().float().cpu().clamp(0, 1).numpy()
    a = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a[:3]
    return a.transpose(1, 2, 0)


def save_concept_grid(path, rows: Sequence[Tuple[str, Optional[np.ndarray], Sequence[Crop]]], *,
                      title: Optional[str] = None, first: Sequence[Tuple[str, np.ndarray]] = (),
                      tile: float = 1.3, dpi: int = 100) -> str:
    """One picture: a row per concept, (label, its heatmap as an RGB array or None, its crops).
    first: (label, RGB) tiles shown above the rows (the explained image, its heatmap). Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ncols = max([len(c) + (h is not None) for _, h, c in rows] + [len(first), 1])
    nrows = len(rows) + bool(first)
    fig, axes = plt.subplots(nrows, ncols, figsize=(tile * ncols + 0.2, tile * nrows + (0.5 if title else 0.1)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, (label, rgb) in enumerate(first):
        axes[0, j].imshow(rgb, interpolation="nearest")
        axes[0, j].set_title(label, fontsize=7)
    r0 = 1 if first else 0
    for r, (label, heat, crops) in enumerate(rows, start=r0):
        col = 0
        if heat is not None:
            axes[r, 0].imshow(heat, interpolation="nearest")
            axes[r, 0].set_title(label, fontsize=7)
            col = 1
        for k, c in enumerate(crops):
            ax = axes[r, col + k]
            ax.imshow(_image_rgb(c.image), interpolation="nearest", cmap=None)
            ax.set_title(f"#{c.sample}" if heat is not None or k else f"{label}\n#{c.sample}", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()) if title else None)
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return os.fspath(path)
