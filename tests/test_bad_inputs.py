"""Issue 14: the bad-input battery. Each case asserts the exception type and that the one-line
message names the culprit (the argument, the layer/node or the file) and what it may be; a few
inputs that look unusual but are valid (channels_last, requires_grad, integer .npy files) are
checked to work."""
from __future__ import annotations

import logging
import re
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrpfast
from lrpfast import _ext, cli, ops
from lrpfast import layers as L
from lrpfast.data import DataError, load_tensor_file
from lrpfast.lrp import _parse_budget
from lrpfast.models import seed_mnist_cnn
from lrpfast.ops import RelevanceError

IMPLS = ["fallback"] + (["extension"] if _ext.HAS_EXT else [])


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg.strip(), f"not one line: {msg!r}"
    return msg


@pytest.fixture(scope="module")
def lrp():
    torch.manual_seed(0)
    return lrpfast.LRP(seed_mnist_cnn("notebook").eval())


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.rand(2, 1, 28, 28)


# ----------------------------------------------------------------------------- memory_budget


@pytest.mark.parametrize("budget", ["...", "1.2.3GiB", float("nan"), float("inf"), float("-inf"), 0, -5, 0.5,
                                    "lots", "", "2XB", "1e999", "GiB", "-1G", True, [1 << 30]])
def test_bad_memory_budget(budget):
    with pytest.raises(RelevanceError, match=r"memory_budget .*(positive number of bytes|2GiB)") as e:
        lrpfast.LRP(nn.Sequential(nn.Linear(4, 2)), memory_budget=budget)
    one_line(e)


@pytest.mark.parametrize("budget,nbytes", [("2GiB", 2 << 30), ("512MB", 512 << 20), ("1.5G", 3 << 29), (" 100k ", 102400),
                                           ("4096B", 4096), ("1e9", 10 ** 9), (".5G", 1 << 29), (1 << 20, 1 << 20),
                                           (2.5e6, 2500000), (None, None)])
def test_valid_memory_budget(budget, nbytes):
    assert _parse_budget(budget) == nbytes


# ----------------------------------------------------------------------------- targets


# LRP._explain turns a non-int target into a tensor (torch.as_tensor) before _targets sees it:
# until it calls lrpfast.checks.as_target instead, a string or a list beyond int64 gets torch's
# message. Strict: these fail loudly (XPASS) once it does; then drop the marker.


@pytest.mark.parametrize("target,exc,match", [
    pytest.param("3", TypeError, r"target must be None.*an int.*got the string '3'"),
    (10 ** 30, RelevanceError, r"target 10{30} is out of range for 10 classes \(valid: 0\.\.9\)"),
    (-10 ** 30, RelevanceError, r"target -10{30} is out of range for 10 classes \(valid: 0\.\.9\)"),
    (10, RelevanceError, r"target 10 is out of range for 10 classes"),
    (-1, RelevanceError, r"target -1 is out of range for 10 classes"),
    (True, TypeError, r"target must be .*got the bool True"),
    (3.5, TypeError, r"target must hold integer class indices, got dtype torch.float"),
    (torch.tensor([True, False]), TypeError, r"target must hold integer class indices, got dtype torch.bool"),
    (torch.zeros(2, 1, 1, dtype=torch.long), RelevanceError, r"target must be an int, \(B,\) or \(B, K\)"),
    (torch.tensor([1, 2, 3]), RelevanceError, r"target has 3 rows for a batch of 2"),
    (torch.zeros(2, 0, dtype=torch.long), RelevanceError, r"target of shape \(2, 0\).*K >= 1"),
    pytest.param([3, 10 ** 30], RelevanceError, r"target holds a class index beyond int64"),
    (torch.zeros(2, dtype=torch.long, device="meta"), RelevanceError, r"target is on the meta device"),
])
def test_bad_target(lrp, x, target, exc, match):
    with pytest.raises(exc, match=match) as e:
        lrp(x, target)
    one_line(e)


# ----------------------------------------------------------------------------- inputs and models


class Holder(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.net = module

    def forward(self, x):
        return self.net(x)


def _meta_model():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def _meta_buffer_model():
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).eval()


