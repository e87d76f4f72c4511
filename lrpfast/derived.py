"""Tensors computed from one tensor alone: activations, normalisers and gates written out as ops.

A model often writes a nonlinearity out instead of calling a module: RMSNorm as
`x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)`, GELU as
`0.5 * x * (1 + torch.tanh(c * (x + 0.044715 * x ** 3)))`, SiLU as `x * torch.sigmoid(x)`,
StarReLU as `s * relu(x) ** 2 + b`. None of pow/rsqrt/tanh/products has a rule that makes sense
alone; together they are a function of the one tensor x, and LRP has rules for those: an
activation passes relevance unchanged, a normaliser is held constant. This module finds them in the
traced graph (one pass forward over the nodes, one backward over their users) and says, per node,
what its step is. The rule, stated once (README, "Ops without a class of their own"):

  The *root* of a computed tensor: the tensor it is computed from alone, through elementwise ops,
  reductions over dims and constants (numbers, parameters); layers with weights, shape ops and ops
  combining tensors of different roots start a root of their own. A tensor is *linear* (in its
  root) when every op on the way is linear, *elementwise* when every op keeps each element apart.

  1. An elementwise, nonlinear function y = f(x) of one tensor is an activation: R_x = R_y (the
     pass rule, as for nn.GELU). The relevance goes to the nearest tensor that every linear input
     of the region is computed from by elementwise linear ops (relu(z + b): to z + b, so the bias
     keeps its share as before; 0.5*x*(1+tanh(..x..)): to x).
  2. A product a * g of two tensors of one root, a linear and g not (g computed with a reduction:
     RMSNorm's rsqrt(mean(x²) + eps), a gate sigmoid(mean(x))): g is held constant, the product is
     linear in a and takes the ε rule of a diagonal map (LayerNorm's σ rule).
  3. A quotient a / g with a computed divisor: the divisor is a normaliser and is held constant
     (written-out LayerNorm's sqrt(var + eps), linear attention's v / (Σ + eps)); R goes to a.
  4. Any other product of two computed factors: the uniform ½ split (SwiGLU's silu(gate(x)) * up(x),
     an SE gate through a conv) - unchanged.

  Nodes that only compute a held factor, or feed an activation of rule 1, are computed in the
  forward and receive no relevance (DerivedStep). The oracle (lrpfast/oracle.py) applies the same
  rule on its own, tracking roots at run time.
"""
from __future__ import annotations

import operator
from typing import Callable, Dict, Optional, Set

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .nodes import ConstExprStep, PassStep
from .op_rules import data_operands
from .ops import RelevanceError

FWD, ACT = "forward only", "activation"

# ---- op classes, by function object, method name and module class

_LIN_EW_FUNCTIONS = {operator.add, torch.add, operator.iadd, operator.sub, torch.sub, operator.isub, operator.neg,
                     torch.neg, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_LIN_EW_METHODS = {"add", "add_", "sub", "sub_", "neg", "float", "double", "half", "bfloat16", "to", "type_as",
                   "contiguous", "clone"}
_MUL = {operator.mul, torch.mul, operator.imul, "mul", "mul_"}
_DIV = {operator.truediv, torch.div, operator.itruediv, torch.true_divide, "div", "div_", "true_divide"}
_POW = {operator.pow, torch.pow, "pow", "pow_"}
_NL_EW_FUNCTIONS = {torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.reciprocal, torch.abs, torch.square,
                    torch.tanh, torch.sigmoid, torch.erf, torch.sin, torch.cos, torch.clamp, torch.clip,
                    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
                    F.elu, F.leaky_relu, F.softplus, F.selu, F.celu, F.tanh, F.sigmoid, torch.clamp_min,
                    torch.clamp_max}
_NL_EW_METHODS = {"exp", "log", "sqrt", "rsqrt", "reciprocal", "abs", "square", "tanh", "sigmoid", "erf", "sin",
                  "cos", "clamp", "clip", "clamp_min", "clamp_max", "relu"}
_NL_EW_METHODS |= {m + "_" for m in _NL_EW_METHODS}
# activations whose own rule (lrpfast/graph/) is the pass rule to their direct input
_OWN_ACTIVATIONS = {torch.tanh, torch.sigmoid, torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish,
                    F.hardsigmoid, F.hardtanh, F.elu, F.leaky_relu, F.softplus, F.selu, F.celu, F.tanh, F.sigmoid,
                    "tanh", "sigmoid", "relu", "tanh_", "sigmoid_", "relu_", torch.clamp, torch.clip, torch.clamp_min,
                    torch.clamp_max, "clamp", "clip", "clamp_min", "clamp_max", "clamp_", "clip_"}
_REDUCE_LIN = {torch.mean, torch.sum, "mean", "sum"}
_REDUCE_NL = {torch.var, torch.std, torch.norm, torch.amax, torch.amin, torch.logsumexp, "var", "std", "norm",
              "amax", "amin", "logsumexp"}
_IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)


