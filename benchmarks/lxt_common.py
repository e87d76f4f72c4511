"""What benchmarks/lxt_parity.py and benchmarks/llama_speed.py share: tiny Hugging Face models from
configs (random weights, no download), LXT's AttnLRP applied and undone within one process, and
the per-token relevance LXT computes.

LXT 2.1's efficient mode (lxt/efficient/patches.py, models/*.py) patches *classes and modelling
modules* globally (LlamaMLP.forward, LlamaRMSNorm.forward, torch.nn.LayerNorm.forward,
torch.nn.Dropout.forward, modeling_llama.ALL_ATTENTION_FUNCTIONS; for BERT every attribute of
modeling_bert is replaced by LXT's copy of it). `LxtPatch` snapshots what the patch map touches and
switches between LXT's and the original attributes, so lrpfast (which traces the unpatched modules) and LXT run side by side in
one process, and one model family's patches never leak into the next.

What LXT computes (read from its source, the rules the parity check compares):
- Linear layers: plain gradient x input, i.e. LRP-0 (no ε anywhere in a Linear).
- Elementwise activations (MLP act, BERT pooler tanh): the identity rule, as a gradient
  f(x)/(x + 1e-10) (identity_rule_implicit_fn, its ε fixed at 1e-10).
- LayerNorm / RMSNorm: the normaliser detached (x - mean) / σ.detach(), x * rsqrt(var).detach(),
  after HF's own upcast to float32 (rms_norm_forward keeps it).
- Gated MLP (Llama/Qwen/Gemma): identity rule on act(gate), the uniform rule on act(gate) * up
  (the gradient halved).
- Attention: the gradient at query and key divided by 4, at value by 2, then plain autograd through
  the attention function (eager or SDPA): the uniform rule of the two matmuls and the softmax's
  gradient x input (AttnLRP's Taylor step). BERT: q.k^T and A.V outputs halved inside LXT's copy
  of BertSelfAttention / BertSdpaSelfAttention.
- Relevance is read at inputs_embeds (the word-embedding lookup's output), summed over the hidden
  dim: the model is called with inputs_embeds=embeddings.requires_grad_().
"""
from __future__ import annotations

import contextlib
import importlib
import types
from dataclasses import dataclass
from typing import Dict, Optional

import torch

V = 96  # vocabulary of the tiny configs


# ============================================================================== tiny models


def _configs():
    import transformers as T

    common = dict(vocab_size=V, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0)
    llama_like = dict(common, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rms_norm_eps=1e-6)
    return {
        # name: (modelling module, config, model class name, kind)
        "bert": ("transformers.models.bert.modeling_bert",
                 T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common),
                 "BertForSequenceClassification", "classifier"),
        "gpt2": ("transformers.models.gpt2.modeling_gpt2",
                 T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                              embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2, pad_token_id=0),
                 "GPT2LMHeadModel", "causal"),
        "llama": ("transformers.models.llama.modeling_llama", T.LlamaConfig(**llama_like),
                  "LlamaForCausalLM", "causal"),
        "qwen2": ("transformers.models.qwen2.modeling_qwen2", T.Qwen2Config(sliding_window=None, **llama_like),
                  "Qwen2ForCausalLM", "causal"),
        "qwen3": ("transformers.models.qwen3.modeling_qwen3", T.Qwen3Config(head_dim=8, sliding_window=None, **llama_like),
                  "Qwen3ForCausalLM", "causal"),
        # not in LXT 2.1's default map: run with a patch map of LXT's own Llama patches (custom_map)
        "mistral": ("transformers.models.mistral.modeling_mistral", T.MistralConfig(sliding_window=None, **llama_like),
                    "MistralForCausalLM", "causal"),
        "gemma3": ("transformers.models.gemma3.modeling_gemma3",
                   T.Gemma3TextConfig(head_dim=8, sliding_window=4, **llama_like),
                   "Gemma3ForCausalLM", "causal"),
    }


MODELS = ("bert", "gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma3")


@dataclass
class Built:
    name: str
    module: types.ModuleType       # the transformers modelling module LXT patches
    model_class: str
    kind: str                      # "classifier" (target: a class) or "causal" (target: next-token logit)
    model: torch.nn.Module         # eval mode, the requested dtype


def build(name: str, dtype=torch.float64, seed: int = 0, attn: str = "sdpa", config_overrides=None) -> Built:
    """A tiny random-weight model of the family `name`, eval mode."""
    modname, config, cls, kind = _configs()[name]
    for k, v in (config_overrides or {}).items():
        setattr(config, k, v)
    config._attn_implementation = attn
    module = importlib.import_module(modname)
    torch.manual_seed(seed)
    model = getattr(module, cls)(config).to(dtype).eval()
    return Built(name, module, cls, kind, model)


def inputs(batch: int, seq: int, padded: bool, seed: int = 1, side: str = "right"):
    """input_ids (B, L) and attention_mask (B, L): with padded=True sample b has L - 2b real tokens
    (at least 3), the rest pad (id 0) on `side`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        for b in range(batch):
            n = max(3, seq - 2 * b)
            if side == "right":
                mask[b, n:] = 0
            else:
                mask[b, :seq - n] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each sample's last real token (right padding)."""
    return mask.sum(1) - 1


