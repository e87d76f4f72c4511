"""The step every graph node is: its forward, its relevance step; inputs, constants, shape
arithmetic; and the base of steps whose relevance rule starts with s = R / stab(z).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..ops import RelevanceError
from .messages import DIVIDED, Call, Msg, divide

# ============================================================================= base


class Step:
    """A graph node. Plan-time fields are filled by lrpfast.graph:
    index, src (the main tensor input's step, or None), inputs (the steps that receive relevance),
    deps (every step whose value the forward reads), users."""

    op = "?"                    # what the node computes, for messages
    tensor_output = True        # False for shape arithmetic (x.size(0))
    fresh_output = False        # the forward allocates its output (a ReLU may rectify it in place)
    has_denominator = False     # its relevance step starts with s = R / stab(z')
    batch_anywhere = False      # accepts inputs whose batch dim is not dim 0 (module docstring)
    # Its output is >= 0 wherever all its tensor inputs are (moves, selects, averages, sums them).
    # The plan trusts it: the z+/αβ rules skip their x- branch after such steps (graph._finish),
    # so only steps that guarantee it say so; a LayerNorm, a product with a constant or a sum with
    # a number do not.
    sign_preserving = False

    def __init__(self, name: str):
        self.name = name
        self.index = -1
        self.src: Optional[int] = None
        self.inputs: List[int] = []
        self.deps: List[int] = []
        self.users: List[int] = []

    def describe(self) -> str:
        return f"node {self.name!r} ({self.op})"

    def forward(self, env, call):
        raise NotImplementedError

    def relprop(self, msg: Msg, call: Call) -> List[Tuple[int, Msg]]:
        raise NotImplementedError

    def saved_extra(self, call: Call) -> Tuple[torch.Tensor, ...]:
        """Tensors the forward keeps for the relevance pass besides step outputs (attention
        weights): the memory scheduler counts them (lrp.LRP._profile)."""
        return ()

    def relprop_scratch(self, call: Call) -> int:
        """Bytes of temporaries this step's relevance pass holds per relevance map beyond the
        messages themselves (AttnLRP: attention-sized tensors); lrp.LRP._profile takes the largest."""
        return 0

    def denominator(self, call: Call):
        return None

    def output_of(self, call: Call):
        """This step's forward output, while the pass holds it (steps with a denominator)."""
        return None

    def zero_preserving(self, plan) -> bool:
        """The relevance this step sends to its inputs is 0 wherever an input is 0."""
        return False

    remat = False   # keeps no output for the relevance pass: recomputes it (`value`, module above)

    def recompute(self, call: Call):
        """This step's forward output again, from what the relevance pass still holds."""
        raise RelevanceError(f"LRP internal error: {self.describe()} cannot recompute its output")


class InputStep(Step):
    op = "input"

    def forward(self, env, call):
        raise AssertionError("the input is set by the pass")


class ConstStep(Step):
    """A parameter or buffer read by the graph (get_attr): a constant, it receives no relevance."""

    op = "get_attr"

    def __init__(self, name, value):
        super().__init__(name)
        self.value = value

    def forward(self, env, call):
        v = self.value
        return v.detach() if isinstance(v, torch.Tensor) else v

    def relprop(self, msg, call):
        return []   # a constant absorbs what reaches it (the output itself: a model constant in x, map 0)


class ConstExprStep(ConstStep):
    """A tensor computed from constants only (a class token expanded to the batch, a mask built
    from a buffer): a constant like the parameter it comes from, it receives no relevance. Where
    it enters a sum or a concatenation it absorbs its share like a bias."""

    def __init__(self, name, fn, args, kwargs, load, op):
        super().__init__(name, None)
        self.fn, self.args, self.kwargs, self.load, self.op = fn, args, kwargs, load, op

    def forward(self, env, call):
        args, kwargs = self.load(env, self.args, self.kwargs)
        return self.fn(*args, **kwargs)


class MetaStep(Step):
    """Shape arithmetic (x.size(0), x.shape, x.dim(), ints combined): no relevance."""

    op = "shape arithmetic"
    tensor_output = False
    batch_anywhere = True

    def __init__(self, name, fn, args, kwargs, load):
        super().__init__(name)
        self.fn, self.args, self.kwargs, self.load = fn, args, kwargs, load

    def forward(self, env, call):
        args, kwargs = self.load(env, self.args, self.kwargs)
        return self.fn(*args, **kwargs)

    def zero_preserving(self, plan):
        return True


# ============================================================================= parameter-free ε steps


class _EpsilonStep(Step):
    """A step whose relevance rule is ε with the LRP's eps/stabiliser: s = R / stab(z) over its own
    output z, then a linear map of s, then ⊙ x."""

    fresh_output = True
    has_denominator = True

    def __init__(self, name, eps, stabilizer):
        super().__init__(name)
        self.eps, self.stabilizer = eps, stabilizer

    def denominator(self, call):
        return call.saved[self.index][1], self.eps, self.stabilizer

    def output_of(self, call):
        return call.saved[self.index][1]

    def _s(self, msg, call):
        if msg.kind == DIVIDED:
            return msg.a
        return divide(msg, *call.denominator(self.index))

    def zero_preserving(self, plan):
        return True


def _batch_first_dim(d: int, bd: int) -> int:
    """Dim d of a tensor whose batch is at dim bd, once the batch is moved to dim 0."""
    return d + 1 if d < bd else d
