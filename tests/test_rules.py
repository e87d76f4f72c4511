"""lrpfast.rules: every rule on Linear and Conv1d/2d/3d against a closed-form reference.

Oracle: the layer written as a dense matrix M (n_out x n_in, built by applying torch's own layer
to the identity basis, so stride, padding incl. 'same', dilation and groups are torch's), and
each rule written per connection (i, j) from its textbook definition: contributions
P_ji = x_i M_ji, z+ = Σ_i (P_ji)+ + b+, ... in float64. This shares nothing with lrpfast's
implementation (no paired channels, no z- = z - z+, no cached weights). Further oracles:
conservation (Σ R_in = Σ R_out with zero bias), K targets = K runs; extension = fallback only as an
extra check next to the closed form.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrpfast
from lrpfast import modified_weights, ops
from lrpfast.ops import RelevanceError
from lrpfast.rules import (AlphaBeta, Epsilon, Flat, Gamma, LayerContext, LRP0, Norm, Pass, WSquare, ZBox, ZPlus)

from .conftest import IMPLEMENTATIONS, rel_err

F64 = torch.float64
EPS = 1e-6

# ----------------------------------------------------------------------------- layers and contexts

LAYERS = {
    "linear": lambda: nn.Linear(7, 5),
    "linear3d_input": lambda: nn.Linear(6, 4),  # x of shape (B, T, C)
    "conv1d_stride_pad": lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1),
    "conv2d_plain": lambda: nn.Conv2d(3, 4, 3),
    "conv2d_groups_dilation": lambda: nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
    "conv2d_same_even": lambda: nn.Conv2d(2, 4, 4, padding="same", dilation=2, groups=2),
    "conv2d_depthwise": lambda: nn.Conv2d(3, 3, 3, padding=1, groups=3),
    "conv3d": lambda: nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1)),
}
INPUT_SHAPES = {
    "linear": (7,),
    "linear3d_input": (3, 6),
    "conv1d_stride_pad": (3, 9),
    "conv2d_plain": (3, 6, 5),
    "conv2d_groups_dilation": (4, 7, 6),
    "conv2d_same_even": (2, 7, 6),
    "conv2d_depthwise": (3, 5, 5),
    "conv3d": (2, 4, 5, 3),
}


def make_layer(name: str, bias: bool = True) -> nn.Module:
    layer = LAYERS[name]().double().eval()
    if not bias:
        layer.bias = None
    return layer


def make_ctx(layer: nn.Module, x: torch.Tensor, x_nonnegative: bool = False, name: str = "layer",
             output_feeds_relu: bool = False) -> LayerContext:
    with torch.no_grad():
        z = layer(x)
    kind = "linear" if isinstance(layer, nn.Linear) else "conv"
    extra = {}
    if kind == "conv":
        extra = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    return LayerContext(name, layer, kind, x, z, layer.weight.detach(),
                        None if layer.bias is None else layer.bias.detach(), x_nonnegative=x_nonnegative,
                        output_feeds_relu=output_feeds_relu, **extra)


def apply_layer(layer, t, weight=None, bias=None):
    """torch's own layer with replaced parameters (the oracle's only use of the layer)."""
    w = layer.weight if weight is None else weight
    if isinstance(layer, nn.Linear):
        return F.linear(t, w, bias)
    return layer._conv_forward(t, w, bias)


# ----------------------------------------------------------------------------- the closed-form oracle


def dense_form(layer, per_sample_shape):
    """M (n_out, n_in), b (n_out), connected (n_out, n_in) of the layer on flattened samples."""
    n_in = math.prod(per_sample_shape)
    basis = torch.eye(n_in, dtype=F64).reshape(n_in, *per_sample_shape)
    with torch.no_grad():
        m = apply_layer(layer, basis).reshape(n_in, -1).T.contiguous()
        ones = apply_layer(layer, basis, weight=torch.ones_like(layer.weight)).reshape(n_in, -1).T
        zero_in = torch.zeros(1, *per_sample_shape, dtype=F64)
        b = apply_layer(layer, zero_in, bias=layer.bias).reshape(-1)
    return m, b, (ones != 0).to(F64)


def stab(z, eps):
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def div0(a, b):
    return torch.where(b == 0, torch.zeros_like(a), a / b)


def reference(rule: str, layer, x, r, eps=EPS, gamma=0.25, alpha=2.0, beta=1.0, low=None, high=None):
    """R_in from the per-connection definition of `rule` (DESIGN.md §1)."""
    b_rows = x.shape[0]
    k = r.shape[0] // b_rows
    m, bvec, conn = dense_form(layer, x.shape[1:])
    xf = x.reshape(b_rows, -1).repeat_interleave(k, 0)            # (KB, n_in)
    rf = r.reshape(r.shape[0], -1)                               # (KB, n_out)
    p = xf[:, None, :] * m[None]                                 # contributions (KB, n_out, n_in)
    pp, pn = p.clamp(min=0), p.clamp(max=0)
    bp, bn = bvec.clamp(min=0), bvec.clamp(max=0)

    def spread(numer, denom):  # Σ_j numer_ji r_j / stab(denom_j)
        return (numer * div0(rf, stab(denom, eps))[..., None]).sum(1)

    if rule == "epsilon":
        out = spread(p, p.sum(-1) + bvec)
    elif rule == "zplus":
        out = spread(pp, pp.sum(-1) + bp)
    elif rule == "alpha_beta":
        out = alpha * spread(pp, pp.sum(-1) + bp) - beta * spread(pn, pn.sum(-1) + bn)
    elif rule == "gamma":
        z = p.sum(-1) + bvec
        num_p, num_n = p + gamma * pp, p + gamma * pn
        zp, zn = num_p.sum(-1) + bvec + gamma * bp, num_n.sum(-1) + bvec + gamma * bn
        out = ((num_p * (div0(rf, stab(zp, eps)) * (z > 0))[..., None]).sum(1)
               + (num_n * (div0(rf, stab(zn, eps)) * (z < 0))[..., None]).sum(1))
    elif rule == "zbox":
        lo = torch.broadcast_to(low, x.shape).reshape(b_rows, -1).repeat_interleave(k, 0)
        hi = torch.broadcast_to(high, x.shape).reshape(b_rows, -1).repeat_interleave(k, 0)
        numer = p - lo[:, None, :] * m.clamp(min=0)[None] - hi[:, None, :] * m.clamp(max=0)[None]
        out = spread(numer, numer.sum(-1))
    elif rule == "flat":
        numer = conn.expand(rf.shape[0], -1, -1)
        out = spread(numer, numer.sum(-1))
    elif rule == "wsquare":
        numer = (m * m).expand(rf.shape[0], -1, -1)
        out = spread(numer, numer.sum(-1))
    else:
        raise ValueError(rule)
    return out.reshape(r.shape[0], *x.shape[1:])


def make_rule(rule: str, x_like=None, **kw):
    if rule == "epsilon":
        return Epsilon(EPS)
    if rule == "zplus":
        return ZPlus(EPS)
    if rule == "alpha_beta":
        return AlphaBeta(kw.get("alpha", 2.0), kw.get("beta", 1.0), EPS)
    if rule == "gamma":
        return Gamma(kw.get("gamma", 0.25), EPS)
    if rule == "zbox":
        return ZBox(kw["low"], kw["high"], EPS)
    if rule == "flat":
        return Flat(EPS)
    if rule == "wsquare":
        return WSquare(EPS)
    raise ValueError(rule)


def bounds_for(x: torch.Tensor, per_channel_dim: int):
    """Per-channel bounds (shape (1, C, 1, ...) or (C,) for Linear) that hold x."""
    reduce = [d for d in range(x.dim()) if d != per_channel_dim]
    low = x.amin(dim=reduce, keepdim=True) - 0.3
    high = x.amax(dim=reduce, keepdim=True) + 0.2
    return low, high


RULES = ["epsilon", "zplus", "alpha_beta", "gamma", "zbox", "flat", "wsquare"]


def _inputs(layer_name: str, sign: str, batch: int = 2):
    x = torch.randn(batch, *INPUT_SHAPES[layer_name], dtype=F64)
    if sign == "nonneg":
        x = x.relu()
    return x


def _rule_kwargs(rule, x, layer_name):
    if rule != "zbox":
        return {}
    low, high = bounds_for(x, x.dim() - 1 if layer_name.startswith("linear") else 1)
    return {"low": low, "high": high}


# ----------------------------------------------------------------------------- the oracle tests


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("sign", ["signed", "nonneg"])
@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("rule", RULES)
def test_rule_matches_closed_form(rule, layer_name, sign, impl):
    layer = make_layer(layer_name)
    x = _inputs(layer_name, sign)
    kw = _rule_kwargs(rule, x, layer_name)
    ctx = make_ctx(layer, x, x_nonnegative=(sign == "nonneg"))
    r = torch.randn_like(ctx.z)
    out = make_rule(rule, **kw).relprop(ctx, r)
    ref = reference(rule, layer, x, r, **kw)
    assert out.shape == x.shape and out.dtype == F64
    assert rel_err(out, ref) < 1e-10, f"{rule} on {layer_name} ({sign})"


@pytest.mark.parametrize("layer_name", ["linear", "conv2d_groups_dilation", "conv2d_same_even", "conv3d"])
@pytest.mark.parametrize("rule", RULES)
def test_k_targets_equal_single_runs(rule, layer_name):
    """r with K maps per sample (rows b*K + k) equals K separate runs."""
    layer = make_layer(layer_name)
    x = _inputs(layer_name, "signed", batch=3)
    kw = _rule_kwargs(rule, x, layer_name)
    ctx = make_ctx(layer, x)
    k = 3
    r = torch.randn(3 * k, *ctx.z.shape[1:], dtype=F64)
    out = make_rule(rule, **kw).relprop(ctx, r)
    for t in range(k):
        single = make_rule(rule, **kw).relprop(make_ctx(layer, x), r[t::k].contiguous())
        assert rel_err(out[t::k], single) < 1e-12
    assert rel_err(out, reference(rule, layer, x, r, **kw)) < 1e-10


@pytest.mark.parametrize("layer_name", ["linear", "conv1d_stride_pad", "conv2d_groups_dilation", "conv2d_depthwise"])
@pytest.mark.parametrize("rule", ["zplus", "gamma", "alpha_beta"])
def test_runtime_sign_check_equals_flag(rule, layer_name):
    """x ≥ 0 found by reading x gives the flag's result (and the flag is only a shortcut)."""
    layer = make_layer(layer_name)
    x = _inputs(layer_name, "nonneg")
    r = torch.randn_like(make_ctx(layer, x).z)
    a = make_rule(rule).relprop(make_ctx(layer, x, x_nonnegative=True), r)
    b = make_rule(rule).relprop(make_ctx(layer, x, x_nonnegative=False), r)
    assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("sign", ["signed", "nonneg"])
