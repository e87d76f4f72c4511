"""Hugging Face transformers models, unmodified, through lrpfast.hf (lrpfast/hf.py).

Every model is a tiny random configuration in float64 and eval mode. What is checked, against
values computed another way:
- the explained logits equal the model's own output (model(input_ids, attention_mask).logits, the
  row at each sample's last real token for causal LMs);
- the relevance equals gradient x input of the detach-rule model (lrpfast.oracle.gradient_oracle)
  at eps = 0, for attention="cp" and "attnlrp", on a padded batch. The function the oracle
  differentiates is written here (`Reference`), not taken from lrpfast.hf. Models whose norms
  upcast to float32 inside (Llama, Qwen, Mistral, Gemma: HF's RMSNorm) agree to float32 rounding;
  with the norm computed in float64 (patched here, test-side) they agree to 1e-12;
- a padded batch gives each sample the map it gets alone, the padding exactly 0;
- the mask is data: a second mask of the same shape gives the map of a fresh explainer.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install lrpfast[hf])")

import lrpfast.hf as H  # noqa: E402
from lrpfast.ops import RelevanceError  # noqa: E402
from lrpfast.oracle import gradient_oracle  # noqa: E402

F64 = torch.float64
V = 128
DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)
ENC = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=64, num_labels=3)


def _build(name):
    T = transformers
    return {
        "bert": lambda: T.BertForSequenceClassification(T.BertConfig(**ENC)),
        "distilbert": lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=V, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64, num_labels=3)),
        "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
            **{**ENC, "max_position_embeddings": 70}, pad_token_id=1)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**DEC)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**DEC)),
        "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**DEC, head_dim=8)),
        # sliding windows shorter than the sequence: their masks are exercised too
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**DEC, sliding_window=4)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**DEC, head_dim=8)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**DEC, head_dim=8, sliding_window=4)),
        "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**DEC, head_dim=8, sliding_window=4)),
        "vit": lambda: T.ViTForImageClassification(T.ViTConfig(
            image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_labels=5)),
    }[name]()


TOKEN_MODELS = ["bert", "distilbert", "roberta", "gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2",
                "gemma3"]
CAUSAL = {"gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3"}
FLOAT32_NORMS = {"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3"}   # HF's RMSNorm upcasts
_MODELS = {}


def model(name):
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = _build(name).to(F64).eval()
    return _MODELS[name]


def tokens(b=3, n=7, seed=1, side="right"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    for i in range(1, b):   # sample i has n - 2i real tokens (at least 2)
        k = max(2, n - 2 * i)
        if side == "right":
            mask[i, k:] = 0
        else:
            mask[i, :n - k] = 0
    return ids, mask


class Reference(torch.nn.Module):
    """The explained function, written independently of lrpfast.hf: the model on the embeddings,
    the logits of each sample's last real token (causal LMs) or the class logits."""

    def __init__(self, m, mask=None, key="inputs_embeds"):
        super().__init__()
        self.m, self.mask, self.key = m, mask, key

    def forward(self, x):
        kwargs = {self.key: x}
        if self.mask is not None:
            kwargs["attention_mask"] = self.mask
        out = self.m(**kwargs).logits
        if out.dim() == 3:
            out = out[torch.arange(out.shape[0]), self.mask.shape[1] - 1 - self.mask.flip(1).argmax(1)]
        return out


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def model_logits(m, ids, mask):
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask).logits
    if out.dim() == 3:
        out = out[torch.arange(ids.shape[0]), mask.shape[1] - 1 - mask.flip(1).argmax(1)]
    return out


