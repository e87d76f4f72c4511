"""Steps that move, select or pass elements without arithmetic: reshape, permute, cat, split
pieces, indexing, identities. Their relevance step is the transpose of the move.
"""
from __future__ import annotations

import torch

from .. import merged_batch
from ..ops import RelevanceError
from .base import ConstStep, Step, _batch_first_dim
from .messages import DENSE, LAZY, Msg, materialize
from .remat import RematEnv

# ============================================================================= relevance passes unchanged


class PassStep(Step):
    """Elementwise activations (ReLU, ReLU6, LeakyReLU, GELU, SiLU, Tanh, Sigmoid, ...), Dropout,
    Identity: relevance passes unchanged (LRP's pass rule). A ReLU runs in place on its input when
    the plan allows it (lrpfast.graph: the input's producer tolerates it and no relevance can
    arrive where the ReLU outputs 0). Passes a DIVIDED message too (max pooling above a layer)."""

    batch_anywhere = True

    def __init__(self, name, fn, args, kwargs, load, op, zero_at_zero, is_relu=False, identity=False):
        super().__init__(name)
        self.fn, self.args, self.kwargs, self.load, self.op = fn, args, kwargs, load, op
        self.zero_at_zero, self.is_relu, self.identity = zero_at_zero, is_relu, identity
        self.preserves_values = identity  # output values == input values (identity, contiguous, ...)
        self.inplace = False
        self.nonnegative_output = False

    def forward(self, env, call):
        if self.identity:
            return env[self.src]
        if self.is_relu:
            x = env[self.src]
            return torch.relu_(x) if self.inplace else torch.relu(x)
        args, kwargs = self.load(env, self.args, self.kwargs)
        return self.fn(*args, **kwargs)

    def relprop(self, msg, call):
        return [(self.src, msg)]

    def recompute(self, call):
        """(an elementwise activation not run in place: fusion.rematerialize checks)"""
        args, kwargs = self.load(RematEnv(call), self.args, self.kwargs)
        return self.fn(*args, **kwargs)

    def zero_preserving(self, plan):
        return (self.identity or self.zero_at_zero) and plan.users_zero_preserving(self.index)


class ReshapeStep(Step):
    """view / reshape / flatten / unflatten / squeeze / unsqueeze / contiguous / nn.Flatten: the
    relevance takes the input's shape back. The batch may be merged with the dims after it and
    split again (window attention: lrpfast/merged_batch.py)."""

    sign_preserving = True

    def __init__(self, name, fn, args, kwargs, load, op):
        super().__init__(name)
        self.fn, self.args, self.kwargs, self.load, self.op = fn, args, kwargs, load, op

    def forward(self, env, call):
        x = env[self.src]
        args, kwargs = self.load(env, self.args, self.kwargs)
        y = self.fn(*args, **kwargs)
        why = "gives no tensor" if not isinstance(y, torch.Tensor) else \
            merged_batch.check_rows(x.shape, y.shape, call.batch)
        if why:
            raise RelevanceError(f"LRP: {self.describe()} turns {tuple(x.shape)} into "
                                 f"{tuple(getattr(y, 'shape', ()))}: {why}")
        call.saved[self.index] = (x, y.shape[0])
        return y

    def relprop(self, msg, call):
        x, n_out = call.saved[self.index]
        n_in, shape = x.shape[0], x.shape[1:]
        if msg.kind == LAZY:
            # The pending factor is the tensor the message was made for (an activation above may
            # have changed it), not this step's input: both take the input's shape back.
            return [(self.src, Msg(LAZY, merged_batch.regroup(msg.a, n_out, n_in, shape),
                                   msg.x.reshape(n_in, *shape), msg.owned))]
        r = materialize(msg)
        return [(self.src, Msg(DENSE, merged_batch.regroup(r, n_out, n_in, shape), None,
                               msg.owned or msg.kind != DENSE))]

    def zero_preserving(self, plan):
        return plan.users_zero_preserving(self.index)


