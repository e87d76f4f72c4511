"""Which timm families lrpfast explains: the smallest variant of each (random weights, float64).

    python benchmarks/timm_zoo.py [--families a,b,...] [--limit N] [--json out.json]

A family is a timm model module (timm.list_modules(): resnet, vision_transformer, ...); its
smallest variant is the one with the fewest parameters (counted on the meta device). Each is
built with random weights and randomised BatchNorm statistics, in eval mode and float64, and
explained with ε = 0 for a batch of 2; a row is

    ok        the logits equal model(x) (relative L2) and the map equals the gradient oracle
              (lrpfast/oracle.py) to 1e-8; a model that computes part of itself in a lower
              precision (efficientvit_mit's attention casts to float32) to 10 ulp of that dtype
              (float32: 1.2e-6): there LRP and the oracle both carry its round-off
    WRONG     it ran, but one of the two is off (a silently wrong map: a bug)
    refused   a RelevanceError naming the op or module (what is missing)
    error     anything else (timm itself failing at that size, ...)

Nothing is downloaded: no pretrained weights. Input size: the model's own where it is fixed,
else 64x64 (96 for inception, which needs more).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import warnings

import torch


def smallest_variants(timm, families, limit):
    out = {}
    for fam in families:
        best = None
        for name in timm.list_models(module=fam)[:limit]:
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m = timm.create_model(name, pretrained=False)
            except Exception:  # noqa: BLE001 (a variant timm cannot build without extra packages)
                continue
            n = sum(p.numel() for p in m.parameters())
            if best is None or n < best[0]:
                best = (n, name)
        if best is not None:
            out[fam] = best[1]
    return out


def randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            if isinstance(m, torch.nn.Linear) and m.weight.abs().max() == 0:   # zero-initialised heads
                m.weight.normal_(0, 0.05, generator=g)
    return model


class _Timeout(Exception):
    pass


def lowest_float_dtype(model, x):
    """The least precise floating dtype among the tensors model(x) computes from x (x's own when
    none; constants such as float32 position tables do not count), and model(x)."""
    from torch.overrides import TorchFunctionMode

    seen = {x.dtype}

    class Dtypes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad:
                    seen.add(t.dtype)
            return out

    with torch.enable_grad(), Dtypes():
        want = model(x.detach().requires_grad_())
    return max(seen, key=lambda d: torch.finfo(d).eps), want.detach()


def check(timm, name, seconds):
    import lrpfast
    from lrpfast.oracle import gradient_oracle
    from lrpfast.ops import RelevanceError

    def alarm(*_):
        raise _Timeout()

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = randomize(timm.create_model(name, pretrained=False, num_classes=5)).to(torch.float64).eval()
        cfg = model.pretrained_cfg
        c, h, w = cfg.get("input_size", (3, 224, 224))
        x = torch.randn(2, c, h, w, dtype=torch.float64)
        if not cfg.get("fixed_input_size", False):
            small = 96 if "inception" in name else min(h, 64)
            try:   # a smaller input where the model takes one (patch sizes permitting)
                with torch.no_grad():
                    model(x[:, :, :small, :small])
                x = x[:, :, :small, :small].contiguous()
            except Exception:  # noqa: BLE001 (the model's own size then)
                pass
        low, want = lowest_float_dtype(model, x)
        tol = max(1e-8, 10 * torch.finfo(low).eps)
        t = torch.tensor([0, 3])
        e = lrpfast.LRP(model, eps=0.0).explain(x, t)
        logit_err = ((e.logits - want).norm() / want.norm()).item()
        o = gradient_oracle(model, x, t)
        err = ((e.relevance - o).norm() / o.norm()).item()
        status = "ok" if logit_err < 1e-8 and err < tol else "WRONG"
        detail = f"logits {logit_err:.1e}, oracle {err:.1e}"
        if low != x.dtype:
            detail += f" (computes in {str(low).replace('torch.', '')} inside: oracle to {tol:.1e})"
    except RelevanceError as exc:
        status, detail = "refused", str(exc).split(". Supported:")[0][:160]
    except _Timeout:
        status, detail = "error", f"over {seconds} s"
    except Exception as exc:  # noqa: BLE001 (reported in the table)
        status, detail = "error", f"{type(exc).__name__}: {str(exc)[:140]}"
    finally:
        signal.alarm(0)
    return status, detail, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", help="comma-separated timm modules (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated modules to leave out (e.g. deepseek_vit: 412M "
                                               "parameters, minutes in float64 on 2 cores)")
    ap.add_argument("--limit", type=int, default=40, help="variants per family to size up (default 40)")
    ap.add_argument("--timeout", type=int, default=120, help="seconds per model (default 120)")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args(argv)
    try:
        import timm
    except ImportError:
        print("timm is not installed (pip install lrpfast[zoo])")
        return 2
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    fams = args.families.split(",") if args.families else sorted(timm.list_modules())
    fams = [f for f in fams if f not in args.skip.split(",")]
    variants = smallest_variants(timm, fams, args.limit)
    rows, counts = [], {}
    print(f"timm {timm.__version__}, torch {torch.__version__}: {len(variants)} families")
    for fam, name in sorted(variants.items()):
        status, detail, secs = check(timm, name, args.timeout)
        counts[status] = counts.get(status, 0) + 1
        rows.append({"family": fam, "model": name, "status": status, "detail": detail, "seconds": round(secs, 1)})
        print(f"{fam:24s} {name:36s} {status:8s} {detail}  ({secs:.0f} s)", flush=True)
    print("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"timm": timm.__version__, "rows": rows, "counts": counts}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
