"""LRP(model, compile=...): the compiled pass (lrpfast/compiled.py) gives the gradient oracle's map,
runs compiled from the second call of a shape, sees weight and mask changes without a recompile,
and keeps the eager error messages.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lrpfast
from lrpfast.ops import RelevanceError
from lrpfast.oracle import gradient_oracle

F64 = torch.float64


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


class Counting:
    """A torch.compile backend: aot_eager (autograd-aware tracing, the ops run eagerly), counting
    the graphs it is given, so a test knows the compiled path ran."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


class ConvAttention(nn.Module):
    """Conv, ReLU, max pooling, then attention written by hand (two computed factors of a matmul,
    softmax), torch.roll and a residual: contraction steps, the op table's autograd step
    (roll, transpose) and the bilinear rule in one graph."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8 * 16, 5)

    def forward(self, x):
        h = self.pool(torch.relu(self.conv(x)))
        t = h.flatten(2).transpose(1, 2)
        a = torch.softmax(self.q(t) @ self.k(t).transpose(-2, -1) / 8 ** 0.5, -1)
        t = t + torch.roll(a @ self.v(t), 1, dims=1)
        return self.head(t.flatten(1))


def net():
    torch.manual_seed(0)
    return ConvAttention().to(F64).eval()


def data(b=3, seed=1):
    return torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_compiled_map_equals_the_oracle_from_the_second_call(attention):
    m, x = net(), data()
    backend = Counting()
    lrp = lrpfast.LRP(m, eps=0.0, attention=attention, compile={"backend": backend})
    oracle = gradient_oracle(m, x, attention=attention)
    first = lrp(x)
    assert backend.graphs == 0   # the first call of a shape is eager (it verifies the plan)
    second = lrp(x)
    assert backend.graphs >= 1
    graphs = backend.graphs
    third = lrp(x)
    assert backend.graphs == graphs   # no recompile for the same shape
    for r in (first, second, third):
        assert rel_err(r, oracle) <= 1e-10
    # a new batch size: eager once, then compiled (one more graph), the oracle's map again
    y = data(5, seed=2)
    assert rel_err(lrp(y), gradient_oracle(m, y, attention=attention)) <= 1e-10
    assert rel_err(lrp(y), gradient_oracle(m, y, attention=attention)) <= 1e-10
    assert backend.graphs > graphs


def test_inductor_equals_the_oracle():
    m, x = net(), data()
    lrp = lrpfast.LRP(m, eps=0.0, attention="attnlrp", compile=True)
    lrp(x)
    r = lrp(x)
    assert rel_err(r, gradient_oracle(m, x, attention="attnlrp")) <= 1e-10
    e = lrpfast.LRP(m, eps=1e-3, attention="attnlrp")(x)
    c = lrpfast.LRP(m, eps=1e-3, attention="attnlrp", compile=True)
    c(x)
    assert rel_err(c(x), e) <= 1e-10   # ε > 0: the compiled pass is the eager one


def test_a_weight_changed_in_place_shows_without_a_recompile():
    m, x = net(), data()
    backend = Counting()
    lrp = lrpfast.LRP(m, eps=0.0, compile={"backend": backend})
    lrp(x)
    before = lrp(x)
    graphs = backend.graphs
    with torch.no_grad():
        m.conv.weight.mul_(-1.5)
        m.head.bias.add_(0.3)
    after = lrp(x)
    assert backend.graphs == graphs
    oracle = gradient_oracle(m, x)
    assert rel_err(after, oracle) <= 1e-10
    assert rel_err(before, oracle) > 1e-2   # (the change matters: a baked-in weight would be caught)


def test_k_targets_and_chunks_go_through_the_compiled_pass():
    m, x = net(), data(4)
    backend = Counting()
    lrp = lrpfast.LRP(m, eps=0.0, compile={"backend": backend}, batch_size=2)
    t = torch.tensor([[0, 3], [1, 4], [2, 0], [4, 1]])
    lrp(x, t)
    r = lrp(x, t)
    assert backend.graphs >= 1
    for j in range(2):
        assert rel_err(r[:, j], gradient_oracle(m, x, t[:, j])) <= 1e-10


def test_errors_keep_their_eager_messages():
    m, x = net(), data()
    lrp = lrpfast.LRP(m, compile={"backend": Counting()})
    lrp(x)
    lrp(x)
    with pytest.raises(RelevanceError, match="target 7 is out of range for 5 classes"):
        lrp(x, torch.tensor([0, 7, 1]))
    bad = x.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(RelevanceError, match="NaN or Inf"):
        lrp(bad)


def test_a_failing_compile_warns_once_and_stays_eager():
    """A backend that cannot compile (no C++ compiler, an inductor error): the call still returns
    the map, with one warning naming the failure, and the LRP stays eager afterwards."""
    m, x = net(), data()
    tries = []

    def broken(gm, example_inputs):
        tries.append(1)
        raise RuntimeError("no C++ compiler found")

    lrp = lrpfast.LRP(m, eps=0.0, compile={"backend": broken})
    lrp(x)
    with pytest.warns(RuntimeWarning, match="compile= failed for input shape .*no C\\+\\+ compiler found.*runs eagerly"):
        r = lrp(x)
    assert rel_err(r, gradient_oracle(m, x)) <= 1e-10
    n = len(tries)
    assert n >= 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel_err(lrp(x), gradient_oracle(m, x)) <= 1e-10
    assert len(tries) == n   # not tried again


def test_explain_with_records_is_eager():
    m, x = net(), data()
    backend = Counting()
    lrp = lrpfast.LRP(m, eps=0.0, compile={"backend": backend})
    lrp.explain(x)
    e = lrp.explain(x, keep_layers=True)
    assert backend.graphs == 0 and e.layers
    assert rel_err(e.relevance, gradient_oracle(m, x)) <= 1e-10


@pytest.mark.parametrize("value, error, match", [
    (5, TypeError, "compile must be True"),
    ({"backend": "inductor", "fullgraf": True}, RelevanceError, "unknown torch.compile arguments"),
    ({"options": {"freezing": True}}, RelevanceError, "freezing"),
])
def test_bad_compile_values_are_refused(value, error, match):
    with pytest.raises(error, match=match):
        lrpfast.LRP(net(), compile=value)


def test_hf_mask_values_are_read_at_every_compiled_call():
    """The attention mask is a buffer whose values lrpfast.hf writes before each call: the compiled
    graph must read them (a mask baked into the graph would give the second pattern the first
    one's map). Two padding patterns of one shape: one compile, each equal to the oracle."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install lrpfast[hf])")
    import lrpfast.hf as H
    from tests.test_hf import DEC, Reference, tokens

    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DEC)).to(F64).eval()
    backend = Counting()
    lrp = H.LRP(m, eps=0.0, attention="attnlrp", compile={"backend": backend})
    ids, mask = tokens()
    _, other = tokens(side="left")
    lrp(ids, mask)
    for mk in (mask, other, mask):
        e = lrp(ids, mk)
        oracle = gradient_oracle(Reference(m, mk), m.get_input_embeddings()(ids).detach(), e.targets,
                                 attention="attnlrp")
        assert rel_err(e.relevance, oracle) <= 2e-6   # HF's float32 RMSNorm upcast (tests/test_hf.py)
        assert e.relevance[mk == 0].abs().max().item() == 0.0
    assert backend.graphs >= 1
    graphs = backend.graphs
    eager = H.LRP(m, eps=0.0, attention="attnlrp")(ids, other)
    assert rel_err(lrp(ids, other).relevance, eager.relevance) <= 1e-14   # aot_eager runs eager's kernels
    assert backend.graphs == graphs


