"""Relevance maximisation (lrpfast.crp.maximization): the index against a brute-force sort of the
whole dataset computed another way (one LRP call over all samples with keep_layers, activations
from the model's own prefix), the order's tie rule, an interrupted build resumed to the same
index, two torchrun ranks against one process, the layer tap against keep_layers, and the
`lrpfast crp` CLI's exit codes and errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import lrpfast
from lrpfast.crp.layer_tap import LayerTap
from lrpfast.crp.maximization import open_index, relevance_maximization, select_top
from lrpfast.dataset import shard_path
from lrpfast.ops import RelevanceError

from .crp_index_worker import LAYERS, N_SAMPLES, N_TOP, SHARD_SIZE, build, toy_inputs, toy_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# layer -> (the node whose INPUT relevance is the layer's output relevance, the model prefix giving its output)
FOLLOWING = {"0": ("_1", 1), "3": ("_4", 4), "5": ("output", 6)}


def brute_force(model, x, layer, mode, how, abs_norm, n):
    """Every sample's value for every channel from one whole-batch call, sorted in Python by
    (-value, id): the index must hold exactly the first n."""
    if mode == "relevance":
        e = lrpfast.LRP(model).explain(x, keep_layers=True)
        node, _ = FOLLOWING[layer]
        if node == "output":   # the last layer's output relevance: the initial one (the target logit)
            maps = torch.zeros_like(e.logits).scatter_(1, e.targets[:, None], e.logits.gather(1, e.targets[:, None]))
        else:
            maps = e.layers[node]
    else:
        with torch.no_grad():
            maps = model[:FOLLOWING[layer][1]](x)
    flat = maps.reshape(len(x), maps.shape[1], -1)
    values = flat.sum(2) if how == "sum" else flat.max(2).values
    pos = flat.argmax(2)
    if abs_norm:
        values = values / (values.abs().sum(1, keepdim=True) + 1e-10)
    values = values.float()
    ids, vals, poss = [], [], []
    for c in range(values.shape[1]):
        order = sorted(range(len(x)), key=lambda i: (-values[i, c].item(), i))[:n]
        ids.append(order)
        vals.append([values[i, c].item() for i in order])
        poss.append([pos[i, c].item() for i in order])
    return np.array(ids), np.array(vals, dtype=np.float32), np.array(poss)


@pytest.mark.parametrize("how,abs_norm", [(("sum", "max"), True), (("max", "sum"), False)])
def test_index_equals_a_brute_force_sort_of_the_whole_dataset(tmp_path, how, abs_norm):
    model, x = toy_model(), toy_inputs()
    build(tmp_path, relevance=how[0], activation=how[1], abs_norm=abs_norm)
    idx = open_index(tmp_path)
    assert idx.layers == LAYERS and idx.spatial("0") == (8, 8) and idx.spatial("5") == ()
    for layer in LAYERS:
        for mode, h in zip(("relevance", "activation"), how):
            ids, vals, pos = brute_force(model, x, layer, mode, h, abs_norm, N_TOP)
            a = idx.arrays(layer)
            assert a[f"{mode}_ids"].shape == (idx.channels(layer), N_TOP)
            np.testing.assert_array_equal(a[f"{mode}_ids"], ids, err_msg=f"{layer} {mode}")
            np.testing.assert_allclose(a[f"{mode}_values"], vals, rtol=1e-6, atol=1e-9)
            nonzero = vals != 0   # the argmax of an all-zero map is any position
            np.testing.assert_array_equal(a[f"{mode}_pos"][nonzero], pos[nonzero])
    # one channel through the reader
    ids, vals, _ = idx.top("0", 2, "activation", n=3)
    np.testing.assert_array_equal(ids, idx.arrays("0")["activation_ids"][2, :3])


def test_more_top_entries_than_samples_and_one_shard(tmp_path):
    x = toy_inputs()[:4]
    build(tmp_path, data=x, n_top=10, shard_size=100)
    a = open_index(tmp_path).arrays("3")
    assert a["relevance_ids"].shape == (6, 4)
    assert all(sorted(row) == [0, 1, 2, 3] for row in a["relevance_ids"].tolist())


def test_order_is_total_value_then_id():
    """Ties (exact zeros: dead channels) go to the smaller sample id, whatever order the
    candidates arrive in: shards merged in any order give the same top-N."""
    values = torch.tensor([[0.0, 2.0, 0.0, 1.0, 2.0, 0.0]])
    ids = torch.tensor([5, 9, 1, 4, 3, 0])
    pos = torch.arange(6) * 10
    v, i, p = select_top(values, ids, pos, 4)
    assert i.tolist() == [[3, 9, 4, 0]] and v.tolist() == [[2.0, 2.0, 1.0, 0.0]] and p.tolist() == [[40, 10, 30, 50]]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        perm = torch.randperm(6, generator=g)
        assert torch.equal(select_top(values[:, perm], ids[perm], pos[perm], 4)[1], i)


def test_select_top_equals_a_sort():
    """The (value, id) key of select_top against Python's sort: negative values, exact ties,
    -0.0 (equal to 0.0), tiny (subnormal) values and ids up to 2**32 - 1."""
    g = torch.Generator().manual_seed(3)
    for trial in range(40):
        m = int(torch.randint(1, 60, (1,), generator=g))
        v = torch.randint(-3, 4, (2, m), generator=g).float() * (0.5 if trial % 3 else 1e-41)
        v[v == 0] = -0.0 if trial % 2 else 0.0
        ids = torch.randperm(m, generator=g) * (2 ** 32 // m - 1) if trial % 4 == 0 else torch.randperm(m, generator=g)
        pos = torch.arange(m)
        n = int(torch.randint(1, m + 2, (1,), generator=g))
        vals, got, _ = select_top(v, ids, pos, n)
        for row in range(2):
            want = sorted(range(m), key=lambda j: (-float(v[row, j]), int(ids[j])))[:n]
            assert got[row].tolist() == [int(ids[j]) for j in want]
            assert vals[row].tolist() == [float(v[row, j]) for j in want]


class Interrupting(Dataset):
    """The toy inputs; raises at sample `fail_at` (an interruption mid-shard)."""

    def __init__(self, fail_at=None):
        self.x, self.fail_at, self.reads = toy_inputs(), fail_at, []

    def __len__(self):
        return N_SAMPLES

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyboardInterrupt(f"simulated interruption at sample {i}")
        self.reads.append(i)
        return self.x[i]


def shard_files(d):
    return sorted(f for f in os.listdir(d) if f.startswith("shard-"))


def test_interrupted_build_resumes_with_nothing_lost_or_duplicated(tmp_path):
    full = tmp_path / "full"
    build(full, data=Interrupting())
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        build(part, data=Interrupting(3 * SHARD_SIZE + 1))   # shards 0-2 done, shard 3 half
    assert shard_files(part) == [f"shard-00000{s}.pt" for s in range(3)]
    with pytest.raises(RelevanceError, match="not complete"):
        open_index(part)
    stamps = {f: os.stat(part / f).st_mtime_ns for f in shard_files(part)}
    again = Interrupting()
    summary = build(part, data=again)
    n_shards = -(-N_SAMPLES // SHARD_SIZE)
    assert summary["shards_skipped"] == 3 and sorted(summary["shards_written"]) == list(range(3, n_shards))
    # the finished shards were only read (their input hashes), not recomputed or rewritten
    assert sorted(again.reads) == sorted([0, N_SAMPLES - 1] + list(range(N_SAMPLES)))
    assert {f: os.stat(part / f).st_mtime_ns for f in stamps} == stamps
    a, b = open_index(part), open_index(full)
    for layer in LAYERS:
        for k, v in b.arrays(layer).items():
            np.testing.assert_array_equal(a.arrays(layer)[k], v, err_msg=f"{layer} {k}")
        ids = a.arrays(layer)["relevance_ids"]
        assert all(len(set(row)) == len(row) for row in ids.tolist())   # no sample twice in a channel's list
    # each shard's candidates cover exactly its own samples
    for s in range(n_shards):
        sh = torch.load(shard_path(part, s), weights_only=True)
        cand = sh["top"]["0"]["relevance"]["ids"]
        assert ((cand >= s * SHARD_SIZE) & (cand < (s + 1) * SHARD_SIZE)).all()


def test_resume_refuses_other_settings_and_changed_data(tmp_path):
    build(tmp_path)
    with pytest.raises(RelevanceError, match="relevance_maximization: .*other settings.*n_top"):
        build(tmp_path, n_top=N_TOP + 1)
    x = toy_inputs()
    x[2 * SHARD_SIZE + 1] = 1 - x[2 * SHARD_SIZE + 1]
    with pytest.raises(RelevanceError, match="data changed.*shard 2 "):
        build(tmp_path, data=x)
    build(tmp_path, data=x, resume=False)   # starting over is allowed
    open_index(tmp_path)


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(RelevanceError, match=r"unknown layer 'features\.9': no module of that name.*'0', '1'"):
        relevance_maximization(toy_model(), toy_inputs(), tmp_path / "a", ["features.9"], progress=False)
    with pytest.raises(RelevanceError, match="dataset is empty"):
        relevance_maximization(toy_model(), toy_inputs()[:0], tmp_path / "b", ["0"], progress=False)
    with pytest.raises(RelevanceError, match="one target per sample"):
        relevance_maximization(toy_model(), toy_inputs(), tmp_path / "c", ["0"], target="top2", progress=False)
    with pytest.raises(RelevanceError, match="n_top must be"):
        relevance_maximization(toy_model(), toy_inputs(), tmp_path / "d", ["0"], n_top=0, progress=False)
    build(tmp_path / "e")
    with pytest.raises(RelevanceError, match="channel 9 of layer '0' is out of range"):
        open_index(tmp_path / "e").top("0", 9)
    with pytest.raises(RelevanceError, match="layer 'x' is not in the index"):
        open_index(tmp_path / "e").top("x", 0)


def test_layer_tap_reads_the_layer_output_and_its_relevance():
    """What the tap hands over equals keep_layers' relevance at the next node's input and the
    model's own prefix output (before the in-place ReLU after it); the map is unchanged."""
    model, x = toy_model(), toy_inputs()[:5]
    lrp = lrpfast.LRP(model)
    acts, rels = {}, {}
    tap = LayerTap(lrp, ["0", "3"], lambda n, t: acts.__setitem__(n, t.clone()),
                   lambda n, r: rels.__setitem__(n, r.clone()))
    r = tap.explain(x)
    ref = lrp.explain(x, keep_layers=True)
    torch.testing.assert_close(r, ref.relevance, rtol=1e-12, atol=1e-15)
    for layer in ("0", "3"):
        node, upto = FOLLOWING[layer]
        torch.testing.assert_close(rels[layer], ref.layers[node], rtol=1e-12, atol=1e-15)
        with torch.no_grad():
            torch.testing.assert_close(acts[layer], model[:upto](x), rtol=1e-12, atol=1e-15)
    # after the call the plan steps are unwrapped: a plain call sees nothing new
    acts.clear()
    lrp(x)
    assert not acts


