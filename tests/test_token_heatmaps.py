"""Token heatmaps (lrpfast/token_heatmaps.py) and `lrpfast explain-text` (lrpfast/explain_text.py).

Colours are checked against the bwr map's definition (white at 0, pure red at +max, pure blue at
-max, linear in between), not against the module's own table; escaping against html.unescape and
a parse of the page; the CLI by its exit codes and by the relevance it prints against
lrpfast.hf run directly.
"""
from __future__ import annotations

import html
import io
import re
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from lrpfast import token_heatmaps as th
from lrpfast.token_heatmaps import TokenHeatmapError, clean_token, render_tokens, token_colors


def expected_bwr(v):
    """The bwr map by its definition: v in [-1, 1] -> RGB 0..255 (white at 0)."""
    if v >= 0:
        return (255, 255 * (1 - v), 255 * (1 - v))
    return (255 * (1 + v), 255 * (1 + v), 255)


# ----------------------------------------------------------------------------- colours


def test_colour_mapping_follows_bwr_and_normalises_by_max_abs():
    r = np.array([2.0, -2.0, 0.0, 1.0, -0.5])
    cols = token_colors(r)
    for v, c in zip(r / 2.0, cols):
        assert np.abs(c.astype(float) - expected_bwr(v)).max() <= 1.5, (v, c)
    assert tuple(cols[0]) == (255, 0, 0) and tuple(cols[1]) == (0, 0, 255) and tuple(cols[2]) == (255, 255, 255)


def test_sign_flips_red_and_blue():
    r = np.array([0.3, -1.0, 0.7])
    a, b = token_colors(r), token_colors(-r)
    assert (a[:, [2, 1, 0]] == b).all()   # negating swaps the R and B channels of bwr
    assert a[0, 0] == 255 and a[0, 2] < 255 and a[1, 2] == 255 and a[1, 0] < 255


def test_per_sample_normalisation_and_scale_invariance():
    r = torch.tensor([[1.0, 0.5, 0.0], [100.0, 50.0, 0.0]])
    page = render_tokens([["a", "b", "c"]] * 2, r, format="ansi")
    lines = [ln for ln in page.splitlines() if ln]
    assert lines[0] == lines[1]   # same pattern at 100x the scale: same colours
    assert (token_colors([1.0, 0.5]) == token_colors([1e-9, 0.5e-9])).all()


def test_all_zero_sample_is_white_not_nan():
    assert (token_colors([0.0, 0.0]) == 255).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_refused_naming_sample_and_position(bad):
    r = torch.tensor([[0.1, 0.2, 0.3], [0.1, bad, 0.3]])
    with pytest.raises(TokenHeatmapError, match=r"sample 1 at position 1"):
        render_tokens([["a", "b", "c"]] * 2, r, format="html")
    with pytest.raises(TokenHeatmapError, match="NaN or Inf"):
        token_colors([0.1, bad])
    # a NaN at a masked (padding) position is still a fault somewhere: refused too
    with pytest.raises(TokenHeatmapError, match="sample 1"):
        render_tokens([["a", "b", "c"]] * 2, r, format="plain", mask=torch.tensor([[1, 1, 1], [1, 0, 1]]))


# ----------------------------------------------------------------------------- HTML


class _Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.spans, self._in, self.tags = [], None, []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "span" and a.get("class") == "tok":
            self._in = {"title": a["title"], "style": a["style"], "text": ""}

    def handle_endtag(self, tag):
        if tag == "span" and self._in is not None:
            self.spans.append(self._in)
            self._in = None

    def handle_data(self, data):
        if self._in is not None:
            self._in["text"] += data


