"""Parity of lrpfast.crp.CondAttribution with zennit-crp 0.6 (float64, vgg16 and resnet18 with random
weights, zennit's canonizers, EpsilonPlusFlat, init = the "y" logit).

Run in the CRP environment (benchmarks/crp_env.sh; zennit-crp needs zennit<=0.4.6):

    bash benchmarks/crp_env.sh
    .venv-crp/bin/python benchmarks/crp_parity.py [--out bench_out/crp_parity.json] [--conditions 24]

For each model: random conditions (one layer, or two layers in one condition), each sample of a
batch of 2, both exclude_parallel modes. zennit-crp runs one call per sample and condition;
lrpfast runs all conditions of a model in ONE call per mode (the shared pass is what is tested).
Compared, relative L2 (required ≤ 1e-6): the conditional heatmaps, and the concept relevances
(ChannelConcept.attribute without normalisation: Σ over spatial dims) at recorded layers.

Two zennit-crp conventions are accounted for, and reported:
- zennit's BatchNorm merge leaves an identity BatchNorm dividing by sqrt(1 + bn.eps) (lrpfast's
  README; tests/test_zennit_parity.py::test_resnet18_zennit_bn_merge_deviation). lrpfast explains
  the model as given; zennit-crp explains its canonized model, off by ~1e-5 on resnet18. As in the
  tests, lrpfast is also run on `as_zennit_computes(model)` (each BatchNorm's affine part divided
  by sqrt(1 + eps): the function zennit's canonized model computes): that is the parity number.
  At a conv whose BatchNorm is merged, zennit-crp's relevance is taken at the conv's output, i.e.
  before that identity BatchNorm: the BatchNorm output's relevance times 1/sqrt(1 + eps); lrpfast
  addresses the folded layer's output by both names. The script multiplies lrpfast's concept
  relevances at such conv names by 1/sqrt(1 + eps) for the comparison (reported as
  bn_conv_names_rescaled; heatmaps need no factor). A second resnet18 with bn.eps = 0 needs none
  of this: both libraries explain the same function there.
- with exclude_parallel=True zennit-crp records a conditioned layer's own relevance twice (its
  torch.autograd.grad to the layer and its backward from the layer both accumulate into the
  layer's .grad): those entries are compared with zennit-crp's value halved (reported as
  conditioned_layer_halved); with exclude_parallel=False they are compared as they are.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchvision  # noqa: E402

import lrpfast  # noqa: E402
from lrpfast.crp import CondAttribution as FastCond  # noqa: E402

F64 = torch.float64
TOL = 1e-6


def rel_l2(a, b):
    d = (a - b).norm().item()
    n = b.norm().item()
    return d / n if n > 0 else d


def randomize_bn(model, eps=None):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            if eps is not None:
                m.eps = eps
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def as_zennit_computes(model):
    """The function zennit's canonized model computes (its merge leaves 1/sqrt(1 + eps) per BN)."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.div_((1 + m.eps) ** 0.5)
                m.bias.div_((1 + m.eps) ** 0.5)
    return twin


class _ThroughIdentityBN:
    """zennit 0.4.6's composites give BatchNorm no rule (0.5 added Pass()), so the relevance that
    reaches a merged conv has gone through its leftover identity BatchNorm as a gradient: times
    1/sqrt(1 + eps). This wraps the conv's rule with that factor on its incoming relevance (exact
    also on the fused paths: s = f·R / stab(z'))."""

    def __init__(self, base, factor):
        self.base, self.f = base, factor
        self.input_proportional = getattr(base, "input_proportional", False)
        self.needs_raw_z = getattr(base, "needs_raw_z", False)

    def relprop(self, ctx, r):
        return self.base.relprop(ctx, r * self.f)

    def denominator(self, ctx):
        return self.base.denominator(ctx)

    def contract(self, ctx, s):
        return self.base.contract(ctx, s * self.f)

    def relprop_from_s(self, ctx, s):
        return self.base.relprop_from_s(ctx, s * self.f)