@pytest.mark.parametrize("layer_name", ["linear", "conv2d_groups_dilation", "conv3d"])
def test_gamma_one_branch_when_relevance_follows_relu(layer_name, sign):
    """Relevance that is 0 where z ≤ 0 (it came back through a ReLU): the one-branch path
    (flag or check) equals the closed form."""
    layer = make_layer(layer_name)
    x = _inputs(layer_name, sign)
    ctx = make_ctx(layer, x)
    r = torch.randn_like(ctx.z) * (ctx.z > 0)
    ref = reference("gamma", layer, x, r)
    for flag in (False, True):
        out = Gamma(0.25, EPS).relprop(make_ctx(layer, x, output_feeds_relu=flag), r)
        assert rel_err(out, ref) < 1e-10


@pytest.mark.parametrize("rule", ["gamma", "zplus", "epsilon"])
def test_rules_without_raw_z_survive_an_inplace_relu(rule):
    """needs_raw_z = False: with the output feeding a ReLU that the pass runs in place (z is then
    relu(z)), the result is unchanged, through relprop and through the fused path."""
    layer = make_layer("conv2d_groups_dilation")
    x = _inputs("conv2d_groups_dilation", "nonneg")
    ctx = make_ctx(layer, x, x_nonnegative=True, output_feeds_relu=True)
    r = torch.randn_like(ctx.z) * (ctx.z > 0)
    ref = reference(rule, layer, x, r)
    assert not make_rule(rule).needs_raw_z
    ctx.z = ctx.z.relu()
    assert rel_err(make_rule(rule).relprop(ctx, r), ref) < 1e-10
    rule_obj = make_rule(rule)
    z_prime, eps, stabilizer = rule_obj.denominator(ctx)
    assert rel_err(rule_obj.relprop_from_s(ctx, ops.stab_div(r, z_prime, eps, stabilizer)), ref) < 1e-10


