"""Per-token relevance as coloured text: a self-contained HTML page or a terminal line.

    html = lrpfast.render_tokens(tokens, relevance, format="html")   # str; save it, or:
    lrpfast.save_token_html("out.html", tokens, relevance, labels=["target: ' cat'"])
    lrpfast.print_tokens(tokens, relevance)      # ANSI 24-bit colours on a terminal, plain text
                                                 # ("tok[+0.42]") when not a TTY or NO_COLOR is set
    e = lrpfast.hf.LRP(model)(ids, attention_mask=mask)
    page = lrpfast.render_explanation(e, tokens_from_ids(tokenizer, ids), mask=mask)

tokens are strings, one per relevance entry: a list for one sample or a list of lists for a batch
(relevance (L,) or (B, L), a tensor, array or list). `mask` (B, L) leaves out positions where it is
0 (padding): they are neither shown nor part of the normalisation. Each sample is normalised by its
own max |R|, so the strongest token is fully saturated: red for relevance for the explained output,
blue against it, white for none (the "bwr" map of lrpfast.heatmap, or any other `cmap`). Every
token carries its raw relevance: in a tooltip (HTML) or after it in brackets (plain text).

Token text is shown as given; `clean_token` turns tokenizer markers (GPT-2's 'Ġ', SentencePiece's
'▁', WordPiece's '##') into spaces/joins. HTML is escaped, and control characters (an ESC inside a
token would otherwise drive the terminal) are shown as escapes. NaN/Inf relevance is refused with an
error naming the sample and position: a page with them painted white would look plausible.
"""
from __future__ import annotations

import html as _html
import os
import sys
from typing import List, Optional, Sequence, Union

import numpy as np

from .heatmaps import _TABLE, HeatmapError, _to_numpy, colormap_table

FORMATS = ("html", "ansi", "plain")


class TokenHeatmapError(HeatmapError):
    """Bad argument to a token heatmap function (the message names it and what was expected)."""


# ----------------------------------------------------------------------------- inputs


def _samples(tokens, relevance, mask, where: str):
    """[(tokens, values)] per sample with masked positions dropped; values float64."""
    r = _to_numpy(relevance)
    if r.dtype == object or not (np.issubdtype(r.dtype, np.floating) or np.issubdtype(r.dtype, np.integer)):
        raise TokenHeatmapError(f"{where}: relevance must be numbers, got dtype {r.dtype}")
    r = r.astype(np.float64, copy=False)
    if r.ndim == 1:
        single = True
        r = r[None]
        if isinstance(tokens, str) or not isinstance(tokens, Sequence):
            raise TokenHeatmapError(f"{where}: tokens must be a list of strings, got {type(tokens).__name__}")
        tokens = [tokens]
    elif r.ndim == 2:
        single = False
        if isinstance(tokens, str) or not isinstance(tokens, Sequence) or len(tokens) != r.shape[0] \
                or any(isinstance(t, str) or not isinstance(t, Sequence) for t in tokens):
            raise TokenHeatmapError(f"{where}: relevance of shape {r.shape} needs tokens as a list of "
                                    f"{r.shape[0]} lists of strings (one per sample)")
    else:
        raise TokenHeatmapError(f"{where}: relevance must be (L,) or (B, L), got shape {r.shape}")
    if mask is not None:
        m = _to_numpy(mask)
        m = m[None] if m.ndim == 1 else m
        if m.shape != r.shape:
            raise TokenHeatmapError(f"{where}: mask of shape {m.shape} does not match relevance {r.shape}")
        m = m.astype(bool)
    out = []
    for b, (toks, row) in enumerate(zip(tokens, r)):
        toks = list(toks)
        if len(toks) != row.shape[0]:
            raise TokenHeatmapError(f"{where}: sample {b} has {len(toks)} tokens but {row.shape[0]} relevance values")
        for i, t in enumerate(toks):
            if not isinstance(t, str):
                raise TokenHeatmapError(f"{where}: token {i} of sample {b} is {type(t).__name__}, expected str")
        keep = m[b] if mask is not None else np.ones(row.shape[0], dtype=bool)
        bad = np.flatnonzero(~np.isfinite(row))  # masked positions too: a NaN anywhere is a fault
        if bad.size:
            raise TokenHeatmapError(f"{where}: NaN or Inf relevance in sample {b} at position"
                                    f"{'s' if bad.size > 1 else ''} {', '.join(map(str, bad[:5].tolist()))}"
                                    f"{', ...' if bad.size > 5 else ''}")
        out.append(([t for t, k in zip(toks, keep) if k], row[keep]))
    return out, single


def normalize_tokens(values: np.ndarray) -> np.ndarray:
    """One sample's relevance in [-1, 1]: R / max|R| (all zero stays zero)."""
    scale = np.abs(values).max() if values.size else 0.0
    return values / scale if scale > 0 else np.zeros_like(values)