class _Zennit046Composite:
    """EpsilonPlusFlat with _ThroughIdentityBN on every conv whose BatchNorm zennit merges."""

    name = "epsilon_plus_flat (zennit 0.4.6's identity-BatchNorm gradient)"

    def __init__(self, folded, bn_eps):
        from lrpfast import composites

        self.base = composites.get("epsilon_plus_flat")
        self.folded, self.f = folded, (1 + bn_eps) ** -0.5

    def rule_for(self, name, module, ctx):
        rule = self.base.rule_for(name, module, ctx)
        if name in self.folded and rule is not None:
            return _ThroughIdentityBN(rule, self.f)
        return rule


def setup(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "vgg16":
        model = torchvision.models.vgg16().double().eval()
        cond_layers = ["features.28", "features.26", "features.21", "features.19", "features.14", "features.29",
                       "features.10", "features.7", "classifier.3"]
        pairs = [("features.28", "features.19"), ("features.26", "features.10"), ("classifier.0", "features.28"),
                 ("features.21", "features.7")]
        record = ["features.2", "features.7", "features.14", "features.21", "features.28", "classifier.0"]
    else:
        eps = 0.0 if name == "resnet18_bn_eps0" else None
        model = randomize_bn(torchvision.models.resnet18(), eps).double().eval()
        # layer2.0.conv1 lies parallel to the recorded layer2.0.downsample.0 (a skip path around it)
        cond_layers = ["layer4.1.conv2", "layer4.0", "layer3.1.bn1", "layer3.0.conv1", "layer3.1", "layer2.1",
                       "layer2.0.downsample.0", "layer1.0.conv2", "layer2.0.conv1", "layer4.0.conv1"]
        pairs = [("layer4.0", "layer3.0.conv1"), ("layer3.1", "layer2.0"), ("layer4.1.conv2", "layer4.0.conv1"),
                 ("layer2.1", "layer1.1.bn2")]
        record = ["conv1", "layer1.0.conv2", "layer2.0.downsample.0", "layer2.1", "layer3.0.conv1", "layer3.1.bn2",
                  "layer4.0", "layer4.1.conv2"]
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=F64).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=F64).reshape(1, 3, 1, 1)
    x = (torch.rand(2, 3, 32, 32, generator=g, dtype=F64) - mean) / std
    return model, x, cond_layers, pairs, record


def channels_of(model, x, layers):
    out, hooks = {}, []
    mods = dict(model.named_modules())
    for n in layers:
        hooks.append(mods[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o.shape[1])))
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return out


