"""Relevance maximisation over a dataset: for every channel (concept) of chosen layers, the top-N
samples by relevance and by activation, streamed through lrpfast.dataset's sharded loop (same
resume checks, same torchrun split), into a small on-disk index.

    from lrpfast.crp import relevance_maximization, open_index
    relevance_maximization(model, dataset, "index/", layers=["features.28"], n_top=16)
    torchrun --nproc_per_node 4 my_script.py       # the same call; each rank takes its shards
    idx = open_index("index/")
    ids, values, pos = idx.top("features.28", channel=7)            # by relevance
    ids, values, pos = idx.top("features.28", 7, mode="activation")

What is ranked (zennit-crp 0.6's Maximization/ChannelConcept.reference_sampling, same meaning,
our own code): for each sample, at the OUTPUT of the layer (channel dim 1, other dims spatial),
  relevance   the relevance there (one LRP pass for the sample's target): "sum" over positions
              (RelMax's default) or "max";
  activation  the layer's output in the forward: "max" over positions (ActMax) or "sum";
then, with abs_norm=True (FeatureVisualization's default), each sample's C values divided by
their absolute sum (+1e-10), so samples compete by the share of a concept, not by the size of
their logit. The index also keeps, per entry, the flat spatial position where that sample's map
(relevance, or activation) is largest: the neuron whose receptive field lrpfast.crp.crops cuts out.

Exact and deterministic: entries are ordered by value, descending, ties by sample id, ascending.
This order is total, so each shard's top-N holds every global top-N entry of its samples and the
final merge of the shards' candidates equals a sort of the whole dataset: an interrupted run
resumed, or a run split over any number of ranks, writes the same index as one process.

Layout of out_dir (beside lrpfast.dataset's manifest.json and shard-*.pt, whose shards hold each
shard's candidates):
  index.json        layers, their channels and spatial shapes, n_top, modes, reductions, files
  top-<layer>.npz   per mode m in ("relevance", "activation"): m_ids (C, N) int64 sample ids,
                    m_values (C, N) float32, m_pos (C, N) int64 flat positions; N = min(n_top, samples)
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from ..dataset import (MANIFEST, ShardTask, Targets, _as_dataset, _write_atomic, make_lrp, run_sharded,
                       shard_path)
from ..ops import RelevanceError
from .layer_tap import LayerTap, channel_view, resolve_layers

MODES = ("relevance", "activation")
REDUCTIONS = ("sum", "max")
INDEX_JSON = "index.json"
NAME = "relevance_maximization"


# ----------------------------------------------------------------------------- the order


_ID_LIMIT = 1 << 32


def _order_key(values: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """One int64 per candidate, larger = better in the index's order: the float32 value's bits
    made monotone (signed) in the high 32 bits, the complement of the id (< 2**32), `low` =
    2**32 - 1 - id, in the low 32 bits, so equal values rank the smaller id first. -0.0 counts as
    0.0."""
    bits = (values.float() + 0.0).view(torch.int32).long()
    mono = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)   # negative floats: order reversed
    return (mono << 32) | low


def select_top(values: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, n: int):
    """The n best columns of each row of (C, M) candidates: values descending, ties by id
    ascending (a total order, so the result does not depend on the candidates' order).
    ids, pos: (C, M) or (M,) (shared by all rows). Returns (values, ids, pos), each (C, min(n, M)).
    One top-k over a combined (value, id) key (no sort of all candidates)."""
    c, m = values.shape
    ids = ids.expand(c, -1) if ids.dim() == 1 else ids
    pos = pos.expand(c, -1) if pos.dim() == 1 else pos
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= _ID_LIMIT):
        raise RelevanceError(f"{NAME}: sample ids must lie in 0..2**32-1")
    o = _order_key(values, (_ID_LIMIT - 1) - ids).topk(min(n, m), dim=1, largest=True, sorted=True).indices
    return values.gather(1, o), ids.gather(1, o), pos.gather(1, o)


def normalize_channels(values: torch.Tensor) -> torch.Tensor:
    """Each sample's C values divided by their absolute sum (zennit-crp's abs_norm)."""
    return values / (values.abs().sum(dim=1, keepdim=True) + 1e-10)


# ----------------------------------------------------------------------------- the task


def _key_parts(key: torch.Tensor):
    """(values float32, ids int64) back from _order_key's keys (-0.0 comes back as 0.0)."""
    mono = key >> 32                                        # arithmetic: the signed high half
    bits = torch.where(mono < 0, mono ^ 0x7FFFFFFF, mono)   # the same involution as _order_key
    values = bits.to(torch.int32).view(torch.float32)
    return values, (_ID_LIMIT - 1) - (key & (_ID_LIMIT - 1))


