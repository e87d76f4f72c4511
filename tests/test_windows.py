"""The batch merged with following dims and split again (window attention, lrpfast/merged_batch.py).

Everything is checked against lrpfast.oracle.gradient_oracle (plain autograd under the detach
rules, no code shared with the relevance pass) at ε = 0, and the logits against model(x):
hand-written Swin blocks (shifted windows, the mask added by broadcasting over (B, nW, heads, N, N),
torch.roll), both attention rules, K targets per sample, batch splitting, per-layer conservation of
a bias-free model, the timm families that fold windows or tokens into the batch, and refusals.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrpfast
from lrpfast.oracle import gradient_oracle
from lrpfast.ops import RelevanceError

from .random_nets import random_net
from .test_lrp_models import randomize_batch_norm

F64 = torch.float64
TOL = 1e-9


def rel_l2(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def window_partition(x, ws):
    """(B, H, W, C) -> (B*nW, ws*ws, C): the batch merged with the windows."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(win, ws, h, w):
    """(B*nW, ws*ws, C) -> (B, H, W, C): the batch split off again."""
    c = win.shape[-1]
    x = win.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shift_mask(h, w, ws, shift):
    """Swin's mask for shifted windows: (nW, N, N), -100 between tokens from different regions."""
    img = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = window_partition(img, ws).squeeze(-1)
    mask = win.unsqueeze(1) - win.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowAttention(nn.Module):
    def __init__(self, dim, heads, ws, shift, h, w, bias=True, sdpa=False):
        super().__init__()
        self.heads, self.ws, self.shift, self.sdpa = heads, ws, shift, sdpa
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        n = ws * ws
        self.rel_bias = nn.Parameter(torch.randn(heads, n, n) * 0.5)
        self.register_buffer("mask", shift_mask(h, w, ws, shift) if shift else None)

    def forward(self, x):   # (B, H, W, C)
        b, h, w, c = x.shape
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        win = window_partition(x, self.ws)
        bw, n, _ = win.shape
        q, k, v = self.qkv(win).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.rel_bias.unsqueeze(0)
        if self.mask is not None:
            nw = self.mask.shape[0]   # the mask broadcast over (B, nW, heads, N, N), as timm's Swin adds it
            bias = (bias.expand(nw, -1, -1, -1) + self.mask.unsqueeze(1)).unsqueeze(0)
        if self.sdpa:   # the merged batch split again into (B, nW, heads, N, d) for the mask
            nw = (h // self.ws) * (w // self.ws)
            q, k, v = (t.view(-1, nw, self.heads, n, c // self.heads) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).flatten(0, 1)
        else:
            attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
            if self.mask is not None:
                attn = (attn.view(-1, self.mask.shape[0], self.heads, n, n) + bias).view(-1, self.heads, n, n)
            else:
                attn = attn + bias
            o = attn.softmax(-1) @ v
        o = self.proj(o.transpose(1, 2).reshape(bw, n, c))
        x = window_reverse(o, self.ws, h, w)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x


class SwinBlock(nn.Module):
    def __init__(self, dim, heads, ws, shift, h, w, bias=True, sdpa=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, bias=bias)
        self.attn = WindowAttention(dim, heads, ws, shift, h, w, bias, sdpa)
        self.norm2 = nn.LayerNorm(dim, bias=bias)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim, bias=bias), nn.GELU(), nn.Linear(2 * dim, dim, bias=bias))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinySwin(nn.Module):
    """A patch embedding, a regular and a shifted window block, a patch merging (tokens folded
    back to the batch-first layout), the mean over tokens, a head."""

    def __init__(self, size=8, dim=8, ws=2, classes=5, bias=True, sdpa=False):
        super().__init__()
        h = size // 2
        self.embed = nn.Conv2d(3, dim, 2, 2, bias=bias)
        self.blocks = nn.Sequential(SwinBlock(dim, 2, ws, 0, h, h, bias, sdpa),
                                    SwinBlock(dim, 2, ws, ws // 2, h, h, bias, sdpa))
        self.merge = nn.Linear(4 * dim, 2 * dim, bias=bias)
        self.head = nn.Linear(2 * dim, classes, bias=bias)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)          # (B, H, W, C)
        x = self.blocks(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        x = self.merge(x)
        return self.head(x.mean((1, 2)))


def swin(bias=True, sdpa=False, seed=0):
    torch.manual_seed(seed)
    return TinySwin(bias=bias, sdpa=sdpa).to(F64).eval()


def check(model, x, target, attention="cp", **kw):
    """LRP(ε=0) against model(x) and the oracle; target (B,) or (B, K)."""
    with torch.no_grad():
        want_logits = model(x)
    e = lrpfast.LRP(model, eps=0.0, attention=attention, **kw).explain(x, target)
    assert (e.logits - want_logits).abs().max().item() <= 1e-10 * want_logits.abs().max().item()
    if target.dim() == 1:
        want = gradient_oracle(model, x, target, attention=attention)
    else:
        want = torch.stack([gradient_oracle(model, x, target[:, k], attention=attention)
                            for k in range(target.shape[1])], 1)
    assert e.relevance.shape == want.shape
    err = rel_l2(e.relevance, want)
    assert err < TOL, f"relative L2 {err:.2e} against the oracle"
    return e


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
@pytest.mark.parametrize("sdpa", [False, True])
def test_shifted_window_attention_equals_oracle(attention, sdpa):
    model = swin(sdpa=sdpa)
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    check(model, x, torch.tensor([0, 4, 2]), attention)


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_k_targets_in_one_pass_equal_k_single_runs(attention):
    """(B, K) targets: the messages carry K*B*m rows through the windows (row order matters:
    a map of one target must not land in another's). Each map equals the oracle and the
    single-target run."""
    model = swin(seed=1)
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    t = torch.tensor([[0, 3, 1], [4, 4, 2]])
    e = check(model, x, t, attention)
    lrp = lrpfast.LRP(model, eps=0.0, attention=attention)
    for k in range(t.shape[1]):
        single = lrp.explain(x, t[:, k]).relevance
        assert rel_l2(e.relevance[:, k], single) < TOL


def test_batch_splitting_equals_one_call():
    model = swin(seed=2)
    x = torch.randn(5, 3, 8, 8, dtype=F64)
    t = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 1], [3, 2]])
    whole = check(model, x, t)
    for kw in ({"batch_size": 2}, {"memory_budget": 200_000}):
        part = check(model, x, t, **kw)
        assert rel_l2(part.relevance, whole.relevance) < 1e-12