class PermuteStep(Step):
    """permute / transpose: relevance permuted back. The batch dimension may move (a
    sequence-first block); the messages stay batch-first on both sides."""

    sign_preserving = True

    batch_anywhere = True

    def __init__(self, name, fn, args, kwargs, load, op, perm_of):
        super().__init__(name)
        self.fn, self.args, self.kwargs, self.load, self.op = fn, args, kwargs, load, op
        self.perm_of = perm_of  # (ndim, args, kwargs) -> permutation

    def forward(self, env, call):
        x = env[self.src]
        args, kwargs = self.load(env, self.args, self.kwargs)
        perm = self.perm_of(x.dim(), args, kwargs)
        d_in = call.bdim.get(self.src, 0)
        d_out = perm.index(d_in)
        if d_out:
            call.bdim[self.index] = d_out
        # batch-first message above -> batch-first message below, as one permutation
        out_layout = list(range(1, d_out + 1)) + [0] + list(range(d_out + 1, len(perm)))  # movedim(0, d_out)
        above = [out_layout[p] for p in [perm.index(i) for i in range(len(perm))]]      # then the inverse
        back = [above[i] for i in [d_in] + [j for j in range(len(perm)) if j != d_in]]    # then movedim(d_in, 0)
        call.saved[self.index] = (call.batch_first(self.src, x), back)
        return x.permute(perm)

    def relprop(self, msg, call):
        x, back = call.saved[self.index]
        if msg.kind == LAZY:   # the pending factor permuted alike (ReshapeStep.relprop)
            return [(self.src, Msg(LAZY, msg.a.permute(back), msg.x.permute(back), msg.owned))]
        r = materialize(msg)
        return [(self.src, Msg(DENSE, r.permute(back), None, msg.owned or msg.kind != DENSE))]

    def zero_preserving(self, plan):
        return plan.users_zero_preserving(self.index)


class CatStep(Step):
    """torch.cat along a non-batch dimension: each input gets its slice of the relevance. With the
    batch off dim 0 (a sequence-first transformer prepending a class token: cat(dim=0) of (1, B, E)
    and (L, B, E)), every computed input has it at the same dim; the relevance pass works on
    batch-first views."""

    sign_preserving = True

    op = "cat"
    fresh_output = True
    batch_anywhere = True

    def __init__(self, name, dim, load_list):
        super().__init__(name)
        self.dim, self.load_list = dim, load_list

    def forward(self, env, call):
        xs = self.load_list(env)
        d = self.dim % xs[0].dim()
        bds = {call.bdim.get(i, 0) for i in self.inputs if not isinstance(call.steps[i], ConstStep)}
        if len(bds) > 1:
            raise RelevanceError(f"LRP: {self.describe()} concatenates tensors with the batch at different dims "
                                 f"{sorted(bds)}")
        bd = bds.pop() if bds else 0
        if d == bd:
            raise RelevanceError(f"LRP: {self.describe()} concatenates along the batch dimension")
        y = torch.cat(xs, d)
        if bd:
            call.bdim[self.index] = bd
            xs, d = [x.movedim(bd, 0) for x in xs], _batch_first_dim(d, bd)
        call.saved[self.index] = (xs, d)
        return y

    def relprop(self, msg, call):
        xs, d = call.saved[self.index]
        src = msg.a if msg.kind == LAZY else materialize(msg)
        owned = msg.owned or msg.kind != DENSE
        out, start = [], 0
        for i, x in zip(self.inputs, xs):
            n = x.shape[d]
            part = src.narrow(d, start, n)
            # the pending factor's slice, not the input x (an activation above the cat changes it)
            out.append((i, Msg(LAZY, part, msg.x.narrow(d, start, n), owned) if msg.kind == LAZY
                        else Msg(DENSE, part, None, owned)))
            start += n
        return out

    def zero_preserving(self, plan):
        return plan.users_zero_preserving(self.index)