class _Info:
    __slots__ = ("root", "lin", "ew", "parent", "target", "anc", "forms")

    def __init__(self, root, lin=True, ew=True, parent=None, target=None):
        self.root, self.lin, self.ew, self.parent, self.target = root, lin, ew, parent, target
        self.anc = frozenset()   # the tensors it is computed from alone (itself included)
        self.forms = False       # a nonlinear op or one combining computed tensors: may end a rule-1 region


def _key(node: fx.Node):
    return node.target if node.op in ("call_function", "call_method") else None


def _in(key, table) -> bool:
    try:
        return key in table
    except TypeError:   # an unhashable target
        return False


class Derivation:
    """Per node of a traced graph: its role (FWD, ACT or none: the op's own rule), the operands of a
    product or quotient held constant, and where an activation of rule 1 sends its relevance."""

    def __init__(self, gm: fx.GraphModule, is_meta: Callable[[fx.Node], bool],
                 activation_modules: tuple):
        self.gm = gm
        self.info: Dict[fx.Node, _Info] = {}
        self.role: Dict[fx.Node, str] = {}
        self.held: Dict[fx.Node, Set[fx.Node]] = {}
        self._act_modules = activation_modules
        seen_input = False
        output = None
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                if not node.args and not seen_input:
                    self.info[node] = _Info(node)
                    self.info[node].anc = frozenset({node})
                    seen_input = True
            elif node.op in ("call_function", "call_method", "call_module"):
                if is_meta(node):
                    continue
                computed = []
                fx.node.map_arg(data_operands(node), lambda a: computed.append(a) if a in self.info else None)
                computed = list(dict.fromkeys(computed))
                if computed:
                    inf = self._classify(node, computed)
                    inf.anc = frozenset.intersection(*(self.info[c].anc for c in computed)) \
                        if inf.root is not node else frozenset()
                    inf.anc |= {node}
                    inf.forms = self._kind(node, computed) in ("nl_ew", "mul", "div") or len(computed) > 1
                    self.info[node] = inf
            elif node.op == "output":
                output = node
        self._roles(output)

    # ------------------------------------------------------------------ forward: roots and flags

    def _kind(self, node: fx.Node, computed) -> Optional[str]:
        if node.op == "call_module":
            m = self.gm.get_submodule(node.target)
            if isinstance(m, _IDENTITY_MODULES):
                return "lin_ew"
            if type(m) in self._act_modules:
                return "nl_ew"
            return None
        k = _key(node)
        if _in(k, _LIN_EW_FUNCTIONS) or (node.op == "call_method" and _in(k, _LIN_EW_METHODS)):
            return "lin_ew"
        if _in(k, _MUL):
            return "mul" if len(self._operands(node, computed)) == 2 else "lin_ew"
        if _in(k, _DIV):
            first = node.args[0] if node.args else None
            if first in computed and len(computed) == 1 and not (len(node.args) > 1 and node.args[1] is first):
                return "lin_ew"                 # x / c
            return "div" if first in computed else "nl_ew"   # a / g, or c / g (a reciprocal)
        if _in(k, _POW):
            base = node.args[0] if node.args else None
            exp = node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
            if base in computed and not isinstance(exp, fx.Node) and exp == 1:
                return "lin_ew"
            return "nl_ew"
        if _in(k, _NL_EW_FUNCTIONS) or (node.op == "call_method" and _in(k, _NL_EW_METHODS)):
            return "nl_ew"
        if _in(k, _REDUCE_LIN):
            return "red_lin"
        if _in(k, _REDUCE_NL):
            return "red_nl"
        return None

    def _operands(self, node, computed):
        ops = list(node.args[:2]) + ([node.kwargs["other"]] if "other" in node.kwargs else [])
        return [a for a in ops if a in computed]

    def _classify(self, node: fx.Node, computed) -> _Info:
        kind = self._kind(node, computed)
        infos = [self.info[c] for c in computed]
        roots = {i.root for i in infos}
        if kind is None or len(roots) != 1:
            if kind == "div" and node.args[0] in computed:
                self.held[node] = {a for a in computed if a is not node.args[0]}   # rule 3
            return _Info(node)                  # a root of its own (rule 4 for products)
        root = next(iter(roots))
        lin, ew = all(i.lin for i in infos), all(i.ew for i in infos)
        if kind == "lin_ew":
            return _Info(root, lin, ew, parent=computed[0] if len(computed) == 1 and lin else None,
                         target=None if lin else self._target(root, computed))
        if kind == "red_lin":
            return _Info(root, lin, False)
        if kind == "red_nl":
            return _Info(root, False, False)
        if kind == "nl_ew":
            return _Info(root, False, ew, target=self._target(root, computed) if ew else None)
        ops = list(node.args[:2]) + ([node.kwargs["other"]] if "other" in node.kwargs else [])
        a, b = ops[0], ops[1]
        if ew:                                  # rule 1: still elementwise in the root
            return _Info(root, False, True, target=self._target(root, computed))
        if kind == "div":                       # rule 3: the divisor held
            self.held[node] = {b}
            return _Info(root, self.info[a].lin, False)
        ia, ib = self.info[a], self.info[b]
        if a in ib.anc or b in ia.anc or ia.lin != ib.lin:   # rule 2: the factor computed from the other held
            keep = a if (a in ib.anc or (b not in ia.anc and ia.lin)) else b
            self.held[node] = {b if keep is a else a}
            return _Info(root, self.info[keep].lin, False)
        return _Info(root, False, False)        # rule 4: the uniform split

    def _chain(self, n: fx.Node):
        out = []
        while n is not None:
            out.append(n)
            n = self.info[n].parent
        return out

    def _target(self, root, computed):
        """The nearest tensor every entry of the region is computed from by linear elementwise ops."""
        entries = [c if self.info[c].lin else self.info[c].target for c in computed]
        if any(e is None for e in entries):
            return root
        chains = [self._chain(e) for e in entries]
        for cand in chains[0]:
            if all(any(self._same(cand, c) for c in ch) for ch in chains[1:]):
                return cand
        return root

    def _same(self, a, b) -> bool:
        """a and b are one tensor: the same node, or the same linear op written twice on the same
        tensor with the same constants ((z + b) * sigmoid(z + b) computes z + b twice)."""
        if a is b:
            return True
        ia, ib = self.info.get(a), self.info.get(b)
        if ia is None or ib is None or ia.parent is None or ib.parent is None:
            return False
        if a.op != b.op or _key(a) != _key(b) or a.op not in ("call_function", "call_method") \
                or len(a.args) != len(b.args) or set(a.kwargs) != set(b.kwargs):
            return False
        return all(self._same_arg(x, y) for x, y in zip(a.args, b.args)) \
            and all(self._same_arg(a.kwargs[k], b.kwargs[k]) for k in a.kwargs)

    def _same_arg(self, x, y) -> bool:
        if isinstance(x, fx.Node) and isinstance(y, fx.Node):
            if x in self.info or y in self.info:
                return self._same(x, y)
            return x is y or (x.op == y.op == "get_attr" and x.target == y.target)   # one constant
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            return False
        try:
            return type(x) is type(y) and bool(x == y)
        except Exception:  # noqa: BLE001 (tensors or other values without a plain ==)
            return x is y

    # ------------------------------------------------------------------ backward: roles from users

    def _roles(self, output):
        nodes = [n for n in self.gm.graph.nodes if n in self.info]
        outs = set()
        if output is not None:
            fx.node.map_arg(output.args, outs.add)
        for n in reversed(nodes):
            inf = self.info[n]
            if inf.lin or inf.root is n:
                continue
            absorbed = n not in outs and all(self._absorbs(u, n) for u in n.users)
            if absorbed:
                self.role[n] = FWD
            elif inf.ew and inf.forms:   # (a linear op on an activation keeps its own rule: a bias its share)
                self.role[n] = ACT

    def _absorbs(self, user: fx.Node, n: fx.Node) -> bool:
        if n in self.held.get(user, ()):
            return True
        iu = self.info.get(user)
        return iu is not None and not iu.lin and iu.root is self.info[n].root and user in self.role

    # ------------------------------------------------------------------ what the plan does

    def activation_target(self, node: fx.Node) -> Optional[fx.Node]:
        return self.info[node].target

    def needs_step(self, node: fx.Node) -> Optional[str]:
        """FWD or ACT where this module must build the node's step, else None (the op's own rule:
        a plain activation on its direct input stays an activation step of lrpfast/graph/)."""
        role = self.role.get(node)
        if role == ACT:
            target = self.info[node].target
            direct = []
            fx.node.map_arg(data_operands(node), lambda a: direct.append(a) if a in self.info else None)
            own = (node.op == "call_module" or _in(_key(node), _OWN_ACTIVATIONS))
            if own and direct == [target]:
                return None
        return role

    def describe(self, node: fx.Node) -> str:
        return self.info[node].root.name


