"""Sums and elementwise products of tensors (residual adds, gates, layer scales).
"""
from __future__ import annotations

import operator

import torch

from ..ops import RelevanceError
from .base import ConstStep, _EpsilonStep
from .messages import DENSE, DIVIDED, LAZY, Msg, per_sample
from .remat import LATER, RematEnv, take


class AddStep(_EpsilonStep):
    """a + b (residual connections): R_i = a_i ⊙ R / stab(a + b), each summand its share. A
    constant summand (a parameter, a number) absorbs its share like a bias."""

    op = "add"
    batch_anywhere = True

    def __init__(self, name, fn, args, kwargs, load, eps, stabilizer):
        super().__init__(name, eps, stabilizer)
        self.fn, self.args, self.kwargs, self.load = fn, args, kwargs, load

    def forward(self, env, call):
        args, kwargs = self.load(env, self.args, self.kwargs)
        z = self.fn(*args, **kwargs)
        operands = [env[i] for i in self.inputs]
        for i, t in zip(self.inputs, operands):
            if isinstance(t, torch.Tensor) and t.shape != z.shape and call.steps[i].tensor_output \
                    and not isinstance(call.steps[i], ConstStep) and (t.dim() != z.dim() or t.shape[0] != z.shape[0]):
                raise RelevanceError(f"LRP: {self.describe()} broadcasts a summand of shape {tuple(t.shape)} to "
                                     f"{tuple(z.shape)} across samples; only broadcasting within a sample is "
                                     "supported")
        dims = {call.bdim.get(i, 0) for i in self.inputs if not isinstance(call.steps[i], ConstStep)}
        if len(dims) > 1:
            raise RelevanceError(f"LRP: {self.describe()} adds tensors with the batch at different dims {sorted(dims)}")
        d = dims.pop() if dims else 0
        if d:  # save batch-first views (a constant summand receives nothing: leave it)
            call.bdim[self.index] = d
            operands = [t.movedim(d, 0) if isinstance(t, torch.Tensor) and t.shape == z.shape else t for t in operands]
        call.saved[self.index] = (operands, z.movedim(d, 0) if d else z)
        return z

    def relprop(self, msg, call):
        operands, z = call.saved[self.index]
        s = self._s(msg, call)
        # a summand broadcast within the sample (x + x.sum(1, keepdim=True)) collects the share of
        # every position it was added at: the transpose of its broadcast
        steps = call.steps
        return [(i, Msg(LAZY, s if t.shape == z.shape else s.sum_to_size((s.shape[0], *t.shape[1:])), t,
                        t.shape != z.shape)) for i, t in zip(self.inputs, operands)
                if not isinstance(steps[i], ConstStep)]   # a constant summand absorbs its share


