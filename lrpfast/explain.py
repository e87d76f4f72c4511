"""`lrpfast explain`: relevance heatmaps (and raw relevance) for images, tensors or a dataset.

    lrpfast explain demo                                    # held-out MNIST digits, the demo CNN
    lrpfast explain photos/ --model vgg16 --weights vgg16.pth --normalize imagenet --size 256 --crop 224 \\
        --composite epsilon_plus_flat --target top3 --overlay --out heatmaps/
    lrpfast explain x.npy --model mypkg.nets:make_net --weights net.pt --save-relevance
    torchrun --nproc_per_node 4 -m lrpfast explain images/ --model resnet50 --weights r50.pth --dataset --out shards/

Models: "demo" (the demo's trained MNIST CNN), "seed_mnist_cnn[:variant]", a torchvision model
name, or "package.module:factory" / "path/to/file.py:factory" (a callable returning an
nn.Module); --weights loads a state dict into it. Exit status 2 with one clear line on bad input.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import math
import os
import sys
from typing import List, Optional

import torch
import torch.nn as nn

from .data import DEMO_SOURCES, DataError
from .ops import RelevanceError

NORMALIZE_PRESETS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


class ModelLoadError(ValueError):
    """A model that cannot be built or a state dict that does not fit it."""


# ----------------------------------------------------------------------------- models


def build_model(spec: str, weights: Optional[str] = None, num_classes: Optional[int] = None,
                cache_dir: Optional[str] = None) -> nn.Module:
    """An nn.Module in eval mode from `spec` (see the module docstring), with `weights` loaded."""
    if spec == "demo":
        from .demo import demo_model

        model, _ = demo_model(cache_dir, log=lambda s: print(s, file=sys.stderr))
    elif spec.startswith("seed_mnist_cnn"):
        from .models import seed_mnist_cnn

        variant = spec.partition(":")[2] or "notebook"
        try:
            model = seed_mnist_cnn(variant)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
    elif ":" in spec:
        model = _from_factory(spec, num_classes)
    else:
        model = _from_torchvision(spec, num_classes)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _from_factory(spec: str, num_classes: Optional[int]) -> nn.Module:
    where, _, attr = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            if not os.path.exists(where):
                raise ModelLoadError(f"model {spec!r}: file {where!r} does not exist")
            mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(where))[0], where)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"model {spec!r}: cannot import {where!r} ({type(exc).__name__}: {exc})") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelLoadError(f"model {spec!r}: {where!r} has no callable {attr!r}")
    try:
        model = factory(num_classes=num_classes) if num_classes is not None else factory()
    except Exception as exc:
        raise ModelLoadError(f"model {spec!r}: {attr}() failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model {spec!r}: {attr}() returned a {type(model).__name__}, expected an nn.Module")
    return model


def _from_torchvision(name: str, num_classes: Optional[int]) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise ModelLoadError(f"model {name!r}: torchvision is not installed (pip install torchvision), "
                             "or give the model as package.module:factory") from None
    available = torchvision.models.list_models()
    if name not in available:
        close = [m for m in available if name.lower() in m or m in name.lower()][:5]
        raise ModelLoadError(f"model {name!r}: not a torchvision model" + (f" (did you mean {', '.join(close)}?)" if close else "")
                             + "; give a torchvision name or package.module:factory")
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    # weights=None: never download; the user's --weights file is the only source of parameters.
    return torchvision.models.get_model(name, weights=None, **kwargs)


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict file into model (also {"state_dict": ...} / {"model": ...} checkpoints
    and DistributedDataParallel's "module." prefix). Errors say what does not fit."""
    if not os.path.exists(path):
        raise ModelLoadError(f"weights file {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read weights file {path!r} as a state dict ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); save it with "
                             "torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"weights file {path!r} does not hold a state dict (name -> tensor)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append("shape mismatch " + "; ".join(mismatched[:3]) + (" ..." if len(mismatched) > 3 else ""))
        if missing:
            parts.append(f"missing {missing[:3]}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}" + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""))
        raise ModelLoadError(f"weights file {path!r} does not fit the model: " + ", ".join(parts))
    model.load_state_dict(state)


# ----------------------------------------------------------------------------- arguments


# Argument types: a bad value is argparse's error (one line, exit status 2: lrpfast.cli), raised
# while the command line is parsed, before any input or model is loaded. Each message says what
# the argument may be; argparse prefixes it with the argument's name.


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}")
        return v

    parse.__name__ = f"int >= {minimum}"
    return parse