class SplitStep(Step):
    """torch.chunk / torch.split (and the methods): a tuple of views. It carries no relevance
    itself: each element taken from it (x.chunk(2, 1)[0]) is a PieceStep on the source tensor."""

    op = "split"
    # Tensors, not shape arithmetic: what is computed from the pieces must not be taken for a
    # constant (lrpfast/graph/ classifies nodes by their inputs). Relevance never comes here: the
    # pieces send theirs to the source directly.

    batch_anywhere = True   # it only makes the tuple; the pieces check where the batch is
    unbind = False          # torch.unbind: the pieces are selections (SelectStep), not narrow views

    def __init__(self, name, fn, args, kwargs, load, what):
        super().__init__(name)
        self.fn, self.args, self.kwargs, self.load, self.op = fn, args, kwargs, load, what

    def forward(self, env, call):
        args, kwargs = self.load(env, self.args, self.kwargs)
        return self.fn(*args, **kwargs)

    def relprop(self, msg, call):
        return []


class SelectStep(Step):
    """Element `item` of x.unbind(dim) along a non-batch dim: x.select(dim, item). The batch may
    sit elsewhere in x (timm's attention unbinds q, k, v from a (3, B, H, N, D) tensor); the piece
    then has it first again. Relevance goes back into its slice of a map of x's shape."""

    op = "getitem (unbind)"
    batch_anywhere = True
    sign_preserving = True

    def __init__(self, name, split_index, item, dim):
        super().__init__(name)
        self.split_index, self.item, self.dim = split_index, item, dim

    def forward(self, env, call):
        x, parts = env[self.src], env[self.split_index]
        bd = call.bdim.get(self.src, 0)
        d = self.dim % x.dim()
        if d == bd:
            raise RelevanceError(f"LRP: {self.describe()} unbinds the batch dimension")
        call.bdim[self.index] = bd - 1 if d < bd else bd   # explicit, also when 0 (MeanStep)
        call.saved[self.index] = (tuple(call.batch_first(self.src, x).shape[1:]), _batch_first_dim(d, bd))
        return parts[self.item]

    def relprop(self, msg, call):
        shape, d = call.saved[self.index]
        a = materialize(msg)
        full = a.new_zeros((a.shape[0], *shape))
        full.select(d, self.item).copy_(a)
        return [(self.src, Msg(DENSE, full, None, True))]

    def zero_preserving(self, plan):
        return plan.users_zero_preserving(self.index)


class PieceStep(Step):
    """Element `item` of a chunk/split of the source x along a non-batch dim: a narrow view of x,
    whose relevance goes back into its place in a map of x's shape (zeros elsewhere)."""

    sign_preserving = True

    op = "getitem (chunk/split)"

    def __init__(self, name, split_index, item, dim):
        super().__init__(name)
        self.split_index, self.item, self.dim = split_index, item, dim

    def forward(self, env, call):
        x, parts = env[self.src], env[self.split_index]
        d = self.dim % x.dim()
        if d == 0:
            raise RelevanceError(f"LRP: {self.describe()} splits along the batch dimension")
        piece = parts[self.item]
        start = sum(p.shape[d] for p in parts[:self.item % len(parts)])
        call.saved[self.index] = (x, d, start)
        return piece

    def relprop(self, msg, call):
        x, d, start = call.saved[self.index]
        # The product pending in a LAZY message is taken on the piece (small) before the scatter:
        # its factor is the tensor the message was made for, which need not be a piece of x.
        a = materialize(msg)
        full = a.new_zeros((a.shape[0], *x.shape[1:]))
        full.narrow(d, start, a.shape[d]).copy_(a)
        return [(self.src, Msg(DENSE, full, None, True))]

    def zero_preserving(self, plan):
        return plan.users_zero_preserving(self.index)


class GetItemStep(Step):
    """(output, indices)[0] of a max pooling with return_indices=True."""

    sign_preserving = True

    op = "getitem"
    batch_anywhere = True

    def __init__(self, name, item):
        super().__init__(name)
        self.item = item
        self.tensor_output = True

    def forward(self, env, call):
        return env[self.src][self.item]

    def relprop(self, msg, call):
        return [(self.src, msg)] if self.item == 0 else []

    def zero_preserving(self, plan):
        return self.item != 0 or plan.users_zero_preserving(self.index)


