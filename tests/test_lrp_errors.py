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


class Sliced(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x[:, :4])


class Multiplied(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x * x)


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
    (Softmaxed(), r"node 'softmax' calls torch.*softmax, which has no relevance rule"),
    (Sliced(), r"node 'getitem' indexes or slices a tensor"),
    (Multiplied(), r"node 'mul' calls .*mul, which has no relevance rule"),
    (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)),
     r"node '_1' calls module '1' \(LayerNorm\), which has no relevance rule"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), r"padding_mode='reflect'"),
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)), "no running statistics"),
    (Branchy(), r"could not trace Branchy with torch.fx"),
    (TwoInputs(), r"more than one input"),
    (Pair(), r"must return one tensor of logits"),
])
def test_unsupported_models_fail_at_construction(model, match):
    with pytest.raises(RelevanceError, match=match):
        lrpfast.LRP(model)


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
