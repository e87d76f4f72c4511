"""One step per graph node of a traced model: its forward, and its relevance step.

    messages     how relevance travels between steps (Msg: DENSE, LAZY, DIVIDED) and one call's state
    base         Step, inputs, constants, shape arithmetic, the ε-rule base class
    remat        outputs recomputed in the relevance pass instead of kept (memory)
    layers       Linear/Conv with any rule, BatchNorm that is not folded
    pooling      average/adaptive pooling and means (ε), max pooling (winner-take-all)
    elementwise  sums and products of tensors
    layout       reshape, permute, cat, split, indexing, identities (no arithmetic)

Steps of other families live beside the rules that make them: lrpfast/op_rules.py (ops linear
in their inputs), derived.py, transformer.py, fusion.py, stacking.py, merged_repeat.py,
recurrent.py.
"""
from .base import (  # noqa: F401
    ConstExprStep,
    ConstStep,
    InputStep,
    MetaStep,
    Step,
    _batch_first_dim,
    _EpsilonStep,
)
from .elementwise import (  # noqa: F401
    ADD_FUNCTIONS,
    MUL_FUNCTIONS,
    AddStep,
    MulStep,
    _times_per_sample,
)
from .layers import (  # noqa: F401
    BatchNormStep,
    ContractionStep,
)
from .layout import (  # noqa: F401
    CatStep,
    GetItemStep,
    IndexStep,
    PassStep,
    PermuteStep,
    PieceStep,
    ReshapeStep,
    SelectStep,
    SplitStep,
)
from .messages import (  # noqa: F401
    DENSE,
    DIVIDED,
    LAZY,
    Call,
    Msg,
    _dense_order,
    combine,
    divide,
    materialize,
    per_sample,
    relevance_sum,
)
from .pooling import (  # noqa: F401
    _ADAPTIVE,
    _AVG,
    _MAX,
    AdaptiveAvgPoolStep,
    AvgPoolStep,
    MaxPoolStep,
    MeanStep,
)
from .remat import (  # noqa: F401
    LATER,
    RematEnv,
    take,
    value,
)
