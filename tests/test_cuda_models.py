"""Whole-model maps on the GPU against CPU float64 (issue 7): two CNNs and a transformer (ViT:
LayerNorm, attention, class token, indexing). The CUDA cases skip without a CUDA device; the CPU
cases run the same comparison at 64x64 (float32 and bfloat16 against float64)."""
import pytest
import torch

import lrpfast
from lrpfast.bench.workloads import torchvision_model

torchvision = pytest.importorskip("torchvision")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def _floor(model, x, t):
    xg = x.detach().requires_grad_(True)
    return torch.autograd.grad(model(xg).gather(1, t[:, None]).sum(), xg)[0]


@pytest.mark.parametrize("device", [pytest.param(d, marks=pytest.mark.cuda) if d == "cuda" else d for d in DEVICES])
@pytest.mark.parametrize("name", ["vgg16", "resnet50", "vit_b_16", "vit_b_16:attnlrp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_model_map_matches_cpu_float64(name, device, dtype):
    if not hasattr(lrpfast, "LRP"):
        pytest.skip("lrpfast.LRP not available")
    name, _, attention = name.partition(":")   # "vit_b_16:attnlrp": AttnLRP in the attention blocks
    attention = attention or "cp"
    torch.manual_seed(0)
    size = 224 if device == "cuda" else 64
    # ViT fixes its image size (16x16 patches): 64x64 is 16 tokens, 224x224 the usual 196
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    model = torchvision_model(name, **kwargs).eval()   # a ViT with a random head (torchvision's is 0)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        t = model(x).argmax(1)
    ref = lrpfast.LRP(model.double(), attention=attention)(x.double(), t)
    ref_grad = _floor(model, x.double(), t)
    model = model.to(device, dtype)
    got = lrpfast.LRP(model, attention=attention)(x.to(device, dtype), t.to(device))
    assert got.shape == x.shape and got.device.type == device and got.dtype == dtype
    assert torch.isfinite(got).all()
    err = _rel(got, ref)

    def fallback_err():
        """The pure-torch fallback's error on the same device and dtype: the same ATen
        contractions (cuDNN/cuBLAS on a GPU), none of lrpfast's kernels."""
        with lrpfast.use_implementation("fallback"):
            return _rel(lrpfast.LRP(model, attention=attention)(x.to(device, dtype), t.to(device)), ref)

    # A transformer is a deep stack of ε divisions on residual sums: its maps are more sensitive to
    # the dtype's rounding of z than the plain gradient (CPU, 64x64: float32 3.1e-3, bfloat16 8.1e-2
    # from float64, the fallback exactly the same; the bfloat16 gradient 1.7e-2). The yardstick
    # there is the fallback on the same device, within an absolute cap.
    vit = name.startswith("vit")
    if dtype == torch.float32:
        # Random deep networks amplify float32 rounding where ε-stabilised denominators are
        # small: measured 2.4e-4 (vgg16) and 0.9-1.7e-4 (resnet50) on the CPU at 64x64.
        # (tests/conftest.py turns TF32 off, so CUDA float32 is true float32 too.)
        bound = 1e-3
        if device == "cuda" or vit:
            # cuDNN picks its own float32 algorithms (e.g. Winograd), whose rounding of z the
            # ε denominators amplify as on the CPU, from a different start: the kernels may add at
            # most as much again as the fallback's error, and never past 1e-2 (an engine bug
            # shared by both must still fail). (The plain gradient is no yardstick in float32: no
            # ε denominators; 1.2e-6 where LRP is 1.6e-4 on vgg16 at 32x32.)
            bound = min(max(bound, 2 * fallback_err()), 1e-2)
        else:
            # A ReLU whose input lies within float32 rounding of 0 can switch between float64 and
            # float32; the map (and the gradient) then jump, through no fault of the engine. On an
            # AVX2 CPU (AMD EPYC) vgg16 switches 1 gate of 131072 at features.15: the plain float32
            # gradient is 1.5e-2 from float64, the map 5.9e-3 (the fallback exactly the same). The
            # yardstick is then twice the gradient's own error, never past 1e-2; where no gate
            # switches (AVX-512 machines: gradient ~1e-6) the bound stays 1e-3.
            grad_err = _rel(_floor(model, x.to(device, dtype), t.to(device)), ref_grad)
            bound = min(max(bound, 2 * grad_err), 1e-2)
        assert err < bound, (err, bound)
    else:
        # bfloat16: within 2x the error the plain input gradient makes in bfloat16 on this network.
        grad_err = _rel(_floor(model, x.to(device, dtype), t.to(device)), ref_grad)
        bound = max(2 * grad_err, 2e-2)
        if vit:
            bound = min(max(bound, 1.5 * fallback_err()), 0.15)
        assert err < bound, (err, grad_err, bound)
