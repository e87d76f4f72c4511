"""The seed's model-level call, lrpMNIST(model).relprop(x, store, use_rho), on lrpfast.LRP."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lrpfast
from lrpfast import layers as L
from lrpfast.models import seed_mnist_cnn

from .test_lrp_graph import chain_rel_layers
from .test_lrp_models import rel_err


def chain_rho(model, x):
    """rel* wrappers with use_rho=True (lrpfast.layers: a proper z+ rule on Linear and Conv)."""
    wrap = {nn.Conv2d: L.relConv2d, nn.Linear: L.relLinear, nn.MaxPool2d: L.relMaxPool2d}
    layers = [L.relReLU(m) if isinstance(m, nn.ReLU) else L.Reshape() if isinstance(m, nn.Flatten)
              else wrap[type(m)](m) for m in model]
    h = x
    for layer in layers:
        h = layer(h)
    r = h * torch.zeros_like(h).scatter(1, h.argmax(1, keepdim=True), 1)
    for layer in reversed(layers):
        r = layer.relprop(r, use_rho=True)
    return r


class MNISTmodel(nn.Module):
    """The seed's model shape: a `layers` Sequential inside."""

    def __init__(self):
        super().__init__()
        self.layers = seed_mnist_cnn("notebook")

    def forward(self, x):
        return self.layers(x)


@pytest.mark.parametrize("variant,keys", [("notebook", ["(6) relConv2d", "(9) relConv2d"]),
                                          ("conv3x2", ["(6) relConv2d", "(8) relConv2d"])])
def test_relprop_and_activation_maps(variant, keys):
    model = seed_mnist_cnn(variant).double().eval()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    seed = lrpfast.lrpMNIST(model)
    r = seed.relprop(x)
    assert rel_err(r, chain_rel_layers(model, x)) < 1e-12
    assert rel_err(r, lrpfast.LRP(model)(x)) < 1e-12
    assert not r.requires_grad and not seed.activation_maps
    r2 = seed.relprop(x, store=True)
    assert torch.allclose(r, r2)
    assert sorted(seed.activation_maps) == keys
    first = seed.activation_maps[keys[-1]]   # the first conv's input: the input relevance
    assert torch.allclose(first, r)
    second = seed.activation_maps[keys[0]]
    assert second.shape == ((4, 32, 12, 12) if variant == "notebook" else (4, 32, 26, 26))
    assert torch.allclose(seed(x), model(x))


def test_batch_rows_equal_single_samples():
    """The seed's bug B1 (sample 0's pooled map as every sample's denominator) is not reproduced."""
    model = seed_mnist_cnn("notebook").double().eval()
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    seed = lrpfast.lrpMNIST(model)
    batch = seed.relprop(x)
    for i in range(5):
        assert rel_err(batch[i:i + 1], seed.relprop(x[i:i + 1])) < 1e-12


def test_use_rho_is_the_z_plus_rule():
    if not hasattr(lrpfast.rules, "ZPlus"):
        pytest.skip("no ZPlus rule")
    model = seed_mnist_cnn("notebook").double().eval()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    got = lrpfast.lrpMNIST(model).relprop(x, use_rho=True)
    assert rel_err(got, chain_rho(model, x)) < 1e-10
    assert rel_err(got, lrpfast.lrpMNIST(model).relprop(x)) > 1e-3


def test_seed_model_with_layers_attribute_and_load_path(tmp_path):
    model = MNISTmodel().eval()
    other = MNISTmodel().eval()
    path = tmp_path / "cnn-relu.pt"
    torch.save(other.state_dict(), path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seed = lrpfast.lrpMNIST(model, load_path=str(path))
    x = torch.randn(2, 1, 28, 28)
    assert rel_err(seed.relprop(x), lrpfast.LRP(other.layers)(x)) < 1e-6
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # loaded into a copy


def test_seed_parity_stabilizer():
    model = seed_mnist_cnn("notebook").eval()
    x = torch.randn(3, 1, 28, 28)
    got = lrpfast.lrpMNIST(model, stabilizer="plus").relprop(x)
    assert rel_err(got, chain_rel_layers(model, x, stabilizer="plus")) < 1e-5


def test_not_a_sequential():
    with pytest.raises(lrpfast.ops.RelevanceError, match="Sequential"):
        lrpfast.lrpMNIST(nn.Linear(3, 2))
