"""The whole-model pass on traced graphs: every supported node kind, K targets, chunking,
BatchNorm folding, the per-layer report, and that the user's model is left alone."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrpfast
from lrpfast import layers as L
from lrpfast.models import seed_mnist_cnn
from lrpfast.ops import RelevanceError

from .test_lrp_models import gradient_times_input, randomize_batch_norm, rel_err


class Block(nn.Module):
    """Residual block: conv-bn-relu-conv-bn + skip, relu (the same ReLU module used twice)."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding="same"), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class Everything(nn.Module):
    """One model with every node kind the pass supports (functional and module forms)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.5), nn.Identity())
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.branch = nn.Conv2d(8, 4, 1)
        self.norm = nn.BatchNorm2d(12)                      # after a cat: DenseNet order, not folded
        self.even = nn.Conv2d(12, 6, 2, padding="same")     # even kernel: asymmetric 'same' padding
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Sequential(nn.Linear(6 * 2 * 2, 16), nn.BatchNorm1d(16), nn.ReLU6(), nn.Linear(16, 5))

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        x = F.max_pool2d(x, 2)                              # 16 -> 8
        y = F.relu(self.branch(x))
        x = torch.cat([x, y], dim=1)
        x = torch.relu(self.norm(x))
        x = self.even(x)
        x = self.pool(x).permute(0, 2, 3, 1).contiguous().transpose(1, 3).transpose(2, 3).contiguous()  # 8 -> 4
        x = F.adaptive_avg_pool2d(x, (2, 2))
        x = x.view(x.size(0), -1)
        return self.head(x)


def everything(dtype=torch.float64):
    torch.manual_seed(0)
    return randomize_batch_norm(Everything()).to(dtype).eval()


def test_every_node_kind_matches_gradient_times_input():
    """LRP-0 on a ReLU graph equals x ⊙ ∂f/∂x (biases, unfolded BN, ReLU6 below its cap aside:
    ReLU6 passes relevance, so keep inputs small enough that it never clips)."""
    model = everything()
    x = 0.1 * torch.randn(3, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([0, 4, 2])
    lrp = lrpfast.LRP(model, eps=0.0)
    got = lrp(x, t)
    assert rel_err(got, gradient_times_input(model, x, t)) < 1e-12
    ops = " ".join(s.op for s in lrp.plan.steps)
    for kind in ("BatchNorm2d (folded)", "BatchNorm2d", "cat", "add", "AvgPool2d", "adaptive_avg_pool2d", "ReLU6",
                 "BatchNorm1d (folded)", "max_pool2d", "permute", "transpose", "view", "contiguous"):
        assert kind in ops, kind


def test_module_used_twice_has_two_entries():
    model = everything()
    e = lrpfast.LRP(model).explain(0.1 * torch.randn(2, 3, 16, 16, dtype=torch.float64), keep_layers=True)
    relu_nodes = [n for n in e.layers if n.startswith("blocks_0_relu")]
    assert len(relu_nodes) == 2
    assert e.layers[relu_nodes[0]].shape == e.layers[relu_nodes[1]].shape == (2, 8, 16, 16)
    add_maps = [v for n, v in e.layers.items() if n.startswith("add")][0]
    assert isinstance(add_maps, tuple) and len(add_maps) == 2   # one map per summand


def chain_rel_layers(model: nn.Sequential, x, eps=1e-6, stabilizer="sign"):
    """The seed's way, through lrpfast's rel* wrappers: forward, logit at argmax, relprop back."""
    wrap = {nn.Conv2d: L.relConv2d, nn.Linear: L.relLinear, nn.MaxPool2d: L.relMaxPool2d}
    layers = []
    for m in model:
        if isinstance(m, nn.ReLU):
            layers.append(L.relReLU(m))
        elif isinstance(m, nn.Flatten):
            layers.append(L.Reshape())
        else:
            layers.append(wrap[type(m)](m, eps, stabilizer))
    h = x
    for layer in layers:
        h = layer(h)
    r = h * torch.zeros_like(h).scatter(1, h.argmax(1, keepdim=True), 1)
    for layer in reversed(layers):
        r = layer.relprop(r)
    return r


@pytest.mark.parametrize("variant", ["notebook", "conv3x2"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("stabilizer", ["sign", "plus"])
def test_graph_path_equals_hand_chained_layers(variant, dtype, tol, stabilizer):
    model = seed_mnist_cnn(variant).to(dtype).eval()
    x = torch.randn(5, 1, 28, 28, dtype=dtype)
    want = chain_rel_layers(model, x, stabilizer=stabilizer)
    lrp = lrpfast.LRP(model, stabilizer=stabilizer)
    assert rel_err(lrp(x), want) < tol
    assert rel_err(lrp.explain(x).relevance, want) < tol   # unfused pooling path too
    # a Sequential of the rel* wrappers themselves traces to the same graph
    wrapped = nn.Sequential(*[L.relReLU(m) if isinstance(m, nn.ReLU) else L.Reshape() if isinstance(m, nn.Flatten)
                              else {nn.Conv2d: L.relConv2d, nn.Linear: L.relLinear,
                                    nn.MaxPool2d: L.relMaxPool2d}[type(m)](m) for m in model])
    assert rel_err(lrpfast.LRP(wrapped, stabilizer=stabilizer)(x), want) < tol


@pytest.mark.parametrize("factory", ["seed", "everything"])
def test_k_targets_in_one_pass_equal_k_runs(factory):
    if factory == "seed":
        model, x = seed_mnist_cnn("conv3x2").eval(), torch.randn(4, 1, 28, 28)
    else:
        model, x = everything(torch.float32), 0.1 * torch.randn(4, 3, 16, 16)
    lrp = lrpfast.LRP(model)
    classes = 10 if factory == "seed" else 5
    t = torch.stack([torch.randperm(classes)[:3] for _ in range(4)])     # (B, K) = (4, 3)
    both = lrp(x, t)
    assert both.shape == (4, 3, *x.shape[1:])
    e = lrp.explain(x, t, keep_layers=True)
    assert e.targets.shape == (4, 3) and e.conservation["output"].shape == (4, 3)
    for k in range(3):
        single = lrp(x, t[:, k])
        assert rel_err(both[:, k], single) <= 1e-5
        assert rel_err(e.relevance[:, k], single) <= 1e-5
    # K = 1 given as (B, 1) keeps its K axis
    assert lrp(x, t[:, :1]).shape == (4, 1, *x.shape[1:])


def test_targets_forms():
    model = seed_mnist_cnn("notebook").eval()
    lrp = lrpfast.LRP(model)
    x = torch.randn(3, 1, 28, 28)
    e = lrp.explain(x)
    assert torch.equal(e.targets, e.logits.argmax(1))
    assert torch.allclose(lrp(x, e.targets), e.relevance)
    assert torch.allclose(lrp(x, 4), lrp(x, torch.tensor([4, 4, 4])))
    assert torch.allclose(lrp(x, [4, 4, 4]), lrp(x, torch.tensor([4, 4, 4])))
    assert torch.allclose(lrp(x, torch.tensor(4)), lrp(x, 4))


def test_onehot_init_is_logit_init_over_the_logit():
    model = seed_mnist_cnn("notebook").double().eval()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    e = lrpfast.LRP(model).explain(x)
    one = lrpfast.LRP(model, init="onehot")(x)
    logit = e.logits.gather(1, e.targets[:, None]).view(3, 1, 1, 1)
    assert rel_err(one * logit, e.relevance) < 1e-12


@pytest.mark.parametrize("how", [dict(batch_size=2), dict(memory_budget=1), dict(memory_budget="64KiB")])
def test_chunked_equals_unchunked(how):
    # float64: in float32 the GEMMs round differently for another batch size (~1e-6)
    model = everything(torch.float64)
    x = 0.1 * torch.randn(5, 3, 16, 16, dtype=torch.float64)
    t = torch.randint(0, 5, (5, 2))
    whole = lrpfast.LRP(model)
    chunked = lrpfast.LRP(model, **how)
    assert chunked._chunk(x, 2) < 5
    assert rel_err(chunked(x, t), whole(x, t)) < 1e-12
    a, b = chunked.explain(x, keep_layers=True), whole.explain(x, keep_layers=True)
    assert torch.equal(a.targets, b.targets) and rel_err(a.logits, b.logits) < 1e-12
    assert a.conservation.keys() == b.conservation.keys() and a.layers.keys() == b.layers.keys()
    for n in b.conservation:
        assert rel_err(a.conservation[n], b.conservation[n]) < 1e-12, n
    for n, v in b.layers.items():
        for p, q in zip(a.layers[n] if isinstance(v, tuple) else [a.layers[n]], v if isinstance(v, tuple) else [v]):
            assert rel_err(p, q) < 1e-12, n


def test_memory_budget_sizes_chunks_by_estimate():
    model = seed_mnist_cnn("conv3x2").eval()
    lrp = lrpfast.LRP(model, memory_budget="8MiB")
    x = torch.randn(64, 1, 28, 28)
    chunk = lrp._chunk(x, 1)
    total, largest, weights, scratch = lrp._per_sample[(tuple(x.shape[1:]), x.dtype, x.device)]
    assert scratch == 0                                       # no step holds scratch beyond its maps
    assert largest == 4 * 64 * 24 * 24                        # the second conv's output, one sample
    assert total > 4 * (32 * 26 * 26 + 64 * 24 * 24) and weights > 4 * 9216 * 128
    assert chunk == (8 << 20) // (total + 3 * largest) and 1 <= chunk < 64
    assert lrp._chunk(x, 10) < chunk                         # K maps per sample need more


def test_cpu_schedule_keeps_tensors_small_only_where_it_pays():
    seed = lrpfast.LRP(seed_mnist_cnn("conv3x2").eval())
    x = torch.randn(256, 1, 28, 28)
    chunk, group = seed._schedule(x, 10)
    assert chunk * 4 * 64 * 24 * 24 <= seed.HEAP_TENSOR and chunk < 256 and group == 1
    assert seed._schedule(x[:16], 10) == (16, 4)             # 16 samples: 4 targets per pass
    assert seed._schedule(x[:16], 1) == (16, 1)
    # big weights, small activations: reading the weights per chunk would cost more than it saves
    heavy = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 4096), nn.ReLU(),
                          nn.Linear(4096, 10)).eval()
    lrp = lrpfast.LRP(heavy)
    lrp.HEAP_TENSOR = 1 << 16
    assert lrp._schedule(torch.randn(64, 1, 28, 28), 1)[0] == 64


def test_target_groups_and_chunks_equal_one_pass():
    model = everything(torch.float64)
    x = 0.1 * torch.randn(6, 3, 16, 16, dtype=torch.float64)
    t = torch.randint(0, 5, (6, 4))
    one = lrpfast.LRP(model)
    one.HEAP_TENSOR = 1 << 40                               # one pass
    assert one._schedule(x, 4) == (6, 4)
    small = lrpfast.LRP(model)
    small.HEAP_TENSOR = 1 << 14                             # chunks and one target per pass
    chunk, group = small._schedule(x, 4)
    assert chunk < 6 and group == 1
    assert rel_err(small(x, t), one(x, t)) < 1e-12
    assert rel_err(small(x), one(x)) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_batch_norm_folding_keeps_the_forward(dtype, tol):
    torchvision = pytest.importorskip("torchvision")
    model = randomize_batch_norm(torchvision.models.resnet18(weights=None, num_classes=10)).to(dtype).eval()
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    lrp = lrpfast.LRP(model)
    folded = [s for s in lrp.plan.steps if getattr(s, "bn", None) is not None]
    assert len(folded) == 20                      # every BatchNorm of resnet18 follows a conv
    assert not any(isinstance(s, lrpfast.nodes.BatchNormStep) for s in lrp.plan.steps)
    with torch.no_grad():
        assert rel_err(lrp.explain(x).logits, model(x)) < tol
    # Linear -> BatchNorm1d and BN after a cat (not foldable)
    m = everything(dtype)
    with torch.no_grad():
        x2 = 0.1 * torch.randn(2, 3, 16, 16, dtype=dtype)
        assert rel_err(lrpfast.LRP(m).explain(x2).logits, m(x2)) < tol


def snapshot(model):
    return {k: (v, v.clone(), v._version) for k, v in model.state_dict(keep_vars=True).items()}


def test_model_and_its_parameters_are_untouched():
    model = everything(torch.float32)
    model.train()                       # its Dropout/BatchNorm in training mode: refused, nothing touched
    with pytest.raises(RelevanceError, match="is in training mode"):
        lrpfast.LRP(model)
    model.eval()
    before = snapshot(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    inplace = [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)]
    x = (0.1 * torch.randn(2, 3, 16, 16)).requires_grad_(True)
    x_before = x.detach().clone()
    lrp = lrpfast.LRP(model)
    r = lrp(x)
    e = lrp.explain(x, keep_layers=True)
    assert not model.training   # the mode the user set is kept
    after = model.state_dict(keep_vars=True)
    for k, (t, values, version) in before.items():
        assert after[k] is t and torch.equal(t, values) and t._version == version, k
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    assert inplace == [m.inplace for m in model.modules() if isinstance(m, nn.ReLU)]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(x.detach(), x_before) and x.grad is None
    assert not r.requires_grad and r.grad_fn is None and not e.relevance.requires_grad
    # parameters need not require grad
    for p in model.parameters():
        p.requires_grad_(False)
    assert torch.allclose(lrpfast.LRP(model)(x), r)


def test_parameter_changes_are_picked_up():
    model = everything(torch.float64)
    x = 0.1 * torch.randn(2, 3, 16, 16, dtype=torch.float64)
    lrp = lrpfast.LRP(model)
    first = lrp(x)
    with torch.no_grad():
        model.blocks[0].conv1.weight.mul_(1.5)       # folded with bn1
        model.blocks[0].bn1.running_var.mul_(2.0)
        model.norm.running_mean.add_(0.1)            # unfolded BatchNorm
        model.head[0].weight.mul_(0.5)
    second = lrp(x)
    assert rel_err(second, first) > 1e-3
    assert rel_err(second, lrpfast.LRP(model)(x)) < 1e-12


def test_explain_report_keys_and_shapes():
    model = seed_mnist_cnn("notebook").eval()
    lrp = lrpfast.LRP(model)
    x = torch.randn(3, 1, 28, 28)
    e = lrp.explain(x)
    assert e.layers is None
    assert list(e.conservation) == ["output", "_9", "_8", "_7", "_6", "_5", "_4", "_3", "_2", "_1", "_0", "input_1"]
    assert all(v.shape == (3,) for v in e.conservation.values())
    assert e.logits.shape == (3, 10) and e.targets.shape == (3,)
    e = lrp.explain(x, keep_layers=True)
    assert e.layers["_0"].shape == x.shape and e.layers["_9"].shape == (3, 128)
    assert torch.allclose(e.layers["_0"], e.relevance)
    assert lrp.node_names[:3] == ["input_1", "_0", "_1"]
    assert "Conv2d" in repr(lrp) and "in place" in repr(lrp)


def test_fusion_decisions_on_the_seed_cnn():
    lrp = lrpfast.LRP(seed_mnist_cnn("conv3x2"))
    steps = {s.name: s for s in lrp.plan.steps}
    assert steps["_1"].inplace and steps["_3"].inplace and steps["_7"].inplace   # ReLUs on the layers' z
    assert steps["_4"].prediv == steps["_2"].index and steps["_4"].prediv_same_tensor
    assert steps["_0"].output_feeds_relu and not steps["_8"].output_feeds_relu
    assert steps["_0"].is_first and not steps["_2"].is_first and steps["_2"].x_nonnegative


def test_relu_not_in_place_when_relevance_may_arrive_at_zeros():
    """A rule that does not multiply by the input (flat) on the layer above a ReLU: that ReLU must
    keep the layer's z intact."""
    rules = pytest.importorskip("lrpfast.rules")
    if not hasattr(rules, "Flat"):
        pytest.skip("no Flat rule")

    class Above:
        def rule_for(self, name, module, ctx):
            return rules.Flat() if name == "2" else None

    model = seed_mnist_cnn("conv3x2").double().eval()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    lrp = lrpfast.LRP(model, composite=Above())
    steps = {s.name: s for s in lrp.plan.steps}
    assert not steps["_1"].inplace and steps["_3"].inplace
    got = lrp(x)
    # the same plan with every ReLU out of place
    for s in lrp.plan.steps:
        if getattr(s, "is_relu", False):
            s.inplace = False
    assert rel_err(got, lrp(x)) < 1e-12
    # what the check prevents: rectifying the first conv's z changes the map
    steps["_1"].inplace = True
    assert rel_err(lrp(x), got) > 1e-3


