"""Whole-model LRP: `LRP(model)(x, target)`.

    lrp = lrpfast.LRP(model)                      # traces once; the model is never modified
    R = lrp(x)                                    # relevance at the input, shaped like x
    R = lrp(x, target=torch.tensor([[3, 5]] * B)) # K targets per sample: (B, K, *x.shape[1:])
    e = lrp.explain(x, keep_layers=True)          # + logits, targets, per-layer relevances and
                                                  #   Σ R per layer and sample (where it is lost)

One forward (no autograd), then one relevance pass in reverse graph order (lrpfast/graph/,
lrpfast/nodes/). K targets share that forward: the relevance carries K*B rows, x and z are
shared. `batch_size` or `memory_budget` split a large batch into chunks.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from . import checks, compiled, graph, merged_batch, nodes as N, ops
from .ops import DEFAULT_EPS, RelevanceError
from .rules import Epsilon

INITS = ("logit", "onehot")


@dataclass
class Explanation:
    """What `LRP.explain` returns.

    relevance     relevance at the input: x's shape, or (B, K, *x.shape[1:]) for (B, K) targets
    logits        the model output (B, classes)
    targets       the explained classes: (B,) or (B, K)
    layers        node name -> relevance at that node's input (a tuple for add/cat nodes with
                  several non-constant inputs; constants such as a class token get none), or
                  None unless keep_layers=True. A BatchNorm folded into the Linear/Conv before it
                  has no entry of its own (that layer's entry covers both).
    conservation  node name -> Σ R per sample, (B,) or (B, K): at each node's input, plus
                  "output" (the initial relevance) and the input's node name. Biases and
                  stabilisers absorb some relevance: a drop between two nodes shows where.
    """

    relevance: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    layers: Optional[Dict[str, object]]
    conservation: Dict[str, torch.Tensor]


def _parse_budget(v) -> Optional[int]:
    """None, or a positive finite number of bytes / a size string ("2GiB", "512MB", "1.5G"):
    anything else is a RelevanceError naming memory_budget and what it may be."""
    return checks.parse_budget(v)


def _rule_resolver(composite, eps, stabilizer, params):
    default = Epsilon(eps, stabilizer)
    if composite is None:
        if params:
            raise TypeError(f"LRP: unexpected keyword arguments {sorted(params)} (composite parameters need a "
                            "composite)")
        return lambda name, module, ctx: default, "epsilon"
    if not callable(getattr(composite, "rule_for", None)) or params:
        # A name, a user mapping (dict / callable / list) or a Composite with parameters.
        try:
            from . import composites
        except ImportError as exc:
            raise RelevanceError(f"LRP: composite {composite!r} needs lrpfast.composites, which is not available "
                                 f"({exc})") from exc
        if isinstance(composite, str) or not callable(getattr(composite, "rule_for", None)):
            # LRP's own eps/stabilizer are the composite's unless given for it
            params = {"eps": eps, "stabilizer": stabilizer, **params}
        composite = composites.get(composite, **params)
    label = getattr(composite, "name", None) or type(composite).__name__

    def rule_for(name, module, ctx):
        rule = composite.rule_for(name, module, ctx)
        if rule is None:
            return default
        if not callable(getattr(rule, "relprop", None)):
            raise TypeError(f"LRP: composite {label!r} gave {rule!r} for layer {name!r}; expected a Rule")
        return rule

    return rule_for, label


def _targets(target, logits: torch.Tensor):
    """(B, K) long targets and whether the caller asked for K maps per sample."""
    b, classes = logits.shape
    if target is None:
        return logits.argmax(1, keepdim=True), False
    target = checks.as_target(target)  # strings, bools, floats, beyond-int64 lists: a clear error naming target
    if isinstance(target, int):
        if not 0 <= target < classes:  # before torch.full: 10**30 would overflow int64 there
            raise RelevanceError(f"LRP: target {target} is out of range for {classes} classes "
                                 f"(valid: 0..{classes - 1})")
        t, multi = torch.full((b, 1), target, dtype=torch.long, device=logits.device), False
    else:
        t = target
        if t.is_meta:
            raise RelevanceError("LRP: target is on the meta device (no data); give class indices on the CPU or "
                                 "the model's device")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"LRP: target must hold integer class indices, got dtype {t.dtype}")
        t = t.to(device=logits.device, dtype=torch.long)
        if t.dim() == 0:
            t, multi = t.reshape(1, 1).expand(b, 1), False
        elif t.dim() == 1:
            t, multi = t.unsqueeze(1), False
        elif t.dim() == 2:
            multi = True
        else:
            raise RelevanceError(f"LRP: target must be an int, (B,) or (B, K); got shape {tuple(t.shape)}")
        if t.shape[0] != b or t.shape[1] == 0:
            raise RelevanceError(f"LRP: target of shape {tuple(target.shape) if isinstance(target, torch.Tensor) else t.shape} "
                                 f"does not fit the batch of {b} samples (expected (B,) or (B, K), K >= 1)")
    bad = (t < 0) | (t >= classes)
    if torch.compiler.is_compiling():
        # A Python branch on the data would break the graph: check inside it instead.
        torch._assert_async(torch.logical_not(bad.any()), "LRP: target out of range")
    elif bool(bad.any()):
        raise RelevanceError(f"LRP: target {t[bad][0].item()} is out of range for {classes} classes "
                             f"(valid: 0..{classes - 1})")
    return t, multi


def _overflow_hint(dtype: torch.dtype, logits: Optional[torch.Tensor] = None,
                   model: Optional[nn.Module] = None) -> str:
    """Why the map of a finite x may not be finite: a parameter or buffer holding NaN/Inf (named),
    the model's own output already not finite (the samples named), float16's range."""
    if model is not None:
        bad = [n for n, t in (*model.named_parameters(), *model.named_buffers())
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            return f"; the model's parameter(s)/buffer(s) {bad[:4]} hold NaN/Inf"
    if isinstance(logits, torch.Tensor) and logits.dim() >= 1 and not bool(torch.isfinite(logits).all()):
        bad = (~torch.isfinite(logits.reshape(logits.shape[0], -1))).any(1).nonzero().flatten().tolist()
        return (f"; the model's own output (the logits) is not finite for sample(s) {bad[:8]}: the model computes "
                "NaN/Inf from this input (e.g. an attention row with every key masked, an overflow)")
    if dtype == torch.float16:
        return ("; float16 tops out at 65504 and relevance divided by a denominator near eps overflows it: "
                "use bfloat16 or float32, or a larger eps")
    return "; a model parameter or buffer may hold NaN/Inf"


class LRP:
    """Layer-wise Relevance Propagation for any traceable model.

    model            an nn.Module (traced with torch.fx once; never modified: BatchNorms are folded
                     into copies of the weights, recomputed if the model's parameters change)
    eps, stabilizer  the ε rule's stabiliser: stab(z) = z + eps·sign(z) ("sign", sign(0) = +1) or
                     z + eps ("plus", the seed's); used by the default rule and by the parameter-free
                     steps (residual adds, average pooling, unfolded BatchNorm, LayerNorm) and inside
                     attention (its value and output projections: composites do not reach them)
    init             initial relevance: the target logit ("logit", the seed's choice) or 1 ("onehot")
    composite        None (ε everywhere), a name or user mapping for
                     lrpfast.composites.get(composite, eps=eps, stabilizer=stabilizer, **composite_params),
                     or an object with rule_for(name, module, ctx) -> Rule or None (None: the ε rule).
                     rule_for is asked once per Linear/Conv call when the model is traced, with the
                     module's qualified name (e.g. "features.0"); ctx.name is the graph node's name,
                     and ctx has the layer's geometry, weight, bias (BatchNorm folded in), is_first
                     and x_nonnegative, but no tensors x, z yet.
    batch_size       at most this many samples per chunk
    memory_budget    bytes (or "2GiB", "512MB") one chunk may use, estimated per input shape
    per_shape        trace at the first call for each input shape, never shape-agnostically (for
                     wrappers whose forward reads per-call data besides x, lrpfast/hf.py)
    attention        the rule of attention blocks (nn.MultiheadAttention, F.scaled_dot_product_attention):
                     "cp" (the attention weights held constant, relevance to the values only; Ali et al.
                     2022) or "attnlrp" (through the softmax to queries and keys too; Achtibat et al.
                     2024). lrpfast/transformer.py has both rules.
    compile          False (eager), True (torch.compile with inductor), a backend name or a dict of
                     torch.compile arguments: from the second call per input shape, the forward and
                     relevance pass run as one compiled graph (one compile per shape; lrpfast/compiled.py)
    """

    def __init__(self, model: nn.Module, eps: float = DEFAULT_EPS, stabilizer: str = "sign", init: str = "logit",
                 composite=None, batch_size: Optional[int] = None, memory_budget: Union[int, str, None] = None,
                 attention: str = "cp", per_shape: bool = False, compile: Union[bool, str, dict] = False,
                 **composite_params):
        if not isinstance(model, nn.Module):
            raise TypeError(f"LRP: model must be an nn.Module, got {type(model).__name__}")
        if type(model).__module__.startswith("transformers.") and hasattr(model, "config"):
            # its forward takes token ids or several inputs by keyword and returns an output object
            raise RelevanceError(f"LRP: {type(model).__name__} is a Hugging Face transformers model: explain it with "
                                 "lrpfast.hf.LRP(model)(input_ids, attention_mask=...) (or pixel_values=...)")
        ops.check_stabilizer("LRP", eps, stabilizer)
        if init not in INITS:
            raise RelevanceError(f"LRP: init must be one of {INITS}, got {init!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                       or batch_size < 1):
            raise RelevanceError(f"LRP: batch_size must be a positive int or None, got {batch_size!r}")
        self.model = model
        self.eps, self.stabilizer, self.init = float(eps), stabilizer, init
        self.batch_size = batch_size
        self.memory_budget = _parse_budget(memory_budget)
        rule_for, self.composite_name = _rule_resolver(composite, self.eps, stabilizer, composite_params)
        self._modules = list(model.named_modules())
        checks.check_explained_function(self._modules)
        self._traced_modes = checks.training_modes(model)
        self._build = lambda example=None: graph.build_plan(model, rule_for, self.eps, stabilizer, attention, example)
        self._shape_plans: Optional[dict] = None   # input shape -> plan, for forwards that branch on shapes
        with torch.no_grad():
            try:
                if per_shape:   # the caller sets data the forward reads besides x per call (lrpfast/hf.py)
                    raise graph.NeedsShapes(f"LRP: {type(model).__name__} is traced per input shape (per_shape=True)")
                self._plan = self._build()
            except graph.NeedsShapes as exc:
                # The forward branches on shapes (timm's patch/padding checks): trace per input
                # shape at the call (lrpfast/shape_trace.py); data-dependent branches fail there.
                self._plan, self._shape_plans, self._symbolic_error = None, {}, exc
        self.attention = attention
        self._per_sample: dict = {}
        opts = compiled.options(compile)
        self._compiled = None if opts is None else compiled.compile_pass(self._passes_fast, opts)

    @property
    def plan(self) -> graph.Plan:
        """The traced plan: the only one, or, for a model traced per input shape, the last used."""
        if self._plan is None:
            raise RelevanceError(f"LRP: {type(self.model).__name__}'s forward branches on the input's shape, so it is "
                                 "traced per input shape at the first call: call lrp(x) once (or lrp.prepare(x)) "
                                 f"first. ({self._symbolic_error})")
        return self._plan

    def _verify_key(self, x) -> tuple:
        # a shape-agnostic plan is the same graph for every batch size: check it once per sample shape
        shape = tuple(x.shape) if self._shape_plans is not None else tuple(x.shape[1:])
        return (shape, x.dtype, x.device)

    def _verify(self, plan, x, logits) -> None:
        """Once per plan and input shape: the traced graph's logits are model(x). A trace that fixed
        something the forward computes from the data, or anything else that makes the graph another
        function, is refused here instead of explained (one extra forward per new shape)."""
        key = self._verify_key(x)
        if torch.compiler.is_compiling() or key in plan.verified:
            return
        if not bool(torch.isfinite(logits).all()):
            return   # a NaN parameter: the map's NaN/Inf check reports it, with the right hint
        with torch.no_grad():
            want = self.model(x)
        if not isinstance(want, torch.Tensor) or want.shape != logits.shape:
            raise RelevanceError(f"LRP: model(x) returns {type(want).__name__} of shape "
                                 f"{tuple(getattr(want, 'shape', ()))}, the traced graph {tuple(logits.shape)}")
        tol = 1e-6 if x.dtype == torch.float64 else 1e-3 if x.dtype == torch.float32 else 5e-2
        scale = want.abs().max().clamp_min(1e-30)
        gap = ((want - logits).abs().max() / scale).item()
        if not gap <= tol:
            if self._shape_plans is not None:
                self._shape_plans.pop((tuple(x.shape), x.dtype, x.device), None)
            raise RelevanceError(f"LRP: the graph traced from {type(self.model).__name__} does not reproduce model(x) "
                                 f"for input shape {tuple(x.shape)} (largest difference {gap:.2e} of the largest "
                                 "logit): its forward depends on something the trace fixed (data-dependent Python, "
                                 "state, randomness); LRP refuses to explain another function")
        plan.verified.add(key)

    def prepare(self, x: torch.Tensor) -> graph.Plan:
        """The plan for x's shape, traced now if the model needs one per shape."""
        if self._shape_plans is None:
            return self.plan
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._shape_plans:
            if len(self._shape_plans) >= 16:   # batch sizes come and go: keep a few
                self._shape_plans.pop(next(iter(self._shape_plans)))
            with torch.no_grad():
                self._shape_plans[key] = self._build(x)
        self._plan = self._shape_plans[key]
        return self._plan

    def __repr__(self):
        return f"LRP({type(self.model).__name__}, composite={self.composite_name}, eps={self.eps}, " \
               f"stabilizer={self.stabilizer!r}, init={self.init!r}, attention={self.attention!r})\n" \
               f"{self.plan.describe()}"

    @property
    def node_names(self):
        """The graph nodes, in forward order (keys of Explanation.layers / .conservation)."""
        return [s.name for s in self.plan.steps if s.tensor_output and not isinstance(s, (N.ConstStep,))]

    def rules(self) -> Dict[str, object]:
        """node name -> the rule of each Linear/Conv node."""
        return {s.name: s.rule for s in self.plan.steps if isinstance(s, N.ContractionStep)}

    # ------------------------------------------------------------------------- calls

    def __call__(self, x: torch.Tensor, target=None) -> torch.Tensor:
        return self._explain(x, target, record=False, keep_layers=False).relevance

    def explain(self, x: torch.Tensor, target=None, keep_layers: bool = False) -> Explanation:
        return self._explain(x, target, record=True, keep_layers=keep_layers)

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"LRP: x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"LRP: x must be a floating-point tensor, got {x.dtype}")
        if x.dim() < 2 or x.shape[0] == 0:
            raise RelevanceError(f"LRP: x must be a batch (B, ...) with B >= 1, got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise RelevanceError(f"LRP: x is empty (shape {tuple(x.shape)}): every dimension must be >= 1")
        if x.is_meta:
            raise RelevanceError("LRP: x is on the meta device (a shape without data); give x real data on the "
                                 "model's device")
        ref = next(iter(self.model.parameters()), None)
        if ref is not None and (ref.dtype != x.dtype or ref.device != x.device):
            self._refuse_meta_tensors()
            raise RelevanceError(f"LRP: x is {x.dtype} on {x.device}, but the model's parameters are {ref.dtype} on "
                                 f"{ref.device}; move one to the other")

    def _refuse_meta_tensors(self):
        """On a failure path only (walking every tensor costs 0.3 ms a call on resnet50): a
        parameter or buffer on the meta device, named."""
        for prefix, m in self._modules:
            for kind in ("_parameters", "_buffers"):
                for n, p in getattr(m, kind).items():
                    if p is not None and p.is_meta:
                        name = f"{prefix}.{n}" if prefix else n
                        raise RelevanceError(f"LRP: the model's parameter or buffer {name!r} is on the meta device (no "
                                             "data); materialise the model first (model.to_empty(device=...) and "
                                             "load_state_dict)")

    # ------------------------------------------------------------------------- scheduling
    # On CPU, a tensor the allocator hands out from fresh pages costs about as much again as the
    # arithmetic on it (page faults; DESIGN.md §2), and glibc returns every block of 32 MiB or
    # more to the OS when it is freed. So, on CPU, the pass keeps its tensors below HEAP_TENSOR
    # bytes where that is cheap: it runs the relevance pass over a few targets at a time (all of
    # them share the one forward), and splits a large batch into chunks when the memory this saves
    # outweighs reading the weights once more per chunk. Other devices run one pass.
    HEAP_TENSOR = 10 << 20

    def _profile(self, x):
        """(Σ bytes of all step outputs and of what steps keep besides (attention weights), bytes
        of the largest output) for one sample, the bytes of the weights, and the largest scratch
        one step's relevance pass holds per map (AttnLRP's attention-sized temporaries): from a
        forward on shapes only (FakeTensorMode), once per input shape."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if self._shape_plans is not None:
            return None   # a plan per input shape (its batch size fixed): no per-sample profile
        if key not in self._per_sample:
            sizes, extra, scratch = [], [], []
            try:
                for s in self.plan.steps:  # refresh folded weights with real tensors, not fake ones
                    if isinstance(s, N.ContractionStep):
                        s.params()
            except RuntimeError:
                self._refuse_meta_tensors()
                raise
            x1 = x[:1]
            try:
                from torch._subclasses.fake_tensor import FakeTensorMode

                # a wrong-shaped x fails here first: torch would log the meta kernel's traceback at
                # ERROR level before the clean error of the call itself (issue 14)
                with torch.no_grad(), checks.quiet_fake_tensor_errors(), \
                        FakeTensorMode(allow_non_fake_inputs=True) as mode:
                    graph.forward(self.plan, mode.from_tensor(x1), sizes=sizes, extra=extra, scratch=scratch)
            except Exception:  # noqa: BLE001 (an op without a fake kernel: measure for real)
                sizes, extra, scratch = [], [], []
                try:
                    with torch.no_grad():
                        graph.forward(self.plan, x1, sizes=sizes, extra=extra, scratch=scratch)
                except Exception:  # noqa: BLE001 (bad input: the call itself reports it, with x's shape)
                    return None
            weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
            self._per_sample[key] = (sum(sizes) + sum(extra), max(sizes, default=0), weights, max(scratch, default=0))
        return self._per_sample[key]

    def _schedule(self, x, k: int):
        """(samples per chunk, targets per relevance pass)."""
        b = x.shape[0]
        fixed = b if self.batch_size is None else min(b, self.batch_size)
        cpu = x.device.type == "cpu"
        if torch.compiler.is_compiling() or not (cpu or self.memory_budget is not None):
            return fixed, k
        profile = self._profile(x)
        if profile is None:  # the input does not fit the model: the call will say so
            return fixed, k
        total, largest, weights, scratch = profile
        chunk = fixed
        if self.batch_size is None and self.memory_budget is not None:
            # outputs kept, plus a few relevance maps per target, or one step's scratch if larger
            per_sample = total + k * max(3 * largest, scratch + largest)
            chunk = max(1, min(b, self.memory_budget // max(1, per_sample)))
        elif self.batch_size is None and cpu and b * largest > self.HEAP_TENSOR:
            n = -(-b // max(1, self.HEAP_TENSOR // max(1, largest)))
            if b * total >= (n - 1) * weights:  # fresh activations saved vs weights read again
                chunk = -(-b // n)
        group = k
        if cpu and k > 1:
            group = max(1, min(k, self.HEAP_TENSOR // max(1, chunk * largest)))
        return chunk, group

    def _chunk(self, x, k: int) -> int:
        return self._schedule(x, k)[0]

    def _explain(self, x, target, record: bool, keep_layers: bool) -> Explanation:
        if not torch.compiler.is_compiling():
            checks.check_explained_function(self._modules, self._traced_modes)   # hooks added, train() since
        self._check_input(x)
        b = x.shape[0]
        t_all = target
        if target is not None and not isinstance(target, (int, torch.Tensor)):
            t_all = checks.as_target(target)  # lists, numpy arrays: split per chunk like a tensor
        if isinstance(t_all, torch.Tensor) and t_all.dim() >= 1 and t_all.shape[0] != b:
            raise RelevanceError(f"LRP: target has {t_all.shape[0]} rows for a batch of {b} samples")
        k = t_all.shape[1] if isinstance(t_all, torch.Tensor) and t_all.dim() == 2 else 1
        # NaN/Inf are reported, not propagated in silence: one read of the input here, one of the
        # result below (a finite input can still overflow float16 on the way back).
        ops.check_finite(x, "LRP: x contains NaN or Inf")
        chunk, group = self._schedule(x, k)
        parts = []
        with torch.no_grad():
            # One chunk needs no range(0, b, chunk): under torch.compile(dynamic=True) that loop
            # would specialise the symbolic batch size (a recompile per batch size).
            for a in ((0,) if chunk >= b else range(0, b, chunk)):
                tc = t_all[a:a + chunk] if isinstance(t_all, torch.Tensor) and t_all.dim() >= 1 else t_all
                parts.append(self._run(x[a:a + chunk], tc, record, keep_layers, group))
        for p in parts:
            message = f"LRP: the {x.dtype} relevance map holds NaN or Inf although x is finite"
            try:
                ops.check_finite(p.relevance, message + _overflow_hint(x.dtype))
            except RelevanceError:
                raise RelevanceError(message + _overflow_hint(x.dtype, p.logits, self.model)) from None
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        cat = lambda vals: torch.cat(vals, 0)  # noqa: E731
        layers = None
        if first.layers is not None:
            layers = {n: (tuple(cat([p.layers[n][i] for p in parts]) for i in range(len(v))) if isinstance(v, tuple)
                          else cat([p.layers[n] for p in parts])) for n, v in first.layers.items()}
        return Explanation(relevance=cat([p.relevance for p in parts]), logits=cat([p.logits for p in parts]),
                           targets=cat([p.targets for p in parts]), layers=layers,
                           conservation=None if first.conservation is None else
                           {n: cat([p.conservation[n] for p in parts]) for n in first.conservation})

    def _run(self, x, target, record: bool, keep_layers: bool, group: int = 0) -> Explanation:
        plan = self.prepare(x)
        if self._compiled is not None and not record and not torch.compiler.is_compiling() \
                and self._verify_key(x) in plan.verified:
            try:
                return self._compiled(plan, x, target, group)
            except RelevanceError:
                raise
            except Exception as exc:  # noqa: BLE001 (any failure of the compiled path: decided below)
                failed = exc
            # The eager pass decides whose fault it was: bad input (a target out of range, which the
            # graph can only assert) raises its eager message here; if eager succeeds, compiling
            # failed (no C++ compiler, a backend error): warn once and stay eager from now on.
            out = self._passes(plan, x, target, record, keep_layers, group)
            cause = getattr(failed, "inner_exception", None) or failed.__cause__ or failed   # (dynamo wraps it)
            first = (str(cause).strip().splitlines() or [""])[0][:300]
            warnings.warn(f"LRP: compile= failed for input shape {tuple(x.shape)} ({type(cause).__name__}: {first}); "
                          "this LRP runs eagerly from now on (same maps, eager speed)", RuntimeWarning, stacklevel=4)
            self._compiled = None
            return out
        return self._passes(plan, x, target, record, keep_layers, group)

    def _passes_fast(self, plan, x, target, group: int) -> Explanation:
        """The compiled function (lrpfast/compiled.py): the passes of a verified plan, no records."""
        return self._passes(plan, x, target, False, False, group)

    def _passes(self, plan, x, target, record: bool, keep_layers: bool, group: int) -> Explanation:
        try:
            call = graph.forward(plan, x, fuse_pools=not record)
        except RelevanceError:
            self._refuse_meta_tensors()   # the clearer message, when that is the cause
            raise
        logits = call.logits
        if not isinstance(logits, torch.Tensor):
            raise RelevanceError(f"LRP: the model returns a {type(logits).__name__}, not a tensor; expected logits "
                                 f"(B, classes) with B = {x.shape[0]} (a tuple's part: wrap the model and return it)")
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise RelevanceError(f"LRP: the model output has shape {tuple(logits.shape)}; expected "
                                 f"logits (B, classes) with B = {x.shape[0]}")
        self._verify(plan, x, logits)
        t, multi = _targets(target, logits)
        b, k = t.shape

        def initial(tg):
            r0 = torch.zeros((b, tg.shape[1], logits.shape[1]), dtype=logits.dtype, device=logits.device)
            value = logits.gather(1, tg) if self.init == "logit" else torch.ones(tg.shape, dtype=logits.dtype,
                                                                                  device=logits.device)
            return r0.scatter_(2, tg.unsqueeze(-1), value.unsqueeze(-1)).reshape(b * tg.shape[1], -1)

        if not record and 0 < group < k:
            # A few targets per relevance pass, all on this one forward (see _schedule).
            rel = torch.empty((b, k, *x.shape[1:]), dtype=x.dtype, device=x.device)
            saved = call.saved
            for g0 in range(0, k, group):
                last = g0 + group >= k
                call.saved, call.dens = (saved if last else list(saved)), {}
                tg = t[:, g0:g0 + group]
                part = graph.relevance(plan, call, initial(tg))
                if part is None:
                    part = torch.zeros((b * tg.shape[1], *x.shape[1:]), dtype=x.dtype, device=x.device)
                rel[:, g0:g0 + group] = part.view(b, tg.shape[1], *x.shape[1:])
            del call, saved
            return Explanation(relevance=rel if multi else rel[:, 0], logits=logits,
                               targets=t if multi else t[:, 0], layers=None, conservation=None)
        r0 = initial(t)

        def shaped(r, shape):
            r = r.reshape(b, k, *shape)
            return r if multi else r[:, 0]

        conservation, layers, recorder = None, None, None
        if record:
            conservation = {"output": shaped(r0.sum(-1), ())}
            layers = {} if keep_layers else None
            steps = plan.steps

            def recorder(step, outs):
                outs = [(j, m) for j, m in outs if steps[j].tensor_output and not isinstance(steps[j], N.ConstStep)]
                if not outs:
                    return
                total = None
                for _, m in outs:
                    s = N.relevance_sum(m, b, k)
                    total = s if total is None else total + s
                conservation[step.name] = shaped(total, ())
                if layers is not None:
                    # DENSE tensors travel on and may be accumulated into in place: copy them
                    # (B, K, m, ...) where the batch is merged with m rows (windows) per sample
                    maps = tuple(merged_batch.per_map(m.a.clone() if m.kind == N.DENSE else N.materialize(m), b, k)
                                 for _, m in outs)
                    maps = maps if multi else tuple(t[:, 0] for t in maps)
                    layers[step.name] = maps[0] if len(maps) == 1 else maps

        rel = graph.relevance(plan, call, r0, recorder)
        del call
        if rel is None:  # the output does not depend on the input
            rel = torch.zeros((b * k, *x.shape[1:]), dtype=x.dtype, device=x.device)
        if record:
            conservation[plan.steps[plan.input].name] = shaped(rel.reshape(b, k, -1).sum(-1), ())
        return Explanation(relevance=shaped(rel, x.shape[1:]), logits=logits, targets=t if multi else t[:, 0],
                           layers=layers, conservation=conservation)