class MulStep(_EpsilonStep):
    """a * b, elementwise (broadcasting within the sample). With s = R / stab(z):

    - one factor constant (a number, a parameter, a tensor computed from parameters: ConvNeXt's
      layer scale): a diagonal linear map under the ε rule, R_x = x ⊙ c ⊙ s;
    - both factors computed (squeeze-and-excitation gates, gated MLPs): the uniform rule of
      AttnLRP (Achtibat et al. 2024), the ε rule's relevance split evenly between the factors,
      R_a = ½ a ⊙ b ⊙ s and R_b = ½ b ⊙ Σ(a ⊙ s), the sum over the dims b is broadcast along (an
      SE gate of shape (B, C, 1, 1) collects the relevance of its whole channel)."""

    op = "mul"

    def __init__(self, name, fn, args, kwargs, load, eps, stabilizer, factors):
        super().__init__(name, eps, stabilizer)
        self.fn, self.args, self.kwargs, self.load = fn, args, kwargs, load
        self.factors = factors   # per factor: its step index when computed, else None (a constant)

    def forward(self, env, call):
        args, kwargs = self.load(env, self.args, self.kwargs)
        z = self.fn(*args, **kwargs)
        values = [env[i] if i is not None else None for i in self.factors]
        if not isinstance(z, torch.Tensor):
            raise RelevanceError(f"LRP: {self.describe()} multiplies no tensor")
        for i, t in zip(self.factors, values):
            if i is not None and (t.dim() != z.dim() or t.shape[0] != z.shape[0]):
                raise RelevanceError(f"LRP: {self.describe()} broadcasts the factor of shape {tuple(t.shape)} across "
                                     f"samples or leading dims of {tuple(z.shape)}; only broadcasting within a "
                                     "sample (e.g. (B, C, 1, 1) gates) is supported")
        if all(t.shape == z.shape and t.dtype == z.dtype for i, t in zip(self.factors, values) if i is not None):
            # no computed factor broadcast: R_i = z ⊙ s / n for each (relprop), the factors not needed
            if self.remat and not call.bdim:
                call.remat[self.index] = None   # z recomputed from the factors (module doc: `value`)
                call.saved[self.index] = (None, LATER, None)
            else:
                call.saved[self.index] = (None, z, None)
            return z
        operands = list(args[:2]) + ([kwargs["other"]] if len(args) < 2 else [])
        const = [a for a, i in zip(operands, self.factors) if i is None]   # numbers, parameters
        call.saved[self.index] = (values, z, const)
        return z

    def recompute(self, call):
        args, kwargs = self.load(RematEnv(call), self.args, self.kwargs)
        return self.fn(*args, **kwargs)

    def denominator(self, call):
        z = call.saved[self.index][1]
        return (take(call, self.index) if z is LATER else z), self.eps, self.stabilizer

    def output_of(self, call):
        z = call.saved[self.index][1]
        return None if z is LATER else z

    def relprop(self, msg, call):
        values, z, const = call.saved[self.index]
        s = self._s(msg, call)                      # R / stab(z): K*B rows
        later = z is LATER
        if later:   # recomputed by `denominator`, unless a step above divided already
            z = call.dens[self.index][0] if self.index in call.dens else take(call, self.index)
        if values is None:
            n = sum(i is not None for i in self.factors)
            if later and n > 1 and msg.kind != DIVIDED and s.shape == z.shape:
                # the recomputed z is dropped here: each factor's (1/n) z ⊙ s is formed once, in s's
                # buffer (our division's), one dense message for all (not z kept till the last reads it)
                s = s.mul_(1.0 / n).mul_(z)
                return [(i, Msg(DENSE, s, None, False)) for i in self.factors if i is not None]
            # Each computed factor t of z = Π factors gets (1/n) t ⊙ (Π others) ⊙ s = (1/n) z ⊙ s:
            # one message (s/n, z) for all of them, read by each recipient's own division
            computed = [i for i in self.factors if i is not None]
            if len(computed) > 1:
                s = s.mul_(1.0 / len(computed)) if msg.kind != DIVIDED else s * (1.0 / len(computed))
            return [(i, Msg(LAZY, s, z, len(computed) == 1)) for i in computed]
        b = z.shape[0]
        computed = [(i, t) for i, t in zip(self.factors, values) if i is not None]
        share = 1.0 / len(computed)                 # uniform rule: ½ each for two computed factors
        out = []
        for j, (i, t) in enumerate(computed):
            c = s
            for cst in const:   # a factor held constant may be per sample (derived.py): K maps each
                c = _times_per_sample(c, cst, b) if isinstance(cst, torch.Tensor) and cst.dim() == z.dim() \
                    and cst.shape[0] == b else c * cst
            for jj, (_, other) in enumerate(computed):
                if jj != j:                         # the other computed factor, per sample
                    c = _times_per_sample(c, other, b)
            if share != 1.0:
                c.mul_(share)                       # c is fresh: the other factor multiplied it
            dims = [d for d in range(1, z.dim()) if t.shape[d] == 1 and z.shape[d] != 1]
            if dims:
                c = c.sum(dims, keepdim=True)
            out.append((i, Msg(LAZY, c, t, True)))
        return out


def _times_per_sample(c: torch.Tensor, t: torch.Tensor, b: int) -> torch.Tensor:
    """c (K*B rows) ⊙ t (B rows), t broadcast over the K maps of its sample."""
    if not b or c.shape[0] == b:
        return c * t
    out = per_sample(c, b) * t.unsqueeze(1)
    return out.reshape(c.shape[0], *out.shape[2:])


MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul)


ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
