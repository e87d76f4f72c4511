"""Relevance maps as pictures: colour maps, normalisation, overlays, grids, PNG files.

    rgb = lrpfast.heatmap(relevance)                        # (H, W, 3) or (B, H, W, 3) uint8
    lrpfast.save_heatmap("r.png", relevance[0], input=x[0])
    lrpfast.save_grid("grid.png", relevance, inputs=x)      # digit | heatmap pairs
    lrpfast.save_grid("grid.png", relevance, inputs=x, labels=[f"class {c}" for c in y.tolist()])

The colour arithmetic is numpy only; writing a PNG needs Pillow (optional: `pip install
lrpfast[plot]`); matplotlib's colour maps can be used by name when it is installed. Colour maps
(`COLORMAPS`):

- "bwr": blue - white - red, white at zero (the usual LRP map: red for evidence for the class,
  blue for evidence against it);
- "coldnhot": cyan - blue - black - red - yellow, black at zero (the "cold and hot" map);
- "gray": black - white (with "symmetric" normalisation zero is mid-gray);
- "hot": black - red - yellow - white (for "absolute" relevance);
- any matplotlib colour map name, when matplotlib is installed.
"""
from __future__ import annotations

import os
from typing import List, NamedTuple, Optional, Sequence, Union

import numpy as np

ArrayLike = Union[np.ndarray, "torch.Tensor"]  # noqa: F821  (torch is optional for this module's math)

# Control points (position in [0, 1], RGB in [0, 1]); a table of _TABLE entries is interpolated from
# them. _TABLE is odd so that zero relevance (position 0.5) has an entry of its own: exactly white
# in "bwr", exactly black in "coldnhot".
_TABLE = 257
# Diverging maps put zero relevance at position 0.5 whatever the normalisation.
_CONTROL_POINTS = {
    "bwr": ([0.0, 0.5, 1.0], [(0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0)]),
    "coldnhot": ([0.0, 0.25, 0.5, 0.75, 1.0],
                 [(0.0, 1.0, 1.0), (0.0, 0.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 1.0, 0.0)]),
    "gray": ([0.0, 1.0], [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0)]),
    "hot": ([0.0, 0.4, 0.8, 1.0], [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 1.0, 0.0), (1.0, 1.0, 1.0)]),
}
_DIVERGING = {"bwr", "coldnhot"}
_ALIASES = {"grey": "gray", "coldhot": "coldnhot", "cold_and_hot": "coldnhot", "seismic_lrp": "bwr"}
COLORMAPS = tuple(_CONTROL_POINTS)
NORMALIZATIONS = ("symmetric", "absolute")
CHANNEL_REDUCTIONS = ("sum", "abs", "max")


class HeatmapError(ValueError):
    """Bad argument to a heatmap function (the message names it and what was expected)."""


# ----------------------------------------------------------------------------- colour maps


def colormap_table(name: str) -> "tuple[np.ndarray, bool]":
    """(_TABLE, 3) float table in [0, 1] for `name`, and whether the map is diverging (zero at the
    middle). Unknown names are looked up in matplotlib when it is installed."""
    key = _ALIASES.get(name, name)
    if key in _CONTROL_POINTS:
        pos, colours = _CONTROL_POINTS[key]
        grid = np.linspace(0.0, 1.0, _TABLE)
        colours = np.asarray(colours, dtype=np.float64)
        table = np.stack([np.interp(grid, pos, colours[:, c]) for c in range(3)], axis=1)
        return table, key in _DIVERGING
    try:
        import matplotlib

        cmap = matplotlib.colormaps[name]
    except (ImportError, KeyError):
        raise HeatmapError(
            f"heatmap: cmap must be one of {COLORMAPS} (or a matplotlib colour map name with matplotlib "
            f"installed), got {name!r}"
        ) from None
    table = np.asarray(cmap(np.linspace(0.0, 1.0, _TABLE)))[:, :3]
    # A matplotlib map is treated as diverging when its name says so; others are sequential.
    return table, name.removesuffix("_r") in {"bwr", "seismic", "coolwarm", "RdBu", "PiYG", "PRGn", "BrBG", "PuOr",
                                         "RdGy", "RdYlBu", "RdYlGn", "Spectral"}


