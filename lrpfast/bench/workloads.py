"""The models and inputs `lrpfast bench` runs on (random init, no download)."""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from ..models import seed_mnist_cnn


def torchvision_model(name: str, **kwargs) -> nn.Module:
    """torchvision's `name` with random weights (never downloaded), kwargs to its constructor. A ViT
    gets a random head: torchvision zero-initialises it (zero logits, zero maps)."""
    try:
        import torchvision
    except ImportError as exc:  # optional: only the torchvision models need it
        raise ImportError(f"model {name!r} needs torchvision ({exc})") from exc
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    if name.startswith("vit"):
        nn.init.normal_(model.heads.head.weight, std=model.hidden_dim ** -0.5)
    return model


def _torchvision(name: str) -> Callable[[], nn.Module]:
    return lambda: torchvision_model(name)


# name -> (constructor, input shape without the batch, default batch sizes, input range)
MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...], List[int], str]] = {
    "mnist-conv3x2": (lambda: seed_mnist_cnn("conv3x2"), (1, 28, 28), [64, 256], "uniform[-1,1]"),
    "mnist-notebook": (lambda: seed_mnist_cnn("notebook"), (1, 28, 28), [64, 256], "uniform[-1,1]"),
    "vgg16": (_torchvision("vgg16"), (3, 224, 224), [4], "normal"),
    "resnet50": (_torchvision("resnet50"), (3, 224, 224), [4], "normal"),
    "vit_b_16": (_torchvision("vit_b_16"), (3, 224, 224), [4], "normal"),  # LayerNorm, attention (CP-LRP)
}


def build_model(name: str, seed: int = 0) -> nn.Module:
    """The model in eval mode with reproducible random weights."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    torch.manual_seed(seed)
    return MODELS[name][0]().eval()


def make_input(name: str, batch: int, dtype: torch.dtype, device, seed: int = 1) -> torch.Tensor:
    """A reproducible batch: the seed's [-1, 1] range for MNIST models, standard normal (like
    normalised ImageNet images) for the others."""
    shape, kind = MODELS[name][1], MODELS[name][3]
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *shape), generator=g) * 2 - 1 if kind.startswith("uniform") else torch.randn((batch, *shape), generator=g)
    return x.to(device=device, dtype=dtype)


def default_batches(name: str) -> List[int]:
    return list(MODELS[name][2])


def chain_layers(model: nn.Module) -> List[nn.Module]:
    """The model as a flat list of leaf layers run one after another, for the implementations
    that need a chain (the rel* layers, the seed-style baseline): nn.Sequential (nested) and
    torchvision's VGG (features, avgpool, flatten, classifier). Anything else, e.g. a ResNet,
    raises NotImplementedError."""
    if isinstance(model, nn.Sequential):
        out: List[nn.Module] = []
        for m in model:
            out += chain_layers(m) if isinstance(m, nn.Sequential) else [m]
        return out
    if all(hasattr(model, a) for a in ("features", "avgpool", "classifier")) and type(model).__name__ == "VGG":
        return chain_layers(model.features) + [model.avgpool, nn.Flatten()] + chain_layers(model.classifier)
    if len(list(model.children())) == 0:
        return [model]
    raise NotImplementedError(f"{type(model).__name__} is not a plain chain of layers (residual connections?)")
