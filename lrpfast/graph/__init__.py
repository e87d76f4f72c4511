"""The whole-model pipeline: trace (trace.py), plan the steps (plan.py, with layer_steps.py and
function_steps.py, which read node arguments through node_args.py), then run the forward and
the relevance pass (passes.py). The steps themselves are in lrpfast/nodes/.
"""
from .function_steps import (  # noqa: F401
    _CAST_STEP,
    _GATHER_STEP,
    _derived_step,
    _function_step,
    _linear_op_step,
)
from .layer_steps import (  # noqa: F401
    _CONTRACTION_FUNCTIONS,
    _attention_inputs,
    _attention_step,
    _batch_norm_step,
    _BatchNormArgs,
    _functional_batch_norm_step,
    _functional_contraction_step,
    _max_pool_step,
    _module_step,
    _sdpa_step,
)
from .node_args import (  # noqa: F401
    _bind,
    _callable,
    _constant,
    _constant_tensor,
    _is_meta_call,
    _load,
    _loader,
    _module_path,
    _module_without_inplace,
    _no_inplace,
    _permutation,
    _Ref,
    _target_name,
    ref_args,
    where,
)
from .passes import (  # noqa: F401
    forward,
    relevance,
)
from .plan import (  # noqa: F401
    Plan,
    _finish,
    _reads_input,
    build_plan,
)
from .trace import (  # noqa: F401
    _ADAPTIVE_AVG,
    _ADAPTIVE_AVG_FUNCTIONS,
    _ADAPTIVE_MAX,
    _AVGPOOL,
    _AVGPOOL_FUNCTIONS,
    _CAT_FUNCTIONS,
    _CONV,
    _DROPOUT,
    _IDENTITY_FUNCTIONS,
    _IDENTITY_METHODS,
    _LAYER_NORM_FUNCTIONS,
    _LEAVES,
    _MAXPOOL,
    _MAXPOOL_FUNCTIONS,
    _RESHAPE_FUNCTIONS,
    _RESHAPE_METHODS,
    _SDPA_FUNCTIONS,
    _TORCH_STATE,
    SUPPORTED,
    NeedsShapes,
    _optional_arguments,
    _StateGuard,
    _Tracer,
    trace,
)
