"""`lrpfast explain-text`: per-token relevance of a Hugging Face text model as coloured text.

    lrpfast explain-text --text "The cat sat on the mat"                  # random-weights demo Llama
    lrpfast explain-text --model demo-bert --text "good film" --text "bad" --html out.html
    lrpfast explain-text --model ./my-local-model --text "Paris is the capital of" --target " France"

--model: "demo-llama" (default) or "demo-bert" build a tiny model from a config with RANDOM
weights and a built-in word tokenizer (hashed word ids): they show the command and the colours
work offline, and their relevance means nothing. Anything else is a local directory saved with
save_pretrained (config, weights, tokenizer) or a name already in the local Hugging Face cache;
nothing is downloaded. Causal LMs explain the next-token logit at each text's last token (the
predicted token, or --target); classifiers a class (the predicted one, or --target).

The terminal gets 24-bit colours when stdout is a terminal and NO_COLOR is unset (else plain
"token[+0.12]" text; --format forces either); --html writes a self-contained page. Needs the
`transformers` package (`pip install 'lrpfast[hf]'`). Exit status 2 with one clear line on bad input.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import zlib
from typing import List, Optional

DEMOS = ("demo-llama", "demo-bert")
DEMO_VOCAB = 512


class TextInputError(ValueError):
    """Bad command-line input (the message is the whole story)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", action="append", required=True,
                   help="a text to explain (repeat for a batch: padded, each explained as if alone)")
    p.add_argument("--model", default="demo-llama",
                   help="demo-llama | demo-bert (random weights, offline) | a local model directory or cached name")
    p.add_argument("--target", default=None,
                   help="causal LM: the next token to explain (a token string such as ' France', or an id); "
                        "classifier: a class index or label. Default: the model's prediction")
    p.add_argument("--position", type=int, default=-1,
                   help="causal LM: which position's next-token logit (-1: each text's last token)")
    p.add_argument("--attention", choices=("attnlrp", "cp"), default="attnlrp",
                   help="attention rule: AttnLRP (through the softmax) or CP-LRP (attention weights constant)")
    p.add_argument("--eps", type=float, default=1e-6, help="the ε rule's stabiliser")
    p.add_argument("--html", default=None, help="also write a self-contained HTML page here")
    p.add_argument("--format", choices=("auto", "ansi", "plain"), default="auto",
                   help="terminal output: auto (colours on a terminal unless NO_COLOR), ansi or plain")
    p.add_argument("--raw-tokens", action="store_true",
                   help="show tokenizer markers (Ġ, ▁, ##) instead of spaces/joins")


# ----------------------------------------------------------------------------- demo models


class WordTokenizer:
    """The demos' tokenizer: words and punctuation, ids hashed into a small vocabulary (0 = padding).
    Not invertible and not a real vocabulary: for the random-weights demos only."""

    pad_token_id = 0

    def __init__(self, vocab: int = DEMO_VOCAB):
        self.vocab = vocab

    def tokenize(self, text: str) -> List[str]:
        return re.findall(r"\s*(?:\w+|[^\w\s])", text)

    def token_id(self, token: str) -> int:
        return 1 + zlib.crc32(token.strip().lower().encode("utf-8")) % (self.vocab - 1)

    def encode_batch(self, texts: List[str]):
        import torch

        toks = [self.tokenize(t) for t in texts]
        n = max(len(t) for t in toks)
        ids = torch.zeros(len(texts), n, dtype=torch.long)
        mask = torch.zeros(len(texts), n, dtype=torch.long)
        shown = []
        for b, t in enumerate(toks):
            ids[b, :len(t)] = torch.tensor([self.token_id(w) for w in t], dtype=torch.long)
            mask[b, :len(t)] = 1
            shown.append(t + ["<pad>"] * (n - len(t)))
        return ids, mask, shown

    def decode_id(self, i: int) -> str:
        return f"<id {i}>"


