"""Elementwise products (lrpfast.nodes.MulStep): a constant factor (a number, a parameter: layer
scale) is a diagonal linear map under the ε rule; two computed factors (squeeze-and-excitation
gates) share the relevance evenly (the uniform rule of AttnLRP, Achtibat et al. 2024).

The oracle, independent of lrpfast: with ε → 0 the map equals gradient × input of a hand-written
copy in which every product a·b of two computed tensors is ½(a·b.detach() + a.detach()·b) and
every activation f is x·(f(x)/x).detach(). torchvision's EfficientNet, MobileNetV3, RegNetY and
ConvNeXt (SE blocks, layer scale, LayerNorm2d, stochastic depth) are checked by conservation with
zero biases.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrpfast
from lrpfast.ops import RelevanceError

F64 = torch.float64

# torchvision's GoogLeNet/Inception warn about their default initialisation (not ours to change)
pytestmark = pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class SENet(nn.Module):
    """conv -> ReLU -> squeeze-and-excitation (x * sigmoid(...)) -> layer scale (a parameter) ->
    conv -> ×2 (a number) -> mean -> linear. `form` picks how the SE product is written."""

    def __init__(self, form="operator"):
        super().__init__()
        self.form = form
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.head = nn.Linear(6, 5)

    def gate(self, x):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))

    def forward(self, x):
        x = F.relu(self.conv1(x))
        g = self.gate(x)
        if self.form == "operator":
            x = x * g
        elif self.form == "reversed":
            x = g * x
        elif self.form == "torch.mul":
            x = torch.mul(x, other=g)
        else:
            x = x.mul(g)
        x = self.gamma * x
        x = 2.0 * self.conv2(x)
        return self.head(x.mean((2, 3)))


def act(f, x):
    return x * (f(x) / x).detach()


def half_product(a, b):
    return 0.5 * (a * b.detach() + a.detach() * b)


def ref_senet(m, x):
    x = act(F.relu, m.conv1(x))
    g = act(torch.sigmoid, m.fc2(act(F.relu, m.fc1(F.adaptive_avg_pool2d(x, 1)))))
    x = m.gamma * half_product(x, g)
    x = 2.0 * m.conv2(x)
    return m.head(x.mean((2, 3)))


def oracle(ref, model, x, t):
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(ref(model, x).gather(1, t[:, None]).sum(), x)
    return (x * g).detach()


def senet(form="operator", dtype=F64):
    torch.manual_seed(0)
    return SENet(form).to(dtype).eval()


@pytest.mark.parametrize("form", ["operator", "reversed", "torch.mul", "method"])
def test_products_equal_modified_gradient_times_input(form):
    model = senet(form)
    x = torch.randn(3, 3, 9, 9, dtype=F64)
    t = torch.tensor([0, 2, 4])
    with torch.no_grad():
        assert rel_l2(ref_senet(model, x), model(x)) < 1e-13
    want = oracle(ref_senet, model, x, t)
    assert rel_l2(lrpfast.LRP(model, eps=0.0)(x, t), want) < 1e-12
    assert rel_l2(lrpfast.LRP(model, eps=1e-12)(x, t), want) < 1e-6
    # the uniform split is what the oracle pins down: all relevance to x (the gate a constant) differs
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg).gather(1, t[:, None]).sum(), xg)
    assert rel_l2(lrpfast.LRP(model, eps=0.0)(x, t), x * g) > 1e-2


def test_products_k_targets_layers_and_float32():
    model = senet()
    x = torch.randn(4, 3, 9, 9, dtype=F64)
    t = torch.stack([torch.randperm(5)[:3] for _ in range(4)])
    lrp = lrpfast.LRP(model)
    both = lrp(x, t)
    for k in range(3):
        assert rel_l2(both[:, k], lrp(x, t[:, k])) < 1e-12
    e = lrp.explain(x, t[:, 0], keep_layers=True)
    mul = e.layers["mul"]                                   # to x (B, 8, 9, 9) and to the gate (B, 8, 1, 1)
    assert [tuple(m.shape) for m in mul] == [(4, 8, 9, 9), (4, 8, 1, 1)]
    # the uniform rule: both factors get the same, Σ ½ z ⊙ s, half of what arrives (conservation
    # [name] is what a node sends on: "mul_1", the layer scale, sends to the product's output)
    to_x, to_gate = mul[0].flatten(1).sum(1), mul[1].flatten(1).sum(1)
    assert torch.allclose(to_x, to_gate, rtol=1e-10, atol=0)
    assert torch.allclose(to_x + to_gate, e.conservation["mul"], rtol=1e-12, atol=0)
    assert torch.allclose(to_x, e.conservation["mul_1"] / 2, rtol=1e-3, atol=0)   # ε = 1e-6 absorbs a little
    f32 = lrpfast.LRP(senet(dtype=torch.float32))(x.float(), t[:, 0])
    assert rel_l2(f32, lrp(x, t[:, 0])) < 1e-4


def test_square_is_two_halves_to_one_node():
    """x * x: both halves reach x, R_x = x ⊙ x ⊙ s (all of it, as the oracle's ½(x·x.detach() +
    x.detach()·x) gives)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Identity(), nn.Linear(6, 3)).double().eval()

    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            h = self.net[0](x)
            return self.net[2](h * h)

    x = torch.randn(5, 4, dtype=F64)
    t = torch.tensor([0, 1, 2, 0, 1])
    want = oracle(lambda m, x: model[2](half_product(model[0](x), model[0](x))), None, x, t)
    assert rel_l2(lrpfast.LRP(Square(), eps=0.0)(x, t), want) < 1e-12


