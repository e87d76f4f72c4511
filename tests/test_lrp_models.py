"""Whole-model LRP on real architectures, against oracles independent of lrpfast:

- gradient × input: on a ReLU network, LRP-0 (eps = 0) at every layer, max pooling by its
  winner and residual sums / average pools by each summand's share equals x ⊙ ∂f_t/∂x exactly,
  biases included (s_j = R_j / z_j = ∂f/∂z_j at every layer). Autograd computes it through the
  user's own unmodified model, BatchNorm unfolded.
- conservation: with zero biases, Σ R is the same at every node's input, layer by layer;
- a peer (zennit) on the same rules where it agrees with the oracle above (VGG).
"""
from __future__ import annotations

import pytest
import torch

import lrpfast
from lrpfast.models import seed_mnist_cnn

torchvision = pytest.importorskip("torchvision")


def randomize_batch_norm(model, zero_shift=False):
    """Non-trivial BatchNorm statistics, so that folding is exercised (shift 0 when asked)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            n = m.running_var.shape[0]
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            if m.weight is not None:
                m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            if not zero_shift:
                m.running_mean.copy_(0.2 * torch.rand(n, generator=g) - 0.1)
                if m.bias is not None:
                    m.bias.data.copy_(0.2 * torch.rand(n, generator=g) - 0.1)
    return model


def zero_biases(model):
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) and m.bias is not None:
            m.bias.data.zero_()
    return model


def gradient_times_input(model, x, t):
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = model(x)
        (g,) = torch.autograd.grad(y.gather(1, t[:, None]).sum(), x)
    return (g * x).detach()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def build(name):
    if name.startswith("seed_"):
        return seed_mnist_cnn(name[5:]), (1, 28, 28)
    return getattr(torchvision.models, name)(weights=None, num_classes=10), (3, 32, 32)


@pytest.mark.parametrize("name", ["seed_notebook", "seed_conv3x2", "vgg11", "resnet18", "densenet121"])
def test_lrp0_equals_gradient_times_input(name):
    model, shape = build(name)
    model = randomize_batch_norm(model).double().eval()
    x = torch.randn(2, *shape, dtype=torch.float64)
    t = torch.tensor([1, 7])
    got = lrpfast.LRP(model, eps=0.0)(x, t)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert rel_err(got, gradient_times_input(model, x, t)) < 1e-12


def arriving(lrp, e, step):
    """Σ R arriving at a step's output: what each of its users passed back to it."""
    steps = lrp.plan.steps
    if step.index == lrp.plan.output:
        return e.conservation["output"]
    total = 0
    for u in dict.fromkeys(step.users):
        user = steps[u]
        maps = e.layers[user.name]
        maps = maps if isinstance(maps, tuple) else (maps,)
        for pos, i in enumerate(user.inputs):
            if i == step.index:
                total = total + maps[pos].flatten(1).sum(1)
    return total


@pytest.mark.parametrize("name", ["seed_notebook", "vgg16", "resnet18", "mobilenet_v2"])
def test_conservation_layer_by_layer(name):
    """Zero biases, LRP-0: at every node, Σ R at its input(s) equals Σ R arriving at its output, and the
    input map sums to the initial relevance."""
    model, shape = build(name)
    model = zero_biases(randomize_batch_norm(model, zero_shift=True)).double().eval()
    x = torch.randn(2, *shape, dtype=torch.float64)
    lrp = lrpfast.LRP(model, eps=0.0)  # LRP-0: nothing absorbed (mobilenet's random logits are ~1e-9)
    e = lrp.explain(x, keep_layers=True)
    total = e.conservation["output"]
    assert torch.all(total.abs() > 0)
    checked = 0
    for step in lrp.plan.steps:
        if step.name in e.conservation and step.index != lrp.plan.input:
            got, want = e.conservation[step.name], arriving(lrp, e, step)
            assert torch.allclose(got, want, rtol=1e-8, atol=1e-12 * total.abs().max().item()), \
                (step.name, got, want)
            checked += 1
    assert checked >= 10
    assert torch.allclose(e.relevance.flatten(1).sum(1), total, rtol=1e-8)
    if name in ("seed_notebook", "vgg16"):  # a chain: the same total at every node
        for node, c in e.conservation.items():
            assert torch.allclose(c, total, rtol=1e-8), node


