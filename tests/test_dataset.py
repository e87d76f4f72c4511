"""explain_dataset: shards + index against the direct whole-batch LRP call, resume after an
interruption, resume refusing data that changed (same length), and two torch.distributed ranks
(torchrun, gloo, CPU) against one process."""
from __future__ import annotations

import json
import os
import re
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
    assert summary["shards_skipped"] == 2 and summary["shards_verified"] == 2
    assert sorted(summary["shards_written"]) == list(range(2, -(-N_SAMPLES // SHARD_SIZE)))
    # Reads: the first and last sample (the data fingerprint), the finished shards' samples once
    # (their input hashes, no LRP), the others once (explained).
    assert sorted(again.reads) == sorted([0, N_SAMPLES - 1] + list(range(N_SAMPLES)))
    assert {f: os.stat(part / f).st_mtime_ns for f in done_before} == done_before  # finished shards not redone
    a, b = open_relevance(part), open_relevance(full)
    for field in ("relevance", "targets", "logits"):
        assert torch.equal(a.load(field), b.load(field)), field


def _changed(x, i):
    """x with sample i changed (a copy)."""
    y = x.clone()
    y[i] = 1 - y[i]
    return y


def test_resume_refuses_a_changed_first_sample_with_the_same_length(tmp_path):
    model, x = toy_model(), toy_inputs()
    explain_dataset(model, x, tmp_path, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, progress=False)
    stamps = {f: os.stat(tmp_path / f).st_mtime_ns for f in shard_files(tmp_path) + ["manifest.json"]}
    for i, which in ((0, "first sample"), (N_SAMPLES - 1, "last sample")):
        with pytest.raises(RelevanceError, match=f"data changed.*{which} \\({i}\\).*resume=False"):
            explain_dataset(model, _changed(x, i), tmp_path, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE,
                            progress=False)
    # Refused before any work: the earlier run's folder is untouched and still opens.
    assert {f: os.stat(tmp_path / f).st_mtime_ns for f in stamps} == stamps
    torch.testing.assert_close(open_relevance(tmp_path).load(), direct(model, x), rtol=1e-5, atol=1e-6)
    # resume=False starts over on the new data.
    y = _changed(x, 0)
    summary = explain_dataset(model, y, tmp_path, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, resume=False,
                              progress=False)
    assert summary["shards_skipped"] == 0
    torch.testing.assert_close(open_relevance(tmp_path).load(), direct(model, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("complete", [True, False])
def test_resume_refuses_data_changed_only_in_a_middle_shard(tmp_path, complete):
    """First and last sample unchanged, one sample of shard 2 changed: the shard hashes catch it,
    whether the earlier run finished or was interrupted after that shard."""
    model, x = toy_model(), toy_inputs()
    if complete:
        explain_dataset(model, x, tmp_path, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, progress=False)
    else:
        with pytest.raises(KeyboardInterrupt):
            explain_dataset(model, Interrupting(fail_at=3 * SHARD_SIZE + 1), tmp_path, shard_size=SHARD_SIZE,
                            batch_size=BATCH_SIZE, progress=False)
        assert len(shard_files(tmp_path)) == 3
    stamps = {f: os.stat(tmp_path / f).st_mtime_ns for f in shard_files(tmp_path) + ["manifest.json"]}
    y = _changed(x, 2 * SHARD_SIZE + 5)
    with pytest.raises(RelevanceError, match=r"data changed.*shard 2 \(shard-000002\.pt, samples 16\.\.23\)"
                                             r".*resume=False") as info:
        explain_dataset(model, y, tmp_path, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, progress=False)
    assert "shard 1 " not in str(info.value) and "shard 3 " not in str(info.value)  # only the changed one
    assert {f: os.stat(tmp_path / f).st_mtime_ns for f in stamps} == stamps  # nothing written
    if complete:
        open_relevance(tmp_path)  # the earlier, finished run is still intact
    # The hash does not depend on the batching: the same data with another batch size resumes.
    summary = explain_dataset(model, x, tmp_path, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE + 2, progress=False)
    assert summary["shards_verified"] == len(stamps) - 1
    # Starting over on the changed data recomputes every shard.
    summary = explain_dataset(model, y, tmp_path, shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, resume=False,
                              progress=False)
    assert summary["shards_skipped"] == 0
    torch.testing.assert_close(open_relevance(tmp_path).load(), direct(model, y), rtol=1e-5, atol=1e-6)


def test_resume_with_unchanged_data_and_labels(tmp_path):
    """Unchanged (x, y) items resume without recomputing; a changed label alone (target="label")
    is changed data too; verify_data=False skips the checks (and the extra reads)."""
    model, x = toy_model(), toy_inputs()
    y = torch.arange(N_SAMPLES) % 5
    explain_dataset(model, TensorDataset(x, y), tmp_path, target="label", shard_size=SHARD_SIZE,
                    batch_size=BATCH_SIZE, progress=False)
    stamps = {f: os.stat(tmp_path / f).st_mtime_ns for f in shard_files(tmp_path)}
    summary = explain_dataset(model, TensorDataset(x, y), tmp_path, target="label", shard_size=SHARD_SIZE,
                              batch_size=BATCH_SIZE, progress=False)
    assert summary["shards_written"] == [] and summary["shards_verified"] == len(stamps)
    assert {f: os.stat(tmp_path / f).st_mtime_ns for f in stamps} == stamps
    y2 = y.clone()
    y2[SHARD_SIZE + 1] = (y2[SHARD_SIZE + 1] + 1) % 5
    with pytest.raises(RelevanceError, match=r"data changed.*shard 1 \("):
        explain_dataset(model, TensorDataset(x, y2), tmp_path, target="label", shard_size=SHARD_SIZE,
                        batch_size=BATCH_SIZE, progress=False)
    unchecked = Interrupting()
    explain_dataset(model, unchecked, tmp_path / "unchecked", shard_size=SHARD_SIZE, batch_size=BATCH_SIZE,
                    progress=False)
    unchecked.reads.clear()
    summary = explain_dataset(model, unchecked, tmp_path / "unchecked", shard_size=SHARD_SIZE, batch_size=BATCH_SIZE,
                              verify_data=False, progress=False)
    # only the two reads of the fingerprint the manifest records
    assert summary["shards_verified"] == 0 and summary["shards_written"] == [] and unchecked.reads == [0, N_SAMPLES - 1]


def test_resume_refuses_a_run_without_fingerprints(tmp_path):
    """A folder from before the data fingerprints (format 1) cannot be checked: a clear error."""
    model, x = toy_model(), toy_inputs()
    explain_dataset(model, x, tmp_path, shard_size=SHARD_SIZE, progress=False)
    manifest = json.load(open(tmp_path / "manifest.json"))
    del manifest["data"]
    json.dump(manifest, open(tmp_path / "manifest.json", "w"))
    with pytest.raises(RelevanceError, match="without a data fingerprint.*resume=False"):
        explain_dataset(model, x, tmp_path, shard_size=SHARD_SIZE, progress=False)


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

    # Resume on data changed in shard 3 only (rank 1's): rank 1 finds it, and both ranks stop with
    # the same message (no rank hangs, no rank goes on).
    stamps = {f: os.stat(out / f).st_mtime_ns for f in shard_files(out)}
    stdout = run_torchrun(out, 2, "cpu", str(3 * SHARD_SIZE + 2), expect_ok=False)
    # (each rank writes its line in one call; still, find the messages wherever they start)
    errors = sorted(f"{r} error: {m}" for r, m in re.findall(r"(rank \d) error: (.+?)(?=rank \d error: |\n|$)", stdout))
    assert [e.split(" error: ")[0] for e in errors] == ["rank 0", "rank 1"], stdout
    assert errors[0].split(" error: ")[1] == errors[1].split(" error: ")[1]
    assert "data changed" in errors[0] and "shard 3 (shard-000003.pt" in errors[0] and "shard 2 " not in errors[0]
    assert {f: os.stat(out / f).st_mtime_ns for f in stamps} == stamps
    open_relevance(out)


def run_torchrun(out, nproc, *extra, expect_ok=True):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(REPO, "tests", "dataset_worker.py"), str(out), *extra]
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish in 300 s: {exc.stdout}\n{exc.stderr}")
    if expect_ok:
        assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    else:
        assert proc.returncode != 0, f"torchrun succeeded, expected a failure:\n{proc.stdout}"
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


def test_shard_hash_fast_path_equals_the_per_sample_hash():
    """_ShardHasher's batched path feeds the same bytes as hashing each row with _hash_update
    (the digest in finished shards must not change): tensors, (x, y) with 0-d rows, bool,
    non-contiguous, float64 and integer tensors; other batches take the per-row path."""
    import hashlib

    from lrpfast.dataset import _ShardHasher, _batch_rows, _hash_update

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, 5, generator=g)
    batches = [x, (x, torch.arange(6)), [x.transpose(2, 3), torch.rand(6, generator=g) > 0.5],
               (x.double()[:, :1], torch.randint(0, 9, (6, 2), dtype=torch.int16, generator=g)),
               x[:, :, ::2], (x, [f"s{i}" for i in range(6)]), {"a": x}]
    for batch in batches:
        slow = hashlib.sha256()
        for r in _batch_rows(batch, 6):
            _hash_update(slow, r)
        fast = _ShardHasher()
        fast.update(batch, 6)
        assert fast.digest() == slow.hexdigest()[:16], type(batch)
    # a changed byte changes the digest
    a, b = _ShardHasher(), _ShardHasher()
    a.update(x, 6)
    y = x.clone()
    y[5, 2, 3, 4] += 1
    b.update(y, 6)
    assert a.digest() != b.digest()
