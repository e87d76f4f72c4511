"""Pixel flipping / AOPC against a closed form (a linear model, where removing a region lowers the
score by exactly that region's Σ w·(x − baseline)), and the Quantus explain_func."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import lrpfast
from lrpfast.faithfulness import _LRP_CACHE, aopc, compare_rules, pixel_flipping, quantus_explain_func
from lrpfast.ops import RelevanceError

C, H, W = 2, 5, 6


def linear_model(classes: int = 3) -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, classes, bias=False)).double().eval()
    return model


def expected_curve(model, x, relevance, target, patch, n_steps, baseline, order="morf"):
    """Written out: region sums by explicit loops, sort, perturb, re-score one input at a time."""
    w = model[1].weight.detach()
    b = x.shape[0]
    curves = []
    for i in range(b):
        regions = {}
        for h in range(H):
            for v in range(W):
                regions.setdefault((h // patch, v // patch), []).append((h, v))
        keys = list(regions)
        score = {k: sum(relevance[i, :, h, v].sum().item() for h, v in regions[k]) for k in keys}
        ordered = sorted(keys, key=lambda k: (-score[k] if order == "morf" else score[k], keys.index(k)))
        curve = []
        for step in range(n_steps + 1):
            n = round(step * len(keys) / n_steps)
            xp = x[i].clone()
            for k in ordered[:n]:
                for h, v in regions[k]:
                    xp[:, h, v] = baseline[i, :, h, v]
            curve.append((w[target[i]] * xp.flatten()).sum().item())
        curves.append(curve)
    return torch.tensor(curves, dtype=torch.float64)


@pytest.mark.parametrize("patch, steps", [(1, 30), (2, 4), (4, 3)])
@pytest.mark.parametrize("perturbation", ["zero", "mean", 0.25])
def test_curve_matches_closed_form_on_a_linear_model(patch, steps, perturbation):
    model = linear_model()
    x = torch.randn(4, C, H, W, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 1])
    rel = lrpfast.LRP(model, eps=0.0)(x, t)  # LRP-0 on a bias-free linear model: w·x, exactly
    res = pixel_flipping(model, x, rel, t, patch_size=patch, steps=steps, perturbation=perturbation, batch_size=7)
    if perturbation == "zero":
        base = torch.zeros_like(x)
    elif perturbation == "mean":
        base = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    else:
        base = torch.full_like(x, perturbation)
    expected = expected_curve(model, x, rel, t, patch, steps, base)
    torch.testing.assert_close(res.scores, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.aopc, (expected[:, :1] - expected).mean(1), rtol=1e-10, atol=1e-10)
    assert res.fractions[0] == 0 and res.fractions[-1] == 1 and res.fractions.shape == (steps + 1,)


def test_morf_beats_random_beats_lerf_and_batching_does_not_matter():
    model = linear_model()
    x = torch.randn(6, C, H, W, dtype=torch.float64)
    rel = lrpfast.LRP(model, eps=0.0)(x)
    morf = pixel_flipping(model, x, rel, steps=30)
    rnd = pixel_flipping(model, x, rel, steps=30, order="random")
    lerf = pixel_flipping(model, x, rel, steps=30, order="lerf")
    assert morf.aopc.mean() > rnd.aopc.mean() > lerf.aopc.mean()
    # With exact relevance, most-relevant-first is the best order: no sample does better at random.
    assert (morf.aopc >= rnd.aopc - 1e-12).all()
    one_by_one = pixel_flipping(model, x, rel, steps=30, batch_size=1)
    torch.testing.assert_close(one_by_one.scores, morf.scores, rtol=1e-12, atol=1e-12)  # GEMV vs GEMM rounding
    torch.testing.assert_close(aopc(morf.scores), morf.aopc)


def test_random_perturbations_are_seeded_and_relevance_may_be_channel_summed():
    model = linear_model()
    x = torch.randn(3, C, H, W, dtype=torch.float64)
    rel = lrpfast.LRP(model)(x)
    a = pixel_flipping(model, x, rel, perturbation="uniform", seed=5, steps=10)
    b = pixel_flipping(model, x, rel.sum(1), perturbation="uniform", seed=5, steps=10)
    c = pixel_flipping(model, x, rel, perturbation="uniform", seed=6, steps=10)
    assert torch.equal(a.scores, b.scores) and not torch.equal(a.scores, c.scores)
    torch.testing.assert_close(a.scores[:, 0], model(x).max(1).values.detach())  # step 0: the unperturbed input


def test_softmax_score_and_errors():
    model = linear_model()
    x = torch.randn(2, C, H, W, dtype=torch.float64)
    rel = lrpfast.LRP(model)(x)
    res = pixel_flipping(model, x, rel, 1, score="softmax", steps=5)
    assert torch.allclose(res.scores[:, 0], model(x).softmax(1)[:, 1])
    for kwargs, message in [({"order": "best"}, "order"), ({"score": "prob"}, "score"), ({"steps": 10_000}, "steps"),
                            ({"perturbation": "blur"}, "perturbation"), ({"patch_size": 0}, "patch_size")]:
        with pytest.raises(RelevanceError, match=message):
            pixel_flipping(model, x, rel, **kwargs)
    with pytest.raises(RelevanceError, match="relevance has shape"):
        pixel_flipping(model, x, rel[:, :, :3], steps=5)


def test_compare_rules_reports_each_composite_and_random():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * H * W, 3)).eval()
    x = torch.rand(4, C, H, W)
    out = compare_rules(model, x, ["epsilon", "epsilon_plus"], patch_size=2, steps=5)
    assert set(out) == {"epsilon", "epsilon_plus", "random"} and all(np.isfinite(v) for v in out.values())
    rel = lrpfast.LRP(model, composite="epsilon_plus")(x)
    assert out["epsilon_plus"] == pytest.approx(pixel_flipping(model, x, rel, patch_size=2, steps=5).aopc.mean().item())


def test_quantus_explain_func_convention():
    model = nn.Sequential(nn.Conv2d(C, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 4, 3)).eval()
    x = np.random.default_rng(0).random((5, C, H, W)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1])
    a = quantus_explain_func(model=model, inputs=x, targets=y)
    assert isinstance(a, np.ndarray) and a.shape == x.shape and a.dtype == np.float32
    expected = lrpfast.LRP(model)(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(a, expected, rtol=1e-6, atol=1e-7)
    reduced = quantus_explain_func(model, x, y, channel_reduce=True)
    np.testing.assert_allclose(reduced, expected.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)
    quantus_explain_func(model, x, y, composite="epsilon_plus")
    assert len(_LRP_CACHE[model]) == 2  # one traced LRP per settings, reused across batches

    class ModelInterface:  # Quantus wraps models; its explain_func may get the wrapper
        def get_model(self):
            return model

    np.testing.assert_allclose(quantus_explain_func(ModelInterface(), x, y), a)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_cuda_equals_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * H * W, 3)).eval()
    x = torch.rand(4, C, H, W)
    rel = lrpfast.LRP(model)(x)
    for kwargs in ({}, {"order": "random", "perturbation": "uniform"}):
        cpu = pixel_flipping(model, x, rel, patch_size=2, steps=6, **kwargs)
        gpu = pixel_flipping(model.cuda(), x.cuda(), rel.cuda(), patch_size=2, steps=6, **kwargs)
        model.cpu()
        assert gpu.scores.is_cuda
        torch.testing.assert_close(gpu.scores.cpu(), cpu.scores, rtol=1e-4, atol=1e-5)
    a = quantus_explain_func(model.cuda(), x.numpy(), np.zeros(4, dtype=np.int64))
    np.testing.assert_allclose(a, lrpfast.LRP(model.cpu())(x, torch.zeros(4, dtype=torch.long)).numpy(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where", ["relevance", "x"])
def test_pixel_flipping_reports_non_finite_values(where):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, r = torch.rand(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    (r if where == "relevance" else x)[1, 0, 1, 1] = float("nan")
    with pytest.raises(RelevanceError, match=f"pixel_flipping: {where} contains NaN or Inf"):
        lrpfast.pixel_flipping(model, x, r)