class _Ranker:
    """The running top-N of each (layer, mode), updated in the tap's callbacks chunk by chunk (LRP
    may split a batch): the layer's map is reduced while it is at hand and nothing of it is kept.
    The running state is select_top's int64 (value, id) key per entry (the value and the id are
    decoded from it once per shard) and the entry's position: one top-k and one gather per
    update. The position of the largest entry is looked up only for the entries that enter the
    top-N (an argmax over a few rows instead of a pass over the map)."""

    def __init__(self, reductions: Dict[str, str], abs_norm: bool, n_top: int):
        self.reductions, self.abs_norm, self.n_top = reductions, abs_norm, n_top
        self.running: Dict[tuple, Optional[tuple]] = {}
        self.shapes: Dict[str, list] = {}   # layer -> its output's (C, *spatial)
        self.ids, self.low, self.cursor = None, None, {}

    def start_batch(self, rows, device):
        self.ids = torch.as_tensor(rows, dtype=torch.long, device=device)
        if self.ids.numel() and (int(self.ids.min()) < 0 or int(self.ids.max()) >= _ID_LIMIT):
            raise RelevanceError(f"{NAME}: sample ids must lie in 0..2**32-1")
        self.low = (_ID_LIMIT - 1) - self.ids   # the low half of each sample's keys
        self.cursor = {}

    def end_batch(self, layers):
        for layer in layers:
            for mode in self.reductions:
                if self.cursor.get((layer, mode), 0) != len(self.ids):
                    raise RelevanceError(f"{NAME}: layer {layer!r} got {mode} for {self.cursor.get((layer, mode), 0)} "
                                         f"of {len(self.ids)} samples in the pass (does the model output depend on it?)")

    def on_activation(self, layer, out):
        self.shapes.setdefault(layer, [int(d) for d in out.shape[1:]])
        if "activation" in self.reductions:
            self._update(layer, "activation", out.detach())

    def on_relevance(self, layer, r):
        if "relevance" in self.reductions:
            self._update(layer, "relevance", r.detach())
        return None

    def _update(self, layer, mode, t):
        v = channel_view(t)
        key = (layer, mode)
        lo = self.cursor.get(key, 0)
        n = len(v)
        self.cursor[key] = lo + n
        # amax/sum are vectorised reductions; max with indices is several times slower on CPU
        values = v.amax(dim=2) if self.reductions[mode] == "max" else v.sum(dim=2)
        if self.abs_norm:
            values = normalize_channels(values)
        keys = _order_key(values.t(), self.low[lo:lo + n])   # (C, n), ids the same per channel
        prev = self.running.get(key)
        m0 = 0
        if prev is not None:
            m0 = prev[0].shape[1]
            keys = torch.cat([prev[0], keys], 1)
        top, o = keys.topk(min(self.n_top, keys.shape[1]), dim=1, largest=True, sorted=True)
        if prev is not None:
            pos = prev[1].gather(1, o.clamp(max=m0 - 1))
            new = o >= m0
            if bool(new.any()):
                ch, k = torch.nonzero(new, as_tuple=True)
                pos[ch, k] = v[o[ch, k] - m0, ch].argmax(dim=-1)
        else:   # every entry is new: one argmax per kept (channel, sample)
            ch = torch.arange(o.shape[0], device=o.device).unsqueeze(1).expand_as(o)
            pos = v[o, ch].argmax(dim=-1)
        self.running[key] = (top, pos)

    def take(self):
        """The shard's top-N per (layer, mode) as (values, ids, pos), on the CPU; the running
        state starts over."""
        out = {}
        for key, (top, pos) in self.running.items():
            values, ids = _key_parts(top)
            out[key] = (values.cpu(), ids.cpu(), pos.cpu())
        self.running = {}
        return out


