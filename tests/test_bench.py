"""`lrpfast bench`: a tiny run of the CLI (every JSON field, agreement computed), and the pieces
whose numbers the benchmark reports: the seed-style baseline against the float64 fallback in
seed-parity mode, the floor against the analytic input gradient, the statistics, the memory
probe and the kernel mode. No timed assertions: speed is for the benchmark to report."""
from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import torch.nn as nn

import lrpfast
from lrpfast.bench.implementations import RelChain, floor, lrp_available, make_lrp, relative_l2, Workload
from lrpfast.bench.seed_baseline import SeedStyleLRP
from lrpfast.bench.timing import paired_ratio, peak_memory, quantile, summarize
from lrpfast.bench.workloads import chain_layers, make_input
from lrpfast.cli import main as cli_main
from lrpfast.models import seed_mnist_cnn

ROW_FIELDS = {"name", "status", "note", "times_s", "median_s", "q1_s", "q3_s", "iqr_s", "min_s", "n", "per_image_s",
              "x_floor", "agreement_rel_l2", "peak_memory"}
CONFIG_FIELDS = {"model", "composite", "dtype", "device", "batch", "eps", "stabilizer", "init", "params", "warmup",
                 "repeats", "reference", "reference_note", "primary", "speedups", "implementations"}
MACHINE_FIELDS = {"date", "cpu", "cpu_count", "torch_threads", "torch", "torch_cuda", "device", "gpu",
                  "lrpfast_build", "git_commit", "python"}