def test_biases_absorb_relevance_and_the_report_shows_where():
    model = seed_mnist_cnn("notebook").double().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.bias.data.fill_(0.05)
    e = lrpfast.LRP(model).explain(torch.randn(3, 1, 28, 28, dtype=torch.float64))
    c = e.conservation
    # The last Linear's bias takes a share of the logit; Flatten and ReLU pass it on unchanged.
    assert not torch.allclose(c["_9"], c["output"], rtol=1e-6)
    assert torch.allclose(c["_8"], c["_9"], rtol=1e-12) and torch.allclose(c["_6"], c["_7"], rtol=1e-12)


def test_depthwise_and_relu6_mobilenet_runs_and_is_finite():
    model = randomize_batch_norm(torchvision.models.mobilenet_v2(weights=None, num_classes=10)).eval()
    lrp = lrpfast.LRP(model)
    x = torch.randn(2, 3, 32, 32)
    r = lrp(x)
    assert r.shape == x.shape and torch.isfinite(r).all()
    # depthwise convolutions went through the conv step, with their groups
    groups = [s.groups for s in lrp.plan.steps if isinstance(s, lrpfast.nodes.ContractionStep)]
    assert max(groups) > 1
    # float64 agrees with float32
    r64 = lrpfast.LRP(model.double())(x.double())
    assert rel_err(r.double(), r64) < 1e-4


def test_epsilon_matches_zennit_on_vgg():
    zennit = pytest.importorskip("zennit")
    from zennit.attribution import Gradient
    from zennit.composites import LayerMapComposite
    from zennit.layer import Sum
    from zennit.rules import Epsilon, Norm, Pass
    from zennit.torchvision import VGGCanonizer
    from zennit.types import Activation, AvgPool, Convolution, Linear

    model = torchvision.models.vgg11(weights=None, num_classes=10).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    t = torch.tensor([3, 7])
    composite = LayerMapComposite(layer_map=[(Activation, Pass()), (Sum, Norm()), (AvgPool, Norm()),
                                             (Convolution, Epsilon(epsilon=1e-6)), (Linear, Epsilon(epsilon=1e-6))],
                                  canonizers=[VGGCanonizer()])
    with Gradient(model=model, composite=composite) as attributor:
        _, theirs = attributor(x, torch.eye(10, dtype=x.dtype)[t])
    ours = lrpfast.LRP(model, init="onehot")(x, t)
    assert rel_err(ours, theirs) < 1e-10
    del zennit


def test_composite_by_name_assigns_rules_per_layer():
    pytest.importorskip("lrpfast.composites")
    model = torchvision.models.vgg11(weights=None, num_classes=10).eval()
    lrp = lrpfast.LRP(model, composite="epsilon_plus")
    rules = lrp.rules()
    kinds = {type(r).__name__ for n, r in rules.items() if n.startswith("features")}
    assert kinds == {"ZPlus"}
    assert {type(r).__name__ for n, r in rules.items() if n.startswith("classifier")} == {"Epsilon"}
    x = torch.randn(2, 3, 32, 32)
    r = lrp(x)
    assert r.shape == x.shape and torch.isfinite(r).all()
    # z+ with zero biases conserves too
    zero_biases(model)
    e = lrpfast.LRP(model.double(), composite="epsilon_plus", eps=1e-12, rule_eps=1e-12).explain(x.double())
    assert torch.allclose(e.relevance.flatten(1).sum(1), e.conservation["output"], rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_error_is_that_of_the_gradient(dtype):
    """Half types run end to end (fused ops accumulate in float32); the map's error against float64
    is at most about the plain input gradient's error in the same dtype (the precision itself)."""
    model = seed_mnist_cnn("notebook").eval()
    x = torch.rand(4, 1, 28, 28)
    t = torch.tensor([1, 2, 3, 4])
    ref = lrpfast.LRP(copy_to(model, torch.float64))(x.double(), t)
    half = copy_to(model, dtype)
    got = lrpfast.LRP(half)(x.to(dtype), t)
    assert got.dtype == dtype and torch.isfinite(got).all()
    g64 = gradient_times_input(copy_to(model, torch.float64), x.double(), t)
    g = gradient_times_input(half, x.to(dtype), t).double()

    def l2(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert l2(got, ref) <= 2 * l2(g, g64) + 1e-3


def copy_to(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)