class WindowChain(nn.Module):
    """Bias-free, no residual: every step is a cut, so each conserves the logit at ε = 0."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 2, 2, bias=False)
        self.lin = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 3, bias=False)

    def windows(self, x):
        return window_partition(self.embed(x).permute(0, 2, 3, 1), 2)   # (B*4, 4, 4)

    def rest(self, win):
        return self.head(window_reverse(F.relu(self.lin(win)), 2, 4, 4).mean((1, 2)))

    def forward(self, x):
        return self.rest(self.windows(x))


def test_layer_maps_and_conservation_through_windows():
    """explain(keep_layers=True) at a merged step: Σ R per map is the logit (conservation), and
    the map, (B, K, windows, N, C), is gradient × input at the window tensor (autograd, per target)."""
    torch.manual_seed(3)
    model = WindowChain().to(F64).eval()
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    t = torch.tensor([[1, 2], [0, 0]])
    e = lrpfast.LRP(model, eps=0.0).explain(x, t, keep_layers=True)
    logit = e.logits.gather(1, t)
    for name, total in e.conservation.items():
        assert torch.allclose(total, logit, rtol=1e-9, atol=1e-12), name
    win = model.windows(x).detach().requires_grad_(True)
    out = model.rest(win)
    want = torch.empty(2, 2, 4, 4, 4, dtype=F64)
    for k in range(2):
        (g,) = torch.autograd.grad(out.gather(1, t[:, k:k + 1]).sum(), win, retain_graph=True)
        want[:, k] = (win * g).detach().view(2, 4, 4, 4)
    got = e.layers["lin"]
    assert got.shape == want.shape
    assert rel_l2(got, want) < TOL


def test_batch_of_one():
    model = swin(seed=4)
    check(model, torch.randn(1, 3, 8, 8, dtype=F64), torch.tensor([[2, 0]]), "attnlrp")


# ----------------------------------------------------------------------------- other foldings


class TokensIntoBatch(nn.Module):
    """LeViT's BatchNorm1d over (B*N, C) and MobileViT's unfolding of patches into the batch."""

    def __init__(self, c=4, p=2, classes=3):
        super().__init__()
        self.p = p
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm1d(c)
        self.mix = nn.Linear(c, c)
        self.attn = nn.MultiheadAttention(c, 2, batch_first=True)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.shape
        p = self.p
        # MobileViT: (B, C, H, W) -> (B*C*H/p, p, W/p, p) -> (B*p*p, N, C)
        y = x.reshape(b * c * h // p, p, w // p, p).transpose(1, 2)
        y = y.reshape(b, c, (h // p) * (w // p), p * p).transpose(1, 3).reshape(b * p * p, -1, c)
        y = y + self.attn(y, y, y, need_weights=False)[0]
        # back, then LeViT's flatten(0, 1) around a BatchNorm1d
        y = y.contiguous().view(b, p * p, -1, c).transpose(1, 3).reshape(b * c * h // p, w // p, p, p)
        t = y.transpose(1, 2).reshape(b, c, h, w).flatten(2).transpose(1, 2)   # (B, N, C)
        t = self.mix(F.gelu(self.bn(t.flatten(0, 1)).reshape_as(t)))
        return self.head(t.mean(1))


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
def test_tokens_and_patches_folded_into_the_batch(attention):
    torch.manual_seed(5)
    model = TokensIntoBatch().to(F64).eval()
    randomize_batch_norm(model)
    x = torch.randn(3, 3, 4, 6, dtype=F64)
    check(model, x, torch.tensor([[0, 2], [1, 1], [2, 0]]), attention)


class GlobalQueryWindows(nn.Module):
    """GCViT's global attention: one query per sample from pooled features, given to each of its
    windows by repeat_interleave along dim 0 (a merged batch); keys and values from the windows."""

    def __init__(self, c=8, heads=2, ws=2, classes=4, method=True):
        super().__init__()
        self.c, self.heads, self.ws, self.method = c, heads, ws, method
        self.embed = nn.Conv2d(3, c, 2, 2)
        self.q = nn.Linear(c, c)
        self.kv = nn.Linear(c, 2 * c)
        self.proj = nn.Linear(c, c)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        f = self.embed(x).permute(0, 2, 3, 1)                       # (B, H, W, C)
        b, h, w, c = f.shape
        n, hd = self.ws * self.ws, c // self.heads
        g = F.adaptive_avg_pool2d(f.permute(0, 3, 1, 2), self.ws).flatten(2).transpose(1, 2)   # (B, N, C)
        q = self.q(g).reshape(b, n, self.heads, hd).transpose(1, 2)                           # (B, heads, N, d)
        win = window_partition(f, self.ws)                                                    # (B*nW, N, C)
        nw = win.shape[0] // b
        q = q.repeat_interleave(nw, dim=0) if self.method else torch.repeat_interleave(q, nw, 0)
        k, v = self.kv(win).reshape(-1, n, 2, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        o = ((q @ k.transpose(-2, -1)) * hd ** -0.5).softmax(-1) @ v
        o = self.proj(o.transpose(1, 2).reshape(-1, n, c))
        f = f + window_reverse(o, self.ws, h, w)
        return self.head(f.mean((1, 2)))


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
@pytest.mark.parametrize("method", [True, False])
def test_rows_repeated_into_windows_equal_oracle(attention, method):
    """repeat_interleave(nW, dim=0): each sample's query copied to its windows (K targets too)."""
    torch.manual_seed(6)
    model = GlobalQueryWindows(method=method).to(F64).eval()
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    check(model, x, torch.tensor([[0, 3], [1, 2], [3, 3]]), attention)


