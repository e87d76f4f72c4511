"""Timing and memory primitives of `lrpfast bench`.

Every implementation of one configuration is timed round-robin: round i calls each of them once
(in an order rotated every round), so that a slow phase of a shared machine hits all of them
alike, and ratios can be taken round by round ("paired"). Times are wall-clock on the CPU
(perf_counter) and CUDA events around the call on a GPU (the device is synchronised first, so
a call never inherits work queued by the previous one).

Peak memory is measured in a separate call, not in the timed ones (measuring costs time):
CUDA max allocated above what was allocated before the call, or the CPU resident set's peak
above its level before the call (Linux /proc/self/clear_refs resets the peak; without it
ru_maxrss gives a lower bound). glibc keeps freed memory resident and would serve the call from
it unseen, so the heap is trimmed (malloc_trim) first.
"""
from __future__ import annotations

import gc
import resource
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


class Timer:
    """Seconds one call of fn takes on `device`."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object]):
        """Returns (seconds, fn's result)."""
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, out
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


def round_robin(calls: Dict[str, Callable[[], object]], timer: Timer, warmup: int, repeats: int,
                on_first: Optional[Callable[[str, object], None]] = None,
                on_error: Optional[Callable[[str, BaseException], None]] = None,
                tick: Optional[Callable[[], None]] = None) -> Dict[str, List[float]]:
    """Times every call `warmup + repeats` times, interleaved; returns the timed (post-warm-up)
    seconds per name. `on_first(name, result)` sees each call's first result (agreement is
    computed from it); a call that raises is reported to `on_error` and dropped from the
    remaining rounds. `tick()` advances a progress bar once per call."""
    names = list(calls)
    times: Dict[str, List[float]] = {n: [] for n in names}
    alive = set(names)
    for i in range(warmup + repeats):
        shift = i % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            if name not in alive:
                if tick:
                    tick()
                continue
            try:
                seconds, out = timer(calls[name])
            except Exception as exc:  # one broken implementation must not end the whole run
                alive.discard(name)
                times[name] = []
                if on_error:
                    on_error(name, exc)
                if tick:
                    tick()
                continue
            if i == 0 and on_first:
                on_first(name, out)
            del out
            if i >= warmup:
                times[name].append(seconds)
            if tick:
                tick()
    return {n: t for n, t in times.items() if n in alive}


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), no numpy needed."""
    v = sorted(values)
    if not v:
        return float("nan")
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(seconds: Sequence[float]) -> dict:
    """Median and spread (quartiles, IQR) of one implementation's timed calls."""
    q1, med, q3 = quantile(seconds, 0.25), quantile(seconds, 0.5), quantile(seconds, 0.75)
    return {"median_s": med, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "min_s": min(seconds) if seconds else float("nan"),
            "n": len(seconds)}


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Median over rounds of a[i] / b[i] (both timed in the same round), or None."""
    n = min(len(a), len(b))
    if n == 0:
        return None
    return quantile([a[i] / b[i] for i in range(n)], 0.5)


# ----------------------------------------------------------------------------- memory

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> Optional[int]:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the peak resident set size (VmHWM) to the current one
        return True
    except OSError:
        return False


def _malloc_trim() -> bool:
    """Give freed heap memory back to the OS (glibc), so that the call's own working set shows
    up in the resident set instead of being served from pages already resident."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak memory one call of fn adds: {"bytes": int | None, "how": str}."""
    gc.collect()
    if torch.device(device).type == "cuda":
        device = torch.device(device)  # cuda:N: that device's counters, not the current device's
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return {"bytes": int(peak), "how": "cuda max_memory_allocated above the allocation before the call"}
    trimmed = _malloc_trim()
    base = _status_kib("VmRSS")
    if base is not None and _reset_peak_rss():
        out = fn()
        peak = _status_kib("VmHWM")
        del out
        how = "CPU resident set: peak (VmHWM) above the level before the call"
        return {"bytes": max(0, (peak - base) * 1024), "how": how + (" (after malloc_trim)" if trimmed else "")}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    return {"bytes": (after - before) * 1024, "how": "growth of the process's peak RSS (ru_maxrss): a lower bound"}
