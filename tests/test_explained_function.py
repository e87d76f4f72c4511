"""What LRP explains is the model's own forward (issue 14, defects 2 and 3).

- A layer subclass with a forward of its own is traced through (its computation is explained) or
  refused naming the module; never explained as its base class.
- Forward hooks and pre-hooks, and modules left in training mode whose output depends on it, are
  refused with the module named, at construction and at every call.
- timm's families that subclass layers (BatchNormAct2d, ScaledStdConv2d, ...) equal model(x) and
  the gradient oracle (lrpfast/oracle.py) in float64, where timm is installed.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrpfast
from lrpfast.oracle import gradient_oracle
from lrpfast.ops import RelevanceError

from .test_lrp_models import randomize_batch_norm

F64 = torch.float64


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


def assert_explains_model(model, x, tol=1e-9):
    with torch.no_grad():
        want = model(x)
    t = want.argmax(1)
    e = lrpfast.LRP(model, eps=0.0).explain(x, t)
    assert rel_l2(e.logits, want) < 1e-12
    assert rel_l2(e.relevance, gradient_oracle(model, x, t)) < tol


# ----------------------------------------------------------------------------- defect 2: subclasses


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: the BatchNorm, then an activation, in one module."""

    def __init__(self, c, act=nn.ReLU):
        super().__init__(c)
        self.act = act()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return self.act(x)


class StdConv(nn.Conv2d):
    """timm's ScaledStdConv2d in miniature: the weight standardised per output channel."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w * 0.7, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SuperConv(nn.Conv2d):
    """A subclass whose forward calls the base class's, then does something of its own."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


class StrangeLinear(nn.Linear):
    def forward(self, x):
        return torch.cumsum(super().forward(x), 1)


def small_cnn(block, act=nn.GELU):
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), block, act(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(24, 5))


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU, nn.Identity])
def test_batchnorm_subclass_with_activation_is_traced_through(act):
    torch.manual_seed(0)
    model = randomize_batch_norm(small_cnn(BatchNormAct(6, act))).to(F64).eval()
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    assert_explains_model(model, x)
    plan = lrpfast.LRP(model).plan.describe()
    assert "F.batch_norm (folded)" in plan   # folded into the conv before it, as a module would be


def test_batchnorm_subclass_after_an_add_is_an_affine_step():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
            self.bn = BatchNormAct(4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.bn(self.a(x) + self.b(x)).mean((2, 3)))

    torch.manual_seed(1)
    model = randomize_batch_norm(Net()).to(F64).eval()
    assert_explains_model(model, torch.randn(2, 3, 6, 6, dtype=F64))
    assert "F.batch_norm" in lrpfast.LRP(model).plan.describe()


def test_conv_subclass_with_standardised_weight_is_traced_through():
    torch.manual_seed(2)
    model = small_cnn(StdConv(6, 6, 3, padding=1)).to(F64).eval()
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    assert_explains_model(model, x)
    # the base class's rule would use the raw weight: a different function, so a different map
    plain = small_cnn(nn.Conv2d(6, 6, 3, padding=1)).to(F64).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert rel_l2(plain(x), model(x)) > 1e-3


def test_subclass_calling_super_forward():
    torch.manual_seed(3)
    model = small_cnn(SuperConv(6, 6, 3, padding=1)).to(F64).eval()
    assert_explains_model(model, torch.randn(2, 3, 8, 8, dtype=F64))


def test_functional_layers_take_the_composite_rules():
    """A traced-through subclass's F.conv2d is a Conv2d for the composites (its module path)."""
    torch.manual_seed(4)
    model = small_cnn(StdConv(6, 6, 3, padding=1)).to(F64).eval()
    lrp = lrpfast.LRP(model, composite="epsilon_plus_flat")
    rules = {k: type(v).__name__ for k, v in lrp.rules().items()}
    assert list(rules.values()).count("ZPlus") >= 1 and "Flat" in rules.values()
    r = lrp(torch.randn(2, 3, 8, 8, dtype=F64))
    assert torch.isfinite(r).all()