# ----------------------------------------------------------------------------- the batch moved by a stack


class HeadEnsemble(nn.Module):
    """CrossViT's and EfficientViM's heads: torch.stack of (B, C) logits at dim 0 puts the batch at
    dim 1 (lrpfast/stacking.py); the mean or sum over the heads brings it back to dim 0."""

    def __init__(self, reduce, dim=0, classes=4):
        super().__init__()
        self.reduce, self.dim = reduce, dim
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.heads = nn.ModuleList([nn.Linear(24, classes) for _ in range(3)])

    def forward(self, x):
        f = self.body(x)
        s = torch.stack([h(f if i != 1 else F.gelu(f)) for i, h in enumerate(self.heads)], self.dim)
        if self.reduce == "mean":
            return torch.mean(s, dim=self.dim)
        if self.reduce == "sum":
            return s.sum(self.dim)
        return s.sum(self.dim, keepdim=True)[0] + s[2]


@pytest.mark.parametrize("reduce,dim", [("mean", 0), ("sum", 0), ("keep", 0), ("sum", 1), ("sum", -1)])
def test_stacked_heads_equal_oracle(reduce, dim):
    torch.manual_seed(7)
    model = HeadEnsemble(reduce, dim).to(F64).eval()
    check(model, torch.randn(3, 3, 5, 5, dtype=F64), torch.tensor([[0, 3], [1, 1], [2, 0]]))