def _make_buffer_meta(lrp_):
    # after LRP(model): a buffer that went to the meta device since (folded weights are refreshed
    # from the model's parameters on each call)
    lrp_.model[1].running_var = torch.empty(5, device="meta")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


@pytest.mark.parametrize("make_model,make_x,exc,match", [
    (_mlp, lambda: [[0.0] * 4], TypeError, r"x must be a torch.Tensor, got list"),
    (_mlp, lambda: torch.zeros(2, 4, dtype=torch.long), TypeError, r"x must be a floating-point tensor, got torch.int64"),
    (_mlp, lambda: torch.zeros(2, 4, dtype=torch.complex64), TypeError, r"x must be a floating-point tensor"),
    (_mlp, lambda: torch.zeros(2, 4, dtype=torch.float64), RelevanceError, r"x is torch.float64 .*parameters are torch.float32"),
    (_mlp, lambda: torch.zeros(2, 4, dtype=torch.float16), RelevanceError, r"x is torch.float16 .*parameters are torch.float32"),
    (_mlp, lambda: torch.zeros(0, 4), RelevanceError, r"x must be a batch \(B, \.\.\.\) with B >= 1, got shape \(0, 4\)"),
    (_mlp, lambda: torch.zeros(4), RelevanceError, r"x must be a batch .*got shape \(4,\)"),
    (_mlp, lambda: torch.zeros(2, 0), RelevanceError, r"x is empty \(shape \(2, 0\)\)"),
    (_mlp, lambda: torch.zeros(2, 4, device="meta"), RelevanceError, r"x is on the meta device"),
    (_meta_model, lambda: torch.zeros(2, 4), RelevanceError, r"parameter or buffer '0.weight' is on the meta device"),
    (_meta_model, lambda: torch.zeros(2, 4, device="meta"), RelevanceError, r"x is on the meta device"),
    (_meta_buffer_model, lambda: torch.zeros(2, 4), RelevanceError, r"'1.running_var' is on the meta device"),
    (_mlp, lambda: torch.zeros(2, 5), RelevanceError, r"node '_0' \(Linear\) failed on input\(s\) of shape \(2, 5\)"),
    (_mlp, lambda: torch.zeros(2, 3, 4), RelevanceError, r"model output has shape \(2, 3, 3\); expected logits"),
    (_mlp, lambda: torch.tensor([[0.0, 1.0, float("nan"), 0.0]]), RelevanceError, r"x contains NaN or Inf"),
    (_mlp, lambda: torch.tensor([[0.0, 1.0, float("inf"), 0.0]]), RelevanceError, r"x contains NaN or Inf"),
    (_mlp, lambda: torch.tensor([[0.0, 1.0, -float("inf"), 0.0]]), RelevanceError, r"x contains NaN or Inf"),
])
def test_bad_input_or_model(make_model, make_x, exc, match):
    lrp_ = lrpfast.LRP(make_model())
    if make_model is _meta_buffer_model:
        _make_buffer_meta(lrp_)
    with pytest.raises(exc, match=match) as e:
        lrp_(make_x())
    one_line(e)


@pytest.mark.parametrize("shape,match", [
    ((2, 3, 28, 28), r"node '_0' \(Conv2d\).*\(2, 3, 28, 28\)"),
    ((2, 1, 32, 32), r"node '_7' \(Linear\)"),
    ((2, 1, 28), r"node '_0' \(Conv2d\)"),
])
def test_wrong_shape_is_clean_and_logs_no_fake_tensor_errors(lrp, shape, match, caplog, capfd):
    """The shape profile runs a fake-tensor forward first; torch would log its meta kernel's
    traceback at ERROR level (~20 lines) before the clean error."""
    with caplog.at_level(logging.DEBUG, logger="torch._subclasses.fake_tensor"):
        with pytest.raises(RelevanceError, match=match) as e:
            lrpfast.LRP(lrp.model, memory_budget="1GiB")(torch.randn(*shape))
    one_line(e)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    out, err = capfd.readouterr()
    assert "fake_tensor" not in err and "Traceback" not in err


