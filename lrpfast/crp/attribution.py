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
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

OUTPUT = "y"   # the key of the model output in a condition (zennit-crp's MODEL_OUTPUT_NAME)


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
    raise NotImplementedError


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
        raise NotImplementedError

    def layer_names(self, x: Optional[torch.Tensor] = None) -> List[str]:
        """See lrpfast.crp.layer_names."""
        raise NotImplementedError

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
        raise NotImplementedError

    def relevances(self, x: torch.Tensor, layers: Sequence[str], target=None) -> Dict[str, torch.Tensor]:
        """Unconditional concept relevances (B, C) at several layers in one pass: the relevance at
        each layer's output summed over all dims after the channel dim. target: None (each
        sample's prediction), an int, or (B,) classes."""
        raise NotImplementedError

    def rank(self, x: torch.Tensor, layer: str, k: int = 5, target=None, *, heatmaps: bool = True,
             exclude_parallel: bool = True, largest: bool = True) -> ConceptRanking:
        """The top-k concepts (channels) of `layer` for each sample's prediction (or target), with
        their relevance shares and, with heatmaps=True, their conditional heatmaps, all from one
        forward and one pass: the pass computes the relevance at the layer, picks each sample's
        top-k channels there and fans out k masked copies below it. largest=False: the most
        negative concepts instead."""
        raise NotImplementedError
