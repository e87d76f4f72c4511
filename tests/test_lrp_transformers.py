"""Transformers: LayerNorm, attention (nn.MultiheadAttention, F.scaled_dot_product_attention),
class tokens, positional embeddings and slicing, with the conservative propagation of Ali et al.
2022 (CP-LRP).

The oracle, independent of lrpfast: with these rules, ε-LRP (ε → 0) equals gradient × input of a
copy of the model in which the LayerNorm's σ and the attention weights A are detached and every
elementwise activation f is replaced by x·(f(x)/x).detach(), biases included (R_j / z_j is the
modified gradient at every layer). The copies below are written by hand with explicit matmul and
softmax, from the modules' parameters. With eps=0 the two agree to rounding; with a tiny ε the
difference is linear in ε.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrpfast
from lrpfast.ops import RelevanceError

torchvision = pytest.importorskip("torchvision")


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ============================================================================= models


class Block(nn.Module):
    """Pre-norm encoder block. attention: "mha" (nn.MultiheadAttention) or "sdpa" (a packed qkv
    Linear, sliced, and F.scaled_dot_product_attention); seq_first: x is (L, B, E) and the MHA has
    batch_first=False."""

    def __init__(self, d, heads, attention="mha", seq_first=False, causal=False, padding=None,
                 need_weights=False, act="gelu"):
        super().__init__()
        self.d, self.heads, self.attention, self.seq_first = d, heads, attention, seq_first
        self.causal, self.need_weights = causal, need_weights
        self.ln1 = nn.LayerNorm(d)
        if attention == "mha":
            self.attn = nn.MultiheadAttention(d, heads, batch_first=not seq_first)
        else:
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2_weight, self.ln2_bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.act = nn.GELU() if act == "gelu" else nn.Tanh()
        self.padding = padding  # (1, S) bool, True = ignore that key (MHA only)

    def forward(self, x, mask=None, pad=None):
        h = self.ln1(x)
        if self.attention == "mha":
            a = self.attn(h, h, h, key_padding_mask=pad, attn_mask=mask, need_weights=self.need_weights)[0]
        else:
            b, n, _ = x.shape
            d, hd = self.d, self.d // self.heads
            qkv = self.qkv(h)
            q, k, v = qkv[:, :, :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
            q, k, v = (t.reshape(b, n, self.heads, hd).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            a = self.proj(o.transpose(1, 2).reshape(b, n, d))
        x = x + a
        y = F.layer_norm(x, (self.d,), self.ln2_weight, self.ln2_bias, 1e-5)   # the functional form
        return x + self.fc2(self.act(self.fc1(y)))


class TinyTransformer(nn.Module):
    """Tokens (B, L, din) -> embedding, class token (expanded, concatenated), positional
    embedding, blocks, LayerNorm, class token x[:, 0] (or the mean over tokens), head."""

    def __init__(self, din=6, d=16, heads=2, layers=2, classes=5, tokens=7, pool="cls", **block):
        super().__init__()
        self.pool, self.seq_first = pool, block.get("seq_first", False)
        self.embed = nn.Linear(din, d)
        self.cls = nn.Parameter(0.5 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.5 * torch.randn(1, tokens + 1, d))
        self.blocks = nn.ModuleList([Block(d, heads, **block) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        s = tokens + 1
        self.register_buffer("mask", torch.triu(torch.ones(s, s, dtype=torch.bool), 1) if block.get("causal") else None)
        pad = torch.zeros(1, s, dtype=torch.bool)
        pad[0, -2:] = True
        self.register_buffer("pad", pad if block.get("padding") else None)

    def forward(self, x):
        b = x.shape[0]
        x = self.embed(x)
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos
        pad = None if self.pad is None else self.pad.expand(b, -1)
        mask = None if self.mask is None or self.blocks[0].attention != "mha" else self.mask
        if self.seq_first:
            x = x.transpose(0, 1)
        for blk in self.blocks:
            x = blk(x, mask, pad)
        x = self.norm(x)
        if self.seq_first:
            return self.head(x[0])
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(dim=1))


def randomize(model, scale=0.2):
    """Non-trivial biases and LayerNorm affines (torch initialises them to 0 and 1)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if ("ln" in name or "norm" in name) and "weight" in name else 0.0
                p.copy_(base + scale * torch.randn(p.shape, generator=g))
        if hasattr(model, "heads"):      # torchvision's ViT starts with a zero head
            model.heads.head.weight.normal_(0, 0.3, generator=g)
    return model


def zero_shifts(model):
    """Zero biases, LayerNorm β, class token and positional embedding: nothing absorbs relevance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "pos" in name or name.endswith("cls") or "class_token" in name:
                p.zero_()
    return model


# ============================================================================= the oracle (by hand)


def ref_layer_norm(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    sd = ((x - mu) ** 2).mean(-1, keepdim=True).add(eps).sqrt().detach()     # σ constant
    y = (x - mu) / sd
    return y if weight is None else y * weight + bias


def ref_act(f, x):
    return x * (f(x) / x).detach()                                            # identity rule


ATTENTION_RULE = ["cp"]   # the rule the oracle models: oracle(..., attention=) sets it


def half_product(a, b):
    """a @ b whose gradient reaches each factor at half weight: AttnLRP's uniform rule."""
    return 0.5 * (a @ b.detach() + a.detach() @ b)


def ref_attention(q, k, v, additive=None):
    """(B, H, L, hd) each. CP-LRP: A detached (constant). AttnLRP: both products uniform, the
    softmax differentiated as it is."""
    attnlrp = ATTENTION_RULE[0] == "attnlrp"
    scores = (half_product if attnlrp else torch.matmul)(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if additive is not None:
        scores = scores + additive
    a = torch.softmax(scores, -1)
    return half_product(a, v) if attnlrp else a.detach() @ v


def neg_inf(mask):
    return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask, float("-inf"))


