"""Bad input to lrpfast.LRP gets a clear error naming what is wrong, never a silently wrong map."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lrpfast
from lrpfast.models import seed_mnist_cnn
from lrpfast.ops import RelevanceError


@pytest.fixture
def lrp():
    return lrpfast.LRP(seed_mnist_cnn("notebook").eval())


def test_wrong_input_shape_names_the_node(lrp):
    with pytest.raises(RelevanceError, match=r"node '_0' \(Conv2d\).*\(2, 3, 28, 28\)"):
        lrp(torch.randn(2, 3, 28, 28))
    with pytest.raises(RelevanceError, match=r"node '_7' \(Linear\)"):
        lrp(torch.randn(2, 1, 32, 32))
    with pytest.raises(RelevanceError, match="batch"):
        lrp(torch.randn(0, 1, 28, 28))
    with pytest.raises(RelevanceError, match="batch"):
        lrp(torch.randn(28))


def test_wrong_input_type_and_dtype(lrp):
    with pytest.raises(TypeError, match="torch.Tensor"):
        lrp([[0.0]])
    with pytest.raises(TypeError, match="floating"):
        lrp(torch.zeros(2, 1, 28, 28, dtype=torch.long))
    with pytest.raises(RelevanceError, match="float64.*float32"):
        lrp(torch.zeros(2, 1, 28, 28, dtype=torch.float64))


def test_target_out_of_range(lrp):
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(RelevanceError, match="target 10 is out of range for 10 classes"):
        lrp(x, 10)
    with pytest.raises(RelevanceError, match="target -1 is out of range"):
        lrp(x, torch.tensor([3, -1]))
    with pytest.raises(RelevanceError, match="out of range"):
        lrp(x, torch.tensor([[3, 4], [12, 0]]))
    with pytest.raises(RelevanceError, match="3 rows for a batch of 2"):
        lrp(x, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer class indices"):
        lrp(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(RelevanceError, match=r"\(B,\) or \(B, K\)"):
        lrp(x, torch.zeros(2, 1, 1, dtype=torch.long))


class Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.softmax(self.fc(x), 1)


class Gathered(nn.Module):
    """Advanced (list) indexing off the batch dim: refused once, a permutation of relevance now."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x[:, [0, 1, 2, 3]])


class Divided(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x / (torch.sigmoid(x) + 1))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, y):
        return self.fc(x + y)


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x), x


@pytest.mark.parametrize("model,match", [
    (Softmaxed(), r"returns 'softmax' \(torch.*softmax\), a softmax: LRP explains the logits before it"),
    (nn.Sequential(nn.Linear(4, 4), nn.InstanceNorm1d(4), nn.Linear(4, 2)),
     r"node '_1' calls module '1' \(InstanceNorm1d\), which has no relevance rule"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), r"padding_mode='reflect'"),
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval(), "no running statistics"),
    (TwoInputs(), r"more than one input"),
    (Pair(), r"must return one tensor of logits"),
])
def test_unsupported_models_fail_at_construction(model, match):
    with pytest.raises(RelevanceError, match=match):
        lrpfast.LRP(model)


@pytest.mark.parametrize("model", [Gathered(), Divided()], ids=["list_index", "divided_by_own_function"])
def test_formerly_refused_patterns_are_explained_as_the_oracle(model):
    """x[:, [0, 1, 2, 3]] moves relevance (a copy); x / (σ(x) + 1) is an elementwise function of x
    (rule 1 of lrpfast/derived.py): both now have rules, checked against the gradient oracle."""
    from lrpfast.oracle import gradient_oracle
    torch.manual_seed(4)
    model = model.double()
    x = torch.randn(6, 4, dtype=torch.float64)
    t = model(x).argmax(1)
    e = lrpfast.LRP(model, eps=0.0).explain(x, t)
    want = gradient_oracle(model, x, t)
    torch.testing.assert_close(e.logits, model(x), rtol=0, atol=1e-12)
    assert ((e.relevance - want).norm() / want.norm()).item() < 1e-12


