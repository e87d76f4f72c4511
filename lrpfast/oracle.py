"""The gradient oracle: what ε-LRP with ε = 0 must give, computed another way.

With ε = 0 and the ε rule on every layer, LRP equals gradient × input of the same model in which

- every elementwise nonlinearity f (ReLU, GELU, tanh, sigmoid, ...) is x · (f(x)/x).detach()
  (LRP's pass rule: the ratio is a constant, so relevance passes through unchanged),
- every normaliser (LayerNorm, GroupNorm, RMSNorm, F.normalize) has its σ detached,
- every product of two computed tensors (a * b, a @ b, einsum) hands each factor half of the
  gradient, ½(a·b) + ½(a·b).detach() (AttnLRP's uniform rule; Achtibat et al. 2024),
- the softmax of attention is detached ("cp": CP-LRP, Ali et al. 2022) or differentiated
  ("attnlrp": AttnLRP's softmax rule),
- functions of one tensor written out as ops (lrpfast/derived.py's four rules): every computed
  tensor's root (what it is computed from alone by elementwise ops, reductions and constants) is
  tracked as the calls come; an elementwise nonlinear function of a root is an activation of it
  (the ratio form above, against the nearest tensor its entries come from linearly), a factor
  computed from the other factor alone and a computed divisor are detached,

and everything linear (Linear, Conv, BatchNorm in eval, pooling, sums, reshapes, indexing, a max
pooling's winner-take-all) is left to autograd. `gradient_oracle` computes exactly that with plain
autograd on the unmodified model: a TorchFunctionMode swaps the nonlinear calls as the model makes
them, so nothing here shares code with the relevance pass (lrpfast/graph/, lrpfast/nodes/).
The model's hooks run as in a normal call; its parameters are read detached.

    R = lrpfast.oracle.gradient_oracle(model, x, target)     # (B, ...) like x
    lrpfast.LRP(model, eps=0.0)(x, target)                   # must equal R (float64: ~1e-12)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["gradient_oracle", "detach_rules"]

# Elementwise nonlinearities by name (the functional, the torch.* function, the Tensor method and
# their in-place variants share it).
_ACTIVATIONS = {
    "relu", "relu6", "leaky_relu", "elu", "gelu", "silu", "mish", "hardswish", "tanh", "softsign", "prelu",
    "celu", "selu", "sigmoid", "softplus", "hardsigmoid", "hardtanh", "rrelu", "logsigmoid", "tanhshrink",
}
_PRODUCTS = {"mul", "__mul__", "__rmul__", "__imul__", "multiply"}
_MATMULS = {"matmul", "__matmul__", "__rmatmul__", "bmm", "mm", "einsum"}


def _name(func) -> str:
    return getattr(func, "__name__", "") or ""


def _base(name: str) -> str:
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _computed(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


def _ratio_form(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x · (y/x).detach(): y's value, with the gradient of a constant diagonal map. Where x = 0 the
    map is 0 (no input, no relevance) but the value stays y: f(0) = 0.5 for a sigmoid, and the
    value 0 there changed every layer after it (random net 584 of the full sweep)."""
    ratio = torch.where(x == 0, torch.zeros_like(y), y / torch.where(x == 0, torch.ones_like(x), x))
    linear = x * ratio.detach()
    return linear + (y - linear).detach()


def _half_split(y: torch.Tensor) -> torch.Tensor:
    """y's value; each computed factor of the product y receives half of its gradient."""
    return 0.5 * y + 0.5 * y.detach()


# ---- functions of one tensor (the rule of lrpfast/derived.py, applied here at run time by names):
# every computed tensor remembers its root (the tensor it is computed from alone through
# elementwise ops, reductions and constants), whether it is linear and elementwise in it, and for
# linear elementwise ops of one computed input the tensor they came from (a chain to walk up).
_LIN_EW = {"add", "__add__", "__radd__", "__iadd__", "sub", "__sub__", "__rsub__", "__isub__", "rsub", "neg",
           "__neg__", "negative", "to", "float", "double", "half", "bfloat16", "type_as", "contiguous", "clone",
           "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout"}