def test_stack_then_sum_over_the_batch_is_refused():
    model = Lam(lambda x: torch.stack([x, x]).sum(1)).to(F64)
    with pytest.raises(RelevanceError, match=r"'sum.*sums over the batch dimension"):
        lrpfast.LRP(model, eps=0.0).explain(torch.randn(2, 4, dtype=F64), 0)


def test_stacked_batch_must_come_back_first():
    model = Lam(lambda x: torch.stack([x, 2 * x])).to(F64)   # logits (2, B, classes)
    with pytest.raises(RelevanceError, match=r"has the batch at dim 1; expected logits \(B, classes\)"):
        lrpfast.LRP(model, eps=0.0).explain(torch.randn(2, 4, dtype=F64), 0)


# ----------------------------------------------------------------------------- refusals


class Lam(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.fc = fn, nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.fn(x))


def test_reshape_mixing_samples_is_refused():
    """(2, 6) -> (3, 4): row 1 holds values of both samples."""
    model = Lam(lambda x: x.view(3, 4)).to(F64)   # logits (3, 2): refused before the output check
    with pytest.raises(RelevanceError, match=r"'view'.*\(2, 6\) into \(3, 4\).*not a multiple of the batch size 2"):
        lrpfast.LRP(model, eps=0.0).explain(torch.randn(2, 6, dtype=F64), 0)


def test_interleaved_batch_is_refused():
    """(B, m, C).transpose(0, 1).reshape(m*B, C) puts the batch inside the merged dim."""
    model = Lam(lambda x: x.transpose(0, 1).reshape(-1, 4).view(3, 2, 4).transpose(0, 1).mean(1)).to(F64)
    with pytest.raises(RelevanceError, match=r"reshape.*needs the batch dimension first.*at dim 1"):
        lrpfast.LRP(model, eps=0.0).explain(torch.randn(2, 3, 4, dtype=F64), 0)


def test_rows_repeated_by_counts_per_row_are_refused():
    """repeat_interleave with a count per row along dim 0 does not keep the samples' rows alike."""
    model = Lam(lambda x: x.repeat_interleave(torch.tensor([1, 3]), dim=0).view(2, 2, 4).sum(1)).to(F64)
    with pytest.raises(RelevanceError, match=r"'repeat_interleave'.*by counts per row"):
        lrpfast.LRP(model, eps=0.0).explain(torch.randn(2, 4, dtype=F64), 0)


@pytest.mark.parametrize("attention", ["cp", "attnlrp"])
@pytest.mark.parametrize("merged", [False, True])
def test_softmax_across_the_batch_is_refused(attention, merged):
    """Weights normalised over dim 0 (the batch, or a merged batch's rows) make a sample's map depend
    on its batchmates; the gradient oracle cannot tell (it sums over the batch): refused, also
    where CP-LRP holds the weights constant."""
    fold = (lambda x: x.reshape(-1, 4)) if merged else (lambda x: x.flatten(1)[:, :4])
    model = Lam(lambda x: (fold(x).softmax(0) * fold(x)).reshape(2, -1, 4).mean(1)).to(F64)
    with pytest.raises(RelevanceError, match=r"'softmax'.*(normalises|acts) along the batch dimension"):
        lrpfast.LRP(model, eps=0.0, attention=attention).explain(torch.randn(2, 3, 4, dtype=F64), 0)


def test_merged_output_is_refused():
    model = Lam(lambda x: x.reshape(-1, 4)).to(F64)   # (B*3, classes) logits
    with pytest.raises(RelevanceError, match=r"logits \(B, classes\) with B = 2"):
        lrpfast.LRP(model, eps=0.0).explain(torch.randn(2, 3, 4, dtype=F64), 0)


