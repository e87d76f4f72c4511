"""Parity with zennit (0.5.1; a peer, installed by the test extras): the same rule, stabiliser
and initial relevance give the same maps, in float64.

- every rule on single layers (Linear, strided/grouped/padded convolutions), signed and
  non-negative inputs;
- every composite both libraries have, on seed_mnist_cnn (both variants), resnet18 and vgg16
  (random init, small inputs), zennit with its canonizers (SequentialMergeBatchNorm,
  ResNetCanonizer, VGGCanonizer), lrpfast with init="onehot" (zennit starts from the one-hot
  output gradient). Required: relative L2 ≤ 1e-5; asserted: ≤ 1e-10 (measured ~1e-15).

Two zennit conventions to know when comparing:
- its stabiliser is z + eps·sign(z) with sign(0) = +1, lrpfast's "sign" (the default);
- max pooling has no rule in its composites: the gradient routes relevance to the window's
  winner, lrpfast's winner-take-all (no ε factor);
- its BatchNorm merge leaves an "identity" BatchNorm behind that still divides by
  sqrt(1 + bn.eps): the canonized model differs from the original by ~5e-6 per BatchNorm
  (maps by ~1e-5 on resnet18). The resnet18 case sets bn.eps = 0 so that both libraries
  explain the same function (its statistics are randomised, so folding still matters).
  test_resnet18_zennit_bn_merge_deviation pins this with the default bn.eps = 1e-5 (issue 14,
  defect 5: relative L2 of order 1e-5..1e-4 between the two, growing with bn.eps and the number
  of BatchNorms; 2.8e-5 in that test, 1.6e-4 in the issue's setting):
  lrpfast equals a written-out float64 oracle of EpsilonPlusFlat on the original model, and
  zennit equals lrpfast on the function zennit's canonized model computes (every BatchNorm's
  affine part divided by sqrt(1 + eps)). The deviation is zennit's, not a rule difference.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrpfast
from lrpfast import composites
from lrpfast.models import seed_mnist_cnn
from lrpfast.rules import AlphaBeta, Epsilon, Flat, Gamma, LayerContext, Norm, Pass, WSquare, ZBox, ZPlus

zennit = pytest.importorskip("zennit")
torchvision = pytest.importorskip("torchvision")
from zennit import composites as zc  # noqa: E402
from zennit import rules as zr  # noqa: E402
from zennit import types as zt  # noqa: E402
from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import MergeBatchNorm, SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import LayerMapComposite  # noqa: E402
from zennit.layer import Sum  # noqa: E402
from zennit.torchvision import ResNetCanonizer, VGGCanonizer  # noqa: E402

F64 = torch.float64
TOL = 1e-10


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def zennit_relevance(model, composite, x, r_out):
    with Gradient(model, composite) as attributor:
        _, rel = attributor(x.detach().clone().requires_grad_(True), r_out)
    return rel.detach()


# ----------------------------------------------------------------------------- single layers

LAYERS = {
    "linear": (lambda: nn.Linear(12, 7), (12,)),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), (3, 9, 8)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 6, 3, padding=(2, 1), dilation=(2, 1), groups=2), (4, 8, 7)),
    "conv1d": (lambda: nn.Conv1d(2, 4, 4, stride=3), (2, 17)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, padding=1), (2, 4, 3, 4)),
}


def _rule_pairs(x):
    reduce = [d for d in range(x.dim()) if d != 1] if x.dim() > 2 else [0]
    low = x.amin(dim=reduce, keepdim=True) - 0.5
    high = x.amax(dim=reduce, keepdim=True) + 0.5
    return {
        "epsilon": (Epsilon(1e-3), zr.Epsilon(1e-3)),
        "lrp0": (Epsilon(0.0), zr.Epsilon(0.0)),
        "zplus": (ZPlus(1e-6), zr.ZPlus(1e-6)),
        "alpha2beta1": (AlphaBeta(2, 1, 1e-6), zr.AlphaBeta(2, 1, 1e-6)),
        "alpha1beta0": (AlphaBeta(1, 0, 1e-6), zr.AlphaBeta(1, 0, 1e-6)),
        "gamma": (Gamma(0.25, 1e-6), zr.Gamma(0.25, 1e-6)),
        "gamma_big": (Gamma(2.0, 1e-6), zr.Gamma(2.0, 1e-6)),
        "zbox": (ZBox(low, high, 1e-6), zr.ZBox(low, high, 1e-6)),
        "flat": (Flat(1e-6), zr.Flat(1e-6)),
        "wsquare": (WSquare(1e-6), zr.WSquare(1e-6, zero_params=["bias"])),  # lrpfast: no b² (Montavon et al.)
        "norm": (Norm(1e-6), zr.Norm(1e-6)),
    }


RULE_NAMES = list(_rule_pairs(torch.zeros(1, 2)).keys())


@pytest.mark.parametrize("sign", ["signed", "nonneg"])
@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_rule_matches_zennit_on_a_layer(rule_name, layer_name, sign):
    make, shape = LAYERS[layer_name]
    layer = make().double().eval()
    x = torch.randn(3, *shape, dtype=F64)
    if sign == "nonneg":
        x = x.relu()
    ours, theirs = _rule_pairs(x)[rule_name]
    with torch.no_grad():
        z = layer(x)
    r = torch.randn_like(z)
    kind = "linear" if isinstance(layer, nn.Linear) else "conv"
    ctx = LayerContext("layer", layer, kind, x, z, layer.weight.detach(), layer.bias.detach(),
                       x_nonnegative=(sign == "nonneg"))
    got = ours.relprop(ctx, r)
    want = zennit_relevance(layer, LayerMapComposite([(type(layer), theirs)]), x, r)
    assert rel_l2(got, want) <= TOL, f"{rule_name} on {layer_name} ({sign}): {rel_l2(got, want):.3g}"


def test_pass_matches_zennit():
    act = nn.ReLU()
    x = torch.randn(2, 5, dtype=F64)
    r = torch.randn(2, 5, dtype=F64)
    want = zennit_relevance(act, LayerMapComposite([(nn.ReLU, zr.Pass())]), x, r)
    ctx = LayerContext("act", act, "linear", x, x.relu(), torch.zeros(1, 1, dtype=F64), None)
    assert torch.equal(Pass().relprop(ctx, r), want)


# ----------------------------------------------------------------------------- whole models


def _layer_map_base(eps):
    return [(zt.Activation, zr.Pass()), (Sum, zr.Norm(stabilizer=eps)), (zt.AvgPool, zr.Norm(stabilizer=eps)),
            (zt.BatchNorm, zr.Pass())]


def zennit_composite(name, canonizer, low=None, high=None):
    """zennit's composite of that name (defaults: epsilon = stabilizer = 1e-6, gamma 0.25)."""
    canonizers = [canonizer()]
    if name == "epsilon":  # not a zennit composite: ε on every Linear/Conv
        return LayerMapComposite(_layer_map_base(1e-6) + [(zt.Convolution, zr.Epsilon(1e-6)),
                                                          (nn.Linear, zr.Epsilon(1e-6))], canonizers=canonizers)
    cls = {"epsilon_plus": zc.EpsilonPlus, "epsilon_plus_flat": zc.EpsilonPlusFlat,
           "epsilon_gamma_box": zc.EpsilonGammaBox, "epsilon_alpha2_beta1": zc.EpsilonAlpha2Beta1,
           "epsilon_alpha2_beta1_flat": zc.EpsilonAlpha2Beta1Flat}[name]
    if name == "epsilon_gamma_box":
        return cls(low=low, high=high, canonizers=canonizers)
    return cls(canonizers=canonizers)


