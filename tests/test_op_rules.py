"""The generic rule for ops linear in their computed inputs (lrpfast/op_rules.py), against the
gradient oracle (lrpfast/oracle.py) in float64 with ε = 0, K targets against single targets, and
the refusals that keep the batch dimension whole."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrpfast
from lrpfast.oracle import gradient_oracle
from lrpfast.ops import RelevanceError

F64 = torch.float64


class Wrap(nn.Module):
    """conv -> ReLU -> f(y) -> tanh -> mean -> linear: f between two nonlinear steps."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.head(torch.tanh(self.f(y)).mean((2, 3)))


CASES = {
    "neg": lambda y: -(-y) * 1.0 - y * 0.5,
    "sub_number": lambda y: y - 0.3,
    "sub_computed": lambda y: y - torch.tanh(y),
    "rsub": lambda y: 1.0 - y,
    "div_number": lambda y: y / 3.0,
    "div_method": lambda y: y.div(3.0),
    "sum_expand_as": lambda y: y + y.sum(1, keepdim=True).expand_as(y) / 4,
    "sum_broadcast_add": lambda y: y + torch.sum(y, dim=(2,), keepdim=True),
    "stack": lambda y: torch.stack([y, 2 * y], 2).sum(2),
    "pad_value": lambda y: F.pad(y, (1, 1, 1, 1), value=0.5)[:, :, 1:-1, 1:-1],
    "pad_reflect": lambda y: F.avg_pool2d(F.pad(y, (1, 1, 1, 1), mode="reflect"), 3, 1),
    "roll": lambda y: torch.roll(y, 1, -1) + y.roll(2, 2),
    "flip": lambda y: y.flip(-1) + torch.flip(y, (2,)),
    "repeat": lambda y: y.repeat(1, 2, 1, 1)[:, 1:5],
    "expand": lambda y: y.mean(1, keepdim=True).expand(-1, 4, -1, -1) + y,
    "interpolate_nearest": lambda y: F.avg_pool2d(F.interpolate(y, scale_factor=2, mode="nearest"), 2),
    "interpolate_bilinear": lambda y: F.interpolate(y, size=(5, 5), mode="bilinear", align_corners=False),
    "casts": lambda y: y.to(torch.float64).type_as(y).double(),
}


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_linear_op_equals_oracle(case):
    torch.manual_seed(0)
    model = Wrap(CASES[case]).to(F64).eval()
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    t = torch.tensor([0, 2])
    lrp = lrpfast.LRP(model, eps=0.0)
    e = lrp.explain(x, t)
    assert rel_l2(e.logits, model(x)) < 1e-14
    assert rel_l2(e.relevance, gradient_oracle(model, x, t)) < 1e-12
    both = lrp(x, torch.tensor([[0, 2], [1, 1]]))           # K = 2 maps per sample in one pass
    assert rel_l2(both[:, 1], lrp(x, torch.tensor([2, 1]))) < 1e-13


def test_linear_op_with_a_composite_and_float32():
    torch.manual_seed(1)
    model = Wrap(CASES["interpolate_bilinear"])
    x = torch.randn(2, 3, 6, 6)
    r = lrpfast.LRP(model.eval(), composite="epsilon_plus")(x)
    r64 = lrpfast.LRP(model.to(F64), composite="epsilon_plus")(x.to(F64))
    assert rel_l2(r.to(F64), r64) < 1e-4


@pytest.mark.parametrize("f,match", [
    (lambda y: y.sum(0, keepdim=True).expand_as(y), "batch dimension"),
    (lambda y: torch.stack([y, y], 0).sum(1), "sums over the batch dimension"),   # (stack at 0 moves the batch)
    (lambda y: y.flip(0), "batch dimension"),
    (lambda y: torch.roll(y, 1), "batch dimension"),
    (lambda y: 1.0 / y.sum((1, 2, 3), keepdim=True) + y, "divides a constant by a tensor computed"),
    (lambda y: y.repeat(2, 1, 1, 1)[:2], "batch dimension"),
])
def test_ops_across_the_batch_are_refused(f, match):
    model = Wrap(f).to(F64).eval()
    with pytest.raises(RelevanceError, match=match):
        lrpfast.LRP(model)(torch.randn(2, 3, 6, 6, dtype=F64))