def _finite_float(text: str, low: float, high: float = math.inf, low_open: bool = False) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v < low or (low_open and v == low) or v > high:
        raise argparse.ArgumentTypeError(
            f"must be a number in {'(' if low_open else '['}{low:g}, {high:g}], got {text!r}" if math.isfinite(high)
            else f"must be a finite number >= {low:g}, got {text!r}")
    return v


def _eps(text: str) -> float:
    return _finite_float(text, 0.0)


def _percentile(text: str) -> float:
    return _finite_float(text, 0.0, 100.0, low_open=True)


def _floats(text: str) -> List[float]:
    try:
        v = [float(s) for s in text.split(",")]
    except ValueError:
        v = [math.nan]
    if not all(math.isfinite(f) for f in v):
        raise argparse.ArgumentTypeError(f"must be finite numbers separated by commas (e.g. 0.5 or 0.485,0.456,0.406), "
                                         f"got {text!r}")
    return v


def _std(text: str) -> List[float]:
    v = _floats(text)
    if any(f <= 0 for f in v):
        raise argparse.ArgumentTypeError(f"must be positive numbers separated by commas, got {text!r}")
    return v


def _size(text: str):
    try:
        v = [int(s) for s in text.lower().replace("x", ",").split(",")]
    except ValueError:
        v = []
    if len(v) not in (1, 2) or min(v) < 1:
        raise argparse.ArgumentTypeError(f"must be N or HxW with positive ints (e.g. 224 or 256x320), got {text!r}")
    return v[0] if len(v) == 1 else tuple(v)


def _device(text: str) -> str:
    try:
        torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"must be a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    return text


def _cmap(text: str) -> str:
    from .heatmaps import COLORMAPS, HeatmapError, colormap_table

    try:
        colormap_table(text)
    except HeatmapError:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(COLORMAPS)} or a matplotlib colour map name "
                                         f"(with matplotlib installed), got {text!r}") from None
    return text


def _target(text: str) -> str:
    from .dataset import parse_target

    try:
        parse_target(text)
    except RelevanceError:
        raise argparse.ArgumentTypeError(f"must be argmax, a class index, topK (e.g. top3) or label, got {text!r}") from None
    return text