@pytest.mark.parametrize("gamma", [0.0, 0.1, 1.0, 5.0])
def test_gamma_values(gamma):
    layer = make_layer("conv2d_groups_dilation")
    x = _inputs("conv2d_groups_dilation", "signed")
    ctx = make_ctx(layer, x)
    r = torch.randn_like(ctx.z)
    assert rel_err(Gamma(gamma, EPS).relprop(ctx, r), reference("gamma", layer, x, r, gamma=gamma)) < 1e-10


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (2.0, 1.0), (1.5, 0.5), (3.0, 2.0)])
def test_alpha_beta_values(alpha, beta):
    layer = make_layer("conv1d_stride_pad")
    x = _inputs("conv1d_stride_pad", "signed")
    ctx = make_ctx(layer, x)
    r = torch.randn_like(ctx.z)
    out = AlphaBeta(alpha, beta, EPS).relprop(ctx, r)
    assert rel_err(out, reference("alpha_beta", layer, x, r, alpha=alpha, beta=beta)) < 1e-10


def test_zplus_is_alpha1_beta0():
    layer = make_layer("conv2d_plain")
    x = _inputs("conv2d_plain", "signed")
    ctx = make_ctx(layer, x)
    r = torch.randn_like(ctx.z)
    assert rel_err(ZPlus(EPS).relprop(ctx, r), AlphaBeta(1, 0, EPS).relprop(make_ctx(layer, x), r)) < 1e-13


