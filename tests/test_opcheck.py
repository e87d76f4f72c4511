"""The compiled ops as torch operators: torch.library.opcheck (schema, fake kernels, AOT dispatch
with dynamic shapes) on sample inputs of every foundation op, the C++ argument checks for callers
that bypass lrpfast.ops, and torch.compile(fullgraph=True) over a chain of lrpfast ops."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lrpfast
from lrpfast import ops

from .conftest import (assert_close, divide_or_zero, epsilon_oracle, index_add_oracle, per_target,
                       stab_reference)

pytestmark = pytest.mark.skipif(not lrpfast.HAS_EXT, reason="the compiled extension is not built")

# The ops of the foundation (csrc/lrpfast.cpp); later ops have their own tests.
FOUNDATION_OPS = ["stab_div", "mul_input", "mul_stab_div", "linear_relprop", "conv_relprop", "max_pool_relprop",
                  "avg_pool_relprop", "adaptive_avg_pool_relprop"]


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def samples(device: str):
    """(op, args) pairs: K = 1 and K > 1, contiguous and channels_last, 1d/2d/3d, half types."""
    g = torch.Generator().manual_seed(0)

    def rn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    out = []
    z, x = rn(2, 3, 4, 5), rn(2, 3, 4, 5)
    out += [("stab_div", (rn(2, 3, 4, 5), z, 1e-6, "sign")),
            ("stab_div", (rn(6, 3, 4, 5), z, 0.1, "plus")),  # K = 3
            ("stab_div", (_cl(rn(4, 3, 4, 5)), _cl(z), 1e-6, "sign")),
            ("stab_div", (rn(4, 7, dtype=torch.float16), rn(2, 7, dtype=torch.float16), 1e-3, "sign")),
            ("mul_input", (rn(4, 3, 4, 5), x)),
            ("mul_input", (_cl(rn(2, 3, 4, 5)), _cl(x))),
            ("mul_input", (rn(2, 9, dtype=torch.bfloat16), rn(2, 9, dtype=torch.bfloat16))),
            ("mul_stab_div", (rn(6, 3, 4, 5), x, z, 1e-6, "sign")),
            ("mul_stab_div", (_cl(rn(2, 3, 4, 5)), _cl(x), _cl(z), 1e-6, "plus"))]

    xl, wl = rn(3, 5), rn(4, 5)
    zl = F.linear(xl, wl)
    out += [("linear_relprop", (rn(3, 4), xl, zl, wl, 1e-6, "sign")),
            ("linear_relprop", (rn(6, 4), xl, zl, wl, 1e-6, "plus"))]

    xc, wc = rn(2, 4, 7, 6), rn(6, 2, 3, 3)
    zc = F.conv2d(xc, wc, None, 2, 1, 1, 2)
    x1, w1 = rn(2, 3, 9), rn(4, 3, 3)
    z1 = F.conv1d(x1, w1, None, 1, 0, 2)
    x3, w3 = rn(1, 2, 4, 5, 4), rn(3, 2, 2, 2, 2)
    z3 = F.conv3d(x3, w3, None, 1, 1)
    out += [("conv_relprop", (rn(2, 6, 4, 3), xc, zc, wc, [2, 2], [1, 1], [1, 1], 2, 1e-6, "sign")),
            ("conv_relprop", (_cl(rn(4, 6, 4, 3)), _cl(xc), _cl(zc), wc, [2, 2], [1, 1], [1, 1], 2, 1e-6, "sign")),
            ("conv_relprop", (rn(6, 4, 5), x1, z1, w1, [1], [0], [2], 1, 1e-6, "plus")),
            ("conv_relprop", (_cl(rn(2, 3, 5, 6, 5)), _cl(x3), _cl(z3), w3, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1,
                              1e-6, "sign"))]

    xm = rn(2, 3, 7, 7)
    zm, im = F.max_pool2d(xm, 3, 2, 1, return_indices=True)
    xm3 = rn(1, 2, 5, 5, 5)
    _, im3 = F.max_pool3d(xm3, 2, 1, return_indices=True)
    _, im_cl = F.max_pool2d(_cl(xm), 2, return_indices=True)
    out += [("max_pool_relprop", (rn(2, 3, 4, 4), im, list(xm.shape))),
            ("max_pool_relprop", (rn(4, 3, 4, 4), im, list(xm.shape))),
            ("max_pool_relprop", (rn(3, 2, 4, 4, 4), im3, list(xm3.shape))),
            ("max_pool_relprop", (_cl(rn(2, 3, 3, 3)), im_cl, list(xm.shape)))]

    xa = rn(2, 3, 7, 7)
    za = F.avg_pool2d(xa, 3, 2, 1, True, False)
    xa1 = rn(2, 3, 8)
    za1 = F.avg_pool1d(xa1, 2)
    out += [("avg_pool_relprop", (rn(2, 3, 4, 4), xa, za, [3, 3], [2, 2], [1, 1], True, False, None, 1e-6, "sign")),
            ("avg_pool_relprop", (_cl(rn(4, 3, 4, 4)), _cl(xa), _cl(za), [3, 3], [2, 2], [1, 1], True, False, None,
                                  1e-6, "sign")),
            ("avg_pool_relprop", (rn(6, 3, 4), xa1, za1, [2], [2], [0], False, True, 3, 1e-6, "plus"))]

    xd = rn(2, 3, 7, 6)
    zd = F.adaptive_avg_pool2d(xd, (3, 4))
    xd3 = rn(1, 2, 5, 4, 3)
    zd3 = F.adaptive_avg_pool3d(xd3, 2)
    out += [("adaptive_avg_pool_relprop", (rn(2, 3, 3, 4), xd, zd, 1e-6, "sign")),
            ("adaptive_avg_pool_relprop", (_cl(rn(4, 3, 3, 4)), _cl(xd), _cl(zd), 1e-6, "plus")),
            ("adaptive_avg_pool_relprop", (rn(2, 2, 2, 2, 2), xd3, zd3, 1e-6, "sign"))]
    return out


def _sample_ids():
    seen, ids = {}, []
    for name, _ in samples("cpu"):
        seen[name] = seen.get(name, 0) + 1
        ids.append(f"{name}-{seen[name]}")
    return ids


SAMPLE_IDS = _sample_ids() if lrpfast.HAS_EXT else []


def test_every_foundation_op_has_samples():
    registered = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("lrpfast::")}
    assert set(FOUNDATION_OPS) <= registered, f"missing schemas: {set(FOUNDATION_OPS) - registered}"
    assert {name for name, _ in samples("cpu")} == set(FOUNDATION_OPS)


@pytest.mark.parametrize("index", range(len(SAMPLE_IDS)), ids=SAMPLE_IDS)
def test_opcheck(index, device):
    if device == "cuda" and not lrpfast._ext.cuda_compiled():
        pytest.skip("extension built without CUDA kernels")
    name, args = samples(device)[index]
    op = getattr(torch.ops.lrpfast, name).default
    results = torch.library.opcheck(op, args)  # raises on the first failed check
    assert set(results.values()) == {"SUCCESS"}, results
    # ... and the compiled op computes what an independent oracle computes in float64
    got = op(*args)
    want = oracle(name, *[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    assert got.dtype == args[0].dtype
    assert_close(got, want, 1e-5 if got.dtype == torch.float32 else 1e-2, name)


def _repeat_rows(t, rows):
    return t.repeat_interleave(rows // t.shape[0], 0) if t.shape[0] else t


def _pool_forward(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
    dims = x.dim() - 2
    if dims == 1:  # avg_pool1d has no divisor_override: a height-1 avg_pool2d
        return F.avg_pool2d(x.unsqueeze(-2), (1, *kernel), (1, *stride), (0, *padding), ceil_mode, count_include_pad,
                            divisor_override).squeeze(-2)
    pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
    return pool(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)


_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_ADAPTIVE = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def oracle(name, *args):
    """What op `name` must return for these (float64) arguments, written without lrpfast: the
    formulas of the primitives, autograd through torch's layer for the layer steps (one run per
    target), an index_add at the forward's indices for max pooling."""
    if name == "stab_div":
        r, z, eps, stabilizer = args
        return divide_or_zero(r, stab_reference(_repeat_rows(z, r.shape[0]), eps, stabilizer))
    if name == "mul_input":
        c, x = args
        return c * _repeat_rows(x, c.shape[0])
    if name == "mul_stab_div":
        c, x, z, eps, stabilizer = args
        return divide_or_zero(c * _repeat_rows(x, c.shape[0]), stab_reference(_repeat_rows(z, c.shape[0]), eps,
                                                                                stabilizer))
    if name == "max_pool_relprop":
        r, indices, input_size = args[:3]
        return index_add_oracle(r, indices, input_size)
    r, x, z, rest = args[0], args[1], args[2], args[3:]
    if name == "linear_relprop":
        w, eps, stabilizer = rest
        forward = lambda x_: F.linear(x_, w)  # noqa: E731
    elif name == "conv_relprop":
        w, stride, padding, dilation, groups, eps, stabilizer = rest
        forward = lambda x_: _CONVS[w.dim() - 2](x_, w, None, stride, padding, dilation, groups)  # noqa: E731
    elif name == "avg_pool_relprop":
        *geometry, eps, stabilizer = rest
        forward = lambda x_: _pool_forward(x_, *geometry)  # noqa: E731
    elif name == "adaptive_avg_pool_relprop":
        eps, stabilizer = rest
        forward = lambda x_: _ADAPTIVE[x.dim() - 2](x_, z.shape[2:])  # noqa: E731
    else:
        raise ValueError(name)
    return per_target(lambda r: epsilon_oracle(forward, x, r, eps, stabilizer, z_given=z), r, x.shape[0])


