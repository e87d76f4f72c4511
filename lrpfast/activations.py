"""The activations LRP passes relevance through unchanged (the pass rule: R_in = R_out, the
activation's x·(f(x)/x) held constant), as modules, functions and tensor methods.

Value per entry: (f(0) == 0, f(x) >= 0 everywhere): the first decides whether zeros stay zeros
(sparse relevance), the second whether a z+ / alpha-beta rule after it may trust x >= 0.
Kept apart from lrpfast/graph/ so that torch_transformers.py (which graph/trace.py imports) can read it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


ACTIVATIONS = {
    nn.ReLU: (True, True), nn.ReLU6: (True, True), nn.LeakyReLU: (True, False), nn.ELU: (True, False),
    nn.GELU: (True, False), nn.SiLU: (True, False), nn.Mish: (True, False), nn.Hardswish: (True, False),
    nn.Tanh: (True, False), nn.Softsign: (True, False), nn.PReLU: (True, False), nn.CELU: (True, False),
    nn.SELU: (True, False), nn.Sigmoid: (False, True), nn.Softplus: (False, True), nn.Hardsigmoid: (False, True),
    nn.Hardtanh: (True, False),
}
FUNCTIONAL_ACTIVATIONS = {
    F.relu6: (True, True), F.leaky_relu: (True, False), F.elu: (True, False), F.gelu: (True, False),
    F.silu: (True, False), F.mish: (True, False), F.hardswish: (True, False), F.hardtanh: (True, False),
    torch.tanh: (True, False), F.tanh: (True, False), torch.sigmoid: (False, True), F.sigmoid: (False, True),
    F.softplus: (False, True), F.hardsigmoid: (False, True), F.selu: (True, False), F.celu: (True, False),
    # clamp/clip: hardtanh with any bounds (f(0) = 0 and the sign depend on them: not counted on)
    torch.clamp: (False, False), torch.clip: (False, False), torch.clamp_min: (False, False),
    torch.clamp_max: (False, False),
}
RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
METHOD_ACTIVATIONS = {"relu": (True, True), "relu_": (True, True), "tanh": (True, False),
                      "sigmoid": (False, True), "tanh_": (True, False), "sigmoid_": (False, True),
                      **{m: (False, False) for m in ("clamp", "clip", "clamp_min", "clamp_max", "clamp_", "clip_",
                                                      "clamp_min_", "clamp_max_")}}
