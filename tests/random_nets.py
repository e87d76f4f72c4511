"""A seeded generator of random architectures for the oracle suite (tests/test_oracle.py).

`random_net(seed)` returns (model, x, description): a float64 eval-mode nn.Module built from the
node kinds lrpfast has rules for, in random order and geometry, and an input batch for it. The
model is a chain of blocks; a block may hold a branch of further blocks (residual add,
concatenation, chunk, product), so graphs with several paths come out of a plain recursion.
Every block keeps the tensor's kind (image (B, C, *spatial) in 1-3 spatial dims, or tokens
(B, L, E)) known, so the next block can be drawn from what fits.

The oracle's pass rule meets LRP's only where an activation's input is not exactly 0 or its f(0)
is 0; activations with f(0) != 0 (sigmoid, softplus, ...) are therefore drawn only where the input
has no exact zeros (not right after a ReLU, max pooling of one, or a slice of one), and every
Linear/Conv reading such zeros has a bias (eps = 0 divides by z).
"""
from __future__ import annotations

import random
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

F64 = torch.float64

# name -> (module factory, functional, f(0) == 0, makes exact zeros)
ACTIVATIONS = {
    "relu": (nn.ReLU, F.relu, True, True),
    "relu6": (nn.ReLU6, F.relu6, True, True),
    "leaky_relu": (lambda: nn.LeakyReLU(0.1), lambda x: F.leaky_relu(x, 0.1), True, False),
    "elu": (nn.ELU, F.elu, True, False),
    "gelu": (nn.GELU, F.gelu, True, True),   # exactly 0 below about -8.5 (erf saturates)
    "gelu_tanh": (lambda: nn.GELU("tanh"), lambda x: F.gelu(x, approximate="tanh"), True, True),
    "silu": (nn.SiLU, F.silu, True, False),
    "mish": (nn.Mish, F.mish, True, False),
    "tanh": (nn.Tanh, torch.tanh, True, False),
    "hardswish": (nn.Hardswish, F.hardswish, True, True),
    "sigmoid": (nn.Sigmoid, torch.sigmoid, False, False),
    "softplus": (nn.Softplus, F.softplus, False, False),
    "hardsigmoid": (nn.Hardsigmoid, F.hardsigmoid, False, True),
    "selu": (nn.SELU, F.selu, True, False),
    # written out as ops: one activation each (lrpfast/derived.py, rule 1)
    "gelu_written": (lambda: Lambda(_gelu_written, "gelu written"), lambda x: _gelu_written(x), True, True),
    "silu_written": (lambda: Lambda(_silu_written, "silu written"), lambda x: _silu_written(x), True, False),
    "hardswish_written": (lambda: Lambda(_hardswish_written, "hardswish written"), lambda x: _hardswish_written(x),
                          True, True),
    "star_relu": (lambda: Lambda(_star_relu, "star relu"), lambda x: _star_relu(x), False, False),
}


def _gelu_written(x):
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3))))


def _silu_written(x):
    return x * torch.sigmoid(x)


def _hardswish_written(x):
    return x * F.relu6(x + 3.0) / 6.0


def _star_relu(x):   # metaformer's StarReLU, s * relu(x)**2 + b
    return 0.8 * F.relu(x) ** 2 - 0.05


class RMSWritten(nn.Module):
    """RMSNorm written out (HF Llama, timm rms_norm2d): x * rsqrt(mean(x²) + eps) * w (rule 2)."""

    def __init__(self, e):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(e) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class State:
    """What the generator knows about the current tensor."""

    def __init__(self, kind: str, shape: Tuple[int, ...], zeros: bool = False):
        self.kind, self.shape, self.zeros = kind, tuple(shape), zeros   # shape without the batch

    def copy(self, **kw):
        s = State(self.kind, self.shape, self.zeros)
        for k, v in kw.items():
            setattr(s, k, v)
        return s


# ============================================================================= blocks


