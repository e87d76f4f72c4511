"""The seed's two MNIST CNNs (random init; `lrpfast demo` trains the "notebook" one)."""
from __future__ import annotations

import torch.nn as nn


def seed_mnist_cnn(variant: str = "notebook") -> nn.Sequential:
    """`"notebook"`: Conv5-Pool-Conv3-Pool-Linear(1600,128)-Linear(128,10) (the seed notebook's
    commit); `"conv3x2"`: Conv3-Conv3-Pool-Linear(9216,128)-Linear(128,10). ReLU between layers,
    input (B, 1, 28, 28)."""
    if variant == "notebook":
        return nn.Sequential(
            nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(1600, 128), nn.ReLU(), nn.Linear(128, 10),
        )
    if variant == "conv3x2":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Linear(128, 10),
        )
    raise ValueError(f"seed_mnist_cnn: variant must be 'notebook' or 'conv3x2', got {variant!r}")