# ----------------------------------------------------------------------------- logits and oracle


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
@pytest.mark.parametrize("name", TOKEN_MODELS)
def test_token_models_equal_the_oracle(name, attention):
    m = model(name)
    ids, mask = tokens()
    e = H.LRP(m, eps=0.0, attention=attention)(ids, mask)
    want = model_logits(m, ids, mask)
    assert e.logits.shape == want.shape
    assert (e.logits - want).abs().max() <= 1e-10 * want.abs().max()
    emb = m.get_input_embeddings()(ids).detach()
    assert torch.equal(e.embeddings, emb)
    oracle = gradient_oracle(Reference(m, mask), emb, e.targets, attention=attention)
    assert e.relevance.shape == emb.shape and e.tokens.shape == ids.shape
    assert rel_err(e.relevance, oracle) <= (2e-6 if name in FLOAT32_NORMS else 1e-10)
    assert torch.allclose(e.tokens, e.relevance.sum(-1), rtol=0, atol=0)
    assert e.targets.tolist() == want.argmax(1).tolist()
    if name in CAUSAL:
        assert e.positions.tolist() == (mask.sum(1) - 1).tolist()
    else:
        assert e.positions is None
    # the padding gets none
    assert e.relevance[mask == 0].abs().max().item() == 0.0 if (mask == 0).any() else True


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_eager_attention_equals_the_oracle(name, attention):
    """HF's eager attention written out: GPT-2 masks its scores with torch.where (COPY) and casts
    with .type(); the Llama family takes softmax(..., dtype=float32) (another dtype than the float64
    model: the rule's z is the float32 output) and casts back with .to(). Same tolerances as SDPA."""
    torch.manual_seed(0)
    m = _build(name).to(F64).eval()
    m.config._attn_implementation = "eager"
    ids, mask = tokens()
    e = H.LRP(m, eps=0.0, attention=attention)(ids, mask)
    want = model_logits(m, ids, mask)
    assert (e.logits - want).abs().max() <= 1e-10 * want.abs().max()
    emb = m.get_input_embeddings()(ids).detach()
    oracle = gradient_oracle(Reference(m, mask), emb, e.targets, attention=attention)
    assert rel_err(e.relevance, oracle) <= (2e-6 if name in FLOAT32_NORMS else 1e-10)
    assert e.relevance[mask == 0].abs().max().item() == 0.0


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_exact_with_float64_norms(name, attention, monkeypatch):
    """The ~1e-7 gap of the RMSNorm models is HF's float32 upcast: with the norm in float64
    (patched here, for the test) the map equals the oracle to float64 rounding."""
    mod = __import__(f"transformers.models.{name}.modeling_{name}", fromlist=["x"])
    cls = {"llama": "LlamaRMSNorm", "gemma3": "Gemma3RMSNorm"}[name]

    def llama(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def gemma(self, h):
        return self._norm(h) * (1.0 + self.weight)

    monkeypatch.setattr(getattr(mod, cls), "forward", llama if name == "llama" else gemma)
    m = model(name)
    ids, mask = tokens()
    e = H.LRP(m, eps=0.0, attention=attention)(ids, mask)
    assert (e.logits - model_logits(m, ids, mask)).abs().max() <= 1e-12
    oracle = gradient_oracle(Reference(m, mask), m.get_input_embeddings()(ids).detach(), e.targets,
                             attention=attention)
    assert rel_err(e.relevance, oracle) <= 1e-12


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_vit_pixels_equal_the_oracle(attention):
    m = model("vit")
    x = torch.randn(2, 3, 16, 16, dtype=F64, generator=torch.Generator().manual_seed(3))
    e = H.LRP(m, eps=0.0, attention=attention)(pixel_values=x)
    with torch.no_grad():
        want = m(pixel_values=x).logits
    assert (e.logits - want).abs().max() <= 1e-10 * want.abs().max()
    assert e.tokens is None and e.positions is None and e.relevance.shape == x.shape
    oracle = gradient_oracle(Reference(m, key="pixel_values"), x, e.targets, attention=attention)
    assert rel_err(e.relevance, oracle) <= 1e-10


# ----------------------------------------------------------------------------- padding and masks


@pytest.mark.parametrize("name", TOKEN_MODELS)
def test_padded_batch_gives_each_sample_its_map_alone(name):
    m = model(name)
    ids, mask = tokens(b=3, n=8)
    lrp = H.LRP(m, eps=1e-9, attention="attnlrp")
    e = lrp(ids, mask)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        alone = lrp(ids[i:i + 1, :n])
        assert alone.targets.item() == e.targets[i].item()
        assert rel_err(e.relevance[i, :n], alone.relevance[0]) <= (1e-6 if name in FLOAT32_NORMS else 1e-10)
        assert e.relevance[i, n:].abs().max().item() == 0.0 if n < ids.shape[1] else True


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "gemma3"])
def test_the_mask_is_data_not_part_of_the_trace(name):
    """Two masks of one shape (left padding: a causal LM's last token sees the padding) on one
    explainer: the second call equals a fresh explainer's and the model's own logits."""
    m = model(name)
    ids, _ = tokens(b=2, n=7)
    m1 = torch.ones(2, 7, dtype=torch.long)
    m1[1, :4] = 0
    m2 = torch.ones(2, 7, dtype=torch.long)
    m2[0, :3] = 0
    lrp = H.LRP(m, eps=1e-9)
    first = lrp(ids, m1)
    second = lrp(ids, m2)
    fresh = H.LRP(m, eps=1e-9)(ids, m2)
    assert torch.equal(second.relevance, fresh.relevance)
    assert (second.logits - model_logits(m, ids, m2)).abs().max() <= 1e-10
    assert (first.relevance - second.relevance).abs().max() > 1e-6   # the masks do matter here
    if name in CAUSAL:   # (BERT's pooled first token is padding here: it sees the others itself)
        assert second.relevance[0, :3].abs().max().item() == 0.0 and second.relevance[1].abs().max() > 0