# ----------------------------------------------------------------------------- shapes


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    detach = getattr(a, "detach", None)
    if detach is not None:  # a torch tensor (kept duck-typed: torch is not needed here)
        a = detach().cpu()
        if str(a.dtype) in ("torch.bfloat16", "torch.float16"):
            a = a.float()
        return a.numpy()
    return np.asarray(a)


def _as_maps(relevance, channel_reduce: str, where: str) -> "tuple[np.ndarray, bool]":
    """(N, H, W) float64 maps from (H, W), (C, H, W) or (B, C, H, W) relevance; and whether
    the input was a single sample."""
    r = _to_numpy(relevance).astype(np.float64, copy=False)
    if r.ndim == 2:
        return r[None], True
    if r.ndim == 3:
        return _reduce_channels(r[None], channel_reduce, where), True
    if r.ndim == 4:
        return _reduce_channels(r, channel_reduce, where), False
    raise HeatmapError(
        f"{where}: relevance must be (H, W), (C, H, W) or (B, C, H, W), got shape {tuple(r.shape)}"
    )


def _reduce_channels(r: np.ndarray, how: str, where: str) -> np.ndarray:
    # Relevance is additive over channels: "sum" keeps conservation, the others are display choices.
    if how == "sum":
        return r.sum(axis=1)
    if how == "abs":
        return np.abs(r).sum(axis=1)
    if how == "max":
        idx = np.abs(r).argmax(axis=1)[:, None]
        return np.take_along_axis(r, idx, axis=1)[:, 0]
    raise HeatmapError(f"{where}: channel_reduce must be one of {CHANNEL_REDUCTIONS}, got {how!r}")


def _as_images(inputs, n: int, where: str) -> np.ndarray:
    """(N, H, W, 3) float in [0, 1] from (H, W), (C, H, W) or (B, C, H, W) inputs with C = 1 or 3.
    Inputs already in [0, 1] are shown as they are; others are min-max scaled per sample."""
    a = _to_numpy(inputs).astype(np.float64, copy=False)
    if a.ndim == 2:
        a = a[None, None]
    elif a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise HeatmapError(f"{where}: input must be (H, W), (C, H, W) or (B, C, H, W) with C = 1 or 3, "
                           f"got shape {tuple(_to_numpy(inputs).shape)}")
    if a.shape[0] != n:
        raise HeatmapError(f"{where}: {a.shape[0]} inputs for {n} relevance maps")
    _check_finite(a, where, "the input images")
    lo = a.min(axis=(1, 2, 3), keepdims=True)
    hi = a.max(axis=(1, 2, 3), keepdims=True)
    out_of_range = (lo < 0) | (hi > 1)
    span = np.where(hi > lo, hi - lo, 1.0)
    a = np.where(out_of_range, (a - lo) / span, a)
    a = np.moveaxis(a, 1, -1)
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def _check_finite(a: np.ndarray, where: str, what: str) -> None:
    """NaN/Inf are reported, never painted over: a picture with them zeroed would look plausible."""
    if not np.isfinite(a).all():
        bad = np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))
        raise HeatmapError(f"{where}: NaN or Inf in {what} (sample{'s' if len(bad) > 1 else ''} "
                           f"{', '.join(map(str, bad[:5].tolist()))}{', ...' if len(bad) > 5 else ''})")


# ----------------------------------------------------------------------------- normalisation


def normalize(relevance, normalization: str = "symmetric", percentile: float = 100.0,
              channel_reduce: str = "sum", shared_scale: bool = False) -> np.ndarray:
    """Relevance as (N, H, W) maps in [-1, 1] ("symmetric": R / max|R|, sign kept) or [0, 1]
    ("absolute": |R| / max|R|), per sample unless `shared_scale`. `percentile` < 100 uses that
    percentile of |R| as the scale and clips above it (one hot pixel does not wash out a map)."""
    where = "normalize"
    maps, _ = _as_maps(relevance, channel_reduce, where)
    return _normalize_maps(maps, normalization, percentile, shared_scale, where)