def test_subclass_with_unsupported_op_is_refused_naming_the_module():
    model = nn.Sequential(nn.Linear(4, 4), StrangeLinear(4, 3)).to(F64).eval()
    with pytest.raises(RelevanceError, match=r"module '1' \(StrangeLinear\).*cumsum"):
        lrpfast.LRP(model)


# ----------------------------------------------------------------------------- defect 3: hooks, modes


def test_forward_hook_changing_the_output_is_refused_naming_the_module():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(F64).eval()
    handle = model[2].register_forward_hook(lambda m, i, o: o * 2 + 1)
    with pytest.raises(RelevanceError, match=r"module '2' \(Linear\) has a forward hook"):
        lrpfast.LRP(model)
    handle.remove()
    lrp = lrpfast.LRP(model)
    x = torch.randn(2, 4, dtype=F64)
    lrp(x)
    handle = model[0].register_forward_pre_hook(lambda m, i: (i[0] * 3,))
    with pytest.raises(RelevanceError, match=r"module '0' \(Linear\) has a forward pre-hook"):
        lrp(x)   # added after construction: caught at the call
    handle.remove()
    assert rel_l2(lrp.explain(x).logits, model(x)) < 1e-15


def test_global_forward_hook_is_refused():
    model = nn.Sequential(nn.Linear(4, 3)).to(F64).eval()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(RelevanceError, match="global forward hook"):
            lrpfast.LRP(model)
    finally:
        handle.remove()


@pytest.mark.parametrize("layer,name", [(nn.Dropout(0.5), "Dropout"), (nn.BatchNorm1d(6), "BatchNorm1d")])
def test_training_mode_with_mode_dependent_layers_is_refused(layer, name):
    model = nn.Sequential(nn.Linear(4, 6), layer, nn.ReLU(), nn.Linear(6, 3)).to(F64)
    with pytest.raises(RelevanceError, match=rf"module '1' \({name}\) is in training mode.*model.eval\(\)"):
        lrpfast.LRP(model)
    model.eval()
    lrp = lrpfast.LRP(model)
    x = torch.randn(2, 4, dtype=F64)
    lrp(x)
    model.train()
    with pytest.raises(RelevanceError, match="training mode"):
        lrp(x)


def test_training_mode_without_mode_dependent_layers_is_explained():
    """Linear and ReLU compute the same in both modes: nothing to refuse."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(F64)
    assert model.training
    assert_explains_model(model, torch.randn(3, 4, dtype=F64))


# ----------------------------------------------------------------------------- timm

# The smallest variant of each family issue 14 found explained as another function (BatchNormAct2d,
# ScaledStdConv2d, ...), with the input size its patch/window layout needs.
TIMM_FAMILIES = {
    "efficientnet_b0": 64, "mobilenetv2_035": 64, "mobilenetv3_small_050": 64, "mobilenetv4_conv_small_035": 64,
    "mnasnet_small": 64, "ghostnet_050": 64, "lcnet_035": 64, "rexnet_100": 64, "regnetx_002": 64,
    "densenet121": 64, "inception_v3": 96, "xception41p": 64, "dpn48b": 64, "cspresnet50": 64,
    "ese_vovnet19b_slim_dw": 64, "resnetv2_18": 64, "nf_regnet_b0": 64,
    "coatnet_pico_rw_224": 224,
    # transformers through the generic op rules and attention written by hand (issue 15)
    "deit_tiny_patch16_224": 224, "eva02_tiny_patch14_224": 224, "pvt_v2_b0": 64, "efficientformerv2_s0": 224,
    "cait_xxs24_224": 224, "beit_base_patch16_224": 224,
}
SLOW_TIMM = {"coatnet_pico_rw_224", "densenet121", "inception_v3", "dpn48b", "cait_xxs24_224", "beit_base_patch16_224"}


def _timm_params():
    return [pytest.param(n, marks=[pytest.mark.oracle_full] if n in SLOW_TIMM else []) for n in TIMM_FAMILIES]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", _timm_params())
def test_timm_family_equals_model_and_oracle(name):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install lrpfast[zoo])")
    torch.manual_seed(0)
    model = randomize_batch_norm(timm.create_model(name, pretrained=False, num_classes=5)).to(F64).eval()
    size = TIMM_FAMILIES[name]
    x = torch.randn(2, 3, size, size, dtype=F64)
    with torch.no_grad():
        want = model(x)
    t = torch.tensor([0, 3])
    e = lrpfast.LRP(model, eps=0.0).explain(x, t)
    assert rel_l2(e.logits, want) < 1e-8
    assert rel_l2(e.relevance, gradient_oracle(model, x, t)) < 1e-8


# ----------------------------------------------------------------------------- signs known to the plan


class AfterReLU(nn.Module):
    """ReLU, then a step that may make the values negative, then a layer under z+."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.ln = nn.LayerNorm(6)
        self.scale = nn.Parameter(torch.randn(6))

    def forward(self, x):
        # ("positive": a product of two computed factors >= 0; a gate computed from h alone, like
        # (2h + h).mean() * h, is held constant (lrpfast/derived.py) and the plan no longer counts on its sign)
        h = torch.relu(self.a(x))
        h = {"layernorm": lambda: self.ln(h), "negative_number": lambda: -2.0 * h, "add_number": lambda: h + (-3.0),
             "parameter_factor": lambda: self.scale * h, "positive": lambda: torch.relu(self.a(x) + 1.0).mean(1, keepdim=True) * h}[
            self.kind]()
        return self.c(torch.relu(self.b(h)))


