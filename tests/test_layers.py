"""lrpfast.layers: the seed-compatible rel* wrappers, against autograd through the wrapped torch
layer (and closed forms for z+), and their handling of bad use (errors naming the layer and what
it expected). No reference here is computed by lrpfast itself."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lrpfast import (Reshape, relAdaptiveAvgPool2d, relAvgPool2d, relConv1d, relConv2d, relConv3d, relLinear,
                     relMaxPool1d, relMaxPool2d, relMaxPool3d, relReLU)
from lrpfast.ops import RelevanceError

from .conftest import assert_close, divide_or_zero, epsilon_oracle, stab_reference, winner_take_all_oracle

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

# (id, wrapper class, torch module factory, input shape, constructor kwargs)
LAYERS = [
    ("linear", relLinear, lambda: nn.Linear(5, 4), (5,), {}),
    ("linear-nobias-plus", relLinear, lambda: nn.Linear(6, 3, bias=False), (6,), {"stabilizer": "plus", "eps": 1e-2}),
    ("linear-3d-input", relLinear, lambda: nn.Linear(4, 3), (2, 4), {}),
    ("conv1d-stride-pad", relConv1d, lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 9), {}),
    ("conv2d-same-dil", relConv2d, lambda: nn.Conv2d(3, 4, 3, padding="same", dilation=2), (3, 7, 7), {"eps": 0.1}),
    ("conv2d-same-even-groups", relConv2d, lambda: nn.Conv2d(4, 6, (2, 4), padding="same", groups=2), (4, 6, 7), {}),
    ("conv2d-nobias", relConv2d, lambda: nn.Conv2d(2, 3, 3, bias=False), (2, 6, 6), {"stabilizer": "plus"}),
    ("conv3d-stride-pad", relConv3d, lambda: nn.Conv3d(2, 3, 3, stride=2, padding=1), (2, 5, 5, 4), {}),
    ("maxpool1d-overlap", relMaxPool1d, lambda: nn.MaxPool1d(3, 1), (3, 8), {}),
    ("maxpool2d-pad-ceil", relMaxPool2d, lambda: nn.MaxPool2d(3, 2, 1, ceil_mode=True), (3, 8, 8), {}),
    ("maxpool2d-indices", relMaxPool2d, lambda: nn.MaxPool2d(2, return_indices=True), (3, 6, 6), {}),
    ("maxpool3d-dil", relMaxPool3d, lambda: nn.MaxPool3d(2, 1, dilation=2), (2, 5, 5, 5), {}),
    ("avgpool1d", relAvgPool2d, lambda: nn.AvgPool1d(3, 2, 1), (3, 9), {}),
    ("avgpool2d-ceil-nocip", relAvgPool2d, lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
     (3, 8, 8), {}),
    ("avgpool2d-divisor", relAvgPool2d, lambda: nn.AvgPool2d(2, divisor_override=3), (2, 6, 6), {"stabilizer": "plus"}),
    ("avgpool3d", relAvgPool2d, lambda: nn.AvgPool3d(2), (2, 4, 4, 4), {}),
    ("adaptive1d", relAdaptiveAvgPool2d, lambda: nn.AdaptiveAvgPool1d(3), (3, 7), {}),
    ("adaptive2d", relAdaptiveAvgPool2d, lambda: nn.AdaptiveAvgPool2d((3, 2)), (3, 7, 5), {}),
    ("adaptive3d", relAdaptiveAvgPool2d, lambda: nn.AdaptiveAvgPool3d(2), (2, 5, 4, 3), {}),
]


def _build(spec, device, dtype=F64):
    _, cls, factory, shape, kwargs = spec
    module = factory().to(device=device, dtype=dtype)
    return module, cls(module, **kwargs), shape


def _pooled(out):
    return out[0] if isinstance(out, tuple) else out


def _oracle(module, layer, x, r, z_given=None):
    forward = lambda x_: _pooled(module(x_))  # noqa: E731  (the real torch layer)
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        return winner_take_all_oracle(forward, x, r)
    return epsilon_oracle(forward, x, r, layer.eps, layer.stabilizer, z_given)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("spec", LAYERS, ids=[s[0] for s in LAYERS])
def test_relprop_matches_autograd_through_module(spec, batch, device, impl):
    module, layer, shape = _build(spec, device)
    x = torch.randn(batch, *shape, dtype=F64, device=device)
    out = layer(x)
    if getattr(module, "return_indices", False):  # the seed's relMaxPool2d returned (output, switches)
        out, idx = out
        assert torch.equal(idx, F.max_pool2d(x, 2, return_indices=True)[1])
    assert torch.equal(out, _pooled(module(x))), "forward must be the wrapped module's"
    r = torch.randn_like(out)
    got = layer.relprop(r)
    assert got.shape == x.shape and got.dtype == F64
    assert_close(got, _oracle(module, layer, x, r), 1e-12, spec[0])


@pytest.mark.parametrize("spec", LAYERS, ids=[s[0] for s in LAYERS])
def test_relprop_k_targets_and_float32(spec, device, impl):
    """K maps per sample in one call = K calls; float32 within 1e-5 of the float64 oracle given
    the layer's own float32 z (the forward's rounding is not the relevance step's)."""
    module, layer, shape = _build(spec, device, torch.float32)
    x = torch.randn(2, *shape, device=device)
    out = _pooled(layer(x))
    r = torch.randn(2 * 3, *out.shape[1:], device=device)  # K = 3, row b*3 + k
    got = layer.relprop(r).reshape(2, 3, *shape)
    for k in range(3):
        single = layer.relprop(r.reshape(2, 3, *out.shape[1:])[:, k].contiguous())
        assert_close(got[:, k], single, 1e-6, f"{spec[0]} target {k}")
        want = _oracle(module.double(), layer, x.double(), r.reshape(2, 3, *out.shape[1:])[:, k].double(),
                       z_given=out.double())
        module.float()
        assert_close(got[:, k], want, 1e-5, f"{spec[0]} vs float64 oracle")


