"""Concept Relevance Propagation (lrpfast.crp.CondAttribution): every conditional heatmap and
concept relevance against a value computed another way.

- the oracle: ε-LRP with ε = 0 is gradient × input under the detach rules (lrpfast/oracle.py);
  a condition masks the gradient at the layer's output (the relevance there is output ⊙
  gradient, so masking one masks the other), with exclude_parallel as zennit-crp does it
  (torch.autograd.grad to the layer, mask, backward from there): plain autograd on the model,
  nothing shared with the relevance pass;
- identities: the heatmaps of all channels of a layer every path passes through sum to the
  unconditional map (lrpfast.LRP); K conditions in one call equal K separate calls; a condition
  on "y" only equals lrpfast.LRP;
- bad conditions give errors naming the layer, channel or shape.
The zennit-crp parity (float64, vgg16/resnet18) is benchmarks/crp_parity.py (its own venv).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lrpfast
from lrpfast.crp import CondAttribution
from lrpfast.oracle import detach_rules
from lrpfast.ops import RelevanceError

F64 = torch.float64


def rel_l2(a, b):
    n = b.norm()
    return ((a - b).norm() / (n if n > 0 else 1)).item()


class Block(nn.Module):
    """A residual block with BatchNorms (folded into the convs) and a downsampling skip."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else None
        self.act2 = nn.ReLU()

    def forward(self, x):
        skip = x if self.down is None else self.down(x)
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + skip)


class ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2))
        self.block1 = Block(6, 6, 1)
        self.block2 = Block(6, 8, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block2(self.block1(self.stem(x)))), 1))


def vgg_like():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 7, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(7, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 12), nn.ReLU(),
        nn.Linear(12, 5))


def randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(1)
    return vgg_like().double().eval(), torch.randn(3, 3, 16, 16, dtype=F64)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(2)
    return randomize_bn(ResNetLike()).double().eval(), torch.randn(2, 3, 16, 16, dtype=F64)


def cond_oracle(model, x, y, masks, exclude_parallel=True):
    """Gradient × input under the detach rules with the gradient at each named module's output
    multiplied by its mask ((C,) or (C, *spatial)); masks ordered from the top layer down."""
    mods = dict(model.named_modules())
    outs = {}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o)) for n in masks]
    xg = x.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad(), detach_rules():
            out = model(xg)
    finally:
        for h in hooks:
            h.remove()
    sel = torch.zeros_like(out)
    sel[:, y] = 1
    picked = (out * sel).sum()

    def shaped(m, t):
        return m.reshape(1, *m.shape, *([1] * (t.dim() - 1 - m.dim())))

    if not masks:
        (g,) = torch.autograd.grad(picked, xg)
    elif exclude_parallel:   # zennit-crp's chain: only what passes through each named layer
        src, grad = picked, None
        for n, m in masks.items():
            (g,) = torch.autograd.grad(src, outs[n], grad_outputs=grad, retain_graph=True)
            src, grad = outs[n], g * shaped(m, outs[n])
        (g,) = torch.autograd.grad(src, xg, grad_outputs=grad)
    else:
        for n, m in masks.items():
            outs[n].register_hook(lambda g, m=m, t=outs[n]: g * shaped(m, t))
        (g,) = torch.autograd.grad(picked, xg)
    return (xg * g).detach(), {n: (outs[n] * 0).detach() for n in masks}


def channel_mask(c, channels, dtype=F64):
    m = torch.zeros(c, dtype=dtype)
    m[list(channels)] = 1
    return m


# ----------------------------------------------------------------------------- identities


def n_channels(attr, x, layer):
    return attr(x[:1], [{"y": 0}], record_layer=[layer]).relevances[layer].shape[-1]


@pytest.mark.parametrize("layer", ["0", "2", "5", "7", "9"])
def test_channels_of_a_layer_sum_to_the_unconditional_map(vgg, layer, impl):
    model, x = vgg
    attr = CondAttribution(model, composite="epsilon_plus_flat")
    n = n_channels(attr, x, layer)
    res = attr(x, [{"y": 2, layer: [ch]} for ch in range(n)])
    want = attr.lrp(x, 2)
    assert res.relevance.shape == (3, n, *x.shape[1:])
    assert rel_l2(res.relevance.sum(1), want) <= 1e-12
    assert rel_l2(res.heatmap.sum(1), want.sum(1)) <= 1e-12
    # and not trivially: single channels differ from the whole
    assert rel_l2(res.relevance[:, 0], want) > 1e-3