def test_channels_last_input_gives_the_contiguous_map(lrp, x):
    want = lrp(x)
    got = lrp(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_requires_grad_input_works_and_leaves_no_grads(lrp, x):
    want = lrp(x)
    xg = x.clone().requires_grad_(True)
    got = lrp(xg)
    torch.testing.assert_close(got, want)
    assert not got.requires_grad and xg.grad is None
    assert all(p.grad is None for p in lrp.model.parameters())


class GatherNet(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.f = f

    def forward(self, x):
        return self.fc(self.f(x))


@pytest.mark.parametrize("f,match", [
    (lambda x: torch.cumsum(x, 1), r"node 'cumsum' calls torch.cumsum, which has no relevance rule"),
    (lambda x: torch.sort(x, 1).values, r"node 'sort' calls torch.sort"),
    (lambda x: torch.cummax(x, 1).values, r"node 'cummax' calls torch.cummax"),
    (lambda x: torch.logcumsumexp(x, 1), r"node 'logcumsumexp' calls torch.logcumsumexp"),
    (torch.sign, r"node 'sign' calls torch.sign"),
])
def test_unsupported_op_names_the_node(f, match):
    with pytest.raises(RelevanceError, match=match) as e:
        lrpfast.LRP(GatherNet(f))
    assert "\n" not in str(e.value)


def test_unsupported_module_names_it():
    with pytest.raises(RelevanceError, match=r"node '_1' calls module '1' \(RNN\)"):
        lrpfast.LRP(nn.Sequential(nn.Linear(4, 4), nn.RNN(4, 4)).eval())


# ----------------------------------------------------------------------------- op geometry


def _conv(**over):
    torch.manual_seed(2)
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    args = dict(x=x, z=F.conv2d(x, w), weight=w)
    args.update(over)
    args["r"] = torch.randn_like(args["z"])
    return args


def _pool(**over):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 7, 7)
    args = dict(x=x, z=F.avg_pool2d(x, 2), kernel_size=2)
    args.update(over)
    args["r"] = torch.randn_like(args["z"])
    return args


GEOMETRY = {
    "conv-z-small": (ops.conv_relprop, lambda: _conv(z=torch.randn(2, 4, 5, 5)),
                     r"conv_relprop: z has spatial size \(5, 5\), expected \(6, 6\)"),
    "conv-z-large": (ops.conv_relprop, lambda: _conv(z=torch.randn(2, 4, 7, 7)),
                     r"conv_relprop: z has spatial size \(7, 7\), expected \(6, 6\)"),
    "conv-z-stride": (ops.conv_relprop, lambda: _conv(stride=2), r"conv_relprop: z has spatial size \(6, 6\), expected \(3, 3\)"),
    "conv-dilation-0": (ops.conv_relprop, lambda: _conv(dilation=0), r"conv_relprop: dilation must be >= 1"),
    "conv-stride-0": (ops.conv_relprop, lambda: _conv(stride=(1, 0)), r"conv_relprop: stride must be >= 1"),
    "conv-padding-negative": (ops.conv_relprop, lambda: _conv(padding=-1), r"conv_relprop: padding must be >= 0"),
    "conv-padding-float": (ops.conv_relprop, lambda: _conv(padding=1.5), r"conv_relprop: padding must be an int"),
    "conv-stride-float": (ops.conv_relprop, lambda: _conv(stride=(1.0, 1)), r"conv_relprop: stride must hold ints"),
    "conv-groups-0": (ops.conv_relprop, lambda: _conv(groups=0), r"conv_relprop: groups must be a positive int"),
    "conv-groups-3": (ops.conv_relprop, lambda: _conv(groups=3), r"conv_relprop: groups must be a positive int dividing"),
    "conv-same-strided": (ops.conv_relprop, lambda: _conv(padding="same", stride=2, z=torch.randn(2, 4, 4, 4)),
                          r"conv_relprop: padding='same' needs stride 1"),
    "conv-kernel-too-big": (ops.conv_relprop, lambda: _conv(x=torch.randn(2, 3, 2, 2), z=torch.randn(2, 4, 1, 1)),
                            r"conv_relprop: the kernel \(3, 3\).*larger than x"),
    "avg-z": (ops.avg_pool_relprop, lambda: _pool(z=torch.randn(2, 3, 4, 4)),
              r"avg_pool_relprop: z has spatial size \(4, 4\), expected \(3, 3\)"),
    "avg-ceil": (ops.avg_pool_relprop, lambda: _pool(ceil_mode=True),
                 r"avg_pool_relprop: z has spatial size \(3, 3\), expected \(4, 4\)"),
    "avg-kernel-0": (ops.avg_pool_relprop, lambda: _pool(kernel_size=0), r"avg_pool_relprop: kernel_size must be >= 1"),
    "avg-stride-0": (ops.avg_pool_relprop, lambda: _pool(stride=0), r"avg_pool_relprop: stride must be >= 1"),
    "avg-padding": (ops.avg_pool_relprop, lambda: _pool(padding=2), r"avg_pool_relprop: padding \[2, 2\] must be at most half"),
    "avg-divisor": (ops.avg_pool_relprop, lambda: _pool(divisor_override=0), r"avg_pool_relprop: divisor_override"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(GEOMETRY))
def test_bad_geometry_same_error_on_both_implementations(name, impl):
    fn, make, match = GEOMETRY[name]
    with _ext.use_implementation(impl), pytest.raises(RelevanceError, match=match) as e:
        fn(**make())
    one_line(e)


@pytest.mark.parametrize("kw,match", [
    (dict(kernel_size=0), r"max_pool_relprop: kernel_size must be >= 1"),
    (dict(kernel_size=2, stride=0), r"max_pool_relprop: stride must be >= 1"),
    (dict(kernel_size=2, padding=-1), r"max_pool_relprop: padding must be >= 0"),
    (dict(kernel_size=2, dilation=0), r"max_pool_relprop: dilation must be >= 1"),
])
def test_bad_max_pool_geometry(kw, match):
    x = torch.randn(2, 3, 6, 6)
    z, idx = F.max_pool2d(x, 2, return_indices=True)
    with pytest.raises(RelevanceError, match=match):
        ops.max_pool_relprop(torch.randn_like(z), idx, x.shape, **kw)


@pytest.mark.parametrize("padding", [0, 1, "same", "valid"])
@pytest.mark.parametrize("kernel,stride,dilation", [(3, 1, 1), (2, 1, 1), (3, 2, 1), (3, 1, 2), (4, 3, 2)])
def test_valid_conv_geometries_pass_the_check(kernel, stride, dilation, padding):
    if padding == "same" and stride != 1:
        pytest.skip("torch has no strided 'same' convolution")
    conv = nn.Conv2d(3, 4, kernel, stride, padding, dilation)
    x = torch.randn(2, 3, 9, 10)
    z = conv(x).detach()
    out = ops.conv_relprop(torch.randn_like(z), x, z, conv.weight.detach(), stride, padding, dilation)
    assert out.shape == x.shape


# ----------------------------------------------------------------------------- seed-style layers


def test_relprop_before_forward_names_the_layer():
    with pytest.raises(RelevanceError, match=r"relLinear.relprop: called before forward"):
        L.relLinear(nn.Linear(4, 3)).relprop(torch.randn(2, 3))


def test_relprop_with_wrong_dtype_names_r():
    layer = L.relLinear(nn.Linear(4, 3))
    layer(torch.randn(2, 4))
    with pytest.raises(RelevanceError, match=r"relLinear.relprop: r is torch.float64"):
        layer.relprop(torch.randn(2, 3, dtype=torch.float64))


def test_seed_layer_shared_across_threads_is_detected():
    """Thread A's forward, then thread B's forward on the same layer, then A's relprop: A would
    get B's relevance. It is refused; B's own relprop (its forward is the last) works, and a
    layer per thread (copy.deepcopy) works too."""
    import copy

    torch.manual_seed(4)
    layer = L.relLinear(nn.Linear(4, 3))
    xa, xb = torch.randn(2, 4), torch.randn(2, 4)
    a_forward, b_forward, b_done = threading.Event(), threading.Event(), threading.Event()
    result = {}

    def a():
        layer(xa)
        a_forward.set()
        b_forward.wait(30)
        try:
            layer.relprop(torch.ones(2, 3))
            result["a"] = "no error"
        except RelevanceError as exc:
            result["a"] = str(exc)

    def b():
        a_forward.wait(30)
        layer(xb)
        b_forward.set()
        result["b"] = layer.relprop(torch.ones(2, 3))
        b_done.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert "another thread ran forward on this layer" in result["a"] and "per-call state" in result["a"]
    want_b = L.relLinear(layer.module)
    want_b(xb)
    torch.testing.assert_close(result["b"], want_b.relprop(torch.ones(2, 3)))

    # one copy per thread: no interference
    own = {}

    def run(name, xx):
        mine = copy.deepcopy(layer)
        mine(xx)
        own[name] = mine.relprop(torch.ones(2, 3))

    ts = [threading.Thread(target=run, args=(n, xx)) for n, xx in (("a", xa), ("b", xb))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    ref = L.relLinear(layer.module)
    ref(xa)
    torch.testing.assert_close(own["a"], ref.relprop(torch.ones(2, 3)))


def test_seed_layer_forward_in_one_thread_relprop_in_another_is_allowed():
    layer = L.relLinear(nn.Linear(4, 3))
    layer(torch.randn(2, 4))
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", layer.relprop(torch.ones(2, 3))))
    t.start()
    t.join(30)
    assert out["r"].shape == (2, 4)


# ----------------------------------------------------------------------------- CLI


def explain(*argv):
    return cli.main(["explain", *map(str, argv), "--no-progress"])


@pytest.mark.parametrize("args,match", [
    (["--batch-size", "0"], r"argument --batch-size: must be an int >= 1, got '0'"),
    (["--batch-size", "many"], r"argument --batch-size: must be an int >= 1"),
    (["--cmap", "nonexistent"], r"argument --cmap: must be one of bwr, coldnhot, gray, hot.*got 'nonexistent'"),
    (["--eps", "-1"], r"argument --eps: must be a finite number >= 0, got '-1'"),
    (["--eps", "nan"], r"argument --eps: must be a finite number >= 0"),
    (["--percentile", "0"], r"argument --percentile: must be a number in \(0, 100\]"),
    (["--percentile", "101"], r"argument --percentile: must be a number in \(0, 100\]"),
    (["--device", "gpu0"], r"argument --device: must be a torch device"),
    (["--size", "0"], r"argument --size: must be N or HxW with positive ints"),
    (["--crop", "3x"], r"argument --crop: must be N or HxW"),
    (["--target", "best"], r"argument --target: must be argmax, a class index, topK"),
    (["--target", "top0"], r"argument --target: must be argmax"),
    (["--std", "0.5,0"], r"argument --std: must be positive numbers"),
    (["--mean", "a,b"], r"argument --mean: must be finite numbers"),
    (["--grid", "-1"], r"argument --grid: must be an int >= 0"),
    (["--workers", "-1"], r"argument --workers: must be an int >= 0"),
    (["--shard-size", "0"], r"argument --shard-size: must be an int >= 1"),
    (["--num-classes", "0"], r"argument --num-classes: must be an int >= 1"),
    (["--stabilizer", "abs"], r"argument --stabilizer: invalid choice: 'abs'"),
])
def test_cli_bad_argument_exits_2_with_one_line_before_any_work(tmp_path, capsys, monkeypatch, args, match):
    from lrpfast import explain as explain_mod

    def no_work(*a, **k):  # nothing may be loaded before the arguments are checked
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(explain_mod, "build_model", no_work)
    monkeypatch.setattr("lrpfast.data.load_inputs", no_work)
    with pytest.raises(SystemExit) as e:
        explain("demo", *args, "--out", tmp_path / "out")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lrpfast explain: error:")
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


NET = '''
import torch.nn as nn

def make():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
'''


@pytest.mark.parametrize("case,match", [
    ("int64 out of 0..255", r"x.npy'.*integer data \(torch.int64\) is read as 8-bit pixel values 0\.\.255.*0\.\.994"),
    ("negative int16", r"x.npy'.*integer data \(torch.int16\).*-3\.\."),
    ("empty", r"x.npy'.*holds no inputs \(shape \(0, 1, 6, 6\)\)"),
    ("bool", r"x.npy'.*expected numeric data, got torch.bool"),
    ("corrupt", r"cannot read tensor file '.*x.npy'"),
    ("nan", r"x contains NaN or Inf"),
    ("missing weights", r"weights file '.*nowhere.pt' does not exist"),
    ("one value", r"x.npy'.*expected a batch \(B, \.\.\.\) of inputs, got shape \(\)"),
])
def test_cli_bad_files_exit_2_with_one_line(tmp_path, capsys, case, match):
    (tmp_path / "net.py").write_text(NET)
    path = tmp_path / "x.npy"
    args = [path, "--model", f"{tmp_path / 'net.py'}:make", "--out", tmp_path / "out", "--no-png", "--grid", 0]
    if case == "int64 out of 0..255":
        np.save(path, np.arange(2 * 36).reshape(2, 1, 6, 6) * 14)
    elif case == "negative int16":
        np.save(path, np.full((2, 1, 6, 6), -3, dtype=np.int16))
    elif case == "empty":
        np.save(path, np.zeros((0, 1, 6, 6), np.float32))
    elif case == "bool":
        np.save(path, np.zeros((2, 1, 6, 6), bool))
    elif case == "corrupt":
        path.write_bytes(b"\x93NUMPY garbage")
    elif case == "nan":
        a = np.zeros((2, 1, 6, 6), np.float32)
        a[1, 0, 2, 2] = np.nan
        np.save(path, a)
    elif case == "missing weights":
        np.save(path, np.zeros((2, 1, 6, 6), np.float32))
        args += ["--weights", tmp_path / "nowhere.pt"]
    elif case == "one value":
        np.save(path, np.float32(1.0))
    assert explain(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lrpfast explain: error:"), err
    assert re.search(match, err), err


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.int64])
def test_integer_npy_is_scaled_as_documented(tmp_path, dtype):
    """load_tensor_file's docstring: integer data of any dtype is 8-bit pixel values, /255."""
    a = (np.arange(2 * 25) * 5).reshape(2, 5, 5).astype(dtype)
    np.save(tmp_path / "x.npy", a)
    x, _ = load_tensor_file(tmp_path / "x.npy")
    assert x.dtype == torch.float32 and x.shape == (2, 1, 5, 5)
    torch.testing.assert_close(x[:, 0], torch.from_numpy(a.astype(np.float32)) / 255)
    assert float(x.max()) <= 1.0


def test_float_npy_is_used_as_it_is(tmp_path):
    a = np.linspace(-3, 7, 2 * 25, dtype=np.float32).reshape(2, 1, 5, 5)
    np.save(tmp_path / "x.npy", a)
    x, _ = load_tensor_file(tmp_path / "x.npy")
    torch.testing.assert_close(x, torch.from_numpy(a))


def test_bad_file_error_names_the_file(tmp_path):
    np.save(tmp_path / "wide.npy", np.full((1, 1, 2, 2), 300, dtype=np.int32))
    with pytest.raises(DataError, match=r"tensor file '.*wide.npy': integer data \(torch.int32\).*300\.\.300"):
        load_tensor_file(tmp_path / "wide.npy")


def test_non_finite_map_names_the_samples_whose_logits_overflow():
    """A finite x whose logits overflow (sample 1 only): the error names that sample and says the
    model itself computes Inf, instead of blaming a parameter; a NaN parameter is named."""
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.fill_(1e38)
        model[0].bias.zero_()
    x = torch.tensor([[1e-30, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    with torch.no_grad():
        assert torch.isfinite(model(x)[0]).all() and not torch.isfinite(model(x)[1]).all()
    with pytest.raises(RelevanceError, match=r"the logits\) is not finite for sample\(s\) \[1\]"):
        lrpfast.LRP(model)(x, torch.tensor([0, 0]))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].weight[1, 2] = float("nan")
    with pytest.raises(RelevanceError, match=r"although x is finite; the model's parameter\(s\)/buffer\(s\) \['0.weight'\]"):
        lrpfast.LRP(model)(x, torch.tensor([0, 0]))