def _normalize_maps(maps, normalization, percentile, shared_scale, where):
    if normalization not in NORMALIZATIONS:
        raise HeatmapError(f"{where}: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if not 0.0 < float(percentile) <= 100.0:
        raise HeatmapError(f"{where}: percentile must be in (0, 100], got {percentile!r}")
    _check_finite(maps, where, "relevance")
    mag = np.abs(maps)
    axes = None if shared_scale else (1, 2)
    scale = np.percentile(mag, percentile, axis=axes, keepdims=True) if percentile < 100 else mag.max(axis=axes, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)  # an all-zero map stays zero
    v = np.clip(maps / scale, -1.0, 1.0)
    return np.abs(v) if normalization == "absolute" else v


# ----------------------------------------------------------------------------- colouring


def _colour(v: np.ndarray, cmap: str, signed: bool) -> np.ndarray:
    """(N, H, W) values in [-1, 1] (signed) or [0, 1] -> (N, H, W, 3) floats in [0, 1]."""
    table, diverging = colormap_table(cmap)
    # Diverging maps always put 0 in the middle; sequential maps stretch [-1, 1] (symmetric) or
    # [0, 1] (absolute) over the whole table.
    pos = (v + 1.0) / 2.0 if (diverging or signed) else v
    idx = np.clip(np.rint(pos * (_TABLE - 1)), 0, _TABLE - 1).astype(np.intp)
    return table[idx]


def _upscale(img: np.ndarray, scale: int) -> np.ndarray:
    # Nearest-neighbour: every relevance value stays one visible square (no smoothing).
    return img if scale == 1 else img.repeat(scale, axis=-3).repeat(scale, axis=-2)


def _auto_scale(h: int, w: int, scale: Optional[int]) -> int:
    if scale is None:
        return max(1, 112 // max(1, min(h, w)))  # small maps (MNIST's 28x28) become ~112 px tiles
    if int(scale) < 1:
        raise HeatmapError(f"heatmap: scale must be an integer >= 1, got {scale!r}")
    return int(scale)


def heatmap(relevance, cmap: str = "bwr", normalization: str = "symmetric", *, input=None,
            alpha: float = 0.7, percentile: float = 100.0, channel_reduce: str = "sum",
            shared_scale: bool = False, scale: Optional[int] = 1) -> np.ndarray:
    """Colour a relevance map: (H, W), (C, H, W) (channels reduced by `channel_reduce`) or a batch
    (B, C, H, W). Returns uint8 RGB, (H, W, 3) for one map, (B, H, W, 3) for a batch.

    input: the explained image(s) (same leading shape, C = 1 or 3): the heatmap is laid over its
    grayscale version, each pixel with opacity alpha·|normalised relevance|, so pixels without
    relevance show the image. scale: integer nearest-neighbour enlargement (None: automatic)."""
    where = "heatmap"
    maps, single = _as_maps(relevance, channel_reduce, where)
    v = _normalize_maps(maps, normalization, percentile, shared_scale, where)
    rgb = _colour(v, cmap, normalization == "symmetric")
    if input is not None:
        if not 0.0 <= float(alpha) <= 1.0:
            raise HeatmapError(f"{where}: alpha must be in [0, 1], got {alpha!r}")
        img = _as_images(input, len(maps), where)
        if img.shape[1:3] != rgb.shape[1:3]:
            raise HeatmapError(f"{where}: input is {img.shape[1]}x{img.shape[2]}, relevance {rgb.shape[1]}x{rgb.shape[2]}")
        gray = img.mean(axis=-1, keepdims=True)
        a = float(alpha) * np.abs(v)[..., None]
        rgb = (1.0 - a) * gray + a * rgb
    out = _upscale(np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8), _auto_scale(*maps.shape[1:], scale))
    return out[0] if single else out


def heatmap_grid(relevance, inputs=None, ncols: Optional[int] = None, pad: int = 2, *, cmap: str = "bwr",
                 normalization: str = "symmetric", percentile: float = 100.0, channel_reduce: str = "sum",
                 overlay: bool = False, alpha: float = 0.7, scale: Optional[int] = None,
                 background: int = 255, labels: Optional[Sequence[str]] = None) -> np.ndarray:
    """One uint8 RGB picture with many maps.

    relevance (B, C, H, W): B tiles, or B (input, heatmap) pairs when `inputs` is given, `ncols`
    tiles or pairs per row. relevance (B, K, C, H, W) (K targets per sample): one row per sample,
    the input first when given. overlay=True draws each heatmap over its input instead of beside it.

    labels: one string per sample (B of them; a list, or a tensor/array of class indices), written
    in Pillow's default bitmap font on a strip above that sample's tiles (its pair, its tile, or
    its row of K maps); the font is enlarged 2x, 3x, ... on large tiles when every label still fits,
    and a label wider than its tiles is cut. Needs Pillow. None (default): no strips."""
    where = "heatmap_grid"
    r = _to_numpy(relevance)
    multi = r.ndim == 5
    if r.ndim not in (4, 5):
        raise HeatmapError(f"{where}: relevance must be (B, C, H, W) or (B, K, C, H, W), got shape {tuple(r.shape)}")
    b, k = r.shape[0], (r.shape[1] if multi else 1)
    if b == 0:
        raise HeatmapError(f"{where}: no relevance maps (batch of 0)")
    if labels is not None:
        labels = _labels(labels, b, where)
    flat = r.reshape(b * k, *r.shape[-3:])
    h, w = flat.shape[-2:]
    s = _auto_scale(h, w, scale)
    img = None
    if inputs is not None:
        img = _as_images(inputs, b, where)
        if img.shape[1:3] != (h, w):
            raise HeatmapError(f"{where}: inputs are {img.shape[1]}x{img.shape[2]}, relevance {h}x{w}")
    overlay_in = None if (img is None or not overlay) else np.repeat(np.moveaxis(img, -1, 1), k, axis=0)
    heat = heatmap(flat, cmap, normalization, input=overlay_in, alpha=alpha, percentile=percentile,
                   channel_reduce=channel_reduce, scale=s)
    heat = heat.reshape(b, k, *heat.shape[1:])
    # tiles[i] is the list of pictures for sample i, drawn left to right.
    show_input = img is not None and not overlay
    in_tiles = _upscale(np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8), s) if show_input else None
    per_sample = [([in_tiles[i]] if show_input else []) + list(heat[i]) for i in range(b)]
    if multi:
        ncols = 1
    else:
        ncols = ncols or max(1, int(np.ceil(np.sqrt(b * (2 if show_input else 1)) / (2 if show_input else 1))))
    rows = [sum(per_sample[i:i + ncols], []) for i in range(0, b, ncols)]
    if labels is None:
        return _assemble(rows, pad, background)
    layout = _label_layout(labels, per_sample[0], pad)
    canvas = _assemble(rows, pad, background, layout.strip)
    _draw_labels(canvas, labels, layout, per_sample[0][0].shape[:2], ncols, pad, background)
    return canvas