def demo_model(name: str):
    """(model, tokenizer, kind) for a demo: a tiny random Llama LM or BERT classifier, eval mode."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    if name == "demo-llama":
        cfg = T.LlamaConfig(vocab_size=DEMO_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            initializer_range=0.2, pad_token_id=0, attn_implementation="sdpa")
        return T.LlamaForCausalLM(cfg).eval(), WordTokenizer(), "causal"
    cfg = T.BertConfig(vocab_size=DEMO_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=512, num_labels=2, initializer_range=0.2,
                       id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
                       attn_implementation="sdpa")
    return T.BertForSequenceClassification(cfg).eval(), WordTokenizer(), "classifier"


# ----------------------------------------------------------------------------- local models


class HFTokenizer:
    """A Hugging Face tokenizer behind the demos' interface."""

    def __init__(self, tok, clean: bool):
        self.tok, self.clean = tok, clean
        if tok.pad_token is None:   # GPT-2, Llama: no pad token; padding is masked out anyway
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        tok.padding_side = "right"

    def encode_batch(self, texts):
        from .token_heatmaps import clean_token

        enc = self.tok(texts, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        shown = []
        for row in ids.tolist():
            toks = self.tok.convert_ids_to_tokens(row)
            shown.append([clean_token(t) if self.clean else t for t in toks])
        return ids, mask, shown

    def token_id(self, token: str) -> int:
        ids = self.tok.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise TextInputError(f"--target {token!r} is {len(ids)} tokens for this tokenizer "
                                 f"({self.tok.convert_ids_to_tokens(ids)}); give one token or its id")
        return ids[0]

    def decode_id(self, i: int) -> str:
        return self.tok.decode([i])


def local_model(spec: str, clean: bool):
    """(model, tokenizer, kind) from a local directory or the local HF cache; never downloads."""
    import transformers as T

    where = spec if os.path.isdir(spec) else None
    try:
        cfg = T.AutoConfig.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as exc:
        hint = "" if where else (" (no such directory, and not in the local Hugging Face cache; nothing is "
                                 "downloaded: save the model with save_pretrained and give its directory)")
        raise TextInputError(f"--model {spec!r}: cannot load its config{hint}: {str(exc).splitlines()[0]}") from None
    arch = (getattr(cfg, "architectures", None) or [""])[0]
    causal = not arch.endswith("ForSequenceClassification")
    auto = T.AutoModelForCausalLM if causal else T.AutoModelForSequenceClassification
    try:
        model = auto.from_pretrained(spec, local_files_only=True)
        tok = T.AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TextInputError(f"--model {spec!r}: cannot load the model or its tokenizer: "
                             f"{str(exc).splitlines()[0]}") from None
    return model.eval(), HFTokenizer(tok, clean), "causal" if causal else "classifier"


# ----------------------------------------------------------------------------- the command


def _target(spec: Optional[str], kind: str, tokenizer, model) -> Optional[int]:
    if spec is None:
        return None
    if re.fullmatch(r"-?\d+", spec.strip()):
        return int(spec)
    if kind == "classifier":
        label2id = getattr(model.config, "label2id", None) or {}
        if spec in label2id:
            return int(label2id[spec])
        raise TextInputError(f"--target {spec!r}: not a class index nor one of the labels {sorted(label2id)}")
    return tokenizer.token_id(spec)


def _labels(e, kind, tokenizer, model, demo: bool) -> List[str]:
    out = []
    for b in range(e.logits.shape[0]):
        t = int(e.targets.reshape(e.logits.shape[0], -1)[b, 0])
        logit = float(e.logits[b, t])
        if kind == "causal":
            what = f"next token {tokenizer.decode_id(t)!r} (id {t}) after position {int(e.positions[b])}"
        else:
            names = getattr(model.config, "id2label", None) or {}
            what = f"class {t} ({names.get(t, t)})"
        out.append(f"text {b}: {what}, logit {logit:.4g}" + (" [random-weights demo]" if demo else ""))
    return out


def explain_texts(texts: List[str], model_spec: str = "demo-llama", target=None, position: int = -1,
                  attention: str = "attnlrp", eps: float = 1e-6, clean: bool = True):
    """(tokens per text, hf Explanation, mask, labels) for the CLI and for scripts."""
    from . import hf

    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise TextInputError("--text must be a non-empty string (give one --text per text)")
    demo = model_spec in DEMOS
    model, tokenizer, kind = demo_model(model_spec) if demo else local_model(model_spec, clean)
    ids, mask, shown = tokenizer.encode_batch(texts)
    if demo and int(mask.sum(1).max()) > 512:
        raise TextInputError("--text: the demo models take at most 512 words")
    t = _target(target, kind, tokenizer, model)
    lrp = hf.LRP(model, attention=attention, eps=eps)
    e = lrp(ids, attention_mask=mask, target=t, position=position)
    return shown, e, mask, _labels(e, kind, tokenizer, model, demo)


def run(args) -> int:
    from .ops import RelevanceError
    from .token_heatmaps import TokenHeatmapError, render_tokens, save_token_html, terminal_format

    prog = "lrpfast explain-text"
    try:
        import transformers  # noqa: F401

        from . import hf  # noqa: F401
    except ImportError as exc:
        print(f"{prog}: error: needs the transformers package (pip install 'lrpfast[hf]'): {exc}", file=sys.stderr)
        return 2
    try:
        if not (args.eps >= 0 and args.eps < float("inf")):
            raise TextInputError(f"--eps must be a finite number >= 0, got {args.eps}")
        shown, e, mask, labels = explain_texts(args.text, args.model, args.target, args.position, args.attention,
                                               args.eps, clean=not args.raw_tokens)
        fmt = terminal_format(sys.stdout) if args.format == "auto" else args.format
        title = f"lrpfast {args.attention} relevance - {args.model}"
        sys.stdout.write(render_tokens(shown, e.tokens, format=fmt, mask=mask, labels=labels))
        if args.html:
            save_token_html(args.html, shown, e.tokens, mask=mask, labels=labels, title=title)
            print(f"wrote {args.html}", file=sys.stderr)
    except (TextInputError, RelevanceError, TokenHeatmapError, TypeError, OSError) as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0