# ----------------------------------------------------------------------------- targets and positions


def test_k_targets_equal_single_calls():
    m = model("llama")
    ids, mask = tokens()
    lrp = H.LRP(m, eps=1e-9)
    t = torch.tensor([[3, 5, 7]] * ids.shape[0])
    e = lrp(ids, mask, target=t)
    assert e.relevance.shape == (3, 3, 7, 32) and e.tokens.shape == (3, 3, 7)
    for k in range(3):
        one = lrp(ids, mask, target=t[:, k])
        assert torch.allclose(e.relevance[:, k], one.relevance, rtol=1e-12, atol=1e-15)


def test_position_and_target_pick_the_explained_logit():
    m = model("gpt2")
    ids, mask = tokens()
    lrp = H.LRP(m, eps=0.0)
    e = lrp(ids, mask, position=1, target=9)
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(e.logits, out[:, 1], rtol=1e-12, atol=1e-14)
    assert e.targets.tolist() == [9, 9, 9] and e.positions.tolist() == [1, 1, 1]
    assert e.relevance[:, 2:].abs().max().item() == 0.0     # causal: later tokens cannot matter
    # position -2: the token before each sample's last real one
    e2 = lrp(ids, mask, position=-2)
    assert e2.positions.tolist() == (mask.sum(1) - 2).tolist()
    # a position per sample
    e3 = lrp(ids, mask, position=torch.tensor([0, 2, 1]))
    assert torch.allclose(e3.logits, out[torch.arange(3), torch.tensor([0, 2, 1])], rtol=1e-12, atol=1e-14)


def test_explain_tokens_caches_and_batch_size_splits():
    m = model("qwen2")
    ids, mask = tokens(b=4)
    e = H.explain_tokens(m, ids, mask, eps=1e-9)
    again = H.explain_tokens(m, ids, mask, eps=1e-9)
    assert torch.equal(e.relevance, again.relevance)
    assert len(H._CACHE[m]) == 1
    split = H.LRP(m, eps=1e-9, batch_size=3)(ids, mask)
    assert torch.allclose(split.relevance, e.relevance, rtol=1e-6, atol=1e-12)


# ----------------------------------------------------------------------------- the model is left alone


def test_the_model_is_left_as_it_was():
    m = model("gemma2")
    ids, mask = tokens()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    attrs = {id(mod): dict(vars(mod)) for mod in m.modules()}
    impl = m.config._attn_implementation
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask).logits
    H.LRP(m, attention="cp")(ids, mask)
    H.LRP(m, attention="attnlrp")(ids, mask)   # a second trace in the same process
    assert m.config._attn_implementation == impl
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    for mod in m.modules():
        assert set(vars(mod)) == set(attrs[id(mod)]), type(mod).__name__
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules())
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids, attention_mask=mask).logits, out)
    # torch's factories are the real ones again after tracing
    assert type(torch.arange(3)) is torch.Tensor and torch.full((2,), 1.0).sum().item() == 2.0


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error():
    m = model("llama")
    lrp = H.LRP(m)
    ids, mask = tokens()
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        lrp(ids.double())
    with pytest.raises(RelevanceError, match="outside the vocabulary"):
        lrp(ids + V)
    with pytest.raises(RelevanceError, match="attention_mask has shape"):
        lrp(ids, mask[:, :3])
    with pytest.raises(RelevanceError, match="0 \\(padding\\) and 1"):
        lrp(ids, mask * 2)
    with pytest.raises(RelevanceError, match="has no token"):
        lrp(ids, mask * 0)
    with pytest.raises(RelevanceError, match="is not one of its tokens"):
        lrp(ids, mask, position=6)   # sample 1 is padding there
    with pytest.raises(RelevanceError, match="not both"):
        lrp(ids, pixel_values=torch.zeros(1, 3, 4, 4, dtype=F64))
    with pytest.raises(RelevanceError, match="takes no 'pixel_values'"):
        lrp(pixel_values=torch.zeros(1, 3, 4, 4, dtype=F64))
    with pytest.raises(RelevanceError, match="no get_input_embeddings"):
        H.LRP(torch.nn.Linear(2, 2))(ids)