@pytest.mark.parametrize("layer_name", ["linear", "conv2d_plain", "conv2d_same_even"])
def test_epsilon_lrp0_norm(layer_name):
    layer = make_layer(layer_name)
    x = _inputs(layer_name, "signed")
    ctx = make_ctx(layer, x)
    r = torch.randn_like(ctx.z)
    assert rel_err(Epsilon(EPS).relprop(ctx, r), reference("epsilon", layer, x, r)) < 1e-10
    assert rel_err(Norm(EPS).relprop(ctx, r), reference("epsilon", layer, x, r)) < 1e-10
    assert rel_err(LRP0().relprop(ctx, r), reference("epsilon", layer, x, r, eps=0.0)) < 1e-10
    assert LRP0().eps == 0.0


def test_epsilon_plus_stabilizer():
    """stabilizer='plus' (the seed's z + eps) reaches the rules too."""
    layer = make_layer("conv2d_plain")
    x = _inputs("conv2d_plain", "nonneg")
    ctx = make_ctx(layer, x)
    r = torch.randn_like(ctx.z)
    eps = 0.5
    out = ZPlus(eps, "plus").relprop(ctx, r)
    m, b, _ = dense_form(layer, x.shape[1:])
    p = (x.reshape(2, -1)[:, None, :] * m[None]).clamp(min=0)
    s = r.reshape(2, -1) / (p.sum(-1) + b.clamp(min=0) + eps)
    assert rel_err(out, (p * s[..., None]).sum(1).reshape(x.shape)) < 1e-10


def test_pass():
    layer = nn.Identity()
    x = torch.randn(2, 3, 4, dtype=F64)
    ctx = LayerContext("act", layer, "linear", x, x, torch.zeros(1, 1, dtype=F64), None)
    r = torch.randn(4, 3, 4, dtype=F64)
    assert Pass().relprop(ctx, r) is r
    with pytest.raises(RelevanceError, match="Pass"):
        Pass().relprop(ctx, torch.randn(2, 5, dtype=F64))


# ----------------------------------------------------------------------------- conservation


@pytest.mark.parametrize("layer_name", ["linear", "conv1d_stride_pad", "conv2d_groups_dilation", "conv2d_same_even",
                                        "conv3d"])
