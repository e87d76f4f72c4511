"""float16 in the CPU kernels: the same bits as the arithmetic in float32 rounded by torch's .half().

The kernels convert float16 in bulk, with F16C where the CPU has it (csrc/cpu/half_convert.cpp),
else with c10's software conversion. Inputs are random 16-bit patterns plus every float16 value
(NaN, inf, subnormals, values whose products overflow or land on rounding ties), so both directions
of the conversion meet every kind of value. A child process with LRPFAST_CPU_F16C=0 runs the
software path: both paths must give identical bits, NaN payloads included (c10 stores every NaN
as 0x7E00 with its sign).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lrpfast

pytestmark = pytest.mark.skipif(not lrpfast.HAS_EXT, reason="extension not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = torch.float32
EPS = 1e-6
ALPHA, BETA, GAMMA = 1.5, 0.5, 0.25
# (batch, channels, length) in the conv layout (channels at dim 1): one large enough for every
# float16 value, one whose runs are not a multiple of the 8-wide conversion (the scalar tails).
SHAPES = [(8, 16, 1024), (3, 5, 37)]


def operands(shape, count, seed):
    """`count` float16 tensors of random bit patterns; the first also holds every float16 value."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    out = []
    for i in range(count):
        bits = torch.randint(-(2**15), 2**15, (n,), generator=g, dtype=torch.int16)
        if i == 0:
            every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
            m = min(n, every.numel())
            bits[:m] = every[torch.randperm(every.numel(), generator=g)[:m]]
        out.append(bits.view(torch.float16).view(shape))
    return out


def stab(z, stabilizer):
    e = torch.tensor(EPS, dtype=F32)
    return z + e if stabilizer == "plus" else z + torch.where(z >= 0, e, -e)


def div0(a, b):
    return torch.where(b == 0, torch.zeros_like(a), a / b)


def pos(x):
    return torch.where(x > 0, x, torch.zeros_like(x))


def neg(x):
    return torch.where(x < 0, x, torch.zeros_like(x))


def cases(shape, seed=0):
    """name -> (kernel call on float16, the same arithmetic in float32 rounded by .half())."""
    x, z, r, c, cp = operands(shape, 5, seed)
    c2 = torch.cat([c, cp], 1)  # paired (B, 2C, L): branch 0 then branch 1 (groups=1)
    f = lambda t: t.to(F32)  # noqa: E731  (exact)
    op = torch.ops.lrpfast
    out = {}
    for s in ("sign", "plus"):
        out[f"stab_div_{s}"] = (lambda s=s: op.stab_div(r, z, EPS, s), lambda s=s: div0(f(r), stab(f(z), s)))
        out[f"mul_stab_div_{s}"] = (lambda s=s: op.mul_stab_div(c, x, z, EPS, s),
                                    lambda s=s: div0(f(c) * f(x), stab(f(z), s)))
    out["mul_input"] = (lambda: op.mul_input(c, x), lambda: f(c) * f(x))
    out["sign_split"] = (lambda: op.sign_split(x, 1, 1), lambda: torch.cat([pos(f(x)), neg(f(x))], 1))
    out["sign_split_mul_input"] = (lambda: op.sign_split_mul_input(c2, x, 1, 1),
                                   lambda: pos(f(x)) * f(c) + neg(f(x)) * f(cp))
    out["bounds_mul_input"] = (lambda: op.bounds_mul_input(c2, x, z, r, 1, 1),
                               lambda: (f(x) - f(z)) * f(c) + (f(x) - f(r)) * f(cp))
    out["alpha_beta_stab_div"] = (
        lambda: op.alpha_beta_stab_div(r, z, c, 1, 1, ALPHA, BETA, EPS, "sign"),
        lambda: torch.cat([ALPHA * div0(f(r), stab(f(c), "sign")),
                           -BETA * div0(f(r), stab(f(z) - f(c), "sign"))], 1))

    def gamma_ref():
        zf = f(z)
        q_pos = div0(f(r), stab(f(c), "sign"))
        q_neg = div0(f(r), stab((2 + GAMMA) * zf - f(c), "sign"))
        zero = torch.zeros_like(zf)
        return torch.cat([torch.where(zf > 0, q_pos, zero), torch.where(zf < 0, q_neg, zero)], 1)

    out["gamma_stab_div"] = (lambda: op.gamma_stab_div(r, z, c, 1, 1, GAMMA, EPS, "sign"), gamma_ref)
    # Windows of 2 with stride 2: every input position receives at most one value (0 + v in float32).
    if shape[-1] % 2 == 0:
        _, idx = F.max_pool1d(torch.randn(shape, generator=torch.Generator().manual_seed(seed)), 2,
                              return_indices=True)
        rp = r[..., : shape[-1] // 2].contiguous()
        out["max_pool_relprop"] = (lambda: op.max_pool_relprop(rp, idx, list(shape)),
                                   lambda: torch.zeros(shape, dtype=F32).scatter_add_(2, idx, f(rp)))
    return out


def kernel_outputs(shape):
    return {name: run() for name, (run, _) in cases(shape).items()}


def bits(t):
    return t.contiguous().view(torch.int16)


@pytest.mark.parametrize("shape", SHAPES, ids=["large", "tails"])
def test_float16_matches_float32_rounded_by_torch(shape):
    for name, (run, ref) in cases(shape).items():
        got, want = run(), ref().half()
        assert got.dtype == torch.float16 and got.shape == want.shape, name
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan), f"{name}: NaN at other positions"
        # torch's .half() may keep a NaN's payload (hardware conversion): NaNs compare by position.
        mismatch = (bits(got) != bits(want)) & ~nan
        assert not mismatch.any(), (
            f"{name}: {int(mismatch.sum())} values differ, e.g. {got[mismatch][:4].tolist()} "
            f"vs {want[mismatch][:4].tolist()}")
        if shape == SHAPES[0]:  # every float16 value among the inputs: the results reach inf and NaN
            assert want.isinf().any() and (nan.any() or name == "sign_split"), f"{name}: no inf or NaN reached"
        # c10's conversion stores every NaN as the quiet NaN 0x7E00 with its sign.
        nan_bits = bits(got)[got.isnan()] & 0x7FFF
        assert (nan_bits == 0x7E00).all(), f"{name}: a NaN other than 0x7E00/0xFE00"


CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from tests.test_cpu_half import SHAPES, kernel_outputs
torch.save([kernel_outputs(s) for s in SHAPES], sys.argv[2])
"""


def test_f16c_and_software_conversion_give_the_same_bits(tmp_path):
    path = tmp_path / "software.pt"
    env = dict(os.environ, LRPFAST_CPU_F16C="0")
    subprocess.run([sys.executable, "-c", CHILD, ROOT, str(path)], env=env, check=True, timeout=300)
    software = torch.load(path)
    for shape, theirs in zip(SHAPES, software):
        ours = kernel_outputs(shape)
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(bits(ours[name]), bits(theirs[name])), f"{shape} {name}"