class ZPlusOnB:
    def rule_for(self, name, module, ctx):
        return lrpfast.rules.ZPlus() if name == "b" else None


@pytest.mark.parametrize("kind", ["layernorm", "negative_number", "add_number", "parameter_factor", "positive"])
def test_zplus_shortcut_only_where_the_input_is_known_nonnegative(kind):
    """z+ skips its x- branch when the plan says x >= 0 (after a ReLU). A LayerNorm, a negative
    number, a number added or a parameter factor in between must clear that: otherwise the map is
    silently wrong (issue 14). The reference is the rule's signed path, exact for any x."""
    from lrpfast import nodes as N

    torch.manual_seed(7)
    model = AfterReLU(kind).to(F64).eval()
    x = torch.randn(5, 6, dtype=F64)
    lrp = lrpfast.LRP(model, composite=ZPlusOnB())
    got = lrp(x)
    flag = {s.name: s.x_nonnegative for s in lrp.plan.steps if isinstance(s, N.ContractionStep)}["b"]
    assert flag == (kind == "positive")
    for s in lrp.plan.steps:
        if isinstance(s, N.ContractionStep):
            s.x_nonnegative = False
    want = lrp(x)
    assert rel_l2(got, want) < 1e-12


class ModeBranch(nn.Module):
    """A forward that branches on self.training (traced through: the branch is fixed at the trace)."""

    def forward(self, x):
        return 2.0 * x if self.training else x


def test_mode_switched_after_the_trace_is_refused():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 6), ModeBranch(), nn.ReLU(), nn.Linear(6, 3)).to(F64).eval()
    lrp = lrpfast.LRP(model)
    x = torch.randn(2, 4, dtype=F64)
    assert rel_l2(lrp.explain(x).logits, model(x)) < 1e-15
    model.train()
    with pytest.raises(RelevanceError, match=r"module '1' \(ModeBranch\) was switched to training mode after"):
        lrp(x)
    assert rel_l2(lrpfast.LRP(model).explain(x).logits, model(x)) < 1e-15   # a new trace follows the mode


def test_deterministic_dropout_in_training_mode_is_explained():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.0), nn.ReLU(), nn.Linear(6, 3)).to(F64).train()
    assert_explains_model(model, torch.randn(3, 4, dtype=F64))


def test_batchnorm_module_after_a_functional_conv_is_not_folded_into_it():
    """A functional conv reads its weight from the graph at every call, so a BatchNorm module after
    it must stay an affine step: folding it there would drop it (the model(x) check refused this)."""
    torch.manual_seed(10)
    model = randomize_batch_norm(nn.Sequential(StdConv(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                               nn.Flatten(), nn.Linear(6 * 36, 3))).to(F64).eval()
    assert_explains_model(model, torch.randn(2, 3, 6, 6, dtype=F64))
    assert "BatchNorm2d (folded)" not in lrpfast.LRP(model).plan.describe()