@pytest.mark.parametrize("rule", ["zplus", "alpha_beta", "gamma", "zbox", "flat", "wsquare", "lrp0"])
def test_conservation(rule, layer_name):
    """Zero bias, eps → 0: Σ_i R_i = Σ_j r_j per sample (the rules that conserve)."""
    layer = make_layer(layer_name, bias=False)
    x = _inputs(layer_name, "signed")
    kw = _rule_kwargs(rule, x, layer_name)
    ctx = make_ctx(layer, x)
    # Units whose denominator vanishes pass nothing (z = 0; z+ = 0 or z- = 0 when no input
    # contributes with that sign): conservation holds for the others.
    m, _, _ = dense_form(layer, x.shape[1:])
    p = x.reshape(2, -1)[:, None, :] * m[None]
    live = {"zplus": p.clamp(min=0).sum(-1) > 0,
            "alpha_beta": (p.clamp(min=0).sum(-1) > 0) & (p.clamp(max=0).sum(-1) < 0)}.get(rule, p.sum(-1) != 0)
    r = torch.randn_like(ctx.z) * live.reshape(ctx.z.shape)
    eps = 1e-12
    rules = {"zplus": ZPlus(eps), "alpha_beta": AlphaBeta(2, 1, eps), "gamma": Gamma(0.25, eps),
             "zbox": ZBox(kw.get("low"), kw.get("high"), eps) if kw else None, "flat": Flat(eps),
             "wsquare": WSquare(eps), "lrp0": LRP0()}
    out = rules[rule].relprop(ctx, r)
    total_in, total_out = out.reshape(2, -1).sum(1), r.reshape(2, -1).sum(1)
    assert torch.allclose(total_in, total_out, rtol=1e-8, atol=1e-8 * r.abs().sum().item()), (total_in, total_out)


# ----------------------------------------------------------------------------- fused path, implementations


@pytest.mark.parametrize("layer_name", ["linear", "conv2d_groups_dilation", "conv2d_same_even"])
@pytest.mark.parametrize("rule", ["epsilon", "zplus", "gamma", "zbox"])
def test_denominator_then_relprop_from_s(rule, layer_name):
    """The whole-model pass's fused path (denominator, then s from a fused op, then
    relprop_from_s) equals relprop."""
    layer = make_layer(layer_name)
    x = _inputs(layer_name, "nonneg" if rule == "gamma" else "signed")
    kw = _rule_kwargs(rule, x, layer_name)
    ctx = make_ctx(layer, x, output_feeds_relu=True)
    r = torch.randn_like(ctx.z) * (ctx.z > 0)
    rule_obj = make_rule(rule, **kw)
    den = rule_obj.denominator(ctx)
    assert den is not None
    z_prime, eps, stabilizer = den
    s = ops.stab_div(r, z_prime, eps, stabilizer)
    fused = rule_obj.relprop_from_s(ctx, s)
    expected = make_rule(rule, **kw).relprop(make_ctx(layer, x), r)
    assert rel_err(fused, expected) < 1e-12
    # contract(): R = x ⊙ c where the rule has that form (the pass leaves the product to the
    # next fused op); the signed branches of z+/γ and z^B do not.
    c = rule_obj.contract(ctx, s)
    if c is not None:
        assert rule_obj.input_proportional
        assert rel_err(x * c, expected) < 1e-12
    else:
        assert rule == "zbox" or not bool((x >= 0).all())
    # Called again (a pass that splits the relevance into chunks): the same result. The
    # per-call state must not keep the activations alive.
    assert rel_err(rule_obj.relprop_from_s(ctx, s), expected) < 1e-12
    assert not any(v is x or (isinstance(v, tuple) and any(t is x for t in v)) for v in ctx.cache.values())


def test_no_fusion_offered_where_it_would_be_wrong():
    layer = make_layer("conv2d_plain")
    ctx = make_ctx(layer, _inputs("conv2d_plain", "nonneg"))
    assert Gamma().denominator(ctx) is None  # relevance may be live where z < 0
    assert AlphaBeta(2, 1).denominator(ctx) is None  # two denominators
    assert Flat().denominator(ctx) is None and WSquare().denominator(ctx) is None