@pytest.mark.parametrize("layer", ["stem", "block1", "block2", "stem.0", "block2.conv2", "block2.bn2"])
def test_channel_sum_on_a_resnet(resnet, layer):
    """Block outputs and the stem (a folded conv+BN): every path passes through them, so the
    channels sum to lrpfast.LRP's map. Inside a block (exclude_parallel=True) they sum to the part
    that passes through the branch: the oracle with the whole layer's gradient kept there."""
    model, x = resnet
    attr = CondAttribution(model, eps=0.0)
    n = n_channels(attr, x, layer)
    res = attr(x, [{"y": 1, layer: [ch]} for ch in range(n)])
    if "." not in layer or layer == "stem.0":
        want = attr.lrp(x, 1)
    else:
        want, _ = cond_oracle(model, x, 1, {layer: torch.ones(n, dtype=F64)})
        assert rel_l2(want, attr.lrp(x, 1)) > 1e-3   # the skip's part is missing
    assert rel_l2(res.relevance.sum(1), want) <= 1e-10


def test_condition_on_y_only_equals_lrp(resnet, impl):
    model, x = resnet
    attr = CondAttribution(model, composite="epsilon_plus_flat")
    lrp = lrpfast.LRP(model, composite="epsilon_plus_flat")
    res = attr(x, [{"y": 3}, {"y": [0]}, {}])
    assert rel_l2(res.relevance[:, 0], lrp(x, 3)) <= 1e-14
    assert rel_l2(res.relevance[:, 1], lrp(x, 0)) <= 1e-14
    assert rel_l2(res.relevance[:, 2], lrp(x)) <= 1e-14   # no "y": the prediction
    assert torch.equal(res.targets[:, 2, 0], res.prediction.argmax(1))


def test_k_conditions_in_one_call_equal_k_separate_calls(resnet, impl):
    model, x = resnet
    attr = CondAttribution(model, composite="epsilon_plus_flat")
    mask = torch.rand(8, dtype=F64)
    spatial = (torch.rand(8, 4, 4, dtype=F64) > 0.5).double()
    conds = [
        {"y": 1, "block2": [3]},
        {"y": [2], "block2.conv1": [0, 5], "block1": [1, 2]},   # two layers
        {"y": [1, 4], "block1.conv2": [4]},                      # two classes
        {"y": 0, "block2": mask},                                # a (C,) weight mask
        {"y": 2, "block2.act1": spatial},                        # a (C, H, W) mask
        {"block2.down": [7], "stem": [0, 1, 2]},                 # no "y": the prediction
        {"y": 3},
    ]
    record = ["stem", "block1", "block1.conv2", "block2.down.0", "block2.conv1", "fc"]
    for ep in (True, False):
        together = attr(x, conds, record_layer=record, exclude_parallel=ep, record_maps=True)
        for k, c in enumerate(conds):
            alone = attr(x, [c], record_layer=record, exclude_parallel=ep, record_maps=True)
            assert rel_l2(together.relevance[:, k], alone.relevance[:, 0]) <= 1e-13, (k, ep)
            assert torch.allclose(together.heatmap[:, k], alone.heatmap[:, 0], rtol=0, atol=1e-15)
            for n in record:
                assert torch.allclose(together.relevances[n][:, k], alone.relevances[n][:, 0], rtol=1e-12,
                                      atol=1e-15), (k, n, ep)
                assert torch.allclose(together.maps[n][:, k], alone.maps[n][:, 0], rtol=1e-12, atol=1e-15)


def test_one_dict_of_k_conditions_equals_the_list(vgg):
    model, x = vgg
    attr = CondAttribution(model)
    masks = (torch.rand(4, 8, dtype=F64) > 0.5).double()
    batched = attr(x, {"y": [1, 2, 3, 1], "5": masks, "2": [[0], [1, 2], [3], [4, 5, 6]]})
    listed = attr(x, [{"y": y, "5": masks[i], "2": ch} for i, (y, ch) in
                      enumerate(zip([1, 2, 3, 1], [[0], [1, 2], [3], [4, 5, 6]]))])
    assert rel_l2(batched.relevance, listed.relevance) <= 1e-15


