"""torch.chunk / torch.split (functions and methods): each piece taken from the tuple is a narrow
view of the source, and its relevance goes back to its place (nodes.SplitStep, nodes.PieceStep).

Oracle: with ReLU networks and ε = 0, LRP is gradient × input of the model itself (ReLU's rule is
its gradient), so the pieces must route the gradient exactly as autograd does. ShuffleNetV2 (chunk
+ channel shuffle) is checked by conservation with zero biases.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrpfast
from lrpfast.ops import RelevanceError

F64 = torch.float64


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class Pieces(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 12), nn.Linear(6, 6), nn.Linear(12, 4)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        if self.form == "chunk":
            a, b = torch.chunk(h, 2, dim=1)
        elif self.form == "chunk_method":
            a, b = h.chunk(2, -1)
        elif self.form == "split_sections":              # uneven pieces, the last two used
            _, a, b = torch.split(h, [2, 6, 4], dim=1)
            b = torch.cat([b, b[:, :2]], 1)
        else:
            parts = h.split(split_size=5, dim=1)         # 5, 5, 2
            a, b = parts[0][:, :4], torch.cat([parts[1][:, :4], parts[2]], 1)
            a = torch.cat([a, parts[2]], 1)
        return self.fc3(torch.cat([F.relu(self.fc2(a)), b], 1))


@pytest.mark.parametrize("form", ["chunk", "chunk_method", "split_sections", "split_size"])
def test_pieces_route_the_gradient(form):
    torch.manual_seed(0)
    model = Pieces(form).double().eval()
    x = torch.randn(4, 5, dtype=F64)
    t = torch.tensor([0, 1, 2, 3])
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg).gather(1, t[:, None]).sum(), xg)
    lrp = lrpfast.LRP(model, eps=0.0)
    assert rel_l2(lrp(x, t), x * g) < 1e-12
    # K targets in one pass
    tk = torch.stack([t, (t + 1) % 4], 1)
    both = lrp(x, tk)
    assert rel_l2(both[:, 1], lrp(x, tk[:, 1])) < 1e-12
    assert sum(isinstance(s, lrpfast.nodes.PieceStep) for s in lrp.plan.steps) >= 2


def test_splitting_the_batch_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            a, b = x.chunk(2, 0)
            return self.fc(torch.cat([b, a], 0))

    with pytest.raises(RelevanceError, match=r"splits along the batch dimension"):
        lrpfast.LRP(Net())(torch.randn(4, 4))


def test_pieces_taken_by_slice_are_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.cat(x.chunk(4, 1)[:2], 1).repeat(1, 2))

    with pytest.raises(RelevanceError, match=r"indexes the pieces of .* with slice"):
        lrpfast.LRP(Net())


torchvision = pytest.importorskip("torchvision")


def test_shufflenet_conserves():
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=7).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    x = torch.randn(2, 3, 64, 64, dtype=F64)
    e = lrpfast.LRP(model, eps=1e-40).explain(x)
    out = e.conservation["output"]
    assert out.abs().min() > 1e-12 and torch.isfinite(e.relevance).all()
    assert torch.allclose(e.relevance.flatten(1).sum(1), out, rtol=1e-6, atol=0)