def test_rule_flags_for_the_whole_model_pass():
    # R = x ⊙ (...): zero where x is zero
    assert all(r.input_proportional for r in (Epsilon(), LRP0(), ZPlus(), AlphaBeta(2, 1), Gamma()))
    assert not any(r.input_proportional for r in (ZBox(0.0, 1.0), Flat(), WSquare(), Pass()))
    # the rules that read the raw z (before an in-place ReLU could overwrite it)
    assert AlphaBeta(2, 1).needs_raw_z and ZBox(0.0, 1.0).needs_raw_z
    assert not ZPlus().needs_raw_z and not Gamma().needs_raw_z and not Epsilon().needs_raw_z


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("layer_name", ["linear3d_input", "conv2d_groups_dilation", "conv3d"])
@pytest.mark.parametrize("rule", RULES)
def test_float32_matches_closed_form(rule, layer_name, impl):
    """float32 parameters, input and relevance: near the float64 closed form on the same values."""
    layer = make_layer(layer_name).float()
    x = _inputs(layer_name, "signed").float()
    kw = {k: v.float() for k, v in _rule_kwargs(rule, x.double(), layer_name).items()}
    r = torch.randn_like(make_ctx(layer, x).z)
    out = make_rule(rule, **kw).relprop(make_ctx(layer, x), r)
    assert out.dtype == torch.float32
    ref = reference(rule, layer.double(), x.double(), r.double(), **{k: v.double() for k, v in kw.items()})
    # float32 rounding of the contractions (z, z+, ...) is divided by small denominators: 1e-3,
    # not float32's 1e-7; the float64 closed-form tests above hold every rule to 1e-10.
    assert rel_err(out, ref) < 1e-3, f"{rule} on {layer_name} in float32"


@pytest.mark.skipif(not lrpfast.HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layer_name", ["linear3d_input", "conv2d_groups_dilation", "conv3d"])
@pytest.mark.parametrize("rule", RULES)
def test_extension_equals_fallback(rule, layer_name, dtype):
    """An extra check: the two implementations agree (each is also held to the closed form above)."""
    layer = make_layer(layer_name).to(dtype)
    x = _inputs(layer_name, "signed").to(dtype)
    kw = {k: v.to(dtype) for k, v in _rule_kwargs(rule, x, layer_name).items()}
    r = torch.randn_like(make_ctx(layer, x).z)
    with lrpfast.use_implementation("extension"):
        a = make_rule(rule, **kw).relprop(make_ctx(layer, x), r)
    with lrpfast.use_implementation("fallback"):
        b = make_rule(rule, **kw).relprop(make_ctx(layer, x), r)
    assert a.dtype == dtype
    assert rel_err(a, b) < (1e-5 if dtype == torch.float32 else 1e-12)


def test_channels_last_input():
    layer = make_layer("conv2d_groups_dilation")
    x = _inputs("conv2d_groups_dilation", "signed").contiguous(memory_format=torch.channels_last)
    ctx = make_ctx(layer, x)
    r = torch.randn_like(ctx.z)
    for rule in ("zplus", "gamma", "alpha_beta"):
        assert rel_err(make_rule(rule).relprop(ctx, r), reference(rule, layer, x.contiguous(), r.contiguous())) < 1e-10


# ----------------------------------------------------------------------------- cached weights


def test_modified_weights_cached_and_invalidated():
    layer = make_layer("conv2d_plain")
    x = _inputs("conv2d_plain", "signed")
    r = torch.randn_like(make_ctx(layer, x).z)
    modified_weights.clear(layer)
    rule = Gamma(0.25, EPS)
    first = rule.relprop(make_ctx(layer, x), r)
    n_entries = modified_weights.cache_size(layer)
    assert n_entries > 0
    key = ("w+γw+", 0.25)
    cached = modified_weights._CACHE[layer][key][2]
    again = rule.relprop(make_ctx(layer, x), r)
    assert modified_weights._CACHE[layer][key][2] is cached, "recomputed although the weights did not change"
    assert modified_weights.cache_size(layer) == n_entries
    assert torch.equal(first, again)
    with torch.no_grad():
        layer.weight.mul_(-0.5)  # in place: same data_ptr, new _version
    changed = rule.relprop(make_ctx(layer, x), r)
    assert modified_weights._CACHE[layer][key][2] is not cached
    assert rel_err(changed, reference("gamma", layer, x, r)) < 1e-10
    layer.weight = nn.Parameter(torch.randn_like(layer.weight))  # replaced: new data_ptr
    assert rel_err(rule.relprop(make_ctx(layer, x), r), reference("gamma", layer, x, r)) < 1e-10


def test_cache_goes_with_the_module():
    import gc
    import weakref

    layer = make_layer("linear")
    x = _inputs("linear", "signed")
    ZPlus().relprop(make_ctx(layer, x), torch.randn(2, 5, dtype=F64))
    assert modified_weights.cache_size(layer) > 0
    n = len(modified_weights._CACHE)
    alive = weakref.ref(layer)
    del layer
    gc.collect()
    # the cache did not keep the module alive, and its entry left with it (other tests' modules
    # may be collected by the same gc pass, hence <=)
    assert alive() is None
    assert len(modified_weights._CACHE) <= n - 1


# ----------------------------------------------------------------------------- invalid parameters


@pytest.mark.parametrize("make,match", [
    (lambda: AlphaBeta(2.0, 0.5), "alpha - beta must be 1"),
    (lambda: AlphaBeta(0.5, -0.5), "beta must be"),
    (lambda: AlphaBeta(float("nan"), 1.0), "alpha must be"),
    (lambda: Gamma(-0.1), "gamma must be"),
    (lambda: Gamma(float("inf")), "gamma must be"),
    (lambda: ZBox(None, 1.0), "low is missing"),
    (lambda: ZBox(0.0, None), "high is missing"),
    (lambda: ZBox(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])), "low must be <= high"),
    (lambda: ZBox(torch.zeros(2), torch.ones(3)), "do not broadcast"),
    (lambda: ZBox(torch.tensor([1], dtype=torch.int64), 2.0), "floating-point"),
    (lambda: Epsilon(-1.0), "eps must be"),
    (lambda: ZPlus(1e-6, "minus"), "stabilizer must be"),
])
def test_invalid_parameters(make, match):
    with pytest.raises(RelevanceError, match=match):
        make()