class IndexStep(Step):
    """Basic indexing x[idx] (ints, slices, None, Ellipsis) that keeps the batch dimension whole:
    the relevance is scattered back into zeros of the input's shape (K*B rows; the index's batch
    entry is a full slice, so it applies to the K maps of every sample alike). A pending product
    is taken on the selection first: its factor is the tensor the message was made for, which an
    activation between this step and that layer may have changed (so it is not x[idx])."""

    sign_preserving = True

    op = "getitem (slicing)"
    batch_anywhere = True

    def __init__(self, name, index, load):
        super().__init__(name)
        self.index_arg, self.load = index, load

    def canonical(self, x, idx, d):
        """(idx with one entry per consumed dim, Ellipsis expanded; the output's batch dim),
        checked to keep the batch dim d whole."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        for e in idx:
            if not (e is None or e is Ellipsis or isinstance(e, (slice, int, torch.SymInt))) or isinstance(e, bool):
                raise RelevanceError(f"LRP: {self.describe()} indexes with {type(e).__name__} "
                                     f"({e!r}): advanced (tensor, list or bool) indexing has no relevance rule; "
                                     "only ints, slices, None and ... are supported")
        consumed = sum(1 for e in idx if e is not None and e is not Ellipsis)
        if sum(1 for e in idx if e is Ellipsis) > 1 or consumed > x.dim():
            raise RelevanceError(f"LRP: {self.describe()}: index {idx!r} does not fit a tensor of shape "
                                 f"{tuple(x.shape)}")
        out = []
        for e in idx:
            out.extend([slice(None)] * (x.dim() - consumed) if e is Ellipsis else [e])
        pos = out_dims = 0
        entry, out_bd = slice(None), None
        for j, e in enumerate(out):
            if e is None:
                out_dims += 1
                continue
            if pos == d:
                entry, out_bd = e, out_dims
                out[j] = slice(None)  # all K*B rows of a message, not the forward's B
                break
            out_dims += 0 if isinstance(e, (int, torch.SymInt)) else 1
            pos += 1
        if out_bd is None:  # the batch dim is among the trailing dims the index leaves whole
            out_bd = out_dims + d - pos
        if not (isinstance(entry, slice) and entry.start in (None, 0) and entry.step in (None, 1)
                and (entry.stop is None or entry.stop >= x.shape[d])):
            raise RelevanceError(f"LRP: {self.describe()} indexes {idx!r}, which does not keep the batch dimension "
                                 f"(dim {d}) whole: x[:, ...] is supported")
        return tuple(out), out_bd

    def forward(self, env, call):
        x = env[self.src]
        args, _ = self.load(env, self.index_arg, {})
        d = call.bdim.get(self.src, 0)
        idx, out_bd = self.canonical(x, args[0], d)
        if out_bd:
            call.bdim[self.index] = out_bd
        y = x[idx]
        # everything selected, nothing added or dropped (HF's hidden[:, slice(0, None), :]): the
        # relevance passes as it is
        whole = y.shape == x.shape and len(idx) <= x.dim() and all(
            isinstance(e, slice) and e.start in (None, 0) and e.step in (None, 1) and (e.stop is None or e.stop >= n)
            for e, n in zip(idx, x.shape))
        call.saved[self.index] = (x, idx, d, out_bd, whole)
        return y

    def relprop(self, msg, call):
        x, idx, d, out_bd, whole = call.saved[self.index]
        if whole:
            return [(self.src, msg)]
        a = materialize(msg)   # the pending product on the selection, before the scatter (PieceStep)
        shape = list(x.shape)
        shape[d] = a.shape[0]
        full = a.new_zeros(shape)
        full[idx] = a.movedim(0, out_bd) if out_bd else a
        if d:
            full = full.movedim(d, 0)
        return [(self.src, Msg(DENSE, full, None, True))]

    def zero_preserving(self, plan):
        return plan.users_zero_preserving(self.index)
