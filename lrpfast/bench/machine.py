"""What the figures were measured on: CPU, GPU, torch/CUDA versions, what lrpfast compiled."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Optional

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def git_commit() -> Optional[str]:
    """`git rev-parse --short HEAD` of the lrpfast checkout, when it is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info(device: torch.device) -> dict:
    import lrpfast

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "gpu": None,
        "lrpfast": getattr(lrpfast, "__version__", None),
        "lrpfast_build": lrpfast.build_info(),
        "git_commit": git_commit(),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}", "sm_count": props.multi_processor_count,
                       "driver_cuda": _driver_cuda()}
    return info


def _driver_cuda() -> Optional[str]:
    """The CUDA version the installed driver supports ("13.0"), from the driver library itself
    (torch has no public call for it); None without a driver."""
    if not torch.cuda.is_available():
        return None
    try:
        import ctypes

        v = ctypes.c_int(0)
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) != 0 or v.value <= 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{v.value // 1000}.{(v.value % 1000) // 10}"


def describe(info: dict) -> str:
    """One line for the terminal and RESULTS.md."""
    where = info["gpu"]["name"] if info.get("gpu") else f"{info['cpu']} ({info['torch_threads']} threads)"
    build = info["lrpfast_build"]
    ext = "extension" if build.get("extension_loaded") else "fallback only"
    return (f"{where}; torch {info['torch']} (CUDA {info['torch_cuda']}); lrpfast {ext}"
            f"{' +CUDA ' + str(build.get('cuda_archs')) if build.get('cuda') else ''}; commit {info['git_commit']}; "
            f"{info['date']}")
