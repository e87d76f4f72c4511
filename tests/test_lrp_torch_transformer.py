"""torch.nn's own transformer modules: nn.TransformerEncoderLayer / nn.TransformerEncoder (and the
decoder pair), which the tracer replaces by their slow path written from their pieces
(lrpfast/graph/trace.py). Checked against the module's own forward (eval, no autograd: what LRP runs)
and against the CP-LRP oracle of tests/test_lrp_transformers.py (gradient × input of a
hand-written copy with σ and A detached and activations x·(f(x)/x).detach()), and its AttnLRP twin.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrpfast
from lrpfast.ops import RelevanceError

from .test_lrp_transformers import oracle, randomize, ref_act, ref_layer_norm, ref_mha, rel_l2, zero_shifts

TOKENS = 6


def _quiet(fn, *a, **k):
    """nn.TransformerEncoder warns at construction when the nested-tensor path is off (norm_first...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*a, **k)


class Classifier(nn.Module):
    """Tokens (B, L, 5) -> Linear embedding -> nn.TransformerEncoder(2 layers, LayerNorm) -> mean
    over tokens or token 0 -> Linear head. Masks are buffers: `causal` an (L, L) attention mask,
    `padding` a (1, L) key padding mask (the last two tokens) expanded to the batch; `float_masks`
    gives both as additive float masks. batch_first=False: the model transposes to (L, B, E)."""

    def __init__(self, d=8, heads=2, activation="relu", norm_first=False, batch_first=True, causal=False,
                 padding=False, float_masks=False, pool="mean", norm=True, **encoder):
        super().__init__()
        self.pool, self.batch_first = pool, batch_first
        self.embed = nn.Linear(5, d)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, activation=activation, norm_first=norm_first,
                                           batch_first=batch_first)
        self.encoder = _quiet(nn.TransformerEncoder, layer, 2, norm=nn.LayerNorm(d) if norm else None, **encoder)
        self.head = nn.Linear(d, 4)
        mask = torch.triu(torch.ones(TOKENS, TOKENS, dtype=torch.bool), 1) if causal else None
        pad = torch.zeros(1, TOKENS, dtype=torch.bool)
        pad[0, -2:] = True
        pad = pad if padding else None
        if float_masks:
            mask, pad = (None if m is None else torch.zeros(m.shape).masked_fill(m, float("-inf")) for m in (mask, pad))
        self.register_buffer("mask", mask)
        self.register_buffer("pad", pad)

    def forward(self, x):
        h = self.embed(x)
        pad = None if self.pad is None else self.pad.expand(x.shape[0], -1)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h, mask=self.mask, src_key_padding_mask=pad)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(dim=1) if self.pool == "mean" else h[:, 0])


def _bool(mask):
    return mask if mask is None or mask.dtype == torch.bool else mask != 0   # -inf: masked out


def ref_encoder_layer(layer, x, mask, pad):
    """nn.TransformerEncoderLayer's slow path, batch-first, σ and A detached."""
    ln = lambda n, t: ref_layer_norm(t, n.weight, n.bias, n.eps)  # noqa: E731
    sa = lambda t: ref_mha(layer.self_attn, t, t, t, mask, pad)  # noqa: E731
    ff = lambda t: layer.linear2(ref_act(layer.activation, layer.linear1(t)))  # noqa: E731
    if layer.norm_first:
        x = x + sa(ln(layer.norm1, x))
        return x + ff(ln(layer.norm2, x))
    x = ln(layer.norm1, x + sa(x))
    return ln(layer.norm2, x + ff(x))


def ref_classifier(model, x):
    enc = model.encoder
    mask, pad = _bool(model.mask), _bool(model.pad)
    pad = None if pad is None else pad.expand(x.shape[0], -1)
    h = model.embed(x)
    for layer in enc.layers:
        h = ref_encoder_layer(layer, h, mask, pad)
    if enc.use_nested_tensor and pad is not None and mask is None:
        h = h.masked_fill(pad[..., None], 0.0)   # no autograd: the nested-tensor path zeroes padded tokens
    if enc.norm is not None:
        h = ref_layer_norm(h, enc.norm.weight, enc.norm.bias, enc.norm.eps)
    return model.head(h.mean(1) if model.pool == "mean" else h[:, 0])


