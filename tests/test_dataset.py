"""explain_dataset: shards + index against the direct whole-batch LRP call, resume after an
interruption, and two torch.distributed ranks (torchrun, gloo, CPU) against one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lrpfast
from lrpfast.dataset import explain_dataset, open_relevance, shard_path
from lrpfast.ops import RelevanceError

from .dataset_worker import BATCH_SIZE, N_SAMPLES, SHARD_SIZE, toy_inputs, toy_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def direct(model, x, target=None):
    """The oracle: one LRP call over the whole batch (no shards, no batching)."""
    return lrpfast.LRP(model)(x, target)


def shard_files(out_dir):
    return sorted(f for f in os.listdir(out_dir) if f.startswith("shard-"))


def test_shards_and_index_equal_one_direct_call(tmp_path):
    model, x = toy_model(), toy_inputs()
    summary = explain_dataset(model, x, tmp_path, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, progress=False)
    n_shards = -(-N_SAMPLES // SHARD_SIZE)
    assert summary["n_shards"] == n_shards and sorted(summary["shards_written"]) == list(range(n_shards))
    assert len(shard_files(tmp_path)) == n_shards

    maps = open_relevance(tmp_path)
    assert len(maps) == N_SAMPLES
    # The index says where each sample is; the shard's own indices must agree.
    for i in (0, SHARD_SIZE - 1, SHARD_SIZE, N_SAMPLES - 1):
        s, off = int(maps.index["shard"][i]), int(maps.index["offset"][i])
        assert int(maps.shard(s)["indices"][off]) == i
    expected = direct(model, x)
    torch.testing.assert_close(maps.load(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps[7], expected[7], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps.load(indices=[44, 3]), expected[[44, 3]], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        logits = model(x)
    assert torch.equal(maps.load("targets"), logits.argmax(1))
    torch.testing.assert_close(maps.load("logits"), logits, rtol=1e-5, atol=1e-6)
    manifest = json.load(open(tmp_path / "manifest.json"))
    assert manifest["complete"] and manifest["config"]["n_samples"] == N_SAMPLES


@pytest.mark.parametrize("target", ["label", 3, "top2", "tensor2d"])
def test_targets(tmp_path, target):
    model, x = toy_model(), toy_inputs()
    y = torch.arange(N_SAMPLES) % 5
    data = TensorDataset(x, y)
    if target == "label":
        expected_t = y
    elif target == 3:
        expected_t = torch.full((N_SAMPLES,), 3)
    elif target == "top2":
        with torch.no_grad():
            expected_t = model(x).topk(2, dim=1).indices
    else:
        target = expected_t = torch.stack([y, (y + 1) % 5], dim=1)
    explain_dataset(model, data, tmp_path, target=target, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, progress=False)
    maps = open_relevance(tmp_path)
    assert torch.equal(maps.load("targets"), expected_t)
    torch.testing.assert_close(maps.load(), direct(model, x, expected_t), rtol=1e-5, atol=1e-6)


def test_loader_storage_dtype_and_transform(tmp_path):
    model, x = toy_model(), toy_inputs()
    loader = DataLoader(TensorDataset(x), batch_size=4, shuffle=True)  # the sampler is ignored: dataset order
    explain_dataset(model, loader, tmp_path, shard_size=10, storage_dtype=torch.float16,
                    transform=lambda b: b * 2 - 1, progress=False)
    rel = open_relevance(tmp_path).load()
    assert rel.dtype == torch.float16
    torch.testing.assert_close(rel.float(), direct(model, x * 2 - 1), rtol=2e-3, atol=2e-3)


class Interrupting(Dataset):
    """The toy inputs; raises at sample `fail_at` while armed (a crash mid-run); counts reads."""

    def __init__(self, fail_at=None):
        self.x, self.fail_at, self.reads = toy_inputs(), fail_at, []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyboardInterrupt(f"simulated interruption at sample {i}")
        self.reads.append(i)
        return self.x[i]


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    model = toy_model()
    full = tmp_path / "full"
    explain_dataset(model, Interrupting(), full, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, progress=False)

    part = tmp_path / "part"
    fail_at = 2 * SHARD_SIZE + 4  # inside shard 2: shards 0 and 1 are done
    with pytest.raises(KeyboardInterrupt):
        explain_dataset(model, Interrupting(fail_at), part, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, progress=False)
    assert shard_files(part) == ["shard-000000.pt", "shard-000001.pt"]
    assert not [f for f in os.listdir(part) if f.endswith(".tmp")]
    with pytest.raises(RelevanceError, match="not complete"):
        open_relevance(part)
    done_before = {f: os.stat(part / f).st_mtime_ns for f in shard_files(part)}

    again = Interrupting()
    summary = explain_dataset(model, again, part, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, progress=False)
    assert summary["shards_skipped"] == 2
    assert sorted(again.reads) == list(range(2 * SHARD_SIZE, N_SAMPLES))  # finished shards not redone
    assert {f: os.stat(part / f).st_mtime_ns for f in done_before} == done_before
    a, b = open_relevance(part), open_relevance(full)
    for field in ("relevance", "targets", "logits"):
        assert torch.equal(a.load(field), b.load(field)), field


def test_resume_refuses_other_settings_and_overwrite_restarts(tmp_path):
    model, x = toy_model(), toy_inputs()
    explain_dataset(model, x, tmp_path, shard_size=SHARD_SIZE, progress=False)
    with pytest.raises(RelevanceError, match="other settings.*eps"):
        explain_dataset(model, x, tmp_path, shard_size=SHARD_SIZE, eps=0.1, progress=False)
    other = toy_model()
    with torch.no_grad():
        other[0].weight.add_(1.0)
    with pytest.raises(RelevanceError, match="model"):
        explain_dataset(other, x, tmp_path, shard_size=SHARD_SIZE, progress=False)
    explain_dataset(other, x, tmp_path, shard_size=2 * SHARD_SIZE, resume=False, progress=False)
    assert len(shard_files(tmp_path)) == -(-N_SAMPLES // (2 * SHARD_SIZE))  # the old, smaller shards are gone
    torch.testing.assert_close(open_relevance(tmp_path).load(), direct(other, x), rtol=1e-5, atol=1e-6)


def test_bad_targets_are_clear_errors(tmp_path):
    model, x = toy_model(), toy_inputs()
    with pytest.raises(RelevanceError, match="out of range.*5 outputs"):
        explain_dataset(model, x, tmp_path / "a", target=7, progress=False)
    with pytest.raises(RelevanceError, match="top6.*5 outputs"):
        explain_dataset(model, x, tmp_path / "b", target="top6", progress=False)
    with pytest.raises(RelevanceError, match="no labels"):
        explain_dataset(model, x, tmp_path / "c", target="label", progress=False)
    with pytest.raises(RelevanceError, match="target tensor"):
        explain_dataset(model, x, tmp_path / "d", target=torch.zeros(3, dtype=torch.long), progress=False)


def test_two_torchrun_ranks_equal_one_process(tmp_path):
    """Two CPU ranks (gloo) split the shards; their union equals the single-process run."""
    single = tmp_path / "single"
    explain_dataset(toy_model(), toy_inputs(), single, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, progress=False)

    out = tmp_path / "ranks"
    stdout = run_torchrun(out, 2, "cpu")
    assert "rank 0/2" in stdout and "rank 1/2" in stdout and "backend gloo" in stdout

    n_shards = -(-N_SAMPLES // SHARD_SIZE)
    shards = [torch.load(shard_path(out, s), weights_only=True) for s in range(n_shards)]
    assert {sh["rank"] for sh in shards} == {0, 1}  # both ranks did work, each its own shards
    assert all(sh["rank"] == s % 2 for s, sh in enumerate(shards))
    indices = torch.cat([sh["indices"] for sh in shards])
    assert len(indices) == N_SAMPLES and torch.equal(indices.sort().values, torch.arange(N_SAMPLES))  # none missing/duplicated
    a, b = open_relevance(out), open_relevance(single)
    assert json.load(open(out / "manifest.json"))["world_size"] == 2
    assert torch.equal(a.load("targets"), b.load("targets"))
    torch.testing.assert_close(a.load(), b.load(), rtol=1e-5, atol=1e-6)


def run_torchrun(out, nproc, *extra):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(REPO, "tests", "dataset_worker.py"), str(out), *extra]
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish in 300 s: {exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_cuda_device_and_nccl_group(tmp_path):
    """On a GPU: maps computed on CUDA equal the CPU's, and under torchrun the group is NCCL."""
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    explain_dataset(toy_model(), toy_inputs(), cpu, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, progress=False)
    explain_dataset(toy_model(), toy_inputs(), gpu, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, device="cuda",
                    progress=False)
    torch.testing.assert_close(open_relevance(gpu).load(), open_relevance(cpu).load(), rtol=1e-4, atol=1e-5)
    nccl = tmp_path / "nccl"
    stdout = run_torchrun(nccl, torch.cuda.device_count(), "cuda")
    assert "backend nccl" in stdout
    torch.testing.assert_close(open_relevance(nccl).load(), open_relevance(cpu).load(), rtol=1e-4, atol=1e-5)


def test_rank_device_policy(monkeypatch):
    """NCCL needs one GPU per rank: with fewer GPUs than local ranks, no device means the CPU
    (gloo) and an explicit "cuda" is a clear error; "cuda" means cuda:LOCAL_RANK."""
    from lrpfast.dataset import _rank_device

    def node(ranks, local, gpus):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        monkeypatch.setenv("LOCAL_RANK", str(local))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)

    node(2, 1, 1)
    assert _rank_device(None) is None
    with pytest.raises(RelevanceError, match="2 ranks on this node but 1 CUDA device"):
        _rank_device("cuda")
    assert _rank_device("cpu") == torch.device("cpu")
    node(4, 3, 4)
    assert _rank_device(None) == torch.device("cuda", 3) and _rank_device("cuda") == torch.device("cuda", 3)
    assert _rank_device("cuda:0") == torch.device("cuda", 0)  # explicit index: the user's choice
    node(2, 0, 0)
    assert _rank_device(None) is None
