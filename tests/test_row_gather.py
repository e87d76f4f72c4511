"""lrpfast/graph/row_gather.py: the explained row of each sample selected before the ops that act on
rows alone (the LM head, norms, the MLP, residual sums), and not before an op that mixes rows.

A toy causal "LM" in float64, explained through lrpfast.hf at each sample's own last real token
(a padded batch, so the gathered positions differ per sample): its map equals gradient x input of
the function written here (lrpfast.oracle at eps = 0), its logits equal the model's, and the plan
runs exactly the row-wise tail on one row per sample.
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn

import lrpfast.hf as H
from lrpfast.graph import passes
from lrpfast.oracle import gradient_oracle

F64 = torch.float64
B, L, D, V = 3, 6, 8, 11


class ToyLM(nn.Module):
    """h = e + mix(e) (a Linear across positions: rows mixed), then a tail that `variant` picks,
    then an LM head: logits (B, L, V)."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.mix = nn.Linear(L, L)
        self.norm_w = nn.Parameter(torch.rand(D) + 0.5)
        self.gate, self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.act = nn.SiLU()
        self.ln = nn.LayerNorm(D)
        self.pos = nn.Parameter(torch.randn(L, D))
        self.prelu = nn.PReLU(L)
        self.head = nn.Linear(D, V)

    def forward(self, inputs_embeds, attention_mask=None):
        h = inputs_embeds + self.mix(inputs_embeds.transpose(1, 2)).transpose(1, 2)
        if self.variant == "seq_mean":      # mixes rows after the MLP: the gather stops above it
            h = h - h.mean(1, keepdim=True)
        if self.variant == "pos_const":     # a per-position constant of lower rank: stops there
            h = h + self.pos
        if self.variant == "prelu":         # PReLU's weight runs along dim 1, the positions here
            h = self.prelu(h)
        # written-out RMSNorm, then a gated MLP with a residual, then a LayerNorm module
        n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_w
        h = h + self.down(self.act(self.gate(n)) * self.up(n))
        return _Out(self.head(self.ln(h)))


class _Out:
    def __init__(self, logits):
        self.logits = logits


def _last_real(mask):
    return mask.shape[1] - 1 - mask.flip(1).argmax(1)


class Reference(nn.Module):
    def __init__(self, m, mask):
        super().__init__()
        self.m, self.mask = m, mask

    def forward(self, x):
        out = self.m(x).logits
        return out[torch.arange(out.shape[0]), _last_real(self.mask)]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(B, L, D, generator=g, dtype=F64)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return e, mask


def _rows_nodes(lrp):
    gm = lrp._explainers["inputs_embeds"][1].plan.gm
    return {n.target.split(".")[-1] if n.op == "call_module" else n.name for n in gm.graph.nodes
            if n.name.endswith("_rows")}


# what runs on the explained rows only, per variant (call_module targets; the head always)
SUNK = {
    "rows": {"head", "ln", "gate", "up", "down", "act"},
    "seq_mean": {"head", "ln", "gate", "up", "down", "act"},
    "pos_const": {"head", "ln", "gate", "up", "down", "act"},
    "prelu": {"head", "ln", "gate", "up", "down", "act"},
}


@pytest.mark.parametrize("variant", ["rows", "seq_mean", "pos_const", "prelu"])
def test_map_equals_the_oracle_and_only_row_wise_ops_move(variant):
    torch.manual_seed(0)
    m = ToyLM(variant).to(F64).eval()
    e, mask = _inputs()
    lrp = H.LRP(m, eps=0.0, attention="cp")
    got = lrp(inputs_embeds=e, attention_mask=mask)
    with torch.no_grad():
        want_logits = Reference(m, mask)(e)
    assert torch.allclose(got.logits, want_logits, rtol=1e-12, atol=1e-12)
    assert got.positions.tolist() == _last_real(mask).tolist()
    oracle = gradient_oracle(Reference(m, mask), e, got.targets)
    err = ((got.relevance - oracle).norm() / oracle.norm()).item()
    assert err <= 1e-10, err
    moved = _rows_nodes(lrp)
    assert SUNK[variant] <= moved
    # the op that mixes rows, and what comes before it, keep every row
    assert "mix" not in moved
    if variant == "prelu":
        assert "prelu" not in moved
    gm = lrp._explainers["inputs_embeds"][1].plan.gm
    rows = [n for n in gm.graph.nodes if n.name.endswith("_rows")]
    # a mean over the positions (dim 1) keeps every row; the subtraction that reads it moves, the
    # mean's (B, 1, D) output broadcast to the kept row as to every row
    assert not any(n.target == "mean" and n.args[1] == 1 for n in rows)
    assert any(n.target is operator.sub for n in rows) == (variant == "seq_mean")
    # the per-position constant is added to every row: no moved node reads it
    assert not any(a.op == "get_attr" and a.target.endswith("pos") for n in rows for a in n.all_input_nodes)
    if variant in ("seq_mean", "pos_const", "prelu"):
        # the sum right after the row-mixing op is not moved either: the gather sits below it
        assert sum(1 for n in rows if n.target == "gather") == 1


def test_row_wise_layers_see_one_row_per_sample():
    """The MLP's Linears run on (B, 1, features): their saved outputs have one row per sample."""
    torch.manual_seed(0)
    m = ToyLM("rows").to(F64).eval()
    e, mask = _inputs()
    lrp = H.LRP(m, eps=0.0)
    lrp(inputs_embeds=e, attention_mask=mask)
    plan = lrp._explainers["inputs_embeds"][1].plan
    call = passes.forward(plan, e)
    shapes = {s.module: tuple(call.saved[s.index].z.shape) for s in plan.steps
              if s.op == "Linear" and call.saved[s.index] is not None}
    assert shapes[m.down] == (B, 1, D) and shapes[m.head] == (B, 1, V)
    assert shapes[m.mix] == (B, D, L)


def test_sum_over_the_rows_is_not_moved():
    """A reduction over the gathered dim (the positions) is not row-wise: the output is explained
    as the model computes it (logits equal; map equals the oracle)."""

    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ToyLM("rows")

        def forward(self, inputs_embeds, attention_mask=None):
            h = inputs_embeds + inputs_embeds.sum(1, keepdim=True)
            return self.inner(h)

    torch.manual_seed(1)
    m = Pool().to(F64).eval()
    e, mask = _inputs(1)
    got = H.LRP(m, eps=0.0)(inputs_embeds=e, attention_mask=mask)
    oracle = gradient_oracle(Reference(m, mask), e, got.targets)
    assert ((got.relevance - oracle).norm() / oracle.norm()).item() <= 1e-10