def ref_mha(m, q, k, v, attn_mask=None, pad=None):
    """nn.MultiheadAttention on batch-first (B, L, E) inputs, with A detached."""
    e, h = m.embed_dim, m.num_heads
    wq, wk, wv = m.in_proj_weight.split(e)
    bq, bk, bv = m.in_proj_bias.split(e)
    b, n, _ = q.shape
    s = k.shape[1]
    heads = lambda t, length: t.reshape(b, length, h, e // h).transpose(1, 2)  # noqa: E731
    additive = None
    if attn_mask is not None:
        additive = neg_inf(attn_mask).to(q.dtype)
    if pad is not None:
        kp = neg_inf(pad).to(q.dtype).view(b, 1, 1, s)
        additive = kp if additive is None else additive + kp
    o = ref_attention(heads(q @ wq.T + bq, n), heads(k @ wk.T + bk, s), heads(v @ wv.T + bv, s), additive)
    return o.transpose(1, 2).reshape(b, n, e) @ m.out_proj.weight.T + m.out_proj.bias


def ref_tiny(model, x):
    b = x.shape[0]
    x = x @ model.embed.weight.T + model.embed.bias
    x = torch.cat([model.cls.expand(b, -1, -1), x], 1) + model.pos
    pad = None if model.pad is None else model.pad.expand(b, -1)
    for blk in model.blocks:
        h = ref_layer_norm(x, blk.ln1.weight, blk.ln1.bias, blk.ln1.eps)
        if blk.attention == "mha":
            a = ref_mha(blk.attn, h, h, h, model.mask, pad)
        else:
            d, hd = blk.d, blk.d // blk.heads
            q, k, v = (h @ blk.qkv.weight.T + blk.qkv.bias).split(d, -1)
            q, k, v = (t.reshape(b, -1, blk.heads, hd).transpose(1, 2) for t in (q, k, v))
            n = q.shape[2]
            additive = neg_inf(torch.triu(torch.ones(n, n, dtype=torch.bool), 1)).to(x.dtype) if blk.causal else None
            o = ref_attention(q, k, v, additive)
            a = o.transpose(1, 2).reshape(b, n, d) @ blk.proj.weight.T + blk.proj.bias
        x = x + a
        y = ref_layer_norm(x, blk.ln2_weight, blk.ln2_bias, 1e-5)
        f = F.gelu if isinstance(blk.act, nn.GELU) else torch.tanh
        x = x + blk.fc2(ref_act(f, blk.fc1(y)))
    x = ref_layer_norm(x, model.norm.weight, model.norm.bias, model.norm.eps)
    return model.head(x[:, 0] if model.pool == "cls" else x.mean(1))


def ref_vit(m, x):
    """torchvision's VisionTransformer, re-implemented with σ and A detached."""
    n = x.shape[0]
    x = m.conv_proj(x).reshape(n, m.hidden_dim, -1).permute(0, 2, 1)
    x = torch.cat([m.class_token.expand(n, -1, -1), x], 1) + m.encoder.pos_embedding
    for blk in m.encoder.layers:
        h = ref_layer_norm(x, blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
        x = x + ref_mha(blk.self_attention, h, h, h)
        y = ref_layer_norm(x, blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
        x = x + blk.mlp[3](ref_act(F.gelu, blk.mlp[0](y)))
    x = ref_layer_norm(x, m.encoder.ln.weight, m.encoder.ln.bias, m.encoder.ln.eps)
    return m.heads(x[:, 0])


def oracle(ref, model, x, t, attention="cp"):
    """x ⊙ ∂f_t/∂x of the modified model."""
    x = x.detach().clone().requires_grad_(True)
    ATTENTION_RULE[0] = attention
    try:
        with torch.enable_grad():
            (g,) = torch.autograd.grad(ref(model, x).gather(1, t[:, None]).sum(), x)
    finally:
        ATTENTION_RULE[0] = "cp"
    return (x * g).detach()


VARIANTS = {
    "mha": dict(),
    "mha_mean_pool": dict(pool="mean"),
    "mha_causal_padding_weights": dict(causal=True, padding=True, need_weights=True, pool="mean"),
    "mha_seq_first": dict(seq_first=True),
    "sdpa": dict(attention="sdpa"),
    "sdpa_causal": dict(attention="sdpa", causal=True, pool="mean"),   # causal: the class token sees only itself
}


def tiny(variant="mha", dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return randomize(TinyTransformer(**{**VARIANTS[variant], **kw})).to(dtype).eval()


def small_vit(dtype=torch.float64, layers=2):
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=layers, num_heads=2,
                                             hidden_dim=16, mlp_dim=32, num_classes=5)
    return randomize(m).to(dtype).eval()


# ============================================================================= against the oracle


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_transformer_equals_modified_gradient_times_input(variant):
    model = tiny(variant)
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    t = torch.tensor([0, 3, 4])
    with torch.no_grad():                              # the oracle's forward is the model's
        assert rel_l2(ref_tiny(model, x), model(x)) < 1e-13
    want = oracle(ref_tiny, model, x, t)
    assert rel_l2(lrpfast.LRP(model, eps=0.0)(x, t), want) < 1e-12
    got = lrpfast.LRP(model, eps=1e-12)(x, t)
    assert got.shape == x.shape and rel_l2(got, want) < 1e-6    # the difference is O(ε / min |z|)


@pytest.mark.parametrize("stabilizer", ["sign", "plus"])
def test_vit_equals_modified_gradient_times_input(stabilizer):
    model = small_vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    t = torch.tensor([1, 3])
    with torch.no_grad():
        assert rel_l2(ref_vit(model, x), model(x)) < 1e-13
    want = oracle(ref_vit, model, x, t)
    assert rel_l2(lrpfast.LRP(model, eps=0.0, stabilizer=stabilizer)(x, t), want) < 1e-12
    assert rel_l2(lrpfast.LRP(model, eps=1e-12, stabilizer=stabilizer)(x, t), want) < 1e-6
    # a larger ε moves the map: the oracle test can fail
    assert rel_l2(lrpfast.LRP(model, eps=1e-2, stabilizer=stabilizer)(x, t), want) > 1e-4


def test_each_rule_can_fail_the_oracle():
    """Attention weights or σ left in the gradient (not detached) give another map: the oracle
    pins those choices down."""
    model = tiny("mha")
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    t = torch.tensor([1, 2])
    got = lrpfast.LRP(model, eps=0.0)(x, t)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg).gather(1, t[:, None]).sum(), xg)   # plain gradient × input
    assert rel_l2(got, x * g) > 1e-2


class Cross(nn.Module):
    """Cross-attention with separate query, key and value nodes, kdim and vdim != embed_dim."""

    def __init__(self):
        super().__init__()
        self.fq, self.fk, self.fv = nn.Linear(6, 8), nn.Linear(6, 5), nn.Linear(6, 7)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=5, vdim=7)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(self.fq(x), self.fk(x[:, :4]), self.fv(x[:, :4]))[0].mean(dim=1))