def test_groups_and_batch_chunks_equal_one_pass(vgg):
    model, x = vgg
    conds = [{"y": c % 5, "5": [c % 8], "2": [c % 7]} for c in range(9)]
    one = CondAttribution(model)(x, conds, record_layer=["0", "7"])
    chunked = CondAttribution(model, batch_size=1)(x, conds, record_layer=["0", "7"])
    tiny = CondAttribution(model, memory_budget=20_000)(x, conds, record_layer=["0", "7"])  # groups of conditions
    for other in (chunked, tiny):
        assert rel_l2(other.relevance, one.relevance) <= 1e-14
        for n in ("0", "7"):
            assert rel_l2(other.relevances[n], one.relevances[n]) <= 1e-14




def test_groups_share_the_denominators_below_the_fan_out(vgg, monkeypatch):
    """Groups of conditions run the layers below the conditioned one again, but their
    denominators (z+ rule: a convolution with the positive weights) are computed once per call
    and give the same maps as one pass."""
    from lrpfast import nodes as N

    model, x = vgg
    conds = [{"y": c % 5, "5": [c % 8], "2": [c % 7]} for c in range(9)]
    counts = []

    def counting(self, call):
        counts.append(self.index)
        return real(self, call)

    real = N.ContractionStep.denominator
    monkeypatch.setattr(N.ContractionStep, "denominator", counting)
    one = CondAttribution(model, composite="epsilon_plus_flat")(x, conds, record_layer=["0", "7"])
    n_one, counts[:] = sorted(counts), []
    attr = CondAttribution(model, composite="epsilon_plus_flat", batch_size=len(x))
    attr.lrp.HEAP_TENSOR = 100_000   # groups of 2 conditions, the batch in one chunk
    assert attr.lrp._schedule(x, len(conds)) == (len(x), 2)
    grouped = attr(x, conds, record_layer=["0", "7"])
    assert sorted(counts) == n_one   # each layer's denominator once, however many groups
    assert rel_l2(grouped.relevance, one.relevance) <= 1e-14
    for n in ("0", "7"):
        assert rel_l2(grouped.relevances[n], one.relevances[n]) <= 1e-14
# ----------------------------------------------------------------------------- against the oracle


@pytest.mark.parametrize("ep", [True, False])
@pytest.mark.parametrize("masks", [
    {"block2.conv2": [1, 4]},             # inside a residual branch (folded BN): parallel skip
    {"block1": [0, 3], "stem.3": [2]},    # two layers
    {"block2.act1": "spatial"},          # a (C, H, W) mask
    {"fc": [2, 3]},                       # the last layer: its channels are the classes
    {"block2": [3, 4], "block2.conv1": [4, 5, 6], "block1.conv1": [1, 4]},   # three layers, a chain
])
def test_condition_equals_the_masked_gradient_oracle(resnet, masks, ep, impl):
    model, x = resnet
    attr = CondAttribution(model, eps=0.0)   # ε everywhere with ε = 0: the oracle's rule
    sizes = {n: (attr(x, [{"y": 0}], record_layer=[n], record_activations=True).activations[n].shape[1:]) for n in masks}
    torch.manual_seed(3)
    cond, oracle_masks = {"y": 2}, {}
    for n, v in masks.items():
        if v == "spatial":
            m = (torch.rand(*sizes[n], dtype=F64) > 0.4).double()
            cond[n], oracle_masks[n] = m, m
        else:
            cond[n], oracle_masks[n] = v, channel_mask(sizes[n][0], v)
    want, _ = cond_oracle(model, x, 2, oracle_masks, exclude_parallel=ep)
    got = attr(x, [cond], exclude_parallel=ep).relevance[:, 0]
    assert want.norm() > 0
    assert rel_l2(got, want) <= 1e-10, rel_l2(got, want)


