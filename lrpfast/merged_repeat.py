"""`x.repeat_interleave(r, dim=0)`: each row repeated r times in place, a merged batch (B*r rows,
the batch outermost: lrpfast/merged_batch.py). GCViT gives every window of a sample its global
query this way: (B, ...) -> (B*nW, ...), next to the windows folded into the batch by a view.

The op copies values, so the relevance of a row is the sum of its copies' (the transpose of the
repeat, no division: as expand/repeat in the op table). Messages carry K maps per row (row i*K + k),
so the copies of row i are rows (i*r + j)*K + k, j < r. Along other dims, or with a count per row,
the node goes on to the op table (or is refused there)."""
from __future__ import annotations

import torch

from .nodes import DENSE, Msg, Step, materialize
from .ops import RelevanceError




class RepeatRowsStep(Step):
    sign_preserving = True

    def __init__(self, name, fn, args, kwargs, load, op):
        super().__init__(name)
        self.fn, self.args, self.kwargs, self.load, self.op = fn, args, kwargs, load, op

    def forward(self, env, call):
        x = env[self.src]
        args, kwargs = self.load(env, self.args, self.kwargs)
        z = self.fn(*args, **kwargs)
        rep = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(rep, torch.Tensor) and rep.numel() > 1 and bool((rep != rep.reshape(-1)[0]).any()):
            raise RelevanceError(f"LRP: {self.describe()} repeats the rows along dim 0 by counts per row; only one "
                                 "count for all rows keeps each sample's rows together (a merged batch)")
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or not isinstance(z, torch.Tensor) \
                or z.dim() != x.dim() or z.shape[0] % x.shape[0] or z.shape[1:] != x.shape[1:]:
            raise RelevanceError(f"LRP: {self.describe()} turns {tuple(getattr(x, 'shape', ()))} into "
                                 f"{tuple(getattr(z, 'shape', ()))}; expected each row repeated alike along dim 0")
        call.saved[self.index] = (x.shape[0], z.shape[0] // x.shape[0])
        return z

    def relprop(self, msg, call):
        n, r = call.saved[self.index]
        a = materialize(msg)   # (a pending factor need not be this step's output: take the product)
        k = a.shape[0] // (n * r)
        return [(self.src, Msg(DENSE, a.reshape(n, r, k, *a.shape[1:]).sum(1).view(n * k, *a.shape[1:]), None, True))]

    def zero_preserving(self, plan):
        return plan.users_zero_preserving(self.index)
