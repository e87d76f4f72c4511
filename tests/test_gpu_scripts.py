"""The GPU visit's scripts (benchmarks/gpu_figures.py, benchmarks/gpu_check.sh) on the CPU: the
parts that only matter when something goes wrong on the GPU (a profiler without a column, a model
that fails, the step's time cap) are exercised here with stand-ins, so that the one device call
does not find them broken."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def gpu_figures():
    spec = importlib.util.spec_from_file_location("gpu_figures", os.path.join(REPO, "benchmarks", "gpu_figures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Averages:
    def __init__(self, known):
        self.known = known

    def table(self, sort_by, **kwargs):
        if sort_by not in self.known:
            raise AttributeError(f"'FunctionEventAvg' object has no attribute {sort_by!r}")
        return f"table by {sort_by}"


class _Prof:
    def __init__(self, *known):
        self.known = known

    def key_averages(self):
        return _Averages(self.known)


def test_profile_table_falls_back_to_the_old_column_name(gpu_figures):
    assert gpu_figures.profile_table(_Prof("device_time_total", "cuda_time_total"), True) == \
        ("device_time_total", "table by device_time_total")
    assert gpu_figures.profile_table(_Prof("cuda_time_total"), True) == ("cuda_time_total", "table by cuda_time_total")
    key, text = gpu_figures.profile_table(_Prof(), True)
    assert text.startswith("(no table:") and "device_time_total" in text and "cuda_time_total" in text
    assert gpu_figures.profile_table(_Prof("cpu_time_total"), False)[0] == "cpu_time_total"


def test_profile_table_sorts_a_real_profile_by_device_time(gpu_figures):
    # The installed torch's profiler accepts the GPU sort key (without CUDA events the column is 0).
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(8, 8).mm(torch.ones(8, 8))
    key, text = gpu_figures.profile_table(prof, True)
    assert key == "device_time_total", text
    assert "aten::mm" in text


def _fake_parts(gpu_figures, monkeypatch, vgg16_error):
    def kernel_bandwidth(device, nbytes, reps, out=None):
        out["float32"] = {"copy": {"GB_per_s": 10.0, "fraction_of_copy": 1.0},
                          "stab_div": {"GB_per_s": 9.0, "fraction_of_copy": 0.9}}
        return out

    def model_figures(device, name, batch, size, rounds, res=None, attention="cp"):
        for dt in ("float32", "bfloat16"):
            res[dt] = {"batch": batch, "size": size, "median_s": {"floor": 1e-3, "lrpfast": 1.1e-3},
                       "ratio_to_floor": 1.1, "rel_err_lrp_vs_cpu_f64": 1e-4, "rel_err_grad_vs_cpu_f64": 2e-4}
            if name == "vgg16":
                raise vgg16_error  # after float32: its figures must be kept
        return res

    def profile_breakdown(*args):
        raise RuntimeError("CUPTI could not be initialised")

    monkeypatch.setattr(gpu_figures, "kernel_bandwidth", kernel_bandwidth)
    monkeypatch.setattr(gpu_figures, "model_figures", model_figures)
    monkeypatch.setattr(gpu_figures, "profile_breakdown", profile_breakdown)


def test_figures_survive_a_failing_model_and_profiler(gpu_figures, monkeypatch, tmp_path, capsys):
    _fake_parts(gpu_figures, monkeypatch, RuntimeError("CUDA kernel failed"))
    out = tmp_path / "figures.json"
    monkeypatch.setattr(sys, "argv", ["gpu_figures.py", "--device", "cpu", "--tiny", "--out", str(out)])
    assert gpu_figures.main() == 1  # a failed part fails the step, but the other figures are there
    info = json.loads(out.read_text())
    assert list(info["kernels"]) == ["float32"]
    assert list(info["models"]["vgg16"]) == ["float32"]
    assert list(info["models"]["resnet50"]) == ["float32", "bfloat16"]
    assert [e.split(":")[0] for e in info["errors"]] == ["vgg16", "profile"]
    assert "CUDA kernel failed" in info["errors"][0] and "CUPTI" in info["errors"][1]
    text = (tmp_path / "figures.txt").read_text()
    assert "resnet50 bfloat16 b2" in text and "FAILED vgg16: RuntimeError: CUDA kernel failed" in text
    assert "Traceback" in capsys.readouterr().err


def test_figures_written_when_the_time_cap_interrupts(gpu_figures, monkeypatch, tmp_path):
    # gpu_check.sh stops a step at its cap with SIGINT: what was measured until then is on disk
    _fake_parts(gpu_figures, monkeypatch, KeyboardInterrupt())
    out = tmp_path / "figures.json"
    monkeypatch.setattr(sys, "argv", ["gpu_figures.py", "--device", "cpu", "--tiny", "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        gpu_figures.main()
    info = json.loads(out.read_text())
    assert list(info["kernels"]) == ["float32"] and list(info["models"]["vgg16"]) == ["float32"]
    assert "resnet50" not in info["models"]
    assert "vgg16 float32 b2" in (tmp_path / "figures.txt").read_text()


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", os.path.join(REPO, "benchmarks", "gpu_check.sh")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- gpu_check.sh, GPU branch

_STUB_PYTHON = """#!/usr/bin/env bash
echo "py $* | nocache=${PYTORCH_NO_CUDA_MEMORY_CACHING:-} path=${PYTHONPATH:-}" >> "$CALLS"
case "$*" in
  *"-m pytest"*)
    if [ -n "${SLOW_TESTS:-}" ]; then
      trap 'echo "pytest got INT" >> "$CALLS"; kill $! 2>/dev/null; exit 2' INT
      sleep 60 & wait
    fi
    echo "7 passed in 1.00s";;