def _assemble(rows: List[List[np.ndarray]], pad: int, background: int, strip: int = 0) -> np.ndarray:
    """Tiles row by row, `pad` apart; each row has `strip` pixels above its tiles for labels."""
    th, tw = rows[0][0].shape[:2]
    ncols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (strip + th + pad) + pad, ncols * (tw + pad) + pad, 3), background, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (strip + th + pad) + strip, pad + j * (tw + pad)
            canvas[y:y + th, x:x + tw] = tile
    return canvas


# ----------------------------------------------------------------------------- labels


def _labels(labels, n: int, where: str) -> List[str]:
    if isinstance(labels, (str, bytes)):
        raise HeatmapError(f"{where}: labels must be a sequence of {n} strings (one per sample), got one string")
    if hasattr(labels, "tolist"):  # a tensor or array of class indices
        labels = labels.tolist()
    labels = [str(v) for v in labels]
    if len(labels) != n:
        raise HeatmapError(f"{where}: labels has {len(labels)} entries for {n} samples; expected one string per sample")
    return labels


def _label_font():
    try:
        from PIL import ImageFont
    except ImportError:
        raise ImportError("lrpfast: heatmap labels are drawn with Pillow; pip install 'lrpfast[plot]'") from None
    # The bitmap font (from Pillow 10.1 on, load_default gives a FreeType font where it can).
    return getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()


# Font pixels of space above and below a line of label text.
_LABEL_MARGIN = 2


class _LabelLayout(NamedTuple):
    font: object
    factor: int   # integer enlargement of the font
    line: int     # font pixels per line
    span: int     # tiles per label: its sample's tiles
    width: int    # pixels one label may cover: those tiles and the pads between them
    strip: int    # pixels above each row of tiles