def ref_cross(model, x):
    m = model.attn
    bq, bk, bv = m.in_proj_bias.split(8)
    heads = lambda t: t.reshape(t.shape[0], t.shape[1], 2, 4).transpose(1, 2)  # noqa: E731
    q = heads(model.fq(x) @ m.q_proj_weight.T + bq)
    k = heads(model.fk(x[:, :4]) @ m.k_proj_weight.T + bk)
    v = heads(model.fv(x[:, :4]) @ m.v_proj_weight.T + bv)
    o = ref_attention(q, k, v).transpose(1, 2).reshape(x.shape[0], -1, 8)
    return model.head((o @ m.out_proj.weight.T + m.out_proj.bias).mean(1))


def test_cross_attention_sends_relevance_to_the_value_node_only():
    torch.manual_seed(0)
    model = randomize(Cross()).double().eval()
    x = torch.randn(3, 6, 6, dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    lrp = lrpfast.LRP(model, eps=0.0)
    assert rel_l2(lrp(x, t), oracle(ref_cross, model, x, t)) < 1e-12
    e = lrp.explain(x, t, keep_layers=True)
    assert "fv" in e.layers and "fq" not in e.layers and "fk" not in e.layers
    assert e.layers["attn"].shape == (3, 4, 7)                     # at the value input (vdim 7)
    assert e.relevance[:, 4:].abs().max() == 0                     # rows only the query saw


# ============================================================================= AttnLRP


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attnlrp_equals_its_modified_gradient_times_input(variant):
    """attention="attnlrp": the products A V and Q Kᵀ split evenly, the softmax's own gradient."""
    model = tiny(variant)
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    t = torch.tensor([0, 3, 4])
    want = oracle(ref_tiny, model, x, t, attention="attnlrp")
    lrp = lrpfast.LRP(model, eps=0.0, attention="attnlrp")
    assert rel_l2(lrp(x, t), want) < 1e-12
    assert rel_l2(lrpfast.LRP(model, eps=1e-12, attention="attnlrp")(x, t), want) < 1e-6
    # the two rules give different maps, each its own oracle's: either test can fail
    assert rel_l2(lrpfast.LRP(model, eps=0.0)(x, t), want) > 1e-2
    assert rel_l2(oracle(ref_tiny, model, x, t), want) > 1e-2
    assert "attention='attnlrp'" in repr(lrp)


@pytest.mark.parametrize("stabilizer", ["sign", "plus"])
def test_attnlrp_vit(stabilizer):
    model = small_vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    t = torch.tensor([1, 3])
    want = oracle(ref_vit, model, x, t, attention="attnlrp")
    assert rel_l2(lrpfast.LRP(model, eps=0.0, stabilizer=stabilizer, attention="attnlrp")(x, t), want) < 1e-12
    assert rel_l2(lrpfast.LRP(model, eps=1e-12, stabilizer=stabilizer, attention="attnlrp")(x, t), want) < 1e-6


def test_attnlrp_cross_attention_reaches_query_and_key():
    torch.manual_seed(0)
    model = randomize(Cross()).double().eval()
    x = torch.randn(3, 6, 6, dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    lrp = lrpfast.LRP(model, eps=0.0, attention="attnlrp")
    assert rel_l2(lrp(x, t), oracle(ref_cross, model, x, t, attention="attnlrp")) < 1e-12
    e = lrp.explain(x, t, keep_layers=True)
    assert {"fq", "fk", "fv"} <= set(e.layers)
    assert e.layers["attn"][0].shape == (3, 4, 7)                  # value input first (vdim 7), ...
    assert {m.shape for m in e.layers["attn"][1:]} == {(3, 6, 8), (3, 4, 5)}   # ... then query, key
    assert e.relevance[:, 4:].abs().max() > 0                      # rows only the query saw


@pytest.mark.parametrize("variant", ["mha", "sdpa", "mha_seq_first", "mha_causal_padding_weights"])
def test_attnlrp_k_targets_and_chunks(variant):
    model = tiny(variant)
    x = torch.randn(5, 7, 6, dtype=torch.float64)
    t = torch.stack([torch.randperm(5)[:3] for _ in range(5)])
    lrp = lrpfast.LRP(model, attention="attnlrp")
    both = lrp(x, t)
    for k in range(3):
        assert rel_l2(both[:, k], lrp(x, t[:, k])) < 1e-12
    chunked = lrpfast.LRP(model, attention="attnlrp", batch_size=2)
    assert rel_l2(chunked(x, t), both) < 1e-12


@pytest.mark.parametrize("variant", ["mha", "sdpa"])
def test_attnlrp_float32_and_bfloat16_agree_with_float64(variant):
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    t = torch.tensor([1, 2, 3])
    want = lrpfast.LRP(tiny(variant, torch.float64), attention="attnlrp")(x, t)
    f32 = lrpfast.LRP(tiny(variant, torch.float32), attention="attnlrp")(x.float(), t)
    assert f32.dtype == torch.float32 and rel_l2(f32, want) < 1e-4
    bf16 = lrpfast.LRP(tiny(variant, torch.bfloat16), attention="attnlrp")(x.bfloat16(), t)
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all() and rel_l2(bf16, want) < 0.2


def test_attnlrp_memory_profile_counts_query_and_key():
    model = tiny("mha", dtype=torch.float32, layers=2, tokens=31)
    x = torch.randn(3, 31, 6)
    cp, attn = lrpfast.LRP(model, memory_budget="1GiB"), lrpfast.LRP(model, memory_budget="1GiB", attention="attnlrp")
    d, heads, n = 16, 2, 32
    # two blocks keep the query and key projections (n x d each) besides what CP-LRP keeps
    assert attn._profile(x)[0] - cp._profile(x)[0] == 2 * 2 * n * d * 4
    # and the relevance pass holds two attention-sized tensors per map in one block at a time
    assert attn._profile(x)[3] == 2 * heads * n * n * 4 and cp._profile(x)[3] == 0
    # a budget CP-LRP fits 3 samples into takes fewer with AttnLRP when its scratch outgrows the maps
    total, largest, _, scratch = attn._profile(x)
    assert scratch > 2 * largest
    budget = 3 * (total + 3 * largest)
    assert lrpfast.LRP(model, memory_budget=budget, attention="attnlrp")._chunk(x, 1) < 3


def test_attention_rule_is_checked():
    with pytest.raises(RelevanceError, match=r"LRP: attention must be one of \('cp', 'attnlrp'\), got 'attn'"):
        lrpfast.LRP(tiny("mha"), attention="attn")


# ============================================================================= conservation


@pytest.mark.parametrize("affine", ["module", "none", "functional"])
def test_layer_norm_conserves_with_zero_beta(affine):
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 12, bias=False), nn.Linear(12, 3, bias=False)
            self.ln = nn.LayerNorm(12, elementwise_affine=affine != "none")
            self.gamma = nn.Parameter(1 + 0.3 * torch.randn(12))

        def forward(self, x):
            h = self.fc1(x)
            h = F.layer_norm(h, (12,), self.gamma, None) if affine == "functional" else self.ln(h)
            return self.fc2(h)

    model = Net().double().eval()
    if affine == "module":
        with torch.no_grad():
            model.ln.weight.normal_(1, 0.3)
            model.ln.bias.zero_()
    x = torch.randn(4, 8, dtype=torch.float64)
    e = lrpfast.LRP(model, eps=1e-12).explain(x)
    node = "layer_norm" if affine == "functional" else "ln"
    assert torch.allclose(e.conservation[node], e.conservation["fc2"], rtol=1e-9, atol=0)
    assert torch.allclose(e.conservation["x"], e.conservation["output"], rtol=1e-9, atol=0)
    # β ≠ 0 absorbs a share: conservation breaks, the map follows the oracle still
    if affine == "module":
        with torch.no_grad():
            model.ln.bias.normal_(0, 1.0)
        e = lrpfast.LRP(model, eps=1e-12).explain(x)
        assert not torch.allclose(e.conservation["ln"], e.conservation["fc2"], rtol=1e-3, atol=0)


@pytest.mark.parametrize("which", ["mha", "sdpa", "mha_seq_first", "vit"])
def test_conservation_without_shifts(which):
    """Zero biases, β = 0, zero class token and positional embedding, ε tiny: Σ R_in = the logit,
    and Σ R is the same at every node's input."""
    model = zero_shifts(small_vit() if which == "vit" else tiny(which))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64) if which == "vit" else torch.randn(2, 7, 6, dtype=torch.float64)
    lrp = lrpfast.LRP(model, eps=1e-12)
    e = lrp.explain(x, keep_layers=True)
    out = e.conservation["output"]
    assert out.abs().min() > 1e-3
    assert torch.allclose(e.conservation["x"], out, rtol=1e-8, atol=0)
    assert torch.allclose(e.relevance.flatten(1).sum(1), out, rtol=1e-8, atol=0)
    # layer by layer: what a node sends to its inputs is what arrives at its output
    steps, checked = lrp.plan.steps, 0
    for step in steps:
        if step.name not in e.conservation or step.index == lrp.plan.input:
            continue
        arrived = out if step.index == lrp.plan.output else 0
        for u in dict.fromkeys(step.users):
            user = steps[u]
            if user.name not in e.layers:
                continue
            maps = e.layers[user.name]
            maps = maps if isinstance(maps, tuple) else (maps,)
            receiving = [i for i in user.inputs
                         if steps[i].tensor_output and not isinstance(steps[i], lrpfast.nodes.ConstStep)]
            for pos, i in enumerate(receiving):
                if i == step.index:
                    arrived = arrived + maps[pos].flatten(1).sum(1)
        assert torch.allclose(e.conservation[step.name], arrived, rtol=1e-8, atol=1e-10), step.name
        checked += 1
    assert checked >= 15