esac
exit 0
"""
_STUB_SANITIZER = """#!/usr/bin/env bash
echo "san $* | nocache=${PYTORCH_NO_CUDA_MEMORY_CACHING:-}" >> "$CALLS"
echo "========= ERROR SUMMARY: 0 errors"
"""


def _run_gpu_branch(tmp_path, **env):
    """benchmarks/gpu_check.sh without --dry-run, with python and compute-sanitizer stubs that log
    their command lines: the GPU branch's commands, checked on a CPU."""
    import signal

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python", _STUB_PYTHON), ("compute-sanitizer", _STUB_SANITIZER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.txt"
    full_env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=str(bin_dir / "python"),
                    CALLS=str(calls), **env)
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), str(tmp_path / "out")],
                          env=full_env, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return proc, calls.read_text().splitlines()


def test_gpu_check_gpu_branch_runs_every_step_in_order(tmp_path):
    proc, calls = _run_gpu_branch(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [line.split(":")[0] for line in (tmp_path / "out" / "summary.txt").read_text().splitlines()
             if line.endswith("]")]
    assert steps == ["build", "build_info", "tests", "figures", "sanitizer_memcheck", "bench_cli", "bench_cli_kernels",
                     "sanitizer_racecheck"]
    joined = "\n".join(calls)
    assert "py -m pip install --no-build-isolation --no-deps -e ." in joined
    (tests,) = [c for c in calls if "-m pytest" in c]
    assert "-m cuda -n 8 " in tests and tests.rstrip().split(" | ")[0].endswith(" tests")
    assert "py benchmarks/gpu_figures.py --device cuda --out" in joined
    sans = [c for c in calls if c.startswith("san ")]
    assert [c.split()[2] for c in sans] == ["memcheck", "racecheck"]
    for c in sans:
        assert "--report-api-errors no --error-exitcode 9 --kernel-name kns=lrpfast" in c
        assert "benchmarks/sanitizer_smoke.py --device cuda | nocache=1" in c
    assert all(f"path={REPO}" in c for c in calls if c.startswith("py benchmarks/"))
    bench = [c for c in calls if "-m lrpfast.cli bench" in c]
    assert len(bench) == 2 and all("--device cuda" in c for c in bench)


def test_gpu_check_interrupts_a_step_at_its_cap_and_skips_the_rest(tmp_path):
    # BUDGET_S=19, RESERVE_S=10: the tests step gets the ~9 s left, is stopped with SIGINT (pytest
    # would print its counts), and every later step is skipped, with a summary all the same.
    proc, calls = _run_gpu_branch(tmp_path, BUDGET_S="19", SLOW_TESTS="1")
    assert proc.returncode == 1
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "pytest got INT" in calls
    assert "tests: TIMED OUT after" in summary
    assert "figures: SKIPPED" in summary and "sanitizer_racecheck: SKIPPED" in summary
    assert not any("gpu_figures.py" in c or c.startswith("san ") for c in calls)
