"""The generic rule for ops linear in their computed inputs (lrpfast/op_rules.py), against the
gradient oracle (lrpfast/oracle.py) in float64 with ε = 0, K targets against single targets, and
the refusals that keep the batch dimension whole."""
from __future__ import annotations

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
    (lambda y: torch.stack([y, y], 0)[0], "batch dimension"),
    (lambda y: y.flip(0), "batch dimension"),
    (lambda y: torch.roll(y, 1), "batch dimension"),
    (lambda y: y / (torch.sigmoid(y) + 1.0), "divides by a tensor computed from the input"),
    (lambda y: y.repeat(2, 1, 1, 1)[:2], "batch dimension"),
])
def test_ops_across_the_batch_are_refused(f, match):
    model = Wrap(f).to(F64).eval()
    with pytest.raises(RelevanceError, match=match):
        lrpfast.LRP(model)(torch.randn(2, 3, 6, 6, dtype=F64))