VARIANTS = {
    "relu_str": dict(),
    "gelu_str_cls": dict(activation="gelu", pool="cls"),
    "gelu_fn_norm_first": dict(activation=F.gelu, norm_first=True),
    "relu_module": dict(activation=nn.ReLU()),
    "gelu_module_causal": dict(activation=nn.GELU(), causal=True),
    "padding": dict(padding=True),                       # the nested-tensor path
    "padding_float": dict(padding=True, float_masks=True),
    "padding_norm_first": dict(padding=True, norm_first=True, activation="gelu"),   # no nested tensors
    "causal_padding_float": dict(causal=True, padding=True, float_masks=True),
    "padding_no_nested": dict(padding=True, enable_nested_tensor=False),
    "seq_first_padding_causal": dict(batch_first=False, padding=True, causal=True),
    "seq_first_cls_no_norm": dict(batch_first=False, pool="cls", norm=False),
}


def classifier(variant="relu_str", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return randomize(Classifier(**VARIANTS[variant])).to(dtype).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encoder_classifier_equals_module_and_oracle(variant):
    model = classifier(variant)
    x = torch.randn(3, TOKENS, 5, dtype=torch.float64)
    t = torch.tensor([0, 3, 2])
    with torch.no_grad():
        want_logits = model(x)
        assert rel_l2(ref_classifier(model, x), want_logits) < 1e-13     # the oracle's forward is the model's
    lrp = lrpfast.LRP(model, eps=0.0)
    e = lrp.explain(x, t)
    assert (e.logits - want_logits).abs().max() < 1e-12
    want = oracle(ref_classifier, model, x, t)
    assert rel_l2(e.relevance, want) < 1e-12
    assert rel_l2(lrpfast.LRP(model, eps=1e-12)(x, t), want) < 1e-6
    if model.pad is not None:
        # the nested-tensor path drops the padded tokens: no relevance; the slow path (the mean
        # pools their outputs) gives them some
        nested = model.encoder.use_nested_tensor and model.mask is None
        assert (e.relevance[:, -2:].abs().max() == 0) == nested


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encoder_classifier_attnlrp_equals_its_oracle(variant):
    """attention="attnlrp" through torch's encoder layers: the oracle with both attention products
    split evenly and the softmax's own gradient (tests/test_lrp_transformers.py)."""
    model = classifier(variant)
    x = torch.randn(3, TOKENS, 5, dtype=torch.float64)
    t = torch.tensor([0, 3, 2])
    want = oracle(ref_classifier, model, x, t, attention="attnlrp")
    assert rel_l2(lrpfast.LRP(model, eps=0.0, attention="attnlrp")(x, t), want) < 1e-12
    assert rel_l2(lrpfast.LRP(model, eps=0.0)(x, t), want) > 1e-3


def test_padding_follows_the_modules_nested_tensor_path():
    """Without autograd an eval TransformerEncoder with a padding mask zeroes the padded tokens
    (nested tensors), with autograd (or the fast path off) it computes them: LRP follows the
    module as it runs under torch.no_grad, with the module's own switches."""
    model = classifier("padding")
    x = torch.randn(2, TOKENS, 5, dtype=torch.float64)
    with torch.no_grad():
        nested = model(x)
    slow = model(x).detach()
    assert rel_l2(slow, nested) > 1e-2                     # mean pooling sees the difference
    lrp = lrpfast.LRP(model)
    assert rel_l2(lrp.explain(x).logits, nested) < 1e-13
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        assert rel_l2(lrp.explain(x).logits, slow) < 1e-13
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


@pytest.mark.parametrize("variant", ["padding", "seq_first_padding_causal"])
def test_k_targets_and_chunks(variant):
    model = classifier(variant)
    x = torch.randn(5, TOKENS, 5, dtype=torch.float64)
    t = torch.stack([torch.randperm(4)[:3] for _ in range(5)])
    whole, chunked = lrpfast.LRP(model), lrpfast.LRP(model, batch_size=2)
    assert chunked._chunk(x, 3) == 2
    both = whole(x, t)
    assert both.shape == (5, 3, TOKENS, 5)
    for k in range(3):
        assert rel_l2(both[:, k], whole(x, t[:, k])) < 1e-12
    assert rel_l2(chunked(x, t), both) < 1e-12


def test_layer_names_and_conservation():
    """explain().layers is keyed by the sub-layers' module paths; with no biases, β = 0 and ε
    tiny, Σ R is the logit at every node on the main path (a residual's inputs together)."""
    model = zero_shifts(classifier("gelu_str_cls"))
    x = torch.randn(2, TOKENS, 5, dtype=torch.float64)
    lrp = lrpfast.LRP(model, eps=1e-12)
    e = lrp.explain(x, keep_layers=True)
    for i in (0, 1):
        for part in ("self_attn", "self_attn_out", "dropout1", "residual1", "norm1", "linear1", "activation",
                     "dropout", "linear2", "dropout2", "residual2", "norm2"):
            assert f"encoder_layers_{i}_{part}" in e.layers, part
    assert "encoder_norm" in e.layers and e.layers["encoder_layers_1_self_attn"].shape == (2, TOKENS, 8)
    assert set(lrp.rules()) == {"embed", "head"} | {f"encoder_layers_{i}_linear{j}" for i in (0, 1) for j in (1, 2)}
    out = e.conservation["output"]
    assert out.abs().min() > 1e-3
    main = [n for n in e.conservation if n in ("x", "embed", "getitem", "head") or "norm" in n or "residual" in n]
    assert len(main) == 2 * 4 + 5   # x, embed, the encoder's norm, the class token, head
    for name in main:
        assert torch.allclose(e.conservation[name], out, rtol=1e-8, atol=0), name


def test_float32():
    x = torch.randn(3, TOKENS, 5, dtype=torch.float64)
    t = torch.tensor([1, 2, 3])
    want = lrpfast.LRP(classifier("padding"))(x, t)
    got = lrpfast.LRP(classifier("padding", torch.float32))(x.float(), t)
    assert got.dtype == torch.float32 and rel_l2(got, want) < 1e-4


# ============================================================================= decoder


class EncoderDecoder(nn.Module):
    """One input: the embedded tokens are the encoder's source and the decoder's target (causal)."""

    def __init__(self, d=8, norm_first=False):
        super().__init__()
        self.embed = nn.Linear(5, d)
        enc = nn.TransformerEncoderLayer(d, 2, 16, batch_first=True, norm_first=norm_first)
        dec = nn.TransformerDecoderLayer(d, 2, 16, batch_first=True, norm_first=norm_first, activation="gelu")
        self.encoder = _quiet(nn.TransformerEncoder, enc, 1)
        self.decoder = nn.TransformerDecoder(dec, 2, norm=nn.LayerNorm(d))
        self.head = nn.Linear(d, 4)
        self.register_buffer("causal", torch.triu(torch.ones(TOKENS, TOKENS, dtype=torch.bool), 1))

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.decoder(h, self.encoder(h), tgt_mask=self.causal)[:, -1])