def _param(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, float(value)
    except ValueError:
        return key, value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("inputs", help="'demo' (held-out MNIST digits), a folder of images, an image, or a .npy/.npz/.pt file")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="'demo', 'seed_mnist_cnn[:variant]', a torchvision name, or package.module:factory "
                        "(default: demo for demo inputs)")
    g.add_argument("--weights", "--state-dict", dest="weights", default=None, help="state dict file to load into the model")
    g.add_argument("--num-classes", type=_int_at_least(1), default=None, help="passed to the model factory / torchvision builder")
    g.add_argument("--device", type=_device, default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--cache-dir", default=None, help="demo weights cache (default ~/.cache/lrpfast)")
    g = p.add_argument_group("LRP")
    g.add_argument("--composite", "--rule", dest="composite", default=None,
                   help="rule composite, e.g. epsilon, epsilon_plus, epsilon_plus_flat, epsilon_gamma_box, "
                        "epsilon_alpha2_beta1 (default: ε everywhere)")
    g.add_argument("--eps", type=_eps, default=1e-6, help="ε (default 1e-6)")
    g.add_argument("--stabilizer", choices=("sign", "plus"), default="sign", help="z + ε·sign(z) (default) or z + ε (seed)")
    g.add_argument("--init", choices=("logit", "onehot"), default="logit", help="initial relevance (default: the target logit)")
    g.add_argument("--attention", choices=("cp", "attnlrp"), default="cp",
                   help="rule of attention blocks: cp (weights held constant, default) or attnlrp (through the "
                        "softmax to queries and keys)")
    g.add_argument("--param", action="append", type=_param, default=[], metavar="KEY=VALUE",
                   help="extra LRP parameter, e.g. gamma=0.25 (repeatable)")
    g.add_argument("--target", type=_target, default="argmax", help="argmax (default), a class index, topK (e.g. top3), or label")
    g = p.add_argument_group("input preprocessing")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None, help="image channels (default 3; 1 for seed_mnist_cnn)")
    g.add_argument("--size", type=_size, default=None, help="resize images: N (shorter side) or HxW")
    g.add_argument("--crop", type=_size, default=None, help="centre crop after resizing: N or HxW")
    g.add_argument("--normalize", choices=sorted(NORMALIZE_PRESETS), default=None, help="mean/std preset")
    g.add_argument("--mean", type=_floats, default=None, help="per-channel mean, e.g. 0.5 or 0.485,0.456,0.406")
    g.add_argument("--std", type=_std, default=None, help="per-channel std")
    g.add_argument("--batch-size", type=_int_at_least(1), default=32, help="batch size (default 32)")
    g.add_argument("--workers", type=_int_at_least(0), default=0, help="DataLoader worker processes (default 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="lrpfast-explain", help="output folder (default ./lrpfast-explain)")
    g.add_argument("--save-relevance", action="store_true", help="also write the raw relevance to OUT/relevance.pt")
    g.add_argument("--no-png", action="store_true", help="write no heatmap PNGs")
    g.add_argument("--grid", type=_int_at_least(0), default=32, help="also write OUT/grid.png with the first N samples (0: none)")
    g.add_argument("--cmap", type=_cmap, default="bwr", help="bwr (default), coldnhot, gray, hot, or a matplotlib name")
    g.add_argument("--normalization", choices=("symmetric", "absolute"), default="symmetric")
    g.add_argument("--percentile", type=_percentile, default=100.0, help="scale by this percentile of |R| (default 100: max)")
    g.add_argument("--overlay", action="store_true", help="draw heatmaps over the input images")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("dataset mode (shards; resumable; torchrun)")
    g.add_argument("--dataset", action="store_true", help="stream relevance to OUT in shards with an index (no PNGs)")
    g.add_argument("--shard-size", type=_int_at_least(1), default=1024, help="samples per shard (default 1024)")
    g.add_argument("--no-resume", action="store_true", help="start over instead of skipping finished shards")
    g.add_argument("--no-verify-data", action="store_true",
                   help="on resume, do not re-read finished shards' inputs to check that the data is unchanged")
    g.add_argument("--storage-dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="dtype of the stored relevance (default: as computed)")


# ----------------------------------------------------------------------------- run


def _normalizer(args, channels: int):
    """(x - mean) / std per channel, on whatever device x is (each torchrun rank has its own)."""
    mean, std = args.mean, args.std
    if args.normalize:
        mean, std = NORMALIZE_PRESETS[args.normalize]
    if mean is None and std is None:
        return None
    mean = torch.tensor(mean if mean is not None else [0.0]).view(1, -1, 1, 1)
    std = torch.tensor(std if std is not None else [1.0]).view(1, -1, 1, 1)
    for name, t in (("--mean", mean), ("--std", std)):
        if t.shape[1] not in (1, channels):
            raise DataError(f"{name} has {t.shape[1]} values for {channels}-channel inputs")
    if (std == 0).any():
        raise DataError("--std must not contain 0")

    def normalize(x):
        shape = (1, -1, *([1] * (x.dim() - 2)))
        return (x - mean.to(x).view(shape)) / std.to(x).view(shape)

    return normalize


def run(args) -> int:
    try:
        return _run(args)
    except (DataError, ModelLoadError, RelevanceError, ImportError) as exc:
        print(f"lrpfast explain: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from .data import load_inputs
    from .dataset import Targets, explain_dataset, make_lrp

    model_spec = args.model or ("demo" if args.inputs in DEMO_SOURCES else None)
    if model_spec is None:
        raise ModelLoadError("--model is required for inputs other than 'demo' (a torchvision name or "
                             "package.module:factory)")
    channels = args.channels or (1 if model_spec == "demo" or model_spec.startswith("seed_mnist_cnn") else 3)
    # what needs neither the inputs nor the model is checked before either is loaded
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {args.device}: CUDA is not available")
    normalize = _normalizer(args, channels)
    if args.weights is not None and not os.path.exists(args.weights):
        raise ModelLoadError(f"weights file {args.weights!r} does not exist")
    dataset, names, labels = load_inputs(args.inputs, channels=channels, size=args.size, crop=args.crop)
    model = build_model(model_spec, args.weights, args.num_classes, args.cache_dir)
    lrp_kwargs = dict(args.param, stabilizer=args.stabilizer, init=args.init, attention=args.attention)
    if args.composite == "epsilon_gamma_box" and "low" not in lrp_kwargs and "high" not in lrp_kwargs:
        # z^B needs the input's bounds: the loaders give [0, 1], so they are 0 and 1 after the
        # normalisation (per channel). Other ranges: --param low=... --param high=...
        low, high = torch.zeros(1, channels, 1, 1), torch.ones(1, channels, 1, 1)  # the rule moves them to x
        if normalize is not None:
            low, high = normalize(low), normalize(high)
        lrp_kwargs.update(low=low, high=high)
    target = args.target
    if target == "label" and labels is not None:
        target = labels  # labels from the input file/demo as per-sample targets

    if args.dataset:
        summary = explain_dataset(model, dataset, args.out, target=target, batch_size=args.batch_size,
                                  shard_size=args.shard_size, eps=args.eps, composite=args.composite,
                                  lrp_kwargs=lrp_kwargs, device=None if args.device is None else device,
                                  storage_dtype=getattr(torch, args.storage_dtype) if args.storage_dtype else None,
                                  transform=normalize, resume=not args.no_resume, verify_data=not args.no_verify_data, num_workers=args.workers,
                                  progress=not args.no_progress)
        if summary["rank"] == 0:
            print(f"{summary['n_samples']} samples in {summary['n_shards']} shards under {args.out} "
                  f"({summary['world_size']} process(es); this one wrote {len(summary['shards_written'])}, "
                  f"skipped {summary['shards_skipped']} finished) in {summary['seconds']:.1f} s")
        return 0

    model = model.to(device)
    lrp = make_lrp(model, eps=args.eps, composite=args.composite, **lrp_kwargs)
    targets = Targets(target, len(dataset))
    _explain_to_pngs(args, model, lrp, targets, dataset, names, device, normalize)
    return 0


def _explain_to_pngs(args, model, lrp, targets, dataset, names, device, normalize) -> None:
    from torch.utils.data import DataLoader

    from .heatmaps import save_grid, save_heatmaps

    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    bar = None
    if not args.no_progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(dataset), unit="img", desc="explaining", dynamic_ncols=True)
        except ImportError:
            pass
    os.makedirs(args.out, exist_ok=True)
    heat_dir = os.path.join(args.out, "heatmaps")
    style = {"cmap": args.cmap, "normalization": args.normalization, "percentile": args.percentile}
    keep_rel, keep_t, keep_logits, grid_rel, grid_x = [], [], [], [], []
    start = 0
    try:
        for batch in loader:
            x_show = batch[0] if isinstance(batch, (tuple, list)) else batch
            x = x_show.to(device)
            if normalize is not None:
                x = normalize(x)
            rows_b = list(range(start, start + len(x)))
            res = lrp.explain(x, targets(model, x, None, rows_b))
            rel, t = res.relevance.detach().cpu(), res.targets.detach().cpu()
            batch_names = names[start:start + len(x)]
            if not args.no_png:
                _write_pngs(heat_dir, rel, t, batch_names, x_show if args.overlay else None, style, save_heatmaps)
            if args.save_relevance:
                keep_rel.append(rel)
            keep_t.append(t)
            keep_logits.append(res.logits.detach().cpu())
            if sum(len(g) for g in grid_rel) < args.grid:
                grid_rel.append(rel)
                grid_x.append(x_show.cpu())
            start += len(x)
            if bar is not None:
                bar.update(len(x))
    finally:
        if bar is not None:
            bar.close()
    logits, t_all = torch.cat(keep_logits), torch.cat(keep_t)
    _write_predictions(os.path.join(args.out, "predictions.csv"), names, logits, t_all)
    written = [os.path.join(args.out, "predictions.csv")]
    if args.grid > 0:
        g_rel, g_x = torch.cat(grid_rel)[:args.grid], torch.cat(grid_x)[:args.grid]
        written.append(save_grid(os.path.join(args.out, "grid.png"), g_rel, g_x, overlay=args.overlay, **style))
    if args.save_relevance:
        path = os.path.join(args.out, "relevance.pt")
        torch.save({"relevance": torch.cat(keep_rel), "targets": t_all, "logits": logits, "names": list(names)}, path)
        written.append(path)
    if not args.no_png:
        written.append(heat_dir + os.sep)
    print(f"explained {len(names)} inputs; wrote {', '.join(written)}")


def _write_pngs(heat_dir, rel, t, names, x_show, style, save_heatmaps) -> None:
    if t.dim() == 2:  # K targets per sample: relevance (B, K, ...), one file per target
        k = t.shape[1]
        flat_names = [f"{n}_class{int(t[i, j])}" for i, n in enumerate(names) for j in range(k)]
        inputs = None if x_show is None else x_show.repeat_interleave(k, dim=0)
        save_heatmaps(heat_dir, rel.reshape(-1, *rel.shape[2:]), flat_names, inputs=inputs, **style)
    else:
        save_heatmaps(heat_dir, rel, [f"{n}_class{int(c)}" for n, c in zip(names, t)], inputs=x_show, **style)


def _write_predictions(path, names, logits, targets) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "predicted", "explained", "explained_logit"])
        t2 = targets if targets.dim() == 2 else targets[:, None]
        for i, n in enumerate(names):
            w.writerow([n, int(logits[i].argmax()), " ".join(str(int(c)) for c in t2[i]),
                        " ".join(f"{logits[i, int(c)].item():.6g}" for c in t2[i])])