class DerivedStep(ConstExprStep):
    """A tensor computed from one tensor alone that receives no relevance: a factor held constant
    (rules 2 and 3) or a part of an activation of rule 1. Computed in the forward like any node; a
    constant for the relevance pass, as CP-LRP's attention weights are."""


class RegionActivationStep(PassStep):
    """Rule 1: an elementwise nonlinear function of one tensor, relevance passed unchanged to it."""

    def forward(self, env, call):
        y = super().forward(env, call)
        x = env[self.src]
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            raise RelevanceError(f"LRP: {self.describe()} is an elementwise function of {call.steps[self.src].name!r} "
                                 f"but has shape {tuple(getattr(y, 'shape', ()))}, not {tuple(x.shape)}: "
                                 "the activation rule needs one output element per input element")
        return y


_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv}


def pure_callable(node: fx.Node, gm: fx.GraphModule, no_inplace, module_without_inplace):
    """The node's op, never in place (its input is still read by other steps)."""
    if node.op == "call_module":
        m = module_without_inplace(gm.get_submodule(node.target))
        return lambda *a, **k: m(*a, **k)
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.endswith("__"):
            name = name[:-1]
        return lambda obj, *a, **k: getattr(obj, name)(*a, **k)
    t = _INPLACE_OPERATORS.get(node.target, node.target)
    if t is torch.relu_:
        t = torch.relu
    return no_inplace(t)