def test_output_must_be_logits():
    lrp = lrpfast.LRP(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(RelevanceError, match=r"model output has shape \(2, 2, 3, 3\); expected logits"):
        lrp(torch.randn(2, 1, 5, 5))


def test_bad_settings():
    model = seed_mnist_cnn("notebook")
    with pytest.raises(RelevanceError, match="stabilizer"):
        lrpfast.LRP(model, stabilizer="abs")
    with pytest.raises(RelevanceError, match="eps"):
        lrpfast.LRP(model, eps=-1.0)
    with pytest.raises(RelevanceError, match="init must be one of"):
        lrpfast.LRP(model, init="softmax")
    with pytest.raises(RelevanceError, match="batch_size"):
        lrpfast.LRP(model, batch_size=0)
    with pytest.raises(RelevanceError, match="memory_budget"):
        lrpfast.LRP(model, memory_budget="lots")
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        lrpfast.LRP(model, gamma=0.25)
    with pytest.raises(TypeError, match="nn.Module"):
        lrpfast.LRP(lambda x: x)
    with pytest.raises((TypeError, RelevanceError), match="rule_for|expected a dict"):
        lrpfast.LRP(model, composite=42)
    with pytest.raises(RelevanceError, match="unknown composite"):
        lrpfast.LRP(model, composite="no_such_composite")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("call", ["call", "explain", "chunked"])
def test_non_finite_input_is_reported(lrp, bad, call):
    x = torch.randn(3, 1, 28, 28)
    x[1, 0, 5, 7] = bad
    with pytest.raises(RelevanceError, match="LRP: x contains NaN or Inf"):
        if call == "call":
            lrp(x)
        elif call == "explain":
            lrp.explain(x, keep_layers=True)
        else:
            lrpfast.LRP(lrp.model, batch_size=1)(x)


def test_finite_tensor_whose_sum_overflows_is_not_reported():
    """The check reads a sum; a sum that overflows is confirmed element-wise before an error."""
    from lrpfast.ops import check_finite as _check_finite

    for dtype in (torch.float32, torch.bfloat16):  # half types are summed in float32: bfloat16 can overflow it
        big = torch.full((4, 1000), torch.finfo(dtype).max / 2, dtype=dtype)
        assert not torch.isfinite(big.sum(dtype=torch.float32))
        _check_finite(big, "must not raise")
        big[2, 3] = float("nan")
        with pytest.raises(RelevanceError, match="raised"):
            _check_finite(big, "raised")


def test_non_finite_parameter_is_reported_as_a_nan_map():
    """A finite input with a NaN weight would give a NaN map: reported, never returned."""
    model = seed_mnist_cnn("notebook").eval()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(RelevanceError, match="relevance map holds NaN or Inf although x is finite.*parameter"):
        lrpfast.LRP(model)(torch.rand(2, 1, 28, 28), 0)


def test_float16_overflow_is_reported_with_a_hint():
    """float16 relevance overflows where R/stab(z) exceeds 65504: the error says what to do, and
    the same model in bfloat16 (float32's range) gives a finite map."""
    model = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model[2].weight.copy_(torch.tensor([[1e-3, -0.99e-3, 0.0], [1.0, 1.0, 1.0]]))  # z of class 0 ~ 1e-5
    x = torch.ones(1, 2)
    with pytest.raises(RelevanceError, match="float16 relevance map holds NaN or Inf.*65504.*bfloat16"):
        lrpfast.LRP(model.half(), eps=1e-7, init="onehot")(x.half(), 0)
    r = lrpfast.LRP(model.bfloat16(), eps=1e-7, init="onehot")(x.bfloat16(), 0)
    assert torch.isfinite(r).all() and r.abs().max() > 1


def test_data_dependent_branch_is_refused_at_the_first_call():
    """Symbolic tracing fails; the per-shape trace resolves shapes but not data: refused at the call."""
    lrp = lrpfast.LRP(Branchy())
    with pytest.raises(RelevanceError, match=r"could not trace Branchy with torch.fx.*depends on the data"):
        lrp(torch.randn(2, 4))