def test_plain_lrp_points_to_lrpfast_hf():
    import lrpfast

    with pytest.raises(RelevanceError, match="lrpfast.hf.LRP"):
        lrpfast.LRP(model("vit"))


# ----------------------------------------------------------------------------- the plan of a Llama


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma"])
def test_rotary_norms_and_head_are_one_step_each(name):
    """lrpfast/fusion.py: the rotary embedding and the written-out RMSNorm are one step each, the
    LM head runs on the explained row of each sample only, the mask's constants are computed once
    per mask; the map still equals the oracle at eps = 0 and a new mask is not served stale."""
    from lrpfast import fusion

    m = model(name)
    ids, mask = tokens()
    lrp = H.LRP(m, eps=0.0, attention="attnlrp")
    e = lrp(ids, mask)
    plan = lrp._explainers["inputs_embeds"][1].plan
    kinds = [type(s).__name__ for s in plan.steps]
    assert kinds.count("RotaryStep") == 2 * m.config.num_hidden_layers
    assert kinds.count("ScaleChainStep") >= 2 * m.config.num_hidden_layers + 1
    head = next(s for s in plan.steps if s.op == "Linear" and s.module is m.lm_head)
    assert plan.steps[head.src].name.endswith("_rows")           # the gather comes first
    assert any(isinstance(s, fusion.Elided) for s in plan.steps)
    oracle = gradient_oracle(Reference(m, mask), e.embeddings, e.targets, attention="attnlrp")
    assert rel_err(e.relevance, oracle) <= 2e-6
    again = lrp(ids, mask)                                           # cached constants: same map
    assert torch.equal(again.relevance, e.relevance)
    m2 = mask.clone()
    m2[0, -2:] = 0
    fresh = H.LRP(m, eps=0.0, attention="attnlrp")(ids, m2)
    assert torch.allclose(lrp(ids, m2).relevance, fresh.relevance, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma"])
@pytest.mark.parametrize("k", [1, 2])
def test_recomputed_outputs_equal_kept_ones(name, k, monkeypatch):
    """lrpfast/nodes/remat.py: SwiGLU/GeGLU's product, the RMSNorms read by Linears
    and the rotary embeddings read by attention keep no output for the relevance pass, AttnLRP's
    attention keeps no weights; the relevance pass recomputes them bit for bit: the same map as
    with all of them kept (K = 1 and 2 maps per sample, eps > 0)."""
    from lrpfast import fusion

    m = model(name)
    ids, mask = tokens()
    target = torch.tensor([[3, 5]] * ids.shape[0]) if k == 2 else None

    def run():
        lrp = H.LRP(m, eps=1e-6, attention="attnlrp")
        return lrp(ids, mask, target=target), lrp._explainers["inputs_embeds"][1].plan

    e, plan = run()
    recomputed = [type(s).__name__ for s in plan.steps if s.remat]
    layers = m.config.num_hidden_layers
    assert recomputed.count("MulStep") == layers                     # the gated MLP's product
    # the query's rotary embedding (the key's is read by the grouped-query repeat: kept)
    assert recomputed.count("RotaryStep") >= layers
    # (Gemma's norms multiply by 1 + weight, a computed constant: kept)
    assert recomputed.count("ScaleChainStep") >= (layers if name != "gemma" else 0)
    with monkeypatch.context() as mp:
        mp.setattr(fusion, "rematerialize", lambda plan: None)
        before, plan0 = run()
    assert not any(s.remat for s in plan0.steps)
    assert torch.equal(e.relevance, before.relevance)
    assert torch.equal(e.logits, before.logits)
