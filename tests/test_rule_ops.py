"""The rule ops of lrpfast.ops (sign_split, sign_split_mul_input, bounds_mul_input,
alpha_beta_stab_div, gamma_stab_div) under device x dtype x implementation.

Oracles: each op's formula written out with the paired layout built by slicing channel groups
(not by the reshape the fallback and the kernels use), in float64 (half types: at most 2x the
error of the same formula evaluated naively in their dtype); K targets = K single runs; and the
layout's meaning checked against torch's grouped convolution (what the rules rely on). The
extension is additionally compared with the fallback, never instead of the formula.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lrpfast
from lrpfast import modified_weights as MW
from lrpfast import ops
from lrpfast.ops import RelevanceError

from .conftest import (HALF_TYPES, SAME_DTYPE_RTOL, assert_close, assert_matches_reference, assert_rounded_once,
                       rel_err)

F64 = torch.float64

# (per-sample shape, dim, groups): convolution-like (channels at dim 1) and Linear-like (last)
GEOMETRIES = [
    ((6, 5, 4), 1, 1),
    ((6, 5, 4), 1, 3),
    ((4, 3, 2, 5), 1, 2),
    ((3, 7), 1, 3),        # depthwise 1d
    ((9,), -1, 1),         # Linear (B, C)
    ((4, 9), -1, 1),       # Linear (B, T, C)
]
GEOMETRY_IDS = ["conv2d", "conv2d_g3", "conv3d_g2", "conv1d_depthwise", "linear", "linear_3d"]


def pair_by_slicing(a: torch.Tensor, b: torch.Tensor, dim: int, groups: int) -> torch.Tensor:
    """Branch a then branch b within each channel group along dim."""
    d = dim % a.dim()
    cg = a.shape[d] // groups
    parts = []
    for g in range(groups):
        parts += [a.narrow(d, g * cg, cg), b.narrow(d, g * cg, cg)]
    return torch.cat(parts, d)


def unpair_by_slicing(p: torch.Tensor, dim: int, groups: int):
    d = dim % p.dim()
    cg = p.shape[d] // (2 * groups)
    a = torch.cat([p.narrow(d, (2 * g) * cg, cg) for g in range(groups)], d)
    b = torch.cat([p.narrow(d, (2 * g + 1) * cg, cg) for g in range(groups)], d)
    return a, b


def stab(z, eps, stabilizer):
    if stabilizer == "plus":
        return z + eps
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def div0(a, b):
    return torch.where(b == 0, torch.zeros_like(a), a / b)


def with_zeros(t: torch.Tensor) -> torch.Tensor:
    """Some exact zeros (sign(0) = +1, the z = 0 masks of γ, the x = 0 of the split)."""
    t = t.clone()
    t.view(-1)[::5] = 0
    return t


# ----------------------------------------------------------------------------- cases: name -> (run, oracle)


def make_inputs(name, shape, dim, groups, batch, k, device):
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(device)  # noqa: E731
    paired = ops.paired_shape((batch, *shape), dim, batch * k)
    if name == "sign_split":
        return {"x": with_zeros(rnd(batch, *shape))}
    if name in ("sign_split_mul_input", "bounds_mul_input"):
        t = {"c": rnd(*paired), "x": with_zeros(rnd(batch, *shape))}
        if name == "bounds_mul_input":
            t["low"] = t["x"].amin(0, keepdim=True) - rnd(1, *shape).abs()
            t["high"] = t["x"].amax(0, keepdim=True) + rnd(1, *shape).abs()
        return t
    z = with_zeros(rnd(batch, *shape))
    return {"r": rnd(batch * k, *shape), "z": z, "z2": with_zeros(rnd(batch, *shape))}


def run_op(name, t, dim, groups, eps=1e-6, stabilizer="sign"):
    if name == "sign_split":
        return ops.sign_split(t["x"], dim, groups)
    if name == "sign_split_mul_input":
        return ops.sign_split_mul_input(t["c"], t["x"], dim, groups)
    if name == "bounds_mul_input":
        return ops.bounds_mul_input(t["c"], t["x"], t["low"], t["high"], dim, groups)
    if name == "alpha_beta_stab_div":
        return ops.alpha_beta_stab_div(t["r"], t["z"], t["z2"], dim, groups, 2.0, 1.0, eps, stabilizer)
    if name == "gamma_stab_div":
        return ops.gamma_stab_div(t["r"], t["z"], t["z2"], dim, groups, 0.25, eps, stabilizer)
    raise ValueError(name)


def oracle(name, t, dim, groups, eps=1e-6, stabilizer="sign", dtype=F64):
    """The op's formula, evaluated in `dtype` (float64: the reference; a half type: the naive
    evaluation that scales the half-type tolerance)."""
    t = {n: v.to(dtype) for n, v in t.items()}
    if name == "sign_split":
        x = t["x"]
        return pair_by_slicing(x.clamp(min=0), x.clamp(max=0), dim, groups)
    if name in ("sign_split_mul_input", "bounds_mul_input"):
        c0, c1 = unpair_by_slicing(t["c"], dim, groups)
        k = c0.shape[0] // t["x"].shape[0]
        x = t["x"].repeat_interleave(k, 0)
        if name == "sign_split_mul_input":
            return x.clamp(min=0) * c0 + x.clamp(max=0) * c1
        rows = lambda b: b if b.shape[0] == 1 else b.repeat_interleave(k, 0)  # noqa: E731
        return (x - rows(t["low"])) * c0 + (x - rows(t["high"])) * c1
    r = t["r"]
    k = r.shape[0] // t["z"].shape[0]
    z, z2 = t["z"].repeat_interleave(k, 0), t["z2"].repeat_interleave(k, 0)
    if name == "alpha_beta_stab_div":
        return pair_by_slicing(2.0 * div0(r, stab(z2, eps, stabilizer)), -1.0 * div0(r, stab(z - z2, eps, stabilizer)),
                               dim, groups)
    sp = torch.where(z > 0, div0(r, stab(z2, eps, stabilizer)), torch.zeros_like(r))
    sn = torch.where(z < 0, div0(r, stab(2.25 * z - z2, eps, stabilizer)), torch.zeros_like(r))
    return pair_by_slicing(sp, sn, dim, groups)


OPS = list(ops.RULE_OPS)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("name", OPS)
def test_matches_float64_formula(name, geometry, device, dtype, impl):
    shape, dim, groups = geometry
    t64 = make_inputs(name, shape, dim, groups, batch=3, k=2, device=device)
    if dtype in HALF_TYPES and "z2" in t64:
        # r / eps overflows a half type where a denominator is exactly 0 (as for ε): keep the
        # denominators away from 0 there; float32/64 cover the exact zeros.
        t64["z2"] = t64["z2"] + 3.0 * (t64["z2"] == 0)
        t64["z"] = t64["z"] + 2.0 * (t64["z"] == t64["z2"])
    t = {n: v.to(dtype) for n, v in t64.items()}
    out = run_op(name, t, dim, groups)
    ref64 = oracle(name, t, dim, groups)  # the inputs as given, upcast
    naive = oracle(name, t, dim, groups, dtype=dtype) if dtype in HALF_TYPES else None
    what = f"{name} {shape} dim={dim} groups={groups} [{impl}]"
    assert_matches_reference(out, ref64, naive, dtype, what=what)
    if impl == "extension" and dtype not in HALF_TYPES:  # an extra check, not the reference
        with lrpfast.use_implementation("fallback"):
            assert_close(out, run_op(name, t, dim, groups), SAME_DTYPE_RTOL[dtype], f"{what} vs fallback")


@pytest.mark.parametrize("dtype_", HALF_TYPES, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=GEOMETRY_IDS[:3])
@pytest.mark.parametrize("name", OPS)
def test_half_types_rounded_once(name, geometry, dtype_, device, impl):
    """Computed in float32, rounded once: element-wise within half an ulp of the float64 formula."""
    shape, dim, groups = geometry
    t64 = make_inputs(name, shape, dim, groups, batch=3, k=2, device=device)
    if "z2" in t64:  # as above: no exact-zero denominators in a half type
        t64["z2"] = t64["z2"] + 3.0 * (t64["z2"] == 0)
        t64["z"] = t64["z"] + 2.0 * (t64["z"] == t64["z2"])
    t = {n: v.to(dtype_) for n, v in t64.items()}
    assert_rounded_once(run_op(name, t, dim, groups), oracle(name, t, dim, groups), dtype_, f"{name} [{impl}]")


@pytest.mark.parametrize("stabilizer", ["sign", "plus"])
@pytest.mark.parametrize("name", ["alpha_beta_stab_div", "gamma_stab_div"])
def test_stabilizers_and_eps(name, stabilizer, device, impl):
    shape, dim, groups = GEOMETRIES[1]
    t = make_inputs(name, shape, dim, groups, batch=2, k=1, device=device)
    for eps in (0.0, 1e-6, 0.3):
        out = run_op(name, t, dim, groups, eps, stabilizer)
        assert rel_err(out, oracle(name, t, dim, groups, eps, stabilizer)) < 1e-13
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in OPS if n != "sign_split"])
def test_k_targets_equal_single_runs(name, device, impl):
    shape, dim, groups = GEOMETRIES[2]
    k = 3
    t = make_inputs(name, shape, dim, groups, batch=2, k=k, device=device)
    out = run_op(name, t, dim, groups)
    many = "c" if "c" in t else "r"
    for j in range(k):
        single = run_op(name, {**t, many: t[many][j::k].contiguous()}, dim, groups)
        assert rel_err(out[j::k], single) < 1e-14


def test_bounds_with_a_row_per_sample(device, impl):
    shape, dim, groups = GEOMETRIES[0]
    t = make_inputs("bounds_mul_input", shape, dim, groups, batch=3, k=2, device=device)
    t["low"] = t["x"] - 1.0
    t["high"] = t["x"] + 2.0
    out = run_op("bounds_mul_input", t, dim, groups)
    assert rel_err(out, oracle("bounds_mul_input", t, dim, groups)) < 1e-13


def test_empty_batch(device, impl):
    x = torch.zeros(0, 4, 3, dtype=F64, device=device)
    assert ops.sign_split(x, 1, 2).shape == (0, 8, 3)
    c = torch.zeros(0, 8, 3, dtype=F64, device=device)
    assert ops.sign_split_mul_input(c, x, 1, 2).shape == (0, 4, 3)
    assert ops.gamma_stab_div(x, x, x, 1, 2).shape == (0, 8, 3)


def test_noncontiguous_and_channels_last(device, impl):
    x = torch.randn(2, 6, 5, 4, dtype=F64, device=device).contiguous(memory_format=torch.channels_last)
    assert rel_err(ops.sign_split(x, 1, 3), oracle("sign_split", {"x": x}, 1, 3)) == 0
    t = make_inputs("gamma_stab_div", (6, 5, 4), 1, 3, batch=2, k=2, device=device)
    t = {n: v.transpose(-1, -2).contiguous().transpose(-1, -2) for n, v in t.items()}
    assert rel_err(run_op("gamma_stab_div", t, 1, 3), oracle("gamma_stab_div", t, 1, 3)) < 1e-13


# ----------------------------------------------------------------------------- what the layout means


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_layout_is_the_grouped_convolution_order(groups, device, impl):
    """conv(sign_split(x), in_pair(a, b)) = conv(x+, a) + conv(x-, b), and conv(x, out_pair(a, b))
    is pair([conv(x, a), conv(x, b)]): the channel order the rules build their weights for."""
    x = torch.randn(2, 8, 6, 5, dtype=F64, device=device)
    a = torch.randn(4, 8 // groups, 3, 3, dtype=F64, device=device)
    b = torch.randn_like(a)
    lhs = F.conv2d(ops.sign_split(x, 1, groups), MW.in_pair(a, b), groups=groups)
    rhs = F.conv2d(x.clamp(min=0), a, groups=groups) + F.conv2d(x.clamp(max=0), b, groups=groups)
    assert rel_err(lhs, rhs) < 1e-13
    both = F.conv2d(x, MW.out_pair(a, b, groups), groups=groups)
    assert rel_err(both, pair_by_slicing(F.conv2d(x, a, groups=groups), F.conv2d(x, b, groups=groups), 1,
                                         groups)) < 1e-13
    # ... and a paired relevance through the transposed contraction of the quad weight
    c = F.conv_transpose2d(both, MW.quad(a, b, groups), groups=groups)
    c0, c1 = unpair_by_slicing(c, 1, groups)
    s0, s1 = unpair_by_slicing(both, 1, groups)
    tr = lambda s, w: F.conv_transpose2d(s, w, groups=groups)  # noqa: E731
    assert rel_err(c0, tr(s0, a) + tr(s1, b)) < 1e-13 and rel_err(c1, tr(s0, b) + tr(s1, a)) < 1e-13


# ----------------------------------------------------------------------------- errors, registration


@pytest.mark.parametrize("call,err,match", [
    (lambda: ops.sign_split(torch.randn(2, 5, 3), 1, 2), RelevanceError, "do not split into groups"),
    (lambda: ops.sign_split(torch.randn(5), 1, 1), RelevanceError, "channel dimension"),
    (lambda: ops.sign_split(torch.randn(2, 4), 3, 1), RelevanceError, "not a channel dimension"),
    (lambda: ops.sign_split_mul_input(torch.randn(2, 4, 3), torch.randn(2, 4, 3), 1, 1), RelevanceError, "paired"),
    (lambda: ops.sign_split_mul_input(torch.randn(3, 8, 3), torch.randn(2, 4, 3), 1, 1), RelevanceError,
     "multiple of the batch"),
    (lambda: ops.bounds_mul_input(torch.randn(2, 8), torch.randn(2, 4), torch.zeros(3, 4), torch.ones(3, 4), -1, 1),
     RelevanceError, "low has shape"),
    (lambda: ops.gamma_stab_div(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 5), -1, 1), RelevanceError,
     "zp has shape"),
    (lambda: ops.alpha_beta_stab_div(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), -1, 1, eps=-1.0),
     RelevanceError, "eps must be"),
    (lambda: ops.gamma_stab_div(torch.randn(2, 4), torch.randn(2, 4, dtype=F64), torch.randn(2, 4), -1, 1), TypeError,
     "dtype"),
])
def test_bad_input_raises_clear_error(call, err, match, impl):
    with pytest.raises(err, match=match):
        call()


@pytest.mark.skipif(not lrpfast.HAS_EXT, reason="extension not built")
def test_extension_has_every_rule_op():
    """A stale _C (built before the rule ops) would silently fall back: fail here instead."""
    missing = [n for n in ops.RULE_OPS if not ops._ext_has(n)]
    assert not missing, f"rebuild lrpfast: the loaded extension lacks {missing}"


@pytest.mark.skipif(not lrpfast.HAS_EXT, reason="extension not built")
@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    """Schemas, fake kernels and the CPU kernels agree (torch.library.opcheck)."""
    shape, dim, groups = GEOMETRIES[1]
    t = {n: v.float() for n, v in make_inputs(name, shape, dim, groups, batch=2, k=2, device="cpu").items()}
    args = {
        "sign_split": (t.get("x"), dim, groups),
        "sign_split_mul_input": (t.get("c"), t.get("x"), dim, groups),
        "bounds_mul_input": (t.get("c"), t.get("x"), t.get("low"), t.get("high"), dim, groups),
        "alpha_beta_stab_div": (t.get("r"), t.get("z"), t.get("z2"), dim, groups, 2.0, 1.0, 1e-6, "sign"),
        "gamma_stab_div": (t.get("r"), t.get("z"), t.get("z2"), dim, groups, 0.25, 1e-6, "sign"),
    }[name]
    torch.library.opcheck(getattr(torch.ops.lrpfast, name), args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
