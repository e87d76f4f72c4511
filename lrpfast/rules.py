"""LRP rules for the layers with parameters (Linear, Conv1d/2d/3d).

A rule turns the relevance r at a layer's output into the relevance at its input, given the
layer's cached forward (x, z) and parameters, wrapped in a LayerContext. The whole-model pass
(lrpfast.lrp) asks its composite which rule each layer gets (lrpfast.composites); Epsilon is the
default. The math of each rule is DESIGN.md §1 (x+ = max(x, 0), x- = min(x, 0), likewise w, b):

    Epsilon / LRP0 / Norm   R = x ⊙ wᵀ(r / stab(z))
    ZPlus (= α1β0)          z+ = x+w+ + x-w- + b+,   R = x+ ⊙ w+ᵀs + x- ⊙ w-ᵀs,   s = r / stab(z+)
    AlphaBeta               α·(z+ part) − β·(z- part),  z- = x+w- + x-w+ + b-
    Gamma (generalised)     pw = w + γw+, nw = w + γw-; units with z > 0 divide by
                            zp = x+·pw + x-·nw + pb, units with z < 0 by zn = x+·nw + x-·pw + nb
    ZBox (z^B)              z' = x·w − low·w+ − high·w-,  R = (x−low) ⊙ w+ᵀs + (x−high) ⊙ w-ᵀs
    Flat                    R_i = Σ_j r_j / stab(n_j),  n_j = inputs in j's receptive field
    WSquare                 R_i = Σ_j w_ij² r_j / stab(Σ_i w_ij²)
    Pass                    R = r (shape-preserving layers)

What keeps them cheap (DESIGN.md §2):
- modified weights (w+, w + γw+, concatenations) are cached per layer and parameter version
  (lrpfast.modified_weights);
- z+, αβ and γ need ONE extra contraction: z = z+ + z- for every input, so z- = z − z+ and
  zn = (2+γ)·z − zp come from the layer's own z; when two branches are live the relevance step is
  one transposed contraction over concatenated ("paired") channels;
- inputs ≥ 0 (after a ReLU: ctx.x_nonnegative, else checked) drop the x- branches; γ drops its
  z < 0 branch when no relevance arrives where z ≤ 0 (ctx.output_feeds_relu, else checked);
- z^B's bound terms and the denominators of flat/w² do not depend on the batch: computed once
  per input shape;
- the elementwise steps around the contractions are the fused ops of lrpfast.ops.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn as nn

from . import contractions as C
from . import modified_weights as MW
from . import ops
from .ops import DEFAULT_EPS, RelevanceError


@dataclass
class LayerContext:
    """One layer's relevance step inputs. `forward(x, w, b)` recomputes the layer with other
    parameters or inputs (same geometry): the rules that modify W or x need it.

    z must be the layer's output for (x, weight, bias): z+/αβ/γ derive their second branch from
    it. The whole-model pass builds one LayerContext per layer and call."""

    name: str
    module: nn.Module
    kind: str  # "linear" or "conv"
    x: torch.Tensor
    z: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    stride: Tuple[int, ...] = ()
    padding: object = 0
    dilation: Tuple[int, ...] = ()
    groups: int = 1
    is_first: bool = False  # the layer that sees the model input
    x_nonnegative: bool = False  # x comes out of a ReLU: x- = 0 (DESIGN.md §2 shortcut)
    cache: dict = field(default_factory=dict)  # per-layer cache the rule may fill (modified weights)
    # z feeds only a ReLU (possibly through max pooling): relevance arriving here is 0 where z <= 0,
    # so γ's z < 0 branch is dead and Gamma.denominator can offer the cross-layer fusion. When
    # False the rules check the relevance instead (one pass over it).
    output_feeds_relu: bool = False

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        return C.forward(self, x, w, b)

    def epsilon_step(self, r, x, z, w, eps: float, stabilizer: str) -> torch.Tensor:
        """x ⊙ wᵀ(r / stab(z)) with this layer's geometry, through the fused ops."""
        if self.kind == "linear":
            return ops.linear_relprop(r, x, z, w, eps, stabilizer, where=self.name)
        stride, padding, dilation, groups = C.geometry(self)
        return ops.conv_relprop(r, x, z, w, stride, padding, dilation, groups, eps, stabilizer, where=self.name)