_MUL_NAMES = {"mul", "__mul__", "__rmul__", "__imul__", "multiply"}
_DIV_NAMES = {"div", "__truediv__", "__itruediv__", "true_divide", "divide"}
_POW_NAMES = {"pow", "__pow__", "__ipow__", "float_power"}
_NL_EW = {"exp", "log", "sqrt", "rsqrt", "reciprocal", "abs", "square", "erf", "sin", "cos", "clamp", "clip",
          "clamp_min", "clamp_max", "__rtruediv__", "__rdiv__", "__rpow__"} | _ACTIVATIONS
_PASS = _ACTIVATIONS | {"clamp", "clip", "clamp_min", "clamp_max"}   # activations on any input
_RED_LIN = {"mean", "sum"}
_SHAPE_SOURCES = {"type_as", "to", "view_as", "reshape_as", "expand_as"}
_RED_NL = {"var", "std", "norm", "amax", "amin", "logsumexp"}


_PARENT = object()   # the computed argument's place in a recorded call


def _same_const(x, y) -> bool:
    """Two constant arguments of a call are the same: the same object, or equal plain values."""
    if x is y:
        return True
    if isinstance(x, tuple) and isinstance(y, tuple) and len(x) == 2 == len(y) and x[0] == y[0]:
        return _same_const(x[1], y[1])   # a keyword argument
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) or type(x) is not type(y):
        return False
    try:
        return bool(x == y)
    except Exception:  # noqa: BLE001 (a value without a plain ==)
        return False


class _Root:
    __slots__ = ("root", "lin", "ew", "parent", "target", "alone", "call")

    def __init__(self, root, lin=True, ew=True, parent=None, target=None):
        self.root, self.lin, self.ew, self.parent, self.target = root, lin, ew, parent, target
        self.alone = None   # the tensors it is computed from alone, itself last (None: only itself)
        self.call = None    # with a parent: the op and its other arguments (a second call of it is the same tensor)


def _tensors(tree):
    out, seen = [], set()
    for v in torch.utils._pytree.tree_leaves(tree):
        if _computed(v) and id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