def target_logits(kind: str, logits: torch.Tensor, mask: torch.Tensor, positions=None, target=None):
    """The explained logits (B,) and their indices: the class (classifier), or the next-token logit at
    each sample's last real token / `positions` (causal LM); the argmax unless `target` is given."""
    b = logits.shape[0]
    if kind == "causal":
        pos = last_positions(mask) if positions is None else positions
        logits = logits[torch.arange(b), pos]            # (B, V)
    t = logits.argmax(-1) if target is None else target
    return logits[torch.arange(b), t], t


# ============================================================================== LXT


def _patch_map(built: Built):
    from lxt.efficient.models import DEFAULT_MAP, get_default_map

    if built.module in DEFAULT_MAP:
        return get_default_map(built.module)
    return custom_map(built)


def custom_map(built: Built) -> dict:
    """LXT's patch map for a Llama-like family its default map lacks (Mistral): the same patch
    functions LXT applies to Llama (lxt/efficient/models/llama.py), on this family's classes, as
    LXT's README suggests for other models."""
    from functools import partial

    from lxt.efficient.patches import dropout_forward, gated_mlp_forward, patch_attention, patch_method, \
        rms_norm_forward

    prefix = built.model_class.split("For")[0]
    mod = built.module
    return {getattr(mod, f"{prefix}MLP"): partial(patch_method, gated_mlp_forward),
            getattr(mod, f"{prefix}RMSNorm"): partial(patch_method, rms_norm_forward),
            torch.nn.Dropout: partial(patch_method, dropout_forward),
            mod: patch_attention}


class LxtPatch:
    """LXT's AttnLRP patches for one model family that can be switched on and off cheaply (a few
    setattr calls), so LXT, the unpatched floor and lrpfast run interleaved in one process.

    On construction the originals of everything the patch map may touch are saved, LXT's
    monkey_patch is applied, the patched values are saved and the originals put back. `on()` /
    `off()` swap between the two; `with patch:` is on() ... off()."""

    _ATTRS = ("forward", "_norm", "original_forward")

    def __init__(self, built: Built, patch_map: Optional[dict] = None):
        from lxt.efficient import monkey_patch

        self.built = built
        patch_map = patch_map or _patch_map(built)
        self.targets = list(patch_map)
        self.original = [self._snapshot(t) for t in self.targets]
        try:
            monkey_patch(built.module, patch_map)
            self.patched = [self._snapshot(t) for t in self.targets]
            self.model = self._model()
        finally:
            self._apply(self.original)
        self.active = False

    def _snapshot(self, target):
        if isinstance(target, types.ModuleType):
            return dict(vars(target))
        return {k: target.__dict__[k] for k in self._ATTRS if k in target.__dict__}

    def _apply(self, states):
        for target, state in zip(self.targets, states):
            if isinstance(target, types.ModuleType):
                d = vars(target)
                for k in [k for k in d if k not in state]:
                    delattr(target, k)
                for k, v in state.items():
                    if d.get(k, _MISSING) is not v:
                        setattr(target, k, v)
            else:
                for k in self._ATTRS:
                    if k in state:
                        setattr(target, k, state[k])
                    elif k in target.__dict__:
                        delattr(target, k)

    def _model(self):
        """The model to run under the patches: built.model itself, or for BERT (whose patch swaps
        modeling_bert's classes for LXT's copies) an instance of the patched class with the same
        weights."""
        built = self.built
        patched_cls = getattr(built.module, built.model_class)
        if isinstance(built.model, patched_cls):
            return built.model
        fresh = patched_cls(built.model.config).to(next(built.model.parameters()).dtype).eval()
        result = fresh.load_state_dict(built.model.state_dict(), strict=True)
        assert not result.missing_keys and not result.unexpected_keys, result
        return fresh

    def on(self):
        self._apply(self.patched)
        self.active = True

    def off(self):
        self._apply(self.original)
        self.active = False

    def __enter__(self):
        self.on()
        return self.model

    def __exit__(self, *exc):
        self.off()


@contextlib.contextmanager
def lxt_patched(built: Built, patch_map: Optional[dict] = None):
    """LXT's patches for the block; yields the model to run (see LxtPatch)."""
    with LxtPatch(built, patch_map) as model:
        yield model


_MISSING = object()


def lxt_relevance(built: Built, model, ids, mask, positions=None, target=None):
    """LXT's per-token relevance: (B, L) and the full (B, L, D) map at inputs_embeds, the logits and
    the explained indices. The backward is seeded with 1: in gradient x input the output's relevance
    is then the explained logit itself (lrpfast's init="logit"; LXT's README seeds with the logit,
    which squares it). Call inside `lxt_patched`."""
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, attention_mask=mask, use_cache=False) if built.kind == "causal" else \
        model(inputs_embeds=emb, attention_mask=mask)
    logits = out.logits
    chosen, t = target_logits(built.kind, logits, mask, positions, target)
    chosen.backward(torch.ones_like(chosen))
    full = (emb * emb.grad).detach()
    return full.sum(-1), full, logits.detach(), t


def supported() -> Dict[str, bool]:
    """Which families LXT 2.1's default map covers (all of MODELS but mistral)."""
    from lxt.efficient.models import DEFAULT_MAP

    names = {m.__name__.rsplit(".", 1)[-1] for m in DEFAULT_MAP}
    return {n: f"modeling_{n}" in names for n in MODELS}