def test_zbox_bounds_must_fit_the_input():
    layer = make_layer("conv2d_plain")
    x = _inputs("conv2d_plain", "signed")
    rule = ZBox(torch.zeros(1, 5, 1, 1), torch.ones(1, 5, 1, 1))
    with pytest.raises(RelevanceError, match="does not broadcast to the input"):
        rule.relprop(make_ctx(layer, x, name="features.0"), torch.randn_like(layer(x)))


def test_zbox_accepts_floats_and_full_bounds():
    layer = make_layer("conv2d_plain")
    x = _inputs("conv2d_plain", "signed").clamp(-2, 2)
    ctx = make_ctx(layer, x)
    r = torch.randn_like(ctx.z)
    ref = reference("zbox", layer, x, r, low=torch.tensor(-2.0, dtype=F64), high=torch.tensor(2.0, dtype=F64))
    assert rel_err(ZBox(-2.0, 2.0, EPS).relprop(ctx, r), ref) < 1e-10
    low, high = x - 1, x + 1  # per-sample bounds with a batch dimension
    ref = reference("zbox", layer, x, r, low=low, high=high)
    assert rel_err(ZBox(low, high, EPS).relprop(make_ctx(layer, x), r), ref) < 1e-10


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layer_name", ["linear3d_input", "conv2d_groups_dilation", "conv2d_same_even", "conv3d"])
@pytest.mark.parametrize("rule", RULES)
def test_rule_on_cuda_matches_closed_form(rule, layer_name, dtype, impl):
    if impl == "extension" and not lrpfast._ext.cuda_compiled():
        pytest.skip("extension built without CUDA kernels")
    layer = make_layer(layer_name)
    x = _inputs(layer_name, "signed")
    kw = _rule_kwargs(rule, x, layer_name)
    r = torch.randn_like(make_ctx(layer, x).z)
    ref = reference(rule, layer, x, r, **kw)
    dev = lambda t: t.to("cuda", dtype)  # noqa: E731
    layer_d = make_layer(layer_name).to("cuda", dtype)
    layer_d.load_state_dict({k: dev(v) for k, v in layer.state_dict().items()})
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
    try:
        out = make_rule(rule, **{k: dev(v) for k, v in kw.items()}).relprop(make_ctx(layer_d, dev(x)), dev(r))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert out.device.type == "cuda" and out.dtype == dtype
    assert rel_err(out.cpu(), ref) < (1e-4 if dtype == torch.float32 else 1e-10)
