"""torch.compile(fullgraph=True) of the whole relevance call with every composite: z+, αβ, γ, z^B and
flat included, on the seed CNN and on a small model with folded BatchNorms, a BatchNorm after a
concatenation and a residual block. The compiled call gives the eager result, and keeps giving it
after the model's parameters change in place (the modified weights and the BatchNorm fold are
computed in the graph while compiling, not taken from the eager caches)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lrpfast
from lrpfast import composites
from lrpfast import modified_weights as MW
from lrpfast.models import seed_mnist_cnn
from lrpfast.nodes import ContractionStep

from .test_lrp_graph import Block
from .test_lrp_models import randomize_batch_norm, rel_err

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

COMPOSITES = composites.names()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


class TinyResNet(nn.Module):
    """conv-bn-relu stem (folded BN), a residual block (folded BNs, skip add), a 1x1 branch whose
    output is concatenated and normalised (a BatchNorm that cannot be folded), pool, Linear."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.block = Block(6)
        self.branch = nn.Conv2d(6, 2, 1)
        self.norm = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        x = self.block(x)
        x = torch.relu(self.norm(torch.cat([x, self.branch(x)], 1)))
        return self.fc(self.pool(x).flatten(1))


def _setup(model_name):
    """(model, x, target): float32, eval mode, fixed seed."""
    torch.manual_seed(0)
    if model_name == "seed":
        return seed_mnist_cnn("conv3x2").eval(), torch.randn(3, 1, 28, 28), torch.tensor([1, 4, 7])
    model = randomize_batch_norm(TinyResNet()).eval()
    return model, torch.randn(2, 3, 8, 8), torch.tensor([[0, 3], [4, 1]])  # K = 2 maps per sample


def _lrp(model, composite):
    kw = {}
    if composite == "epsilon_gamma_box":  # z^B bounds: floats, and per-channel tensors
        kw = {"low": -3.0, "high": 3.0} if isinstance(model, nn.Sequential) else {
            "low": torch.full((1, 3, 1, 1), -3.0), "high": torch.tensor([3.0, 2.5, 4.0]).reshape(1, 3, 1, 1)}
    return lrpfast.LRP(model, composite=composite, **kw)


def _layers(lrp):
    return [s.module for s in lrp.plan.steps if isinstance(s, ContractionStep)]


def _uses_modified_weights(lrp):
    return any(type(r).__name__ != "Epsilon" for r in lrp.rules().values())


def _perturb(model):
    """Change every parameter and BatchNorm statistic in place (bumps their `_version`, same storage)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5 + torch.rand(p.shape, generator=g)).add_(0.1 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_var.mul_(2.0)
                m.running_mean.add_(0.3)


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("model_name", ["seed", "resnet"])
def test_composite_compiles_fullgraph_and_matches_eager(model_name, composite):
    model, x, t = _setup(model_name)
    lrp = _lrp(model, composite)
    for m in _layers(lrp):
        MW.clear(m)
    compiled = torch.compile(lambda x: lrp(x, t), fullgraph=True, backend="aot_eager")
    got = compiled(x)
    # the traced call took nothing from (and put nothing into) the eager modified-weight cache
    assert all(MW.cache_size(m) == 0 for m in _layers(lrp))
    want = lrp(x, t)
    assert got.shape == want.shape == ((2, 2, 3, 8, 8) if model_name == "resnet" else x.shape)
    assert want.abs().max() > 0
    assert rel_err(got, want) < 1e-6
    # the eager call still caches its modified weights
    assert any(MW.cache_size(m) > 0 for m in _layers(lrp)) == _uses_modified_weights(lrp)


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("model_name", ["seed", "resnet"])
def test_compiled_call_sees_in_place_parameter_changes(model_name, composite):
    """No stale weights inside the compiled call: after an in-place edit of the parameters (and the
    BatchNorm statistics) the same graph, not recompiled, gives the new eager result."""
    model, x, t = _setup(model_name)
    lrp = _lrp(model, composite)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x: lrp(x, t), fullgraph=True, backend=counter)
    before = lrp(x, t)  # eager first: its caches hold the old modified weights / fold
    assert rel_err(compiled(x), before) < 1e-6
    frames = counter.frame_count
    _perturb(model)
    got = compiled(x)  # before any eager call could refresh a cache the graph might read
    after = lrp(x, t)
    assert rel_err(after, before) > 1e-2  # the edit matters
    assert rel_err(got, after) < 1e-6
    assert counter.frame_count == frames  # the graph computes the weights from its inputs: no recompile
    assert rel_err(compiled(-x), lrp(-x, t)) < 1e-6


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_alpha2_beta1", "epsilon_gamma_box"])
def test_nonnegative_input_and_unfed_relu_take_the_general_path_exactly(composite):
    """Eagerly, x >= 0 at the first layer (pixels in [0, 1]) drops the x- branch of z+/αβ, and
    relevance only where z > 0 drops γ's second branch: both are checked on the data. Compiled,
    the graph cannot branch on data and always takes the general path; same result."""
    model, _, t = _setup("resnet")
    x = torch.rand(2, 3, 8, 8)
    lrp = lrpfast.LRP(model, composite=composite, low=0.0, high=1.0) if composite == "epsilon_gamma_box" \
        else lrpfast.LRP(model, composite=composite)
    compiled = torch.compile(lambda x: lrp(x, t), fullgraph=True, backend="aot_eager")
    want = lrp(x, t)
    assert want.abs().max() > 0
    assert rel_err(compiled(x), want) < 1e-6


def test_no_graph_breaks_with_a_composite():
    model, x, t = _setup("resnet")
    lrp = _lrp(model, "epsilon_gamma_box")
    report = dynamo.explain(lambda x: lrp.explain(x, t).relevance)(x)
    assert report.graph_break_count == 0, [b.reason for b in report.break_reasons]
    assert report.graph_count == 1


@pytest.mark.slow
def test_inductor_compiles_a_gamma_box_composite():
    """The real compiler on z^B + γ + ε (BatchNorm folds, residual add, unfolded BatchNorm)."""
    model, x, t = _setup("resnet")
    lrp = _lrp(model, "epsilon_gamma_box")
    compiled = torch.compile(lambda x: lrp(x, t), fullgraph=True)
    assert rel_err(compiled(x), lrp(x, t)) < 1e-5
    _perturb(model)
    got = compiled(x)
    assert rel_err(got, lrp(x, t)) < 1e-5  # new parameters, same graph


@pytest.mark.parametrize("composite", COMPOSITES)
def test_composite_with_dynamic_batch_is_one_graph(composite):
    """dynamic=True with every composite: batches of 3, 5 and 7 through one compile (the modified
    weights do not depend on the batch), each equal to eager."""
    model, _, _ = _setup("seed")
    lrp = _lrp(model, composite)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x: lrp(x), dynamic=True, fullgraph=True, backend=counter)
    frames = None
    for b in (3, 5, 7):
        x = torch.rand(b, 1, 28, 28)
        assert rel_err(compiled(x), lrp(x)) < 1e-6
        frames = counter.frame_count if frames is None else frames
        assert counter.frame_count == frames, f"recompiled for batch {b}"
