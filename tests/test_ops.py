"""lrpfast.ops: every op, under device x dtype x implementation, against independent oracles.

Oracles (none of them calls lrpfast): an autograd formulation through the real torch layer
(R_in = x * d(z . stop_grad(r / stab(z))).sum()/dx), the primitives' formulas written out, and
for max pooling the gradient of max pooling times r, or an index_add of r at the forward's
indices; each evaluated in float64 on the same inputs upcast (and, for the half-type tolerance,
naively in the half type). Further: conservation; K targets = K single runs; layouts. The
extension is additionally compared with the fallback, never instead of an oracle.
"""
from __future__ import annotations

import copy
import math
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

import lrpfast
from lrpfast import ops
from lrpfast.ops import RelevanceError

from .conftest import (HALF_TYPES, SAME_DTYPE_RTOL, assert_close, assert_matches_reference, assert_rounded_once,
                       channels_last,
                       divide_or_zero, dtype_id, epsilon_oracle, index_add_oracle, noncontiguous, per_target, rel_err,
                       stab_reference, winner_take_all_oracle)

F64 = torch.float64

# torch's own warning about the copy behind 'same' padding with an even kernel (the cases want it)
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

# ----------------------------------------------------------------------------- cases
# A case makes float64 master tensors (a dict: "r", "x", "z", "weight", "bias", "indices"),
# runs its op through lrpfast.ops on any cast/relaid copy of them, and gives its oracle.


def _rand(*shape, device, scale=1.0):
    return torch.randn(*shape, dtype=F64, device=device) * scale


