"""The seed-style baseline: the seed notebook's LRP algorithm, re-implemented for benchmarks
from ../shared/seed/SEED-REFERENCE.md (a description; no seed code copied).

What it keeps from the seed, because that is what makes it slow:
- autograd left on: no torch.no_grad, so the forward and every relprop step record graphs
  through the weights (B13);
- Linear: a batched matrix-vector product over an expanded Wᵀ (torch.bmm over a stride-0 view:
  B GEMVs instead of one GEMM, B11);
- Conv2d: conv_transpose2d with the raw weight and the seed's output_padding;
- MaxPool2d: the forward's indices are not kept: relprop recomputes them with a second
  max_pool2d and scatters with max_unpool2d (B14), then multiplies by the input, which scales the
  winner by x/(x+ε) (DESIGN.md §1);
- stabiliser z + 1e-6 (no sign, B6), full-size temporaries s, e, c per layer;
- in-place ReLU that turns the previous layer's cached output into relu(z) (B2; harmless for the
  numbers, and it is the memory the seed used);
- initial relevance logit · one-hot(target), target = argmax unless given.
What it does not keep: the wrong results for batch > 1 (B1: every sample is right here), the
missing `output_size` of max_unpool2d (odd sizes work), the squeeze bugs.
Beyond the seed's layer set it passes eval-mode Dropout and an AdaptiveAvgPool2d that does not
change the size (VGG at 224×224) as identities, so VGG16 can be measured too.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

SEED_EPS = 1e-6  # fixed in the seed (B7)


class _Step:
    """One wrapped layer: forward caches input and output as the seed's hooks did (`.data`
    aliases, so the in-place ReLU after it rewrites the cached output)."""

    input: torch.Tensor
    output: torch.Tensor

    def forward(self, x):
        raise NotImplementedError

    def relprop(self, r):
        raise NotImplementedError


class _Linear(_Step):
    def __init__(self, m: nn.Linear):
        self.m = m

    def forward(self, x):
        z = F.linear(x, self.m.weight, self.m.bias)
        self.input, self.output = x.data, z.data
        return z

    def relprop(self, r):
        w = self.m.weight
        b, (out_f, in_f) = r.shape[0], w.shape
        s = self.output + SEED_EPS
        e = r / s
        c = torch.bmm(w.t().expand(b, in_f, out_f), e.unsqueeze(-1)).squeeze(-1)
        return self.input * c


class _Conv2d(_Step):
    def __init__(self, m: nn.Conv2d):
        if m.groups != 1 or tuple(m.dilation) != (1, 1) or isinstance(m.padding, str) or m.padding_mode != "zeros":
            raise NotImplementedError("the seed's relConv2d handles neither groups, dilation, string padding "
                                      "nor padding modes")
        self.m = m

    def forward(self, x):
        z = self.m(x)
        self.input, self.output = x.data, z.data
        return z

    def relprop(self, r):
        m = self.m
        s = self.output + SEED_EPS
        e = r / s
        # the seed's output_padding: X_in - ((X_out - 1) * S + K - 2P), per spatial dim
        out_pad = [xi - ((xo - 1) * st + k - 2 * p) for xi, xo, st, k, p in
                   zip(self.input.shape[2:], self.output.shape[2:], m.stride, m.kernel_size, m.padding)]
        c = F.conv_transpose2d(e, m.weight, stride=m.stride, padding=m.padding, output_padding=out_pad)
        return self.input * c


class _MaxPool2d(_Step):
    def __init__(self, m: nn.MaxPool2d):
        self.m = m

    def forward(self, x):
        m = self.m
        z = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        self.input, self.output = x.data, z.data
        return z

    def relprop(self, r):
        m = self.m
        _, switches = F.max_pool2d(self.input, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                                   return_indices=True)
        s = self.output + SEED_EPS
        e = r / s
        c = F.max_unpool2d(e, switches, m.kernel_size, m.stride, m.padding, output_size=self.input.shape[-2:])
        return self.input * c


class _ReLU(_Step):
    def forward(self, x):
        return torch.relu_(x)  # in place, as the seed's relReLU(layer) ran (B2)

    def relprop(self, r):
        return r


class _Identity(_Step):
    def forward(self, x):
        return x

    def relprop(self, r):
        return r


class _Flatten(_Step):
    def forward(self, x):
        self.sizes = x.shape[1:]
        return x.view(x.shape[0], -1)

    def relprop(self, r):
        return r.view(-1, *self.sizes)


class _SameSizeAdaptiveAvgPool(_Step):
    def __init__(self, m: nn.AdaptiveAvgPool2d):
        self.size = m.output_size

    def forward(self, x):
        size = self.size if isinstance(self.size, (tuple, list)) else (self.size, self.size)
        if tuple(x.shape[-2:]) != tuple(size):
            raise NotImplementedError("the seed has no average pooling (AdaptiveAvgPool2d changing the size)")
        return x

    def relprop(self, r):
        return r


def _wrap(m: nn.Module) -> _Step:
    if type(m) is nn.Linear:
        return _Linear(m)
    if type(m) is nn.Conv2d:
        return _Conv2d(m)
    if type(m) is nn.MaxPool2d:
        return _MaxPool2d(m)
    if type(m) is nn.ReLU:
        return _ReLU()
    if type(m) is nn.Flatten:
        return _Flatten()
    if type(m) is nn.Dropout:
        return _Identity()
    if type(m) is nn.AdaptiveAvgPool2d:
        return _SameSizeAdaptiveAvgPool(m)
    raise NotImplementedError(f"the seed-style baseline has no rule for {type(m).__name__} "
                              "(the seed knew Linear, Conv2d, MaxPool2d, ReLU and Reshape)")


class SeedStyleLRP:
    """`SeedStyleLRP(layers)(x, target=None)` -> input relevance, the seed's way (see the module
    docstring). `layers`: the model as a chain of leaf modules (weights shared, not copied)."""

    def __init__(self, layers: List[nn.Module]):
        self.steps = [_wrap(m) for m in layers]

    def __call__(self, x: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = x
        for step in self.steps:
            h = step.forward(h)
        o = h.detach()
        t = o.argmax(1) if target is None else target
        r = o * torch.zeros_like(o).scatter(1, t.view(-1, 1), 1)
        for step in reversed(self.steps):
            r = step.relprop(r)
        return r  # like the seed: not detached