def test_html_escapes_special_characters_and_carries_relevance_in_tooltips():
    toks = ["<script>alert(1)</script>", ' "q" ', "a&b", "it's"]
    r = [0.5, -0.25, 1.0, 0.0]
    page = render_tokens(toks, r, format="html", title="<t>")
    assert "<script>" not in page and "<t>" not in page
    p = _Spans()
    p.feed(page)
    assert "script" not in p.tags
    assert [s["text"] for s in p.spans] == toks       # the parser gets the original text back
    for s, v, tok in zip(p.spans, r, toks):
        assert f"R = {v:+.4g}" in s["title"] and repr(tok) in s["title"]
    # colour of the strongest positive token: pure red, white text
    assert "background:rgb(255,0,0)" in p.spans[2]["style"] and "color:rgb(255,255,255)" in p.spans[2]["style"]
    assert page.startswith("<!DOCTYPE html>") and "http" not in page   # self-contained: no external resource


def test_html_mask_drops_padding_and_labels_are_escaped(tmp_path):
    r = torch.tensor([[1.0, -1.0, 0.0], [1.0, 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = th.save_token_html(tmp_path / "t.html", [["a", "b", "c"], ["d", "<pad>", "<pad>"]], r, mask=mask,
                             labels=["x <1>", "y"])
    page = open(out, encoding="utf-8").read()
    p = _Spans()
    p.feed(page)
    assert [s["text"] for s in p.spans] == ["a", "b", "c", "d"]
    # sample 1 is normalised over its one real token (the masked 5.0 does not dim it)
    assert "background:rgb(255,0,0)" in p.spans[3]["style"]
    assert "x &lt;1&gt;" in page


# ----------------------------------------------------------------------------- terminal


def test_ansi_uses_24bit_backgrounds_and_neutralises_escape_codes_in_tokens():
    toks = ["\x1b[2Jwipe", "ok\n"]
    out = render_tokens(toks, [1.0, -1.0], format="ansi")
    assert "\x1b[2J" not in out and "\\x1b[2Jwipe" in out and "ok\\n" in out
    assert "\x1b[48;2;255;0;0m" in out and "\x1b[48;2;0;0;255m" in out and out.rstrip("\n").endswith("\x1b[0m")
    assert len(re.findall("\x1b\\[", out)) == 2 * len(toks) + 1   # bg + fg per token, one reset


def test_plain_lists_tokens_with_values():
    out = render_tokens(["The", " cat"], [0.25, -1.0], format="plain", labels=["s0"])
    assert out == "s0\nThe[+0.25] cat[-1]\n"


def test_terminal_format_respects_tty_and_no_color(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert th.terminal_format(Tty()) == "ansi"
    assert th.terminal_format(io.StringIO()) == "plain"
    monkeypatch.setenv("NO_COLOR", "1")
    assert th.terminal_format(Tty()) == "plain"
    buf = Tty()
    th.print_tokens(["a"], [1.0], file=buf)
    assert "\x1b" not in buf.getvalue()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("tokens,rel,match", [
    (["a", "b"], [1.0], "2 tokens but 1 relevance"),
    ("ab", [1.0, 2.0], "list of strings"),
    ([["a"]], np.zeros((2, 1)), "2 lists of strings"),
    (["a", 3], [1.0, 2.0], "token 1 of sample 0 is int"),
    (["a"], np.zeros((1, 1, 1)), r"\(L,\) or \(B, L\)"),
])
def test_bad_input_is_named(tokens, rel, match):
    with pytest.raises(TokenHeatmapError, match=match):
        render_tokens(tokens, rel, format="plain")


def test_bad_format_and_cmap():
    with pytest.raises(TokenHeatmapError, match="format must be one of"):
        render_tokens(["a"], [1.0], format="pdf")
    with pytest.raises(Exception, match="cmap"):
        render_tokens(["a"], [1.0], format="html", cmap="no-such-map")


def test_clean_token_markers():
    assert clean_token("Ġcat") == " cat" and clean_token("▁cat") == " cat"
    assert clean_token("##ing") == "ing" and clean_token("##") == "##" and clean_token("Ċ") == "\n"


# ----------------------------------------------------------------------------- CLI


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lrpfast", "explain-text", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_cli_argument_errors_exit_2():
    r = _cli()   # --text is required
    assert r.returncode == 2 and "--text" in r.stderr


def test_cli_in_process_errors_exit_2(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("lrpfast.hf")
    from lrpfast import cli

    assert cli.main(["explain-text", "--text", "   "]) == 2
    assert "--text must be a non-empty string" in capsys.readouterr().err
    assert cli.main(["explain-text", "--text", "hi", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "cannot load its config" in err and "nothing is downloaded" in err and err.count("\n") == 1
    assert cli.main(["explain-text", "--text", "hi", "--eps", "-1"]) == 2
    assert "--eps" in capsys.readouterr().err
    assert cli.main(["explain-text", "--model", "demo-bert", "--text", "hi", "--target", "neutral"]) == 2
    assert "not a class index nor one of the labels" in capsys.readouterr().err


def test_cli_demo_prints_the_relevance_of_lrpfast_hf(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("lrpfast.hf")
    import lrpfast.hf
    from lrpfast import cli, explain_text

    out = tmp_path / "o.html"
    texts = ["The cat sat on the mat.", "A <b>bold</b> & short one"]
    rc = cli.main(["explain-text", "--text", texts[0], "--text", texts[1], "--html", str(out), "--format", "plain"])
    printed = capsys.readouterr().out
    assert rc == 0 and out.exists()
    # the relevance printed is lrpfast.hf's, computed here independently of the CLI's wiring
    model, tok, kind = explain_text.demo_model("demo-llama")
    ids, mask, shown = tok.encode_batch(texts)
    e = lrpfast.hf.LRP(model, attention="attnlrp", eps=1e-6)(ids, attention_mask=mask)
    for b in range(2):
        n = int(mask[b].sum())
        line = " ".join(f"{t.strip() or t}[{v:+.4g}]" for t, v in zip(shown[b][:n], e.tokens[b, :n].tolist()))
        assert line in printed
    assert "random-weights demo" in printed
    page = out.read_text(encoding="utf-8")
    p = _Spans()
    p.feed(page)
    n0, n1 = int(mask[0].sum()), int(mask[1].sum())
    assert [s["text"] for s in p.spans] == shown[0][:n0] + shown[1][:n1]   # padding left out
    assert "b" not in p.tags and "&lt;" in page      # the text's <b> is text, not markup


def test_cli_local_model_directory(tmp_path, capsys):
    """A local save_pretrained directory (model + a tokenizer built offline) works without network."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("lrpfast.hf")
    from lrpfast import cli

    vocab = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3, "good": 4, "bad": 5}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=2, architectures=["BertForSequenceClassification"])
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).eval().save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    assert cli.main(["explain-text", "--model", str(tmp_path), "--text", "hello good world", "--text", "bad",
                     "--format", "plain", "--target", "1"]) == 0
    printed = capsys.readouterr().out
    assert "hello[" in printed and "good[" in printed and "class 1" in printed and "[PAD]" not in printed


def test_render_explanation_of_lrpfast_hf_with_k_targets():
    pytest.importorskip("transformers")
    hf = pytest.importorskip("lrpfast.hf")
    from lrpfast import explain_text
    from lrpfast.token_heatmaps import render_explanation

    model, tok, _ = explain_text.demo_model("demo-llama")
    ids, mask, shown = tok.encode_batch(["one two three", "four five"])
    e = hf.LRP(model)(ids, attention_mask=mask, target=torch.tensor([[3, 7], [5, 9]]))
    assert e.tokens.shape == (2, 2, ids.shape[1])
    page = render_explanation(e, shown, format="html", mask=mask)
    p = _Spans()
    p.feed(page)
    want = [v for b in range(2) for k in range(2) for v in e.tokens[b, k][mask[b].bool()].tolist()]
    got = [float(re.search(r"R = ([-+0-9.e]+)", s["title"]).group(1)) for s in p.spans]
    assert np.allclose(got, want, rtol=1e-3, atol=0)
    assert "sample 1, target 9" in page
    with pytest.raises(TokenHeatmapError, match="no per-token relevance"):
        render_explanation(type("E", (), {"tokens": None})(), shown)