def ref_encoder_decoder(model, x):
    ln = lambda n, t: ref_layer_norm(t, n.weight, n.bias, n.eps)  # noqa: E731
    h = model.embed(x)
    mem = ref_encoder_layer(model.encoder.layers[0], h, None, None)
    for lay in model.decoder.layers:
        sa = lambda t: ref_mha(lay.self_attn, t, t, t, model.causal)  # noqa: E731
        ca = lambda t: ref_mha(lay.multihead_attn, t, mem, mem)  # noqa: E731
        ff = lambda t: lay.linear2(ref_act(F.gelu, lay.linear1(t)))  # noqa: E731
        if lay.norm_first:
            h = h + sa(ln(lay.norm1, h))
            h = h + ca(ln(lay.norm2, h))
            h = h + ff(ln(lay.norm3, h))
        else:
            h = ln(lay.norm1, h + sa(h))
            h = ln(lay.norm2, h + ca(h))
            h = ln(lay.norm3, h + ff(h))
    h = ln(model.decoder.norm, h)
    return model.head(h[:, -1])


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_equals_module_and_oracle(norm_first):
    torch.manual_seed(0)
    model = randomize(EncoderDecoder(norm_first=norm_first)).double().eval()
    x = torch.randn(3, TOKENS, 5, dtype=torch.float64)
    t = torch.tensor([1, 0, 3])
    lrp = lrpfast.LRP(model, eps=0.0)
    e = lrp.explain(x, t, keep_layers=True)
    with torch.no_grad():
        assert rel_l2(ref_encoder_decoder(model, x), model(x)) < 1e-13
        assert (e.logits - model(x)).abs().max() < 1e-12
    assert rel_l2(e.relevance, oracle(ref_encoder_decoder, model, x, t)) < 1e-12
    assert "decoder_layers_1_multihead_attn" in e.layers and "decoder_layers_0_residual3" in e.layers
    # AttnLRP: the cross-attention's queries (decoder) and keys (encoder memory) take relevance too
    want = oracle(ref_encoder_decoder, model, x, t, attention="attnlrp")
    assert rel_l2(lrpfast.LRP(model, eps=0.0, attention="attnlrp")(x, t), want) < 1e-12