def test_products_refused_across_samples():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.unsqueeze(1) * x).mean(1)     # (B, 1, 4) * (B, 4): every pair of samples

    with pytest.raises(RelevanceError, match=r"node 'mul' \(mul\) broadcasts the factor of shape \(3, 4\) across "
                                              r"samples or leading dims of \(3, 3, 4\)"):
        lrpfast.LRP(Net())(torch.randn(3, 4))


torchvision = pytest.importorskip("torchvision")


def zero_biases(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    return model


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v3_small", "regnet_y_400mf", "convnext_tiny"])
def test_torchvision_models_with_products_conserve(name):
    """SE gates, layer scale, ConvNeXt's LayerNorm2d, stochastic depth: with zero biases (β = 0,
    BatchNorm at its initial statistics) and a tiny ε, Σ R_in is the logit. (MobileNetV3's
    hardsigmoid gate, relu6(x + 3)/6, has an offset: its identity rule passes the relevance on
    unchanged all the same.)"""
    torch.manual_seed(0)
    model = zero_biases(torchvision.models.get_model(name, weights=None, num_classes=7)).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=F64)
    # ε far below every |z| (random EfficientNets give logits near 1e-10)
    e = lrpfast.LRP(model, eps=1e-40).explain(x)
    out = e.conservation["output"]
    assert out.abs().min() > 1e-20 and torch.isfinite(e.relevance).all()
    assert torch.allclose(e.relevance.flatten(1).sum(1), out, rtol=1e-6, atol=0)
    ops = {s.op for s in lrpfast.LRP(model).plan.steps}
    assert "mul" in ops


def test_stochastic_depth_in_training_mode_is_refused():
    model = torchvision.models.convnext_tiny(weights=None, stochastic_depth_prob=0.1).train()
    with pytest.raises(RelevanceError, match=r"drops residual branches at random \(training=True\)"):
        lrpfast.LRP(model)


ZOO = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_b2", "efficientnet_v2_s",
       "googlenet", "inception_v3", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
       "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1"]


@pytest.mark.parametrize("name", ZOO)
def test_torchvision_zoo_conserves(name):
    """A sweep over torchvision's families (every traced model under 60M parameters conserved to
    2e-6 or better, 2026-11-26): a node taken for a constant or for shape arithmetic by mistake
    loses relevance here, silently elsewhere."""
    torch.manual_seed(0)
    model = zero_biases(torchvision.models.get_model(name, weights=None, num_classes=7)).double().eval()
    size = 299 if name == "inception_v3" else 64
    e = lrpfast.LRP(model, eps=1e-40).explain(torch.randn(2, 3, size, size, dtype=F64))
    out = e.conservation["output"]
    assert torch.isfinite(e.relevance).all() and out.abs().min() > 1e-20
    assert torch.allclose(e.relevance.flatten(1).sum(1), out, rtol=1e-5, atol=0)