# ============================================================================= the LRP machinery


@pytest.mark.parametrize("variant", ["mha", "sdpa", "mha_seq_first"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_k_targets_equal_k_single_calls(variant, dtype, tol):
    model = tiny(variant, dtype)
    x = torch.randn(4, 7, 6, dtype=dtype)
    t = torch.stack([torch.randperm(5)[:3] for _ in range(4)])
    lrp = lrpfast.LRP(model)
    both = lrp(x, t)
    e = lrp.explain(x, t, keep_layers=True)
    assert both.shape == (4, 3, 7, 6)
    for k in range(3):
        single = lrp(x, t[:, k])
        assert rel_l2(both[:, k], single) < tol
        assert rel_l2(e.relevance[:, k], single) < tol


@pytest.mark.parametrize("variant", ["mha_causal_padding_weights", "sdpa_causal", "mha_seq_first"])
def test_chunked_equals_one_pass(variant):
    model = tiny(variant)
    x = torch.randn(5, 7, 6, dtype=torch.float64)
    t = torch.randint(0, 5, (5, 2))
    whole, chunked = lrpfast.LRP(model), lrpfast.LRP(model, batch_size=2)
    assert chunked._chunk(x, 2) == 2
    assert rel_l2(chunked(x, t), whole(x, t)) < 1e-12
    a, b = chunked.explain(x, keep_layers=True), whole.explain(x, keep_layers=True)
    assert a.layers.keys() == b.layers.keys()
    for n in b.conservation:
        assert torch.allclose(a.conservation[n], b.conservation[n], rtol=1e-12, atol=1e-14), n


@pytest.mark.parametrize("variant", ["mha", "sdpa"])
def test_memory_profile_counts_the_attention_weights(variant):
    """memory_budget's per-sample estimate includes what attention keeps for the relevance pass:
    A (heads x L x L) per block, plus the value projection and A·V for nn.MultiheadAttention."""
    model = tiny(variant, dtype=torch.float32, layers=2, tokens=31)
    x = torch.randn(3, 31, 6)
    lrp = lrpfast.LRP(model, memory_budget="1GiB")
    total, largest, _, scratch = lrp._profile(x)
    assert scratch == 0                                       # CP-LRP: nothing attention-sized
    outputs = []
    lrpfast.graph.forward(lrp.plan, x[:1], sizes=outputs)
    d, heads, n = 16, 2, 32   # TinyTransformer's width and heads; 31 tokens + the class token
    per_block = heads * n * n + (2 * n * d if variant == "mha" else 0)
    assert total - sum(outputs) == 2 * per_block * 4   # two blocks, float32
    assert largest == max(outputs)
    # a budget that holds 3 samples' outputs (and relevance maps) but not their attention weights
    # too: the batch is split
    budget = 3 * (sum(outputs) + 3 * largest)
    assert budget < 3 * (total + 3 * largest)
    assert lrpfast.LRP(model, memory_budget=budget)._chunk(x, 1) < 3


def test_explain_layers_of_the_new_nodes():
    model = small_vit(layers=1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    lrp = lrpfast.LRP(model)
    e = lrp.explain(x, keep_layers=True)
    ops = {s.name: s.op for s in lrp.plan.steps}
    names = {op: [n for n, o in ops.items() if o == op] for op in set(ops.values())}
    attn = names["MultiheadAttention"][0]
    assert e.layers[attn].shape == (2, 17, 16)                      # relevance at the value input
    for ln in names["LayerNorm"]:
        assert e.layers[ln].shape == (2, 17, 16)
    cls = names["getitem (slicing)"][0]                           # x[:, 0]: scattered back to (B, L, E)
    assert e.layers[cls].shape == (2, 17, 16) and e.layers[cls][:, 1:].abs().max() == 0
    cat = e.layers[names["cat"][0]]
    assert cat.shape == (2, 16, 16)                               # the patches only; the class token: none
    assert e.layers[names["add"][0]].shape == (2, 17, 16)         # + pos_embedding: the tokens only
    for n in ("class_token", "encoder_pos_embedding", "expand"):  # constants: never relevance
        assert n not in e.layers and n not in e.conservation and n not in lrp.node_names
    text = repr(lrp)
    assert "LayerNorm" in text and "MultiheadAttention" in text


def test_indexing_forms_equal_gradient_times_input():
    """x[:, 0], x[..., 1:], x[:, :, None], x[:, 1:3, ::2]: LRP-0 of a linear model is gradient × input."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(5, 3), nn.Linear(4 * 4, 3), nn.Linear(2 * 3, 3)

        def forward(self, x):                        # x (B, 4, 5)
            p = self.a(x[:, 0])
            q = self.b(x[..., 1:][:, :, None].flatten(1))
            r = self.c(x[:, 1:3, ::2].reshape(x.shape[0], -1))
            return p + q + r

    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    t = torch.tensor([0, 2, 1])
    got = lrpfast.LRP(model, eps=0.0)(x, t)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg).gather(1, t[:, None]).sum(), xg)
    assert rel_l2(got, x * g) < 1e-12
    ops = [s.op for s in lrpfast.LRP(model).plan.steps]
    assert ops.count("getitem (slicing)") == 4


@pytest.mark.parametrize("variant", ["mha", "sdpa", "mha_seq_first"])
def test_float32_and_bfloat16_agree_with_float64(variant):
    ref = lrpfast.LRP(tiny(variant, torch.float64))
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    t = torch.tensor([1, 2, 3])
    want = ref(x, t)
    f32 = lrpfast.LRP(tiny(variant, torch.float32))(x.float(), t)
    assert f32.dtype == torch.float32 and rel_l2(f32, want) < 1e-4
    bf16 = lrpfast.LRP(tiny(variant, torch.bfloat16))(x.bfloat16(), t)
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all() and rel_l2(bf16, want) < 0.2


def test_composites_apply_outside_attention():
    model = tiny("mha", torch.float32)
    lrp = lrpfast.LRP(model, composite="epsilon_plus")
    rules = lrp.rules()
    assert "embed" in rules and "head" in rules and not any("attn" in n for n in rules)
    r = lrp(torch.randn(2, 7, 6))
    assert torch.isfinite(r).all() and r.shape == (2, 7, 6)


def test_compile_fullgraph_aot_eager():
    dynamo = pytest.importorskip("torch._dynamo")
    dynamo.reset()
    try:
        for variant in ("mha", "sdpa", "mha_seq_first"):
            lrp = lrpfast.LRP(tiny(variant, torch.float32))
            x = torch.randn(3, 7, 6)
            compiled = torch.compile(lambda x: lrp(x), fullgraph=True, backend="aot_eager")
            assert rel_l2(compiled(x), lrp(x)) < 1e-5
    finally:
        dynamo.reset()


# ============================================================================= what is refused


class Attn(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **kw)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x)[0].mean(dim=1))


class SDPA(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.scaled_dot_product_attention(x, x, x, **self.kw).mean(dim=1))


class IndexBy(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.register_buffer("idx", torch.tensor([0, 2]))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if self.how == "buffer":
            x = x[:, self.idx]
        elif self.how == "batch":
            x = x[0]
        elif self.how == "batch_slice":
            x = x[1:]
        return self.head(x.mean(dim=1))


class MaskFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, attn_mask=x[0, :, :5])[0].mean(dim=1))


@pytest.mark.parametrize("model,match", [
    (Attn(add_bias_kv=True), r"node 'attn' \(MultiheadAttention\) uses add_bias_kv=True"),
    (Attn(add_zero_attn=True), r"node 'attn' \(MultiheadAttention\) uses add_zero_attn=True"),
    (SDPA(dropout_p=0.1), r"node 'scaled_dot_product_attention' .*dropout_p=0.1"),
    (MaskFromInput(), r"node 'attn': attn_mask is computed from the input"),
])
def test_refused_at_construction(model, match):
    with pytest.raises(RelevanceError, match=match):
        lrpfast.LRP(model)


def test_constant_index_buffer_is_a_copy_of_relevance():
    """x[:, idx] with a constant index buffer (refused once): the tokens it picks get their relevance."""
    from lrpfast.oracle import gradient_oracle
    torch.manual_seed(5)
    model = IndexBy("buffer").double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    t = model(x).argmax(1)
    r = lrpfast.LRP(model, eps=0.0).explain(x, t).relevance
    want = gradient_oracle(model, x, t)
    assert ((r - want).norm() / want.norm()).item() < 1e-12
    assert r[:, [1, 3, 4]].abs().max().item() == 0.0 and r[:, [0, 2]].abs().min().item() > 0.0


@pytest.mark.parametrize("model,match", [
    (IndexBy("batch"), r"node 'getitem' \(getitem \(slicing\)\) indexes \(0,\), which does not keep the batch"),
    (IndexBy("batch_slice"), r"node 'getitem' .* does not keep the batch"),
])
def test_refused_at_call(model, match):
    with pytest.raises(RelevanceError, match=match):
        lrpfast.LRP(model)(torch.randn(2, 5, 8))


def test_attention_dropout_in_training_mode_is_refused():
    model = Attn(dropout=0.1).train()
    with pytest.raises(RelevanceError, match=r"module 'attn' \(MultiheadAttention\) is in training mode.*model.eval"):
        lrpfast.LRP(model)(torch.randn(2, 5, 8))
    assert torch.isfinite(lrpfast.LRP(model.eval())(torch.randn(2, 5, 8))).all()


def test_batch_first_mismatch_is_refused():
    """A batch_first=False attention fed (B, L, E) would attend across samples."""

    class Wrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].mean(dim=1))

    with pytest.raises(RelevanceError, match=r"batch_first=False, but its query has the batch at dim 0"):
        lrpfast.LRP(Wrong())(torch.randn(2, 5, 8))


def test_output_with_the_batch_moved_is_refused():
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 3)

        def forward(self, x):              # (B, 3) -> (3, B) logits: the batch is not first
            return self.head(x).transpose(0, 1)

    with pytest.raises(RelevanceError, match=r"model output .* has the batch at dim 1"):
        lrpfast.LRP(Transposed())(torch.randn(3, 8))


def test_moved_batch_reaches_an_unsupported_step():
    class SeqFlatten(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(10, 3)

        def forward(self, x):            # (L, B, E) flattened to (L, B*E): samples would mix
            return self.head(x.transpose(0, 1).flatten(1).transpose(0, 1))

    with pytest.raises(RelevanceError, match=r"node 'flatten' \(Tensor.flatten\) needs the batch dimension first, "
                                              r"but node 'transpose' \(Tensor.transpose\) has it at dim 1"):
        lrpfast.LRP(SeqFlatten())(torch.randn(2, 5, 2))


class SeqFirst(nn.Module):
    """Sequence-first from the embedding on: (B, L, din) -> (L, B, d), the class token prepended
    with cat(dim=0), positional embedding (L+1, 1, d), batch_first=False blocks, then the mean over
    the tokens (dim 0, keepdim or not) or the class token x[0]."""

    def __init__(self, din=6, d=16, heads=2, tokens=7, classes=5, pool="mean"):
        super().__init__()
        self.pool = pool
        self.embed = nn.Linear(din, d)
        self.cls = nn.Parameter(0.5 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.5 * torch.randn(tokens + 1, 1, d))
        self.blocks = nn.ModuleList([Block(d, heads, seq_first=True) for _ in range(2)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.embed(x).transpose(0, 1)                                  # (L, B, d)
        x = torch.cat([self.cls.expand(-1, x.shape[1], -1), x], dim=0) + self.pos
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if self.pool == "mean":
            return self.head(x.mean(dim=0))
        if self.pool == "mean_keepdim":
            return self.head(x.mean(0, keepdim=True)[0])
        return self.head(x[0])


def ref_seq_first(model, x):
    """SeqFirst, batch-first, with the CP-LRP/AttnLRP modifications of the oracle."""
    b = x.shape[0]
    x = x @ model.embed.weight.T + model.embed.bias
    x = torch.cat([model.cls.expand(b, -1, -1), x], 1) + model.pos.transpose(0, 1)
    for blk in model.blocks:
        x = x + ref_mha(blk.attn, *(ref_layer_norm(x, blk.ln1.weight, blk.ln1.bias, blk.ln1.eps),) * 3)
        y = ref_layer_norm(x, blk.ln2_weight, blk.ln2_bias, 1e-5)
        x = x + blk.fc2(ref_act(F.gelu, blk.fc1(y)))
    x = ref_layer_norm(x, model.norm.weight, model.norm.bias, model.norm.eps)
    return model.head(x[:, 0] if model.pool == "cls" else x.mean(1))


@pytest.mark.parametrize("pool", ["mean", "mean_keepdim", "cls"])
@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_sequence_first_cat_and_mean(pool, attention):
    """cat(dim=0) and mean(dim=0) with the batch at dim 1 take their relevance step batch-first."""
    torch.manual_seed(0)
    model = randomize(SeqFirst(pool=pool)).double().eval()
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    t = torch.tensor([0, 3, 4])
    with torch.no_grad():
        assert rel_l2(ref_seq_first(model, x), model(x)) < 1e-13
    lrp = lrpfast.LRP(model, eps=0.0, attention=attention)
    want = oracle(ref_seq_first, model, x, t, attention=attention)
    assert rel_l2(lrp(x, t), want) < 1e-12
    e = lrp.explain(x, torch.stack([t, (t + 1) % 5], 1), keep_layers=True)
    assert rel_l2(e.relevance[:, 0], want) < 1e-12
    assert e.layers["cat"].shape == (3, 2, 7, 16)               # batch-first: the tokens, not the class token
    if pool != "cls":
        assert e.layers["mean"].shape == (3, 2, 8, 16)


def test_concatenating_along_a_moved_batch_is_refused():
    class CatBatch(nn.Module):
        def forward(self, x):
            x = x.transpose(0, 1)                                         # (L, B, E)
            return torch.cat([x, x], dim=1).transpose(0, 1).mean(1)

    with pytest.raises(RelevanceError, match=r"node 'cat' \(cat\) concatenates along the batch dimension"):
        lrpfast.LRP(CatBatch())(torch.randn(2, 5, 3))


# ============================================================================= torchvision's vit_b_16


@pytest.fixture(scope="module")
def vit_b_16():
    torch.manual_seed(0)
    m = torchvision.models.vit_b_16(weights=None).eval()
    with torch.no_grad():
        m.heads.head.weight.normal_(0, 0.02)       # torchvision starts it at 0 (all logits 0)
    return m


def test_vit_b_16_end_to_end(vit_b_16):
    x = torch.randn(2, 3, 224, 224)
    lrp = lrpfast.LRP(vit_b_16)
    e = lrp.explain(x, target=torch.tensor([[1, 7], [3, 999]]))
    assert e.relevance.shape == (2, 2, 3, 224, 224) and torch.isfinite(e.relevance).all()
    with torch.no_grad():
        assert rel_l2(e.logits, vit_b_16(x)) < 1e-5
    frac = e.conservation["x"] / e.conservation["output"]
    assert torch.isfinite(frac).all() and (frac.abs() < 100).all()
    single = lrp(x, torch.tensor([7, 999]))
    assert rel_l2(single, e.relevance[:, 1]) < 1e-4


def test_vit_b_16_float32_matches_the_float64_oracle(vit_b_16):
    x = torch.randn(1, 3, 224, 224)
    t = torch.tensor([5])
    got = lrpfast.LRP(vit_b_16, eps=1e-9)(x, t)
    m64 = vit_b_16.double()
    try:
        want = oracle(ref_vit, m64, x.double(), t)
    finally:
        vit_b_16.float()
    assert rel_l2(got, want) < 1e-3


# ============================================================================= multi-query attention:
# key and value with one head, broadcast in SDPA against 4 query heads (timm's MobileNetV5
# MultiQueryAttention2d); or one query head against 4 key/value heads


class MultiQuery(nn.Module):
    def __init__(self, kv_heads=1, q_heads=4, expand=False):
        super().__init__()
        self.kv_heads, self.q_heads, self.expand = kv_heads, q_heads, expand
        self.q, self.k, self.v = nn.Linear(6, 4 * q_heads), nn.Linear(6, 4 * kv_heads), nn.Linear(6, 4 * kv_heads)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        B, L, _ = x.shape
        q = self.q(x).reshape(B, L, self.q_heads, 4).transpose(1, 2)
        k = self.k(x).reshape(B, L, self.kv_heads, 4).transpose(1, 2)
        v = self.v(x).reshape(B, L, self.kv_heads, 4).transpose(1, 2)
        if self.expand:   # the broadcast written out: expand's transpose sums the heads' relevance
            q, k, v = (t.expand(-1, 4, -1, -1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.head(o.transpose(1, 2).reshape(B, L, -1).mean(1))


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
@pytest.mark.parametrize("heads", [(1, 4), (4, 1)])
def test_sdpa_broadcast_heads_equal_the_oracle_and_the_expanded_model(attention, heads):
    from lrpfast.oracle import gradient_oracle
    torch.manual_seed(0)
    model = MultiQuery(*heads).double().eval()
    expanded = MultiQuery(*heads, expand=True).double().eval()
    expanded.load_state_dict(model.state_dict())
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    t = torch.tensor([0, 2, 1])
    lrp = lrpfast.LRP(model, eps=0.0, attention=attention)
    e = lrp.explain(x, t)
    assert rel_l2(e.logits, model(x)) < 1e-14
    assert rel_l2(e.relevance, gradient_oracle(model, x, t, attention=attention)) < 1e-12
    assert rel_l2(e.relevance, lrpfast.LRP(expanded, eps=0.0, attention=attention)(x, t)) < 1e-12
    both = lrp(x, torch.tensor([[0, 2], [1, 1], [2, 0]]))     # K = 2 maps per sample in one pass
    assert rel_l2(both[:, 1], lrp(x, torch.tensor([2, 1, 0]))) < 1e-13


# ============================================================================= grouped-query
# attention: SDPA(enable_gqa=True), 4 query heads over 2 key/value heads (HF's GQA models call it so
# when no mask is given); against the same model with the key/value heads repeated by hand


class GroupedQuery(nn.Module):
    def __init__(self, mask=None, causal=False, by_hand=False, q_heads=4, kv_heads=2):
        super().__init__()
        self.q_heads, self.kv_heads, self.causal, self.by_hand = q_heads, kv_heads, causal, by_hand
        self.q, self.k, self.v = nn.Linear(6, 4 * q_heads), nn.Linear(6, 4 * kv_heads), nn.Linear(6, 4 * kv_heads)
        self.head = nn.Linear(4 * q_heads, 3)
        self.register_buffer("mask", mask)

    def forward(self, x):
        B, L, _ = x.shape
        q = self.q(x).reshape(B, L, self.q_heads, 4).transpose(1, 2)
        k = self.k(x).reshape(B, L, self.kv_heads, 4).transpose(1, 2)
        v = self.v(x).reshape(B, L, self.kv_heads, 4).transpose(1, 2)
        if self.by_hand:
            g = self.q_heads // self.kv_heads
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                               attn_mask=self.mask, is_causal=self.causal)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal, enable_gqa=True)
        return self.head(o.transpose(1, 2).reshape(B, L, -1).mean(1))


def _gqa_masks():
    g = torch.Generator().manual_seed(3)
    return {"none": None, "causal": "causal",
            "float (1, 4, L, L)": torch.randn(1, 4, 5, 5, generator=g, dtype=torch.float64),
            "float (L, L)": torch.randn(5, 5, generator=g, dtype=torch.float64),
            "bool (1, 1, L, L)": (torch.rand(1, 1, 5, 5, generator=g) > 0.3) | torch.eye(5, dtype=torch.bool)}


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
@pytest.mark.parametrize("mask", list(_gqa_masks()))
def test_sdpa_enable_gqa_equals_the_oracle_and_heads_repeated_by_hand(attention, mask):
    from lrpfast.oracle import gradient_oracle
    m = _gqa_masks()[mask]
    causal = isinstance(m, str)
    m = None if causal else m
    torch.manual_seed(0)
    model = GroupedQuery(m, causal).double().eval()
    by_hand = GroupedQuery(m, causal, by_hand=True).double().eval()
    by_hand.load_state_dict(model.state_dict())
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    t = torch.tensor([0, 2, 1])
    lrp = lrpfast.LRP(model, eps=0.0, attention=attention)
    e = lrp.explain(x, t)
    assert rel_l2(e.logits, by_hand(x)) < 1e-14
    want = lrpfast.LRP(by_hand, eps=0.0, attention=attention)(x, t)
    assert rel_l2(e.relevance, want) < 1e-12
    assert rel_l2(e.relevance, gradient_oracle(model, x, t, attention=attention)) < 1e-12
    both = lrp(x, torch.tensor([[0, 2], [1, 1], [2, 0]]))     # K = 2 maps per sample in one pass
    assert rel_l2(both[:, 1], lrp(x, torch.tensor([2, 1, 0]))) < 1e-13
    eps = lrpfast.LRP(model, eps=0.1, attention=attention)(x, t)     # ε > 0: the same rule as by hand
    assert rel_l2(eps, lrpfast.LRP(by_hand, eps=0.1, attention=attention)(x, t)) < 1e-12


def test_sdpa_enable_gqa_refuses_heads_that_do_not_divide():
    model = GroupedQuery(q_heads=3, kv_heads=2).eval()
    with pytest.raises(RelevanceError, match=r"enable_gqa=True expects .* a multiple"):
        lrpfast.LRP(model)(torch.randn(2, 5, 6))


# ============================================================================= LayerNorm over one
# element: x − mean(x) = 0, the output is the bias whatever x is (timm's csatv2 normalises 1-channel
# tokens, and the q, k, v computed from them meet across the batch: (B, N) @ (N, B)). A constant.


class OneElementNorm(nn.Module):
    def __init__(self, functional=False):
        super().__init__()
        self.functional = functional
        self.inp, self.norm, self.qkv, self.head = nn.Linear(6, 5), nn.LayerNorm(1), nn.Linear(1, 3), nn.Linear(5, 3)

    def forward(self, x):
        h = self.inp(x)                                                    # (B, 5)
        t = h.unsqueeze(-1)                                                # (B, 5, 1)
        t = F.layer_norm(t, (1,), self.norm.weight, self.norm.bias) if self.functional else self.norm(t)
        q, k, v = self.qkv(t).unbind(-1)                                   # (B, 5) each
        a = (q @ k.transpose(-1, -2)).softmax(-1)                          # (B, B): across the batch
        return self.head(torch.relu(h + a @ v))


@pytest.mark.parametrize("functional", [False, True])
def test_layer_norm_over_one_element_is_a_constant(functional):
    from lrpfast.oracle import gradient_oracle
    torch.manual_seed(0)
    model = OneElementNorm(functional).double().eval()
    nn.init.normal_(model.norm.bias)
    x = torch.randn(3, 6, dtype=torch.float64)
    t = torch.tensor([0, 2, 1])
    e = lrpfast.LRP(model, eps=0.0).explain(x, t)
    assert rel_l2(e.logits, model(x)) < 1e-14
    assert rel_l2(e.relevance, gradient_oracle(model, x, t)) < 1e-12
    # the closed form: z = h + c with c = a @ v a constant (a bias; the norm's output is its bias),
    # then relu (relevance passes) and the head: R_x = Σ_j x W_j · R_z_j / z_j
    with torch.no_grad():
        h = model.inp(x)
        q, k, v = model.qkv(model.norm.bias.expand(3, 5, 1)).unbind(-1)
        z = h + (q @ k.T).softmax(-1) @ v
        r_z = torch.relu(z) * model.head.weight[t]
        want = (x.unsqueeze(1) * model.inp.weight) * (r_z / z).unsqueeze(-1)
    assert rel_l2(e.relevance, want.sum(1)) < 1e-12


class ConstantOutput(nn.Module):
    """Logits computed from x through a LayerNorm over one element: the same for every x."""

    def __init__(self, buffer=False):
        super().__init__()
        self.buffer = buffer
        self.norm, self.head = nn.LayerNorm(1), nn.Linear(4, 3)
        self.register_buffer("table", torch.randn(1, 4))

    def forward(self, x):
        if self.buffer:   # no path from x at all: a tracing accident, refused
            return self.head(self.table.expand(x.shape[0], -1))
        return self.head(self.norm(x.unsqueeze(-1)).squeeze(-1))


def test_logits_constant_in_x_get_a_zero_map_and_a_buffer_is_refused():
    from lrpfast.oracle import gradient_oracle
    torch.manual_seed(0)
    model = ConstantOutput().double().eval()
    nn.init.normal_(model.norm.bias)
    x = torch.randn(3, 4, dtype=torch.float64)
    e = lrpfast.LRP(model, eps=0.0).explain(x, torch.tensor([0, 2, 1]))
    assert rel_l2(e.logits, model(x)) < 1e-14
    assert e.relevance.shape == x.shape and e.relevance.abs().max() == 0
    assert gradient_oracle(model, x, torch.tensor([0, 2, 1])).abs().max() == 0
    with pytest.raises(RelevanceError, match="a constant \\(it does not depend on the input\\)"):
        lrpfast.LRP(ConstantOutput(buffer=True).double().eval())(x)