def _peer_installed(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def test_cli_smoke_writes_every_field(tmp_path, capsys):
    out = tmp_path / "b.json"
    impls = "lrpfast,lrpfast-fallback,rel-chain,rel-chain-fallback,seed-baseline,floor,zennit,captum"
    rc = cli_main(["bench", "--quick", "--no-progress", "--models", "mnist-notebook", "--impls", impls,
                   "--json", str(out), "--plot", str(tmp_path / "b.png")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "rel-chain" in text and "x floor" in text  # the table was printed
    payload = json.loads(out.read_text())
    assert MACHINE_FIELDS <= set(payload["machine"])
    assert payload["machine"]["lrpfast_build"]["extension_loaded"] == lrpfast.HAS_EXT
    (config,) = payload["configs"]
    assert CONFIG_FIELDS <= set(config)
    assert config["reference"], config["reference_note"]
    rows = {r["name"]: r for r in config["implementations"]}
    assert list(rows) == impls.split(",")
    for name in ("rel-chain-fallback", "seed-baseline", "floor") + (("rel-chain",) if lrpfast.HAS_EXT else ()):
        row = rows[name]
        assert row["status"] == "ok", row
        assert ROW_FIELDS <= set(row), set(ROW_FIELDS) - set(row)
        assert len(row["times_s"]) == 1 and row["median_s"] > 0
        assert row["peak_memory"]["how"]
    # Agreement beside every relevance map; the floor's gradient against the float64 gradient.
    assert rows["floor"]["agreement_rel_l2"] < 1e-5
    assert rows["rel-chain-fallback"]["agreement_rel_l2"] < 1e-5
    assert 0 < rows["seed-baseline"]["agreement_rel_l2"] < 1e-3  # max-pool factor, seed's stabiliser
    assert rows["floor"]["x_floor"] == pytest.approx(1.0)
    for peer in ("zennit", "captum"):
        if _peer_installed(peer):
            assert rows[peer]["status"] == "ok", rows[peer]
            assert rows[peer]["agreement_rel_l2"] < 1e-3, rows[peer]
        else:
            assert rows[peer]["status"] == "skipped" and "not installed" in rows[peer]["note"]
    if lrp_available():
        assert rows["lrpfast-fallback"]["status"] == "ok", rows["lrpfast-fallback"]
        assert rows["lrpfast-fallback"]["agreement_rel_l2"] < 1e-5
    else:
        assert rows["lrpfast"]["status"] == "skipped" and "LRP" in rows["lrpfast"]["note"]
    if _peer_installed("matplotlib"):
        assert (tmp_path / "b.png").stat().st_size > 1000


def test_cli_kernel_mode(tmp_path):
    out = tmp_path / "k.json"
    assert cli_main(["bench", "--kernels", "--kernel-mib", "1", "--repeats", "1", "--warmup", "0", "--no-progress",
                     "--dtype", "float32,bfloat16", "--json", str(out)]) == 0
    k, k_bf16 = json.loads(out.read_text())["kernels"]
    assert (k["dtype"], k_bf16["dtype"]) == ("float32", "bfloat16")
    ops_seen = {(r["op"], r["impl"]) for r in k["results"]}
    impls = (["extension"] if lrpfast.HAS_EXT else []) + ["fallback"]
    for op in ("stab_div", "mul_input", "mul_stab_div", "max_pool_relprop"):
        for impl in impls:
            assert (op, impl) in ops_seen
    assert ("copy_", "torch") in ops_seen
    for r in k["results"]:
        assert r["gb_per_s"] > 0 and r["fraction_of_copy"] > 0, r
    n = math.prod(k["shape"])
    elt = 4
    byte_counts = {r["op"]: r["bytes"] for r in k["results"]}
    assert byte_counts["copy_"] == 2 * n * elt and byte_counts["mul_stab_div"] == 4 * n * elt


@pytest.mark.parametrize("variant", ["notebook", "conv3x2"])
def test_seed_baseline_matches_float64_fallback_in_seed_parity_mode(variant):
    """The seed's algorithm (bmm, recomputed indices, z + 1e-6) and lrpfast's fallback with
    stabilizer="plus" differ only by the seed's x/(x+ε) factor at max-pool winners."""
    torch.manual_seed(0)
    model = seed_mnist_cnn(variant).double().eval()
    x = make_input("mnist-" + variant, 5, torch.float64, "cpu")
    target = torch.tensor([0, 3, 9, 9, 1])
    seed_map = SeedStyleLRP(chain_layers(model))(x, target).detach()
    with lrpfast.use_implementation("fallback"):
        ref = RelChain(model, eps=1e-6, stabilizer="plus")(x, target, "logit")
        refs = [ref]
        if lrp_available():
            w = Workload("mnist-" + variant, model, x, target, "epsilon", 1e-6, "plus", "logit")
            refs.append(make_lrp(model, w)(x, target))
    for r in refs:
        assert r.abs().sum() > 0
        # per sample: the seed's batch > 1 bug (B1) is not reproduced
        for b in range(x.shape[0]):
            assert relative_l2(seed_map[b], r[b]) < 1e-3
    # the seed's initial relevance is the target logit: with zero biases the map sums to the
    # logit, up to what ε = 1e-6 absorbs (relatively most where a logit is tiny)
    nobias = seed_mnist_cnn(variant).double().eval()
    nobias.load_state_dict(model.state_dict())
    for m in nobias.modules():
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    logits = nobias(x).gather(1, target.view(-1, 1)).squeeze(1).detach()
    sums = SeedStyleLRP(chain_layers(nobias))(x, target).detach().sum(dim=(1, 2, 3))
    assert torch.allclose(sums, logits, rtol=0, atol=1e-4 * float(logits.abs().max()))


def test_seed_baseline_keeps_autograd_on():
    model = seed_mnist_cnn("notebook").eval()
    r = SeedStyleLRP(chain_layers(model))(make_input("mnist-notebook", 2, torch.float32, "cpu"))
    assert r.requires_grad and r.grad_fn is not None  # the seed's cost: graphs through the weights


def test_floor_returns_the_input_gradient():
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(6, 5), nn.Linear(5, 3)
    model = nn.Sequential(lin1, nn.ReLU(), lin2)
    x = torch.randn(4, 6, dtype=torch.float64)
    model = model.double()
    t = torch.tensor([0, 2, 1, 2])
    g = floor(model, x, t)
    # analytic: d logit_t / dx = W1ᵀ (1[z1 > 0] ⊙ W2[t])
    with torch.no_grad():
        z1 = lin1(x)
        expected = ((z1 > 0).double() * lin2.weight[t]) @ lin1.weight
    assert torch.allclose(g, expected, rtol=1e-12, atol=1e-12)
    assert not x.requires_grad  # the caller's tensor is left alone


class VGG(nn.Module):
    """A tiny stand-in with torchvision VGG's structure (features, avgpool, flatten, classifier)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(32, 16), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(16, 5))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_vgg_chain_runs_like_the_model_and_peers_agree():
    torch.manual_seed(0)
    model = VGG().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    h = x
    for m in chain_layers(model):
        h = m(h)
    assert torch.allclose(h, model(x))
    t = model(x).argmax(1)
    seed_map = SeedStyleLRP(chain_layers(model))(x, t).detach()
    with lrpfast.use_implementation("fallback"):
        ref = RelChain(model, 1e-6, "plus")(x, t, "logit")
    assert relative_l2(seed_map, ref) < 1e-3
    if _peer_installed("captum"):
        from lrpfast.bench.peers import captum_impl

        w = Workload("vgg-tiny", model, x, t, "epsilon", 1e-6, "sign", "logit")
        with lrpfast.use_implementation("fallback"):
            ref_sign = RelChain(model, 1e-6, "sign")(x, t, "logit")
        assert relative_l2(captum_impl(w).call(), ref_sign) < 1e-3


def test_statistics_match_the_standard_library():
    values = [5.0, 1.0, 4.0, 2.0, 10.0, 3.0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    assert quantile(values, 0.25) == pytest.approx(q1)
    assert quantile(values, 0.5) == pytest.approx(statistics.median(values))
    s = summarize(values)
    assert s["median_s"] == pytest.approx(q2) and s["iqr_s"] == pytest.approx(q3 - q1) and s["n"] == 6
    assert paired_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 1.0]) == pytest.approx(3.0)


def test_peak_memory_sees_an_allocation():
    n = 64 * 2**20 // 4
    mem = peak_memory(lambda: torch.ones(n), "cpu")  # 64 MiB, touched
    assert mem["bytes"] >= 60 * 2**20, mem


class _FakeCuda:
    """torch.cuda's event and memory calls, recorded: the CUDA branches of the timing primitives
    run on a machine without a GPU. The clock is in milliseconds, like CUDA events."""

    def __init__(self):
        self.calls, self.clock, self.allocated, self.peak = [], 0.0, 1000, 1000
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing, "an event without timing cannot be timed"
                self.at = None

            def record(self, stream=None):
                fake.calls.append("record")
                self.at = fake.clock

            def synchronize(self):
                fake.calls.append("event sync")

            def elapsed_time(self, end):
                return end.at - self.at

        self.Event = Event

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "Event", self.Event)
        for name in ("synchronize", "memory_allocated", "reset_peak_memory_stats", "max_memory_allocated"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def synchronize(self, device=None):
        self.calls.append(("sync", device))

    def memory_allocated(self, device=None):
        self.calls.append(("allocated", device))
        return self.allocated

    def reset_peak_memory_stats(self, device=None):
        self.calls.append(("reset", device))
        self.peak = self.allocated

    def max_memory_allocated(self, device=None):
        self.calls.append(("max", device))
        return self.peak


def test_cuda_timer_uses_events_after_a_sync(monkeypatch):
    from lrpfast.bench.timing import Timer

    fake = _FakeCuda()
    fake.install(monkeypatch)

    def call():
        fake.clock += 250.0  # ms of device time between the two events
        return "result"

    assert Timer(torch.device("cuda")).__call__(call) == (pytest.approx(0.25), "result")
    assert fake.calls == [("sync", None), "record", "record", "event sync"]  # queued work is not timed


def test_cuda_peak_memory_reads_the_devices_own_counters(monkeypatch):
    fake = _FakeCuda()
    fake.install(monkeypatch)

    def call():
        fake.peak = fake.allocated + 5 * 2**20
        return torch.empty(0)

    mem = peak_memory(call, "cuda:1")
    assert mem["bytes"] == 5 * 2**20 and "cuda" in mem["how"]
    dev = torch.device("cuda", 1)
    assert [c for c in fake.calls if c != "record"] == [("sync", dev), ("allocated", dev), ("reset", dev),
                                                         ("sync", dev), ("max", dev)]


def test_peers_skip_transformers_with_a_reason():
    """zennit and captum have no rules for LayerNorm/attention: a skip that says so, not a crash
    mid-benchmark (zennit's hooks raised on nn.MultiheadAttention's tuple output)."""
    from lrpfast.bench.implementations import Skip
    from lrpfast.bench.peers import captum_impl, zennit_impl

    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 4)
    w = Workload("ln", model, x, model(x).argmax(1), "epsilon", 1e-6, "sign", "logit")
    for impl, peer in ((zennit_impl, "zennit"), (captum_impl, "captum")):
        if not _peer_installed(peer):
            continue
        with pytest.raises(Skip, match="LayerNorm or attention"):
            impl(w)


def test_vit_workload_has_a_live_head():
    """torchvision zero-initialises the ViT head; the workload must not explain zero logits."""
    pytest.importorskip("torchvision")
    from lrpfast.bench.workloads import build_model

    model = build_model("vit_b_16")
    assert model.heads.head.weight.abs().sum() > 0
