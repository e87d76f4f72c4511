"""Forwards that branch on the input's shape are traced per input shape (lrpfast/shape_trace.py);
every plan's logits are checked against model(x) once per shape (LRP._verify)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrpfast
from lrpfast.oracle import gradient_oracle
from lrpfast.ops import RelevanceError

F64 = torch.float64


def rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


class PadToMultiple(nn.Module):
    """Pads the image to a multiple of the patch size when it is not one (timm's patch embeds)."""

    def __init__(self, patch=4):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, 6, patch, stride=patch)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h, w = x.shape[-2:]
        if h % self.patch or w % self.patch:
            x = F.pad(x, (0, (-w) % self.patch, 0, (-h) % self.patch))
        tokens = torch.relu(self.proj(x)).flatten(2).transpose(1, 2)
        return self.head(tokens.mean(1))


def test_shape_branches_are_traced_per_shape_and_equal_the_oracle():
    torch.manual_seed(0)
    model = PadToMultiple().to(F64).eval()
    lrp = lrpfast.LRP(model, eps=0.0)
    with pytest.raises(RelevanceError, match="traced per input shape at the first call"):
        lrp.plan   # nothing traced yet
    for size in (8, 10):   # no padding, then padding: two plans
        x = torch.randn(2, 3, size, size, dtype=F64)
        e = lrp.explain(x, 1)
        assert rel_l2(e.logits, model(x)) < 1e-14
        assert rel_l2(e.relevance, gradient_oracle(model, x, 1)) < 1e-12
    assert len(lrp._shape_plans) == 2
    assert "pad" in lrp.plan.describe()


def test_data_dependent_branch_is_still_refused():
    class DataBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else self.fc(-x)

    lrp = lrpfast.LRP(DataBranch().to(F64))
    with pytest.raises(RelevanceError, match="this one depends on the data"):
        lrp(torch.randn(2, 4, dtype=F64))


def test_a_graph_that_is_another_function_is_refused():
    """A forward whose output the trace cannot reproduce (here: a Python random number) is
    refused at the first call, not explained."""

    class Random(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) * (1.0 + random.random())   # the trace fixes the number it drew

    model = Random().to(F64)
    with pytest.raises(RelevanceError, match="does not reproduce model\\(x\\)"):
        lrpfast.LRP(model)(torch.randn(2, 4, dtype=F64))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name,size", [("vgg11", 64), ("test_vit", 160)])
def test_timm_models_with_shape_checks(name, size):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install lrpfast[zoo])")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5).to(F64).eval()
    x = torch.randn(2, 3, size, size, dtype=F64)
    e = lrpfast.LRP(model, eps=0.0).explain(x, torch.tensor([0, 3]))
    assert rel_l2(e.logits, model(x)) < 1e-12
    assert rel_l2(e.relevance, gradient_oracle(model, x, torch.tensor([0, 3]))) < 1e-10
