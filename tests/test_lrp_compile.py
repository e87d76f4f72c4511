"""torch.compile of the whole relevance call on a Sequential model: one graph, no breaks, the
custom ops inside it (traced through their fake kernels), the same result as eager."""
from __future__ import annotations

import pytest
import torch

import lrpfast
from lrpfast.models import seed_mnist_cnn

from .test_lrp_models import rel_err

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("variant", ["notebook", "conv3x2"])
def test_no_graph_breaks(variant):
    lrp = lrpfast.LRP(seed_mnist_cnn(variant).eval())
    x = torch.randn(4, 1, 28, 28)
    t = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    for fn in (lambda x: lrp(x), lambda x: lrp(x, t), lambda x: lrp.explain(x).conservation["output"]):
        report = dynamo.explain(fn)(x)
        assert report.graph_break_count == 0, [b.reason for b in report.break_reasons]
        assert report.graph_count == 1


def test_fullgraph_has_the_custom_ops_and_matches_eager():
    lrp = lrpfast.LRP(seed_mnist_cnn("notebook").eval())
    x = torch.randn(4, 1, 28, 28)
    t = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    seen = []

    def capture(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = torch.compile(lambda x: lrp(x, t), fullgraph=True, backend=capture)
    assert rel_err(compiled(x), lrp(x, t)) < 1e-6
    if lrpfast.HAS_EXT:
        ops = {s for s in seen if s.startswith("lrpfast.")}
        assert {"lrpfast.mul_stab_div", "lrpfast.max_pool_relprop", "lrpfast.stab_div",
                "lrpfast.mul_input"} <= ops


def test_aot_eager_traces_through_the_fake_kernels():
    lrp = lrpfast.LRP(seed_mnist_cnn("conv3x2").eval())
    x = torch.randn(3, 1, 28, 28)
    compiled = torch.compile(lambda x: lrp(x), fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x), lrp(x)) < 1e-6


@pytest.mark.parametrize("variant, k", [("notebook", None), ("conv3x2", 2)])
def test_dynamic_batch_size_is_one_graph(impl, variant, k):
    """dynamic=True: one graph serves batches of 3 and 5 (the batch size stays symbolic through the
    scheduling and the custom ops), with the eager result. K·B stays below 16: on CPU torch's own
    convolution picks its backend by that row count, one more graph beyond it (README)."""
    lrp = lrpfast.LRP(seed_mnist_cnn(variant).eval())

    def call(x):
        return lrp(x) if k is None else lrp(x, torch.arange(k).expand(x.shape[0], k))

    counters.clear()  # dynamo.reset() keeps them
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(call, dynamic=True, fullgraph=True, backend=counter)
    x3, x5 = torch.randn(3, 1, 28, 28), torch.randn(5, 1, 28, 28)
    assert rel_err(compiled(x3), call(x3)) < 1e-6
    frames = counter.frame_count
    assert rel_err(compiled(x5), call(x5)) < 1e-6
    assert counter.frame_count == frames, "recompiled for the second batch size"
    assert counters["stats"]["unique_graphs"] == 1
    gm = counter.graphs[-1]
    x_in = [n.meta["example_value"] for n in gm.graph.nodes
            if n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.Tensor)
            and n.meta["example_value"].dim() == 4 and not isinstance(n.meta["example_value"], torch.nn.Parameter)]
    assert len(x_in) == 1 and isinstance(x_in[0].shape[0], torch.SymInt)  # the batch is symbolic
    if impl == "extension":
        # the custom op takes the symbolic size (schema SymInt[] input_size), not a pinned one
        assert any(str(n.target) == "lrpfast.max_pool_relprop" for n in gm.graph.nodes)


@pytest.mark.slow
def test_inductor_compiles_the_whole_call():
    """The real compiler (about a minute on 2 busy cores): C++ codegen around the custom ops."""
    lrp = lrpfast.LRP(seed_mnist_cnn("notebook").eval())
    x = torch.randn(4, 1, 28, 28)
    t = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    compiled = torch.compile(lambda x: lrp(x, t), fullgraph=True)
    assert rel_err(compiled(x), lrp(x, t)) < 1e-5
    assert rel_err(compiled(2 * x), lrp(2 * x, t)) < 1e-5    # a second call reuses the graph


def test_mean_pooling_compiles_fullgraph():
    """A global average written as x.mean(dims) (MeanStep) traces without a break: its relevance
    step once built the divisor from a generator, which dynamo refused under fullgraph."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()).eval()

    class MeanHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = model, torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)))

    lrp = lrpfast.LRP(MeanHead().eval())
    x = torch.randn(3, 1, 8, 8)
    compiled = torch.compile(lambda x: lrp(x), fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x), lrp(x)) < 1e-6