def test_exclude_parallel_drops_the_skip_and_false_keeps_it(resnet):
    """Inside a block: exclude_parallel=True is the branch's part only, False adds the skip's."""
    model, x = resnet
    attr = CondAttribution(model, eps=0.0)
    m = channel_mask(8, [2])
    a = attr(x, [{"y": 1, "block2.conv2": [2]}], exclude_parallel=True).relevance[:, 0]
    b = attr(x, [{"y": 1, "block2.conv2": [2]}], exclude_parallel=False).relevance[:, 0]
    assert rel_l2(a, b) > 1e-3
    assert rel_l2(a, cond_oracle(model, x, 1, {"block2.conv2": m}, True)[0]) <= 1e-10
    assert rel_l2(b, cond_oracle(model, x, 1, {"block2.conv2": m}, False)[0]) <= 1e-10


def _oracle_concepts(model, x, y, layer, masks=None, exclude_parallel=True):
    """Σ over spatial of output ⊙ gradient at `layer`, under a condition (masks, top down)."""
    mods = dict(model.named_modules())
    outs = {}
    names = list(masks or {}) + [layer]
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o)) for n in names]
    xg = x.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad(), detach_rules():
            out = model(xg)
    finally:
        for h in hooks:
            h.remove()
    picked = out[:, y].sum()
    src, grad = picked, None
    for n, m in (masks or {}).items():
        (g,) = torch.autograd.grad(src, outs[n], grad_outputs=grad, retain_graph=True)
        src, grad = outs[n], g * m.reshape(1, -1, *([1] * (outs[n].dim() - 2)))
    (g,) = torch.autograd.grad(src, outs[layer], grad_outputs=grad, allow_unused=True)
    if g is None:
        return torch.zeros(outs[layer].shape[:2], dtype=x.dtype)
    r = (outs[layer] * g).detach()
    return r.reshape(*r.shape[:2], -1).sum(-1)


def test_recorded_concept_relevances_equal_the_oracle(resnet):
    model, x = resnet
    attr = CondAttribution(model, eps=0.0)
    record = ["stem", "block1.conv1", "block1", "block2.down", "block2.conv2", "block2"]
    res = attr(x, [{"y": 3}, {"y": 3, "block1": [1, 4]}, {"y": 4, "block2.conv2": [0]}, {"y": 4, "block2.down": [1]}],
               record_layer=record)
    # a conv's name addresses its folded BatchNorm's output: the oracle reads that module's output
    output_of = {"block1.conv1": "block1.bn1", "block2.conv2": "block2.bn2"}
    for n in record:
        assert rel_l2(res.relevances[n][:, 0], _oracle_concepts(model, x, 3, output_of.get(n, n))) <= 1e-10, n
    # below the conditioned layer: the conditional relevance; above it: the unconditional one
    m = channel_mask(6, [1, 4])
    for n in ("stem", "block1.conv1"):
        assert rel_l2(res.relevances[n][:, 1], _oracle_concepts(model, x, 3, output_of.get(n, n), {"block1": m})) \
            <= 1e-10, n
    for n in ("block2.conv2", "block2"):
        assert rel_l2(res.relevances[n][:, 1], res.relevances[n][:, 0]) <= 1e-14
    # at the conditioned layer: after its mask
    assert rel_l2(res.relevances["block1"][:, 1], res.relevances["block1"][:, 0] * m) <= 1e-14
    # a layer parallel to the conditioned one (the skip around block2's branch, and the branch
    # around the skip, which the forward computes after it) gets nothing of it
    assert res.relevances["block2.down"][:, 2].abs().max() == 0
    assert res.relevances["block2.conv2"][:, 3].abs().max() == 0
    assert res.relevances["block2.down"][:, 0].abs().max() > 0 and res.relevances["block2.conv2"][:, 0].abs().max() > 0
    # exclude_parallel=False: parallel layers keep their (unconditioned) relevance
    off = attr(x, [{"y": 4, "block2.down": [1]}], record_layer=["block2.conv2"], exclude_parallel=False)
    assert rel_l2(off.relevances["block2.conv2"][:, 0], _oracle_concepts(model, x, 4, "block2.bn2")) <= 1e-10