def run_torchrun(out, nproc):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(REPO, "tests", "crp_index_worker.py"), str(out)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish in 300 s: {exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_two_torchrun_ranks_equal_one_process(tmp_path):
    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the ranks: the same arithmetic, so the same values bit for bit
    try:
        build(single)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "ranks"
    stdout = run_torchrun(out, 2)
    assert "rank 0/2" in stdout and "rank 1/2" in stdout and "backend gloo" in stdout
    n_shards = -(-N_SAMPLES // SHARD_SIZE)
    ranks = [torch.load(shard_path(out, s), weights_only=True)["rank"] for s in range(n_shards)]
    assert ranks == [s % 2 for s in range(n_shards)]   # both ranks worked, each on its own shards
    assert json.load(open(out / "manifest.json"))["world_size"] == 2
    a, b = open_index(out), open_index(single)
    for layer in LAYERS:
        for k, v in b.arrays(layer).items():
            if k.endswith("_values"):
                np.testing.assert_allclose(a.arrays(layer)[k], v, rtol=1e-6, atol=1e-12)
            else:
                np.testing.assert_array_equal(a.arrays(layer)[k], v, err_msg=f"{layer} {k}")


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture()
def cli_files(tmp_path):
    """A seeded seed_mnist_cnn state dict and 40 digit-like inputs (no training, no download)."""
    from lrpfast.models import seed_mnist_cnn

    torch.manual_seed(3)
    model = seed_mnist_cnn()
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    g = torch.Generator().manual_seed(5)
    data = tmp_path / "x.pt"
    torch.save((torch.rand(40, 1, 28, 28, generator=g) > 0.7).float(), data)
    return str(weights), str(data)


def cli(*argv):
    from lrpfast.cli import main

    return main(list(argv))


def test_cli_index_resume_and_explain(tmp_path, cli_files, capsys):
    weights, data = cli_files
    out = str(tmp_path / "idx")
    base = ["--model", "seed_mnist_cnn", "--weights", weights, "--no-progress"]
    assert cli("crp", "index", data, *base, "--layers", "3,7", "--top", "5", "--batch-size", "16", "--shard-size", "16",
               "--out", out) == 0
    assert "wrote 3 shards, skipped 0" in capsys.readouterr().out
    idx = open_index(out)
    assert idx.layers == ["3", "7"] and idx.arrays("3")["relevance_ids"].shape == (64, 5)
    assert cli("crp", "index", data, *base, "--layers", "3,7", "--top", "5", "--batch-size", "16", "--shard-size", "16",
               "--out", out) == 0
    assert "wrote 0 shards, skipped 3 finished" in capsys.readouterr().out   # resumed: nothing recomputed
    png = str(tmp_path / "c.png")
    assert cli("crp", "explain", data, "--sample", "2", *base[:-1], "--layer", "3", "--top", "3", "--index", out,
               "--refs", "4", "--out", png) == 0
    text = capsys.readouterr().out
    assert os.path.getsize(png) > 1000 and text.count("channel ") == 3 and "refs [" in text
    # the shares printed are each channel's relevance over the layer's absolute total
    assert "share" in text


@pytest.mark.parametrize("case", ["unknown layer", "empty file", "empty folder", "no layer", "other model", "bad top"])
def test_cli_errors_are_one_line_with_status_2(tmp_path, cli_files, capsys, case):
    weights, data = cli_files
    base = ["--model", "seed_mnist_cnn", "--weights", weights, "--no-progress"]
    out = str(tmp_path / "idx")
    if case == "unknown layer":
        argv, want = ["crp", "index", data, *base, "--layers", "3,features.9", "--out", out], \
            "lrpfast crp index: error: CRP: unknown layer 'features.9': no module of that name"
    elif case == "empty file":
        empty = str(tmp_path / "empty.pt")
        torch.save(torch.zeros(0, 1, 28, 28), empty)
        argv, want = ["crp", "index", empty, *base, "--layers", "3", "--out", out], "holds no inputs"
    elif case == "empty folder":
        os.makedirs(tmp_path / "imgs")
        argv, want = ["crp", "index", str(tmp_path / "imgs"), *base, "--layers", "3", "--out", out], "has no images"
    elif case == "no layer":
        argv, want = ["crp", "explain", data, *base[:-1]], "--layer is required"
    elif case == "other model":
        assert cli("crp", "index", data, *base, "--layers", "3", "--top", "2", "--out", out) == 0
        other = str(tmp_path / "other.pt")
        torch.save({k: v + 1 for k, v in torch.load(weights).items()}, other)
        argv, want = ["crp", "explain", data, "--model", "seed_mnist_cnn", "--weights", other, "--layer", "3",
                      "--index", out], "built from another model"
    else:
        argv, want = ["crp", "index", data, *base, "--layers", "3", "--top", "0"], "argument --top: must be an int >= 1"
    capsys.readouterr()
    if case == "bad top":
        with pytest.raises(SystemExit) as exc:
            cli(*argv)
        status = exc.value.code
    else:
        status = cli(*argv)
    err = capsys.readouterr().err
    assert status == 2 and want in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- reference crops


def tap_mask_oracle(model, layer, x, channels, positions=None):
    """The conditional relevance another way: the layer tap multiplies the relevance at the
    layer's output by a one-hot mask per sample (exact CRP on this sequential model)."""
    def mask(name, r):
        m = torch.zeros_like(r.reshape(len(x), r.shape[1], -1))
        for b, c in enumerate(channels):
            if positions is None:
                m[b, c] = 1
            else:
                m[b, c, positions[b]] = 1
        return r * m.view_as(r)

    return LayerTap(lrpfast.LRP(model), [layer], on_relevance=mask).explain(x)


@pytest.mark.parametrize("layer,shape", [("0", (4, 8, 8)), ("3", (6, 2, 2))])
def test_neuron_heatmaps_equal_a_mask_at_the_layer(layer, shape):
    from lrpfast.crp.crops import neuron_relevance

    model, x = toy_model(), toy_inputs()[:5]
    channels = [0, 3, 1, 3, 2]
    positions = [p % (shape[1] * shape[2]) for p in (5, 0, 3, 2, 1)]
    lrp = lrpfast.LRP(model)
    got = neuron_relevance(lrp, layer, x, channels, positions, shape=shape)
    torch.testing.assert_close(got, tap_mask_oracle(model, layer, x, channels, positions), rtol=1e-10, atol=1e-13)
    got = neuron_relevance(lrp, layer, x, channels)
    torch.testing.assert_close(got, tap_mask_oracle(model, layer, x, channels), rtol=1e-10, atol=1e-13)
    with pytest.raises(RelevanceError, match=f"position {shape[1] * shape[2]} is out of range"):
        neuron_relevance(lrp, layer, x[:1], [0], [shape[1] * shape[2]], shape=shape)


def test_crops_lie_in_the_neurons_receptive_field(tmp_path):
    """Layer 0 (conv 3x3 on the 10x10 input): the neuron at (i, j) sees input rows i..i+2, cols
    j..j+2; layer 3 (conv 3x3 after a 2x2 pool after conv 3x3) sees rows 2i..2i+7. With no margin
    and no minimum size every crop lies inside that field, and holds the map's largest positive pixel."""
    from lrpfast.crp.crops import reference_crops

    build(tmp_path)
    idx = open_index(tmp_path)
    model, x = toy_model(), toy_inputs()
    for layer, (stride, extent) in (("0", (1, 3)), ("3", (2, 8))):
        w = idx.spatial(layer)[1]
        for c in range(2):
            crops = reference_crops(model, x, idx, layer, c, n=4, margin=0.0, min_size=0)
            ids, _, pos = idx.top(layer, c, n=4)
            assert [cr.sample for cr in crops] == ids.tolist()
            for cr, p in zip(crops, pos.tolist()):
                i, j = divmod(p, w)
                top, bottom, left, right = cr.box
                assert stride * i <= top < bottom <= stride * i + extent, (layer, cr.box, p)
                assert stride * j <= left < right <= stride * j + extent, (layer, cr.box, p)
                assert tuple(cr.image.shape[1:]) == (bottom - top, right - left)
                if cr.heatmap.max() > 0:
                    assert cr.heatmap.max() == cr.heatmap.max()   # noqa: PLR0124 (finite)


def test_crop_box_threshold_margin_and_fallbacks():
    from lrpfast.crp.crops import crop_box

    h = torch.zeros(10, 10)
    h[4, 5], h[6, 2], h[2, 8] = 1.0, 0.2, 0.05   # 0.05 is below 0.1 x the max
    assert crop_box(h, 0.1, margin=0.0) == (4, 7, 2, 6)
    assert crop_box(h, 0.01, margin=0.0) == (2, 7, 2, 9)
    assert crop_box(h, 0.1, margin=0.0, min_size=6) == (3, 9, 1, 7)   # widened around the box
    corner = torch.zeros(10, 10)
    corner[0, 9] = 1.0
    assert crop_box(corner, 0.1, margin=0.0, min_size=4) == (0, 4, 6, 10)   # shifted to stay inside the image
    assert crop_box(h, 0.1, margin=0.5) == (2, 9, 0, 8)   # half the box size more on each side, clipped
    assert crop_box(-h, 0.1, margin=0.0) == (4, 7, 2, 6)   # no positive relevance: |R|
    assert crop_box(torch.zeros(10, 10)) == (0, 10, 0, 10)   # none at all: the whole image


def test_container_layers_are_named_as_in_cond_attribution(tmp_path):
    """A block (a Sequential of conv + ReLU) is a layer as CondAttribution names it: its output is
    its ReLU's, so its index equals the ReLU's."""
    inner = toy_model()
    model = torch.nn.Sequential(torch.nn.Sequential(inner[0], inner[1]), *list(inner)[2:]).eval()
    x = toy_inputs()
    relevance_maximization(model, x, tmp_path / "a", ["0", "0.1"], n_top=4, shard_size=16, progress=False)
    idx = open_index(tmp_path / "a")
    for k, v in idx.arrays("0.1").items():
        np.testing.assert_array_equal(idx.arrays("0")[k], v, err_msg=k)
    assert (idx.arrays("0")["activation_values"] >= 0).all()   # after the ReLU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_stabilized_equals_the_where_form_bit_for_bit(dtype):
    """layer_tap.stabilized (sign arithmetic instead of torch.where) against _fallback.stabilize:
    the same bits for zeros of both signs, tiny and huge values, infinities, eps 0; NaN stays NaN."""
    from lrpfast import _fallback
    from lrpfast.crp.layer_tap import stabilized

    g = torch.Generator().manual_seed(3)
    z = (torch.randn(4000, generator=g, dtype=torch.float64)
         * torch.logspace(-12, 3, 4000, dtype=torch.float64)).to(dtype)
    z[:7] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), -1e-7, 1e-7, float("nan")], dtype=torch.float64)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[z.element_size()]
    for eps in (1e-6, 0.25, 0.0):
        for st in ("sign", "plus"):
            got, want = stabilized(z, eps, st), _fallback.stabilize(z, eps, st)
            assert torch.equal(got[:6].view(bits), want[:6].view(bits)), (eps, st)
            assert torch.equal(got[7:].view(bits), want[7:].view(bits)), (eps, st)
            assert bool(got[6].isnan()) and bool(want[6].isnan())
