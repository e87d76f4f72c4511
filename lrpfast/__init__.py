"""lrpfast: Layer-wise Relevance Propagation for PyTorch at the speed of a backward pass."""
from ._ext import HAS_EXT, build_info, use_implementation
from . import ops
from .layers import (Reshape, relAdaptiveAvgPool2d, relAvgPool2d, relConv1d, relConv2d, relConv3d, relLinear,
                     relMaxPool1d, relMaxPool2d, relMaxPool3d, relReLU)
from . import models

__version__ = "0.1.0"
