"""Dataset-scale attribution: relevance maps streamed to disk in shards, resumable, split over
torch.distributed ranks.

    lrpfast.explain_dataset(model, dataset, "out/", batch_size=256, shard_size=4096)
    torchrun --nproc_per_node 4 my_script.py        # the same call, each rank writes its shards
    maps = lrpfast.open_relevance("out/")            # maps[i], maps.load(), maps.index

Layout of out_dir:
  manifest.json          what was computed (sample count, shard size, target, LRP settings, model
                         fingerprint), a data fingerprint (hashes of the first and last sample) and
                         whether the run is complete;
  shard-000000.pt ...    shard s holds samples [s·shard_size, (s+1)·shard_size) in dataset order:
                         {"indices", "relevance", "targets", "logits", "rank", "inputs_sha256"}
                         (the last: a hash of the shard's collated inputs, labels included); written
                         to a temporary name and renamed, so a shard file on disk is always complete;
  index.pt               {"shard": (N,), "offset": (N,)}: sample i is row offset[i] of shard[i].

Shard s belongs to rank s mod world_size; batches never cross a shard, so a sample's result does
not depend on how many ranks ran. A rerun with resume=True (the default) skips the shards already
on disk, after checking that they were computed from the same data: the settings and the model
must match the manifest, the first and last sample must hash as recorded there, and each reused
shard's inputs are read again (no LRP) and must hash as recorded in the shard. Data that changed
is an error naming the sample or the shards (resume=False, the CLI's --no-resume, starts over);
verify_data=False skips the data checks (a dataset that is not deterministic, or too costly to
read twice). Every rank checks its own shards and all ranks stop with the same message.

The loop (run_sharded) drives any ShardTask: explain_dataset's maps are one, the concept index of
lrpfast.crp.maximization another, with the same resume checks and torchrun split.

Under torchrun the process group is created here when the caller has none (gloo for CPU, NCCL
for CUDA devices); each rank uses cuda:LOCAL_RANK when CUDA is available and no device is given.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .ops import RelevanceError

MANIFEST, INDEX = "manifest.json", "index.pt"
FORMAT_VERSION = 2  # 2: data fingerprints (manifest "data", shard "inputs_sha256")


def make_lrp(model: nn.Module, **kwargs):
    """lrpfast.LRP(model, **kwargs); a bad keyword (a composite parameter without a composite) is a
    RelevanceError naming it, like every other bad setting."""
    from .lrp import LRP

    try:
        return LRP(model, **kwargs)
    except TypeError as exc:
        raise RelevanceError(str(exc)) from None


# ----------------------------------------------------------------------------- targets


def parse_target(spec):
    """A target spec as used by the CLI and explain_dataset: None/"argmax", an int (or "7"),
    "topK" (the K highest logits, e.g. "top3"), "label" (the dataset's labels), or a tensor.
    Returns ("argmax", None) | ("index", int) | ("topk", K) | ("label", None) | ("tensor", t)."""
    if spec is None or (isinstance(spec, str) and spec.lower() == "argmax"):
        return "argmax", None
    if isinstance(spec, torch.Tensor):
        return "tensor", spec.long()
    if isinstance(spec, bool):
        raise RelevanceError(f"target: expected argmax, an index, topK, label or a tensor, got {spec!r}")
    if isinstance(spec, int):
        return "index", spec
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "label":
            return "label", None
        if s.startswith("top"):
            try:
                k = int(s[3:].lstrip("-"))
            except ValueError:
                k = 0
            if k < 1:
                raise RelevanceError(f"target: {spec!r} is not topK with K >= 1 (e.g. top3)")
            return "topk", k
        try:
            return "index", int(s)
        except ValueError:
            pass
    raise RelevanceError(f"target: expected 'argmax', an index, 'topK', 'label' or a tensor, got {spec!r}")


def resolve_targets(kind: str, value, classes: int, batch: int, logits: Optional[torch.Tensor] = None,
                    labels=None, rows=None) -> Optional[torch.Tensor]:
    """Target tensor for one batch: None (argmax), (B,) or (B, K), on the CPU. `classes`: the
    model's number of outputs; `logits`: needed for topK; `rows`: the batch's sample indices (for a
    per-sample target tensor). An out-of-range target is an error naming it."""
    if kind == "argmax":
        return None
    if kind == "index":
        t = torch.full((batch,), int(value), dtype=torch.long)
    elif kind == "topk":
        if value > classes:
            raise RelevanceError(f"target: top{value} asked for a model with {classes} outputs")
        t = logits.topk(value, dim=1).indices.cpu()
    elif kind == "label":
        if labels is None:
            raise RelevanceError("target 'label': the inputs have no labels (items must be (x, y) pairs)")
        t = torch.as_tensor(labels).long().reshape(batch)
    else:  # a per-sample tensor
        t = value if rows is None else value[torch.as_tensor(rows)]
    if t.numel() and (t.min() < 0 or t.max() >= classes):
        bad = t[(t < 0) | (t >= classes)][0].item()
        raise RelevanceError(f"target {bad} is out of range: the model has {classes} outputs (0..{classes - 1})")
    return t


class Targets:
    """Per-batch targets from a spec (see parse_target): `targets(model, x, labels, rows)` gives
    None (argmax), (B,) or (B, K) on x's device. TopK costs one extra forward per batch; the other
    kinds one forward of a single sample, once, to learn the number of outputs for the range check."""

    def __init__(self, spec, n_samples: Optional[int] = None):
        self.kind, self.value = parse_target(spec)
        if self.kind == "tensor" and n_samples is not None and (
                self.value.dim() not in (1, 2) or len(self.value) != n_samples):
            raise RelevanceError(f"target: a target tensor must be (N,) or (N, K) with N = {n_samples} samples, "
                                 f"got shape {tuple(self.value.shape)}")
        self.classes = None

    def describe(self) -> str:
        return self.kind if self.kind in ("argmax", "label", "tensor") else f"{self.kind}:{self.value}"

    def __call__(self, model, x, labels=None, rows=None) -> Optional[torch.Tensor]:
        if self.kind == "argmax":
            return None
        logits = None
        if self.kind == "topk" or self.classes is None:
            with torch.no_grad():
                logits = model(x if self.kind == "topk" else x[:1])
            if logits.dim() != 2:
                raise RelevanceError(f"target: the model output has shape {tuple(logits.shape)}, expected (B, classes)")
            self.classes = logits.shape[1]
        t = resolve_targets(self.kind, self.value, self.classes, len(x), logits, labels, rows)
        return t.to(x.device)


# ----------------------------------------------------------------------------- distributed


def _setup_distributed(mode, device):
    """(rank, world_size, created_group, device). mode: "auto" (join torchrun's group when
    WORLD_SIZE > 1 or one already exists), True (require it) or False (single process)."""
    import torch.distributed as dist

    if mode is False or not dist.is_available():
        return 0, 1, False, device
    created = False
    if not dist.is_initialized():
        launched = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ  # torchrun's environment
        if mode is True and not launched:
            raise RelevanceError("explain_dataset(distributed=True): no process group and no torchrun environment "
                                 "(WORLD_SIZE, MASTER_ADDR); launch with torchrun or init the group first")
        if not launched or (int(os.environ["WORLD_SIZE"]) <= 1 and mode is not True):
            return 0, 1, False, device
        device = _rank_device(device)
        use_cuda = device is not None and device.type == "cuda"
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    return dist.get_rank(), dist.get_world_size(), created, device


def _rank_device(device) -> Optional[torch.device]:
    """This torchrun rank's device. NCCL needs one GPU per rank: without a device, a rank takes
    cuda:LOCAL_RANK when this node has a GPU for every local rank, else stays where the model is
    (CPU: gloo). "cuda" without an index means cuda:LOCAL_RANK."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device is None:
        return torch.device("cuda", local) if 0 < local_world <= gpus else None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        if local_world > gpus:
            raise RelevanceError(f"explain_dataset: {local_world} ranks on this node but {gpus} CUDA device(s); NCCL "
                                 "needs one GPU per rank (use --nproc_per_node <= the GPU count, or device='cpu')")
        device = torch.device("cuda", local)
    return device


def _broadcast_error(message: Optional[str], world: int) -> Optional[str]:
    """Rank 0's verdict for everyone, so that a bad out_dir stops every rank instead of hanging
    the others at the next barrier."""
    if world == 1:
        return message
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value, world: int) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    box = [None] * world
    dist.all_gather_object(box, value)
    return box


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------- on-disk format


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the parameter and buffer bytes (device independent): a resumed run must use the
    same weights as the shards already written."""
    h = hashlib.sha256()
    for name, t in list(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _hash_update(h, obj) -> None:
    """Feed `obj` (tensors, arrays, numbers, strings, and lists/tuples/dicts of them) into the hash
    h, tagged with types, dtypes and shapes. Other objects count by their `tobytes()` (PIL images)
    or, failing that, only by their type."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}[".encode())
        for o in obj:
            _hash_update(h, o)
        h.update(b"]")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}{{".encode())
        for k in sorted(obj, key=repr):
            h.update(f"{k!r}:".encode())
            _hash_update(h, obj[k])
        h.update(b"}")
    elif obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif hasattr(obj, "tobytes"):  # numpy arrays, PIL images
        h.update(f"{type(obj).__name__}{getattr(obj, 'dtype', '')}{getattr(obj, 'shape', getattr(obj, 'size', ''))}"
                 f"{getattr(obj, 'mode', '')};".encode())
        import numpy as np

        h.update((np.ascontiguousarray(obj) if isinstance(obj, np.ndarray) else obj).tobytes())
    else:
        h.update(f"?{type(obj).__module__}.{type(obj).__qualname__};".encode())


def data_fingerprint(dataset) -> dict:
    """The cheap whole-dataset check of a resumed run: sha256 of the first and of the last item
    (as the dataset returns it, before collation). Two reads."""
    n = len(dataset)

    def digest(i):
        h = hashlib.sha256()
        _hash_update(h, dataset[i])
        return h.hexdigest()[:16]

    return {"first": digest(0) if n else None, "last": digest(n - 1) if n else None}


def _batch_rows(batch, rows: int) -> list:
    """The collated batch split into its samples: every tensor leaf indexed by row, and lists of
    `rows` plain values (collated strings) too; so a shard's hash does not depend on batch_size."""

    def row(obj, i):
        if isinstance(obj, torch.Tensor):
            return obj[i] if obj.dim() > 0 else obj
        if isinstance(obj, dict):
            return {k: row(v, i) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            if len(obj) == rows and not any(isinstance(o, (torch.Tensor, list, tuple, dict)) for o in obj):
                return obj[i]
            return [row(o, i) for o in obj]
        return obj

    return [row(batch, i) for i in range(rows)]


def _hash_rows_fast(h, batch, rows: int) -> bool:
    """The bytes _hash_update would feed for each row of a batch that is a tensor or a list/tuple
    of tensors (each (rows, ...), strided, real): one header per tensor and slices of its
    contiguous bytes, without a tensor per row (about 15 us per sample in the loop). False, and
    nothing fed, for any other batch."""
    ts = list(batch) if isinstance(batch, (list, tuple)) else [batch]
    if rows < 1 or not ts or not all(isinstance(t, torch.Tensor) and t.layout == torch.strided and t.dim() >= 1
                                     and t.shape[0] == rows and not t.is_complex() and not t.is_quantized
                                     for t in ts):
        return False
    parts = []
    for t in ts:
        t = t.detach().cpu().contiguous()
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        parts.append((f"T{t.dtype}{tuple(t.shape[1:])};".encode(), data, data.nbytes // rows))
    listed = isinstance(batch, (list, tuple))
    head = f"L{len(ts)}[".encode()
    for i in range(rows):
        if listed:
            h.update(head)
        for tag, data, step in parts:
            h.update(tag)
            h.update(data[i * step:(i + 1) * step])
        if listed:
            h.update(b"]")
    return True


class _ShardHasher:
    """sha256 over a shard's samples, fed batch by batch (rows in dataset order)."""

    def __init__(self):
        self.h = hashlib.sha256()

    def update(self, batch, rows: int) -> None:
        if _hash_rows_fast(self.h, batch, rows):
            return
        for r in _batch_rows(batch, rows):
            _hash_update(self.h, r)

    def digest(self) -> str:
        return self.h.hexdigest()[:16]


def _write_atomic(obj, path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    if path.endswith(".json"):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def shard_path(out_dir: str, s: int) -> str:
    return os.path.join(out_dir, f"shard-{s:06d}.pt")


_START_OVER = "use resume=False (CLI: --no-resume) to start over, or another out_dir"


def _check_out_dir(out_dir: str, config: dict, data: Optional[dict], resume: bool,
                   who: str = "explain_dataset") -> Optional[str]:
    """Rank 0, before any work: check the manifest of an earlier run against these settings and
    the data fingerprint (data None: not checked); with resume=False remove the earlier run's
    shards. Returns an error message, or None. The manifest itself is written later
    (_write_manifest), once every rank's shards passed their checks: a refused rerun leaves the
    earlier run's folder as it was."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MANIFEST)
    if resume and os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as exc:
            return f"{who}: cannot read {path} ({exc}); remove it or use another out_dir"
        if old.get("config") != config:
            diff = sorted(k for k in set(config) | set(old.get("config", {}))
                          if config.get(k) != old.get("config", {}).get(k))
            return (f"{who}: {out_dir} holds a run with other settings (differs in {', '.join(diff)}); "
                    "use another out_dir, or resume=False to overwrite it")
        if data is not None:
            before = old.get("data")
            if not isinstance(before, dict):
                return (f"{who}: {out_dir} holds a run without a data fingerprint (written by an older "
                        f"lrpfast), so its shards cannot be checked against the data; {_START_OVER} "
                        "(or verify_data=False to reuse them unchecked)")
            changed = [f"{which} sample ({i})" for which, i in (("first", 0), ("last", config["n_samples"] - 1))
                       if before.get(which) != data.get(which)]
            if changed:
                return (f"{who}: the data changed since the run in {out_dir} was started: the "
                        f"{' and the '.join(changed)} {'differ' if len(changed) > 1 else 'differs'} from the "
                        f"recorded fingerprint (the sample count, "
                        f"{config['n_samples']}, is the same); its shards were computed from other inputs. "
                        f"{_START_OVER[0].upper()}{_START_OVER[1:]}")
    if not resume:  # start over: stale shards of an earlier run must not be mistaken for new ones
        for f in os.listdir(out_dir):
            if (f.startswith("shard-") and f.endswith(".pt")) or f == INDEX:
                os.remove(os.path.join(out_dir, f))
    return None


def _write_manifest(out_dir: str, config: dict, data: dict) -> None:
    _write_atomic({"format": FORMAT_VERSION, "config": config, "data": data, "complete": False},
                  os.path.join(out_dir, MANIFEST))


# ----------------------------------------------------------------------------- the loop


def _split_item(batch):
    """(x, labels or None) from a collated batch: a tensor, or a (x, y, ...) tuple/list."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict) and "x" in batch:
        return batch["x"], batch.get("y")
    raise RelevanceError("explain_dataset: dataset items must be tensors, (x, y, ...) tuples or dicts with 'x'; "
                         f"got a batch of type {type(batch).__name__}")


def _as_dataset(data):
    """(dataset, batch_size or None, num_workers, collate_fn) from a Dataset, DataLoader or tensor.
    A DataLoader's dataset, batch size, workers and collate_fn are reused; its sampler is not
    (samples are explained in dataset order, which is what the index describes)."""
    if isinstance(data, DataLoader):
        return data.dataset, data.batch_size, data.num_workers, data.collate_fn
    if isinstance(data, torch.Tensor):
        from .data import TensorInputs

        return TensorInputs(data), None, 0, None
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return data, None, 0, None
    raise RelevanceError(f"explain_dataset: data must be a Dataset, a DataLoader or a tensor, got {type(data).__name__}")


def explain_dataset(model: nn.Module, data, out_dir: Union[str, os.PathLike], *, target=None,
                    batch_size: Optional[int] = None, shard_size: int = 1024, eps: float = 1e-6,
                    composite=None, lrp_kwargs: Optional[dict] = None, device=None,
                    storage_dtype: Optional[torch.dtype] = None, transform: Optional[Callable] = None,
                    resume: bool = True, verify_data: bool = True, distributed="auto",
                    num_workers: Optional[int] = None, keep_logits: bool = True, progress: bool = True) -> dict:
    """Explain every sample of `data` (a Dataset, DataLoader or tensor; items x or (x, y, ...))
    and write the relevance maps to out_dir in shards (see the module docstring).

    target: None/"argmax", an int, "topK", "label" (the items' y), or a tensor of per-sample
    targets, (N,) or (N, K). eps, composite, lrp_kwargs: passed to lrpfast.LRP. transform: applied
    to each batch on the device before the model (e.g. normalisation). storage_dtype: e.g.
    torch.float16 to halve the disk space. A shard is gathered in host memory before it is
    written: choose shard_size so that shard_size maps fit. resume: skip the shards an earlier run
    with the same settings, model and data wrote (False: start over). verify_data: on resume,
    check the data (the first/last sample, and each reused shard's inputs, read again without
    LRP); a change is a RelevanceError naming the sample or the shards. distributed: "auto" (join
    torchrun's job when launched by it), True (require it) or False. The model is put in eval mode and moved
    to the device (under torchrun without a device: cuda:LOCAL_RANK when every local rank has a
    GPU). Returns a summary dict of this rank's work."""
    task = _MapsTask(Targets(target, len(_as_dataset(data)[0])), eps, composite, lrp_kwargs, storage_dtype, keep_logits)
    return run_sharded(task, model, data, out_dir, batch_size=batch_size, shard_size=shard_size, device=device,
                       transform=transform, resume=resume, verify_data=verify_data, distributed=distributed,
                       num_workers=num_workers, progress=progress)


class ShardTask:
    """What a sharded run computes (run_sharded drives it; explain_dataset's maps are one task,
    lrpfast.crp.maximization's top-N concept index another). Every rank calls setup once, after
    the model is on its device; then batch() per batch of its shards and shard() when a shard's
    batches are done (its dict is written to the shard file, with the shard's indices, rank and
    inputs hash); rank 0 calls finish() once every shard is on disk, before the manifest is
    marked complete."""

    name = "explain_dataset"   # the prefix of error messages
    desc = "explaining"        # the progress bar's label

    def setup(self, model: nn.Module, device: torch.device) -> dict:
        """The settings that must match for a run to resume (JSON-able; the model fingerprint is added)."""
        raise NotImplementedError

    def batch(self, model: nn.Module, x: torch.Tensor, labels, rows: list):
        raise NotImplementedError

    def shard(self, parts: list) -> dict:
        raise NotImplementedError

    def finish(self, out_dir: str, n: int, shard_size: int, n_shards: int) -> None:
        pass


class _MapsTask(ShardTask):
    """explain_dataset: the relevance maps themselves, with targets and logits."""

    def __init__(self, targets, eps, composite, lrp_kwargs, storage_dtype, keep_logits):
        self.targets, self.eps, self.composite, self.lrp_kwargs = targets, eps, composite, lrp_kwargs
        self.storage_dtype, self.keep_logits = storage_dtype, keep_logits

    def setup(self, model, device):
        self.lrp = make_lrp(model, eps=self.eps, composite=self.composite, **(self.lrp_kwargs or {}))
        t, composite = self.targets, self.composite
        return {"target": t.describe(),
                "target_tensor": (hashlib.sha256(t.value.cpu().numpy().tobytes()).hexdigest()[:16]
                                  if t.kind == "tensor" else None),
                "eps": self.eps, "composite": composite if composite is None or isinstance(composite, str) else repr(composite),
                "lrp_kwargs": {k: repr(v) for k, v in sorted((self.lrp_kwargs or {}).items())},
                "storage_dtype": str(self.storage_dtype) if self.storage_dtype else None}

    def batch(self, model, x, labels, rows):
        res = self.lrp.explain(x, self.targets(model, x, labels, rows))
        rel = res.relevance.detach()
        return {"relevance": (rel.to(self.storage_dtype) if self.storage_dtype else rel).cpu(),
                "targets": res.targets.detach().cpu(),
                "logits": res.logits.detach().cpu() if self.keep_logits else None}

    def shard(self, parts):
        return {"relevance": torch.cat([p["relevance"] for p in parts]),
                "targets": torch.cat([p["targets"] for p in parts]),
                "logits": torch.cat([p["logits"] for p in parts]) if self.keep_logits else None}

    def finish(self, out_dir, n, shard_size, n_shards):
        idx = torch.arange(n)
        _write_atomic({"shard": (idx // shard_size).int(), "offset": (idx % shard_size).int(),
                       "shard_files": [os.path.basename(shard_path(out_dir, s)) for s in range(n_shards)]},
                      os.path.join(out_dir, INDEX))


def run_sharded(task: ShardTask, model: nn.Module, data, out_dir, *, batch_size: Optional[int] = None,
                shard_size: int = 1024, device=None, transform: Optional[Callable] = None, resume: bool = True,
                verify_data: bool = True, distributed="auto", num_workers: Optional[int] = None,
                progress: bool = True) -> dict:
    """The sharded, resumable, torchrun-aware loop behind explain_dataset (module docstring), for
    any ShardTask: shards of shard_size samples in dataset order, shard s on rank s mod world, each
    written atomically with its inputs hash; a rerun skips finished shards after checking the
    settings, the model and the data. Returns a summary dict of this rank's work."""
    t_start = time.perf_counter()
    out_dir = os.fspath(out_dir)
    who = task.name
    dataset, loader_bs, loader_workers, collate_fn = _as_dataset(data)
    batch_size = int(batch_size or loader_bs or 64)
    num_workers = loader_workers if num_workers is None else num_workers
    if shard_size < 1 or batch_size < 1:
        raise RelevanceError(f"{who}: shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    n = len(dataset)

    rank, world, created, device = _setup_distributed(distributed, device)
    together = False  # every rank is at the same step, with the same verdict (see the finally)
    backend = None
    if world > 1 or created:
        import torch.distributed as dist

        backend = dist.get_backend()
    try:
        if device is None:
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        device = torch.device(device)
        model = model.to(device).eval()
        config = {"n_samples": n, "shard_size": shard_size, **task.setup(model, device),
                  "model": model_fingerprint(model)}
        data = data_fingerprint(dataset) if rank == 0 else None
        error = _check_out_dir(out_dir, config, data if verify_data else None, resume, who) if rank == 0 else None
        error = _broadcast_error(error, world)  # also: rank 0 removed stale shards before anyone looks
        if error:
            together = True
            raise RelevanceError(error)

        n_shards = (n + shard_size - 1) // shard_size
        mine = [s for s in range(rank, n_shards, world)]
        done = [s for s in mine if os.path.exists(shard_path(out_dir, s))]
        todo = [s for s in mine if s not in done]
        # Reused shards must come from the same inputs: each rank reads its own again (no LRP) and
        # every rank learns every rank's verdict, so that all stop, with the same message.
        bad = _verify_shards(dataset, done, n, shard_size, batch_size, num_workers, collate_fn, out_dir,
                             progress and rank == 0) if verify_data else []
        bad = sorted(b for part in _gather(bad, world) for b in part)
        if bad:
            together = True
            raise RelevanceError(_changed_shards_message(out_dir, bad, n, shard_size, who))
        if rank == 0:
            _write_manifest(out_dir, config, data)
        written = _run_shards(task, model, dataset, todo, n, shard_size, batch_size, num_workers, collate_fn, device,
                              transform, out_dir, rank, world, progress and rank == 0)
        _barrier(world)
        error = None
        if rank == 0:
            try:
                _finish(task, out_dir, n, shard_size, n_shards, world)
            except RelevanceError as exc:
                error = str(exc)
        error = _broadcast_error(error, world)  # also the final synchronisation
        together = True
        if error:
            raise RelevanceError(error)
    finally:
        if created:
            import torch.distributed as dist

            if together and world > 1:
                # Every rank is here (after the same broadcast or gather: the end of the run, or
                # an error all ranks agreed on), so this cannot hang. Without it a rank could tear
                # its gloo pairs down while a peer still finished the collective, and that peer
                # aborted at exit ("terminate called without an active exception", torch 2.14,
                # about 1 run in 5 under pytest). A rank that failed on its own skips it: the
                # others are not waiting in a barrier then.
                dist.barrier()
            dist.destroy_process_group()
    return {"out_dir": out_dir, "rank": rank, "world_size": world, "backend": backend, "n_samples": n, "n_shards": n_shards,
            "shards_written": written, "shards_skipped": len(done),
            "shards_verified": len(done) if verify_data else 0,
            "seconds": time.perf_counter() - t_start}


def _shard_batches(shards, n, shard_size, batch_size):
    """(batches, owner): the sample indices of each batch, and its shard. Batches never cross a
    shard: results are the same for any number of ranks and on resume."""
    batches, owner = [], []
    for s in shards:
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        for i in range(lo, hi, batch_size):
            batches.append(list(range(i, min(hi, i + batch_size))))
            owner.append(s)
    return batches, owner


def _loader(dataset, batches, num_workers, collate_fn, pin_memory=False):
    kwargs = {"collate_fn": collate_fn} if collate_fn is not None else {}
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory, **kwargs)


def _verify_shards(dataset, shards, n, shard_size, batch_size, num_workers, collate_fn, out_dir, progress) -> list:
    """The shards among `shards` (already on disk) whose stored input hash differs from the hash of
    the dataset's samples now, or that have none: [(shard, reason)]. Reads the inputs, runs no LRP."""
    if not shards:
        return []
    batches, owner = _shard_batches(shards, n, shard_size, batch_size)
    bar = _progress_bar(sum(len(b) for b in batches), progress, "checking finished shards")
    bad, hasher = [], _ShardHasher()
    try:
        for bi, batch in enumerate(_loader(dataset, batches, num_workers, collate_fn)):
            hasher.update(batch, len(batches[bi]))
            if bar is not None:
                bar.update(len(batches[bi]))
            if bi + 1 == len(batches) or owner[bi + 1] != owner[bi]:
                s = owner[bi]
                try:  # mmap: the stored maps are not read, only the small fields
                    stored = torch.load(shard_path(out_dir, s), map_location="cpu", weights_only=True,
                                        mmap=True).get("inputs_sha256")
                except Exception as exc:  # noqa: BLE001 - any unreadable shard is reported, not raised
                    bad.append((s, f"unreadable ({type(exc).__name__}: {exc})"))
                else:
                    if stored is None:
                        bad.append((s, "no input fingerprint (written by an older lrpfast)"))
                    elif stored != hasher.digest():
                        bad.append((s, "changed"))
                hasher = _ShardHasher()
    finally:
        if bar is not None:
            bar.close()
    return bad


def _changed_shards_message(out_dir, bad, n, shard_size, who="explain_dataset") -> str:
    def where(s):
        last = min(n, (s + 1) * shard_size) - 1
        return f"shard {s} ({os.path.basename(shard_path(out_dir, s))}, samples {s * shard_size}..{last})"

    changed = [s for s, why in bad if why == "changed"]
    other = [(s, why) for s, why in bad if why != "changed"]
    parts = []
    if changed:
        listed = "; ".join(where(s) for s in changed[:5])
        listed += f"; and {len(changed) - 5} more" if len(changed) > 5 else ""
        parts.append(f"the data changed since these shards were written (their inputs hash differently now, "
                     f"with the same sample count): {listed}")
    if other:
        parts.append("cannot check " + "; ".join(f"{where(s)}: {why}" for s, why in other[:5])
                     + (f"; and {len(other) - 5} more" if len(other) > 5 else ""))
    return (f"{who}: {out_dir}: " + ". Also ".join(parts) + f". Reusing them would mix results of "
            f"different inputs; {_START_OVER} (or verify_data=False to reuse them unchecked)")


def _run_shards(task, model, dataset, shards, n, shard_size, batch_size, num_workers, collate_fn, device,
                transform, out_dir, rank, world, progress) -> list:
    if not shards:
        return []
    batches, owner = _shard_batches(shards, n, shard_size, batch_size)
    loader = _loader(dataset, batches, num_workers, collate_fn, pin_memory=device.type == "cuda")
    desc = task.desc if world == 1 else f"{task.desc} (rank 0 of {world})"
    bar = _progress_bar(sum(len(b) for b in batches), progress, desc)
    written, parts, hasher = [], [], _ShardHasher()
    try:
        for bi, batch in enumerate(loader):
            hasher.update(batch, len(batches[bi]))
            x, labels = _split_item(batch)
            x = x.to(device, non_blocking=True)
            if transform is not None:
                x = transform(x)
            parts.append(task.batch(model, x, labels, batches[bi]))
            if bar is not None:
                bar.update(len(batches[bi]))
            if bi + 1 == len(batches) or owner[bi + 1] != owner[bi]:
                s = owner[bi]
                lo = s * shard_size
                shard = {**task.shard(parts), "indices": torch.arange(lo, min(n, lo + shard_size)), "rank": rank,
                         "inputs_sha256": hasher.digest()}
                _write_atomic(shard, shard_path(out_dir, s))
                written.append(s)
                parts, hasher = [], _ShardHasher()
    finally:
        if bar is not None:
            bar.close()
    return written


def _progress_bar(total: int, enabled: bool, desc: str = "explaining"):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True)


def _finish(task, out_dir, n, shard_size, n_shards, world) -> None:
    """Rank 0, after every rank wrote its shards: check they are all there, let the task write its
    results (explain_dataset: the index), mark the run complete."""
    missing = [s for s in range(n_shards) if not os.path.exists(shard_path(out_dir, s))]
    if missing:
        raise RelevanceError(f"{task.name}: shards {missing[:10]} missing in {out_dir} after the run")
    task.finish(out_dir, n, shard_size, n_shards)
    path = os.path.join(out_dir, MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    manifest.update({"complete": True, "n_shards": n_shards, "world_size": world})
    _write_atomic(manifest, path)


# ----------------------------------------------------------------------------- reading back


class RelevanceShards:
    """Read-only view of an explain_dataset folder: len, maps[i] (one sample's relevance),
    load(field) (every sample in dataset order), and the index/manifest."""

    def __init__(self, out_dir: Union[str, os.PathLike], map_location="cpu"):
        self.out_dir = os.fspath(out_dir)
        try:
            with open(os.path.join(self.out_dir, MANIFEST)) as f:
                self.manifest = json.load(f)
        except FileNotFoundError:
            raise RelevanceError(f"open_relevance: {self.out_dir} has no {MANIFEST} (not an explain_dataset folder)") from None
        if not self.manifest.get("complete"):
            raise RelevanceError(f"open_relevance: the run in {self.out_dir} is not complete; rerun explain_dataset "
                                 "with the same arguments to resume it")
        self.index = torch.load(os.path.join(self.out_dir, INDEX), weights_only=True)
        self.map_location = map_location
        self._cached = (None, None)

    def __len__(self):
        return len(self.index["shard"])

    def shard(self, s: int) -> dict:
        if self._cached[0] != s:
            self._cached = (s, torch.load(shard_path(self.out_dir, s), map_location=self.map_location,
                                          weights_only=True))
        return self._cached[1]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"RelevanceShards: sample {i} out of range ({len(self)} samples)")
        i %= len(self)
        return self.shard(int(self.index["shard"][i]))["relevance"][int(self.index["offset"][i])]

    def load(self, field: str = "relevance", indices: Optional[Sequence[int]] = None) -> torch.Tensor:
        """`field` ("relevance", "targets", "logits") of all samples, or of `indices`, in that order."""
        idx = torch.arange(len(self)) if indices is None else torch.as_tensor(indices).long()
        shards = self.index["shard"][idx].long()
        offsets = self.index["offset"][idx].long()
        out = None
        for s in torch.unique(shards).tolist():
            sel = torch.nonzero(shards == s).flatten()
            values = self.shard(s)[field]
            if values is None:
                raise RelevanceError(f"open_relevance: field {field!r} was not stored (keep_logits=False?)")
            if out is None:
                out = values.new_empty((len(idx), *values.shape[1:]))
            out[sel] = values[offsets[sel]]
        return out


def open_relevance(out_dir, map_location="cpu") -> RelevanceShards:
    """Open a finished explain_dataset folder."""
    return RelevanceShards(out_dir, map_location)
