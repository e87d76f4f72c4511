"""lrpfast.composites: which rule each layer gets, by name, type, position and user mapping.

Oracle for the named composites: zennit's own assignment (its composite's module_map walked over
the model the way zennit registers hooks), where zennit is installed; otherwise the table of
lrpfast/composites.py written out here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lrpfast
from lrpfast import composites
from lrpfast.models import seed_mnist_cnn
from lrpfast.ops import RelevanceError
from lrpfast.rules import AlphaBeta, Epsilon, Flat, Gamma, LayerContext, WSquare, ZBox, ZPlus

LOW, HIGH = torch.full((1, 1, 1, 1), -1.0), torch.full((1, 1, 1, 1), 1.0)
PARAMS = {"epsilon_gamma_box": {"low": LOW, "high": HIGH}}


def ctx_for(module, is_first=False, name="layer"):
    kind = "linear" if isinstance(module, nn.Linear) else "conv"
    return LayerContext(name, module, kind, None, None, module.weight, module.bias, is_first=is_first)


def assignment(model, composite):
    """{layer name: rule} through lrpfast.LRP (which asks rule_for once per layer), keyed by
    graph node name ("_0", "layer1_0_conv1") whichever form LRP reports."""
    return {composites._node_name(k): v for k, v in lrpfast.LRP(model, composite=composite).rules().items()}


def kind_of(rule) -> str:
    return type(rule).__name__


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize("name,expected", [
    ("epsilon", ["Epsilon", "Epsilon", "Epsilon", "Epsilon"]),
    ("epsilon_plus", ["ZPlus", "ZPlus", "Epsilon", "Epsilon"]),
    ("epsilon_plus_flat", ["Flat", "ZPlus", "Epsilon", "Epsilon"]),
    ("epsilon_gamma_box", ["ZBox", "Gamma", "Epsilon", "Epsilon"]),
    ("epsilon_alpha2_beta1", ["AlphaBeta", "AlphaBeta", "Epsilon", "Epsilon"]),
    ("epsilon_alpha2_beta1_flat", ["Flat", "AlphaBeta", "Epsilon", "Epsilon"]),
])
def test_named_composites_on_the_seed_cnn(name, expected):
    model = seed_mnist_cnn("notebook")  # conv, conv, linear, linear
    comp = composites.get(name, **PARAMS.get(name, {}))
    got = [kind_of(r) for r in assignment(model, comp).values()]
    assert got == expected


def test_first_layer_flat_applies_to_a_dense_first_layer():
    """epsilon_plus_flat: flat on the first layer whatever its type (zennit: first "Linear" =
    Conv or Linear); epsilon_gamma_box: z^B only when that layer is a Conv."""
    mlp = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    assert [kind_of(r) for r in assignment(mlp, "epsilon_plus_flat").values()] == ["Flat", "Epsilon"]
    box = composites.get("epsilon_gamma_box", low=-1.0, high=1.0)
    assert [kind_of(r) for r in assignment(mlp, box).values()] == ["Epsilon", "Epsilon"]


def test_parameters_reach_the_rules():
    c = composites.get("epsilon_gamma_box", low=LOW, high=HIGH, gamma=0.5, eps=1e-3, rule_eps=1e-4, stabilizer="plus")
    conv, lin = nn.Conv2d(1, 2, 3), nn.Linear(3, 2)
    first, gamma, eps = c.rule_for("c0", conv, ctx_for(conv, True)), c.rule_for("c1", conv, ctx_for(conv)), \
        c.rule_for("fc", lin, ctx_for(lin))
    assert isinstance(first, ZBox) and torch.equal(first.low, LOW) and first.eps == 1e-4
    assert isinstance(gamma, Gamma) and gamma.gamma == 0.5 and gamma.eps == 1e-4 and gamma.stabilizer == "plus"
    assert isinstance(eps, Epsilon) and eps.eps == 1e-3 and eps.stabilizer == "plus"
    ab = composites.get("epsilon_alpha2_beta1", alpha=3, beta=2).rule_for("c", conv, ctx_for(conv))
    assert isinstance(ab, AlphaBeta) and (ab.alpha, ab.beta) == (3.0, 2.0)
    plus = composites.get("epsilon_plus").rule_for("c", conv, ctx_for(conv))
    assert isinstance(plus, ZPlus) and plus.eps == 1e-6


def test_defaults_match_zennit():
    c = composites.get("epsilon_gamma_box", low=0.0, high=1.0)
    conv = nn.Conv2d(1, 2, 3)
    g = c.rule_for("c", conv, ctx_for(conv))
    assert g.gamma == 0.25 and g.eps == 1e-6
    ab = composites.get("epsilon_alpha2_beta1").rule_for("c", conv, ctx_for(conv))
    assert (ab.alpha, ab.beta) == (2.0, 1.0)


# ----------------------------------------------------------------------------- user mappings


def test_user_mapping_by_name_type_and_callable():
    model = seed_mnist_cnn("notebook")  # module paths 0 (conv), 3 (conv), 7 (linear), 9 (linear)
    special = WSquare()
    by_type = Gamma(1.0)
    comp = composites.get("epsilon_plus_flat", rules=[
        {"9": special, nn.Conv2d: by_type},
        lambda name, module, ctx: Epsilon(0.1) if name in ("7", "_7") else None,
    ])
    rules = assignment(model, comp)  # keyed by graph node name: "_0", "_3", "_7", "_9"
    assert rules["_9"] is special                      # by (module path) name
    assert isinstance(rules["_7"], Epsilon) and rules["_7"].eps == 0.1   # callable (gets the node name)
    assert isinstance(rules["_0"], Flat)               # the first-layer rule beats a user type
    assert rules["_3"] is by_type                      # by type


def test_names_are_checked_before_the_first_layer_and_globs_work():
    model = seed_mnist_cnn("notebook")
    z = ZPlus()
    rules = assignment(model, composites.get("epsilon_plus_flat", rules={"_0": z}))
    assert rules["_0"] is z
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3)))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(2 * 24 * 24, 3))
    g = Gamma(0.1)
    rules = assignment(model, composites.get("epsilon", rules={"features.*": g}))
    assert rules["features_0"] is g and rules["features_2"] is g and isinstance(rules["fc"], Epsilon)
    rules = assignment(model, composites.get("epsilon", rules={"features.2": g, "features_0": Flat()}))
    assert rules["features_2"] is g and isinstance(rules["features_0"], Flat)


def test_first_overrides_the_first_layer_rule():
    model = seed_mnist_cnn("notebook")
    first = WSquare()
    for name in ("epsilon", "epsilon_plus", "epsilon_gamma_box"):
        rules = assignment(model, composites.get(name, first=first))  # no low/high needed then
        assert rules["_0"] is first and not any(r is first for n, r in rules.items() if n != "_0")


def test_plain_mapping_and_ready_composite():
    model = seed_mnist_cnn("notebook")
    z = ZPlus()
    rules = assignment(model, composites.get({nn.Conv2d: z}, eps=0.5))
    assert rules["_0"] is z and rules["_3"] is z and rules["_7"].eps == 0.5
    ready = composites.Composite(rules={nn.Linear: Epsilon(0.2)})
    assert composites.get(ready) is ready
    assert [kind_of(r) for r in assignment(model, ready).values()] == ["Epsilon"] * 4  # None -> LRP's ε
    assert composites.get(None).name == "epsilon"


def test_callable_returning_none_falls_through():
    comp = composites.get("epsilon_plus", rules=lambda name, module, ctx: None)
    conv = nn.Conv2d(1, 1, 1)
    assert isinstance(comp.rule_for("c", conv, ctx_for(conv)), ZPlus)


def test_composite_is_usable_through_lrp_by_name():
    model = seed_mnist_cnn("notebook").double()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    for name in composites.names():
        out = lrpfast.LRP(model, composite=name, **PARAMS.get(name, {}))(x)
        assert out.shape == x.shape and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call,match", [
    (lambda: composites.get("epsilon_plus_flatt"), "unknown composite"),
    (lambda: composites.get("epsilon_plus", gamma=0.5), "unknown parameter"),
    (lambda: composites.get("epsilon_gamma_box"), "needs low= and high="),
    (lambda: composites.get("epsilon_gamma_box", low=1.0, high=0.0), "low must be <= high"),
    (lambda: composites.get("epsilon_gamma_box", low=0.0, high=1.0, gamma=-1), "gamma must be"),
    (lambda: composites.get("epsilon_alpha2_beta1", alpha=2, beta=2), "alpha - beta must be 1"),
    (lambda: composites.get("epsilon", eps=-1.0), "eps must be"),
    (lambda: composites.get("epsilon", rules={3: ZPlus()}), "neither a module name nor a module type"),
    (lambda: composites.get("epsilon", rules={"fc": "zplus"}), "expected an lrpfast.rules.Rule"),
    (lambda: composites.get("epsilon", rules=42), "expected a dict"),
    (lambda: composites.get(composites.Composite(), eps=1.0), "ready Composite"),
    (lambda: composites.get("epsilon", first="flat"), "expected an lrpfast.rules.Rule"),
])
def test_invalid_composites(call, match):
    with pytest.raises(RelevanceError, match=match):
        call()


def test_lrp_with_a_bad_composite_name_fails_clearly():
    with pytest.raises(RelevanceError, match="unknown composite"):
        lrpfast.LRP(seed_mnist_cnn("notebook"), composite="zplus_everywhere")


# ----------------------------------------------------------------------------- zennit's assignment


def _zennit_assignment(model, zennit_composite):
    """{module name: zennit rule class name} for the Linear/Conv modules, walked like zennit's
    Composite.register (named_modules order, one shared context)."""
    ctx = {}
    out = {}
    for name, module in model.named_modules():
        hook = zennit_composite.module_map(ctx, name, module)
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            out[name] = type(hook).__name__ if hook is not None else None
    return out


def _models():
    torchvision = pytest.importorskip("torchvision")
    return {
        "seed_notebook": seed_mnist_cnn("notebook").eval(),
        "seed_conv3x2": seed_mnist_cnn("conv3x2").eval(),
        "vgg11": torchvision.models.vgg11().eval(),   # (its Dropout in training mode is refused)
        "resnet18": torchvision.models.resnet18().eval(),
    }


@pytest.mark.parametrize("name", ["epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1",
                                  "epsilon_alpha2_beta1_flat"])
def test_same_assignment_as_zennit(name):
    zc = pytest.importorskip("zennit.composites")
    zennit_cls = {"epsilon_plus": zc.EpsilonPlus, "epsilon_plus_flat": zc.EpsilonPlusFlat,
                  "epsilon_gamma_box": zc.EpsilonGammaBox, "epsilon_alpha2_beta1": zc.EpsilonAlpha2Beta1,
                  "epsilon_alpha2_beta1_flat": zc.EpsilonAlpha2Beta1Flat}[name]
    ours_to_zennit = {"Epsilon": "Epsilon", "ZPlus": "ZPlus", "Flat": "Flat", "ZBox": "ZBox", "Gamma": "Gamma",
                      "AlphaBeta": "AlphaBeta"}
    for model_name, model in _models().items():
        theirs = _zennit_assignment(model, zennit_cls(**PARAMS.get(name, {})))
        theirs = {composites._node_name(n): v for n, v in theirs.items()}  # module paths -> node names
        ours = {n: ours_to_zennit[kind_of(r)]
                for n, r in assignment(model, composites.get(name, **PARAMS.get(name, {}))).items()}
        assert ours == theirs, model_name