COMPOSITES = ["epsilon", "epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1",
              "epsilon_alpha2_beta1_flat"]


def _randomize_batchnorm(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.0  # see the module docstring: zennit's merge leaves sqrt(1 + eps) behind
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _setup(model_name):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if model_name.startswith("seed"):
        model = seed_mnist_cnn(model_name.split("_", 1)[1]).double().eval()
        x = torch.rand(3, 1, 28, 28, generator=g, dtype=F64)  # pixels in [0, 1]
        low, high = torch.zeros(1, 1, 1, 1, dtype=F64), torch.ones(1, 1, 1, 1, dtype=F64)
        return model, x, low, high, SequentialMergeBatchNorm
    if model_name == "resnet18":
        model = _randomize_batchnorm(torchvision.models.resnet18()).double().eval()
        canonizer = ResNetCanonizer
    else:
        model = torchvision.models.vgg16().double().eval()
        canonizer = VGGCanonizer
    # normalised images: per-channel bounds of the normalised [0, 1] range
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=F64).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=F64).reshape(1, 3, 1, 1)
    x = (torch.rand(2, 3, 32, 32, generator=g, dtype=F64) - mean) / std
    return model, x, -mean / std, (1 - mean) / std, canonizer


_MODELS: dict = {}


def _model(name):
    if name not in _MODELS:
        _MODELS.clear()  # one big model in memory at a time
        _MODELS[name] = _setup(name)
    return _MODELS[name]