def make_conditions(n, cond_layers, pairs, channels, rng, classes):
    conds = []
    for i in range(n):
        c = {"y": [rng.randrange(classes)]}
        if i % 3 == 2:   # two layers in one condition (upper first: zennit-crp's order)
            up, low = pairs[(i // 3) % len(pairs)]
            c[up] = rng.sample(range(channels[up]), rng.randint(1, 3))
            c[low] = rng.sample(range(channels[low]), rng.randint(1, 3))
        else:
            layer = cond_layers[i % len(cond_layers)]
            c[layer] = rng.sample(range(channels[layer]), rng.randint(1, 3))
        conds.append(c)
    return conds


def zennit_crp_run(model, canonizer, x, conds, record, exclude_parallel):
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept
    from zennit.composites import EpsilonPlusFlat

    attr = CondAttribution(model, no_param_grad=True)
    comp = EpsilonPlusFlat(canonizers=[canonizer()])
    cc = ChannelConcept()
    heat, rels = [], []
    for b in range(x.shape[0]):
        hb, rb = [], []
        for c in conds:
            xb = x[b:b + 1].clone().requires_grad_(True)
            r = attr(xb, [c], comp, record_layer=record, exclude_parallel=exclude_parallel)
            hb.append(r.heatmap[0].detach())
            rb.append({n: cc.attribute(r.relevances[n], abs_norm=False)[0].detach() for n in record})
        heat.append(torch.stack(hb))
        rels.append(rb)
    return torch.stack(heat), rels


def folded_conv_names(model):
    """conv names whose BatchNorm zennit merges (the BN right after them)."""
    names, prev = set(), None
    for n, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and prev is not None:
            names.add(prev)
        prev = n if isinstance(m, nn.Conv2d) else None
    return names


def compare(name, n_conditions, seed):
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    model, x, cond_layers, pairs, record = setup(name)
    canonizer = VGGCanonizer if name == "vgg16" else ResNetCanonizer
    with torch.no_grad():
        classes = model(x).shape[1]
    rng = random.Random(seed)
    channels = channels_of(model, x, sorted(set(cond_layers) | {l for p in pairs for l in p}))
    conds = make_conditions(n_conditions, cond_layers, pairs, channels, rng, classes)
    twin = as_zennit_computes(model)
    folded = folded_conv_names(model)
    bn_eps = next((m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)), 0.0)
    # the function zennit-crp's zennit 0.4.6 computes: its canonized model (twin), and relevance
    # through each leftover identity BatchNorm as a gradient (_Zennit046Composite)
    fast_twin = FastCond(twin, composite=_Zennit046Composite(folded, bn_eps) if bn_eps else "epsilon_plus_flat")
    fast_model = FastCond(model, composite="epsilon_plus_flat")
    report = {"model": name, "input": list(x.shape), "conditions": conds, "record_layer": record,
              "bn_eps": bn_eps, "modes": {}}
    for ep in (True, False):
        t0 = time.perf_counter()
        zh, zr = zennit_crp_run(model, canonizer, x, conds, record, ep)
        tz = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = fast_twin(x, conds, record_layer=record, exclude_parallel=ep)
        tf = time.perf_counter() - t0
        as_given = fast_model(x, conds, record_layer=record, exclude_parallel=ep)
        heat_err = [max(rel_l2(ours.heatmap[b, k], zh[b, k]) for b in range(x.shape[0])) for k in range(len(conds))]
        given_err = [max(rel_l2(as_given.heatmap[b, k], zh[b, k]) for b in range(x.shape[0]))
                     for k in range(len(conds))]
        rel_err, notes = [], set()
        for k, c in enumerate(conds):
            worst = 0.0
            for n in record:
                mine = ours.relevances[n][:, k]
                if n in folded and bn_eps:
                    mine = mine / (1 + bn_eps) ** 0.5
                    notes.add("bn_conv_names_rescaled")
                theirs = torch.stack([zr[b][k][n] for b in range(x.shape[0])])
                if ep and n in c:
                    theirs = theirs / 2
                    notes.add("conditioned_layer_halved")
                if theirs.norm() == 0 and mine.norm() == 0:
                    continue
                worst = max(worst, rel_l2(mine, theirs))
            rel_err.append(worst)
        report["modes"][f"exclude_parallel={ep}"] = {
            "heatmap_rel_l2_max": max(heat_err), "heatmap_rel_l2": heat_err,
            "concept_relevance_rel_l2_max": max(rel_err), "concept_relevance_rel_l2": rel_err,
            "lrpfast_on_model_as_given_heatmap_rel_l2_max": max(given_err),
            "conventions_applied": sorted(notes),
            "seconds_zennit_crp": tz, "seconds_lrpfast_one_call": tf,
            "pass": max(heat_err) <= TOL and max(rel_err) <= TOL,
        }
        print(f"{name:18s} exclude_parallel={ep!s:5s}: heatmaps {max(heat_err):.2e}, concept relevances "
              f"{max(rel_err):.2e} (lrpfast on the model as given: heatmaps {max(given_err):.2e}); "
              f"zennit-crp {tz:.1f}s, lrpfast {tf:.2f}s", flush=True)
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out", "crp_parity.json"))
    ap.add_argument("--conditions", type=int, default=24)
    ap.add_argument("--models", default="vgg16,resnet18,resnet18_bn_eps0")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from importlib.metadata import version

    torch.set_num_threads(max(1, torch.get_num_threads()))
    reports = [compare(m, args.conditions, args.seed) for m in args.models.split(",")]
    ok = all(m["pass"] for r in reports for m in r["modes"].values())
    out = {"tolerance": TOL, "pass": ok, "torch": torch.__version__, "zennit": version("zennit"),
           "zennit_crp": version("zennit-crp"), "lrpfast_build": lrpfast.build_info(), "models": reports}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(("PASS" if ok else "FAIL") + f": {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