def test_inductor_llama_equals_the_oracle_and_the_eager_map(monkeypatch):
    """inductor on a tiny Llama through lrpfast.hf: the op table's autograd steps, the recomputed
    outputs (RMSNorm, rotary, SwiGLU, attention weights) and the elementwise ops inlined for fusion
    (lrpfast/ops.py INLINE_ELEMENTWISE) in one generated graph. HF's RMSNorm computes in float32
    inside a float64 model (inductor may round that chain differently): patched to float64 here, as
    in tests/test_hf.py, so the bounds are float64's."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install lrpfast[hf])")
    import transformers.models.llama.modeling_llama as modeling
    import lrpfast.hf as H
    from tests.test_hf import DEC, Reference, tokens

    def norm(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling.LlamaRMSNorm, "forward", norm)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DEC)).to(F64).eval()
    ids, mask = tokens()
    compiled = H.LRP(m, eps=0.0, attention="attnlrp", compile=True)
    compiled(ids, mask)
    e = compiled(ids, mask)
    oracle = gradient_oracle(Reference(m, mask), m.get_input_embeddings()(ids).detach(), e.targets,
                             attention="attnlrp")
    # Llama's rotary tables are computed in float32 (inv_freq, .float()) even in a float64 model,
    # and inductor rounds that chain differently from eager: torch.compile of the model alone moves
    # its logits by 2.3e-10 (measured). Hence 1e-9 here, not float64's 1e-12 (aot_eager, which runs
    # eager's kernels, agrees with eager to 1e-16: test_hf_mask_values_are_read_at_every_compiled_call).
    assert rel_err(e.relevance, oracle) <= 1e-9
    eager = H.LRP(m, eps=1e-6, attention="attnlrp")(ids, mask)
    c = H.LRP(m, eps=1e-6, attention="attnlrp", compile=True)
    c(ids, mask)
    assert rel_err(c(ids, mask).relevance, eager.relevance) <= 1e-9