def test_relevances_and_rank(vgg):
    model, x = vgg
    attr = CondAttribution(model, composite="epsilon_plus_flat")
    every = attr.relevances(x, ["2", "5", "9"], target=1)
    full = attr(x, [{"y": 1}], record_layer=["2", "5", "9"])
    for n in ("2", "5", "9"):
        assert rel_l2(every[n], full.relevances[n][:, 0]) <= 1e-15
    top = attr.rank(x, "5", k=3, target=torch.tensor([1, 2, 4]))
    per = attr.relevances(x, ["5"], target=torch.tensor([1, 2, 4]))["5"]
    order = per.argsort(1, descending=True)[:, :3]
    assert torch.equal(top.channels, order)
    assert rel_l2(top.relevance, per.gather(1, order)) <= 1e-15
    assert rel_l2(top.share, per.gather(1, order) / per.abs().sum(1, keepdim=True)) <= 1e-14
    for b in range(3):
        want = attr(x[b:b + 1], [{"y": [1, 2, 4][b], "5": [int(c)]} for c in order[b]])
        assert rel_l2(top.heatmap[b], want.heatmap[0]) <= 1e-13
    low = attr.rank(x, "5", k=2, target=1, largest=False, heatmaps=False)
    assert low.heatmap is None
    assert torch.equal(low.channels, attr.relevances(x, ["5"], 1)["5"].argsort(1)[:, :2])


def test_folded_batchnorm_names_address_the_folded_layer(resnet):
    model, x = resnet
    attr = CondAttribution(model, composite="epsilon_plus_flat")
    a = attr(x, [{"y": 0, "block1.conv2": [3]}], record_layer=["block1.conv2", "block1.bn2"])
    b = attr(x, [{"y": 0, "block1.bn2": [3]}])
    assert torch.equal(a.relevance, b.relevance)
    assert torch.equal(a.relevances["block1.conv2"], a.relevances["block1.bn2"])
    assert "block1.bn2" in attr.layer_names() and "block1.conv2" in attr.layer_names()


def test_activations_are_the_layer_outputs(vgg):
    model, x = vgg
    attr = CondAttribution(model)
    res = attr(x, [{"y": 0}], record_layer=["2", "3"], record_activations=True)
    with torch.no_grad():
        assert torch.equal(res.activations["2"], model[:3](x))   # before the ReLU after it
        assert torch.equal(res.activations["3"], model[:4](x))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("conditions,record,match", [
    ([{"y": 0, "features.99": [1]}], (), "unknown layer 'features.99'"),
    ([{"y": 0, "block9": [1]}], (), "did you mean .*'block1'"),
    ([{"y": 0, "block1.act2": [40]}], (), "channel 40 is out of range for the layer's 6 channels"),
    ([{"y": 0, "block1": torch.ones(5)}], (), r"mask of shape \(5,\) does not fit the layer's 6 channels"),
    ([{"y": 0, "block1": torch.ones(6, 3, 3)}], (), r"does not fit the layer's output \(B, 6, 8, 8\)"),
    ([{"y": 7}], (), "'y' class 7 is out of range for 5 classes"),
    ([{"y": 0, "block1": []}], (), "lists no channels"),
    ([{"y": 0, "y2": [1]}], (), "unknown layer 'y2'"),
    ([{"y": 0}], ["nope"], "unknown record_layer 'nope'"),
    ([{"y": 0, "": [1]}], (), "whole model"),
    ({"y": [1, 2], "block1": torch.ones(3, 6)}, (), "'y' has 2 entries for 3 conditions"),
    ([], (), "non-empty list"),
    ([{"y": 0, "block1": "a"}], (), "channel indices or a mask"),
    ([{"y": 0, "block1": [1.5]}], (), "channel indices"),
])
def test_bad_conditions_are_refused_clearly(resnet, conditions, record, match):
    model, x = resnet
    attr = CondAttribution(model)
    with pytest.raises((RelevanceError, TypeError), match=match):
        attr(x, conditions, record_layer=record)


def test_a_module_called_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.act = nn.ReLU()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.act(self.conv(self.act(x))).mean((2, 3)))

    attr = CondAttribution(Twice().double().eval())
    x = torch.randn(1, 3, 4, 4, dtype=F64)
    with pytest.raises(RelevanceError, match="'act' is called 2 times"):
        attr(x, [{"y": 0, "act": [0]}])
    assert "act" not in attr.layer_names() and "conv" in attr.layer_names()
    attr(x, [{"y": 0, "conv": [0]}])   # the others work