# ----------------------------------------------------------------------------- norms (σ constant)


class Tokens(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(6, 8), norm, nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))).mean(1))


class Fn(nn.Module):
    def __init__(self, f, *mods):
        super().__init__()
        self.f, self.mods = f, nn.ModuleList(mods)

    def forward(self, x):
        return self.f(x, *self.mods)


NORMS = {
    "GroupNorm": lambda: nn.GroupNorm(2, 4),
    "F.group_norm": lambda: Fn(lambda x, gn: F.group_norm(x, 2, gn.weight, gn.bias), nn.GroupNorm(2, 4)),
    "F.normalize": lambda: Fn(lambda x: F.normalize(x, dim=1) * 3.0),
}
TOKEN_NORMS = {
    "RMSNorm": lambda: nn.RMSNorm(8),
    "F.rms_norm": lambda: Fn(lambda x, n: F.rms_norm(x, (8,), n.weight, 1e-6), nn.RMSNorm(8)),
    "F.normalize(-1)": lambda: Fn(lambda x: F.normalize(x, dim=-1)),
}


@pytest.mark.parametrize("name", list(NORMS))
def test_image_norm_equals_oracle(name):
    torch.manual_seed(3)
    norm = NORMS[name]()
    for p in norm.parameters():
        nn.init.normal_(p, 1.0, 0.3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), norm, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(F64).eval()
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    e = lrpfast.LRP(model, eps=0.0).explain(x)
    assert rel_l2(e.logits, model(x)) < 1e-14
    assert rel_l2(e.relevance, gradient_oracle(model, x, e.targets)) < 1e-12


@pytest.mark.parametrize("name", list(TOKEN_NORMS))
def test_token_norm_equals_oracle(name):
    if name.startswith(("RMS", "F.rms")) and not hasattr(nn, "RMSNorm"):
        pytest.skip("torch without RMSNorm")
    torch.manual_seed(4)
    model = Tokens(TOKEN_NORMS[name]()).to(F64).eval()
    x = torch.randn(2, 5, 6, dtype=F64)
    e = lrpfast.LRP(model, eps=0.0).explain(x)
    assert rel_l2(e.logits, model(x)) < 1e-14
    assert rel_l2(e.relevance, gradient_oracle(model, x, e.targets)) < 1e-12


# ----------------------------------------------------------------------------- attention by hand


