"""Output of `lrpfast bench`: the terminal table, the JSON file, the PNG plot."""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional


def _ms(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 1e3:.3f}" if v < 0.01 else f"{v * 1e3:.1f}"


def _num(v, fmt) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _mib(mem) -> str:
    b = (mem or {}).get("bytes")
    return "-" if b is None else f"{b / 2**20:.0f}"


def config_title(c: dict) -> str:
    ref = c["reference"] or c.get("reference_note") or "none"
    return (f"{c['model']} | {c['composite']} | {c['dtype']} | {c['device']} | batch {c['batch']} | "
            f"eps {c['eps']:g} {c['stabilizer']} | init {c['init']} | reference: {ref}")


def format_config(c: dict) -> str:
    head = ["implementation", "median ms", "IQR ms", "ms/image", "x floor", "peak MiB", "rel L2 vs f64", "note"]
    rows = []
    for r in c["implementations"]:
        if r["status"] != "ok":
            rows.append([r["name"], "", "", "", "", "", "", f"{r['status']}: {r['note']}"])
            continue
        rows.append([r["name"], _ms(r["median_s"]), _ms(r["iqr_s"]), _ms(r["per_image_s"]), _num(r.get("x_floor"), ".2f"),
                     _mib(r.get("peak_memory")), _num(r.get("agreement_rel_l2"), ".1e"), r.get("note") or ""])
    widths = [max(len(str(x[i])) for x in [head] + rows) for i in range(len(head) - 1)]
    lines = [config_title(c)]
    fmt = lambda x: "  " + "  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(x, widths))) + "  " + str(x[-1])  # noqa: E731
    lines.append(fmt(head))
    lines += [fmt(x).rstrip() for x in rows]
    if c.get("primary") and c.get("speedups"):
        parts = [f"{n} {s:.2f}x" for n, s in c["speedups"].items() if s is not None]
        lines.append(f"  {c['primary']} is faster than (paired median time ratio): " + ", ".join(parts))
    return "\n".join(lines)


def format_kernels(k: dict) -> str:
    head = ["op", "impl", "MiB moved", "median ms", "IQR ms", "GB/s", "% of copy"]
    rows = [[r["op"], r["impl"], f"{r['bytes'] / 2**20:.0f}", _ms(r["median_s"]), _ms(r["iqr_s"]),
             _num(r.get("gb_per_s"), ".1f"), _num(r.get("fraction_of_copy") and 100 * r["fraction_of_copy"], ".0f")]
            for r in k["results"]]
    widths = [max(len(str(x[i])) for x in [head] + rows) for i in range(len(head))]
    lines = [f"kernels | {k['dtype']} | {k['device']} | relevance tensor {k['tensor_mib']:.0f} MiB"]
    lines += ["  " + "  ".join(str(v).rjust(w) if i > 1 else str(v).ljust(w) for i, (v, w) in enumerate(zip(x, widths)))
              for x in [head] + rows]
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def clean(o):  # NaN/inf are not JSON
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    with open(path, "w") as f:
        json.dump(clean(payload), f, indent=1)


def write_plot(path: str, configs: List[dict], title: str = "") -> Optional[str]:
    """Time per image against batch size, one line per implementation, the floor drawn bold;
    one panel per (model, rule, dtype, device). Returns None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    groups = {}
    for c in configs:
        groups.setdefault((c["model"], c["composite"], c["dtype"], c["device"]), []).append(c)
    if not groups:
        return "nothing to plot"
    n = len(groups)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.4 * rows), squeeze=False)
    for ax, (key, cs) in zip(axes.flat, groups.items()):
        series = {}
        for c in sorted(cs, key=lambda c: c["batch"]):
            for r in c["implementations"]:
                if r["status"] == "ok":
                    series.setdefault(r["name"], []).append((c["batch"], r["per_image_s"] * 1e3, r["q1_s"] * 1e3 / c["batch"],
                                                             r["q3_s"] * 1e3 / c["batch"]))
        for name, pts in series.items():
            b, y, lo, hi = zip(*pts)
            style = dict(color="black", linestyle="--", linewidth=2.5, marker="_", markersize=28, zorder=5) if name == "floor" else dict(marker="o")
            line, = ax.plot(b, y, label=name, **style)
            ax.fill_between(b, lo, hi, color=line.get_color(), alpha=0.1)
        batches = sorted({c["batch"] for c in cs})
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(v) for v in batches])
        ax.minorticks_off() if len(batches) > 1 else None
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("ms per image (median; band: IQR)")
        ax.set_title(" | ".join(key))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