# ----------------------------------------------------------------------------- C++ checks


# Direct torch.ops calls that bypass lrpfast.ops' validation: (code, pattern the message must match).
BAD_CALLS = {
    "rows": ("L.stab_div(randn(3, 4), randn(2, 4), 1e-6, 'sign')",
             r"lrpfast::stab_div: relevance rows 3 not a multiple of batch 2"),
    "dtype": ("L.mul_input(randn(2, 4), randn(2, 4).double())", r"lrpfast::mul_input: .*dtype"),
    "int-dtype": ("L.stab_div(ones(2, 4, dtype=long), ones(2, 4, dtype=long), 1e-6, 'sign')",
                  r"lrpfast::stab_div: unsupported dtype"),
    "stabilizer": ("L.stab_div(randn(2, 4), randn(2, 4), 1e-6, 'abs')",
                   r"lrpfast::stab_div: stabilizer must be 'sign' or 'plus', got 'abs'"),
    "shape": ("L.mul_stab_div(randn(2, 4), randn(2, 4), randn(2, 5), 1e-6, 'sign')",
              r"lrpfast::mul_stab_div: x and z shapes differ"),
    "linear-weight": ("L.linear_relprop(randn(2, 4), randn(2, 3), randn(2, 4), randn(4, 2), 1e-6, 'sign')",
                      r"lrpfast::linear_relprop: weight"),
    "conv-stride": ("L.conv_relprop(randn(1, 1, 2, 2), randn(1, 1, 4, 4), randn(1, 1, 2, 2), randn(1, 1, 3, 3), [1], "
                    "[0, 0], [1, 1], 1, 1e-6, 'sign')",
                    r"lrpfast::conv_relprop: stride, padding and dilation need 2 entries"),
    "max-pool-index": ("L.max_pool_relprop(randn(1, 1, 2, 2), zeros(1, 1, 2, 2, dtype=long) + 99, [1, 1, 4, 4])",
                       r"lrpfast::max_pool_relprop: index 99 outside the input plane of 16"),
    "max-pool-size": ("L.max_pool_relprop(randn(1, 1, 2, 2), zeros(1, 1, 2, 2, dtype=long), [1, 2, 4, 4])",
                      r"lrpfast::max_pool_relprop: input_size"),
    "max-pool-indices-dtype": ("L.max_pool_relprop(randn(1, 1, 2, 2), zeros(1, 1, 2, 2, dtype=torch.int32), "
                               "[1, 1, 4, 4])",
                               r"lrpfast::max_pool_relprop: indices must be int64"),
}