class _DetachRules(TorchFunctionMode):
    def __init__(self, attention: str):
        super().__init__()
        self.attention = attention
        self.roots = {}   # id(tensor) -> (tensor, _Root); the tensors are held so that ids stay unique

    # ------------------------------------------------------------------ one-tensor functions

    def _info(self, t) -> _Root:
        e = self.roots.get(id(t))
        return e[1] if e is not None and e[0] is t else _Root(t)

    def _chain(self, t):
        out = []
        while t is not None and not any(t is o for o in out):
            out.append(t)
            t = self._info(t).parent
        return out

    def _target(self, root, xs):
        entries = [x if self._info(x).lin else self._info(x).target for x in xs]
        if any(e is None for e in entries):
            return root
        chains = [self._chain(e) for e in entries]
        for cand in chains[0]:
            if all(any(self._same(cand, c) for c in ch) for ch in chains[1:]):
                return cand
        return root

    def _same(self, a, b) -> bool:
        """a and b are one tensor: the same object, or one linear op called twice on the same tensor
        with the same constants ((z + b) * sigmoid(z + b) computes z + b twice)."""
        if a is b:
            return True
        ia, ib = self._info(a), self._info(b)
        if ia.parent is None or ib.parent is None or ia.call is None or ib.call is None:
            return False
        (fa, ca), (fb, cb) = ia.call, ib.call
        return fa == fb and len(ca) == len(cb) and all(_same_const(x, y) for x, y in zip(ca, cb)) \
            and self._same(ia.parent, ib.parent)

    def _one_tensor(self, func, name, base, args, kwargs, xs):
        """The rule of lrpfast/derived.py for a call on computed tensors xs, or NotImplemented."""
        if name in _MUL_NAMES:
            kind = "mul" if len(args) >= 2 and _computed(args[0]) and _computed(args[1]) else "lin_ew"
        elif name in _DIV_NAMES:
            if not _computed(args[0]):
                kind = "nl_ew"
            else:
                kind = "div" if len(args) >= 2 and _computed(args[1]) else "lin_ew"
        elif name in _POW_NAMES:
            e = args[1] if len(args) > 1 else kwargs.get("exponent")
            kind = "lin_ew" if _computed(args[0]) and not isinstance(e, torch.Tensor) and e == 1 else "nl_ew"
        elif base in _LIN_EW:
            kind = "lin_ew"
        elif base in _NL_EW:
            kind = "nl_ew"
        elif base in _RED_LIN:
            kind = "red_lin"
        elif base in _RED_NL:
            kind = "red_nl"
        else:
            return NotImplemented
        infos = [self._info(x) for x in xs]
        roots = {id(i.root): i.root for i in infos}
        if len(roots) != 1:
            if kind == "div":   # rule 3 across roots: the divisor held, a root of its own after
                return func(args[0], args[1].detach(), *args[2:], **kwargs), None
            return NotImplemented
        root = next(iter(roots.values()))
        lin, ew = all(i.lin for i in infos), all(i.ew for i in infos)
        held = None
        if kind == "lin_ew":
            out = _Root(root, lin, ew, xs[0] if len(xs) == 1 and lin else None,
                        None if lin else self._target(root, xs))
            if out.parent is not None:
                out.call = (name, [_PARENT if a is xs[0] else a for a in args] +
                            [(k, _PARENT if v is xs[0] else v) for k, v in sorted(kwargs.items())])
        elif kind == "red_lin":
            out = _Root(root, lin, False)
        elif kind == "red_nl":
            out = _Root(root, False, False)
        elif kind == "nl_ew":
            out = _Root(root, False, ew, target=self._target(root, xs) if ew else None)
        elif ew:                                            # rule 1: a product/quotient, elementwise
            out = _Root(root, False, True, target=self._target(root, xs))
        elif kind == "div":                                 # rule 3
            held, out = 1, _Root(root, self._info(args[0]).lin, False)
        elif self._from(args[1], args[0]) or self._from(args[0], args[1]) \
                or self._info(args[0]).lin != self._info(args[1]).lin:   # rule 2: a factor from the other held
            a, b = self._info(args[0]), self._info(args[1])
            keep = 0 if (self._from(args[1], args[0]) or (not self._from(args[0], args[1]) and a.lin)) else 1
            held, out = 1 - keep, _Root(root, (a, b)[keep].lin, False)
        else:                                               # rule 4: the uniform split
            return _half_split(func(*args, **kwargs)), _Root(root, False, False)
        if held is not None:
            args = tuple(a.detach() if i == held else a for i, a in enumerate(args))
        y = func(*args, **kwargs)
        forms = kind in ("nl_ew", "mul", "div") or len(xs) > 1   # (a linear op of one tensor keeps its rule)
        if forms and not out.lin and out.ew and isinstance(y, torch.Tensor) and y.shape == out.target.shape:
            y = _ratio_form(out.target, y)                  # rule 1: an activation of its target
        elif kind == "nl_ew" and not ew and base in _PASS and len(xs) == 1 and y.shape == xs[0].shape:
            y = _ratio_form(xs[0], y)                       # an activation of a non-elementwise input
        return y, out

    def _alone(self, t):
        a = self._info(t).alone
        return [t] if a is None else a

    def _from(self, g, a) -> bool:
        """g is computed from a alone."""
        return any(t is a for t in self._alone(g))

    def _remember(self, y, info, xs=()):
        if any(y is x for x in xs):
            # the op returned its input itself (dropout with p = 0, .contiguous(), .to() of the same
            # dtype): nothing new to record, and recording it would make the tensor its own parent
            return y
        if isinstance(y, torch.Tensor) and info is not None:
            common = self._alone(xs[0]) if xs else []
            for x in xs[1:]:
                other = self._alone(x)
                common = [t for t in common if any(t is o for o in other)]
            info.alone = common + [y]
            self.roots[id(y)] = (y, info)
        return y

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = _name(func)
        base = _base(name)
        inplace = (name.endswith("_") and not name.endswith("__")) or name in ("__imul__", "__iadd__", "__isub__",
                                                                                "__itruediv__", "__ipow__") \
            or bool(kwargs.get("inplace", False))
        # x.type_as(y), x.to(y), x.view_as(y), ...: y gives a dtype or shape only, not data
        xs = _tensors(args[:1] if name in _SHAPE_SOURCES else (args, kwargs))
        if xs and (name not in _MATMULS):
            twin = _out_of_place(func, name) if inplace else func
            if twin is not None:
                if "inplace" in kwargs:
                    kwargs["inplace"] = False
                got = self._one_tensor(twin, _out_of_place_name(name) if inplace else name, base, args, kwargs, xs)
                if got is not NotImplemented:
                    y, info = got
                    if inplace and isinstance(args[0], torch.Tensor):
                        y = args[0].copy_(y)
                        if info is not None and info.root is args[0]:
                            info = _Root(args[0], info.lin, info.ew, None, info.target)
                    return self._remember(y, info, xs)
        if base in _ACTIVATIONS and args and _computed(args[0]):
            x = args[0]
            if "inplace" in kwargs:
                kwargs["inplace"] = False
            fn = func if name == base else getattr(F, base)   # an in-place variant: its functional twin
            xc = x.clone() if inplace else x
            y = _ratio_form(xc, fn(xc, *args[1:], **kwargs))
            return x.copy_(y) if inplace else y
        if base in _PRODUCTS and len(args) >= 2 and _computed(args[0]) and _computed(args[1]):
            a, b = (args[0].clone() if inplace else args[0]), args[1]
            y = _half_split(torch.mul(a, b))
            return args[0].copy_(y) if inplace else y
        if name in _MATMULS:
            tensors = list(args[1:]) if name == "einsum" else list(args[:2])
            if name == "einsum" and len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
                tensors = list(tensors[0])
            out = func(*args, **kwargs)
            if sum(_computed(t) for t in tensors) >= 2:
                return _half_split(out)
            return out
        if name in ("softmax", "_softmax") and args and _computed(args[0]):
            out = func(*args, **kwargs)
            return out.detach() if self.attention == "cp" else out
        if func is F.batch_norm and args and _computed(args[0]):   # (not a weight standardised by it)
            return _batch_norm(*args, **kwargs)
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        if func is F.group_norm:
            return _group_norm(*args, **kwargs)
        if func is getattr(F, "rms_norm", None):
            return _rms_norm(*args, **kwargs)
        if func is F.normalize and args and _computed(args[0]):
            x, p, dim = args[0], kwargs.get("p", args[1] if len(args) > 1 else 2.0), \
                kwargs.get("dim", args[2] if len(args) > 2 else 1)
            eps = kwargs.get("eps", args[3] if len(args) > 3 else 1e-12)
            return x / x.norm(p, dim, keepdim=True).clamp_min(eps).detach()
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            return self._mha(*args, **kwargs)
        if name in ("lstm", "gru") and len(args) == 9 and _computed(args[0]):
            return _recurrent(name, *args)
        return func(*args, **kwargs)

    # ------------------------------------------------------------------------- attention

    def _attend(self, q, k, v, mask, scale):
        """softmax(q kᵀ · scale + mask) v with the rules: products split, softmax per rule."""
        scores = torch.matmul(q, k.transpose(-2, -1)) * scale
        if _computed(q) and _computed(k):
            scores = _half_split(scores)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        a = torch.softmax(scores, dim=-1)
        if self.attention == "cp":
            a = a.detach()
        out = torch.matmul(a, v)
        if _computed(a) and _computed(v):
            out = _half_split(out)
        return out, a

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
        if dropout_p:
            raise ValueError("gradient_oracle: scaled_dot_product_attention with dropout_p > 0")
        lq, lk = query.shape[-2], key.shape[-2]
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            rep = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
        mask = attn_mask
        if is_causal:
            mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        return self._attend(query, key, value, mask, scale)[0]

    def _mha(self, query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
             add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True, key_padding_mask=None,
             need_weights=True, attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None,
             k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
             is_causal=False):
        if bias_k is not None or add_zero_attn or static_k is not None or (training and dropout_p):
            raise ValueError("gradient_oracle: nn.MultiheadAttention with bias_k/add_zero_attn/static keys or "
                             "dropout in training")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        lq, b, e = query.shape
        lk = key.shape[0]
        h = num_heads
        if use_separate_proj_weight:
            ws = (q_proj_weight, k_proj_weight, v_proj_weight)
        else:
            ws = in_proj_weight.chunk(3)
        bs = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = (F.linear(t, w, bb) for t, w, bb in zip((query, key, value), ws, bs))

        def heads(t, n):   # (L, B, E) -> (B, H, L, E/H)
            return t.reshape(n, b, h, e // h).permute(1, 2, 0, 3)

        q, k, v = heads(q, lq), heads(k, lk), heads(v, lk)
        mask = None   # additive float (B or 1, H or 1, Lq, Lk)
        if attn_mask is not None:
            m = attn_mask
            if m.dtype == torch.bool:
                m = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(m, float("-inf"))
            m = m.to(q.dtype)
            mask = m.reshape(b, h, lq, lk) if m.dim() == 3 else m
        if key_padding_mask is not None:
            kp = key_padding_mask
            if kp.dtype == torch.bool:
                kp = torch.zeros(kp.shape, dtype=q.dtype, device=q.device).masked_fill(kp, float("-inf"))
            kp = kp.to(q.dtype).reshape(b, 1, 1, lk)
            mask = kp if mask is None else mask + kp
        out, a = self._attend(q, k, v, mask, 1.0 / math.sqrt(e // h))
        out = out.permute(2, 0, 1, 3).reshape(lq, b, e)
        out = F.linear(out, out_proj_weight, out_proj_bias)
        weights = None
        if need_weights:
            weights = a.detach().mean(1) if average_attn_weights else a.detach()
            if not batched:
                weights = weights.squeeze(0)
        if not batched:
            out = out.squeeze(1)
        return out, weights


def _recurrent(name, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """torch.lstm / torch.gru written out, time step by time step, with the gates held constant
    and tanh as a constant diagonal map (Arras et al. 2017: a gate passes no relevance)."""
    lstm = name == "lstm"
    if train and dropout and num_layers > 1:
        raise ValueError("gradient_oracle: a recurrent layer with dropout in training mode")
    per = 4 if has_biases else 2
    dirs = 2 if bidirectional else 1
    seq = x.transpose(0, 1) if batch_first else x          # (T, B, F)
    h0 = hx[0] if lstm else hx
    c0 = hx[1] if lstm else None
    finals_h, finals_c = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            j = layer * dirs + d
            w_ih, w_hh = params[j * per], params[j * per + 1]
            b_ih, b_hh = (params[j * per + 2], params[j * per + 3]) if has_biases else (0, 0)
            h, c = h0[j], (c0[j] if lstm else None)
            order = range(seq.shape[0] - 1, -1, -1) if d else range(seq.shape[0])
            hs = [None] * seq.shape[0]
            for t in order:
                gi = seq[t] @ w_ih.t() + b_ih
                gh = h @ w_hh.t() + b_hh
                if lstm:
                    pi, pf, pg, po = (gi + gh).chunk(4, -1)
                    g = _ratio_form(pg, torch.tanh(pg))
                    c = torch.sigmoid(pf).detach() * c + torch.sigmoid(pi).detach() * g
                    h = torch.sigmoid(po).detach() * _ratio_form(c, torch.tanh(c))
                else:
                    ir, iz, i_n = gi.chunk(3, -1)
                    hr, hz, h_n = gh.chunk(3, -1)
                    r, z = torch.sigmoid(ir + hr).detach(), torch.sigmoid(iz + hz).detach()
                    a = i_n + r * h_n
                    h = (1 - z) * _ratio_form(a, torch.tanh(a)) + z * h
                hs[t] = h
            outs.append(torch.stack(hs))
            finals_h.append(h)
            finals_c.append(c)
        seq = torch.cat(outs, -1)
    out = seq.transpose(0, 1) if batch_first else seq
    if lstm:
        return out, torch.stack(finals_h), torch.stack(finals_c)
    return out, torch.stack(finals_h)


def _out_of_place_name(name: str) -> str:
    if name.startswith("__i") and name.endswith("__"):
        return "__" + name[3:]
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _out_of_place(func, name: str):
    """The out-of-place twin of an in-place call (x.add_ -> Tensor.add, torch.relu_ -> torch.relu);
    F.relu(x, inplace=True) is its own twin (inplace is switched off)."""
    twin_name = _out_of_place_name(name)
    if twin_name == name:
        return func
    if getattr(torch.Tensor, name, None) is func:
        return getattr(torch.Tensor, twin_name, None)
    return getattr(torch, twin_name, None) or getattr(F, twin_name, None)


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                eps=1e-5):
    """Eval BatchNorm as the per-channel affine map it is, in elementwise ops. (torch's CPU
    batch_norm backward is wrong for a batch of one with a non-contiguous gradient, e.g. from
    x.flatten(2).transpose(1, 2).mean(1): 0.3 off in float64 on torch 2.14; the oracle must not
    inherit that.)"""
    if training or running_mean is None:
        raise ValueError("gradient_oracle: BatchNorm in training mode (batch statistics); call model.eval()")
    shape = (1, -1) + (1,) * (input.dim() - 2)
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    y = (input - running_mean.reshape(shape)) * scale.reshape(shape)
    return y if bias is None else y + bias.reshape(shape)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mean = input.mean(dims, keepdim=True)
    var = input.var(dims, unbiased=False, keepdim=True)
    y = (input - mean) / torch.sqrt(var + eps).detach()
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    b, c = input.shape[:2]
    g = input.reshape(b, num_groups, -1)
    mean = g.mean(-1, keepdim=True)
    sigma = torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps).detach()
    y = ((g - mean) / sigma).reshape(input.shape)
    shape = (1, c) + (1,) * (input.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _rms_norm(input, normalized_shape, weight=None, eps=None):
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    rms = torch.sqrt(input.pow(2).mean(dims, keepdim=True) + eps).detach()
    y = input / rms
    return y if weight is None else y * weight


def detach_rules(attention: str = "cp") -> TorchFunctionMode:
    """The mode that swaps the nonlinear calls (module docstring); `with detach_rules(): model(x)`."""
    if attention not in ("cp", "attnlrp"):
        raise ValueError(f"gradient_oracle: attention must be 'cp' or 'attnlrp', got {attention!r}")
    return _DetachRules(attention)


def gradient_oracle(model: nn.Module, x: torch.Tensor, target=None, attention: str = "cp",
                    init: str = "logit") -> torch.Tensor:
    """Gradient × input of `model` under the detach rules: ε-LRP with ε = 0 must equal it.
    target: None (the argmax), an int, or (B,) class indices. init "logit" weighs each map by its
    logit (LRP's default); "onehot" starts from 1."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    params.update(dict(model.named_buffers()))
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), detach_rules(attention):
        out = torch.func.functional_call(model, params, (xg,))
    if target is None:
        t = out.detach().argmax(1)
    elif isinstance(target, int):
        t = torch.full((out.shape[0],), target, dtype=torch.long, device=out.device)
    else:
        t = torch.as_tensor(target, device=out.device).long().reshape(-1)
    picked = out.gather(1, t[:, None]).squeeze(1)
    (g,) = torch.autograd.grad(picked.sum(), xg, allow_unused=True)
    if g is None:
        g = torch.zeros_like(xg)
    r = (xg * g).detach()
    if init == "onehot":
        scale = picked.detach()
        r = r / torch.where(scale == 0, torch.ones_like(scale), scale).reshape(-1, *([1] * (r.dim() - 1)))
    return r