class Rule:
    """Base class: subclasses implement relprop(ctx, r).

    The whole-model pass may instead call `denominator(ctx)` and, with s = r / stab(z') computed
    by a fused op of the layer above, `contract(ctx, s)` (c with R = x ⊙ c, the product left to
    the next fused op) or, when that gives None, `relprop_from_s(ctx, s)`.

    input_proportional: R_in = x ⊙ (something), so R_in is 0 wherever x is 0 (lets the pass
                        run ReLUs in place and fuse across them).
    needs_raw_z:        the rule reads ctx.z itself, so the pass must not overwrite z with
                        relu(z) in place."""

    input_proportional = False
    needs_raw_z = False

    def relprop(self, ctx: LayerContext, r: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def denominator(self, ctx: LayerContext) -> Optional[Tuple[torch.Tensor, float, str]]:
        """(z', eps, stabilizer) when the rule's first step is exactly stab_div(r, z', eps,
        stabilizer) followed by `relprop_from_s`; the whole-model pass then fuses that division
        with the layer above (mul_stab_div). z' has the rows of ctx.z. None: no such fusion."""
        return None

    def contract(self, ctx: LayerContext, s: torch.Tensor) -> Optional[torch.Tensor]:
        """After denominator(): c with R = x ⊙ c, or None when R is not of that form."""
        return None

    def relprop_from_s(self, ctx: LayerContext, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ----------------------------------------------------------------------------- helpers


def _check_eps(rule: str, eps, stabilizer: str) -> Tuple[float, str]:
    ops.check_stabilizer(rule, eps, stabilizer)
    return float(eps), stabilizer


def _check_layer(rule: str, ctx: LayerContext) -> None:
    if ctx.kind not in ("linear", "conv"):
        raise RelevanceError(f"{ctx.name}: rule {rule} needs a Linear or Conv layer, got kind {ctx.kind!r}")


def input_is_nonnegative(ctx: LayerContext) -> bool:
    """x ≥ 0 everywhere: known from the graph (after a ReLU), else read once. Inside torch.compile
    only the graph's knowledge counts: a branch on x's values would be data-dependent (no full
    graph), and the signed path it falls back to is exact for any x (its x- branch is all zero)."""
    if ctx.x_nonnegative:
        return True
    if torch.compiler.is_compiling():
        return False
    x = ctx.x
    return x.numel() == 0 or bool(x.min() >= 0)


def relevance_where_nonpositive(ctx: LayerContext, r: torch.Tensor) -> bool:
    """Some relevance arrives at a unit with z ≤ 0 (K maps per sample share z). Inside
    torch.compile, True unless the graph rules it out: the two-branch path is exact for any r."""
    if ctx.output_feeds_relu:
        return False
    if torch.compiler.is_compiling():
        return True
    z = ctx.z
    b = z.shape[0]
    if b == 0:
        return False
    rk = r.reshape(b, r.shape[0] // b, *r.shape[1:])
    return bool(torch.logical_and(rk != 0, (z <= 0).unsqueeze(1)).any())


def _weights(ctx: LayerContext, key, build, extra=()):
    """A modified weight of this layer, from the cache (lrpfast.modified_weights); recomputed
    when the layer's weight or bias (or a tensor in `extra`) changes."""
    def run():
        with torch.no_grad():
            return build()
    return MW.cached(ctx.module, key, (ctx.weight, ctx.bias, *extra), run)


# Per-call state between denominator() and contract()/relprop_from_s(): tied to this call's x by
# a weak reference and its version (ctx.cache may outlive the call; it must not keep x alive).
# Missing or stale state is recomputed, never trusted. Inside torch.compile there is no state:
# `_version` is not known at trace time, and what is recomputed there (input_is_nonnegative) reads
# only the graph's static facts, so recomputing costs nothing.
_STATE = "lrpfast.rules.state"


def _stash(ctx: LayerContext, value) -> None:
    if torch.compiler.is_compiling():
        return
    ctx.cache[_STATE] = (weakref.ref(ctx.x), ctx.x._version, value)


def _peek(ctx: LayerContext, recompute):
    if torch.compiler.is_compiling():
        return recompute()
    slot = ctx.cache.get(_STATE)
    if slot is not None and slot[0]() is ctx.x and slot[1] == ctx.x._version:
        return slot[2]
    return recompute()


def _finish(ctx: LayerContext, c: torch.Tensor, signed: bool) -> torch.Tensor:
    """R from the contraction's result: x ⊙ c, or x+ ⊙ c0 + x- ⊙ c1 for paired c."""
    if signed:
        return ops.sign_split_mul_input(c, ctx.x, C.channel_dim(ctx), C.pair_groups(ctx))
    return ops.mul_input(c, ctx.x)


def _split_input(ctx: LayerContext) -> torch.Tensor:
    return ops.sign_split(ctx.x, C.channel_dim(ctx), C.pair_groups(ctx))


# ----------------------------------------------------------------------------- ε family


class Epsilon(Rule):
    """ε rule: R_in = x ⊙ Wᵀ(r / stab(z)). eps = 0 is LRP-0."""

    input_proportional = True

    def __init__(self, eps: float = DEFAULT_EPS, stabilizer: str = "sign"):
        self.eps, self.stabilizer = _check_eps(type(self).__name__, eps, stabilizer)

    def relprop(self, ctx, r):
        return ctx.epsilon_step(r, ctx.x, ctx.z, ctx.weight, self.eps, self.stabilizer)

    def denominator(self, ctx):
        return ctx.z, self.eps, self.stabilizer

    def relprop_from_s(self, ctx, s):
        return ops.mul_input(C.transpose(ctx, s, ctx.weight), ctx.x)

    input_proportional = True

    def contract(self, ctx, s):
        return C.transpose(ctx, s, ctx.weight)

    def __repr__(self):
        return f"{type(self).__name__}(eps={self.eps}, stabilizer={self.stabilizer!r})"


class LRP0(Epsilon):
    """LRP-0: the ε rule with eps = 0 (a unit with z = 0 passes no relevance)."""

    def __init__(self, stabilizer: str = "sign"):
        super().__init__(0.0, stabilizer)

    def __repr__(self):
        return f"LRP0(stabilizer={self.stabilizer!r})"


class Norm(Epsilon):
    """Normalise by the output and weight by each input's contribution: the ε rule with eps as
    a stabiliser only. On Linear/Conv it is exactly Epsilon(eps); the whole-model pass uses the
    same step for the parameter-free sums (residual additions, average pooling)."""


class Pass(Rule):
    """Relevance passes unchanged (activations, and any shape-preserving layer)."""

    def relprop(self, ctx, r):
        if tuple(r.shape[1:]) != tuple(ctx.x.shape[1:]):
            raise RelevanceError(
                f"{ctx.name}: the Pass rule needs a layer whose output has its input's shape; got input "
                f"{tuple(ctx.x.shape)} and relevance {tuple(r.shape)}")
        return r

    def __repr__(self):
        return "Pass()"


# ----------------------------------------------------------------------------- z+ and αβ


class AlphaBeta(Rule):
    """αβ rule (α − β = 1, α, β ≥ 0): R = α·(x+ ⊙ w+ᵀs+ + x- ⊙ w-ᵀs+) − β·(x+ ⊙ w-ᵀs- + x- ⊙ w+ᵀs-),
    s± = r / stab(z±). One extra contraction (z+; z- = z − z+), one transposed contraction over
    both branches."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, eps: float = DEFAULT_EPS, stabilizer: str = "sign"):
        name = type(self).__name__
        for n, v in (("alpha", alpha), ("beta", beta)):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise RelevanceError(f"{name}: {n} must be a finite number >= 0, got {v!r}")
        if abs(alpha - beta - 1.0) > 1e-9:
            raise RelevanceError(f"{name}: alpha - beta must be 1 (conservation), got alpha={alpha}, beta={beta}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.eps, self.stabilizer = _check_eps(name, eps, stabilizer)
        self.needs_raw_z = self.beta != 0  # z- = z - z+

    input_proportional = True  # x+ ⊙ c0 + x- ⊙ c1

    # z+ = x+ w+ + x- w- + b+ : one contraction (over [x+, x-] when x is signed)
    def _z_plus(self, ctx, signed: bool) -> torch.Tensor:
        bias = _weights(ctx, ("b+",), lambda: MW.positive(ctx.bias))
        if signed:
            w = _weights(ctx, ("w+|w-",), lambda: MW.in_pair(MW.positive(ctx.weight), MW.negative(ctx.weight)))
            return ctx.forward(_split_input(ctx), w, bias)
        return ctx.forward(ctx.x, _weights(ctx, ("w+",), lambda: MW.positive(ctx.weight)), bias)

    def _backward_weight(self, ctx, signed: bool) -> torch.Tensor:
        g = C.pair_groups(ctx)
        wp = lambda: MW.positive(ctx.weight)  # noqa: E731
        wn = lambda: MW.negative(ctx.weight)  # noqa: E731
        if self.beta == 0:
            if signed:
                return _weights(ctx, ("w+|w-",), lambda: MW.in_pair(wp(), wn()))
            return _weights(ctx, ("w+",), wp)
        if signed:
            return _weights(ctx, ("quad(w+,w-)", g), lambda: MW.quad(wp(), wn(), g))
        return _weights(ctx, ("w+;w-", g), lambda: MW.out_pair(wp(), wn(), g))

    def relprop(self, ctx, r):
        _check_layer(type(self).__name__, ctx)
        signed = not input_is_nonnegative(ctx)
        z_plus = self._z_plus(ctx, signed)
        if self.beta == 0:  # α = 1: one branch, a plain stabilised division
            s = ops.stab_div(r, z_plus, self.eps, self.stabilizer)
        else:
            s = ops.alpha_beta_stab_div(r, ctx.z, z_plus, C.channel_dim(ctx), C.pair_groups(ctx), self.alpha,
                                        self.beta, self.eps, self.stabilizer)
        return _finish(ctx, C.transpose(ctx, s, self._backward_weight(ctx, signed)), signed)

    def denominator(self, ctx):
        if self.beta != 0:
            return None  # two denominators
        _check_layer(type(self).__name__, ctx)
        signed = not input_is_nonnegative(ctx)
        z_plus = self._z_plus(ctx, signed)
        _stash(ctx, signed)
        return z_plus, self.eps, self.stabilizer

    def _signed(self, ctx) -> bool:
        return _peek(ctx, lambda: not input_is_nonnegative(ctx))

    def contract(self, ctx, s):
        if self.beta != 0 or self._signed(ctx):
            return None
        return C.transpose(ctx, s, self._backward_weight(ctx, False))

    def relprop_from_s(self, ctx, s):
        signed = self._signed(ctx)
        return _finish(ctx, C.transpose(ctx, s, self._backward_weight(ctx, signed)), signed)

    def __repr__(self):
        return f"AlphaBeta(alpha={self.alpha}, beta={self.beta}, eps={self.eps}, stabilizer={self.stabilizer!r})"


class ZPlus(AlphaBeta):
    """z+ rule (= α1β0, valid for signed inputs): z+ = x+w+ + x-w- + b+, R = x+ ⊙ w+ᵀs + x- ⊙ w-ᵀs."""

    def __init__(self, eps: float = DEFAULT_EPS, stabilizer: str = "sign"):
        super().__init__(1.0, 0.0, eps, stabilizer)

    def __repr__(self):
        return f"ZPlus(eps={self.eps}, stabilizer={self.stabilizer!r})"


# ----------------------------------------------------------------------------- γ


class Gamma(Rule):
    """Generalised γ rule (valid for signed inputs; DESIGN.md §1). One extra contraction gives
    zp = x+·pw + x-·nw + pb; zn = (2+γ)·z − zp. Units with z = 0 pass no relevance."""

    def __init__(self, gamma: float = 0.25, eps: float = DEFAULT_EPS, stabilizer: str = "sign"):
        if not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise RelevanceError(f"Gamma: gamma must be a finite number >= 0, got {gamma!r}")
        self.gamma = float(gamma)
        self.eps, self.stabilizer = _check_eps("Gamma", eps, stabilizer)

    # Reads z only when relevance may arrive where z <= 0, i.e. never when the pass overwrote z
    # with relu(z) (it does so only when the output feeds a ReLU: output_feeds_relu).
    input_proportional = True

    def _pw(self, ctx):
        return _weights(ctx, ("w+γw+", self.gamma), lambda: ctx.weight + self.gamma * ctx.weight.clamp(min=0))

    def _nw(self, ctx):
        return _weights(ctx, ("w+γw-", self.gamma), lambda: ctx.weight + self.gamma * ctx.weight.clamp(max=0))

    def _zp(self, ctx, signed: bool) -> torch.Tensor:
        pb = _weights(ctx, ("b+γb+", self.gamma),
                      lambda: None if ctx.bias is None else ctx.bias + self.gamma * ctx.bias.clamp(min=0))
        if signed:
            w = _weights(ctx, ("pw|nw", self.gamma), lambda: MW.in_pair(self._pw(ctx), self._nw(ctx)))
            return ctx.forward(_split_input(ctx), w, pb)
        return ctx.forward(ctx.x, self._pw(ctx), pb)

    def _backward_weight(self, ctx, signed: bool, both: bool) -> torch.Tensor:
        g = C.pair_groups(ctx)
        if not both:
            if signed:
                return _weights(ctx, ("pw|nw", self.gamma), lambda: MW.in_pair(self._pw(ctx), self._nw(ctx)))
            return self._pw(ctx)
        if signed:
            return _weights(ctx, ("quad(pw,nw)", self.gamma, g), lambda: MW.quad(self._pw(ctx), self._nw(ctx), g))
        return _weights(ctx, ("pw;nw", self.gamma, g), lambda: MW.out_pair(self._pw(ctx), self._nw(ctx), g))

    def relprop(self, ctx, r):
        _check_layer("Gamma", ctx)
        signed = not input_is_nonnegative(ctx)
        zp = self._zp(ctx, signed)
        both = relevance_where_nonpositive(ctx, r)
        if both:
            s = ops.gamma_stab_div(r, ctx.z, zp, C.channel_dim(ctx), C.pair_groups(ctx), self.gamma, self.eps,
                                   self.stabilizer)
        else:
            # r = 0 wherever z <= 0: the mask [z > 0] changes nothing, the zn branch is all zero.
            s = ops.stab_div(r, zp, self.eps, self.stabilizer)
        return _finish(ctx, C.transpose(ctx, s, self._backward_weight(ctx, signed, both)), signed)

    def denominator(self, ctx):
        if not ctx.output_feeds_relu:
            return None  # the relevance decides whether the z < 0 branch is live
        _check_layer("Gamma", ctx)
        signed = not input_is_nonnegative(ctx)
        zp = self._zp(ctx, signed)
        _stash(ctx, signed)
        return zp, self.eps, self.stabilizer

    def _signed(self, ctx) -> bool:
        return _peek(ctx, lambda: not input_is_nonnegative(ctx))

    def contract(self, ctx, s):
        if self._signed(ctx):
            return None
        return C.transpose(ctx, s, self._backward_weight(ctx, False, False))

    def relprop_from_s(self, ctx, s):
        signed = self._signed(ctx)
        return _finish(ctx, C.transpose(ctx, s, self._backward_weight(ctx, signed, False)), signed)

    def __repr__(self):
        return f"Gamma(gamma={self.gamma}, eps={self.eps}, stabilizer={self.stabilizer!r})"


# ----------------------------------------------------------------------------- z^B


def _as_bound(name: str, v) -> torch.Tensor:
    if v is None:
        raise RelevanceError(f"ZBox: the bound {name} is missing; pass low= and high= (tensors broadcastable to the "
                             "input, e.g. shape (1, C, 1, 1) per channel, or floats)")
    if isinstance(v, (int, float)):
        v = torch.tensor(float(v))
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        raise RelevanceError(f"ZBox: {name} must be a float or a floating-point tensor, got {type(v).__name__}")
    if not torch.isfinite(v).all():
        raise RelevanceError(f"ZBox: {name} holds NaN or Inf")
    return v.detach()


class ZBox(Rule):
    """z^B rule for a bounded input low ≤ x ≤ high (the first layer on pixels):
    z' = x·w − low·w+ − high·w-, R = (x − low) ⊙ w+ᵀs + (x − high) ⊙ w-ᵀs, s = r / stab(z').
    low/high broadcast to the input (torch broadcasting; e.g. (1, C, 1, 1) per channel). The bound
    terms do not depend on the batch: computed once per input shape, so no extra forward."""

    def __init__(self, low=None, high=None, eps: float = DEFAULT_EPS, stabilizer: str = "sign"):
        self.low, self.high = _as_bound("low", low), _as_bound("high", high)
        try:
            lo, hi = torch.broadcast_tensors(self.low, self.high)
        except RuntimeError as exc:
            raise RelevanceError(f"ZBox: low {tuple(self.low.shape)} and high {tuple(self.high.shape)} do not "
                                 f"broadcast together ({exc})") from None
        if bool((lo > hi).any()):
            raise RelevanceError("ZBox: low must be <= high everywhere; got low > high at "
                                 f"{int((lo > hi).sum())} of {lo.numel()} entries")
        self.eps, self.stabilizer = _check_eps("ZBox", eps, stabilizer)
        self._bounds_cache: dict = {}

    needs_raw_z = True  # z' = z - (low·w+ + high·w- + b)

    def _bounds(self, ctx) -> Tuple[torch.Tensor, torch.Tensor]:
        """low/high as (1 or B, *x.shape[1:]) in x's dtype and device, computed once per shape."""
        x = ctx.x
        compiling = torch.compiler.is_compiling()  # no cache: _version is not traceable (lrpfast.modified_weights)
        key = None if compiling else (tuple(x.shape), x.dtype, x.device, self.low._version, self.high._version)
        hit = None if compiling else self._bounds_cache.get(key)
        if hit is not None:
            return hit
        full = []
        for name, t in (("low", self.low), ("high", self.high)):
            try:
                full.append(t.to(device=x.device, dtype=x.dtype).broadcast_to(x.shape))
            except RuntimeError:
                raise RelevanceError(f"{ctx.name}: ZBox {name} of shape {tuple(t.shape)} does not broadcast to the "
                                     f"input of shape {tuple(x.shape)}") from None
        # One row shared by the batch unless a bound has a batch dimension of its own.
        per_sample = all(t.dim() < x.dim() or t.shape[0] == 1 for t in (self.low, self.high))
        out = tuple((f[:1] if per_sample else f).contiguous() for f in full)
        if not compiling:
            self._bounds_cache = {key: out}  # one input shape at a time
        return out

    def _offset(self, ctx, low, high) -> torch.Tensor:
        """low·w+ + high·w- + b (1 or B rows): z' = z − offset."""
        def build():
            off = ctx.forward(low, MW.positive(ctx.weight), None) + ctx.forward(high, MW.negative(ctx.weight), None)
            return off if ctx.bias is None else off + (ctx.bias if ctx.kind == "linear"
                                                       else ctx.bias.reshape(-1, *[1] * (off.dim() - 2)))
        key = ("zbox offset", id(self), tuple(ctx.x.shape[1:]), low.shape[0])
        return _weights(ctx, key, build, extra=(self.low, self.high))

    def _z_box(self, ctx):
        _check_layer("ZBox", ctx)
        low, high = self._bounds(ctx)
        return ctx.z - self._offset(ctx, low, high), low, high

    def _relprop_s(self, ctx, s, low, high):
        w = _weights(ctx, ("w+|w-",), lambda: MW.in_pair(MW.positive(ctx.weight), MW.negative(ctx.weight)))
        c = C.transpose(ctx, s, w)
        return ops.bounds_mul_input(c, ctx.x, low, high, C.channel_dim(ctx), C.pair_groups(ctx))

    def relprop(self, ctx, r):
        zb, low, high = self._z_box(ctx)
        return self._relprop_s(ctx, ops.stab_div(r, zb, self.eps, self.stabilizer), low, high)

    def denominator(self, ctx):
        zb, low, high = self._z_box(ctx)
        return zb, self.eps, self.stabilizer

    def relprop_from_s(self, ctx, s):
        low, high = self._bounds(ctx)
        return self._relprop_s(ctx, s, low, high)

    def __repr__(self):
        return (f"ZBox(low={tuple(self.low.shape)}, high={tuple(self.high.shape)}, eps={self.eps}, "
                f"stabilizer={self.stabilizer!r})")


# ----------------------------------------------------------------------------- flat and w²


class WSquare(Rule):
    """w² rule: R_i = Σ_j w_ij² r_j / stab(Σ_i w_ij²) (receptive field padding-aware; no bias,
    as in Montavon et al. 2017; zennit's WSquare adds b² unless zero_params=['bias']).
    Independent of x: the denominator is computed once per input shape."""

    def __init__(self, eps: float = DEFAULT_EPS, stabilizer: str = "sign"):
        self.eps, self.stabilizer = _check_eps(type(self).__name__, eps, stabilizer)

    def _weight(self, ctx) -> torch.Tensor:
        return _weights(ctx, ("w²",), lambda: ctx.weight * ctx.weight)

    def _denominator(self, ctx, w) -> torch.Tensor:
        key = (type(self).__name__ + " n", tuple(ctx.x.shape[1:]))
        return _weights(ctx, key, lambda: ctx.forward(ctx.x.new_ones((1, *ctx.x.shape[1:])), w, None))

    def relprop(self, ctx, r):
        _check_layer(type(self).__name__, ctx)
        w = self._weight(ctx)
        s = ops.stab_div(r, self._denominator(ctx, w), self.eps, self.stabilizer)  # 1-row n: shared by all rows
        return C.transpose(ctx, s, w)

    def __repr__(self):
        return f"{type(self).__name__}(eps={self.eps}, stabilizer={self.stabilizer!r})"


class Flat(WSquare):
    """Flat rule: R_i = Σ_j r_j / stab(n_j), n_j the number of inputs in unit j's receptive field
    (padding-aware; all weights 1, no bias). Independent of x and w."""

    def _weight(self, ctx) -> torch.Tensor:
        return _weights(ctx, ("ones",), lambda: torch.ones_like(ctx.weight))

    def relprop(self, ctx, r):
        _check_layer("Flat", ctx)
        if ctx.kind != "linear":
            return super().relprop(ctx, r)
        # Dense: n_j = in_features for every unit; R_i = Σ_j s_j for every i (no all-ones matrix).
        n = _weights(ctx, ("flat n", tuple(ctx.z.shape[1:])),
                     lambda: ctx.z.new_full((1, *ctx.z.shape[1:]), float(ctx.x.shape[-1])))
        s = ops.stab_div(r, n, self.eps, self.stabilizer)
        return s.sum(-1, keepdim=True).expand(r.shape[0], *ctx.x.shape[1:]).contiguous()