def token_colors(values, cmap: str = "bwr") -> np.ndarray:
    """(L, 3) uint8 background colours for one sample's relevance, normalised by its max |R|:
    zero at the middle of the map (white in "bwr"), +max at its top (red), -max at its bottom (blue)."""
    v = _to_numpy(values).astype(np.float64).reshape(-1)
    if not np.isfinite(v).all():
        raise TokenHeatmapError("token_colors: NaN or Inf relevance")
    table, _ = colormap_table(cmap)
    idx = np.clip(np.rint((normalize_tokens(v) + 1.0) / 2.0 * (_TABLE - 1)), 0, _TABLE - 1).astype(np.intp)
    return np.rint(table[idx] * 255).astype(np.uint8)


def _text_colour(bg: np.ndarray) -> tuple:
    """Black on light backgrounds, white on dark ones (relative luminance, sRGB weights)."""
    lum = 0.2126 * bg[0] + 0.7152 * bg[1] + 0.0722 * bg[2]
    return (0, 0, 0) if lum >= 140 else (255, 255, 255)


def clean_token(token: str) -> str:
    """A tokenizer's token as text: 'Ġ'/'▁' (a leading space in GPT-2 BPE / SentencePiece) become
    spaces, 'Ċ' a newline, WordPiece's '##' continuation is dropped (the piece joins the previous)."""
    if token.startswith("##") and len(token) > 2:
        return token[2:]
    return token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n")


