"""Hugging Face transformers models, unmodified: relevance at the embedding output, per token.

    import lrpfast.hf
    lrp = lrpfast.hf.LRP(model, attention="attnlrp")     # *ForCausalLM, *ForSequenceClassification, ...
    e = lrp(input_ids, attention_mask=mask)              # e.tokens (B, L), e.relevance (B, L, D)
    e = lrp(input_ids, target=token_id, position=-1)     # causal LM: that next-token logit
    e = lrp(pixel_values=x)                              # vision models: e.relevance shaped like x
    e = lrpfast.hf.explain_tokens(model, input_ids, attention_mask=mask)   # the same, explainer cached

Nothing here knows a model family. The model is called as its users call it, through a small
module (`_Explained`) whose one input is the tensor explained, and which lrpfast.LRP traces like
any other model (shape-aware: HF's mask code and shape branches resolve for the input's shape, one
plan per shape; the model is never modified and keeps no state of the trace):

- Token models: the token ids are embedded first, with the model's own input embedding
  (`model.get_input_embeddings()`, as LXT does), and the model is called with
  `inputs_embeds=` that tensor. Relevance is taken there, at the output of the word embedding;
  what the model adds inside (position and token-type embeddings, Gemma's scale) are constants of
  the graph and take their ε share like a bias. `tokens` is its sum over the hidden dim.
- The attention mask is data, not part of the trace: it is a buffer of `_Explained`, a constant of
  the graph (it carries no relevance) whose *values* are written in place before every call, so
  every mask op HF runs on it (the 4-D causal/padding mask, its dtype's minimum) is recomputed
  from the current mask at each forward. One plan per input shape serves every mask of that shape,
  and a padded sample gets the map it gets alone (the padding keys are masked out exactly).
  The alternative, a plan per mask (the mask baked into the trace as a constant), would re-trace
  for every new padding pattern; the graph's check against model(x) would not notice a stale mask
  after the first call of a shape either. Branches HF takes on mask *values* (`if mask.all()`)
  fail the trace (the mask is a traced value) instead of being fixed.
- Per-token logits (causal LMs): the explained output is the logit row at one position per
  sample, picked with `gather` by an index buffer set per call like the mask: by default each
  sample's last real token (right or left padding), or `position=p` (an int: from the start if
  p >= 0, from each sample's last real token if p < 0; or a (B,) tensor). The target is a token
  id of that row (default: its argmax, the predicted next token).
- Classifiers (sequence classification, ViT): the logits as they are; target a class.

K targets per sample ((B, K) target) share one forward, as in lrpfast.LRP.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from . import compiled
from .lrp import LRP as _LRP
from .ops import DEFAULT_EPS, RelevanceError

__all__ = ["LRP", "Explanation", "explain_tokens"]


@dataclass
class Explanation:
    """What `lrpfast.hf.LRP(...)(...)` returns.

    relevance    at the explained input: the embedding output (B, L, D) for token ids (or the
                 inputs_embeds given), else shaped like the input (pixel_values); (B, K, ...) for
                 (B, K) targets
    tokens       relevance summed over the hidden dim: (B, L) or (B, K, L); None for non-token input
    logits       the explained logits (B, C): for per-token outputs (causal LMs), the row at `positions`
    targets      the explained class / token ids: (B,) or (B, K)
    positions    (B,) the position whose logits are explained (per-token outputs), else None
    embeddings   the explained input tensor (the embedding output for token ids)
    layers, conservation   as lrpfast.Explanation (with keep_layers=True), else None
    """

    relevance: torch.Tensor
    tokens: Optional[torch.Tensor]
    logits: torch.Tensor
    targets: torch.Tensor
    positions: Optional[torch.Tensor]
    embeddings: torch.Tensor
    layers: Optional[dict] = None
    conservation: Optional[dict] = None


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params   # by name: a **kwargs forward may pass anything on to where it fails


class _Explained(nn.Module):
    """model(**{input_name: x}, attention_mask=<buffer>) -> logits (B, C): the function explained.
    The mask and the position index are buffers (constants of the graph, no relevance) whose values
    are set in place before each call (module docstring)."""

    def __init__(self, model: nn.Module, input_name: str):
        super().__init__()
        self.model = model
        self.input_name = input_name
        self.fixed = {}
        if _accepts(model.forward, "use_cache"):
            self.fixed["use_cache"] = False   # no cache object written during the trace
        if _accepts(model.forward, "return_dict"):
            self.fixed["return_dict"] = True
        self.register_buffer("attention_mask", None, persistent=False)
        self.register_buffer("position_index", None, persistent=False)
        self.per_token = False

    def forward(self, x):
        kwargs = {self.input_name: x, **self.fixed}
        if self.attention_mask is not None:
            kwargs["attention_mask"] = self.attention_mask
        out = self.model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
        self.per_token = logits.dim() == 3   # (read after a real call: LRP checks the plan against one)
        if self.per_token and self.position_index is not None:   # per-token logits: one row per sample
            logits = logits.gather(1, self.position_index.expand(-1, -1, logits.shape[-1])).squeeze(1)
        return logits

    def set(self, name: str, value: Optional[torch.Tensor]) -> None:
        """Write `value` into the buffer `name` in place: every plan holds that one tensor."""
        buf = getattr(self, name)
        if value is None or buf is None:
            setattr(self, name, None if value is None else value.clone())
            return
        if buf.shape == value.shape and buf.dtype == value.dtype and torch.equal(buf, value):
            return   # unchanged: its version stays, so the constants computed from it stay cached
        if buf.shape != value.shape:
            buf.resize_(value.shape)
        buf.copy_(value)


def _token_ids(input_ids, vocab: Optional[int]) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex \
            or input_ids.dtype == torch.bool:
        raise TypeError(f"lrpfast.hf: input_ids must be an integer tensor (B, L), got "
                        f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise RelevanceError(f"lrpfast.hf: input_ids must be (B, L) with B, L >= 1, got shape {tuple(input_ids.shape)}")
    if vocab is not None and bool(((input_ids < 0) | (input_ids >= vocab)).any()):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab)][0].item()
        raise RelevanceError(f"lrpfast.hf: input_ids holds {bad}, outside the vocabulary of {vocab} tokens")
    return input_ids


def _mask(attention_mask, shape, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(shape, dtype=torch.long, device=device)
    m = torch.as_tensor(attention_mask, device=device)
    if m.dim() == 1 and len(shape) == 2 and shape[0] == 1:
        m = m[None]
    if tuple(m.shape) != tuple(shape):
        raise RelevanceError(f"lrpfast.hf: attention_mask has shape {tuple(m.shape)}; expected {tuple(shape)} "
                             "(one 0/1 entry per token)")
    if m.dtype.is_floating_point or m.dtype.is_complex or not bool(((m == 0) | (m == 1)).all()):
        raise RelevanceError("lrpfast.hf: attention_mask must hold 0 (padding) and 1 (token) as integers or bools")
    m = m.long()
    empty = (m.sum(1) == 0).nonzero()
    if len(empty):
        raise RelevanceError(f"lrpfast.hf: attention_mask of sample {empty[0].item()} has no token (all 0)")
    return m


def _positions(position, mask: torch.Tensor) -> torch.Tensor:
    """(B,) the explained position per sample (module docstring), each a real token."""
    b, n = mask.shape
    last = n - 1 - mask.flip(1).argmax(1)    # each sample's last real token (either padding side)
    if isinstance(position, bool) or not isinstance(position, (int, torch.Tensor)):
        raise TypeError(f"lrpfast.hf: position must be an int or a (B,) integer tensor, got {type(position).__name__}")
    if isinstance(position, int):
        pos = last + 1 + position if position < 0 else torch.full_like(last, position)
    else:
        p = position.to(device=mask.device)
        if p.dtype.is_floating_point or p.dim() > 1 or (p.dim() == 1 and p.shape[0] != b):
            raise RelevanceError(f"lrpfast.hf: position must be an int or (B,) = ({b},) integers, got "
                                 f"{p.dtype} of shape {tuple(p.shape)}")
        p = p.long().expand(b)
        pos = torch.where(p < 0, last + 1 + p, p)
    bad = (pos < 0) | (pos >= n)
    if not bad.any():
        bad = mask.gather(1, pos[:, None]).squeeze(1) == 0
    if bad.any():
        i = bad.nonzero()[0].item()
        raise RelevanceError(f"lrpfast.hf: position {position if isinstance(position, int) else position.tolist()} "
                             f"of sample {i} is not one of its tokens (length {n}, "
                             f"{int(mask[i].sum())} unpadded): its logits are not explained")
    return pos


class LRP:
    """LRP for a Hugging Face transformers model, unmodified (module docstring).

    model        a transformers model in eval mode (or any nn.Module whose forward takes the input by
                 keyword and returns logits or an output with .logits)
    attention    "attnlrp" (default here: relevance through the softmax to queries and keys, as LXT)
                 or "cp" (attention weights held constant)
    eps, stabilizer, init, composite, **composite_params: as lrpfast.LRP
    batch_size   at most this many samples per pass
    compile      as lrpfast.LRP: True compiles each input shape's pass at its second call (worth it
                 when many inputs share a shape: pad token batches to a fixed length)

    lrp(input_ids, attention_mask=None, target=None, position=-1, keep_layers=False) -> Explanation
    lrp(pixel_values=x, target=None) / lrp(inputs_embeds=e, attention_mask=...)    any one float input
    """

    def __init__(self, model: nn.Module, eps: float = DEFAULT_EPS, attention: str = "attnlrp",
                 stabilizer: str = "sign", init: str = "logit", composite=None, batch_size: Optional[int] = None,
                 compile=False, **composite_params):
        if not isinstance(model, nn.Module):
            raise TypeError(f"lrpfast.hf.LRP: model must be an nn.Module, got {type(model).__name__}")
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                       or batch_size < 1):
            raise RelevanceError(f"lrpfast.hf.LRP: batch_size must be a positive int or None, got {batch_size!r}")
        self.model = model
        self.batch_size = batch_size
        self.attention = attention
        compiled.options(compile)   # a bad value is refused here, not at the first call
        self._settings = dict(eps=eps, stabilizer=stabilizer, init=init, composite=composite, attention=attention,
                              compile=compile, **composite_params)
        self._explainers = {}   # input keyword -> (_Explained, lrpfast.LRP): one traced function each

    def _explainer(self, name: str):
        if name not in self._explainers:
            if not _accepts(self.model.forward, name):
                raise RelevanceError(f"lrpfast.hf: {type(self.model).__name__}.forward takes no {name!r}")
            module = _Explained(self.model, name)
            self._explainers[name] = (module, _LRP(module, per_shape=True, **self._settings))
        return self._explainers[name]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The word embeddings of input_ids: the model's input embedding's output (what is explained)."""
        get = getattr(self.model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        if not isinstance(emb, nn.Module):
            raise RelevanceError(f"lrpfast.hf: {type(self.model).__name__} has no get_input_embeddings(); pass "
                                 "inputs_embeds= (the embedded tokens) instead of input_ids")
        ids = _token_ids(input_ids, getattr(emb, "num_embeddings", None))
        with torch.no_grad():
            return emb(ids.to(emb.weight.device) if hasattr(emb, "weight") else ids)

    def __call__(self, input_ids: Optional[torch.Tensor] = None, attention_mask=None, *, target=None, position=-1,
                 keep_layers: bool = False, **inputs) -> Explanation:
        if input_ids is not None:
            if inputs:
                raise RelevanceError(f"lrpfast.hf: give input_ids or one float input, not both ({sorted(inputs)})")
            name, x = "inputs_embeds", self.embed(input_ids)
        elif len(inputs) == 1:
            (name, x), = inputs.items()
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"lrpfast.hf: {name} must be a floating-point tensor, got "
                                f"{getattr(x, 'dtype', type(x).__name__)}")
        else:
            raise RelevanceError("lrpfast.hf: give input_ids (token models) or exactly one float input by name "
                                 f"(pixel_values=..., inputs_embeds=...); got {sorted(inputs) or 'none'}")
        module, lrp = self._explainer(name)
        tokens = name == "inputs_embeds"
        if tokens and x.dim() != 3:
            raise RelevanceError(f"lrpfast.hf: inputs_embeds must be (B, L, D), got shape {tuple(x.shape)}")
        mask = pos = None
        if tokens or attention_mask is not None:
            if x.dim() < 2:
                raise RelevanceError(f"lrpfast.hf: {name} must be batched, got shape {tuple(x.shape)}")
            mask = _mask(attention_mask, x.shape[:2], x.device)
            pos = _positions(position, mask)
        b = x.shape[0]
        step = b if self.batch_size is None else self.batch_size
        parts = []
        for a in range(0, b, step):
            module.set("attention_mask", None if mask is None else mask[a:a + step])
            module.set("position_index", None if pos is None else pos[a:a + step, None, None])
            t = target[a:a + step] if isinstance(target, torch.Tensor) and target.dim() >= 1 else target
            parts.append(lrp._explain(x[a:a + step], t, record=keep_layers, keep_layers=keep_layers))
        cat = lambda vals: vals[0] if len(vals) == 1 else torch.cat(vals, 0)  # noqa: E731
        rel = cat([p.relevance for p in parts])
        e = Explanation(relevance=rel, tokens=rel.sum(-1) if tokens else None,
                        logits=cat([p.logits for p in parts]), targets=cat([p.targets for p in parts]),
                        positions=None, embeddings=x,
                        layers=parts[0].layers if len(parts) == 1 else None,
                        conservation=parts[0].conservation if len(parts) == 1 else None)
        if pos is not None and getattr(module, "per_token", False):
            e.positions = pos   # the model's logits are per token: `position` picked the row
        return e

    def __repr__(self):
        return f"lrpfast.hf.LRP({type(self.model).__name__}, attention={self.attention!r})"


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def explain_tokens(model: nn.Module, input_ids: torch.Tensor, attention_mask=None, target=None, position=-1,
                   attention: str = "attnlrp", eps: float = DEFAULT_EPS, **settings) -> Explanation:
    """One call: `lrpfast.hf.LRP(model, attention=attention, eps=eps, **settings)(input_ids, ...)`,
    the explainer kept (per model and settings, traced plans included) for the next call."""
    key = (attention, float(eps), tuple(sorted((k, repr(v)) for k, v in settings.items())))
    per_model = _CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = LRP(model, eps=eps, attention=attention, **settings)
    return per_model[key](input_ids, attention_mask, target=target, position=position)
