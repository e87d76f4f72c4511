"""One benchmark configuration (model, rule, dtype, device, batch): build every implementation,
compute the float64 reference, time them round-robin, measure peak memory, and return one
JSON-ready dict."""
from __future__ import annotations

import gc
from typing import Dict, Optional, Sequence

import torch

from .implementations import BUILDERS, Impl, Skip, Workload, gradient_reference, reference, relative_l2
from .timing import Timer, paired_ratio, peak_memory, round_robin, summarize
from .workloads import build_model, make_input

# Whose speed the "N× faster than" lines are about: the first of these that ran.
PRIMARY = ("lrpfast", "rel-chain", "lrpfast-fallback", "rel-chain-fallback")


def measure(model_name: str, batch: int, composite: str = "epsilon", dtype: torch.dtype = torch.float32,
            device="cpu", impls: Sequence[str] = tuple(BUILDERS), warmup: int = 1, repeats: int = 5,
            eps: float = 1e-6, stabilizer: str = "sign", init: str = "logit", params: Optional[dict] = None,
            memory: bool = True, progress=None, model=None) -> dict:
    device = torch.device(device)
    if model is None:
        model = build_model(model_name)
    model = model.to(device=device, dtype=dtype)
    x = make_input(model_name, batch, dtype, device)
    with torch.no_grad():
        target = model(x).argmax(1)
    w = Workload(model_name, model, x, target, composite, eps, stabilizer, init, dict(params or {}))
    result = {"model": model_name, "composite": composite, "dtype": str(dtype).replace("torch.", ""),
              "device": str(device), "batch": batch, "eps": eps, "stabilizer": stabilizer, "init": init,
              "params": dict(params or {}), "warmup": warmup, "repeats": repeats}

    try:
        ref, ref_label = reference(w)
    except Exception as exc:  # no reference: the times still stand, the agreement column is empty
        ref, ref_label = None, f"float64 reference failed: {type(exc).__name__}: {str(exc)[:300]}"
    result["reference"] = ref_label if ref is not None else None
    result["reference_note"] = None if ref is not None else ref_label
    try:
        grad_ref = gradient_reference(w) if "floor" in impls else None
    except Exception:
        grad_ref = None
    gc.collect()

    rows: Dict[str, dict] = {}
    built: Dict[str, Impl] = {}
    for name in impls:
        try:
            built[name] = BUILDERS[name](w)
            rows[name] = {"name": name, "status": "ok", "note": built[name].note}
        except Skip as exc:
            rows[name] = {"name": name, "status": "skipped", "note": str(exc)}
        except Exception as exc:  # a peer failing to set up is a row, not a crash
            rows[name] = {"name": name, "status": "error", "note": f"setup: {type(exc).__name__}: {exc}"}
    if progress is not None:
        progress.add_total((warmup + repeats) * len(built))

    def on_first(name, out):
        against = ref if built[name].is_relevance else grad_ref
        if against is not None:
            rows[name]["agreement_rel_l2"] = relative_l2(out, against)
        rows[name]["finite"] = bool(torch.isfinite(out).all())

    def on_error(name, exc):
        rows[name].update(status="error", note=f"{type(exc).__name__}: {str(exc)[:300]}")

    times = round_robin({n: i.call for n, i in built.items()}, Timer(device), warmup, repeats,
                        on_first=on_first, on_error=on_error, tick=progress.tick if progress is not None else None)
    floor_t = times.get("floor")
    for name, t in times.items():
        row = rows[name]
        row.update(summarize(t), times_s=t)
        row["per_image_s"] = row["median_s"] / batch
        row["x_floor"] = paired_ratio(t, floor_t) if floor_t else None
        row.setdefault("agreement_rel_l2", None)
        if memory:
            try:
                row["peak_memory"] = peak_memory(built[name].call, device)
            except Exception as exc:
                row["peak_memory"] = {"bytes": None, "how": f"failed: {exc}"}
    for impl in built.values():
        impl.close()

    primary = next((p for p in PRIMARY if p in times), None)
    result["primary"] = primary
    result["speedups"] = ({n: paired_ratio(t, times[primary]) for n, t in times.items() if n != primary}
                          if primary else {})
    result["implementations"] = [rows[n] for n in impls]
    del built, ref, grad_ref, w
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result