class Act(nn.Module):
    def __init__(self, name, functional, method):
        super().__init__()
        make, fn, _, _ = ACTIVATIONS[name]
        self.name, self.functional, self.method = name, functional, method
        self.mod = None if functional else make()
        self.fn = fn

    def forward(self, x):
        if self.mod is not None:
            return self.mod(x)
        if self.method and self.name in ("relu", "tanh", "sigmoid"):
            return getattr(x, self.name)()
        return self.fn(x)


class Residual(nn.Module):
    def __init__(self, branch, scale=None, order=0):
        super().__init__()
        self.branch, self.order = branch, order
        self.scale = None if scale is None else nn.Parameter(scale)

    def forward(self, x):
        y = self.branch(x)
        if self.scale is not None:
            y = self.scale * y
        return x + y if self.order == 0 else y + x


class Concat(nn.Module):
    def __init__(self, a, b, dim):
        super().__init__()
        self.a, self.b, self.dim = a, b, dim

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], self.dim)


class ChunkMix(nn.Module):
    """Two pieces of x along `dim` (chunk or split), one through a branch, joined again."""

    def __init__(self, branch, dim, how, join):
        super().__init__()
        self.branch, self.dim, self.how, self.join = branch, dim, how, join

    def forward(self, x):
        if self.how == "chunk":
            a, b = x.chunk(2, self.dim)
        else:
            n = x.shape[self.dim]
            a, b = torch.split(x, [n // 2, n - n // 2], self.dim)
        a = self.branch(a)
        return torch.cat([a, b], self.dim) if self.join == "cat" else torch.cat([b, a], self.dim)


class Gate(nn.Module):
    """Squeeze-and-excitation: x * act(conv1x1(relu(conv1x1(mean x)))) (two computed factors)."""

    def __init__(self, c, dims, act_name):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.dims = dims
        self.fc1, self.fc2 = conv(c, max(1, c // 2), 1), conv(max(1, c // 2), c, 1)
        self.act = ACTIVATIONS[act_name][1]

    def forward(self, x):
        s = x.mean(tuple(range(2, 2 + self.dims)), keepdim=True)
        return x * self.act(self.fc2(F.relu(self.fc1(s))))


class GatedMLP(nn.Module):
    """tokens: linear(x) * silu(linear(x)) -> linear (a gated MLP: a product of two computed)."""

    def __init__(self, e, h):
        super().__init__()
        self.up, self.gate, self.down = nn.Linear(e, h), nn.Linear(e, h), nn.Linear(h, e)

    def forward(self, x):
        return self.down(self.up(x) * F.silu(self.gate(x)))


class ChannelsLastNorm(nn.Module):
    """ConvNeXt's LayerNorm over channels: permute to channels-last, F.layer_norm, permute back."""

    def __init__(self, c, dims, functional):
        super().__init__()
        self.dims, self.functional = dims, functional
        self.ln = nn.LayerNorm(c)

    def forward(self, x):
        fwd = (0, *range(2, 2 + self.dims), 1)
        back = (0, 1 + self.dims, *range(1, 1 + self.dims))
        y = x.permute(*fwd)
        y = F.layer_norm(y, self.ln.normalized_shape, self.ln.weight, self.ln.bias, self.ln.eps) \
            if self.functional else self.ln(y)
        return y.permute(*back)


class Lambda(nn.Module):
    def __init__(self, fn, label, *mods):
        super().__init__()
        self.fn, self.label = fn, label
        self.mods = nn.ModuleList(mods)   # the layers fn uses: converted and traced with the model

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self):
        return self.label


class SDPABlock(nn.Module):
    """Multi-head self-attention written with F.scaled_dot_product_attention."""

    def __init__(self, e, heads, causal):
        super().__init__()
        self.qkv, self.out = nn.Linear(e, 3 * e), nn.Linear(e, e)
        self.h, self.causal = heads, causal

    def forward(self, x):
        b, n, e = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = (t.reshape(b, n, self.h, e // self.h).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(o.transpose(1, 2).reshape(b, n, e))


class MHABlock(nn.Module):
    def __init__(self, e, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class TokenWindows(nn.Module):
    """Tokens folded into the batch as Swin's windows are: (B, L, E) rolled by `shift`, viewed as
    (B*L/w, w, E), a branch on each window, and back (lrpfast/merged_batch.py)."""

    def __init__(self, branch, w, shift):
        super().__init__()
        self.branch, self.w, self.shift = branch, w, shift

    def forward(self, x):
        b, n, e = x.shape
        if self.shift:
            x = torch.roll(x, -self.shift, 1)
        y = self.branch(x.reshape(-1, self.w, e)).reshape(b, n, e)
        return torch.roll(y, self.shift, 1) if self.shift else y


class ClassToken(nn.Module):
    def __init__(self, e):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, e))

    def forward(self, x):
        return torch.cat([self.token.expand(x.shape[0], -1, -1), x], 1)


# ============================================================================= the generator


class Gen:
    def __init__(self, seed: int, depth: int = 0):
        self.rng = random.Random(seed)
        self.depth = depth
        self.kinds: List[str] = []

    def choice(self, xs):
        return self.rng.choice(xs)

    # ---- single blocks -------------------------------------------------------------------

    def act(self, st: State):
        names = [n for n, (_, _, zero0, _) in ACTIVATIONS.items() if zero0 or not st.zeros]
        name = self.choice(names)
        how = self.choice(["module", "functional", "method"])
        self.kinds.append(f"act:{name}")
        return Act(name, how != "module", how == "method"), st.copy(zeros=st.zeros or ACTIVATIONS[name][3])

    def conv(self, st: State, keep_shape=False):
        c, sp = st.shape[0], st.shape[1:]
        d = len(sp)
        out_c = c if keep_shape else self.rng.randint(2, 6)
        k = self.rng.choice([1, 2, 3]) if not keep_shape else self.rng.choice([1, 3])
        if min(sp) < 3:
            k = 1
        dil = 1 if keep_shape or min(sp) < 7 else self.rng.choice([1, 1, 2])
        stride = 1 if keep_shape or min(sp) < 6 else self.rng.choice([1, 1, 2])
        if keep_shape:
            pad = (k - 1) // 2 if self.rng.random() < 0.5 else "same"
        else:
            pad = self.rng.choice([0, 1]) if stride > 1 else self.rng.choice([0, 1, "same"])
        groups = 1
        if self.rng.random() < 0.25 and out_c == c:
            groups = c   # depthwise
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d](c, out_c, k, stride=stride, padding=pad, dilation=dil,
                                                          groups=groups, bias=st.zeros or self.rng.random() < 0.7)
        with torch.no_grad():
            probe = conv(torch.zeros(1, c, *sp))
        blocks = [conv]
        self.kinds.append(f"conv{d}d")
        if self.rng.random() < 0.4:
            bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[d](out_c)
            randomize_bn(bn, self.rng)
            blocks.append(bn)
            self.kinds.append("bn(folded)")
        return blocks, State("image", probe.shape[1:], False)

    def pool(self, st: State):
        c, sp = st.shape[0], st.shape[1:]
        d = len(sp)
        kind = self.choice(["max", "max_overlap", "avg", "adaptive_avg", "adaptive_max", "max_functional"])
        if min(sp) < 4:
            kind = self.choice(["adaptive_avg", "adaptive_max"])
        self.kinds.append(f"pool:{kind}{d}d")
        if kind == "max":
            m = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[d](2)
        elif kind == "max_overlap":
            m = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[d](3, stride=self.choice([1, 2]), padding=1,
                                                                      ceil_mode=self.rng.random() < 0.3)
        elif kind == "max_functional":
            f = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[d]
            m = Lambda(lambda x, f=f: f(x, 3, 2, 1), "max_pool(3, 2, 1)")
        elif kind == "avg":
            m = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[d](
                self.choice([2, 3]), stride=self.choice([1, 2]), padding=self.choice([0, 1]),
                count_include_pad=self.rng.random() < 0.5)
        elif kind == "adaptive_avg":
            m = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[d](
                tuple(max(1, s // 2) for s in sp) if d > 1 else max(1, sp[0] // 2))
        else:
            m = {1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}[d](
                tuple(max(1, s // 2) for s in sp) if d > 1 else max(1, sp[0] // 2))
        with torch.no_grad():
            probe = m(torch.zeros(1, c, *sp))
        zeros = st.zeros and kind not in ("avg", "adaptive_avg")
        return m, State("image", probe.shape[1:], zeros)

    def shape_op(self, st: State):
        """A layout round trip that keeps the state: flatten/unflatten, unsqueeze/squeeze,
        transpose/permute, view, contiguous."""
        c, sp = st.shape[0], st.shape[1:]
        d = len(sp)
        kind = self.choice(["flatten_view", "unsqueeze", "transpose", "permute", "reshape", "clone"])
        self.kinds.append(f"shape:{kind}")
        if kind == "flatten_view":
            m = Lambda(lambda x, s=st.shape: x.flatten(1).view(x.shape[0], *s), "flatten().view")
        elif kind == "unsqueeze":
            m = Lambda(lambda x: torch.unsqueeze(x, 1).squeeze(1), "unsqueeze(1).squeeze(1)")
        elif kind == "transpose":
            m = Lambda(lambda x: x.transpose(1, -1).contiguous().transpose(1, -1), "transpose(1,-1)x2")
        elif kind == "permute":
            perm = list(range(1, 2 + d))
            self.rng.shuffle(perm)
            perm = [0] + perm
            inv = [perm.index(i) for i in range(len(perm))]
            m = Lambda(lambda x, p=perm, q=inv: x.permute(*p).permute(*q), f"permute{perm}")
        elif kind == "reshape":
            m = Lambda(lambda x, s=st.shape: torch.reshape(x, (x.shape[0], -1)).reshape(-1, *s), "reshape")
        else:
            m = Lambda(lambda x: x.clone(), "clone")
        return m, st

    def slice(self, st: State):
        c = st.shape[0]
        kind = self.choice(["channels", "last", "ellipsis"])
        self.kinds.append(f"index:{kind}")
        if kind == "channels" and c > 2:
            return Lambda(lambda x: x[:, 1:], "x[:, 1:]"), st.copy(shape=(c - 1, *st.shape[1:]))
        if st.shape[-1] > 3:
            if kind == "ellipsis":
                return Lambda(lambda x: x[..., :-1], "x[..., :-1]"), st.copy(shape=(*st.shape[:-1], st.shape[-1] - 1))
            return Lambda(lambda x: x[:, :, 1:], "x[:, :, 1:]"), st.copy(shape=(c, st.shape[1] - 1, *st.shape[2:]))
        return Lambda(lambda x: x[:, None][:, 0], "x[:, None][:, 0]"), st

    LINEAR_OPS = {   # ops of lrpfast/op_rules.py that keep the shape of an image tensor
        "neg": lambda x: -x,
        "sub_number": lambda x: x - 0.25,
        "rsub": lambda x: 0.5 - 2.0 * x,
        "sub_computed": lambda x: x - 0.5 * x.flip(-1),
        "div": lambda x: x / 3.0,
        "sum_broadcast": lambda x: x + x.sum(1, keepdim=True),
        "stack": lambda x: torch.stack([x, x.roll(1, -1)], -1).sum(-1),
        "pad_crop": lambda x: F.pad(x, (1, 1), value=0.2)[..., 1:-1],
        "roll": lambda x: torch.roll(x, 1, -1),
        "repeat": None,   # needs the rank: made in linear_op
        "expand": lambda x: (x.mean(1, keepdim=True) + 0.5).expand_as(x),
        "cast": lambda x: x.to(torch.float64).type_as(x),
    }

    def linear_op(self, st: State):
        name = self.choice(sorted(self.LINEAR_OPS))
        self.kinds.append(f"linop:{name}")
        fn = self.LINEAR_OPS[name]
        if name == "repeat":
            ones, c = [1] * (len(st.shape) - 1), st.shape[0]
            fn = lambda x, ones=ones, c=c: x.repeat(1, 2, *ones)[:, :c]  # noqa: E731
        return Lambda(fn, name), st.copy(zeros=st.zeros or name in ("roll", "pad_crop"))

    def image_block(self, st: State, budget: int):
        """One random block on an image tensor: (module, new state)."""
        options = ["conv", "conv", "act", "act", "pool", "shape", "slice", "bn", "norm", "scale", "linop"]
        if budget > 0 and self.depth < 2:
            options += ["residual", "concat", "chunk", "gate"]
        kind = self.choice(options)
        c, sp = st.shape[0], st.shape[1:]
        d = len(sp)
        if kind == "conv":
            blocks, st2 = self.conv(st)
            return nn.Sequential(*blocks), st2
        if kind == "act":
            return self.act(st)
        if kind == "pool":
            return self.pool(st)
        if kind == "shape":
            return self.shape_op(st)
        if kind == "slice":
            return self.slice(st)
        if kind == "bn":   # a BatchNorm that cannot be folded (after an activation)
            act, st2 = self.act(st)
            bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[d](c)
            randomize_bn(bn, self.rng)
            self.kinds.append("bn(standalone)")
            return nn.Sequential(act, bn), st2.copy(zeros=False)
        if kind == "linop":
            return self.linear_op(st)
        if kind == "norm":
            self.kinds.append("layernorm(channels)")
            return ChannelsLastNorm(c, d, self.rng.random() < 0.5), st.copy(zeros=False)
        if kind == "scale":
            self.kinds.append("mul:const")
            if self.rng.random() < 0.5:
                return Lambda(lambda x: 2.0 * x, "2.0 * x"), st
            return Residual(nn.Identity(), torch.rand(c, *([1] * d), dtype=torch.float32) + 0.5, 1), st
        if kind == "residual":
            self.kinds.append("add:residual")
            sub = Gen(self.rng.randint(0, 1 << 30), self.depth + 1)
            branch, _ = sub.chain(st, self.rng.randint(1, 3), keep_shape=True)
            self.kinds += sub.kinds
            scale = torch.rand(c, *([1] * d)) + 0.5 if self.rng.random() < 0.3 else None
            return Residual(branch, scale, self.rng.randint(0, 1)), st   # x + f(x) is 0 where both are
        if kind == "concat":
            self.kinds.append("cat")
            subs = [Gen(self.rng.randint(0, 1 << 30), self.depth + 1) for _ in range(2)]
            a, sa = subs[0].chain(st, self.rng.randint(1, 2), keep_shape=True)
            b, sb = subs[1].chain(st, self.rng.randint(0, 2), keep_shape=True)
            self.kinds += subs[0].kinds + subs[1].kinds
            return Concat(a, b, 1), State("image", (sa.shape[0] + sb.shape[0], *sp), sa.zeros or sb.zeros)
        if kind == "chunk":
            dims_ok = ([1] if c >= 2 else []) + ([2] if sp[0] >= 4 else [])
            if not dims_ok:
                return self.act(st)
            dim = self.choice(dims_ok)
            half = st.shape[dim - 1] // 2 if self.rng.random() < 0.5 else None
            how = "chunk" if half is None else "split"
            self.kinds.append(f"{how}:dim{dim}")
            piece = list(st.shape)
            n = piece[dim - 1]
            piece[dim - 1] = (n + 1) // 2 if how == "chunk" else n // 2
            sub = Gen(self.rng.randint(0, 1 << 30), self.depth + 1)
            branch, _ = sub.chain(st.copy(shape=tuple(piece)), self.rng.randint(1, 2), keep_shape=True)
            self.kinds += sub.kinds
            return ChunkMix(branch, dim, how, self.choice(["cat", "swap"])), st.copy(zeros=True)
        # gate
        name = self.choice(["sigmoid", "hardsigmoid", "tanh"])
        self.kinds.append(f"mul:gate({name})")
        return Gate(c, d, name), st.copy(zeros=st.zeros or name == "hardsigmoid")

    def token_block(self, st: State, budget: int):
        n, e = st.shape
        options = ["linear", "act", "norm", "shape", "slice_e"]
        if budget > 0 and self.depth < 2:
            options += ["attn", "attn", "mlp", "gated", "residual"] + (["windows"] if n > 1 else [])
        kind = self.choice(options)
        if kind == "windows":   # the batch merged with the windows and split again
            w = self.choice([d for d in range(1, n) if n % d == 0])
            shift = self.rng.randint(0, n - 1) if self.rng.random() < 0.5 else 0
            self.kinds.append(f"windows:w{w}{'(shifted)' if shift else ''}")
            sub = Gen(self.rng.randint(0, 1 << 30), self.depth + 1)
            branch, _ = sub.chain(st.copy(shape=(w, e)), self.rng.randint(1, 3), keep_shape=True)
            self.kinds += sub.kinds
            return Residual(TokenWindows(branch, w, shift), None, 0), st
        if kind == "linear":
            self.kinds.append("linear")
            return nn.Linear(e, e, bias=st.zeros or self.rng.random() < 0.7), st.copy(zeros=False)
        if kind == "act":
            return self.act(st)
        if kind == "norm":
            if self.rng.random() < 0.25:
                self.kinds.append("rmsnorm(written)")
                return RMSWritten(e), st.copy(zeros=False)
            self.kinds.append("layernorm")
            if self.rng.random() < 0.5:
                return nn.LayerNorm(e, elementwise_affine=self.rng.random() < 0.8), st.copy(zeros=False)
            ln = nn.LayerNorm(e)
            return Lambda(lambda x, ln=ln: F.layer_norm(x, (e,), ln.weight, ln.bias), "F.layer_norm", ln), \
                st.copy(zeros=False)
        if kind == "shape":
            kind2 = self.choice(["transpose", "flatten_view", "unflatten"])
            self.kinds.append(f"shape:{kind2}")
            if kind2 == "transpose":
                return Lambda(lambda x: x.transpose(1, 2).transpose(1, 2), "transpose x2"), st
            if kind2 == "unflatten" and e % 2 == 0:
                return Lambda(lambda x: x.unflatten(2, (2, -1)).flatten(2), "unflatten/flatten"), st
            return Lambda(lambda x, s=st.shape: x.reshape(x.shape[0], -1).view(-1, *s), "flatten/view"), st
        if kind == "slice_e":
            self.kinds.append("index:tokens")
            if n > 2:
                return Lambda(lambda x: x[:, 1:], "x[:, 1:]"), st.copy(shape=(n - 1, e))
            return Lambda(lambda x: x[:, :, None, :].squeeze(2), "x[:, :, None]"), st
        if kind == "attn":
            heads = self.choice([h for h in (1, 2, 4) if e % h == 0])
            if self.rng.random() < 0.5:
                self.kinds.append("attn:mha")
                blk = MHABlock(e, heads)
            else:
                causal = self.rng.random() < 0.4
                self.kinds.append(f"attn:sdpa{'(causal)' if causal else ''}")
                blk = SDPABlock(e, heads, causal)
            return Residual(blk, None, self.rng.randint(0, 1)), st.copy(zeros=False)
        if kind == "mlp":
            self.kinds.append("mlp")
            h = self.rng.randint(4, 12)
            act, _ = self.act(st.copy(zeros=False))
            return Residual(nn.Sequential(nn.Linear(e, h), act, nn.Linear(h, e)), None, 0), st.copy(zeros=False)
        if kind == "gated":
            self.kinds.append("mul:gated_mlp")
            return Residual(GatedMLP(e, self.rng.randint(4, 10)), None, 1), st.copy(zeros=False)
        self.kinds.append("add:residual")
        sub = Gen(self.rng.randint(0, 1 << 30), self.depth + 1)
        branch, _ = sub.chain(st, self.rng.randint(1, 2), keep_shape=True)
        self.kinds += sub.kinds
        return Residual(branch, None, 0), st

    def chain(self, st: State, n: int, keep_shape: bool = False):
        """n blocks from state st; keep_shape: the output has st's shape (a residual branch)."""
        blocks, cur = [], st
        for i in range(n):
            for _ in range(20):   # draw until a block fits (shape kept where asked)
                if cur.kind == "image":
                    if keep_shape:
                        kind = self.choice(["conv", "act", "act", "shape", "norm", "bn", "scale", "nested", "linop"])
                        if kind == "conv":
                            b, s2 = self.conv(cur, keep_shape=True)
                            m, s2 = nn.Sequential(*b), s2
                        elif kind == "nested" and self.depth < 2:
                            m, s2 = self.image_block(cur, 1)
                        elif kind == "linop":
                            m, s2 = self.linear_op(cur)
                        elif kind in ("act", "shape"):
                            m, s2 = self.act(cur) if kind == "act" else self.shape_op(cur)
                        else:
                            m, s2 = self.image_block(cur, 0)
                    else:
                        m, s2 = self.image_block(cur, 1)
                else:
                    m, s2 = self.token_block(cur, 1)
                if not keep_shape or s2.shape == cur.shape:
                    break
            else:
                m, s2 = nn.Identity(), cur
            if keep_shape and s2.shape != cur.shape:
                m, s2 = nn.Identity(), cur
            blocks.append(m)
            cur = s2
        return nn.Sequential(*blocks), cur


def randomize_bn(bn, rng):
    g = torch.Generator().manual_seed(rng.randint(0, 1 << 30))
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g) * 0.2)


class Head(nn.Module):
    def __init__(self, how, feat, classes, dims=0):
        super().__init__()
        self.how, self.dims = how, dims
        self.fc = nn.Linear(feat, classes)

    def forward(self, x):
        if self.how == "flatten":
            x = torch.flatten(x, 1)
        elif self.how == "mean":
            x = x.mean(tuple(range(2, 2 + self.dims)))
        elif self.how == "tokens_mean":
            x = x.mean(1)
        elif self.how == "cls":
            x = x[:, 0]
        return self.fc(x)


def random_net(seed: int):
    """(model float64 eval, x (B, ...), description)."""
    g = Gen(seed)
    rng = g.rng
    torch.manual_seed(seed)
    classes = rng.randint(2, 6)
    b = rng.randint(1, 3)
    kind = rng.choice(["image1d", "image2d", "image2d", "image3d", "tokens"])
    blocks = []
    if kind == "tokens":
        n, e = rng.randint(3, 6), rng.choice([4, 8])
        st = State("tokens", (n, e))
        x = torch.randn(b, n, e, dtype=F64)
        if rng.random() < 0.4:
            blocks.append(ClassToken(e))
            g.kinds.append("cat:class_token")
            st = st.copy(shape=(n + 1, e))
        chain, st = g.chain(st, rng.randint(2, 6))
        blocks.append(chain)
        how = rng.choice(["tokens_mean", "cls", "flatten"])
        feat = st.shape[1] if how != "flatten" else st.shape[0] * st.shape[1]
        blocks.append(Head(how, feat, classes))
    else:
        d = int(kind[5])
        size = {1: rng.randint(10, 16), 2: rng.randint(7, 10), 3: rng.randint(5, 6)}[d]
        c = rng.randint(1, 4)
        st = State("image", (c, *([size] * d)))
        x = torch.randn(b, c, *([size] * d), dtype=F64)
        chain, st = g.chain(st, rng.randint(2, 7))
        blocks.append(chain)
        if rng.random() < 0.3 and min(st.shape[1:]) >= 2:
            # to tokens: (B, C, *sp) -> (B, L, C), then token blocks (a conv stem + transformer)
            blocks.append(Lambda(lambda t: t.flatten(2).transpose(1, 2), "flatten(2).transpose(1, 2)"))
            g.kinds.append("shape:to_tokens")
            n = 1
            for s in st.shape[1:]:
                n *= s
            st = State("tokens", (n, st.shape[0]), st.zeros)
            chain2, st = g.chain(st, rng.randint(1, 3))
            blocks.append(chain2)
            blocks.append(Head("tokens_mean", st.shape[1], classes))
        else:
            how = rng.choice(["flatten", "mean"])
            feat = st.shape[0] if how == "mean" else int(torch.tensor(st.shape).prod())
            blocks.append(Head(how, feat, classes, len(st.shape) - 1))
    model = nn.Sequential(*blocks).to(F64).eval()
    return model, x, f"seed {seed}: {kind}: " + ", ".join(g.kinds)