MODELS = ["seed_notebook", "seed_conv3x2", "resnet18", pytest.param("vgg16", marks=pytest.mark.slow)]


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("model_name", MODELS)
def test_composite_matches_zennit(model_name, composite):
    model, x, low, high, canonizer = _model(model_name)
    with torch.no_grad():
        target = model(x).argmax(1)
    classes = 10 if model_name.startswith("seed") else 1000
    want = zennit_relevance(model, zennit_composite(composite, canonizer, low, high), x,
                            torch.eye(classes, dtype=F64)[target])
    params = {"low": low, "high": high} if composite == "epsilon_gamma_box" else {}
    got = lrpfast.LRP(model, composite=composite, init="onehot", **params)(x, target)
    err = rel_l2(got, want)
    assert err <= TOL, f"{composite} on {model_name}: relative L2 {err:.3g} vs zennit"


def test_parity_of_the_composite_object_and_the_name():
    """composites.get(...) passed as an object gives what the name gives."""
    model, x, low, high, _ = _model("seed_notebook")
    by_name = lrpfast.LRP(model, composite="epsilon_gamma_box", init="onehot", low=low, high=high)(x)
    by_object = lrpfast.LRP(model, composite=composites.get("epsilon_gamma_box", low=low, high=high),
                            init="onehot")(x)
    assert torch.equal(by_name, by_object)


# ----------------------------------------------------------------------------- resnet18, bn.eps != 0


def _stab(z, eps=1e-6):
    """z + eps·sign(z), sign(0) = +1: the stabiliser of every rule below (both libraries' default)."""
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z)


def _folded(conv, bn):
    """Weight and bias of bn(conv(x)) in eval mode, exactly (the definition of the merge)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale[:, None, None, None], bias


def _conv(x, conv, w, b=None):
    return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_back(x_shape, conv, w, s):
    """sum over outputs j of w_ij s_j: the transposed convolution (the input gradient)."""
    return torch.nn.grad.conv2d_input(x_shape, w, s, conv.stride, conv.padding, conv.dilation, conv.groups)


def _zplus(x, conv, w, b, r):
    """z+ as zennit and lrpfast define it (zennit ZPlus = α1β0 for signed inputs): positive
    contributions x⁺w⁺ + x⁻w⁻ + b⁺ in the denominator, relevance to x⁺w⁺ and x⁻w⁻."""
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
    s = r / _stab(_conv(xp, conv, wp, b.clamp(min=0)) + _conv(xn, conv, wn))
    return xp * _conv_back(x.shape, conv, wp, s) + xn * _conv_back(x.shape, conv, wn, s)


def _flat(x, conv, r):
    ones = torch.ones_like(conv.weight)
    s = r / _stab(_conv(torch.ones_like(x), conv, ones))
    return _conv_back(x.shape, conv, ones, s)


def oracle_epsilon_plus_flat(model, x, target):
    """EpsilonPlusFlat on torchvision's resnet18, written out from the rules' definitions, float64:
    BatchNorm folded exactly into the convolution before it; flat on conv1; z+ on every other
    convolution (downsample included); ε on fc; the ε-normalisation (Norm) on the residual sums
    and the average pool; max pooling winner-take-all; ReLUs pass. Initial relevance: the target
    logit."""
    stem = torch.relu(_conv(x, model.conv1, *_folded(model.conv1, model.bn1)))
    h, where = F.max_pool2d(stem, model.maxpool.kernel_size, model.maxpool.stride, model.maxpool.padding,
                            return_indices=True)
    saved = []
    for block in [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]:
        w1, b1 = _folded(block.conv1, block.bn1)
        w2, b2 = _folded(block.conv2, block.bn2)
        u = torch.relu(_conv(h, block.conv1, w1, b1))
        m = _conv(u, block.conv2, w2, b2)
        down = None if block.downsample is None else _folded(block.downsample[0], block.downsample[1])
        ident = h if down is None else _conv(h, block.downsample[0], *down)
        saved.append((block, h, u, m, ident, (w1, b1), (w2, b2), down))
        h = torch.relu(ident + m)
    pooled = h.mean(dim=(2, 3))
    logits = pooled @ model.fc.weight.T + model.fc.bias
    r = torch.zeros_like(logits).scatter_(1, target.view(-1, 1), logits.gather(1, target.view(-1, 1)))

    r = pooled * ((r / _stab(logits)) @ model.fc.weight)  # ε
    r = h * (r / _stab(pooled))[:, :, None, None] / (h.shape[2] * h.shape[3])  # Norm on the average
    for block, h, u, m, ident, (w1, b1), (w2, b2), down in reversed(saved):
        s = r / _stab(ident + m)  # Norm on the sum
        r_ident, r_main = ident * s, m * s
        r = _zplus(h, block.conv1, w1, b1, _zplus(u, block.conv2, w2, b2, r_main))
        r = r + (r_ident if down is None else _zplus(h, block.downsample[0], *down, r_ident))
    r = torch.zeros_like(stem).flatten(2).scatter_add_(2, where.flatten(2), r.flatten(2)).view_as(stem)
    return _flat(x, model.conv1, r), logits


def _as_zennit_computes(model):
    """A copy of the model that computes what zennit's canonized model computes: its merge leaves
    an identity BatchNorm (mean 0, var 1, weight 1, bias 0) that still divides by sqrt(1 + eps), so
    each BatchNorm's affine part ends up divided by sqrt(1 + eps)."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.div_((1 + m.eps) ** 0.5)
                m.bias.div_((1 + m.eps) ** 0.5)
    return twin