# ============================================================================= what is refused


class PaddingFromInput(nn.Module):
    def __init__(self, is_causal=None):
        super().__init__()
        self.is_causal = is_causal
        self.encoder = _quiet(nn.TransformerEncoder, nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if self.is_causal:
            return self.head(self.encoder(x, is_causal=True).mean(dim=1))
        return self.head(self.encoder(x, src_key_padding_mask=x[..., 0]).mean(dim=1))   # a float mask


def test_padding_mask_from_the_input_is_refused():
    with pytest.raises(RelevanceError, match=r"node 'encoder_layers_0_self_attn': key_padding_mask is computed "
                                             r"from the input"):
        lrpfast.LRP(PaddingFromInput().eval())


def test_is_causal_without_a_mask_is_refused():
    """The module itself raises here (is_causal is only a hint to nn.MultiheadAttention)."""
    model = PaddingFromInput(is_causal=True).eval()
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 4, 8))
    with pytest.raises(RelevanceError, match=r"node 'encoder_layers_0_self_attn': is_causal=True needs attn_mask"):
        lrpfast.LRP(model)


def test_padding_not_left_aligned_without_mask_check_is_refused():
    model = classifier("padding")
    model.encoder.mask_check = False
    with torch.no_grad():
        model.pad.copy_(torch.tensor([[True, False, False, False, False, True]]))
    with pytest.raises(RelevanceError, match=r"node 'encoder_padding' \(TransformerEncoder padding\).*not "
                                             r"left-aligned.*enable_nested_tensor=False"):
        lrpfast.LRP(model)(torch.randn(2, TOKENS, 5, dtype=torch.float64))
    model.encoder.mask_check = True          # the module checks, and computes every token: so does LRP
    x = torch.randn(2, TOKENS, 5, dtype=torch.float64)
    with torch.no_grad():
        assert rel_l2(lrpfast.LRP(model).explain(x).logits, model(x)) < 1e-13


def test_training_mode_dropout_is_refused():
    model = classifier("relu_str").train()
    with pytest.raises(RelevanceError, match=r"module 'encoder.layers.0.self_attn' \(MultiheadAttention\) is in "
                                             r"training mode.*model.eval\(\)"):
        lrpfast.LRP(model)(torch.randn(2, TOKENS, 5, dtype=torch.float64))


def test_subclass_with_its_own_forward_is_traced_as_written():
    class Scaled(nn.TransformerEncoderLayer):
        def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
            return 2 * super().forward(src, src_mask, src_key_padding_mask, is_causal)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = Scaled(8, 2, 16, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.layer(x).mean(dim=1))

    lrp = lrpfast.LRP(Net().eval())   # its fast-path checks branch on tensors: refused at the first call
    with pytest.raises(RelevanceError, match=r"could not trace Net with torch.fx"):
        lrp(torch.randn(2, 5, 8))