# Runs in a child process: an error path that crashes the process (it did, with the GPU
# machines' /opt/gcc wrapper as CXX: every message holding an integer segfaulted) then fails
# this test, naming the check, instead of killing the whole test session.
_CHILD = """
import json, sys, torch, lrpfast
from torch import randn, ones, zeros, long
L = torch.ops.lrpfast
for name, code in json.loads(sys.argv[1]).items():
    print(json.dumps(["start", name]), flush=True)
    try:
        eval(code)
        print(json.dumps(["no error", name]), flush=True)
    except RuntimeError as e:
        print(json.dumps(["raised", name, str(e).splitlines()[0]]), flush=True)
"""


def test_cpp_checks_name_the_op():
    """The kernels' own argument checks raise RuntimeError naming lrpfast::<op> and the problem."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    codes = {name: code for name, (code, _) in BAD_CALLS.items()}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(codes)], capture_output=True, text=True,
                          cwd=root, env=env, timeout=300)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    if proc.returncode != 0:
        last = events[-1][1] if events else "(before the first check)"
        pytest.fail(f"the process died (exit {proc.returncode}) in check {last!r}: {proc.stderr[-2000:]}")
    raised = {e[1]: e[2] for e in events if e[0] == "raised"}
    for name, (_, pattern) in BAD_CALLS.items():
        assert name in raised, f"{name}: no RuntimeError"
        assert re.search(pattern, raised[name]), f"{name}: {raised[name]!r} does not match {pattern!r}"


# ----------------------------------------------------------------------------- torch.compile


def relevance_chain(r, x, z, w, xp, idx, xc, zc, wc):
    """A small network's relevance pass through the public ops: a linear step written out as its
    primitives (stab_div -> matmul -> mul_input), then a max pool and a conv step."""
    s = ops.stab_div(r, z, 1e-6, "sign")
    c = s @ w
    rl = ops.mul_input(c, x)  # relevance at the linear layer's input, (K*B, C*H*W) of the pool
    rp = ops.max_pool_relprop(rl.reshape(rl.shape[0], *idx.shape[1:]), idx, xp.shape)
    return ops.conv_relprop(rp, xc, zc, wc, 1, 1, 1, 1, 1e-6, "sign")


def _chain_inputs(batch: int, k: int, device: str):
    xc = torch.randn(batch, 2, 8, 8, device=device)
    wc = torch.randn(3, 2, 3, 3, device=device)
    zc = F.conv2d(xc, wc, None, 1, 1)
    xp = torch.relu(zc)
    pooled, idx = F.max_pool2d(xp, 2, return_indices=True)
    x = pooled.flatten(1)
    w = torch.randn(5, x.shape[1], device=device)
    z = x @ w.T
    r = torch.randn(k * batch, 5, device=device)
    return r, x, z, w, xp, idx, xc, zc, wc


def test_compile_graph_holds_the_lrpfast_ops():
    """fullgraph=True: no graph break anywhere, and the captured graph calls the compiled ops."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with lrpfast.use_implementation("extension"):
        fn = torch.compile(relevance_chain, backend=record, fullgraph=True)
        fn(*_chain_inputs(2, 3, "cpu"))
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    for name in ("stab_div", "mul_input", "max_pool_relprop", "conv_relprop"):
        assert f"lrpfast.{name}" in targets, (name, targets)


def _inductor_ready(device: str) -> bool:
    if device == "cpu":
        return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    from torch.utils._triton import has_triton
    return has_triton()


def test_compile_matches_eager(device):
    """torch.compile (inductor) over the chain equals eager, at two batch sizes (the second one
    through the dynamic-shape path of the fake kernels)."""
    if not _inductor_ready(device):
        pytest.skip(f"inductor cannot compile for {device} here (no C++ compiler / triton)")
    if device == "cuda" and not lrpfast._ext.cuda_compiled():
        pytest.skip("extension built without CUDA kernels")
    torch._dynamo.reset()
    with lrpfast.use_implementation("extension"):
        fn = torch.compile(relevance_chain, fullgraph=True)
        for batch, k in ((2, 3), (3, 2)):
            args = _chain_inputs(batch, k, device)
            got, want = fn(*args), relevance_chain(*args)
            assert got.shape == want.shape == (k * batch, 2, 8, 8)
            assert_close(got, want, 1e-6, f"compiled vs eager at batch {batch}, K {k}")