def test_resnet18_zennit_bn_merge_deviation(monkeypatch):
    """Issue 14, defect 5: with the default bn.eps (1e-5) resnet18 maps differ from zennit's
    (EpsilonPlusFlat, ResNetCanonizer, float64, randomised BatchNorm statistics, init = the target
    logit). The residual sums, the average pool, the downsample merge and z+ agree (bn.eps = 0:
    ~1e-15 in test_composite_matches_zennit); the whole difference is zennit's merge leaving
    1/sqrt(1 + eps) per BatchNorm behind. lrpfast follows the definition on the model as given."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.eps == 1e-5  # torchvision's default, kept
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model = model.double().eval()
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=F64)
    with torch.no_grad():
        logits = model(x)
    target = logits.argmax(1)
    onehot = torch.eye(1000, dtype=F64)[target]

    # zennit: its attributor's own output (the canonized model's) times the one-hot: init = logit.
    with Gradient(model, zennit_composite("epsilon_plus_flat", ResNetCanonizer)) as attributor:
        z_out, z_rel = attributor(x.clone().requires_grad_(True), lambda out: out * onehot)
    ours = lrpfast.LRP(model, composite="epsilon_plus_flat", init="logit")(x, target)

    # 1. lrpfast = the rule's definition on this model.
    with torch.no_grad():
        want, oracle_logits = oracle_epsilon_plus_flat(model, x, target)
    assert rel_l2(oracle_logits, logits) <= 1e-13  # the exact fold computes the model
    assert rel_l2(ours, want) <= TOL, f"lrpfast vs the written-out oracle: {rel_l2(ours, want):.3g}"

    # 2. zennit explains another function: its canonized model's outputs are off by ~1e-5, and its
    #    maps by as much (measured: outputs 3.0e-5, maps 2.8e-5 here).
    assert 1e-6 < rel_l2(z_out.detach(), logits) < 1e-3
    assert 1e-6 < rel_l2(z_rel, ours) < 1e-3, f"zennit vs lrpfast: {rel_l2(z_rel, ours):.3g}"

    # 3. ... exactly the function of _as_zennit_computes: lrpfast on it reproduces zennit.
    twin = _as_zennit_computes(model)
    with torch.no_grad():
        assert rel_l2(twin(x), z_out.detach()) <= 1e-13
    theirs = lrpfast.LRP(twin, composite="epsilon_plus_flat", init="logit")(x, target)
    assert rel_l2(theirs, z_rel) <= TOL, f"lrpfast on zennit's function vs zennit: {rel_l2(theirs, z_rel):.3g}"

    # 4. The cause: an exact merge (identity BatchNorm with var = 1 - eps) removes the difference.
    merge = MergeBatchNorm.merge_batch_norm

    def exact_merge(modules, batch_norm):
        merge(modules, batch_norm)
        batch_norm.running_var.data = torch.ones_like(batch_norm.running_var.data) - batch_norm.eps

    monkeypatch.setattr(MergeBatchNorm, "merge_batch_norm", staticmethod(exact_merge))
    with Gradient(model, zennit_composite("epsilon_plus_flat", ResNetCanonizer)) as attributor:
        _, fixed = attributor(x.clone().requires_grad_(True), onehot * logits)
    assert rel_l2(fixed, ours) <= TOL, f"zennit with an exact merge vs lrpfast: {rel_l2(fixed, ours):.3g}"