_CONTROL = {i: f"\\x{i:02x}" for i in list(range(0x20)) + [0x7f]}
_CONTROL.update({ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"})


_CONTROL_HTML = {k: v for k, v in _CONTROL.items() if k not in (ord("\n"), ord("\t"))}


def _visible(token: str, html: bool = False) -> str:
    """Control characters as escapes (an ESC must never reach the terminal raw); in HTML newlines
    and tabs stay (the page wraps with white-space: pre-wrap)."""
    return token.translate(_CONTROL_HTML if html else _CONTROL)


def _fmt(v: float) -> str:
    return f"{v:+.4g}"


# ----------------------------------------------------------------------------- renderers


def _render_ansi(samples, cmap, labels) -> str:
    lines = []
    for b, (toks, vals) in enumerate(samples):
        cols = token_colors(vals, cmap) if len(vals) else np.zeros((0, 3), np.uint8)
        parts = []
        for tok, c in zip(toks, cols):
            fg = _text_colour(c)
            parts.append(f"\x1b[48;2;{c[0]};{c[1]};{c[2]}m\x1b[38;2;{fg[0]};{fg[1]};{fg[2]}m{_visible(tok)}")
        if labels:
            lines.append(_visible(labels[b]))
        lines.append("".join(parts) + "\x1b[0m")
    return "\n".join(lines) + "\n"


def _render_plain(samples, labels) -> str:
    lines = []
    for b, (toks, vals) in enumerate(samples):
        if labels:
            lines.append(_visible(labels[b]))
        # tokens carry their own leading space (' cat'): one space between entries is enough
        lines.append(" ".join(f"{_visible(t.strip() or t)}[{_fmt(v)}]" for t, v in zip(toks, vals)))
    return "\n".join(lines) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.sample { margin: 1em 0 1.5em 0; }
.label { font-size: 0.9em; color: #555; margin-bottom: 0.3em; }
.tokens { font-family: ui-monospace, Menlo, Consolas, monospace; line-height: 1.9; white-space: pre-wrap; }
.tok { padding: 0.1em 0.05em; border-radius: 2px; }
.legend { font-size: 0.8em; color: #555; }
.bar { display: inline-block; width: 12em; height: 0.8em; vertical-align: middle; border: 1px solid #ccc; }
"""


def _render_html(samples, cmap, labels, title) -> str:
    esc = _html.escape
    table, _ = colormap_table(cmap)
    stops = ", ".join(f"rgb({int(round(c[0] * 255))},{int(round(c[1] * 255))},{int(round(c[2] * 255))})"
                      for c in table[:: (_TABLE - 1) // 8])
    body = []
    for b, (toks, vals) in enumerate(samples):
        cols = token_colors(vals, cmap) if len(vals) else np.zeros((0, 3), np.uint8)
        scale = float(np.abs(vals).max()) if len(vals) else 0.0
        spans = []
        for i, (tok, v, c) in enumerate(zip(toks, vals, cols)):
            fg = _text_colour(c)
            rel = v / scale if scale > 0 else 0.0
            tip = f"#{i} {tok!r}: R = {_fmt(v)} ({rel:+.2f} of max |R|)"
            spans.append(f'<span class="tok" style="background:rgb({c[0]},{c[1]},{c[2]});'
                         f'color:rgb({fg[0]},{fg[1]},{fg[2]})" title="{esc(tip, quote=True)}">'
                         f"{esc(_visible(tok, html=True))}</span>")
        label = labels[b] if labels else f"sample {b}"
        body.append(f'<div class="sample"><div class="label">{esc(label)} &middot; max |R| = {scale:.4g} '
                    f'&middot; sum R = {float(np.sum(vals)):.4g}</div><div class="tokens">{"".join(spans)}</div></div>')
    legend = (f'<p class="legend">normalised per sample: <span class="bar" style="background:linear-gradient(to right, '
              f'{stops})"></span> &minus;max |R| &hellip; 0 &hellip; +max |R| (hover a token for its relevance)</p>')
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body>\n<h3>{esc(title)}</h3>\n{legend}\n"
            + "\n".join(body) + "\n</body></html>\n")


def render_tokens(tokens, relevance, format: str = "html", *, mask=None, cmap: str = "bwr",
                  labels: Optional[Sequence[str]] = None, title: str = "lrpfast token relevance") -> str:
    """Per-token relevance as a string: "html" (a whole self-contained page), "ansi" (24-bit
    background colours, one line per sample) or "plain" ("tok[+0.42] ..."). See the module doc."""
    where = "render_tokens"
    if format not in FORMATS:
        raise TokenHeatmapError(f"{where}: format must be one of {FORMATS}, got {format!r}")
    samples, _ = _samples(tokens, relevance, mask, where)
    if labels is not None:
        labels = [str(x) for x in ([labels] if isinstance(labels, str) else labels)]
        if len(labels) != len(samples):
            raise TokenHeatmapError(f"{where}: {len(labels)} labels for {len(samples)} samples")
    colormap_table(cmap)  # an unknown map fails here, naming the choices
    if format == "html":
        return _render_html(samples, cmap, labels, title)
    if format == "ansi":
        return _render_ansi(samples, cmap, labels)
    return _render_plain(samples, labels)


def save_token_html(path: Union[str, os.PathLike], tokens, relevance, **kwargs) -> str:
    """Write render_tokens(..., format="html") to `path` (UTF-8); returns the path."""
    page = render_tokens(tokens, relevance, format="html", **kwargs)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return os.fspath(path)


def terminal_format(stream=None) -> str:
    """"ansi" when `stream` (default stdout) is a terminal and NO_COLOR is unset or empty
    (no-color.org), else "plain"."""
    stream = sys.stdout if stream is None else stream
    if os.environ.get("NO_COLOR"):
        return "plain"
    isatty = getattr(stream, "isatty", None)
    return "ansi" if callable(isatty) and isatty() else "plain"


def print_tokens(tokens, relevance, file=None, format: Optional[str] = None, **kwargs) -> None:
    """Print the tokens coloured by relevance: ANSI on a terminal, plain text otherwise (or
    `format` = "ansi" / "plain" to choose)."""
    file = sys.stdout if file is None else file
    fmt = terminal_format(file) if format is None else format
    if fmt not in ("ansi", "plain"):
        raise TokenHeatmapError(f"print_tokens: format must be 'ansi' or 'plain', got {fmt!r}")
    file.write(render_tokens(tokens, relevance, format=fmt, **kwargs))


def tokens_from_ids(tokenizer, input_ids, clean: bool = True) -> List[List[str]]:
    """Display strings for a (B, L) batch of ids through a Hugging Face tokenizer (or anything with
    convert_ids_to_tokens), tokenizer markers cleaned with `clean_token`."""
    ids = _to_numpy(input_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    out = []
    for row in ids.tolist():
        toks = tokenizer.convert_ids_to_tokens(row)
        out.append([clean_token(t) if clean else t for t in toks])
    return out


def render_explanation(explanation, tokens, format: str = "html", *, mask=None, labels=None, **kwargs) -> str:
    """render_tokens for an lrpfast.hf Explanation: its `.tokens` relevance (B, L), or (B, K, L)
    for K targets per sample (one row per sample and target, labelled with the target id).
    tokens: the display strings per sample (B lists of L), e.g. tokens_from_ids(tokenizer, ids)."""
    rel = getattr(explanation, "tokens", None)
    if rel is None:
        raise TokenHeatmapError("render_explanation: the explanation has no per-token relevance (.tokens is None: "
                                "it did not explain token ids)")
    if rel.dim() == 3:
        b, k, n = rel.shape
        targets = getattr(explanation, "targets", None)
        tokens = [tokens[i] for i in range(b) for _ in range(k)]
        if mask is not None:
            mask = _to_numpy(mask).repeat(k, axis=0)
        if labels is None and targets is not None:
            labels = [f"sample {i}, target {int(targets[i, j])}" for i in range(b) for j in range(k)]
        rel = rel.reshape(b * k, n)
    return render_tokens(tokens, rel, format=format, mask=mask, labels=labels, **kwargs)