class Case:
    id: str = ""
    eps: float = 1e-6
    stabilizer: str = "sign"
    has_z = True  # False: winner-take-all max pooling (no division)

    def forward(self, t: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inputs(self, device, batch: int, bias: bool) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def make(self, device, batch: int = 2, k: int = 1, bias: bool = True) -> Dict[str, torch.Tensor]:
        t = self.inputs(device, batch, bias)
        if "z" not in t:
            t["z"] = self.forward(t, t["x"])
        out_shape = t["z"].shape if self.has_z else t["indices"].shape
        t["r"] = _rand(k * batch, *out_shape[1:], device=device)
        return t

    def run(self, t):
        raise NotImplementedError

    def oracle(self, t):
        """The independent reference for K = 1 rows of r, in the dtype of t: autograd through the
        torch layer, with the given z in the division (what the op is told, and what it divides by)."""
        return epsilon_oracle(lambda x: self.forward(t, x), t["x"], t["r"], self.eps, self.stabilizer, z_given=t["z"])

    def reference(self, t):
        """oracle() for r with any number K of maps per sample (one oracle run per target)."""
        batch = (t["x"] if "x" in t else t["z"]).shape[0]
        return per_target(lambda r: self.oracle({**t, "r": r}), t["r"], batch)

    def with_eps(self, eps: float) -> "Case":
        other = copy.copy(self)
        other.eps = eps
        return other

    def __repr__(self):
        return self.id


class LinearCase(Case):
    def __init__(self, id, fin, fout, extra=(), eps=1e-6, stabilizer="sign"):
        self.id, self.fin, self.fout, self.extra, self.eps, self.stabilizer = id, fin, fout, extra, eps, stabilizer

    def inputs(self, device, batch, bias):
        return {
            "x": _rand(batch, *self.extra, self.fin, device=device),
            "weight": _rand(self.fout, self.fin, device=device, scale=1 / math.sqrt(max(self.fin, 1))),
            "bias": _rand(self.fout, device=device, scale=0.1 if bias else 0.0),
        }

    def forward(self, t, x):
        return F.linear(x, t["weight"].to(x.dtype), t["bias"].to(x.dtype))

    def run(self, t):
        return ops.linear_relprop(t["r"], t["x"], t["z"], t["weight"], self.eps, self.stabilizer)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvCase(Case):
    def __init__(self, id, dims, cin, cout, kernel, size, stride=1, padding=0, dilation=1, groups=1, eps=1e-6,
                 stabilizer="sign"):
        self.id, self.dims, self.cin, self.cout, self.groups = id, dims, cin, cout, groups
        self.kernel = (kernel,) * dims if isinstance(kernel, int) else tuple(kernel)
        self.size = (size,) * dims if isinstance(size, int) else tuple(size)
        self.stride, self.padding, self.dilation, self.eps, self.stabilizer = stride, padding, dilation, eps, stabilizer

    def inputs(self, device, batch, bias):
        fan_in = self.cin // self.groups * math.prod(self.kernel)
        return {
            "x": _rand(batch, self.cin, *self.size, device=device),
            "weight": _rand(self.cout, self.cin // self.groups, *self.kernel, device=device, scale=fan_in ** -0.5),
            "bias": _rand(self.cout, device=device, scale=0.1 if bias else 0.0),
        }

    def forward(self, t, x):
        return _CONV[self.dims](x, t["weight"].to(x.dtype), t["bias"].to(x.dtype), self.stride, self.padding,
                                self.dilation, self.groups)

    def run(self, t):
        return ops.conv_relprop(t["r"], t["x"], t["z"], t["weight"], self.stride, self.padding, self.dilation,
                                self.groups, self.eps, self.stabilizer)


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class MaxPoolCase(Case):
    has_z = False

    def __init__(self, id, dims, channels, size, kernel, stride=None, padding=0, dilation=1, ceil_mode=False):
        self.id, self.dims, self.channels = id, dims, channels
        self.size = (size,) * dims if isinstance(size, int) else tuple(size)
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.dilation, self.ceil_mode = dilation, ceil_mode

    def forward(self, t, x):
        return _MAX_POOL[self.dims](x, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)

    def inputs(self, device, batch, bias):
        x = _rand(batch, self.channels, *self.size, device=device)
        pooled, indices = _MAX_POOL[self.dims](x, self.kernel, self.stride, self.padding, self.dilation,
                                               self.ceil_mode, return_indices=True)
        return {"x": x, "indices": indices, "z": pooled}

    def run(self, t):
        # the forward's geometry, as the layers pass it: disjoint windows take the CUDA cell kernel
        return ops.max_pool_relprop(t["r"], t["indices"], t["x"].shape, kernel_size=self.kernel,
                                    stride=self.stride, padding=self.padding, dilation=self.dilation)

    @property
    def disjoint(self) -> bool:
        return bool(ops._disjoint_cells("test", self.dims, self.kernel, self.stride, self.padding, self.dilation)[0])

    def oracle(self, t):
        """r added at the forward's indices (index_add_; K rows of r per sample allowed)."""
        return index_add_oracle(t["r"], t["indices"], t["x"].shape)

    def autograd_oracle(self, t):
        """r routed by autograd through the torch max pooling (K = 1)."""
        return winner_take_all_oracle(lambda x: self.forward(t, x), t["x"], t["r"])


class AvgPoolCase(Case):
    def __init__(self, id, dims, channels, size, kernel, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None, eps=1e-6, stabilizer="sign"):
        self.id, self.dims, self.channels = id, dims, channels
        self.size = (size,) * dims if isinstance(size, int) else tuple(size)
        self.kernel, self.stride, self.padding, self.ceil_mode = kernel, stride, padding, ceil_mode
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override
        self.eps, self.stabilizer = eps, stabilizer

    def inputs(self, device, batch, bias):
        return {"x": _rand(batch, self.channels, *self.size, device=device)}

    def forward(self, t, x):
        if self.dims == 1:
            if self.divisor_override is None:
                return F.avg_pool1d(x, self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad)
            # avg_pool1d has no divisor_override: a height-1 avg_pool2d
            return F.avg_pool2d(x.unsqueeze(-2), (1, self.kernel), (1, self.stride or self.kernel), (0, self.padding),
                                self.ceil_mode, self.count_include_pad, self.divisor_override).squeeze(-2)
        pool = F.avg_pool2d if self.dims == 2 else F.avg_pool3d
        return pool(x, self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                    self.divisor_override)

    def run(self, t):
        return ops.avg_pool_relprop(t["r"], t["x"], t["z"], self.kernel, self.stride, self.padding, self.ceil_mode,
                                    self.count_include_pad, self.divisor_override, self.eps, self.stabilizer)


_ADAPTIVE = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


class AdaptiveAvgPoolCase(Case):
    def __init__(self, id, dims, channels, size, out_size, eps=1e-6, stabilizer="sign"):
        self.id, self.dims, self.channels, self.size, self.out_size = id, dims, channels, size, out_size
        self.eps, self.stabilizer = eps, stabilizer

    def inputs(self, device, batch, bias):
        return {"x": _rand(batch, self.channels, *self.size, device=device)}

    def forward(self, t, x):
        return _ADAPTIVE[self.dims](x, self.out_size)

    def run(self, t):
        return ops.adaptive_avg_pool_relprop(t["r"], t["x"], t["z"], self.eps, self.stabilizer)


class StabDivCase(Case):
    """s = r / stab(z): its oracle is the formula itself, written without K-row tricks."""

    def __init__(self, id, shape, eps=1e-6, stabilizer="sign"):
        self.id, self.shape, self.eps, self.stabilizer = id, shape, eps, stabilizer

    def inputs(self, device, batch, bias):
        return {"z": _rand(batch, *self.shape, device=device)}

    def make(self, device, batch=2, k=1, bias=True):
        t = self.inputs(device, batch, bias)
        t["r"] = _rand(k * batch, *self.shape, device=device)
        return t

    def run(self, t):
        return ops.stab_div(t["r"], t["z"], self.eps, self.stabilizer)

    def oracle(self, t):
        return divide_or_zero(t["r"], stab_reference(t["z"], self.eps, self.stabilizer))


class MulInputCase(StabDivCase):
    def inputs(self, device, batch, bias):
        return {"x": _rand(batch, *self.shape, device=device)}

    def run(self, t):
        return ops.mul_input(t["r"], t["x"])

    def oracle(self, t):
        return t["r"] * t["x"]


class MulStabDivCase(StabDivCase):
    def inputs(self, device, batch, bias):
        return {"x": _rand(batch, *self.shape, device=device), "z": _rand(batch, *self.shape, device=device)}

    def run(self, t):
        return ops.mul_stab_div(t["r"], t["x"], t["z"], self.eps, self.stabilizer)

    def oracle(self, t):
        return divide_or_zero(t["r"] * t["x"], stab_reference(t["z"], self.eps, self.stabilizer))


PRIMITIVE_CASES = [
    StabDivCase("stab_div-4d", (3, 5, 4)),
    StabDivCase("stab_div-odd-plus", (7,), stabilizer="plus"),
    StabDivCase("stab_div-eps0.1", (2, 3, 3, 3), eps=0.1),
    MulInputCase("mul_input-4d", (3, 5, 4)),
    MulInputCase("mul_input-odd", (7,)),
    MulStabDivCase("mul_stab_div-4d", (3, 5, 4)),
    MulStabDivCase("mul_stab_div-odd-plus", (5, 3), stabilizer="plus"),
]

LINEAR_CASES = [
    LinearCase("linear", 5, 4),
    LinearCase("linear-odd-plus", 33, 17, stabilizer="plus"),
    LinearCase("linear-extra-dims", 6, 3, extra=(3,), eps=0.1),
]

CONV_CASES = [
    ConvCase("conv1d", 1, 3, 4, 3, 9),
    ConvCase("conv1d-stride2-pad1", 1, 3, 4, 3, 10, stride=2, padding=1),
    ConvCase("conv1d-dil2-groups2", 1, 4, 6, 3, 11, dilation=2, groups=2, stabilizer="plus"),
    ConvCase("conv1d-same-odd", 1, 3, 2, 3, 8, padding="same"),
    ConvCase("conv1d-same-even", 1, 3, 2, 4, 8, padding="same"),
    ConvCase("conv1d-valid", 1, 2, 2, 2, 6, padding="valid"),
    ConvCase("conv2d", 2, 3, 4, 3, 7),
    ConvCase("conv2d-stride21-pad12", 2, 3, 4, 3, (8, 7), stride=(2, 1), padding=(1, 2)),
    ConvCase("conv2d-stride3-outpad", 2, 2, 3, 3, 8, stride=3),
    ConvCase("conv2d-dil2", 2, 3, 4, 3, 9, dilation=2, eps=0.1),
    ConvCase("conv2d-depthwise", 2, 3, 6, 3, 7, padding=1, groups=3),
    ConvCase("conv2d-same-odd-dil2", 2, 3, 4, 3, 8, padding="same", dilation=2, stabilizer="plus"),
    ConvCase("conv2d-same-even", 2, 3, 4, (2, 4), (6, 7), padding="same"),
    ConvCase("conv3d", 3, 2, 3, 3, 5),
    ConvCase("conv3d-stride2-pad1", 3, 2, 3, 3, (5, 6, 4), stride=2, padding=1),
    ConvCase("conv3d-same-even", 3, 2, 2, 2, 4, padding="same"),
    ConvCase("conv3d-groups2-dil", 3, 4, 4, (2, 3, 2), 6, dilation=(1, 2, 1), groups=2),
]

MAX_POOL_CASES = [
    MaxPoolCase("maxpool1d-overlap", 1, 3, 9, 3, stride=1),
    MaxPoolCase("maxpool1d-pad1", 1, 3, 9, 2, stride=2, padding=1),
    MaxPoolCase("maxpool1d-dil2-ceil", 1, 2, 10, 3, stride=2, dilation=2, ceil_mode=True),
    MaxPoolCase("maxpool2d-notebook", 2, 3, 6, 2),
    MaxPoolCase("maxpool2d-overlap-pad1", 2, 3, 7, 3, stride=2, padding=1),
    MaxPoolCase("maxpool2d-dil2", 2, 2, 8, 3, stride=1, dilation=2),
    MaxPoolCase("maxpool2d-ceil", 2, 2, 8, 3, stride=2, ceil_mode=True),
    MaxPoolCase("maxpool2d-rect-pad-ceil", 2, 2, (7, 8), (2, 3), stride=(1, 2), padding=1, ceil_mode=True),
    MaxPoolCase("maxpool3d", 3, 2, 4, 2),
    MaxPoolCase("maxpool3d-overlap-pad-ceil", 3, 2, 5, 3, stride=2, padding=1, ceil_mode=True),
    MaxPoolCase("maxpool3d-dil2", 3, 2, 5, 2, stride=1, dilation=2),
    # disjoint windows (span <= stride): one cell per window, uncovered tails and gaps get 0
    MaxPoolCase("maxpool2d-odd-tail", 2, 3, (7, 9), 2),
    MaxPoolCase("maxpool2d-gap", 2, 2, (8, 10), 2, stride=3),
    MaxPoolCase("maxpool2d-pad-ceil-disjoint", 2, 2, 7, 2, stride=2, padding=1, ceil_mode=True),
    MaxPoolCase("maxpool1d-dil2-gap", 1, 3, 11, 2, stride=3, dilation=2),
    MaxPoolCase("maxpool3d-rect-disjoint", 3, 2, (5, 4, 6), (1, 2, 3), stride=(2, 2, 3), padding=(0, 1, 1)),
]

AVG_POOL_CASES = [
    AvgPoolCase("avgpool1d-pad-nocip", 1, 3, 9, 3, stride=2, padding=1, count_include_pad=False),
    AvgPoolCase("avgpool1d-ceil", 1, 3, 9, 2, ceil_mode=True),
    AvgPoolCase("avgpool1d-divisor", 1, 2, 8, 3, stride=1, divisor_override=2),
    AvgPoolCase("avgpool2d", 2, 3, 6, 2),
    AvgPoolCase("avgpool2d-pad-ceil-cip", 2, 3, 8, 3, stride=2, padding=1, ceil_mode=True, stabilizer="plus"),
    AvgPoolCase("avgpool2d-pad-nocip", 2, 3, 7, 3, stride=2, padding=1, count_include_pad=False),
    AvgPoolCase("avgpool2d-rect-divisor", 2, 2, (6, 7), (2, 3), stride=1, divisor_override=5, eps=0.1),
    AvgPoolCase("avgpool2d-ceil-nocip", 2, 2, 7, 2, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    AvgPoolCase("avgpool3d", 3, 2, 4, 2),
    AvgPoolCase("avgpool3d-pad-ceil-nocip", 3, 2, 5, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    AvgPoolCase("avgpool3d-divisor", 3, 2, 4, 2, stride=1, divisor_override=3),
]

ADAPTIVE_CASES = [
    AdaptiveAvgPoolCase("adaptive1d-7to3", 1, 3, (7,), 3),
    AdaptiveAvgPoolCase("adaptive2d-overlap", 2, 3, (7, 6), (3, 4)),
    AdaptiveAvgPoolCase("adaptive2d-global-plus", 2, 3, (5, 5), 1, stabilizer="plus"),
    AdaptiveAvgPoolCase("adaptive3d", 3, 2, (5, 4, 6), (2, 3, 4)),
]

LAYER_CASES = LINEAR_CASES + CONV_CASES + MAX_POOL_CASES + AVG_POOL_CASES + ADAPTIVE_CASES
ALL_CASES = PRIMITIVE_CASES + LAYER_CASES
SPATIAL_CASES = [c for c in LAYER_CASES if getattr(c, "dims", 0) in (2, 3)] + [PRIMITIVE_CASES[0], PRIMITIVE_CASES[3],
                                                                                PRIMITIVE_CASES[5]]


def cast(t: Dict[str, torch.Tensor], dtype) -> Dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()}


def run_as(name: str, case: Case, t):
    with lrpfast.use_implementation(name):
        return case.run(t)


def _skip_unsupported(case: Case, device: str, dtype) -> None:
    if device == "cpu" and dtype in HALF_TYPES and isinstance(case, AvgPoolCase) and case.dims == 3:
        pytest.skip("ATen has no CPU avg_pool3d (forward or backward) for half types")


def _away_from_zero(t: Dict[str, torch.Tensor], floor: float = 1e-2) -> None:
    # Half types cannot hold r / z for |z| below ~1e-5 (it overflows float16): keep the data
    # of the dtype matrix clear of that, the semantics near 0 are tested separately.
    if "z" in t:
        z = t["z"]
        t["z"] = torch.where(z.abs() < floor, torch.where(z < 0, -floor, floor), z)


# ----------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_matches_float64_oracle(case, device, dtype, impl):
    """Implementation in `dtype` vs the independent oracle in float64 on the same (upcast) inputs;
    half types against the same oracle evaluated naively in their dtype (conftest)."""
    _skip_unsupported(case, device, dtype)
    master = case.make(device)
    _away_from_zero(master)
    low = cast(master, dtype)  # the inputs as the user has them
    ref64 = case.oracle(cast(low, F64))
    naive = case.oracle(low) if dtype in HALF_TYPES else None
    out = case.run(low)
    assert_matches_reference(out, ref64, naive, dtype, f"{case.id} [{impl}]")
    if impl == "extension" and dtype not in HALF_TYPES:  # an extra check, not the reference
        assert_close(out, run_as("fallback", case, low), SAME_DTYPE_RTOL[dtype], f"{case.id} vs fallback in {dtype}")


@pytest.mark.parametrize("dtype_", HALF_TYPES, ids=dtype_id)
@pytest.mark.parametrize("case", PRIMITIVE_CASES + MAX_POOL_CASES, ids=repr)
def test_half_types_rounded_once(case, dtype_, device, impl):
    """The steps without a contraction compute in float32 and round once: element-wise within
    half an ulp of the float64 oracle (K = 2 maps per sample)."""
    if device == "cuda" and isinstance(case, MaxPoolCase) and impl == "extension" and not case.disjoint:
        pytest.skip("the CUDA scatter adds overlapping windows with 16-bit atomics (csrc/cuda/max_pool.cu)")
    master = case.make(device, k=2)
    _away_from_zero(master)
    low = cast(master, dtype_)
    assert_rounded_once(case.run(low), case.reference(cast(low, F64)), dtype_, f"{case.id} [{impl}]")


@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3"])
@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_matches_autograd_oracle(case, batch, device, impl):
    """float64 result vs the independent oracle (autograd through the real torch layer)."""
    t = case.make(device, batch=batch)
    out = case.run(t)
    assert out.dtype == F64
    assert_close(out, case.oracle(t), 1e-12, case.id)
    if isinstance(case, MaxPoolCase):  # the index_add oracle is autograd's routing
        assert_close(out, case.autograd_oracle(t), 1e-12, f"{case.id} vs autograd")


@pytest.mark.parametrize("dtype_", [F64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("case", LAYER_CASES, ids=repr)
def test_conservation(case, dtype_, device, impl):
    """Zero bias, eps -> 0: per sample (and per target), sum R_in = sum R_out."""
    case = case.with_eps(1e-12 if dtype_ == F64 else 1e-9)
    t = cast(case.make(device, batch=2, k=2, bias=False), dtype_)
    out = case.run(t)
    rows = t["r"].shape[0]
    got, want = out.reshape(rows, -1).sum(1), t["r"].reshape(rows, -1).sum(1)
    scale = t["r"].reshape(rows, -1).abs().sum(1)
    rtol = 1e-9 if dtype_ == F64 else 1e-4
    # Relevance at units whose z is ~0 would not be conserved; random data keeps |z| > 1e-4.
    assert ((got - want).abs() <= rtol * scale).all(), f"{case.id}: {got} vs {want}"


@pytest.mark.parametrize("dtype_", [F64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_k_targets_equal_k_single_runs(case, dtype_, device, impl):
    """r with K*B rows (row b*K + k) gives what K separate runs give."""
    k, b = 3, 2
    t = cast(case.make(device, batch=b, k=k), dtype_)
    out = case.run(t)
    assert out.shape[0] == k * b
    per_sample = out.reshape(b, k, *out.shape[1:])
    r_split = t["r"].reshape(b, k, *t["r"].shape[1:])
    for j in range(k):
        single = case.run({**t, "r": r_split[:, j]})
        assert_close(per_sample[:, j], single, 1e-12 if dtype_ == F64 else 1e-6, f"{case.id} target {j}")
    if dtype_ == F64:
        assert_close(out, case.reference(t), 1e-12, f"{case.id} K={k} vs oracle")


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_empty_batch(case, k, device, impl):
    t = case.make(device, batch=0, k=k)
    out = case.run(t)
    want_shape = (0, *(t["x"] if "x" in t else t["z"]).shape[1:])
    assert out.shape == want_shape and out.dtype == F64 and out.device.type == device


# ----------------------------------------------------------------------------- zero-size tensors


def test_zero_spatial_primitives(device, dtype, impl):
    z = torch.randn(2, 3, 0, 4, device=device).to(dtype)
    r = torch.randn(4, 3, 0, 4, device=device).to(dtype)  # K = 2
    for out in (ops.stab_div(r, z), ops.mul_input(r, z), ops.mul_stab_div(r, z, z)):
        assert out.shape == (4, 3, 0, 4) and out.dtype == dtype


def test_zero_features_linear(device, impl):
    x, w = torch.randn(3, 0, device=device), torch.randn(4, 0, device=device)
    z = F.linear(x, w, torch.randn(4, device=device))
    out = ops.linear_relprop(torch.randn(6, 4, device=device), x, z, w)
    assert out.shape == (6, 0)
    # ... and zero outputs: nothing flows back, the inputs get 0
    w0 = torch.randn(0, 5, device=device)
    x5 = torch.randn(3, 5, device=device)
    out = ops.linear_relprop(torch.randn(3, 0, device=device), x5, F.linear(x5, w0), w0)
    assert out.shape == (3, 5) and torch.equal(out, torch.zeros_like(out))


def test_zero_spatial_max_pool(device, impl):
    # torch cannot pool an empty plane, but the scatter itself is well defined: an empty output
    indices = torch.zeros(2, 3, 0, 4, dtype=torch.long, device=device)
    out = ops.max_pool_relprop(torch.randn(2, 3, 0, 4, device=device), indices, (2, 3, 0, 8))
    assert out.shape == (2, 3, 0, 8)
    # an empty output plane over a non-empty input: all zeros
    out = ops.max_pool_relprop(torch.randn(4, 3, 0, 4, device=device), indices, (2, 3, 5, 8))
    assert out.shape == (4, 3, 5, 8) and not out.any()


DISJOINT_MAX_POOL_CASES = [c for c in MAX_POOL_CASES if c.disjoint]


def test_disjoint_max_pool_cases_exist():
    assert len(DISJOINT_MAX_POOL_CASES) >= 6 and len(DISJOINT_MAX_POOL_CASES) < len(MAX_POOL_CASES)


def _window_coverage(case: MaxPoolCase) -> torch.Tensor:
    """How many of the forward's windows hold each input element, counted without lrpfast: the
    input gradient of a convolution with an all-ones kernel of the pooling's geometry, cropped to
    the pooling's output size (the input padded on the right so that ceil_mode's last windows
    exist)."""
    dims = case.dims
    tup = lambda v: (v,) * dims if isinstance(v, int) else tuple(v)  # noqa: E731
    kernel, dilation, padding = tup(case.kernel), tup(case.dilation), tup(case.padding)
    stride = tup(case.stride if case.stride is not None else case.kernel)
    x = torch.zeros(1, 1, *case.size, dtype=F64, requires_grad=True)
    out_size = case.forward({}, x.detach()).shape[2:]
    right = []
    for k, s, d in reversed(list(zip(kernel, stride, dilation))):
        right += [0, s * (d * k + 2)]
    with torch.enable_grad():
        y = _CONV[dims](F.pad(x, right), torch.ones(1, 1, *kernel, dtype=F64), None, stride, padding, dilation)
        y = y[(slice(None), slice(None)) + tuple(slice(0, n) for n in out_size)]
        (count,) = torch.autograd.grad(y.sum(), x)
    return count


EXTRA_POOL_GEOMETRIES = [  # only for the flag below: windows that touch, overlap by dilation, or leave gaps
    MaxPoolCase("k2-s2-dil2", 1, 1, 9, 2, stride=2, dilation=2),
    MaxPoolCase("k3-s3-pad1-ceil", 1, 1, 10, 3, stride=3, padding=1, ceil_mode=True),
    MaxPoolCase("k2-s1", 2, 1, 5, 2, stride=1),
    MaxPoolCase("k1-s2", 2, 1, 5, 1, stride=2),
    MaxPoolCase("k32-s2-pad10-rect", 2, 1, (6, 7), (3, 2), stride=(2, 2), padding=(1, 0)),
]


@pytest.mark.parametrize("case", MAX_POOL_CASES + EXTRA_POOL_GEOMETRIES, ids=repr)
def test_disjoint_flag_means_no_overlap(case):
    """ops' choice of the cell kernel (disjoint windows) against the windows themselves: flagged
    exactly when no input element lies in two windows (all these geometries have padding < stride).
    A wrong flag would send overlapping windows to a kernel that writes instead of adding."""
    assert case.disjoint == bool(_window_coverage(case).max() <= 1), case.id


@pytest.mark.parametrize("case", DISJOINT_MAX_POOL_CASES, ids=repr)
@pytest.mark.parametrize("k", [1, 3])
def test_max_pool_cells_equal_scatter(case, k, device, dtype, impl):
    """Disjoint windows: the cell kernel (geometry given) writes every input element, the winner
    exactly r (no additions), so it equals the scatter bit for bit, even over a poisoned buffer."""
    t = case.make(device, batch=3, k=k)
    r, idx = t["r"].to(dtype), t["indices"]
    scatter = ops.max_pool_relprop(r, idx, t["x"].shape)
    # a freed buffer of NaNs of the output's size: the next allocation of that size reuses it, so
    # an element the kernel leaves unwritten shows up as NaN
    torch.full_like(scatter, float("nan"))
    cells = case.run({"r": r, "indices": idx, "x": t["x"]})
    assert not cells.isnan().any()
    assert torch.equal(cells, scatter)


@pytest.mark.skipif(not lrpfast.build_info()["extension_loaded"], reason="the C++ argument checks")
def test_max_pool_cells_checked_in_cpp(device):
    idx = torch.zeros(1, 1, 2, 2, dtype=torch.long, device=device)
    r = torch.randn(1, 1, 2, 2, device=device)
    with pytest.raises(RuntimeError, match=r"max_pool_relprop: stride \[2, 2\] and padding \[2, 0\] do not fit"):
        torch.ops.lrpfast.max_pool_relprop(r, idx, [1, 1, 4, 4], [2, 2], [2, 0])
    with pytest.raises(RuntimeError, match=r"max_pool_relprop: stride \[2\] and padding \[0\] must both"):
        torch.ops.lrpfast.max_pool_relprop(r, idx, [1, 1, 4, 4], [2], [0])


# ----------------------------------------------------------------------------- layouts


def _relaid(case: Case, t, how: str):
    out = dict(t)
    if how == "channels_last":
        for key in ("r", "x", "z", "weight", "indices"):
            if key in out and out[key].dim() in (4, 5):
                out[key] = channels_last(out[key])
    else:
        kinds = {"r": "sliced", "x": "transposed", "z": "sliced", "weight": "transposed", "indices": "transposed"}
        for key, kind in kinds.items():
            if key in out and out[key].dim() >= 2:
                out[key] = noncontiguous(out[key], "offset" if how == "offset" else kind)
    return out


@pytest.mark.parametrize("dtype_", [F64, torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("how", ["noncontiguous", "offset"])
@pytest.mark.parametrize("case", ALL_CASES, ids=repr)
def test_noncontiguous_inputs(case, how, dtype_, device, impl):
    _skip_unsupported(case, device, dtype_)
    t = cast(case.make(device, k=2), dtype_)
    want = case.run(t)
    got = case.run(_relaid(case, t, how))
    assert_close(got, want, {F64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3}[dtype_], f"{case.id} {how}")
    if dtype_ == F64:
        assert_close(got, case.reference(t), 1e-12, f"{case.id} {how} vs oracle")


@pytest.mark.parametrize("dtype_", [F64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", SPATIAL_CASES, ids=repr)
def test_channels_last_inputs(case, dtype_, device, impl):
    _skip_unsupported(case, device, dtype_)
    t = cast(case.make(device, k=2), dtype_)
    want = case.run(t)
    relaid = _relaid(case, t, "channels_last")
    got = case.run(relaid)
    assert_close(got, want, {F64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype_], f"{case.id} channels_last")
    if dtype_ == F64:
        assert_close(got, case.reference(t), 1e-12, f"{case.id} channels_last vs oracle")
    # The output keeps the layout of x (or z for stab_div), in both implementations alike.
    if not isinstance(case, MaxPoolCase):
        ref = relaid["x"] if "x" in relaid else relaid["z"]
        fmt = torch.channels_last if ref.dim() == 4 else torch.channels_last_3d
        assert got.is_contiguous(memory_format=fmt), f"{case.id}: output lost the channels_last layout"


# ----------------------------------------------------------------------------- stabiliser semantics

# eps = 1/4 and these z are exact in every dtype, so the expected values are exact too.
Z_VALUES = [-2.0, -0.25, -0.125, 0.0, 0.125, 3.0]
EXPECTED_STAB = {
    "sign": [-2.25, -0.5, -0.375, 0.25, 0.375, 3.25],  # sign(0) = +1
    "plus": [-1.75, 0.0, 0.125, 0.25, 0.375, 3.25],  # z = -eps: an exact 0
}


@pytest.mark.parametrize("stabilizer", ["sign", "plus"])
def test_stabilizer_semantics(stabilizer, device, dtype, impl):
    z = torch.tensor([Z_VALUES], dtype=dtype, device=device)
    r = torch.full((2, len(Z_VALUES)), 3.0, dtype=dtype, device=device)  # K = 2
    x = torch.full_like(z, 2.0)
    den = torch.tensor(EXPECTED_STAB[stabilizer], dtype=F64)
    want = torch.where(den == 0, torch.zeros_like(den), 3.0 / den).to(device)  # division by exact 0 gives 0
    for got, expected in ((ops.stab_div(r, z, 0.25, stabilizer), want),
                          (ops.mul_stab_div(r, x, z, 0.25, stabilizer), 2 * want)):
        assert torch.isfinite(got).all()
        tol = torch.finfo(dtype).eps * expected.abs().max().item()
        assert (got.double() - expected).abs().max().item() <= tol, (stabilizer, got, expected)


@pytest.mark.parametrize("dtype_", [torch.float32, F64], ids=dtype_id)
def test_plus_at_minus_eps_default(dtype_, device, impl):
    """The seed's stabiliser at z = -1e-6 (its own eps) divides by an exact 0: gives 0, no NaN."""
    z = torch.tensor([[-1e-6, 1.0]], dtype=dtype_, device=device)
    r = torch.ones_like(z)
    s = ops.stab_div(r, z, 1e-6, "plus")
    assert s[0, 0].item() == 0 and torch.isfinite(s).all()
    w = torch.eye(2, dtype=dtype_, device=device)
    out = ops.linear_relprop(r, z.clone(), z, w, 1e-6, "plus")
    assert torch.isfinite(out).all() and out[0, 0].item() == 0


@pytest.mark.parametrize("stabilizer", ["sign", "plus"])
def test_lrp0_zero_denominator(stabilizer, device, impl):
    """eps = 0 (LRP-0): a unit with z = 0 passes no relevance instead of NaN."""
    z = torch.tensor([[0.0, 2.0, -4.0]], device=device)
    s = ops.stab_div(torch.ones(1, 3, device=device), z, 0.0, stabilizer)
    assert s.tolist() == [[0.0, 0.5, -0.25]]


def test_linear_with_designed_z(device, dtype, impl):
    """z values at the stabiliser's edge cases through a whole layer step (z is data here)."""
    x = torch.randn(2, 4, device=device).to(dtype)
    w = torch.randn(len(Z_VALUES), 4, device=device).to(dtype)
    z = torch.tensor([Z_VALUES, Z_VALUES[::-1]], device=device).to(dtype)
    r = torch.randn(2, len(Z_VALUES), device=device).to(dtype)
    for stabilizer in ("sign", "plus"):
        den = stab_reference(z.double(), 0.25, stabilizer)
        s = divide_or_zero(r.double(), den)
        want = x.double() * (s @ w.double())
        got = ops.linear_relprop(r, x, z, w, 0.25, stabilizer)
        assert torch.isfinite(got).all()
        rtol = 1e-12 if dtype == F64 else 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
        assert rel_err(got, want) <= rtol, stabilizer


# ----------------------------------------------------------------------------- errors


def _lin(dtype=torch.float32, device="cpu"):
    x = torch.randn(2, 3, dtype=dtype, device=device)
    w = torch.randn(4, 3, dtype=dtype, device=device)
    return torch.randn(2, 4, dtype=dtype, device=device), x, F.linear(x, w), w


def _conv():
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    z = F.conv2d(x, w)
    return torch.randn_like(z), x, z, w


def _pool():
    x = torch.randn(2, 3, 6, 6)
    z = F.avg_pool2d(x, 2)
    return torch.randn_like(z), x, z


def _idx(dtype=torch.long, device="cpu"):
    return torch.zeros(2, 3, 3, 3, dtype=dtype, device=device)


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


ERROR_CASES = {
    # name: (callable, exception type, regex the message must match: op and argument)
    "stab_div-shape": (lambda: ops.stab_div(torch.randn(2, 5), torch.randn(2, 4)), RelevanceError,
                       r"stab_div: relevance has shape \(2, 5\).*z of shape \(2, 4\)"),
    "stab_div-rows": (lambda: ops.stab_div(torch.randn(3, 4), torch.randn(2, 4)), RelevanceError,
                      r"stab_div: relevance has 3 rows.*multiple of the batch 2"),
    "stab_div-rows-empty": (lambda: ops.stab_div(torch.randn(2, 4), torch.randn(0, 4)), RelevanceError,
                            r"stab_div: relevance has 2 rows"),
    "stab_div-dtype": (lambda: ops.stab_div(torch.randn(2, 4), torch.randn(2, 4, dtype=F64)), TypeError,
                       r"stab_div: z has dtype torch.float64, expected torch.float32"),
    "stab_div-int": (lambda: ops.stab_div(torch.ones(2, 4, dtype=torch.int32), torch.ones(2, 4, dtype=torch.int32)),
                     TypeError, r"stab_div: r must be float32, float64, float16 or bfloat16"),
    "stab_div-not-tensor": (lambda: ops.stab_div([1.0], torch.randn(1)), TypeError,
                            r"stab_div: r must be a torch.Tensor"),
    "stab_div-device": (lambda: ops.stab_div(torch.randn(2, 4), _meta(torch.randn(2, 4))), RelevanceError,
                        r"stab_div: z is on meta, expected cpu"),
    "stab_div-stabilizer": (lambda: ops.stab_div(torch.randn(2, 4), torch.randn(2, 4), 1e-6, "abs"), RelevanceError,
                            r"stab_div: stabilizer must be one of \('sign', 'plus'\), got 'abs'"),
    "stab_div-negative-eps": (lambda: ops.stab_div(torch.randn(2, 4), torch.randn(2, 4), -1e-6), RelevanceError,
                              r"stab_div: eps must be a finite float >= 0, got -1e-06"),
    "stab_div-nan-eps": (lambda: ops.stab_div(torch.randn(2, 4), torch.randn(2, 4), float("nan")), RelevanceError,
                         r"stab_div: eps must be"),
    "mul_input-shape": (lambda: ops.mul_input(torch.randn(2, 4), torch.randn(2, 3)), RelevanceError,
                        r"mul_input: relevance has shape \(2, 4\).*x of shape \(2, 3\)"),
    "mul_input-dtype": (lambda: ops.mul_input(torch.randn(2, 4), torch.randn(2, 4).half()), TypeError,
                        r"mul_input: x has dtype torch.float16"),
    "mul_stab_div-xz": (lambda: ops.mul_stab_div(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 5)),
                        RelevanceError, r"mul_stab_div: x has shape \(2, 4\) but z has \(2, 5\)"),
    "mul_stab_div-device": (lambda: ops.mul_stab_div(torch.randn(2, 4), torch.randn(2, 4), _meta(torch.randn(2, 4))),
                            RelevanceError, r"mul_stab_div: z is on meta"),
    "linear-weight": (lambda: ops.linear_relprop(*_lin()[:3], torch.randn(4, 5)), RelevanceError,
                      r"linear_relprop: expected x \(B, \*, 5\).*weight \(4, 5\)"),
    "linear-r": (lambda: ops.linear_relprop(torch.randn(2, 3), *_lin()[1:]), RelevanceError,
                 r"linear_relprop: relevance has shape \(2, 3\), expected \(K\*B, 4\)"),
    "linear-dtype": (lambda: ops.linear_relprop(*_lin()[:3], _lin()[3].double()), TypeError,
                     r"linear_relprop: weight has dtype torch.float64"),
    "linear-device": (lambda: ops.linear_relprop(_lin()[0], _meta(_lin()[1]), *_lin()[2:]), RelevanceError,
                      r"linear_relprop: x is on meta"),
    "linear-stabilizer": (lambda: ops.linear_relprop(*_lin(), stabilizer="Sign"), RelevanceError,
                          r"linear_relprop: stabilizer"),
    "linear-eps": (lambda: ops.linear_relprop(*_lin(), eps=-1.0), RelevanceError, r"linear_relprop: eps"),
    "conv-channels": (lambda: ops.conv_relprop(*_conv()[:3], torch.randn(4, 2, 3, 3)), RelevanceError,
                      r"conv_relprop: channels do not match"),
    "conv-dims": (lambda: ops.conv_relprop(*_conv()[:3], torch.randn(4, 3, 3)), RelevanceError,
                  r"conv_relprop: expected a 1d convolution"),
    "conv-stride": (lambda: ops.conv_relprop(*_conv(), stride=(1, 1, 1)), RelevanceError,
                    r"conv_relprop: stride must have 2 entries"),
    "conv-padding": (lambda: ops.conv_relprop(*_conv(), padding="full"), RelevanceError,
                     r"conv_relprop: padding must be 'valid', 'same' or ints"),
    "conv-r": (lambda: ops.conv_relprop(torch.randn(2, 4, 5, 4), *_conv()[1:]), RelevanceError,
               r"conv_relprop: relevance has shape"),
    "conv-eps": (lambda: ops.conv_relprop(*_conv(), eps=float("inf")), RelevanceError, r"conv_relprop: eps"),
    "max_pool-indices-dtype": (lambda: ops.max_pool_relprop(torch.randn(2, 3, 3, 3), _idx(torch.int32), (2, 3, 6, 6)),
                               TypeError, r"max_pool_relprop: indices must be"),
    "max_pool-input-size": (lambda: ops.max_pool_relprop(torch.randn(2, 3, 3, 3), _idx(), (2, 4, 6, 6)),
                            RelevanceError, r"max_pool_relprop: input_size \[2, 4, 6, 6\] does not match indices"),
    "max_pool-r": (lambda: ops.max_pool_relprop(torch.randn(2, 3, 3, 4), _idx(), (2, 3, 6, 6)), RelevanceError,
                   r"max_pool_relprop: relevance has shape"),
    "max_pool-device": (lambda: ops.max_pool_relprop(torch.randn(2, 3, 3, 3), _idx(device="meta"), (2, 3, 6, 6)),
                        RelevanceError, r"max_pool_relprop: indices are on meta"),
    "avg_pool-kernel": (lambda: ops.avg_pool_relprop(*_pool(), kernel_size=(2, 2, 2)), RelevanceError,
                        r"avg_pool_relprop: kernel_size must have 2 entries"),
    "avg_pool-xz": (lambda: ops.avg_pool_relprop(_pool()[0], _pool()[1], torch.randn(2, 4, 3, 3), 2), RelevanceError,
                    r"avg_pool_relprop: expected x and z of shape"),
    "avg_pool-dtype": (lambda: ops.avg_pool_relprop(_pool()[0].double(), *_pool()[1:], 2), TypeError,
                       r"avg_pool_relprop: x has dtype torch.float32, expected torch.float64"),
    "avg_pool-stabilizer": (lambda: ops.avg_pool_relprop(*_pool(), 2, stabilizer=None), RelevanceError,
                            r"avg_pool_relprop: stabilizer"),
    "adaptive-dims": (lambda: ops.adaptive_avg_pool_relprop(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)),
                      RelevanceError, r"adaptive_avg_pool_relprop: expected x and z of shape \(B, C, \*spatial\)"),
    "adaptive-r": (lambda: ops.adaptive_avg_pool_relprop(torch.randn(2, 3, 2, 2), *_pool()[1:]), RelevanceError,
                   r"adaptive_avg_pool_relprop: relevance has shape"),
    "adaptive-eps": (lambda: ops.adaptive_avg_pool_relprop(*_pool(), eps=-0.1), RelevanceError,
                     r"adaptive_avg_pool_relprop: eps"),
}


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_bad_input_raises_clear_error(name, impl):
    fn, exc, pattern = ERROR_CASES[name]
    with pytest.raises(exc, match=pattern):
        fn()


def test_relevance_error_is_value_error():
    # Callers that catch ValueError (the usual bad-argument exception) catch ours too.
    assert issubclass(RelevanceError, ValueError)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_device_mismatch_cuda(impl):
    r, x, z, w = _lin()
    with pytest.raises(RelevanceError, match=r"linear_relprop: x is on cuda"):
        ops.linear_relprop(r, x.cuda(), z, w)
    with pytest.raises(RelevanceError, match=r"max_pool_relprop: indices are on cuda"):
        ops.max_pool_relprop(torch.randn(2, 3, 3, 3), torch.zeros(2, 3, 3, 3, dtype=torch.long, device="cuda"),
                             (2, 3, 6, 6))


# ----------------------------------------------------------------------------- threads


@pytest.mark.skipif(not lrpfast.HAS_EXT, reason="extension not built")
def test_parallel_cpu_kernels():
    """The CPU kernels split their work across threads in chunks that start mid-row (and, for
    max pooling, mid-batch): with 2 threads and tensors above the grain size, the result must
    not change. The rest of the suite runs single-threaded (see conftest)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        z = torch.randn(3, 7, 61, 67)
        x = torch.randn_like(z)
        r = torch.randn(6, 7, 61, 67)  # K = 2, 171654 elements: several chunks of 32768
        xl = torch.randn(2, 16, 64, 64)
        _, idx = F.max_pool2d(xl, 3, 2, return_indices=True)
        rl = torch.randn(6, *idx.shape[1:])  # K = 3
        with lrpfast.use_implementation("extension"):
            got = [ops.stab_div(r, z), ops.mul_input(r, x), ops.mul_stab_div(r, x, z),
                   ops.max_pool_relprop(rl, idx, xl.shape)]
    finally:
        torch.set_num_threads(previous)
    # the formulas written out in float64 (row b*K + k reads row b of x and z)
    z2, x2 = z.double().repeat_interleave(2, 0), x.double().repeat_interleave(2, 0)
    want = [divide_or_zero(r.double(), stab_reference(z2, 1e-6, "sign")), r.double() * x2,
            divide_or_zero(r.double() * x2, stab_reference(z2, 1e-6, "sign")),
            index_add_oracle(rl.double(), idx, xl.shape)]
    for name, g, w in zip(["stab_div", "mul_input", "mul_stab_div", "max_pool_relprop"], got, want):
        assert_close(g, w, 1e-6, name)