def _label_layout(labels: List[str], tiles: List[np.ndarray], pad: int) -> _LabelLayout:
    """Labels over groups of len(tiles) tiles: the font twice its size on 112-px tiles (MNIST's
    default), three times on 168-px ones, ..., as long as the widest label still fits."""
    font = _label_font()
    th, tw = tiles[0].shape[:2]
    width = len(tiles) * tw + (len(tiles) - 1) * pad
    line = font.getbbox("Ag|_")[3]
    widest = max((font.getbbox(t)[2] for t in labels if t), default=0)
    factor = max(1, min(th // 56, width // max(1, widest)))
    return _LabelLayout(font, factor, line, len(tiles), width, factor * (line + 2 * _LABEL_MARGIN))


def _draw_labels(canvas: np.ndarray, labels: List[str], layout: _LabelLayout, tile_shape, ncols: int, pad: int,
                 background: int) -> None:
    """Write label i centred on the strip above sample i (row i // ncols, group i % ncols)."""
    from PIL import Image, ImageDraw

    th, tw = tile_shape
    f = layout.factor
    ink = 0 if int(background) >= 128 else 255  # black on a light background, white on a dark one
    for i, text in enumerate(labels):
        if not text:
            continue
        mask = Image.new("L", (max(1, layout.font.getbbox(text)[2]), layout.line), 0)
        ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=layout.font)
        m = (np.asarray(mask) > 127).repeat(f, axis=0).repeat(f, axis=1)[:, :layout.width]  # cut at its tiles' edge
        row, col = divmod(i, ncols)
        y = pad + row * (layout.strip + th + pad) + f * _LABEL_MARGIN
        x = pad + col * layout.span * (tw + pad) + (layout.width - m.shape[1]) // 2
        canvas[y:y + m.shape[0], x:x + m.shape[1]][m] = ink


# ----------------------------------------------------------------------------- files


def write_png(path: Union[str, os.PathLike], rgb: np.ndarray) -> str:
    """Write a uint8 (H, W, 3) array as a PNG file with Pillow (matplotlib's own image writer is
    Pillow too, so Pillow is the one dependency: `pip install lrpfast[plot]`). Returns the path."""
    rgb = np.ascontiguousarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise HeatmapError(f"write_png: expected a uint8 (H, W, 3) array, got {rgb.dtype} {tuple(rgb.shape)}")
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("lrpfast: writing PNG files needs Pillow; pip install 'lrpfast[plot]'") from None
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    Image.fromarray(rgb).save(path, format="PNG")
    return path


def save_heatmap(path, relevance, input=None, **kwargs) -> str:
    """Write one relevance map ((H, W) or (C, H, W)) as a PNG; kwargs as for `heatmap`
    (scale defaults to automatic here). Returns the path."""
    kwargs.setdefault("scale", None)
    rgb = heatmap(relevance, input=input, **kwargs)
    if rgb.ndim != 3:
        raise HeatmapError(f"save_heatmap: one map expected, got a batch of {rgb.shape[0]}; use save_heatmaps")
    return write_png(path, rgb)


def save_heatmaps(out_dir, relevance, names: Optional[Sequence[str]] = None, inputs=None,
                  **kwargs) -> List[str]:
    """Write a batch (B, C, H, W) of maps as out_dir/<name>.png (names default to 00000, 00001, ...).
    kwargs as for `heatmap`. Returns the paths."""
    kwargs.setdefault("scale", None)
    rgb = heatmap(relevance, input=inputs, **kwargs)
    if rgb.ndim == 3:
        rgb = rgb[None]
    names = list(names) if names is not None else [f"{i:05d}" for i in range(len(rgb))]
    if len(names) != len(rgb):
        raise HeatmapError(f"save_heatmaps: {len(names)} names for {len(rgb)} maps")
    os.makedirs(out_dir, exist_ok=True)
    return [write_png(os.path.join(out_dir, n if n.endswith(".png") else n + ".png"), img) for n, img in zip(names, rgb)]


def save_grid(path, relevance, inputs=None, **kwargs) -> str:
    """Write `heatmap_grid(relevance, inputs, **kwargs)` as a PNG. Returns the path."""
    return write_png(path, heatmap_grid(relevance, inputs, **kwargs))