class HandAttention(nn.Module):
    """Attention written out (timm/HF style): qkv, heads by reshape/permute, q @ kᵀ or einsum,
    scale, a causal mask by masked_fill, softmax (function or module), optional talking heads
    (a conv across heads on the weights), A @ v, heads merged, projection."""

    def __init__(self, e=8, h=2, form="matmul", causal=False, module_softmax=False, talking=False, unbind=False):
        super().__init__()
        self.qkv, self.proj = nn.Linear(e, 3 * e), nn.Linear(e, e)
        self.h, self.form, self.causal, self.unbind = h, form, causal, unbind
        self.softmax = nn.Softmax(-1) if module_softmax else None
        self.talk = nn.Conv2d(h, h, 1) if talking else None
        self.register_buffer("mask", torch.ones(8, 8, dtype=torch.bool).tril())

    def forward(self, x):
        b, n, c = x.shape
        if self.unbind:
            q, k, v = self.qkv(x).reshape(b, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            qkv = self.qkv(x).reshape(b, n, 3, self.h, c // self.h).permute(0, 3, 2, 1, 4)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.form == "matmul":
            a = (q @ k.transpose(-2, -1)) * (c // self.h) ** -0.5
        else:
            a = torch.einsum("bhnd,bhmd->bhnm", q, k) / (c // self.h) ** 0.5
        if self.causal:
            a = a.masked_fill(~self.mask[:n, :n], float("-inf"))
        a = self.softmax(a) if self.softmax is not None else a.softmax(dim=-1)
        if self.talk is not None:
            a = self.talk(a)
        o = a @ v if self.form == "matmul" else torch.einsum("bhnm,bhmd->bhnd", a, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.ln, self.attn, self.fc = nn.LayerNorm(8), HandAttention(**kw), nn.Linear(8, 3)

    def forward(self, x):
        x = x + self.attn(self.ln(x))
        return self.fc(x.mean(1))


ATTENTION = {
    "matmul": {}, "einsum": {"form": "einsum"}, "causal": {"causal": True}, "softmax_module": {"module_softmax": True},
    "talking_heads": {"talking": True}, "unbind": {"unbind": True},
}


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
@pytest.mark.parametrize("variant", list(ATTENTION))
def test_hand_written_attention_equals_oracle(variant, attention):
    torch.manual_seed(5)
    model = Block(**ATTENTION[variant]).to(F64).eval()
    x = torch.randn(2, 6, 8, dtype=F64)
    t = torch.tensor([0, 2])
    e = lrpfast.LRP(model, eps=0.0, attention=attention).explain(x, t)
    assert rel_l2(e.logits, model(x)) < 1e-14
    assert rel_l2(e.relevance, gradient_oracle(model, x, t, attention=attention)) < 1e-12


def test_cp_and_attnlrp_differ_on_hand_written_attention():
    torch.manual_seed(6)
    model = Block().to(F64).eval()
    x = torch.randn(2, 6, 8, dtype=F64)
    assert rel_l2(lrpfast.LRP(model, attention="cp")(x), lrpfast.LRP(model, attention="attnlrp")(x)) > 1e-3


def test_matmul_mixing_samples_is_refused():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            return h @ h.transpose(0, 1)

    with pytest.raises(RelevanceError, match="batch"):
        lrpfast.LRP(Mix().to(F64))(torch.randn(5, 4, dtype=F64))


# ----------------------------------------------------------------------------- tracing leaves no state


class Cached(nn.Module):
    """Caches a tensor computed from a parameter in a dict in eval mode (timm's LeViT and
    EfficientFormer attention biases): tracing must not leave an fx Proxy there."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bias = nn.Parameter(torch.randn(3))
        self.cache = {}

    def forward(self, x, scale=None):
        if not self.training:
            if "b" not in self.cache:
                self.cache["b"] = self.bias * 2
            b = self.cache["b"]
        else:
            b = self.bias * 2
        return self.fc(x) + b


def test_tracing_leaves_no_state_and_optional_arguments_take_their_defaults():
    model = Cached().to(F64).eval()
    lrpfast.LRP(model)
    assert model.cache == {}
    x = torch.randn(2, 4, dtype=F64)
    e = lrpfast.LRP(model, eps=0.0).explain(x)    # a second trace in the same process
    assert rel_l2(e.logits, model(x)) < 1e-15


# ----------------------------------------------------------------------------- functions of one tensor
# (lrpfast/derived.py): written-out activations are activations, normalisers and gates computed
# from the other factor are held constant, a computed divisor is held constant


def _gelu_written(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class StarReLU(nn.Module):   # metaformer's, with its ReLU module
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()
        self.scale, self.bias = nn.Parameter(torch.tensor(0.8)), nn.Parameter(torch.tensor(-0.05))

    def forward(self, x):
        return self.scale * self.relu(x) ** 2 + self.bias


DERIVED = {
    "rmsnorm_written": lambda y: y * torch.rsqrt(y.pow(2).mean(1, keepdim=True) + 1e-5) * 2.0,
    "rmsnorm_cast": lambda y: 1.5 * (y.to(torch.float64) * torch.rsqrt(y.to(torch.float64).pow(2).mean(-1, keepdim=True)
                                                                       + 1e-6)).to(y.dtype),
    "layernorm_written": lambda y: (y - y.mean(1, keepdim=True))
    / torch.sqrt((y - y.mean(1, keepdim=True)).pow(2).mean(1, keepdim=True) + 1e-5),
    "layernorm_rsqrt_var": lambda y: (y - y.mean(1, keepdim=True)) * torch.rsqrt(y.var(1, keepdim=True) + 1e-5),
    "gelu_written": _gelu_written,
    "silu_written": lambda y: y * torch.sigmoid(y),
    "silu_quotient": lambda y: y / (1.0 + torch.exp(-y)),
    "hardswish_written": lambda y: y * F.relu6(y + 3.0) / 6.0,
    "square_method": lambda y: y.square() + y * y,
    "gate_from_mean": lambda y: y * torch.sigmoid(y.mean((2, 3), keepdim=True)),
    "inplace_gate": lambda y: (y + 0.0).mul_(torch.sigmoid(y.amax((2, 3), keepdim=True))),
    "normaliser_across": lambda y: y[:, :2] / (y[:, 2:].abs().sum(1, keepdim=True) + 1.0),
    "clamp": lambda y: torch.clamp(y, -0.5, 0.7) + y.clip(min=0.1),
    "exp_activation": lambda y: torch.exp(-y) * 0.5,
}


class Head(nn.Module):
    """conv -> f -> flatten -> linear: f on a conv output with no exact zeros (f(0) != 0 is fine)."""

    def __init__(self, f, mods=()):
        super().__init__()
        self.f, self.mods = f, nn.ModuleList(mods)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        return self.head(self.f(self.conv(x)).flatten(1))


def _head(f, *mods):
    torch.manual_seed(0)
    model = Head(f, mods).to(F64)
    model(torch.zeros(1, 3, 6, 6, dtype=F64))   # materialise the lazy head
    return model.eval()


@pytest.mark.parametrize("case", list(DERIVED) + ["star_relu"])
def test_function_of_one_tensor_equals_oracle(case):
    if case == "star_relu":
        star = StarReLU()
        model = _head(star, star)
    else:
        model = _head(DERIVED[case])
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    t = torch.tensor([0, 2])
    lrp = lrpfast.LRP(model, eps=0.0)
    e = lrp.explain(x, t)
    assert rel_l2(e.logits, model(x)) < 1e-14
    assert rel_l2(e.relevance, gradient_oracle(model, x, t)) < 1e-12
    both = lrp(x, torch.tensor([[0, 2], [1, 1]]))           # K = 2 maps per sample: held factors per sample
    assert rel_l2(both[:, 1], lrp(x, torch.tensor([2, 1]))) < 1e-13


class Flat(nn.Module):
    """x (B, 4) -> f -> linear: the relevance at f's output is y ⊙ W[t] (ε = 0, logit start), so
    each rule's relevance at x has a formula."""

    def __init__(self, f, n=4):
        super().__init__()
        self.f, self.head = f, nn.Linear(n, 3)

    def forward(self, x):
        return self.head(self.f(x))


def _flat_case(f, n=4):
    torch.manual_seed(1)
    model = Flat(f, n).to(F64).eval()
    x = torch.randn(5, 4, dtype=F64)
    t = torch.tensor([0, 1, 2, 0, 1])
    y = f(x)
    r_y = y * model.head.weight[t]
    return lrpfast.LRP(model, eps=0.0)(x, t), r_y, x


def test_written_activation_passes_relevance_unchanged():
    # rule 1: GELU written out is an activation of x, R_x = R_y (also what nn.GELU("tanh") gives)
    r, r_y, x = _flat_case(_gelu_written)
    assert rel_l2(r, r_y) < 1e-13


def test_written_activation_after_a_bias_sends_relevance_to_the_biased_tensor():
    # x * sigmoid(x) on z = x + b: the activation's relevance goes to z, the bias keeps its share
    b = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=F64)
    r, r_y, x = _flat_case(lambda x: (x + b) * torch.sigmoid(x + b))   # z = x + b written twice: one z
    assert rel_l2(r, r_y * x / (x + b)) < 1e-12
    torch.manual_seed(1)
    model = Flat(lambda x: (x + b) * torch.sigmoid(x + b)).to(F64).eval()
    assert rel_l2(gradient_oracle(model, x, torch.tensor([0, 1, 2, 0, 1])), r_y * x / (x + b)) < 1e-12
    # other constants are another tensor: the nearest common one is x, which takes all of R_y
    r, r_y, x = _flat_case(lambda x: (x + b) * torch.sigmoid(x - b))
    assert rel_l2(r, r_y) < 1e-12


def test_written_rmsnorm_holds_its_normaliser():
    # rule 2: y = x * g(x) with g = rsqrt(mean(x²) + eps) constant: R_x = x ⊙ g ⊙ R_y / y = R_y
    r, r_y, x = _flat_case(lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert rel_l2(r, r_y) < 1e-13


def test_computed_divisor_is_held_constant():
    # rule 3: y = x[:, :2] / (|x[:, 2:]|.sum + 1): all relevance to the numerator, none to the divisor
    r, r_y, x = _flat_case(lambda x: x[:, :2] / (x[:, 2:].abs().sum(1, keepdim=True) + 1.0), n=2)
    assert rel_l2(r[:, :2], r_y) < 1e-13 and r[:, 2:].abs().max() == 0


def test_product_of_two_roots_keeps_the_uniform_split():
    # rule 4: SwiGLU-like x[:, :2] * silu(x[:, 2:]): half each (the silu passes its half to x[:, 2:])
    r, r_y, x = _flat_case(lambda x: x[:, :2] * F.silu(x[:, 2:]), n=2)
    assert rel_l2(r[:, :2], r_y / 2) < 1e-13 and rel_l2(r[:, 2:], r_y / 2) < 1e-13


def test_star_relu_is_an_activation_then_scale_and_bias():
    # relu(x)**2 is one activation; the scale is a constant factor, the bias absorbs its share
    r, r_y, x = _flat_case(lambda x: 0.8 * F.relu(x) ** 2 - 0.05)
    y = 0.8 * F.relu(x) ** 2 - 0.05
    assert rel_l2(r, r_y * (y + 0.05) / y) < 1e-12


# ----------------------------------------------------------------------------- more table entries:
# unfold / F.unfold / nn.Unfold / F.fold, repeat_interleave, amax/amin, ConvTranspose, constant
# advanced indices, clamp on any input


class HeadR(nn.Module):
    """conv -> ReLU -> f -> ReLU -> flatten -> linear, with the modules f uses registered."""

    def __init__(self, f, mods=()):
        super().__init__()
        self.f, self.mods = f, nn.ModuleList(mods)
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.LazyLinear(3)

    def forward(self, x):
        return self.head(torch.relu(self.f(torch.relu(self.conv(x)))).flatten(1))


_CT = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
_CT1 = nn.ConvTranspose1d(4, 2, 2, stride=2)
_UF = nn.Unfold(2, stride=2)
_IDX = torch.tensor([2, 0, 1, 1])
_AC = torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
TABLE = {
    "Tensor.unfold": (lambda y: y.unfold(2, 3, 1).sum(-1).unfold(3, 2, 2).mean(-1), ()),
    "F.unfold": (lambda y: F.unfold(y, 3, padding=1), ()),
    "nn.Unfold": (lambda y: _UF(y), (_UF,)),
    "F.fold": (lambda y: F.fold(F.unfold(y, 3, padding=1), (6, 6), 3, padding=1), ()),
    "repeat_interleave": (lambda y: y.repeat_interleave(2, dim=1) + torch.repeat_interleave(y, 2, 1), ()),
    "amax_amin": (lambda y: y.amax(1, keepdim=True) + y.amin((2, 3), keepdim=True) - y, ()),
    "ConvTranspose2d": (lambda y: _CT(y), (_CT,)),
    "F.conv_transpose2d": (lambda y: F.conv_transpose2d(y, _CT.weight, _CT.bias, 2, 1, 1), (_CT,)),
    "ConvTranspose1d": (lambda y: _CT1(y.flatten(2)), (_CT1,)),
    "index_list": (lambda y: y[:, [3, 0, 1, 1]] + y[:, :, [0, 2, 1, 5, 4, 3]], ()),
    "index_tensor": (lambda y: y[:, _IDX], ()),
    "clamp_of_a_mean": (lambda y: y - torch.clamp(y.mean(1, keepdim=True), -0.1, 0.2), ()),
    # (values, indices): [0], .values; the indices a constant of the graph
    "max_min_values": (lambda y: y.max(1, keepdim=True)[0] + torch.min(y, dim=-1).values.unsqueeze(-1)
                       - torch.max(y, 2, True).values + y.max(1)[1].unsqueeze(1).to(y.dtype), ()),
    # addcmul(c, a, b) = c + value·a·b, one factor computed (GlobalResponseNorm, ResMLP's Affine)
    "addcmul": (lambda y: torch.addcmul(_AC[0], _AC[1], y) + y.addcmul(_AC[1], y, value=-0.5), ()),
}


@pytest.mark.parametrize("case", list(TABLE))
def test_table_entry_equals_oracle(case):
    f, mods = TABLE[case]
    torch.manual_seed(0)
    model = HeadR(f, mods).to(F64)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    model(x)
    model.eval()
    t = torch.tensor([0, 2])
    lrp = lrpfast.LRP(model, eps=0.0)
    e = lrp.explain(x, t)
    assert rel_l2(e.logits, model(x)) < 1e-14
    assert rel_l2(e.relevance, gradient_oracle(model, x, t)) < 1e-12
    both = lrp(x, torch.tensor([[0, 2], [1, 1]]))
    assert rel_l2(both[:, 1], lrp(x, torch.tensor([2, 1]))) < 1e-13


def test_amax_gives_the_winner_all_relevance():
    # max over a dim is max pooling: the winner's relevance is the output's, the others get 0
    model = Flat(lambda x: x.reshape(-1, 2, 2).amax(-1), n=2).to(F64).eval()
    x = torch.randn(5, 4, dtype=F64)
    t = torch.tensor([0, 1, 2, 0, 1])
    r = lrpfast.LRP(model, eps=0.0)(x, t)
    y = x.reshape(-1, 2, 2).amax(-1)
    want = torch.zeros(5, 2, 2, dtype=F64).scatter(2, x.reshape(-1, 2, 2).argmax(-1, keepdim=True),
                                                   (y * model.head.weight[t])[..., None])
    assert rel_l2(r, want.reshape(5, 4)) < 1e-13


def test_max_over_a_dim_gives_the_winner_all_relevance():
    # x.max(dim)[0] as amax: the index max returns takes the output's relevance, the others 0
    model = Flat(lambda x: x.reshape(-1, 2, 2).max(-1)[0], n=2).to(F64).eval()
    x = torch.randn(5, 4, dtype=F64)
    t = torch.tensor([0, 1, 2, 0, 1])
    r = lrpfast.LRP(model, eps=0.0)(x, t)
    y, i = x.reshape(-1, 2, 2).max(-1)
    want = torch.zeros(5, 2, 2, dtype=F64).scatter(2, i[..., None], (y * model.head.weight[t])[..., None])
    assert rel_l2(r, want.reshape(5, 4)) < 1e-13


def test_addcmul_is_the_epsilon_rule_of_its_affine_map():
    # z = c + w·y (c, w constants): R_y = w·y / z · R_z, c keeps the rest (a bias)
    c, w = torch.rand(4, dtype=F64) + 0.5, torch.randn(4, dtype=F64)
    model = Flat(lambda x: torch.addcmul(c, w, x), n=4).to(F64).eval()
    x = torch.randn(5, 4, dtype=F64)
    t = torch.tensor([0, 1, 2, 0, 1])
    r = lrpfast.LRP(model, eps=0.0)(x, t)
    z = c + w * x
    assert rel_l2(r, w * x / z * z * model.head.weight[t]) < 1e-13


@pytest.mark.parametrize("f,match", [
    (lambda y: torch.max(y, y.flip(-1)), "elementwise max/min of two tensors"),
    (lambda y: y + y.max(), "reduces over all dims"),
    (lambda y: y.max(0)[0].expand_as(y), "batch dimension"),
    (lambda y: torch.addcmul(y, y, y), "multiplies two tensors computed"),
    (lambda y: y.repeat_interleave(2)[: y.numel()].reshape(y.shape), "batch dimension"),
    (lambda y: y.unfold(0, 1, 1).squeeze(-1), "batch dimension"),
    (lambda y: y.amax((0, 1), keepdim=True).expand_as(y), "batch dimension"),
    (lambda y: y[[1, 0]], "indexes dim 0"),
])
def test_table_entries_across_the_batch_are_refused(f, match):
    model = Wrap(f).to(F64).eval()
    with pytest.raises(RelevanceError, match=match):
        lrpfast.LRP(model)(torch.randn(2, 3, 6, 6, dtype=F64))


# ----------------------------------------------------------------------------- a layer applied to a
# tensor computed from the input's shape alone (xcit's Fourier position encoding: a conv of
# torch.arange(H), .repeat(B, 1, 1, 1) to the batch): a constant of the graph, like a bias


class ShapeEncoding(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.proj, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(2, 4, 1), nn.Linear(4, 3)

    def forward(self, x):
        B, _, H, W = x.shape
        ys = torch.arange(1, H + 1, device=x.device).to(torch.float32).unsqueeze(1).repeat(1, 1, W)
        xs = torch.arange(1, W + 1, device=x.device).to(torch.float32).repeat(1, H, 1)
        pos = torch.stack([ys.sin(), xs.cos()], 1).to(x.dtype)               # (1, 2, H, W)
        pos = self.proj(pos).repeat(B, 1, 1, 1)                                # (B, 4, H, W)
        return self.head(torch.relu(self.conv(x) + pos).mean((2, 3)))


def test_layer_of_a_shape_only_tensor_is_a_constant():
    torch.manual_seed(0)
    model = ShapeEncoding().to(F64).eval()
    t = torch.tensor([0, 2])
    lrp = lrpfast.LRP(model, eps=0.0)
    for x in (torch.randn(2, 3, 5, 6, dtype=F64), torch.randn(2, 3, 4, 4, dtype=F64)):   # two shapes
        e = lrp.explain(x, t)
        assert rel_l2(e.logits, model(x)) < 1e-14
        assert rel_l2(e.relevance, gradient_oracle(model, x, t)) < 1e-12
    # the constant absorbs its share like a bias: the same map as with pos a parameter
    x = torch.randn(2, 3, 5, 6, dtype=F64)
    pos = model.proj(torch.stack([torch.arange(1, 6.).unsqueeze(1).repeat(1, 6).sin(),
                                  torch.arange(1, 7.).repeat(5, 1).cos()]).to(F64)[None])
    conv = nn.Conv2d(3, 4, 3, padding=1).to(F64)
    conv.load_state_dict(model.conv.state_dict())
    fixed = Fn(lambda x, c, h: h(torch.relu(c(x) + pos.detach()).mean((2, 3))), conv, model.head).eval()
    assert rel_l2(lrp(x, t), lrpfast.LRP(fixed, eps=0.0)(x, t)) < 1e-13


# ----------------------------------------------------------------------------- efficientvit (MIT)'s
# LiteMLA: ReLU linear attention, v padded with a column of ones, the last column of q (kᵀv) the
# normaliser (a computed divisor: rule 3), and the whole of it computed in float32 (q.float(), ...)


class LinearAttention(nn.Module):
    """timm's efficientvit_mit LiteMLA pattern, small: conv -> q, k, v -> ReLU(q) (ReLU(k)ᵀ [v, 1])
    with its last column the divisor -> conv -> mean -> linear; `work` is the dtype it computes in."""

    def __init__(self, work=None):
        super().__init__()
        self.work, self.dim, self.eps = work, 4, 1e-5
        self.qkv = nn.Conv2d(3, 3 * 2 * self.dim, 1)
        self.kernel = nn.ReLU()
        self.proj, self.head = nn.Conv2d(2 * self.dim, 4, 1), nn.Linear(4, 3)

    def forward(self, x):
        B, _, H, W = x.shape
        qkv = self.qkv(x).reshape(B, -1, 3 * self.dim, H * W).transpose(-1, -2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = self.kernel(q), self.kernel(k)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)
        dtype = v.dtype
        if self.work is not None:
            q, k, v = q.to(self.work), k.to(self.work), v.to(self.work)
        out = q @ (k.transpose(-1, -2) @ v)
        out = (out[..., :-1] / (out[..., -1:] + self.eps)).to(dtype)
        out = out.transpose(-1, -2).reshape(B, -1, H, W)
        return self.head(torch.relu(self.proj(out)).mean((2, 3)))


@pytest.mark.parametrize("work,tol", [(None, 1e-12), (torch.float32, 1e-6)])
def test_linear_attention_of_efficientvit(work, tol):
    # float64 throughout: the oracle's map to round-off. With the float32 cast of timm's LiteMLA,
    # LRP and the oracle both carry float32 round-off (4e-8 apart here, 3e-8 on
    # efficientvit_b0): equal to float32's precision, not to float64's
    torch.manual_seed(0)
    model = LinearAttention(work).to(F64).eval()
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    t = torch.tensor([0, 2])
    e = lrpfast.LRP(model, eps=0.0).explain(x, t)
    assert rel_l2(e.logits, model(x)) < 1e-14
    assert rel_l2(e.relevance, gradient_oracle(model, x, t)) < tol
    if work is not None:   # the same map as in float64 throughout, to float32's precision
        exact = LinearAttention().to(F64).eval()
        exact.load_state_dict(model.state_dict())
        assert rel_l2(e.relevance, lrpfast.LRP(exact, eps=0.0)(x, t)) < tol
