"""nn.LSTM / nn.GRU (lrpfast/recurrent.py): gated recurrent LRP (Arras et al. 2017).

At ε = 0 the map must equal gradient x input of the cells written out with their gates held
constant (lrpfast/oracle.py, which runs torch.lstm/torch.gru as its own time loop); at ε > 0 a
one-unit cell is checked against the rule computed by hand.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import lrpfast
from lrpfast.oracle import gradient_oracle
from lrpfast.ops import RelevanceError

F64 = torch.float64


def rel_l2(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


class Tagger(nn.Module):
    """embedding-like Linear -> ReLU -> recurrent layer -> a head on what `use` takes."""

    def __init__(self, cell, batch_first, bidirectional, layers, use):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.rnn = cell(6, 7, num_layers=layers, batch_first=batch_first, bidirectional=bidirectional)
        dirs = 2 if bidirectional else 1
        self.head = nn.Linear(7 * (dirs if use != "h_first" else 1), 3)
        self.batch_first, self.use, self.lstm, self.dirs = batch_first, use, cell is nn.LSTM, dirs

    def forward(self, x):
        h = torch.relu(self.inp(x))
        if not self.batch_first:
            h = h.transpose(0, 1)
        out = self.rnn(h)
        if self.use in ("last", "mean"):
            o = out[0] if self.batch_first else out[0].transpose(0, 1)
            return self.head(o[:, -1] if self.use == "last" else o.mean(1))
        if self.use == "h_twice":   # two reads of out[1]: two state nodes, their relevance adds up
            return self.head(out[1][-1] + out[1][0]) if not self.lstm else self.head(out[1][0][-1] + out[1][0][0])
        states = out[1]
        h_n = states[0] if self.lstm else states
        if self.use == "c_n":
            h_n = states[1]
        if self.use == "h_first":
            return self.head(h_n[0])
        return self.head(torch.cat([h_n[-2], h_n[-1]], -1) if self.dirs == 2 else h_n[-1])


CASES = [(cell, bf, bi, layers, use)
         for cell in (nn.LSTM, nn.GRU)
         for bf in (True, False)
         for bi in (False, True)
         for layers in (1, 2)
         for use in ("last", "mean", "h_n")]
CASES += [(nn.LSTM, True, False, 2, "c_n"), (nn.LSTM, False, True, 2, "c_n"), (nn.LSTM, True, False, 2, "h_first"),
          (nn.GRU, True, True, 2, "h_first"), (nn.GRU, True, False, 2, "h_twice"), (nn.LSTM, False, False, 2, "h_twice")]


@pytest.mark.parametrize("cell,batch_first,bidirectional,layers,use", CASES,
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_recurrent_equals_oracle(cell, batch_first, bidirectional, layers, use):
    torch.manual_seed(len(use) * 7 + layers)
    model = Tagger(cell, batch_first, bidirectional, layers, use).to(F64).eval()
    x = torch.randn(3, 4, 5, dtype=F64)
    with torch.no_grad():
        logits = model(x)
    target = logits.argmax(1)
    e = lrpfast.LRP(model, eps=0.0).explain(x, target)
    assert (e.logits - logits).abs().max().item() < 1e-12
    want = gradient_oracle(model, x, target)
    assert want.abs().max() > 0
    assert rel_l2(e.relevance, want) < 1e-9


def test_recurrent_k_targets_equal_separate_calls():
    torch.manual_seed(1)
    model = Tagger(nn.LSTM, True, True, 2, "mean").to(F64).eval()
    x = torch.randn(2, 5, 5, dtype=F64)
    lrp = lrpfast.LRP(model, eps=0.25)
    both = lrp(x, target=[[0, 2], [1, 0]])        # (B, K, ...)
    for k in range(2):
        one = lrp(x, target=torch.tensor([[0, 2], [1, 0]])[:, k])
        assert rel_l2(both[:, k], one) < 1e-12


def _scalar_lstm(eps):
    """A one-unit LSTM over two steps, its map by the rule written out in Python floats."""
    torch.manual_seed(0)
    m = nn.LSTM(1, 1, batch_first=True).to(F64)
    x = [0.7, -1.3]
    w_ih, w_hh = m.weight_ih_l0.detach().flatten().tolist(), m.weight_hh_l0.detach().flatten().tolist()
    b = (m.bias_ih_l0 + m.bias_hh_l0).detach().tolist()
    sig = lambda v: 1 / (1 + math.exp(-v))   # noqa: E731
    stab = lambda v: v + eps if v >= 0 else v - eps   # noqa: E731
    h = c = 0.0
    rec = []
    for xt in x:
        zi, zf, zg, zo = (w_ih[q] * xt + w_hh[q] * h + b[q] for q in range(4))
        i, f, g, o = sig(zi), sig(zf), math.tanh(zg), sig(zo)
        c_prev, h_prev = c, h
        c = f * c + i * g
        h = o * math.tanh(c)
        rec.append((xt, h_prev, c_prev, i, f, g, zg, c))
    r_h, r_c = h, 0.0          # explain h_T (the model's only output): R = its value
    r_x = [0.0, 0.0]
    for t in (1, 0):
        xt, h_prev, c_prev, i, f, g, zg, ct = rec[t]
        rc = r_h + r_c
        s = rc / stab(ct)
        r_c = f * c_prev * s
        s_g = i * g * s / stab(zg)
        r_x[t] = xt * w_ih[2] * s_g
        r_h = h_prev * w_hh[2] * s_g
    return m, torch.tensor(x, dtype=F64).view(1, 2, 1), r_x


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_lstm_rule_by_hand(eps):
    lstm, x, want = _scalar_lstm(eps)

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = lstm

        def forward(self, x):
            return self.lstm(x)[0][:, -1]      # (B, 1): the last hidden state as the logit

    got = lrpfast.LRP(Last(), eps=eps)(x, target=0)
    assert torch.allclose(got.flatten(), torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-15)


def test_recurrent_float32_matches_float64():
    torch.manual_seed(3)
    model = Tagger(nn.GRU, True, True, 2, "h_n").eval()
    x = torch.randn(4, 6, 5)
    r32 = lrpfast.LRP(model, eps=1e-3)(x, target=1)
    r64 = lrpfast.LRP(model.to(F64), eps=1e-3)(x.to(F64), target=1)
    assert r32.dtype == torch.float32
    assert rel_l2(r32.to(F64), r64) < 1e-4


def test_recurrent_refusals():
    class WithState(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h0 = torch.zeros(1, x.shape[0], 4) + x[:, :1, :1].transpose(0, 1)
            return self.head(self.rnn(x, h0)[0][:, -1])

    with pytest.raises(RelevanceError, match="initial state"):
        lrpfast.LRP(WithState())(torch.randn(2, 5, 3))

    class Projected(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 4, batch_first=True, proj_size=2)
            self.head = nn.Linear(2, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    with pytest.raises(RelevanceError, match="proj_size"):
        lrpfast.LRP(Projected())(torch.randn(2, 5, 3))


def test_a_model_returning_the_recurrent_tuple_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4, batch_first=True)).eval()
    with pytest.raises(RelevanceError, match=r"the model returns a tuple, not a tensor"):
        lrpfast.LRP(model)(torch.randn(2, 3, 4))
