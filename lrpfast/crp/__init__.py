"""Concept Relevance Propagation (Achtibat et al., Nature Machine Intelligence 2023) on lrpfast's pass.

    from lrpfast.crp import CondAttribution
    attr = CondAttribution(model, composite="epsilon_plus_flat")
    res = attr(x, [{"y": 3, "features.28": [7]}, {"y": 3, "features.28": [9, 11]}],
               record_layer=["features.28", "features.21"])
    res.heatmap                   # (B, K, H, W): one conditional heatmap per condition
    res.relevances["features.21"] # (B, K, C): concept relevances at that layer, per condition
    top = attr.rank(x, "features.28", k=5)   # top concepts, their shares and heatmaps in one call

The core (conditions, the shared pass, ranking) is lrpfast/crp/attribution.py; relevance
maximisation over a dataset and reference crops build on it (lrpfast/crp/maximization.py,
lrpfast/crp/crops.py).
"""
from .attribution import CondAttribution, ConceptRanking, CRPResult, layer_names
from .crops import reference_crops, save_concept_grid
from .maximization import ConceptIndex, open_index, relevance_maximization

__all__ = ["CondAttribution", "ConceptRanking", "CRPResult", "layer_names", "relevance_maximization", "open_index",
           "ConceptIndex", "reference_crops", "save_concept_grid"]
