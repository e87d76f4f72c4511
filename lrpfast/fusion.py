"""Regions of the traced graph that are one linear map of one tensor, explained as one step.

lrpfast/graph/ gives every fx node a step of its own. Where a few nodes together are a linear map of
one computed tensor x with constant operands, one ε step over the whole region,

    R_x = x ⊙ Jᵀ(R / stab(z)),      z the region's output, J its Jacobian in x,

equals the node-by-node rules at ε = 0 (each inner division cancels against the next product) and
costs one division instead of one per node; the inner tensors are neither kept for the relevance
pass nor given relevance of their own (they appear in no per-layer record). The forward replays the
region's own nodes, so z is what the model computes, bit for bit. Two regions are recognised:

- The rotary embedding of Hugging Face models (Llama, Qwen, Mistral, Gemma):
      z = x * cos + cat(-x[..., h:], x[..., :h], -1) * sin          (cos, sin constants)
  Jᵀs = s ⊙ cos + Pᵀ(s ⊙ sin) with Pᵀu = cat(u[..., h:], -u[..., :h]): two products and two
  slice updates, where the nodes would take six relevance steps (two slices scattered into zeros).
- A chain of products with factors held constant and casts, with one normaliser among them (the
  RMSNorm written out: (x.float() * rsqrt(mean(x²) + eps)).to(dtype) * weight): Jᵀs is s times
  the product of the factors, summed over the dims x is broadcast along.

(The gather of the explained position, moved in front of the LM head and the other row-wise
layers, is lrpfast/graph/row_gather.py.)
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional

import torch
import torch.fx as fx

from .nodes import (DENSE as DENSE_KIND, DIVIDED, LAZY, LATER, Msg, RematEnv, Step, _EpsilonStep, _times_per_sample,
                    divide, take)
from .derived import FWD as FWD_ROLE
from .ops import RelevanceError

_ADD = (operator.add, torch.add)
_MUL = (operator.mul, torch.mul)
_NEG = (operator.neg, torch.neg)
_CAT = (torch.cat, torch.concat, torch.concatenate)
CASTS = ("to", "float", "double", "half", "bfloat16", "type_as", "type")


def _is(node, functions=(), methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        try:
            return node.target in functions
        except TypeError:
            return False
    return node.op == "call_method" and node.target in methods


class Region:
    """Nodes [..., root] replaced by one step at the root; `inner` get Elided steps."""

    def __init__(self, kind: str, root: fx.Node, nodes: List[fx.Node], x: fx.Node, **info):
        self.kind, self.root, self.nodes, self.x, self.info = kind, root, nodes, x, info
        self.inner = nodes[:-1]


def _only_used_in(nodes, region) -> bool:
    return all(set(n.users) <= region for n in nodes)


def _rotary(root: fx.Node, computed) -> Optional[Region]:
    """root = x * cos + cat(-x[..., h:], x[..., :h], dim=-1) * sin (either order of each op)."""
    if not _is(root, _ADD, ("add",)) or len(root.args) != 2 or root.kwargs:
        return None
    for a, b in (root.args, root.args[::-1]):
        if not (_is(a, _MUL, ("mul",)) and _is(b, _MUL, ("mul",))) or a.kwargs or b.kwargs or len(a.args) != 2 \
                or len(b.args) != 2:
            continue
        for cat, sin in (b.args, b.args[::-1]):
            if not _is(cat, _CAT) or not isinstance(sin, fx.Node) or sin in computed:
                continue
            tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
            dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
            if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or dim != -1:
                continue
            neg, g1 = tensors
            if not _is(neg, _NEG, ("neg",)) or len(neg.args) != 1 or neg.kwargs:
                continue
            g2 = neg.args[0]
            if not (_is(g1, (operator.getitem,)) and _is(g2, (operator.getitem,))):
                continue
            x = g1.args[0]
            if g2.args[0] is not x or x not in computed:
                continue
            i1, i2 = g1.args[1], g2.args[1]
            if not (isinstance(i1, tuple) and isinstance(i2, tuple) and len(i1) == 2 == len(i2)
                    and i1[0] is Ellipsis and i2[0] is Ellipsis and isinstance(i1[1], slice)
                    and isinstance(i2[1], slice)):
                continue
            h = i1[1].stop
            if not (type(h) is int and h > 0 and i1[1].start in (None, 0) and i1[1].step in (None, 1)
                    and i2[1] == slice(h, None, None)):
                continue
            if x not in a.args or len(set(a.args)) != 2:
                continue
            cos = a.args[1] if a.args[0] is x else a.args[0]
            if not isinstance(cos, fx.Node) or cos in computed:
                continue
            nodes = [g1, g2, neg, cat, a, b, root]
            region = set(nodes)
            if len(region) != len(nodes) or not _only_used_in(nodes[:-1], region):
                continue
            order = {n: i for i, n in enumerate(root.graph.nodes)}
            nodes.sort(key=order.__getitem__)
            return Region("rotary", root, nodes, x, cos=cos, sin=sin, half=h)
    return None


def _chain_link(node: fx.Node, computed, held) -> Optional[fx.Node]:
    """The carrier (the computed operand) of a product with a constant or held factor, or of a
    cast; None if the node is neither."""
    if _is(node, _MUL, ("mul",)) and len(node.args) == 2 and not node.kwargs:
        carried = [a for a in node.args if isinstance(a, fx.Node) and a in computed and a not in held.get(node, ())]
        if len(carried) == 1 and node.args[0] is not node.args[1]:
            return carried[0]
        return None
    if node.op == "call_method" and node.target in CASTS and node.args and isinstance(node.args[0], fx.Node):
        rest = list(node.args[1:]) + list(node.kwargs.values())
        if node.target != "type_as" and any(isinstance(a, fx.Node) for a in rest):
            return None
        if node.kwargs.get("copy") or node.kwargs.get("memory_format") is not None:
            return None
        return node.args[0] if node.args[0] in computed else None
    return None


def _chains(graph: fx.Graph, derivation) -> List[Region]:
    computed, held = derivation.info, derivation.held
    out = []
    taken = set()
    for node in graph.nodes:
        if node in taken or derivation.needs_step(node) or not _is(node, _MUL, ("mul",)):
            continue
        carrier = _chain_link(node, computed, held)
        if carrier is None:
            continue
        nodes = [node]
        while len(nodes[-1].users) == 1:
            nxt = next(iter(nodes[-1].users))
            if derivation.needs_step(nxt) or _chain_link(nxt, computed, held) is not nodes[-1]:
                break
            nodes.append(nxt)
        muls = [n for n in nodes if _is(n, _MUL, ("mul",))]
        if len(nodes) < 2 or len(muls) < 2 or not any(held.get(n) for n in muls):
            continue
        # The normaliser's own nodes (pow, mean, add, rsqrt: computed from the carrier alone) and a
        # cast producing the carrier join the region when nothing outside reads them: one step
        # computes the whole norm (its relevance is the chain's either way).
        extra, stack = set(), [f for n in muls for f in held.get(n, ())]
        while stack:
            f = stack.pop()
            if f not in extra and f not in taken and derivation.needs_step(f) == FWD_ROLE:
                extra.add(f)
                stack.extend(f.all_input_nodes)
        if carrier.op == "call_method" and carrier.target in CASTS and not derivation.needs_step(carrier) \
                and carrier.args and isinstance(carrier.args[0], fx.Node) and carrier.args[0] in computed \
                and carrier not in taken:
            extra.add(carrier)
        inside = set(nodes)
        while True:
            drop = {e for e in extra if not set(e.users) <= inside | extra}
            if not drop:
                break
            extra -= drop
        if carrier in extra:
            carrier = carrier.args[0]
        order = {n: i for i, n in enumerate(graph.nodes)}
        members = sorted(inside | extra, key=order.__getitem__)
        taken.update(members)
        out.append(Region("scale", nodes[-1], members, carrier, chain=nodes))
    return out


def find(gm: fx.GraphModule, derivation) -> Dict[fx.Node, Region]:
    """node -> its region, for the inner nodes and the root of every region found."""
    computed = derivation.info
    regions = []
    for node in gm.graph.nodes:
        r = _rotary(node, computed)
        if r is not None:
            regions.append(r)
    inside = {n for r in regions for n in r.nodes}
    regions += [r for r in _chains(gm.graph, derivation) if not inside.intersection(r.nodes)]
    return {n: r for r in regions for n in r.nodes}


# ============================================================================= steps


class Elided(Step):
    """A node inside a region: computed by the region's step (its forward replays it), no step of
    its own in either pass."""

    tensor_output = True

    def __init__(self, name, root_name):
        super().__init__(name)
        self.op = f"inside {root_name!r}"

    def forward(self, env, call):
        return None

    def relprop(self, msg, call):
        return []

    def zero_preserving(self, plan):
        return True


class _RegionStep(_EpsilonStep):
    """Replays the region's nodes (program: (slot, fn, args, kwargs) in graph order, the root last),
    keeps x and z (and what `keep` names), and takes one ε step over the region."""

    def __init__(self, name, program, load, eps, stabilizer, op):
        super().__init__(name, eps, stabilizer)
        self.program, self.load, self.op = program, load, op

    def _replay(self, env, keep=()):
        """z, and the values of the inner slots in `keep` (before they are cleared)."""
        inner = self.program[:-1]
        try:
            for slot, fn, args, kwargs in inner:
                a, k = self.load(env, args, kwargs)
                env[slot] = fn(*a, **k)
            _, fn, args, kwargs = self.program[-1]
            a, k = self.load(env, args, kwargs)
            z = fn(*a, **k)
            return z, {slot: env[slot] for slot in keep}
        finally:
            for slot, *_ in inner:
                env[slot] = None

    def zero_preserving(self, plan):
        return True

    def _z(self, call):
        """z for the relevance step: kept, or recomputed (Step.remat; `take` drops it from call.remat)."""
        z = call.saved[self.index][1]
        if z is LATER:
            return call.dens[self.index][0] if self.index in call.dens else take(call, self.index)
        return z

    def denominator(self, call):
        return self._z(call), self.eps, self.stabilizer

    def output_of(self, call):
        z = call.saved[self.index][1]
        return None if z is LATER else z


def _mult(c: torch.Tensor, f, b: int) -> torch.Tensor:
    """c (K*B rows) times a factor f broadcast over the K maps of a sample when it is per sample."""
    if isinstance(f, torch.Tensor) and f.dim() == c.dim() and f.shape[0] == b and c.shape[0] != b and b > 1:
        return _times_per_sample(c, f, b)
    return c * f


class RotaryStep(_RegionStep):
    """HF's rotary embedding, z = x ⊙ cos + rotate_half(x) ⊙ sin: module docstring. z is made
    contiguous ((B, heads, L, D), what attention reads), the relevance to x comes in x's layout
    (the (B, L, heads, D) of the projection it is a view of): neither side copies a layout."""

    def __init__(self, name, program, load, eps, stabilizer, op, cos_sin, half):
        super().__init__(name, program, load, eps, stabilizer, op)
        self.cos_sin, self.half = cos_sin, half

    def _direct(self, x, cos, sin) -> bool:
        return (not torch.compiler.is_compiling() and x.dtype == cos.dtype == sin.dtype
                and cos.shape == sin.shape and cos.dim() <= x.dim()
                and all(m in (1, n) for m, n in zip(cos.shape[::-1], x.shape[::-1])))

    def forward(self, env, call):
        x = env[self.src]
        cos, sin = self.cos_sin(env)
        h = self.half
        direct = isinstance(x, torch.Tensor) and x.shape[-1] == 2 * h and isinstance(cos, torch.Tensor) \
            and isinstance(sin, torch.Tensor) and self._direct(x, cos, sin)
        z = self._rotate(x, cos, sin) if direct else self._replay(env)[0]
        if not isinstance(z, torch.Tensor) or z.shape != x.shape or x.shape[-1] != 2 * h:
            raise RelevanceError(f"LRP: {self.describe()} turns {tuple(x.shape)} into "
                                 f"{tuple(getattr(z, 'shape', ()))}: a rotary embedding must keep x's shape")
        if direct and self.remat and not call.bdim:
            call.remat[self.index] = None   # z recomputed from x in the relevance pass (nodes: `value`)
            call.saved[self.index] = (x, LATER, cos, sin)
        else:
            call.saved[self.index] = (x, z, cos, sin)
        return z

    def _rotate(self, x, cos, sin):
        """the region's own arithmetic, in three passes: x*cos, then -x2*sin and +x1*sin added"""
        h = self.half
        z = torch.mul(x, cos, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
        z[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
        z[..., h:].addcmul_(x[..., :h], sin[..., h:])
        return z

    def recompute(self, call):
        x, _, cos, sin = call.saved[self.index]
        return self._rotate(x, cos, sin)

    def relprop(self, msg, call):
        x, _, cos, sin = call.saved[self.index]
        s = msg.a if msg.kind == DIVIDED else divide(msg, self._z(call), self.eps, self.stabilizer)
        b, h = x.shape[0], self.half
        if isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor) and self._direct(x, cos, sin) \
                and (s.shape[0] == b or cos.shape[0] == 1 or cos.dim() < s.dim()):
            # Jᵀs = s ⊙ cos + Pᵀ(s ⊙ sin), Pᵀu = cat(u[..., h:], -u[..., :h])
            c = torch.empty_like(x) if s.shape == x.shape else torch.empty_like(s)
            torch.mul(s, cos, out=c)
            c[..., :h].addcmul_(s[..., h:], sin[..., h:])
            c[..., h:].addcmul_(s[..., :h], sin[..., :h], value=-1)
        else:
            c = _mult(s, cos, b)
            u = _mult(s, sin, b)
            c[..., :h] += u[..., h:]
            c[..., h:] -= u[..., :h]
        return [(self.src, Msg(LAZY, c if c.dtype == x.dtype else c.to(x.dtype), x, True))]


class ScaleChainStep(_RegionStep):
    """x times factors held constant (parameters, numbers, a normaliser), with casts between."""

    def __init__(self, name, program, load, eps, stabilizer, op, factors, keep):
        super().__init__(name, program, load, eps, stabilizer, op)
        self.factors = factors   # (env, inner values kept) -> the factors' values
        self.keep = keep         # inner slots holding factors (the normaliser)

    def forward(self, env, call):
        x = env[self.src]
        z, kept = self._replay(env, self.keep)
        if not isinstance(z, torch.Tensor) or z.dim() != x.dim() or z.shape[0] != x.shape[0]:
            raise RelevanceError(f"LRP: {self.describe()} turns {tuple(x.shape)} into "
                                 f"{tuple(getattr(z, 'shape', ()))}: only broadcasting within a sample is supported")
        if self.remat and not call.bdim:
            call.remat[self.index] = None   # z replayed from x in the relevance pass (nodes: `value`)
            call.saved[self.index] = (x, LATER, self.factors(env, kept), kept)
        else:
            call.saved[self.index] = (x, z, self.factors(env, kept))
        return z

    _tail = None

    def recompute(self, call):
        """The region's nodes again from x and the kept normaliser: only those the output needs
        once the kept slots are given (an RMSNorm: x * r, the casts, * weight; not mean(x²))."""
        tail = self._tail
        if tail is None:
            live, tail = {None}, []
            for entry in reversed(self.program):
                if entry[0] in live and entry[0] not in self.keep:
                    tail.append(entry)
                    fx.node.map_aggregate((entry[2], entry[3]), lambda a: live.add(a.i) if hasattr(a, "i") else None)
            tail = self._tail = tail[::-1]
        x, _, _, kept = call.saved[self.index]
        env = RematEnv(call, kept)
        env[self.src] = x
        for slot, fn, args, kwargs in tail:
            a, k = self.load(env, args, kwargs)
            z = fn(*a, **k)
            if slot is not None:
                env[slot] = z
        return z

    def relprop(self, msg, call):
        x, _, factors = call.saved[self.index][:3]
        z = self._z(call)
        s = msg.a if msg.kind == DIVIDED else divide(msg, z, self.eps, self.stabilizer)
        if z.shape == x.shape and z.dtype == x.dtype:
            # a diagonal map: x ⊙ Jᵀs = x ⊙ (Π factors) ⊙ s = z ⊙ s, no product to take
            return [(self.src, Msg(LAZY, s, z, msg.kind != DIVIDED))]
        b = x.shape[0]
        c = s
        fresh = msg.kind != DIVIDED   # s is this step's own temporary: scaled in place
        for f in factors:
            per_map = isinstance(f, torch.Tensor) and f.dim() == c.dim() and f.shape[0] == b and c.shape[0] != b
            if fresh and isinstance(f, torch.Tensor) and not per_map and f.dim() <= c.dim() \
                    and all(m in (1, n) for m, n in zip(f.shape[::-1], c.shape[::-1])) \
                    and torch.result_type(c, f) == c.dtype:
                c = c.mul_(f)
            elif fresh and not isinstance(f, torch.Tensor):
                c = c.mul_(f)
            else:
                c, fresh = _mult(c, f, b), True
        if c is s and not fresh:
            c = s.clone()
        if c.shape[1:] != x.shape[1:]:
            c = c.sum_to_size((c.shape[0], *x.shape[1:]))
        return [(self.src, Msg(LAZY, c if c.dtype == x.dtype else c.to(x.dtype), x, True))]


def build(region: Region, node: fx.Node, plan, index, add, ref, load, callable_of, eps, stabilizer):
    """The step of a region's node: Elided for the inner nodes, the region's step at the root."""
    if node is not region.root:
        step = add(Elided(node.name, region.root.name), node)
        step.deps = []
        return step
    program = [(index[n] if n is not node else None, callable_of(n), ref(n.args), ref(n.kwargs)) for n in region.nodes]
    members = set(region.nodes)
    external = []
    for n in region.nodes:
        fx.node.map_arg((n.args, n.kwargs), lambda a: external.append(a) if a not in members else None)
    value = lambda env, a: env[index[a]] if isinstance(a, fx.Node) else a  # noqa: E731
    if region.kind == "rotary":
        cos, sin = region.info["cos"], region.info["sin"]
        step = RotaryStep(node.name, program, load, eps, stabilizer, "rotary embedding (one linear step)",
                          lambda env: (value(env, cos), value(env, sin)), region.info["half"])
    else:
        held = plan.derived.held
        fac = []
        for n in region.info["chain"]:
            if _is(n, _MUL, ("mul",)):
                carrier = _chain_link(n, plan.derived.info, held)
                fac.extend(a for a in n.args if a is not carrier)
        keep = tuple(dict.fromkeys(index[a] for a in fac if isinstance(a, fx.Node) and a in members))
        names = ", ".join(f"{n.name}" for n in region.nodes)
        step = ScaleChainStep(node.name, program, load, eps, stabilizer,
                              f"products with constant factors and casts ({names}) as one linear step",
                              lambda env, kept: [kept[index[a]] if isinstance(a, fx.Node) and a in members
                                                 else value(env, a) for a in fac], keep)
    add(step, node, region.x)
    step.deps = list(dict.fromkeys(index[a] for a in external if isinstance(a, fx.Node)))
    return step


# ============================================================================= casts to the same dtype


def same_dtype_cast(step_cls):
    """A LinearOpStep subclass for casts (x.to(dtype), x.float(), ...): where the cast returned its
    input itself (already that dtype: HF's RMSNorm upcasts float32 to float32), relevance passes
    to it as it came, without the vector-Jacobian product of the COPY rule."""

    class CastStep(step_cls):
        def relprop(self, msg, call):
            saved = call.saved[self.index]
            xs, z = saved[2], saved[3]
            if len(xs) == 1 and z is xs[0] and len(self.inputs) == 1:
                return [(self.inputs[0], msg)]
            return super().relprop(msg, call)

    CastStep.__name__ = CastStep.__qualname__ = "CastStep"
    return CastStep


def direct_gather(step_cls):
    """A LinearOpStep subclass for x.gather(dim, index) with a constant index (lrpfast.hf picks
    the explained row with one): the COPY rule's Jᵀ is a scatter-add into zeros, taken directly
    instead of through autograd."""

    class GatherStep(step_cls):
        def relprop(self, msg, call):
            args, kwargs, xs, z, carries = call.saved[self.index]
            if len(xs) == 1 and len(self.inputs) == 1 and len(args) == 3 and not kwargs and args[0] is xs[0] \
                    and isinstance(args[1], int) and isinstance(args[2], torch.Tensor) \
                    and not torch.compiler.is_compiling():
                g = msg.a if msg.kind == DENSE_KIND else None
                if g is None:
                    from .nodes import materialize
                    g = materialize(msg)
                x, idx = xs[0], args[2]
                if g.shape == idx.shape and g.dtype == x.dtype:
                    out = torch.zeros_like(x, memory_format=torch.contiguous_format)
                    return [(self.inputs[0], Msg(DENSE_KIND, out.scatter_add_(args[1], idx, g), None, True))]
            return super().relprop(msg, call)

    GatherStep.__name__ = GatherStep.__qualname__ = "GatherStep"
    return GatherStep


# ============================================================================= after the steps are built


def relax(plan) -> None:
    """Plan-wide savings, once the steps exist (before graph._finish):

    - `x.contiguous()` read only by attention steps (HF's q/k/v before SDPA): the input itself,
      not a copy (those steps take any strides); the copy would be kept for the relevance pass
      beside the tensor it copies."""
    from . import nodes as N
    from .transformer import ScaledDotProductAttentionStep

    steps = plan.steps
    users = [[] for _ in steps]
    for s in steps:
        for d in s.deps:
            users[d].append(s)
    for s in steps:
        if isinstance(s, N.PassStep) and s.op == "Tensor.contiguous" and not s.identity and users[s.index] \
                and all(isinstance(u, ScaledDotProductAttentionStep) for u in users[s.index]):
            s.identity = True


def rematerialize(plan) -> None:
    """After graph._finish: the steps whose output the forward need not keep for the relevance
    pass (Step.remat; lrpfast/nodes/remat.py): a product of computed factors
    (SwiGLU's silu(g) * u: Linear outputs, elementwise activations of them), an RMSNorm-like chain
    (ScaleChainStep) of a kept x and constants, the rotary embedding of a kept x; each read only by
    Linears (which keep LATER for their x) or as query/key by AttnLRP attention steps that accept it.
    Recomputing costs a few elementwise passes in the relevance pass; the forward keeps one
    layer-width tensor fewer per such step (SwiGLU: one of the MLP's width)."""
    from . import nodes as N
    from .transformer import ScaledDotProductAttentionStep as SDPA

    steps = plan.steps
    consts = lambda s, allowed: all(d in allowed or type(steps[d]) is N.ConstStep for d in s.deps)  # noqa: E731

    def kept(j):            # a Linear's output: its relevance step keeps z
        return isinstance(steps[j], N.ContractionStep) and steps[j].kind == "linear"

    def cheap(j):           # kept, or an elementwise activation of a kept tensor
        s = steps[j]
        if kept(j):
            return True
        return (type(s) is N.PassStep and not s.identity and not s.is_relu and not s.inplace and s.src is not None
                and kept(s.src) and consts(s, {s.src}))

    def readers_take_later(i, p, found):
        """Every reader of step i (p's output, through identity steps) keeps LATER: into found."""
        us = [steps[u] for u in steps[i].users]
        if not us or i == plan.output:
            return False
        for u in us:
            if isinstance(u, N.ContractionStep) and u.kind == "linear" and u.src == i and u.load_wb is None \
                    and u.deps == [i] and i == p:
                found.append((u, None))
            elif isinstance(u, SDPA) and getattr(SDPA, "takes_later", False) and u.attention == "attnlrp" \
                    and i in (u.query_src, u.key_src) and i != u.value_src and u.query_src != u.key_src:
                found.append((u, 0 if i == u.query_src else 1))
            elif type(u) is N.PassStep and u.identity and u.src == i and u.deps == [i] \
                    and readers_take_later(u.index, p, found):
                continue
            else:
                return False
        return True

    for s in steps:
        i = s.index
        if isinstance(s, N.MulStep):
            ok = all(f is None or cheap(f) for f in s.factors) and consts(s, set(f for f in s.factors if f is not None))
        elif isinstance(s, (ScaleChainStep, RotaryStep)):
            ok = s.src is not None and (isinstance(s, RotaryStep) or consts(s, {s.src}))
        else:
            continue
        found = []
        if not (ok and readers_take_later(i, i, found)):
            continue
        s.remat = True
        for u, which in found:
            if which is None:
                u.remat_x = True
            else:
                qk = list(u.remat_qk)
                qk[which] = i
                u.remat_qk = tuple(qk)


# ============================================================================= constants computed once


def cache_constants(plan) -> None:
    """Tensors the forward computes from parameters and buffers only (ConstExprStep: masks, the
    rotary cos/sin tables) are computed again only when what they come from changed: each such
    step keeps its last value with a key made of the versions of the parameters/buffers it reads
    (an in-place write bumps it: lrpfast.hf writes the attention mask per call) and the shapes it
    reads. Steps reading anything computed from the input (DerivedStep, CP's held softmax) are
    never cached."""
    from . import nodes as N

    steps = plan.steps
    ok = [False] * len(steps)
    for s in steps:
        if type(s) is N.ConstStep or isinstance(s, N.MetaStep):
            ok[s.index] = True
        elif type(s) is N.ConstExprStep and all(ok[d] for d in s.deps):
            ok[s.index] = True
            s.__class__ = _CachedConstExprStep
            s.sources = [(d, type(steps[d]) is N.ConstStep) for d in s.deps]
            s.cached = None
    # A cached constant read only by other cached constants (the steps building a mask, the
    # rotary tables before their last slice) keeps its key, not its value: while its readers' keys
    # match, nobody needs it; a reader that must recompute gets it recomputed (_Thunk).
    users = [[] for _ in steps]
    for s in steps:
        for d in s.deps:
            users[d].append(s)
    for s in steps:
        if isinstance(s, _CachedConstExprStep):
            s.drop = bool(users[s.index]) and s.index != plan.output \
                and all(isinstance(u, _CachedConstExprStep) for u in users[s.index])


_FAKE = torch._C._TorchDispatchModeKey.FAKE


def _cached_const_expr_step():
    from .nodes import ConstExprStep

    class _Thunk:
        """A dropped cached constant (`drop`): its function and loaded arguments, for a reader
        that has to recompute."""

        __slots__ = ("fn", "args", "kwargs")

        def __init__(self, fn, args, kwargs):
            self.fn, self.args, self.kwargs = fn, args, kwargs

    def force(a):
        f = lambda v: force(v) if isinstance(v, _Thunk) else v  # noqa: E731
        if isinstance(a, _Thunk):
            return a.fn(*fx.node.map_aggregate(a.args, f), **fx.node.map_aggregate(a.kwargs, f))
        return fx.node.map_aggregate(a, f)

    class _CachedConstExprStep(ConstExprStep):
        sources: list = []
        cached = None
        drop = False   # read by cached constants only: keeps its key, not its value (cache_constants)

        def forward(self, env, call):
            if torch.compiler.is_compiling() or torch._C._get_dispatch_mode(_FAKE) is not None:
                return super().forward(env, call)   # (LRP._profile's shape-only forward: no cache)
            key = []
            steps = call.steps
            for d, const in self.sources:
                if const:
                    v = steps[d].value
                    key.append((id(v), getattr(v, "_version", None)))
                elif getattr(steps[d], "drop", False) and steps[d].cached is not None:
                    key.append(("key", steps[d].cached[0]))   # a dropped one: its own key
                else:   # a cached constant (its object: the same while cached) or shape arithmetic
                    key.append(env[d] if not isinstance(env[d], torch.Tensor) else id(env[d]))
            key = tuple(key)
            hit = self.cached
            try:
                if hit is not None and hit[0] == key:
                    if not self.drop:
                        return hit[1]
                    return _Thunk(self.fn, *self.load(env, self.args, self.kwargs))
            except Exception:  # noqa: BLE001 (an unhashable/uncomparable shape value: compute)
                pass
            args, kwargs = self.load(env, self.args, self.kwargs)
            value = self.fn(*force(args), **force(kwargs))
            self.cached = (key, None if self.drop else value)
            return value

    return _CachedConstExprStep


_CachedConstExprStep = _cached_const_expr_step()