class _ConceptIndexTask(ShardTask):
    name = NAME
    desc = "relevance maximisation"

    def __init__(self, layers, n_top, targets, reductions, abs_norm, eps, composite, lrp_kwargs):
        self.layers, self.n_top, self.targets = list(layers), n_top, targets
        self.reductions, self.abs_norm = reductions, abs_norm
        self.eps, self.composite, self.lrp_kwargs = eps, composite, lrp_kwargs

    def setup(self, model, device):
        self.lrp = make_lrp(model, eps=self.eps, composite=self.composite, **(self.lrp_kwargs or {}))
        if self.lrp._shape_plans is None:  # noqa: SLF001 - a model traced per shape is checked at the first batch
            resolve_layers(self.lrp, self.layers)
        self.ranker = _Ranker(self.reductions, self.abs_norm, self.n_top)
        self.tap = LayerTap(self.lrp, self.layers, self.ranker.on_activation, self.ranker.on_relevance)
        c = self.composite
        return {"layers": self.layers, "n_top": self.n_top, "target": self.targets.describe(),
                "modes": self.reductions, "abs_norm": self.abs_norm, "eps": self.eps,
                "composite": c if c is None or isinstance(c, str) else repr(c),
                "lrp_kwargs": {k: repr(v) for k, v in sorted((self.lrp_kwargs or {}).items())}}

    def batch(self, model, x, labels, rows):
        t = self.targets(model, x, labels, rows)
        if t is not None and t.dim() == 2:
            raise RelevanceError(f"{NAME}: one target per sample (argmax, a class, label or an (N,) tensor); "
                                 "got K targets per sample")
        self.ranker.start_batch(rows, x.device)
        self.tap.explain(x, t)
        self.ranker.end_batch(self.layers)
        return None

    def shard(self, parts):
        top = self.ranker.take()
        return {"top": {layer: {mode: dict(zip(("values", "ids", "pos"), top[(layer, mode)]))
                                for mode in self.reductions} for layer in self.layers},
                "shapes": dict(self.ranker.shapes)}

    def finish(self, out_dir, n, shard_size, n_shards):
        merged, shapes = {}, {}
        for s in range(n_shards):
            saved = torch.load(shard_path(out_dir, s), map_location="cpu", weights_only=True)
            top = saved["top"]
            shapes.update(saved["shapes"])
            for layer in self.layers:
                for mode in self.reductions:
                    cand = top[layer][mode]
                    prev = merged.get((layer, mode))
                    if prev is not None:
                        cand = {k: torch.cat([prev[k], cand[k]], 1) for k in ("values", "ids", "pos")}
                    merged[(layer, mode)] = dict(zip(("values", "ids", "pos"),
                                                     select_top(cand["values"], cand["ids"], cand["pos"], self.n_top)))
        files = {}
        for layer in self.layers:
            arrays = {}
            for mode in self.reductions:
                m = merged[(layer, mode)]
                arrays.update({f"{mode}_ids": m["ids"].numpy(), f"{mode}_values": m["values"].numpy(),
                               f"{mode}_pos": m["pos"].numpy()})
            files[layer] = f"top-{layer}.npz"
            tmp = os.path.join(out_dir, f"{files[layer]}.{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, os.path.join(out_dir, files[layer]))
        _write_atomic({"layers": {layer: {"channels": shapes[layer][0], "spatial": shapes[layer][1:], "file": files[layer]}
                                  for layer in self.layers},
                       "n_top": self.n_top, "n_samples": n, "modes": self.reductions, "abs_norm": self.abs_norm,
                       "order": "value descending, ties by sample id ascending"},
                      os.path.join(out_dir, INDEX_JSON))


def relevance_maximization(model: nn.Module, data, out_dir: Union[str, os.PathLike], layers: Sequence[str], *,
                           n_top: int = 32, target=None, relevance: Optional[str] = "sum",
                           activation: Optional[str] = "max", abs_norm: bool = True, batch_size: Optional[int] = None,
                           shard_size: int = 1024, eps: float = 1e-6, composite=None,
                           lrp_kwargs: Optional[dict] = None, device=None, transform: Optional[Callable] = None,
                           resume: bool = True, verify_data: bool = True, distributed="auto",
                           num_workers: Optional[int] = None, progress: bool = True) -> dict:
    """Build the concept index of `layers` over `data` in out_dir (module docstring).

    n_top: samples kept per channel and mode. target: as in explain_dataset, one per sample
    (None/"argmax", a class, "label", an (N,) tensor). relevance / activation: "sum" or "max"
    over positions, or None to skip that mode. abs_norm: divide each sample's channel values by
    their absolute sum. eps, composite, lrp_kwargs: lrpfast.LRP's. The rest: as in
    lrpfast.explain_dataset (shards, resume, data checks, torchrun). Returns the run's summary."""
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise RelevanceError(f"{NAME}: no layers given")
    if not isinstance(n_top, int) or isinstance(n_top, bool) or n_top < 1:
        raise RelevanceError(f"{NAME}: n_top must be an int >= 1, got {n_top!r}")
    reductions = {}
    for mode, how in (("relevance", relevance), ("activation", activation)):
        if how is None:
            continue
        if how not in REDUCTIONS:
            raise RelevanceError(f"{NAME}: {mode} must be 'sum', 'max' or None, got {how!r}")
        reductions[mode] = how
    if not reductions:
        raise RelevanceError(f"{NAME}: relevance and activation are both None: nothing to rank")
    dataset = _as_dataset(data)[0]
    if len(dataset) == 0:
        raise RelevanceError(f"{NAME}: the dataset is empty")
    targets = Targets(target, len(dataset))
    if targets.kind == "topk" or (targets.kind == "tensor" and targets.value.dim() == 2):
        raise RelevanceError(f"{NAME}: one target per sample (argmax, a class, label or an (N,) tensor), "
                             f"got {targets.describe()}")
    task = _ConceptIndexTask(layers, n_top, targets, reductions, abs_norm, eps, composite, lrp_kwargs)
    return run_sharded(task, model, data, out_dir, batch_size=batch_size, shard_size=shard_size, device=device,
                       transform=transform, resume=resume, verify_data=verify_data, distributed=distributed,
                       num_workers=num_workers, progress=progress)


# ----------------------------------------------------------------------------- reading back


class ConceptIndex:
    """A finished relevance_maximization folder: layers, channels, and per channel its top-N."""

    def __init__(self, out_dir: Union[str, os.PathLike]):
        self.out_dir = os.fspath(out_dir)
        try:
            with open(os.path.join(self.out_dir, MANIFEST)) as f:
                self.manifest = json.load(f)
        except FileNotFoundError:
            raise RelevanceError(f"open_index: {self.out_dir} has no {MANIFEST} (not a concept index folder)") from None
        if not self.manifest.get("complete"):
            raise RelevanceError(f"open_index: the index in {self.out_dir} is not complete; rerun the build with the "
                                 "same arguments to resume it")
        try:
            with open(os.path.join(self.out_dir, INDEX_JSON)) as f:
                self.info = json.load(f)
        except FileNotFoundError:
            raise RelevanceError(f"open_index: {self.out_dir} has no {INDEX_JSON} (an explain_dataset folder, not a "
                                 "concept index?)") from None
        self.layers = list(self.info["layers"])
        self.modes = list(self.info["modes"])
        self._arrays: Dict[str, dict] = {}

    def channels(self, layer: str) -> int:
        return self.info["layers"][self._layer(layer)]["channels"]

    def spatial(self, layer: str) -> tuple:
        """The spatial shape of the layer's output (pos indexes it flat); () for a Linear layer."""
        return tuple(self.info["layers"][self._layer(layer)]["spatial"])

    def _layer(self, layer):
        if layer not in self.info["layers"]:
            raise RelevanceError(f"open_index: layer {layer!r} is not in the index (it has {', '.join(self.layers)})")
        return layer

    def arrays(self, layer: str) -> dict:
        """All arrays of a layer: {mode_ids, mode_values, mode_pos}, each (C, N)."""
        layer = self._layer(layer)
        if layer not in self._arrays:
            with np.load(os.path.join(self.out_dir, self.info["layers"][layer]["file"])) as z:
                self._arrays[layer] = {k: z[k] for k in z.files}
        return self._arrays[layer]

    def top(self, layer: str, channel: int, mode: str = "relevance", n: Optional[int] = None):
        """(ids, values, pos) of the channel's best samples, best first: numpy arrays of length <= n."""
        if mode not in self.modes:
            raise RelevanceError(f"open_index: mode {mode!r} was not recorded (modes: {', '.join(self.modes)})")
        c = self.channels(layer)
        if not 0 <= int(channel) < c:
            raise RelevanceError(f"open_index: channel {channel} of layer {layer!r} is out of range (0..{c - 1})")
        a = self.arrays(layer)
        sl = slice(None) if n is None else slice(0, int(n))
        return (a[f"{mode}_ids"][channel, sl], a[f"{mode}_values"][channel, sl], a[f"{mode}_pos"][channel, sl])


def open_index(out_dir) -> ConceptIndex:
    """Open a finished relevance_maximization folder."""
    return ConceptIndex(out_dir)
