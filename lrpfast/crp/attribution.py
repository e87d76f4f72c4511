"""Conditional attributions (CRP) with one forward and one shared pass above each condition.

Names follow zennit-crp (`crp.attribution.CondAttribution`, conditions such as
`{"y": [c], "features.40": [ch]}`, `record_layer`, ChannelConcept's channel sums), so its users
recognise them; the composite is chosen when the model is traced, as in lrpfast.LRP.

Conditions
    A list of K dicts, one per condition (zennit-crp's form):
        {"y": c or [c, ...], "<layer>": channel or [channels] or a mask}
    "y" is the output class(es) whose logit starts the relevance (several classes: their sum);
    absent or None: each sample's predicted class. Every other key is a layer name (a module name
    from model.named_modules()): the relevance at that layer's OUTPUT is multiplied by the mask
    (channels listed: 1 on those channels, 0 elsewhere; or a tensor of shape (C,) or (C, *spatial)
    broadcast over the sample). Several layers in one condition: masks at each.
    Or one dict holding K conditions at once: {"y": (K,) classes or an int,
    "<layer>": a (K, C) or (K, C, *spatial) mask, or a list of K channel lists}.

    The heatmap of a condition is the relevance that flows from "y" through the masked part of
    each named layer down to the input. With exclude_parallel=True (zennit-crp's default) only
    relevance that passes through the named layer reaches the layers below it: relevance on
    parallel paths (a ResNet's skip connection around a conditioned layer inside a block) is
    dropped for that condition, so the heatmaps of all channels of a layer sum to the part of
    the unconditional map that passes through that layer (all of it, where every path passes
    through the layer). exclude_parallel=False lets parallel relevance flow on unmasked.

Layer names
    Any module of model.named_modules() the traced forward calls exactly once: a leaf layer
    (conv, linear, ReLU, pooling, ...) or a container (a ResNet block "layer3.1", a Sequential
    "features") whose output is one tensor. A module called twice (torchvision's BasicBlock.relu)
    is ambiguous and refused, as are names that are not modules, modules the forward never
    calls, and "y" itself.
    A BatchNorm folded into the Linear/Conv before it (lrpfast folds it exactly) makes one layer:
    both names address the folded layer's output, i.e. the relevance after the BatchNorm.
    zennit-crp's canonizers merge the BatchNorm the same way, but leave an "identity" BatchNorm
    dividing by sqrt(1 + bn.eps) behind: its relevance at the conv's name is the BatchNorm
    output's times 1/sqrt(1 + bn.eps) (relative 5e-6 at eps = 1e-5); heatmaps are unaffected
    by where the mask sits (see benchmarks/crp_parity.py).

Layout
    K conditions on B samples share one forward; the relevance pass runs with one row per
    distinct "y" above the highest conditioned layer, fans out to K*B rows there (row b*K + k,
    the layout of K targets in lrpfast.LRP: x and z are shared by the K rows of a sample), and
    masks again at lower conditioned layers. Large K*B are processed in groups of conditions
    (the part above the fan-out is computed once per chunk of samples).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .. import checks, graph, ops
from .. import nodes as N
from ..lrp import LRP
from ..ops import DEFAULT_EPS, RelevanceError
from . import conditions as C
from . import propagate as P
from .layers import OUTPUT, index_for


@dataclass
class CRPResult:
    """What CondAttribution(...) returns (zennit-crp's attrResult, with K made explicit).

    heatmap      (B, K, *x.shape[2:]): the conditional relevance at the input summed over the
                 channel dim (zennit-crp's heatmap); for x of shape (B, F): (B, K)
    relevance    (B, K, *x.shape[1:]): the conditional relevance at the input
    relevances   layer name -> (B, K, C): concept relevances at each recorded layer (its output's
                 relevance summed over all dims after the channel dim, ChannelConcept.attribute
                 without normalisation), for each condition: above a condition's own conditioned
                 layers the unconditioned relevance of its "y"; at a conditioned layer after its
                 mask; below, the conditional relevance
    maps         layer name -> (B, K, C, *spatial) relevance at each recorded layer's output, or
                 None unless record_maps=True
    activations  layer name -> (B, C, *spatial) output of each recorded layer (before any in-place
                 ReLU after it), or None unless record_activations=True
    prediction   (B, classes) logits
    targets      (B, K, T) long: the class(es) of "y" per condition (T = the most classes any
                 condition names; shorter lists are padded with -1)
    """

    heatmap: torch.Tensor
    relevance: torch.Tensor
    relevances: Dict[str, torch.Tensor]
    maps: Optional[Dict[str, torch.Tensor]]
    activations: Optional[Dict[str, torch.Tensor]]
    prediction: torch.Tensor
    targets: torch.Tensor


@dataclass
class ConceptRanking:
    """What CondAttribution.rank returns: the top-k concepts (channels) of one layer per sample.

    layer        the layer's name
    channels     (B, k) long: channel indices, most relevant first
    relevance    (B, k): their concept relevances (Σ of the relevance at the layer's output over
                 each channel), for the prediction's class (or the given target)
    share        (B, k): relevance / Σ_c |relevance_c| over all channels of the layer
                 (ChannelConcept.attribute with abs_norm=True)
    all_relevance (B, C): every channel's concept relevance
    heatmap      (B, k, *x.shape[2:]) conditional heatmaps of the top-k concepts (channel sums),
                 or None with heatmaps=False
    relevance_maps (B, k, *x.shape[1:]) the same before the channel sum, or None
    prediction   (B, classes) logits
    targets      (B,) the explained class
    """

    layer: str
    channels: torch.Tensor
    relevance: torch.Tensor
    share: torch.Tensor
    all_relevance: torch.Tensor
    heatmap: Optional[torch.Tensor]
    relevance_maps: Optional[torch.Tensor]
    prediction: torch.Tensor
    targets: torch.Tensor


def layer_names(attribution_or_lrp, x: Optional[torch.Tensor] = None) -> List[str]:
    """The layer names conditions and record_layer accept, in forward order (modules called
    once whose output is one tensor of the traced graph). x: an example input, for models
    traced per input shape."""
    attr = attribution_or_lrp if isinstance(attribution_or_lrp, CondAttribution) else CondAttribution(attribution_or_lrp)
    return attr.layer_names(x)


def _names(v, what: str) -> List[str]:
    if isinstance(v, str):
        return [v]
    if v is None:
        return []
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"CRP: {what} must be a layer name or a list of them, got {type(v).__name__}")
    for n in v:
        if not isinstance(n, str):
            raise TypeError(f"CRP: {what} must hold layer names (strings), got {n!r}")
    return list(dict.fromkeys(v))


def _descendants(steps, i: int) -> set:
    """Steps whose forward reads step i's output, directly or not."""
    seen, todo = set(), [i]
    while todo:
        for u in steps[todo.pop()].users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def _parallel_records(steps, masks, rec_of, k, dtype) -> Dict[int, torch.Tensor]:
    """exclude_parallel: a recorded layer above a condition's conditioned layer that does not
    depend on it (a skip path around it) carries none of the relevance passing through it: its
    entry for that condition is 0 (zennit-crp: no gradient reaches it). Record step -> (K,) 0/1,
    only where some entry is 0. (Below a conditioned layer the pass itself drops what is parallel.)"""
    out = {}
    device = next(iter(masks.values()))[1].device if masks else None
    for j in rec_of:
        keep = torch.ones(k, dtype=dtype)
        for i, (mask, has) in masks.items():
            if i < j and j not in _descendants(steps, i):
                keep[has.cpu()] = 0
        if not bool(keep.all()):
            out[j] = keep.to(device)
    return out


class _Pick:
    """rank(): the k channels of one layer, chosen per sample from the relevance there."""

    def __init__(self, layer: str, k: int, largest: bool):
        self.layer, self.k, self.largest = layer, k, largest
        self.channels = self.relevance = self.all = None


class CondAttribution:
    """Conditional attributions (CRP) on lrpfast's relevance pass.

    model        an nn.Module (traced once, never modified), or an lrpfast.LRP to reuse its plan,
                 composite and settings (then leave the other arguments at their defaults)
    composite, eps, stabilizer, init, batch_size, memory_budget, attention, **composite_params
                 as in lrpfast.LRP (init="logit": the "y" logit starts the pass, as in zennit-crp)
    """

    def __init__(self, model, composite=None, *, eps: Optional[float] = None, stabilizer: str = "sign",
                 init: str = "logit", batch_size: Optional[int] = None, memory_budget=None, attention: str = "cp",
                 **composite_params):
        if isinstance(model, LRP):
            if composite is not None or eps is not None or composite_params or batch_size is not None \
                    or memory_budget is not None or stabilizer != "sign" or init != "logit" or attention != "cp":
                raise TypeError("CondAttribution: give an lrpfast.LRP (its settings are used) or a model with "
                                "settings, not both")
            self.lrp = model
        elif isinstance(model, nn.Module):
            self.lrp = LRP(model, eps=DEFAULT_EPS if eps is None else eps, stabilizer=stabilizer, init=init,
                           composite=composite, batch_size=batch_size, memory_budget=memory_budget,
                           attention=attention, **composite_params)
        else:
            raise TypeError(f"CondAttribution: model must be an nn.Module or an lrpfast.LRP, got {type(model).__name__}")
        self.model = self.lrp.model
        self._indices: dict = {}

    def __repr__(self):
        return f"CondAttribution({type(self.model).__name__}, composite={self.lrp.composite_name})"

    def layer_names(self, x: Optional[torch.Tensor] = None) -> List[str]:
        """See lrpfast.crp.layer_names."""
        plan = self.lrp.prepare(x) if x is not None else self.lrp.plan
        return index_for(self._indices, plan, self.model).names()

    # ------------------------------------------------------------------------- public calls

    def __call__(self, x: torch.Tensor, conditions, record_layer: Sequence[str] = (), *,
                 exclude_parallel: bool = True, record_maps: bool = False,
                 record_activations: bool = False) -> CRPResult:
        """K conditional attributions of every sample of x in one forward and one shared pass.

        x                (B, ...) input
        conditions       a list of K condition dicts, or one dict of K conditions (module docstring)
        record_layer     layer names whose concept relevances (B, K, C) are returned (any layers:
                         above, at or below the conditioned ones), from the same pass
        exclude_parallel relevance on paths parallel to a conditioned layer is dropped for that
                         condition (zennit-crp's default); False: it flows on unmasked
        record_maps      also return the full relevance at each recorded layer's output
        record_activations also return each recorded layer's output from the forward
        """
        cond = C.parse(conditions)
        record = _names(record_layer, "record_layer")
        return self._attribute(x, cond, record, bool(exclude_parallel), bool(record_maps), bool(record_activations),
                               heatmap=True)

    def relevances(self, x: torch.Tensor, layers: Sequence[str], target=None) -> Dict[str, torch.Tensor]:
        """Unconditional concept relevances (B, C) at several layers in one pass: the relevance at
        each layer's output summed over all dims after the channel dim. target: None (each
        sample's prediction), an int, or (B,) classes. The pass stops at the lowest of the
        layers (no heatmap is computed)."""
        layers = _names(layers, "layers")
        if not layers:
            raise RelevanceError("CRP: relevances() needs at least one layer name")
        cond = C.Conditions(1, [self._target(x, target)], {})
        res = self._attribute(x, cond, layers, True, False, False, heatmap=False)
        return {n: r[:, 0] for n, r in res.relevances.items()}

    def rank(self, x: torch.Tensor, layer: str, k: int = 5, target=None, *, heatmaps: bool = True,
             exclude_parallel: bool = True, largest: bool = True) -> ConceptRanking:
        """The top-k concepts (channels) of `layer` for each sample's prediction (or target), with
        their relevance shares and, with heatmaps=True, their conditional heatmaps, all from one
        forward and one pass: the pass computes the relevance at the layer, picks each sample's
        top-k channels there and fans out k masked copies below it. largest=False: the most
        negative concepts instead."""
        if not isinstance(layer, str):
            raise TypeError(f"CRP: rank() takes one layer name, got {type(layer).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise RelevanceError(f"CRP: rank(): k must be a positive int, got {k!r}")
        pick = _Pick(layer, k, bool(largest))
        cond = C.Conditions(k, [self._target(x, target)] * k, {})
        res = self._attribute(x, cond, [], bool(exclude_parallel), False, False, heatmap=bool(heatmaps), pick=pick)
        total = pick.all.abs().sum(-1, keepdim=True)
        share = torch.where(total > 0, pick.relevance / torch.where(total > 0, total, 1), 0)
        return ConceptRanking(layer=layer, channels=pick.channels, relevance=pick.relevance, share=share,
                              all_relevance=pick.all, heatmap=res.heatmap if heatmaps else None,
                              relevance_maps=res.relevance if heatmaps else None, prediction=res.prediction,
                              targets=res.targets[:, 0, 0])

    # ------------------------------------------------------------------------- the pass

    def _target(self, x, target):
        """None, an int, or (B,) classes -> a condition's 'y'."""
        if target is None or isinstance(target, int) and not isinstance(target, bool):
            return C._classes(target, "target")
        t = checks.as_target(target)
        if isinstance(t, int):
            return (t,)
        if not isinstance(t, torch.Tensor) or t.dim() > 1:
            raise RelevanceError(f"CRP: target must be an int or (B,) classes, got shape {tuple(t.shape)}")
        if t.dim() == 0:
            return (int(t),)
        if isinstance(x, torch.Tensor) and t.shape[0] != x.shape[0]:
            raise RelevanceError(f"CRP: target has {t.shape[0]} entries for a batch of {x.shape[0]} samples")
        return t.long()

    def _attribute(self, x, cond: "C.Conditions", record: List[str], exclude_parallel: bool, record_maps: bool,
                   record_activations: bool, heatmap: bool, pick: Optional[_Pick] = None) -> CRPResult:
        lrp = self.lrp
        if not torch.compiler.is_compiling():
            checks.check_explained_function(lrp._modules, lrp._traced_modes)
        lrp._check_input(x)
        ops.check_finite(x, "CRP: x contains NaN or Inf")
        b = x.shape[0]
        chunk, group = lrp._schedule(x, cond.k)
        parts = []
        with torch.no_grad():
            for a in range(0, b, chunk):
                ys = [y[a:a + chunk] if isinstance(y, torch.Tensor) else y for y in cond.ys]
                part_pick = _Pick(pick.layer, pick.k, pick.largest) if pick is not None else None
                parts.append((self._run(x[a:a + chunk], C.Conditions(cond.k, ys, cond.layers), record,
                                        exclude_parallel, record_maps, record_activations, heatmap, group,
                                        part_pick), part_pick))
        if heatmap:
            for p, _ in parts:
                ops.check_finite(p.relevance, f"CRP: the {x.dtype} relevance map holds NaN or Inf although x is "
                                 "finite")
        if pick is not None:
            for name in ("channels", "relevance", "all"):
                setattr(pick, name, torch.cat([getattr(pp, name) for _, pp in parts]))
        if len(parts) == 1:
            return parts[0][0]
        cat = lambda vals: torch.cat(vals, 0)  # noqa: E731
        res = [p for p, _ in parts]
        first = res[0]
        opt = lambda f: None if getattr(first, f) is None else \
            {n: cat([getattr(p, f)[n] for p in res]) for n in getattr(first, f)}  # noqa: E731
        return CRPResult(heatmap=cat([p.heatmap for p in res]), relevance=cat([p.relevance for p in res]),
                         relevances=opt("relevances"), maps=opt("maps"), activations=opt("activations"),
                         prediction=cat([p.prediction for p in res]), targets=cat([p.targets for p in res]))

    def _run(self, x, cond, record, exclude_parallel, record_maps, record_activations, heatmap, group, pick):
        lrp = self.lrp
        plan = lrp.prepare(x)
        index = index_for(self._indices, plan, self.model)
        steps = plan.steps
        b, k = x.shape[0], cond.k
        layer_steps = {name: index.step(name) for name in cond.layers}
        rec_steps = {name: index.step(name, "record_layer") for name in record}
        pick_step = index.step(pick.layer) if pick is not None else None
        watch = set(layer_steps.values()) | set(rec_steps.values()) | ({pick_step} - {None})
        want_acts = set(rec_steps.values()) if record_activations else set()
        shapes: Dict[int, tuple] = {}
        acts: Dict[int, torch.Tensor] = {}

        def observe(i, v):
            if i not in watch:
                return
            if not isinstance(v, torch.Tensor) or v.dim() < 2 or v.shape[0] != b:
                names = [n for n, j in {**layer_steps, **rec_steps}.items() if j == i] or [pick.layer]
                raise RelevanceError(f"CRP: layer {names[0]!r} outputs {tuple(getattr(v, 'shape', ()))} for a batch "
                                     f"of {b}; CRP needs (B, C, ...) with the batch first and a channel dim")
            shapes[i] = tuple(v.shape[1:])
            if i in want_acts:   # a copy: an in-place ReLU after the layer would rectify it
                acts[i] = v.detach().clone()

        try:
            call = graph.forward(plan, x, fuse_pools=True, observe=observe)
        except RelevanceError:
            lrp._refuse_meta_tensors()
            raise
        logits = call.logits
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != b:
            raise RelevanceError(f"CRP: the model output has shape {tuple(getattr(logits, 'shape', ()))}; expected "
                                 f"logits (B, classes) with B = {b}")
        lrp._verify(plan, x, logits)

        # ---- "y": one row per distinct target per sample; u_of_k maps conditions to rows
        classes = logits.shape[1]
        keys: list = []
        u_of_k = []
        for y in cond.ys:
            key = ("t", id(y)) if isinstance(y, torch.Tensor) else ("c", y)
            if key not in keys:
                keys.append(key)
            u_of_k.append(keys.index(key))
        u_of_k = torch.tensor(u_of_k, dtype=torch.long, device=x.device)
        predicted = logits.argmax(1)
        sel = torch.zeros((b, len(keys), classes), dtype=logits.dtype, device=logits.device)
        width = 1
        for u, (kind, y) in enumerate(keys):
            y = next(v for v in cond.ys if (isinstance(v, torch.Tensor) and id(v) == y)) if kind == "t" else y
            if y is None:
                sel[:, u].scatter_(1, predicted.unsqueeze(1), 1)
                continue
            if isinstance(y, torch.Tensor):
                cls = y.to(device=logits.device).view(-1, 1)
            else:
                cls = torch.tensor(y, dtype=torch.long, device=logits.device).view(1, -1).expand(b, -1)
                width = max(width, len(y))
            bad = (cls < -classes) | (cls >= classes)
            if bool(bad.any()):
                raise RelevanceError(f"CRP: 'y' class {int(cls[bad][0])} is out of range for {classes} classes "
                                     f"(valid: 0..{classes - 1})")
            sel[:, u].scatter_(1, cls % classes, 1)
        targets = torch.full((b, k, width), -1, dtype=torch.long, device=x.device)
        for n, y in enumerate(cond.ys):
            if y is None:
                targets[:, n, 0] = predicted
            elif isinstance(y, torch.Tensor):
                targets[:, n, 0] = y.to(x.device)
            else:
                targets[:, n, :len(y)] = torch.tensor(y, dtype=torch.long, device=x.device)
        u = len(keys)
        r0 = (sel * logits.unsqueeze(1) if lrp.init == "logit" else sel).reshape(b * u, classes)

        # ---- masks per conditioned step (two names of one step, e.g. a conv and its folded BN: both)
        masks: Dict[int, list] = {}
        for name, per in cond.layers.items():
            i = layer_steps[name]
            m, h = C.build_mask(name, per, shapes[i], x.dtype, x.device)
            if i in masks:
                m0, h0 = masks[i]
                full = m0 if m0.dim() > m.dim() else m
                pad = lambda t: t.reshape(*t.shape, *([1] * (full.dim() - t.dim())))  # noqa: E731
                masks[i] = [pad(m0) * pad(m), h0 | h]
            else:
                masks[i] = [m, h]
        fan_step = max(list(masks) + ([pick_step] if pick is not None else []), default=None)
        rec_of: Dict[int, List[str]] = {}
        for name, i in rec_steps.items():
            rec_of.setdefault(i, []).append(name)
        sums = {i: torch.zeros((b, k, shapes[i][0]), dtype=x.dtype, device=x.device) for i in rec_of}
        maps = {i: torch.zeros((b, k, *shapes[i]), dtype=x.dtype, device=x.device) for i in rec_of} \
            if record_maps else None

        reach = _parallel_records(steps, masks, rec_of, k, x.dtype) if exclude_parallel else {}

        def fit(i, msg):
            if tuple(msg.a.shape[1:]) != shapes[i]:
                msg = N.Msg(N.DENSE, P.relevance_of(msg, call), None, True)
            return msg

        def keep(i, msg, rows, cols, expand=None):
            """Record step i's relevance (B*rows maps) into conditions `cols` (a slice)."""
            P.check_rows(msg, b, rows, f"layer {rec_of[i][0]!r}")
            r = P.relevance_of(msg, call)
            r = r.view(b, rows, *r.shape[1:])
            if expand is not None:
                r = r.index_select(1, expand)
            if i in reach:   # conditions whose conditioned layer this one is parallel to: nothing
                r = r * reach[i][cols].view(1, -1, *([1] * (r.dim() - 2)))
            sums[i][:, cols] = r.reshape(*r.shape[:3], -1).sum(-1)
            if maps is not None:
                maps[i][:, cols] = r

        low = min(rec_of, default=None) if not heatmap else None   # no heatmap: stop at the lowest record

        def top_hook(i, msg, incoming):
            if i in rec_of:
                keep(i, msg, u, slice(None), u_of_k)
            return msg

        out_shape = x.shape[1:]
        rel = torch.zeros((b, k, *out_shape), dtype=x.dtype, device=x.device) if heatmap else None
        incoming = [None] * len(steps)
        incoming[plan.output] = [N.Msg(N.DENSE, r0, None, True)]
        stop = fan_step if fan_step is not None else low
        r = P.propagate(plan, call, incoming, plan.output, stop=stop, at_step=top_hook)
        if fan_step is None:
            if low is not None and incoming[low] is not None:
                top_hook(low, incoming[low][0], incoming)
            if heatmap and r is not None:
                rel.copy_(r.view(b, u, *out_shape).index_select(1, u_of_k))
            return self._result(rel, rec_of, sums, maps, acts, logits, targets)

        msg_f = incoming[fan_step][0] if incoming[fan_step] is not None else None
        if pick is not None:
            self._pick(pick, msg_f, call, b, u, shapes[pick_step], x, masks, pick_step)
        if msg_f is None or (not heatmap and (low is None or low > fan_step)):
            return self._result(rel, rec_of, sums, maps, acts, logits, targets)   # nothing more to do below
        return self._below(plan, call, incoming, msg_f, fan_step, masks, rec_of, keep, fit, b, u, k, u_of_k, group,
                           exclude_parallel, rel, low, x.dtype, logits, targets, sums, maps, acts)

    def _below(self, plan, call, incoming, msg_f, fan_step, masks, rec_of, keep, fit, b, u, k, u_of_k, group,
               exclude_parallel, rel, low, dtype, logits, targets, sums, maps, acts):
        """From the fan-out step to the input (or to `low`), per group of conditions."""
        saved = call.saved
        group = max(1, min(group or k, k))
        out_shape = None if rel is None else rel.shape[2:]
        # The denominators below the fan-out (stab(z), for the z+ rule a convolution with the
        # positive weights per layer) do not depend on the condition: every group but the last
        # keeps them in call.dens for the next (B rows each, the size of the forward's outputs),
        # the last frees each after its step.
        for g0 in range(0, k, group):
            idx = u_of_k[g0:g0 + group]
            g = idx.numel()
            last = g0 + group >= k
            call.saved = saved if last else list(saved)
            inc = P.fan_pending(incoming, fan_step, b, u, idx)
            inc[fan_step] = [P.fan(msg_f, b, u, idx)]

            def hook(i, msg, inc_, g0=g0, g=g):
                if i in masks:
                    mask, has = masks[i]
                    msg = fit(i, msg)
                    P.check_rows(msg, b, g, f"a conditioned layer ({plan.steps[i].describe()})")
                    msg = P.scale(msg, b, g, mask[:, g0:g0 + g])
                    if exclude_parallel:
                        hg = has[g0:g0 + g]
                        if bool(hg.all()):
                            P.scale_pending(inc_, i, b, g, None)
                        elif bool(hg.any()):
                            P.scale_pending(inc_, i, b, g, (~hg).to(dtype))
                if i in rec_of:
                    keep(i, msg, g, slice(g0, g0 + g))
                return msg

            r = P.propagate(plan, call, inc, fan_step, stop=low, at_step=hook, keep_denominators=not last)
            if low is not None:
                if inc[low] is not None:
                    hook(low, inc[low][0], inc)
            elif r is not None:
                rel[:, g0:g0 + g] = r.view(b, g, *out_shape)
        call.saved = saved
        return self._result(rel, rec_of, sums, maps, acts, logits, targets)

    def _pick(self, pick, msg_f, call, b, u, shape, x, masks, step):
        """rank(): each sample's top-k channels at the layer, from the relevance there (U = 1 row)."""
        c = shape[0]
        if pick.k > c:
            raise RelevanceError(f"CRP: rank(): k = {pick.k} is more than layer {pick.layer!r}'s {c} channels")
        if msg_f is None:
            allr = torch.zeros((b, c), dtype=x.dtype, device=x.device)
        else:
            r = P.relevance_of(msg_f, call)
            allr = r.view(b, u, c, -1).sum(-1)[:, 0]
        val, ch = allr.topk(pick.k, dim=1, largest=pick.largest)
        pick.channels, pick.relevance, pick.all = ch, val, allr
        mask = torch.zeros((b, pick.k, c), dtype=x.dtype, device=x.device)
        mask.scatter_(2, ch.unsqueeze(-1), 1)
        masks[step] = [mask, torch.ones(pick.k, dtype=torch.bool, device=x.device)]

    def _result(self, rel, rec_of, sums, maps, acts, logits, targets) -> CRPResult:
        relevances = {n: sums[i] for i, names in rec_of.items() for n in names}
        return CRPResult(
            heatmap=None if rel is None else rel.sum(2),
            relevance=rel, relevances=relevances,
            maps=None if maps is None else {n: maps[i] for i, names in rec_of.items() for n in names},
            activations=None if not acts else {n: acts[i] for i, names in rec_of.items() for n in names},
            prediction=logits, targets=targets)
