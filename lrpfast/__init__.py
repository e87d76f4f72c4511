"""lrpfast: Layer-wise Relevance Propagation for PyTorch at the speed of a backward pass."""
from ._ext import HAS_EXT, build_info, use_implementation
from . import ops
from .layers import (Reshape, relAdaptiveAvgPool2d, relAvgPool2d, relConv1d, relConv2d, relConv3d, relLinear,
                     relMaxPool1d, relMaxPool2d, relMaxPool3d, relReLU)
from . import models
from . import composites, rules  # LRP rules and composites (lrpfast.composites.get(name, **params))
from .lrp import LRP, Explanation
from .seed_compat import lrpMNIST

# Heatmaps, dataset-scale attribution and faithfulness (issue 6): loaded on first use, so that
# `import lrpfast` needs neither matplotlib/Pillow nor mlxtend nor tqdm.
_LAZY = {
    "heatmap": "heatmaps", "heatmap_grid": "heatmaps", "save_heatmap": "heatmaps", "save_heatmaps": "heatmaps",
    "save_grid": "heatmaps", "COLORMAPS": "heatmaps",
    "explain_dataset": "dataset", "open_relevance": "dataset", "RelevanceShards": "dataset",
    "pixel_flipping": "faithfulness", "aopc": "faithfulness", "compare_rules": "faithfulness",
    "quantus_explain_func": "faithfulness", "PixelFlippingResult": "faithfulness",
    "mnist_sample": "data", "mnist_split": "data",
    "render_tokens": "token_heatmaps", "save_token_html": "token_heatmaps", "print_tokens": "token_heatmaps",
    "render_explanation": "token_heatmaps",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lrpfast' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"
