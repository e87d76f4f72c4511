"""zennit and captum LRP with the rule that matches the workload's, for `lrpfast bench`.

Both are optional: when one is not installed its row says so. Each gets its own deep copy of
the model (zennit hooks and canonises it, captum sets `.rule` attributes on it), with non-inplace
ReLUs, which captum requires and zennit's hooks prefer. Both start from the same initial
relevance as lrpfast (zennit: the grad_output we give; captum: the target output, its own choice).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn

from .impl import Impl, Skip, Workload, initial_relevance
from .workloads import chain_layers


def _own_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.ReLU):
            mod.inplace = False
    return m


# ----------------------------------------------------------------------------- zennit


def _zennit_composite(w: Workload):
    from zennit import composites as C
    from zennit.rules import Epsilon
    from zennit.types import Convolution

    # zennit's Epsilon adds eps with the sign of z (sign(0)=+1), our "sign"; "plus" is z + eps.
    eps = w.eps if w.stabilizer == "sign" else (lambda z: z + w.eps)
    canonizers = _zennit_canonizers(w)
    if w.composite == "epsilon":
        layer_map = C.layer_map_base(w.eps) + [(Convolution, Epsilon(epsilon=eps)), (nn.Linear, Epsilon(epsilon=eps))]
        return C.LayerMapComposite(layer_map=layer_map, canonizers=canonizers)
    simple = {"epsilon_plus": C.EpsilonPlus, "epsilon_plus_flat": C.EpsilonPlusFlat,
              "epsilon_alpha2_beta1": C.EpsilonAlpha2Beta1, "epsilon_alpha2_beta1_flat": C.EpsilonAlpha2Beta1Flat}
    if w.composite in simple:
        return simple[w.composite](epsilon=eps, stabilizer=w.eps, canonizers=canonizers)
    if w.composite == "epsilon_gamma_box":
        low = torch.full_like(w.x, w.params.get("low", -3.0))
        high = torch.full_like(w.x, w.params.get("high", 3.0))
        return C.EpsilonGammaBox(low=low, high=high, epsilon=eps, gamma=w.params.get("gamma", 0.25),
                                 stabilizer=w.eps, canonizers=canonizers)
    raise Skip(f"no zennit composite named {w.composite!r}")


def _zennit_canonizers(w: Workload):
    if w.model_name.startswith("resnet"):
        from zennit.torchvision import ResNetCanonizer

        return [ResNetCanonizer()]
    if w.model_name.startswith("vgg"):
        from zennit.torchvision import VGGCanonizer

        return [VGGCanonizer()]
    return None


def _transformer_layers(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.LayerNorm, nn.MultiheadAttention)) for m in model.modules())


def zennit_impl(w: Workload) -> Impl:
    try:
        import zennit  # noqa: F401
    except ImportError:
        raise Skip("zennit is not installed (pip install zennit)") from None
    if _transformer_layers(w.model):
        # its module hooks fail on nn.MultiheadAttention's tuple output (a RuntimeError otherwise)
        raise Skip("zennit has no rules for LayerNorm or attention")
    model = _own_copy(w.model)
    composite = _zennit_composite(w)
    stack = contextlib.ExitStack()
    # Hooks registered once, as zennit's attributors do when used as a context: the calls
    # then pay for hooked forward + backward only.
    modified = stack.enter_context(composite.context(model))

    def call():
        x = w.x.detach().requires_grad_(True)
        out = modified(x)
        (rel,) = torch.autograd.grad(out, x, initial_relevance(out.detach(), w.target, w.init))
        return rel

    return Impl("zennit", call, close=stack.close)


# ----------------------------------------------------------------------------- captum


class _FunctionalFlatten(nn.Module):
    """`after(before(x).flatten(1))`. Captum knows no nn.Flatten module (and its IdentityRule
    breaks on a shape change), but a functional flatten, like torchvision's VGG uses, is fine."""

    def __init__(self, before: nn.Module, after: nn.Module):
        super().__init__()
        self.before, self.after = before, after

    def forward(self, x):
        return self.after(self.before(x).flatten(1))


def _flatten_as_function(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Sequential):
        return model
    layers = list(model)
    cut = next((i for i, m in enumerate(layers) if isinstance(m, nn.Flatten)), None)
    if cut is None:
        return model
    if layers[cut].start_dim != 1 or layers[cut].end_dim != -1:
        raise Skip("captum: only Flatten(start_dim=1) can be replaced by a functional flatten")
    return _FunctionalFlatten(nn.Sequential(*layers[:cut]), _flatten_as_function(nn.Sequential(*layers[cut + 1:])))


def captum_impl(w: Workload) -> Impl:
    try:
        from captum.attr import LRP as CaptumLRP
        from captum.attr._utils.lrp_rules import EpsilonRule
    except ImportError:
        raise Skip("captum is not installed (pip install captum)") from None
    if w.composite != "epsilon":
        raise Skip(f"captum has no composite matching {w.composite!r} (ε rule only here)")
    if w.init != "logit":
        raise Skip("captum starts from the target output (init='logit') only")
    if _transformer_layers(w.model):
        raise Skip("captum's LRP has no rules for LayerNorm or attention")
    try:
        chain_layers(w.model)
    except NotImplementedError:
        raise Skip("captum's LRP has no rule for residual additions and refuses modules used twice "
                   "(ResNet's shared ReLUs)") from None
    model = _own_copy(w.model)
    with_rule = (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm2d)
    for mod in model.modules():
        if isinstance(mod, with_rule):
            mod.rule = EpsilonRule(epsilon=w.eps)  # captum's default epsilon is 1e-9
    lrp = CaptumLRP(_flatten_as_function(model))
    note = "sign stabiliser; max-pool x/(x+ε) factor" if w.stabilizer == "plus" else "max-pool x/(x+ε) factor"
    return Impl("captum", lambda: lrp.attribute(w.x.detach().requires_grad_(True), target=w.target), note=note)
