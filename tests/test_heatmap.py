"""Heatmaps: colours at known relevance values, normalisation, overlay, grids, PNG round trips."""
from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch

import lrpfast
from lrpfast.heatmaps import HeatmapError, heatmap, heatmap_grid, save_grid, save_heatmap, save_heatmaps, write_png

PIL = pytest.importorskip("PIL.Image")

RED, BLUE, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def ramp():
    """A (1, 3, 3) map with the extremes and zero at known places."""
    return torch.tensor([[[-2.0, -1.0, 0.0], [0.5, 1.0, 2.0], [0.0, 0.0, 0.0]]])


def test_bwr_symmetric_is_white_at_zero_and_saturated_at_the_extremes():
    img = heatmap(ramp(), "bwr", "symmetric")
    assert img.shape == (3, 3, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == BLUE and tuple(img[1, 2]) == RED and tuple(img[0, 2]) == WHITE
    # Half of the positive maximum: halfway from white to red.
    assert tuple(img[1, 1]) == (255, 128, 128) or tuple(img[1, 1]) == (255, 127, 127)
    # The map is symmetric: -R swaps red and blue.
    flipped = heatmap(-ramp(), "bwr")
    assert np.array_equal(flipped[..., 0], img[..., 2]) and np.array_equal(flipped[..., 2], img[..., 0])


def test_coldnhot_gray_and_hot():
    r = ramp()
    cold = heatmap(r, "coldnhot")
    assert tuple(cold[0, 2]) == BLACK and tuple(cold[1, 2]) == (255, 255, 0) and tuple(cold[0, 0]) == (0, 255, 255)
    gray = heatmap(r, "gray")  # symmetric: zero is mid-gray, the extremes black and white
    assert tuple(gray[0, 0]) == BLACK and tuple(gray[1, 2]) == WHITE and gray[0, 2, 0] in (127, 128)
    absolute = heatmap(r, "hot", "absolute")
    assert tuple(absolute[0, 0]) == tuple(absolute[1, 2]) == WHITE and tuple(absolute[0, 2]) == BLACK
    assert np.array_equal(heatmap(r, "gray", "absolute"), heatmap(-r, "gray", "absolute"))


def test_normalisation_per_sample_and_shared():
    a = torch.randn(1, 1, 5, 5)
    both = torch.cat([a, 10 * a])
    per_sample = heatmap(both)
    assert np.array_equal(per_sample[0], per_sample[1])  # scale-free per sample
    shared = heatmap(both, shared_scale=True)
    assert np.array_equal(shared[1], per_sample[1]) and not np.array_equal(shared[0], per_sample[0])


def test_percentile_clips_one_outlier():
    r = torch.ones(1, 10, 10)
    r[0, 0, 0] = 1000.0
    plain, clipped = heatmap(r), heatmap(r, percentile=90)
    assert tuple(plain[5, 5]) != RED and tuple(clipped[5, 5]) == RED and tuple(clipped[0, 0]) == RED


def test_channels_are_summed_by_default():
    r = torch.randn(3, 6, 6)
    assert np.array_equal(heatmap(r), heatmap(r.sum(0)))
    assert np.array_equal(heatmap(r, channel_reduce="abs", normalization="absolute"), heatmap(r.abs().sum(0), normalization="absolute"))


def test_overlay_shows_the_input_where_relevance_is_zero():
    x = torch.rand(3, 4, 4)
    r = torch.zeros(1, 4, 4)
    r[0, 0, 0] = 1.0
    img = heatmap(r, input=x, alpha=1.0)
    gray = np.rint(x.numpy().mean(0) * 255)
    assert np.abs(img[1:, :, 0].astype(float) - gray[1:, :]).max() <= 1  # untouched: the grayscale input
    assert tuple(img[0, 0]) == RED  # full relevance, alpha 1: the colour
    none = heatmap(r, input=x, alpha=0.0)
    assert np.abs(none[..., 1].astype(float) - gray).max() <= 1


def test_batch_and_scale():
    r = torch.randn(4, 1, 7, 5)
    img = heatmap(r, scale=3)
    assert img.shape == (4, 21, 15, 3)
    assert np.array_equal(img[:, ::3, ::3], heatmap(r))  # nearest-neighbour enlargement
    assert heatmap(r[0], scale=None).shape == (22 * 7, 22 * 5, 3)  # automatic: the short side ~112 px


def test_grid_layout():
    r, x = torch.randn(5, 1, 4, 4), torch.rand(5, 1, 4, 4)
    g = heatmap_grid(r, x, ncols=2, pad=1, scale=2)
    tile = 8
    assert g.shape == (3 * (tile + 1) + 1, 4 * (tile + 1) + 1, 3)  # 3 rows of 2 (input, heatmap) pairs
    heat = heatmap(r, scale=2)
    # Sample 3 is row 1, pair 1: its heatmap is the 4th tile of that row.
    y0, x0 = 1 + 1 * (tile + 1), 1 + 3 * (tile + 1)
    assert np.array_equal(g[y0:y0 + tile, x0:x0 + tile], heat[3])
    digit = np.rint(x[3, 0].numpy() * 255).astype(np.uint8).repeat(2, 0).repeat(2, 1)
    assert np.array_equal(g[y0:y0 + tile, x0 - tile - 1:x0 - 1, 0], digit)
    # K targets: one row per sample, the input first.
    multi = heatmap_grid(torch.randn(2, 3, 1, 4, 4), x[:2], pad=0, scale=1)
    assert multi.shape == (8, 16, 3)


def _det(*shape):
    """Deterministic values in [-1, 1] (no random generator: the digests below are exact)."""
    return torch.sin(torch.arange(int(np.prod(shape)), dtype=torch.float64) * 0.7).reshape(shape)


def test_grid_without_labels_is_unchanged():
    """labels=None draws exactly the pictures of the grid before labels existed (their digests)."""
    import hashlib

    r, x = _det(5, 1, 4, 4), (_det(5, 1, 4, 4) + 1) / 2
    grids = [heatmap_grid(r, x, ncols=2, pad=1, scale=2), heatmap_grid(r, pad=3, scale=1, background=0),
             heatmap_grid(_det(2, 3, 1, 4, 4), x[:2], scale=2, cmap="coldnhot"),
             heatmap_grid(r, x, overlay=True, ncols=3)]
    digests = [(g.shape, hashlib.sha256(g.tobytes()).hexdigest()[:16]) for g in grids]
    assert digests == [((28, 37, 3), "6f688521e0b81525"), ((17, 24, 3), "ec9794aeb13dfaae"),
                       ((22, 42, 3), "4035ec6ca22845d1"), ((230, 344, 3), "d8d947f6f9080ff6")]
    assert np.array_equal(heatmap_grid(r, x, ncols=2, pad=1, scale=2, labels=None), grids[0])


@pytest.mark.parametrize("background", [255, 0])
def test_grid_labels_sit_on_a_strip_above_each_sample(background):
    r, x = _det(5, 1, 28, 28), (_det(5, 1, 28, 28) + 1) / 2
    pad, tile = 2, 112  # 28x28 maps: 112-px tiles, the font drawn twice its size
    plain = heatmap_grid(r, x, ncols=2, background=background)
    labels = ["true 7 / pred 7", "", "3", "true 1 / pred 7", "9"]
    g = heatmap_grid(r, x, ncols=2, background=background, labels=labels)
    rows = 3
    assert g.shape[1] == plain.shape[1]
    strip, rest = divmod(g.shape[0] - plain.shape[0], rows)
    assert rest == 0 and strip == 2 * (11 + 2 * 2)  # Pillow's 11-px bitmap font, 2-px margins, twice
    ink = 0 if background == 255 else 255
    for i in range(rows):  # the tiles are today's, each row moved down by the strips above it
        old = plain[pad + i * (tile + pad):pad + i * (tile + pad) + tile]
        y0 = pad + i * (strip + tile + pad) + strip
        assert np.array_equal(g[y0:y0 + tile], old)
    pair = 2 * tile + pad
    for n, text in enumerate(labels):
        row, col = divmod(n, 2)
        y0, x0 = pad + row * (strip + tile + pad), pad + col * (pair + pad)
        band = g[y0:y0 + strip, x0:x0 + pair]
        drawn = (band == ink).all(axis=-1)
        if text:
            assert drawn.sum() > 20 * len(text.replace(" ", ""))  # every glyph leaves some ink
            assert ((band == ink) | (band == background)).all()  # one colour of text, no other pixels
            cols = np.nonzero(drawn.any(axis=0))[0]
            assert abs((cols[0] + cols[-1]) / 2 - pair / 2) < 4  # centred over its pair
        else:
            assert (band == background).all()
    # The pad column between the two pairs of a row stays background: a label covers its own pair.
    assert (g[:, pad + pair:pad + pair + pad] == background).all()


def test_grid_labels_for_k_targets_rows_and_small_tiles():
    r = _det(2, 3, 1, 4, 4)
    plain = heatmap_grid(r, _det(2, 1, 4, 4).abs(), pad=1, scale=2)
    g = heatmap_grid(r, _det(2, 1, 4, 4).abs(), pad=1, scale=2, labels=torch.tensor([4, 2]))  # class indices
    strip = (g.shape[0] - plain.shape[0]) // 2
    assert g.shape[1] == plain.shape[1] and strip == 11 + 2 * 2  # small tiles: the font at its size
    assert (g[1:1 + strip] == 0).all(axis=-1).any() and (g[1 + strip + 8 + 1:][:strip] == 0).all(axis=-1).any()
    # a label wider than its tiles is cut at their edge, never drawn over the neighbours
    cut = heatmap_grid(_det(2, 1, 4, 4), ncols=2, pad=1, scale=2, labels=["a long label", "b"])
    assert cut.shape == (1 + strip + 8 + 1, 2 * (8 + 1) + 1, 3)
    assert (cut[:, 9] == 255).all()  # the pad between the two tiles


@pytest.mark.parametrize("labels, message", [
    (["a", "b"], "labels has 2 entries for 3 samples"),
    ("abc", "labels must be a sequence"),
    ([], "labels has 0 entries"),
])
def test_wrong_labels_are_a_clear_error(labels, message):
    with pytest.raises(HeatmapError, match=f"heatmap_grid: {message}"):
        heatmap_grid(torch.randn(3, 1, 4, 4), labels=labels)


def test_png_round_trip_and_save_helpers(tmp_path):
    r = torch.randn(3, 1, 6, 6)
    paths = save_heatmaps(tmp_path / "maps", r, names=["a", "b", "c.png"], scale=1)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a.png", "b.png", "c.png"]
    for p, expected in zip(paths, heatmap(r)):
        assert np.array_equal(np.asarray(PIL.open(p).convert("RGB")), expected)
    one = save_heatmap(tmp_path / "one.png", r[0], cmap="coldnhot", scale=2)
    assert np.array_equal(np.asarray(PIL.open(one).convert("RGB")), heatmap(r[0], "coldnhot", scale=2))
    grid = save_grid(tmp_path / "grid.png", r, torch.rand(3, 1, 6, 6), scale=1, pad=0, ncols=3)
    assert PIL.open(grid).size == (6 * 6, 6)
    labelled = save_grid(tmp_path / "labelled.png", r, labels=["a", "b", "c"], scale=1, pad=0, ncols=3)
    assert np.array_equal(np.asarray(PIL.open(labelled).convert("RGB")),
                          heatmap_grid(r, labels=["a", "b", "c"], scale=1, pad=0, ncols=3))
    assert lrpfast.save_grid is save_grid and lrpfast.heatmap is heatmap  # the lazy exports


def test_missing_pillow_is_a_clear_error_and_matplotlib_maps_work(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("no Pillow here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(ImportError, match="Pillow.*lrpfast\\[plot\\]"):
        write_png(tmp_path / "m.png", heatmap(torch.randn(5, 7)))
    assert heatmap_grid(torch.randn(2, 1, 3, 3)).shape[-1] == 3  # no labels: no Pillow needed
    with pytest.raises(ImportError, match="labels.*Pillow"):
        heatmap_grid(torch.randn(2, 1, 3, 3), labels=["a", "b"])
    monkeypatch.undo()
    matplotlib = pytest.importorskip("matplotlib")
    r = torch.randn(4, 4)
    expected = matplotlib.colormaps["viridis"]((r.abs() / r.abs().max()).numpy())[..., :3]
    got = heatmap(r, "viridis", "absolute").astype(float) / 255
    assert np.abs(got - expected).max() < 0.02  # the 257-entry table: within a step of matplotlib's own


@pytest.mark.parametrize("call, message", [
    (lambda: heatmap(torch.zeros(2, 2), cmap="nope-map"), "cmap"),
    (lambda: heatmap(torch.zeros(2, 2), normalization="minmax"), "normalization"),
    (lambda: heatmap(torch.zeros(5)), "relevance must be"),
    (lambda: heatmap(torch.zeros(1, 4, 4), input=torch.zeros(2, 4, 4)), "input must be"),
    (lambda: heatmap(torch.zeros(2, 2), percentile=0), "percentile"),
    (lambda: heatmap_grid(torch.zeros(2, 2, 2)), "heatmap_grid"),
    (lambda: save_heatmap("x.png", torch.zeros(2, 1, 3, 3)), "save_heatmaps"),
])
def test_errors_name_the_argument(call, message):
    with pytest.raises(HeatmapError, match=message):
        call()


def test_all_zero_and_half_precision_maps():
    assert tuple(heatmap(torch.zeros(3, 3))[1, 1]) == WHITE  # nothing to show: white, no NaN
    r = torch.randn(2, 1, 4, 4)
    assert np.array_equal(heatmap(r.bfloat16()), heatmap(r.bfloat16().float()))


def test_optional_dependencies_stay_optional():
    """`import lrpfast`, heatmap colours and explain_dataset work with matplotlib, Pillow, mlxtend
    and tqdm all unimportable; only writing a PNG then asks for Pillow."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import sys, tempfile\n"
        "for m in ('matplotlib', 'PIL', 'mlxtend', 'tqdm'): sys.modules[m] = None\n"
        "import torch, lrpfast\n"
        "assert lrpfast.heatmap(torch.randn(4, 4)).shape == (4, 4, 3)\n"
        "m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()\n"
        "d = tempfile.mkdtemp()\n"
        "lrpfast.explain_dataset(m, torch.rand(5, 1, 4, 4), d, shard_size=2)\n"
        "assert len(lrpfast.open_relevance(d)) == 5\n"
        "try:\n"
        "    lrpfast.save_heatmap(d + '/x.png', torch.randn(4, 4))\n"
        "except ImportError as e:\n"
        "    print('asks:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=repo))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "asks:" in proc.stdout and "Pillow" in proc.stdout


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_relevance_or_input_is_reported_not_painted_over(bad):
    r = torch.randn(3, 1, 8, 8)
    r[1, 0, 2, 2] = bad
    with pytest.raises(lrpfast.heatmaps.HeatmapError, match=r"heatmap(_grid)?: NaN or Inf in relevance \(sample 1\)"):
        lrpfast.heatmap_grid(r)
    with pytest.raises(lrpfast.heatmaps.HeatmapError, match="NaN or Inf in relevance"):
        lrpfast.heatmap(r[1])
    x = torch.rand(3, 1, 8, 8)
    x[2, 0, 0, 0] = bad
    with pytest.raises(lrpfast.heatmaps.HeatmapError, match=r"heatmap(_grid)?: NaN or Inf in the input images \(sample 2\)"):
        lrpfast.heatmap_grid(torch.randn(3, 1, 8, 8), inputs=x)