@pytest.mark.parametrize("dtype_", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_layers(dtype_, device, impl):
    """A conv, a max pool and a linear in half types: finite and near the float64 oracle."""
    conv, pool, lin = nn.Conv2d(3, 4, 3).to(device), nn.MaxPool2d(2), nn.Linear(4 * 3 * 3, 5).to(device)
    layers = [relConv2d(conv.to(dtype_)), relMaxPool2d(pool), Reshape(), relLinear(lin.to(dtype_))]
    x = torch.randn(2, 3, 8, 8, device=device).to(dtype_)
    h = x
    for layer in layers:
        h = layer(h)
    r = h.clone()
    for layer in reversed(layers):
        r = layer.relprop(r)
    assert r.dtype == dtype_ and torch.isfinite(r).all()
    # The same chain in float64 on the upcast parameters and input, by the oracles (autograd
    # through the torch layers; no lrpfast)
    conv64, lin64 = conv.double(), lin.double()
    x1 = x.double()
    x2 = conv64(x1)
    x3 = pool(x2).flatten(1)
    r64 = lin64(x3)
    r64 = _oracle(lin64, layers[3], x3, r64).reshape(2, 4, 3, 3)
    r64 = _oracle(pool, layers[1], x2, r64)
    r64 = _oracle(conv64, layers[0], x1, r64)
    assert_close(r, r64, 0.1, "half-type chain vs float64")  # a few ulps of bfloat16 (2^-8) through 3 steps


def test_relprop_builds_no_graph_and_keeps_parameters_shared():
    lin = nn.Linear(4, 3)
    layer = relLinear(lin)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    x = torch.randn(2, 4, requires_grad=True)
    z = layer(x)
    assert z.grad_fn is not None  # the forward stays differentiable
    r = layer.relprop(z.detach())
    assert r.grad_fn is None and not r.requires_grad  # the seed built graphs in relprop (its B13)


def test_use_rho_is_ignored_by_parameterless_layers():
    for layer, x in ((relMaxPool2d(nn.MaxPool2d(2)), torch.randn(2, 3, 4, 4)),
                     (relAvgPool2d(nn.AvgPool2d(2)), torch.randn(2, 3, 4, 4)), (relReLU(), torch.randn(2, 5))):
        out = layer(x)
        r = torch.randn_like(out)
        assert torch.equal(layer.relprop(r, use_rho=True), layer.relprop(r))


# ----------------------------------------------------------------------------- z+ rule (use_rho=True)


def _zplus_closed_form(xcols: torch.Tensor, w: torch.Tensor, bias_plus: torch.Tensor, r: torch.Tensor, eps: float,
                       stabilizer: str) -> torch.Tensor:
    """Explicit contributions. xcols (B, P, L): the inputs each output position l sees (P of
    them), w (O, P), r (B, O, L). z_ij+ = x+ w+ + x- w- per (input i, unit j); R_i = sum_j
    z_ij+ / stab(sum_i z_ij+ + b+) r_j."""
    xp, xn = xcols.clamp(min=0), xcols.clamp(max=0)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    contrib = xp[:, None] * wp[None, :, :, None] + xn[:, None] * wn[None, :, :, None]  # (B, O, P, L)
    zplus = contrib.sum(2) + bias_plus[None, :, None]  # (B, O, L)
    s = divide_or_zero(r, stab_reference(zplus, eps, stabilizer))
    return (contrib * s[:, :, None]).sum(1), zplus  # (B, P, L), (B, O, L)


def _conserved_part(r: torch.Tensor, zplus: torch.Tensor, eps: float) -> torch.Tensor:
    """What a bias-free z+ step must pass on, per sample: sum_j r_j z+_j / (z+_j + eps) (z+ >= 0).
    With eps -> 0 that is all of r except at units with z+ = 0: z+ = x+ w+ + x- w- vanishes where
    every visible input's sign opposes its weights' (likely enough in small random layers, and a
    GPU convolution may leave roundoff there instead of an exact 0)."""
    zp = zplus.reshape(r.shape)
    share = torch.where(zp == 0, torch.zeros_like(zp), zp / (zp + eps))
    passed = (r * share).reshape(r.shape[0], -1).sum(1)
    live = (r * (zp > 1e-6)).reshape(r.shape[0], -1).sum(1)
    assert torch.allclose(passed, live, rtol=1e-3, atol=1e-6), "eps must be negligible at the live units"
    return passed


@pytest.mark.parametrize("bias", [True, False])
def test_zplus_linear_closed_form_and_conservation(bias, device, impl):
    lin = nn.Linear(6, 4, bias=bias).to(device).double()
    if bias:
        nn.init.normal_(lin.bias)
    layer = relLinear(lin, eps=1e-9)
    x = torch.randn(3, 6, dtype=F64, device=device)  # both signs: the x- branch matters
    r = torch.randn_like(layer(x))
    got = layer.relprop(r, use_rho=True)
    bplus = lin.bias.detach().clamp(min=0) if bias else torch.zeros(4, dtype=F64, device=device)
    want, zplus = _zplus_closed_form(x[:, :, None], lin.weight.detach(), bplus, r[:, :, None], 1e-9, "sign")
    assert_close(got, want[:, :, 0], 1e-12, "z+ linear")
    if not bias:
        assert torch.allclose(got.sum(1), _conserved_part(r, zplus, 1e-9), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(got, layer.relprop(r)), "use_rho=True must differ from the ε rule"


@pytest.mark.parametrize("bias", [True, False])
def test_zplus_conv2d_closed_form_and_conservation(bias, device, impl):
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias).to(device).double()
    layer = relConv2d(conv, eps=1e-9, stabilizer="plus")
    x = torch.randn(2, 2, 7, 7, dtype=F64, device=device)
    z = layer(x)
    r = torch.randn_like(z)
    got = layer.relprop(r, use_rho=True)
    cols = F.unfold(x, 3, padding=1, stride=2)  # (B, 2*3*3, L)
    bplus = conv.bias.detach().clamp(min=0) if bias else torch.zeros(3, dtype=F64, device=device)
    rcols, zplus = _zplus_closed_form(cols, conv.weight.detach().reshape(3, -1), bplus, r.flatten(2), 1e-9, "plus")
    want = F.fold(rcols, (7, 7), 3, padding=1, stride=2)  # overlapping windows add up
    assert_close(got, want, 1e-12, "z+ conv")
    if not bias:
        assert torch.allclose(got.sum((1, 2, 3)), _conserved_part(r, zplus, 1e-9), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- ReLU and Reshape


def test_relrelu_never_in_place():
    conv = relConv2d(nn.Conv2d(1, 2, 3))
    relu = relReLU(nn.ReLU(inplace=True))  # the seed ran this one in place (its B2)
    x = torch.randn(2, 1, 6, 6)
    z = conv(x)
    z_before = z.clone()
    a = relu(z)
    assert a is not z and torch.equal(z, z_before), "relReLU modified its input"
    assert torch.equal(a, torch.relu(z_before))
    r = torch.rand_like(a)
    assert relu.relprop(r) is r  # relevance passes a ReLU unchanged
    conv.relprop(r)  # no "modified in place" error: the conv's cached output is intact


def test_relrelu_default_module_and_k_rows():
    relu = relReLU()
    relu(torch.randn(2, 3))
    r = torch.randn(6, 3)
    assert torch.equal(relu.relprop(r), r)
    with pytest.raises(RelevanceError, match=r"relReLU.relprop: r has shape \(6, 4\)"):
        relu.relprop(torch.randn(6, 4))


def test_reshape_round_trip_and_k_rows():
    rs = Reshape()
    x = torch.randn(2, 3, 4, 5)
    out = rs(x)
    assert out.shape == (2, 60)
    assert torch.equal(rs.relprop(out), x)
    r = torch.randn(6, 60)  # K = 3
    assert torch.equal(rs.relprop(r), r.reshape(6, 3, 4, 5))
    rs2 = Reshape(4, 15)
    assert rs2(x).shape == (2, 4, 15) and rs2.relprop(rs2(x)).shape == x.shape
    with pytest.raises(RelevanceError, match=r"Reshape.relprop: r has shape \(2, 59\)"):
        rs.relprop(torch.randn(2, 59))


# ----------------------------------------------------------------------------- bad use


def _ready_linear():
    layer = relLinear(nn.Linear(3, 2))
    x = torch.randn(4, 3)
    return layer, x, layer(x)


def test_relprop_before_forward():
    for layer, r in ((relLinear(nn.Linear(3, 2)), torch.randn(1, 2)),
                     (relConv2d(nn.Conv2d(1, 1, 3)), torch.randn(1, 1, 2, 2)),
                     (relMaxPool2d(nn.MaxPool2d(2)), torch.randn(1, 1, 2, 2)), (relReLU(), torch.randn(1, 2)),
                     (Reshape(), torch.randn(1, 4))):
        name = type(layer).__name__
        with pytest.raises(RelevanceError, match=rf"{name}.relprop: called before forward"):
            layer.relprop(r)


@pytest.mark.parametrize("layer_factory, x_shape, r_shape, pattern", [
    (lambda: relLinear(nn.Linear(3, 2)), (4, 3), (4, 3),
     r"relLinear.relprop: relevance has shape \(4, 3\), expected \(K\*B, 2\)"),
    (lambda: relLinear(nn.Linear(3, 2)), (4, 3), (6, 2),
     r"relLinear.relprop: relevance has 6 rows, expected a multiple of the batch 4"),
    (lambda: relConv2d(nn.Conv2d(1, 2, 3)), (2, 1, 5, 5), (2, 2, 4, 4),
     r"relConv2d.relprop: relevance has shape \(2, 2, 4, 4\)"),
    (lambda: relConv1d(nn.Conv1d(1, 2, 3)), (2, 1, 5), (2, 2, 4), r"relConv1d.relprop: relevance has shape"),
    (lambda: relMaxPool2d(nn.MaxPool2d(2)), (2, 1, 4, 4), (2, 1, 4, 4), r"relMaxPool2d.relprop: relevance has shape"),
    (lambda: relAvgPool2d(nn.AvgPool2d(2)), (2, 1, 4, 4), (2, 1, 3, 2), r"relAvgPool.relprop: relevance has shape"),
    (lambda: relAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d(2)), (2, 1, 4, 4), (2, 1, 3, 3),
     r"relAdaptiveAvgPool.relprop: relevance has shape"),
])
def test_relprop_wrong_shape(layer_factory, x_shape, r_shape, pattern):
    layer = layer_factory()
    layer(torch.randn(*x_shape))
    with pytest.raises(RelevanceError, match=pattern):
        layer.relprop(torch.randn(*r_shape))


def test_relprop_wrong_dtype_device_or_type():
    layer, _, z = _ready_linear()
    with pytest.raises(RelevanceError,
                       match=r"relLinear.relprop: r is torch.float64 on cpu, expected torch.float32 on cpu"):
        layer.relprop(z.detach().double())
    with pytest.raises(RelevanceError,
                       match=r"relLinear.relprop: r is torch.float32 on meta, expected torch.float32 on cpu"):
        layer.relprop(torch.empty(4, 2, device="meta"))
    with pytest.raises(TypeError, match=r"relLinear.relprop: r must be a torch.Tensor, got list"):
        layer.relprop([[0.0, 1.0]] * 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_relprop_non_finite_relevance(bad):
    layer, _, z = _ready_linear()
    r = z.detach().clone()
    r[1, 0] = bad
    with pytest.raises(RelevanceError, match=r"relLinear.relprop: r contains NaN or Inf"):
        layer.relprop(r)


def test_in_place_modification_after_forward():
    layer, x, z = _ready_linear()
    x.mul_(2)  # the cached input no longer is what produced z
    with pytest.raises(RelevanceError,
                       match=r"relLinear.relprop: the input or output of the last forward was modified in place"):
        layer.relprop(torch.randn(4, 2))
    conv = relConv2d(nn.Conv2d(1, 2, 3))
    out = conv(torch.randn(1, 1, 5, 5))
    torch.relu_(out.detach())  # an in-place ReLU after the layer (the seed's B2)
    with pytest.raises(RelevanceError, match=r"relConv2d.relprop: .*modified in place.*inplace=False"):
        conv.relprop(torch.randn(1, 2, 3, 3))
    # A fresh forward makes it usable again
    conv(torch.randn(1, 1, 5, 5))
    assert conv.relprop(torch.randn(1, 2, 3, 3)).shape == (1, 1, 5, 5)


@pytest.mark.parametrize("cls, module, pattern", [
    (relLinear, nn.Conv2d(1, 1, 1), r"relLinear: expected a Linear module, got Conv2d"),
    (relConv2d, nn.Conv1d(1, 1, 1), r"relConv2d: expected a Conv2d module, got Conv1d"),
    (relConv1d, nn.Linear(1, 1), r"relConv1d: expected a Conv1d module, got Linear"),
    (relConv3d, nn.Conv2d(1, 1, 1), r"relConv3d: expected a Conv3d module, got Conv2d"),
    (relMaxPool2d, nn.AvgPool2d(2), r"relMaxPool2d: expected a MaxPool2d module, got AvgPool2d"),
    (relMaxPool1d, nn.MaxPool2d(2), r"relMaxPool1d: expected a MaxPool1d module, got MaxPool2d"),
    (relAvgPool2d, nn.MaxPool2d(2), r"relAvgPool2d: expected a AvgPool1d or AvgPool2d or AvgPool3d module"),
    (relAdaptiveAvgPool2d, nn.AvgPool2d(2), r"relAdaptiveAvgPool2d: expected a AdaptiveAvgPool1d"),
    (relReLU, nn.Tanh(), r"relReLU: expected a ReLU module, got Tanh"),
])
def test_wrong_module_type(cls, module, pattern):
    with pytest.raises(TypeError, match=pattern):
        cls(module)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"stabilizer": "abs"}, r"relLinear: stabilizer must be one of \('sign', 'plus'\), got 'abs'"),
    ({"eps": -1.0}, r"relLinear: eps must be a finite float >= 0, got -1.0"),
    ({"eps": float("nan")}, r"relLinear: eps must be a finite float >= 0"),
])
def test_bad_constructor_arguments(kwargs, pattern):
    with pytest.raises(RelevanceError, match=pattern):
        relLinear(nn.Linear(2, 2), **kwargs)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_mode_not_zeros(mode):
    layer = relConv2d(nn.Conv2d(1, 2, 3, padding=1, padding_mode=mode))
    with pytest.raises(RelevanceError, match=rf"relConv2d: padding_mode='{mode}' is not supported; expected 'zeros'"):
        layer(torch.randn(1, 1, 5, 5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_is_reported_at_forward(bad):
    layer = relConv2d(nn.Conv2d(1, 2, 3))
    x = torch.rand(2, 1, 6, 6)
    x[1, 0, 3, 3] = bad
    with pytest.raises(RelevanceError, match=r"relConv2d.forward: the input contains NaN or Inf"):
        layer(x)


def test_relevance_from_a_layer_is_checked_again_after_an_in_place_change():
    lin, relu = relLinear(nn.Linear(4, 3)), relReLU()
    out = relu(lin(torch.rand(2, 4)))
    r = relu.relprop(out)  # produced (and marked finite) by a layer
    assert torch.isfinite(lin.relprop(r)).all()
    r[0, 0] = float("nan")  # the user edits it in place: the mark no longer holds
    with pytest.raises(RelevanceError, match=r"relLinear.relprop: r contains NaN or Inf"):
        lin.relprop(r)


def test_large_finite_relevance_is_not_mistaken_for_overflow():
    # the cheap check sums r; a float32 sum that overflows must not raise for finite values
    layer = relLinear(nn.Linear(3, 2))
    layer(torch.rand(4, 3))
    r = torch.full((4, 2), 3e38)
    assert layer.relprop(r).shape == (4, 3)