@pytest.mark.parametrize("factory", ["seed", "everything"])
def test_layer_outputs_are_freed_as_soon_as_their_step_has_run(factory):
    import weakref

    from lrpfast import graph

    model = seed_mnist_cnn("conv3x2").eval() if factory == "seed" else everything(torch.float32)
    x = torch.randn(3, 1, 28, 28) if factory == "seed" else 0.1 * torch.randn(3, 3, 16, 16)
    lrp = lrpfast.LRP(model)
    call = graph.forward(lrp.plan, x)
    outputs = {i: weakref.ref(call.saved[i].z) for i, s in enumerate(lrp.plan.steps)
               if isinstance(s, lrpfast.nodes.ContractionStep)}
    logits = call.logits
    r0 = torch.zeros_like(logits).scatter_(1, logits.argmax(1, keepdim=True), 1.0)
    del logits
    call.logits = None
    alive_after = {}

    def record(step, outs):
        alive_after[step.index] = [i for i, ref in outputs.items() if i >= step.index and ref() is not None]

    graph.relevance(lrp.plan, call, r0, record)
    assert alive_after and all(not alive for alive in alive_after.values()), alive_after


class _ConstChain(nn.Module):
    """A factor computed from a parameter and a buffer: exp(p) * 2 + b (three constant steps)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.p = nn.Parameter(torch.randn(4))
        self.register_buffer("b", torch.zeros(4))

    def forward(self, x):
        return self.lin(x) * (self.p.exp() * 2 + self.b)


def test_cached_constants_read_only_by_constants_are_recomputed_when_needed():
    """lrpfast/fusion.py cache_constants: exp(p) and exp(p) * 2 keep no value between calls (only
    the sum read by the product does); when b changes in place, the sum is recomputed from them
    (recomputed too, p unchanged): the same map as a fresh LRP, not a stale one."""
    from lrpfast import fusion

    torch.manual_seed(0)
    model = _ConstChain().double().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    lrp = lrpfast.LRP(model, eps=0.0)
    first = lrp(x)
    plan = lrp._plan if lrp._plan is not None else next(iter(lrp._shape_plans.values()))
    cached = [s for s in plan.steps if isinstance(s, fusion._CachedConstExprStep)]
    assert sum(s.drop for s in cached) == 2 and all(s.cached[1] is None for s in cached if s.drop)
    assert torch.equal(lrp(x), first)                          # all keys match: nothing recomputed
    with torch.no_grad():
        model.b.add_(0.5)
    again = lrp(x)
    fresh = lrpfast.LRP(model, eps=0.0)(x)
    assert torch.allclose(again, fresh, rtol=1e-13, atol=1e-15) and not torch.allclose(again, first)