class OneKeyForAllWindows(nn.Module):
    """Windows of a batch of one attend to keys of the whole image: (m, ...) queries with a (1, ...)
    key broadcast over them works in torch only at B = 1, and must not be explained as if the key
    were per row."""

    def __init__(self, how):
        super().__init__()
        self.how, self.fc = how, nn.Linear(4, 2)

    def forward(self, x):   # (1, 8, 4)
        q = x.reshape(-1, 2, 4)                    # (4, 2, 4): the batch merged with 4 windows
        if self.how == "sdpa":
            o = F.scaled_dot_product_attention(q.unsqueeze(1), x[:, :2].unsqueeze(1), q.unsqueeze(1))
        elif self.how == "add":
            o = (q.reshape(1, 4, 2, 4) + x.reshape(1, 1, 8, 4)[:, :, :2]).reshape(-1, 2, 4)
        else:
            o = q * x[:, :2]
        return self.fc(o.reshape(1, 8, 4).mean(1))


@pytest.mark.parametrize("how,msg", [("sdpa", r"expects \(B, ..., L, E\) query, key and value"),
                                     ("mul", r"broadcasts the factor of shape \(1, 2, 4\) across samples or leading")])
def test_merged_rows_broadcast_against_one_row_is_refused(how, msg):
    model = OneKeyForAllWindows(how).to(F64)
    with pytest.raises(RelevanceError, match=msg):
        lrpfast.LRP(model, eps=0.0).explain(torch.randn(1, 8, 4, dtype=F64), 0)


def test_merged_rows_added_within_the_sample_equal_oracle():
    """(1, 4, 2, 4) + (1, 1, 2, 4): split again, the broadcast is within the sample (fine)."""
    model = OneKeyForAllWindows("add").to(F64)
    check(model, torch.randn(1, 8, 4, dtype=F64), torch.tensor([1]))


# ----------------------------------------------------------------------------- random nets, timm


def test_random_nets_with_windows_equal_oracle():
    """The generator's window folding (tests/random_nets.py, TokenWindows) in seeds that draw it."""
    seeds = [s for s in range(750) if "windows:" in random_net(s)[2]][:12]
    assert len(seeds) >= 8
    for seed in seeds:
        model, x, desc = random_net(seed)
        attention = "attnlrp" if seed % 2 else "cp"
        t = torch.zeros(x.shape[0], dtype=torch.long)
        try:
            check(model, x, t, attention)
        except AssertionError as exc:
            raise AssertionError(f"{desc}: {exc}") from None


TIMM = {   # family: (model, input size) - each folds windows or tokens into the batch
    "swin_transformer": ("swin_tiny_patch4_window7_224", dict(img_size=56, window_size=7), 56),
    "swin_transformer_v2": ("swinv2_tiny_window8_256", dict(img_size=64, window_size=8), 64),
    "swin_transformer_v2_cr": ("swinv2_cr_tiny_224", dict(img_size=56, window_size=7), 56),
    "davit": ("davit_tiny", {}, 56),
    "maxxvit": ("maxvit_pico_rw_256", dict(img_size=64), 64),
    "tiny_vit": ("tiny_vit_5m_224", {}, 112),
    "efficientvit_msra": ("efficientvit_m0", dict(img_size=64), 64),
    "hieradet_sam2": ("sam2_hiera_tiny", {}, 64),
    "levit": ("levit_128s", dict(img_size=64), 64),
    "mobilevit": ("mobilevit_xxs", {}, 64),
    "gcvit": ("gcvit_xxtiny", dict(img_size=64, window_size=(2, 2, 2, 2)), 64),
    "crossvit": ("crossvit_tiny_240", {}, 240),           # heads stacked at dim 0 (the batch moves)
    "efficientvim": ("efficientvim_m1", {}, 64),
}


@pytest.mark.parametrize("family,attention", [(f, "cp") for f in sorted(TIMM)] +
                         [("swin_transformer", "attnlrp"), ("levit", "attnlrp"), ("mobilevit", "attnlrp")])
def test_timm_window_families_equal_oracle(family, attention):
    timm = pytest.importorskip("timm")
    name, kw, size = TIMM[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4, **kw).to(F64).eval()
    randomize_batch_norm(model)
    with torch.no_grad():
        for m in model.modules():   # zero-initialised heads would give zero logits and maps
            if isinstance(m, nn.Linear) and m.weight.abs().max() == 0:
                m.weight.normal_(0, 0.05)
    check(model, torch.randn(2, 3, size, size, dtype=F64), torch.tensor([[0, 3], [2, 1]]), attention)
