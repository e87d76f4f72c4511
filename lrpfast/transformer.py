"""Steps for transformer blocks: LayerNorm and attention, with the conservative propagation of
Ali et al. 2022 ("XAI for Transformers: Better Explanations through Conservative Propagation").

The non-linear parts are held constant, which makes each block linear in what carries relevance:

- LayerNorm: the normalising std σ is a constant, so y_c = (x - mean(x)) / σ = W x with
  W = (I - 11ᵀ/N) / σ (no bias). With the affine z = γ y_c + β, the ε rule on both steps, fused into
  one division by the output z:
        u = γ ⊙ R / stab(z),   R_in = x ⊙ (u - mean(u)) / σ        (means over the normalised dims)
  (R_c = γ y_c ⊙ R / stab(z) at y_c, then x ⊙ Wᵀ(R_c / y_c): the y_c cancel). β absorbs its share;
  with β = 0 and ε → 0 the step conserves relevance exactly.
- Attention: the weights A = softmax(QKᵀ/√d + mask) are constants, so O = A V is linear in V and
  relevance reaches only the value path, per head by the ε rule: R_V = V ⊙ Aᵀ(R_O / stab(O)).
  Q and K (and the query/key inputs) receive none. nn.MultiheadAttention's value in-projection and
  out-projection are linear layers with the ε rule and the LRP's eps/stabiliser: a composite's
  rules apply to Linear/Conv modules outside the attention block, never inside it.

With a tiny ε these rules give gradient × input of the model in which σ and A are detached and
every activation f is replaced by x·(f(x)/x).detach() (tests/test_lrp_transformers.py checks that).

`LRP(model, attention="attnlrp")` sends relevance through the attention weights as well, by the
rules of AttnLRP (Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation
for Transformers"); LayerNorm and the activations keep the rules above:

- The two products A V and Q Kᵀ, bilinear in two relevance-carrying inputs, split the ε rule's
  relevance evenly between their factors (the uniform rule): with S_O = R_O / stab(O),
        R_V = ½ V ⊙ Aᵀ S_O,   R_A = ½ A ⊙ S_O Vᵀ.
- The softmax A = softmax(X) (X = scale·Q Kᵀ + masks) takes its Taylor decomposition at X,
  R_X = X ⊙ (R_A/A − Σ_j A_j R_A,j/A_j) = X ⊙ Jᵀ(R_A / A), J the softmax Jacobian. R_A / A is
  ½ S_O Vᵀ, so the step needs no division by A (which underflows to 0 where a mask or a large
  logit gap puts it): G = Jᵀ(½ S_O Vᵀ) is one softmax backward. The masks are constants that
  absorb their share, as biases do under the ε rule; the logits take no ε of their own (R_X / X
  at the product is G exactly).
- Q Kᵀ: R_Q = ½ scale · Q ⊙ G K and R_K = ½ scale · K ⊙ Gᵀ Q. nn.MultiheadAttention's query and
  key in-projections take the ε rule, as its value and output projections do.

This equals gradient × input of the model in which σ is detached, A V and Q Kᵀ are written
½(A V.detach() + A.detach() V) (likewise for Q Kᵀ), the softmax is left as it is, and activations
are linearised as above. The relevance is not conserved through the softmax: the share of the
constant term of its linearisation is absorbed. The backward keeps two tensors of the attention's
size per head (K times that for K targets) where CP-LRP keeps one.

Relevance messages carry K*B rows (K targets per sample), the saved forward tensors B rows:
`per_sample` (lrpfast/nodes/messages.py) views a message as (B, K, ...) where a saved tensor must broadcast over K.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import ops
from .nodes import DIVIDED, LATER, LAZY, Msg, Step, _EpsilonStep, divide, per_sample, value
from .ops import RelevanceError


ATTENTION_RULES = ("cp", "attnlrp")


def shared_matmul(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """s @ w for K maps per sample s (K*B, *, M, N) and a per-sample w (B, *, N, P): (K*B, *, M, P),
    with w broadcast over the K maps of its sample (no copy)."""
    b = w.shape[0]
    k = s.shape[0] // b
    if k == 1:
        return torch.matmul(s, w)
    out = torch.matmul(per_sample(s, b), w.unsqueeze(1))
    return out.reshape(b * k, *out.shape[2:])


def softmax_rule(attn: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Jᵀ g of the softmax A = attn (B, *, L, S) along its last dim for K maps per sample g
    (K*B, *, L, S): A ⊙ (g − Σ_j A_j g_j), AttnLRP's softmax rule on R_A / A = g. Overwrites g."""
    b = attn.shape[0]
    if g.shape[0] == b:
        return torch._softmax_backward_data(g, attn, -1, attn.dtype)
    gv, a = per_sample(g, b), attn.unsqueeze(1)
    gv.sub_((gv * a).sum(-1, keepdim=True)).mul_(a)
    return g


def check_attention_rule(where: str, attention: str) -> str:
    if attention not in ATTENTION_RULES:
        raise RelevanceError(f"{where}: attention must be one of {ATTENTION_RULES}, got {attention!r}")
    return attention


def _messages(parts):
    """[(src, c, x)] -> LAZY messages R = x ⊙ c; parts on the same tensor x (self-attention: q, k
    and v one node) are summed into one message, as graph.relevance would combine them."""
    out = []
    for src, c, x in parts:
        same = next((m for j, m in out if j == src and m.x is x), None)
        if same is not None:
            same.a.add_(c)
        else:
            out.append((src, Msg(LAZY, c, x, True)))
    return out


def _sum_to(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """c (K*B, ...) summed over the dims where x (B, ...) has size 1 and was broadcast (the head dim
    of a multi-query key/value): each broadcast copy's relevance goes back to the one it copies."""
    dims = [d for d in range(1, x.dim()) if x.shape[d] == 1 and c.shape[d] != 1]
    return c.sum(dims, keepdim=True) if dims else c


def attend_back(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Aᵀ s for attention weights a (B, *heads, L, S) and K maps per sample s (K*B, *heads, L, D):
    (K*B, *heads, S, D). The K maps of a sample share its A: they ride in the last dim of one
    batched matmul (B, *heads, L, K*D) instead of copying A K times."""
    b = a.shape[0]
    k = s.shape[0] // b
    at = a.transpose(-1, -2)
    if k == 1:
        return torch.matmul(at, s)
    d = s.shape[-1]
    sk = per_sample(s, b).movedim(1, -2)                    # (B, *heads, L, K, D)
    c = torch.matmul(at, sk.reshape(*sk.shape[:-2], k * d))  # (B, *heads, S, K*D)
    c = c.view(*c.shape[:-1], k, d).movedim(-2, 1)           # (B, K, *heads, S, D)
    return c.reshape(b * k, *c.shape[2:])


# ============================================================================= LayerNorm


class LayerNormStep(_EpsilonStep):
    """nn.LayerNorm / F.layer_norm with σ held constant (module docstring)."""

    batch_anywhere = True

    def __init__(self, name, normalized_shape, ln_eps, affine, eps, stabilizer, op):
        super().__init__(name, eps, stabilizer)
        self.normalized_shape = tuple(normalized_shape)
        self.ln_eps = float(ln_eps)
        self.affine = affine  # env -> (weight or None, bias or None)
        self.op = op

    def forward(self, env, call):
        x = env[self.src]
        nd = len(self.normalized_shape)
        if x.dim() - nd <= call.bdim.get(self.src, 0) or tuple(x.shape[x.dim() - nd:]) != self.normalized_shape:
            raise RelevanceError(f"LRP: {self.describe()} normalises over {self.normalized_shape}, which must be the "
                                 f"last dims of a batched input and not include the batch; got {tuple(x.shape)}")
        w, b = self.affine(env)
        # One fused kernel that also returns 1/σ (the constant of the rule), as autograd's would.
        z, _, rstd = torch.native_layer_norm(x, self.normalized_shape, w, b, self.ln_eps)
        bf = lambda t: call.batch_first(self.src, t)  # noqa: E731
        call.saved[self.index] = (bf(x), bf(z), bf(rstd), w)
        return z

    def relprop(self, msg, call):
        x, z, rstd, w = call.saved[self.index]
        s = self._s(msg, call)   # R / stab(z): a temporary of this step (fused division or a scatter)
        if w is not None:
            s.mul_(w)
        dims = tuple(range(s.dim() - len(self.normalized_shape), s.dim()))
        s.sub_(s.mean(dims, keepdim=True))
        if s.shape[0] == x.shape[0]:
            s.mul_(rstd)
        else:
            per_sample(s, x.shape[0]).mul_(rstd.unsqueeze(1))
        return [(self.src, Msg(LAZY, s, x, True))]


# ============================================================================= attention


def _float_mask(mask, dtype, what):
    """An additive mask: bool True = masked out (nn.MultiheadAttention's convention)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise RelevanceError(f"{what} must be bool or floating point, got {mask.dtype}")
    return mask.to(dtype)


class MultiheadAttentionStep(Step):
    """nn.MultiheadAttention as one node: q, k, v in-projections, A = softmax(QKᵀ/√d + masks),
    O = A V per head, out-projection. Returns (output, weights or None) like the module; the
    relevance of output [0] reaches the value input only (module docstring)."""

    op = "MultiheadAttention"
    batch_anywhere = True   # batch_first=False: (L, B, E) in and out

    def __init__(self, name, module, load, eps, stabilizer, attention="cp"):
        super().__init__(name)
        self.module, self.load = module, load
        self.eps, self.stabilizer = eps, stabilizer
        self.attention = attention
        self.args = self.kwargs = None
        m = module
        for attr, what in (("bias_k", "add_bias_kv=True"), ("bias_v", "add_bias_kv=True")):
            if getattr(m, attr, None) is not None:
                raise RelevanceError(f"LRP: {self.describe()} uses {what}, which has no relevance rule")
        if getattr(m, "add_zero_attn", False):
            raise RelevanceError(f"LRP: {self.describe()} uses add_zero_attn=True, which has no relevance rule")

    def _weights(self):
        m = self.module
        e = m.embed_dim
        if m._qkv_same_embed_dim:
            wq, wk, wv = m.in_proj_weight.detach().split(e)
        else:
            wq, wk, wv = m.q_proj_weight.detach(), m.k_proj_weight.detach(), m.v_proj_weight.detach()
        bias = None if m.in_proj_bias is None else m.in_proj_bias.detach().split(e)
        bq, bk, bv = bias if bias is not None else (None, None, None)
        wo = m.out_proj.weight.detach()
        bo = None if m.out_proj.bias is None else m.out_proj.bias.detach()
        return (wq, wk, wv), (bq, bk, bv), wo, bo

    def forward(self, env, call):
        m = self.module
        a = self.load(env)
        q, k, v = a["query"], a["key"], a["value"]
        if m.training and m.dropout > 0:
            raise RelevanceError(f"LRP: {self.describe()} has dropout={m.dropout} in training mode; LRP explains a "
                                 "deterministic function: call model.eval() first")
        if not (isinstance(q, torch.Tensor) and q.dim() == 3 and k.dim() == 3 and v.dim() == 3):
            raise RelevanceError(f"LRP: {self.describe()} expects batched 3-d query, key and value, got "
                                 f"{[tuple(getattr(t, 'shape', ())) for t in (q, k, v)]}")
        want = 0 if m.batch_first else 1
        for what, i in zip(("query", "key", "value"), self.qkv_steps):
            if call.bdim.get(i, 0) != want:
                raise RelevanceError(
                    f"LRP: {self.describe()} has batch_first={m.batch_first}, but its {what} has the batch at dim "
                    f"{call.bdim.get(i, 0)}: the module would attend across samples. Pass (B, L, E) with "
                    "batch_first=True, or (L, B, E) (x.transpose(0, 1)) with batch_first=False")
        if not m.batch_first:  # (L, B, E): work batch-first on views, return (L, B, E)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            call.bdim[self.index] = 1
        b, lq, e = q.shape
        s_len = k.shape[1]
        h = m.num_heads
        hd = e // h
        (wq, wk, wv), (bq, bk, bv), wo, bo = self._weights()
        if q is k and k is v and m._qkv_same_embed_dim:  # self-attention: one packed projection
            qp, kp, vp = F.linear(q, m.in_proj_weight.detach(),
                                  None if m.in_proj_bias is None else m.in_proj_bias.detach()).split(e, -1)
            vp = vp.contiguous()
            if self.attention == "attnlrp":
                qp, kp = qp.contiguous(), kp.contiguous()
        else:
            qp, kp, vp = F.linear(q, wq, bq), F.linear(k, wk, bk), F.linear(v, wv, bv)
        qh = qp.reshape(b, lq, h, hd).transpose(1, 2)
        kh = kp.reshape(b, s_len, h, hd).transpose(1, 2)
        vh = vp.view(b, s_len, h, hd).transpose(1, 2)
        scores = torch.matmul(qh * (1.0 / math.sqrt(hd)), kh.transpose(-1, -2))      # (B, H, L, S)
        mask = _float_mask(a["attn_mask"], scores.dtype, f"LRP: {self.describe()}: attn_mask")
        if mask is not None:
            if mask.dim() == 2:
                scores = scores + mask
            elif mask.dim() == 3 and mask.shape[0] == b * h:
                scores = scores + mask.view(b, h, lq, s_len)
            else:
                raise RelevanceError(f"LRP: {self.describe()}: attn_mask must be (L, S) or (B*num_heads, L, S), got "
                                     f"{tuple(mask.shape)}")
        kpm = _float_mask(a["key_padding_mask"], scores.dtype, f"LRP: {self.describe()}: key_padding_mask")
        if kpm is not None:
            if tuple(kpm.shape) != (b, s_len):
                raise RelevanceError(f"LRP: {self.describe()}: key_padding_mask must be (B, S) = {(b, s_len)}, got "
                                     f"{tuple(kpm.shape)}")
            scores = scores + kpm.view(b, 1, 1, s_len)
        attn = torch.softmax(scores, -1)
        scores = None
        o = torch.matmul(attn, vh).transpose(1, 2).reshape(b, lq, e)
        out = F.linear(o, wo, bo)
        qk = (q, k, qp, kp, wq, wk) if self.attention == "attnlrp" else None
        call.saved[self.index] = (v, vp, attn, o, out, wv, wo, m.batch_first, qk)
        weights = None
        if a["need_weights"]:
            weights = attn.mean(1) if a["average_attn_weights"] else attn
        return (out if m.batch_first else out.transpose(0, 1)), weights

    def saved_extra(self, call):
        _, vp, attn, o, *_, qk = call.saved[self.index]
        # B·H·L·S for A: often more than the block's activations
        return (vp, attn, o) if qk is None else (vp, attn, o, qk[2], qk[3])

    def relprop_scratch(self, call):
        attn, qk = call.saved[self.index][2], call.saved[self.index][-1]
        # AttnLRP: the softmax rule's input and output, each the size of A per map
        return 0 if qk is None else 2 * attn.numel() * attn.element_size()

    def relprop(self, msg, call):
        v, vp, attn, o, out, wv, wo, batch_first, qk = call.saved[self.index]
        eps, stab = self.eps, self.stabilizer
        s = divide(msg, out, eps, stab)                         # out-projection: R / stab(out)
        c = torch.matmul(s, wo)                                 # Woᵀ s
        s = ops.mul_stab_div(c, o, o, eps, stab)                # O = A V: R_O / stab(O)
        kb, lq, e = s.shape
        b, h, _, s_len = attn.shape
        hd = e // h
        sh = s.view(kb, lq, h, hd).transpose(1, 2)              # per head (K*B, H, L, hd)
        c = attend_back(attn, sh).transpose(1, 2).reshape(kb, -1, e)   # Aᵀ s, (K*B, S, E)
        if qk is not None:
            c.mul_(0.5)                                         # AttnLRP: half of A V's relevance to V
        s = ops.mul_stab_div(c, vp, vp, eps, stab)              # value projection: R_V / stab(V)
        c = torch.matmul(s, wv)                                 # Wvᵀ s
        if qk is None:
            return [(self.value_src, Msg(LAZY, c, v, True))]
        q, k, qp, kp, wq, wk = qk
        # the other half to A, through the softmax (one backward) to the logits scale·Q Kᵀ
        vh = vp.view(b, s_len, h, hd).transpose(1, 2)           # (B, H, S, hd)
        g = softmax_rule(attn, shared_matmul(sh, vh.transpose(-1, -2)))   # (K*B, H, L, S)
        g.mul_(0.25 / math.sqrt(hd))        # ½ of A V's relevance to A, ½ of that to each of Q, K
        qh = qp.view(b, lq, h, hd).transpose(1, 2)
        kh = kp.view(b, s_len, h, hd).transpose(1, 2)
        cq = shared_matmul(g, kh).transpose(1, 2).reshape(kb, lq, e)                  # at Q
        ck = shared_matmul(g.transpose(-1, -2), qh).transpose(1, 2).reshape(kb, s_len, e)   # at K
        g = None
        cq = torch.matmul(ops.mul_stab_div(cq, qp, qp, eps, stab), wq)     # query projection (ε)
        ck = torch.matmul(ops.mul_stab_div(ck, kp, kp, eps, stab), wk)     # key projection (ε)
        qs, ks, vs = self.qkv_steps
        return _messages([(vs, c, v), (qs, cq, q), (ks, ck, k)])

    def zero_preserving(self, plan):
        return True  # R_v = v ⊙ c


class ScaledDotProductAttentionStep(Step):
    """F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal, scale): A is
    computed explicitly (the relevance step needs it), O = A v; relevance to v only."""

    op = "scaled_dot_product_attention"
    fresh_output = True
    has_denominator = True

    takes_later = True   # query/key may be LATER (recomputed: lrpfast/nodes/remat.py, fusion.rematerialize)
    remat_qk = (None, None)   # the steps whose outputs query and key are, where those recompute them

    def __init__(self, name, load, is_causal, scale, eps, stabilizer, attention="cp"):
        super().__init__(name)
        self.load, self.is_causal, self.scale = load, bool(is_causal), scale
        self.eps, self.stabilizer = eps, stabilizer
        self.attention = attention

    def forward(self, env, call):
        a = self.load(env)
        q, k, v = a["query"], a["key"], a["value"]
        # equal leading dims: one broadcast over merged rows (a batch of 1 merged with windows,
        # lrpfast/merged_batch.py) would share one row's relevance among many
        if q.dim() < 3 or k.dim() != q.dim() or v.dim() != q.dim() or not q.shape[0] == k.shape[0] == v.shape[0]:
            raise RelevanceError(f"LRP: {self.describe()} expects (B, ..., L, E) query, key and value, got "
                                 f"{[tuple(t.shape) for t in (q, k, v)]}")
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        attn = self._weights(q, k, a["attn_mask"], scale)
        if attn.shape[0] != v.shape[0] or any(n != m and n != 1 for n, m in zip(v.shape[1:-2], attn.shape[1:-2])):
            raise RelevanceError(f"LRP: {self.describe()}: value of shape {tuple(v.shape)} does not fit the "
                                 f"attention weights {tuple(attn.shape)}")
        # a head dim of 1 in q, k or v broadcasts within each sample (multi-query attention: one key and
        # value head for all query heads); relprop sums the heads' relevance back (_sum_to)
        if attn.dim() == 4 and v.dim() == 4 and not torch.compiler.is_compiling():   # (dynamo: no strided out=)
            # (B, heads, L, D) laid out as (B, L, heads, D): the heads' merge that follows
            # (o.transpose(1, 2).contiguous().reshape(B, L, -1)) is then a view, not a copy
            bsz, heads, lq, d = attn.shape[0], attn.shape[1], attn.shape[2], v.shape[-1]
            o = torch.matmul(attn, v, out=attn.new_empty((bsz, lq, heads, d)).transpose(1, 2))
        else:
            o = torch.matmul(attn, v)
        qk = None
        if self.attention == "attnlrp":
            # a query/key the relevance pass recomputes (a rotary embedding: fusion.rematerialize)
            later = lambda t, i, j: LATER if i is not None and i in call.remat and t is env[j] and not call.bdim else t  # noqa: E731
            qk = (later(q, self.remat_qk[0], self.query_src), later(k, self.remat_qk[1], self.key_src), scale,
                  a["attn_mask"])
            attn = LATER   # recomputed from q and k, which AttnLRP keeps anyway (one (B, heads, L, S) fewer)
        call.saved[self.index] = (v, attn, o, qk)
        return o

    def _weights(self, q, k, mask, scale):
        """A = softmax(scale · q kᵀ + mask), in the forward and again in AttnLRP's relevance step
        (which recomputes A from the query and key it keeps rather than keep A)."""
        if not self.is_causal and isinstance(mask, torch.Tensor) and mask.is_floating_point() \
                and mask.dtype == q.dtype and mask.dim() <= q.dim() and not torch.compiler.is_compiling():
            # scores = mask + scale * (q kᵀ): the scaling and the mask in one pass
            scores = torch.matmul(q, k.transpose(-1, -2))
            if all(m in (1, n) for m, n in zip(mask.shape[::-1], scores.shape[::-1])):
                scores = torch.add(mask, scores, alpha=scale, out=scores)
                mask = None
            else:
                scores = scores.mul_(scale)
        else:
            scores = torch.matmul(q * scale, k.transpose(-1, -2))
        lq, s_len = scores.shape[-2:]
        if self.is_causal:
            causal = torch.ones(lq, s_len, dtype=torch.bool, device=q.device).tril_()
            mask = causal if mask is None else (causal & mask if mask.dtype == torch.bool else
                                                mask.masked_fill(~causal, float("-inf")))
        if mask is not None:
            # SDPA's convention: a bool mask is True where attention takes part
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return torch.softmax(scores, -1)

    def denominator(self, call):
        return call.saved[self.index][2], self.eps, self.stabilizer

    def output_of(self, call):
        return call.saved[self.index][2]

    def saved_extra(self, call):
        attn = call.saved[self.index][1]
        return () if attn is LATER else (attn,)

    def relprop_scratch(self, call):
        v, attn, o, qk = call.saved[self.index]
        if qk is None:
            return 0
        if attn is LATER:   # recomputed A besides the two attention-sized temporaries
            return 3 * (o.numel() // o.shape[-1]) * v.shape[-2] * o.element_size()
        return 2 * attn.numel() * attn.element_size()

    def relprop(self, msg, call):
        v, attn, o, qk = call.saved[self.index]
        if qk is not None:
            q, k, scale, mask = qk
            q = value(call, self.remat_qk[0]) if q is LATER else q
            k = value(call, self.remat_qk[1]) if k is LATER else k
            qk = (q, k, scale)
            if attn is LATER:
                attn = self._weights(q, k, mask, scale)
        s = msg.a if msg.kind == DIVIDED else divide(msg, o, self.eps, self.stabilizer)
        if qk is not None and s.dim() == 4 and s.shape == o.shape and attn.is_contiguous() \
                and qk[0].shape[:-2] == qk[1].shape[:-2] == v.shape[:-2] == attn.shape[:-2] \
                and not torch.compiler.is_compiling():
            return self._relprop_4d(s, v, attn, *qk)
        c = _sum_to(attend_back(attn, s), v)
        if qk is None:
            return [(self.value_src, Msg(LAZY, c, v, True))]
        q, k, scale = qk
        c.mul_(0.5)                                                        # AttnLRP (module docstring)
        g = softmax_rule(attn, shared_matmul(s, v.transpose(-1, -2)))     # (K*B, ..., L, S)
        g.mul_(0.25 * scale)                # ½ of A V's relevance to A, ½ of that to each of Q, K
        cq = _sum_to(shared_matmul(g, k), q)
        ck = _sum_to(shared_matmul(g.transpose(-1, -2), q), k)
        return _messages([(self.value_src, c, v), (self.query_src, cq, q), (self.key_src, ck, k)])

    def _relprop_4d(self, s, v, attn, q, k, scale):
        """AttnLRP's step (relprop) for one map per sample of (B, heads, L, D) tensors: s made
        contiguous once for its two products; the value's relevance written in the (B, L, heads, D)
        layout the value projection's output has; the ¼·scale of the query/key relevance taken
        inside their batched GEMMs (baddbmm's alpha)."""
        bsz, heads, lq, d = s.shape
        s_len = attn.shape[-1]
        s = s.contiguous()
        c = torch.matmul(attn.transpose(-1, -2), s, out=s.new_empty((bsz, s_len, heads, d)).transpose(1, 2))
        c.mul_(0.5)
        g = softmax_rule(attn, torch.matmul(s, v.transpose(-1, -2)))      # (B, heads, L, S)
        alpha = 0.25 * scale
        g3 = g.view(bsz * heads, lq, s_len)
        qc, kc = q.contiguous(), k.contiguous()
        cq = torch.baddbmm(g.new_empty((bsz * heads, lq, qc.shape[-1])), g3, kc.view(bsz * heads, s_len, -1),
                           beta=0, alpha=alpha).view(bsz, heads, lq, -1)
        ck = torch.baddbmm(g.new_empty((bsz * heads, s_len, kc.shape[-1])), g3.transpose(1, 2),
                           qc.view(bsz * heads, lq, -1), beta=0, alpha=alpha).view(bsz, heads, s_len, -1)
        return _messages([(self.value_src, c, v), (self.query_src, cq, q), (self.key_src, ck, k)])

    def zero_preserving(self, plan):
        return True


class GroupedQueryAttentionStep(ScaledDotProductAttentionStep):
    """F.scaled_dot_product_attention(..., enable_gqa=True): H query heads share H/g key/value heads
    (query head h reads key/value head h // g, SDPA's repeat_interleave). It runs as the multi-query
    case one dim up, q (B, H/g, g, L, D) against k, v (B, H/g, 1, S, D): the relevance of the g copies
    of a key/value head is summed back to it by the same broadcast rule (_sum_to), with no copies of
    k and v in either pass. Output and messages keep SDPA's (B, H, L, D) layout."""

    def __init__(self, name, load, is_causal, scale, eps, stabilizer, attention="cp"):
        super().__init__(name, lambda env: self._grouped(load(env)), is_causal, scale, eps, stabilizer, attention)

    def _grouped(self, a):
        q, k, v = a["query"], a["key"], a["value"]
        if not (isinstance(q, torch.Tensor) and q.dim() >= 4 and k.dim() == q.dim() == v.dim()
                and k.shape[-3] == v.shape[-3] and q.shape[-3] % k.shape[-3] == 0):
            raise RelevanceError(f"LRP: {self.describe()} with enable_gqa=True expects (B, heads, L, E) query, key and "
                                 "value with the query's heads a multiple of the key's and value's, got "
                                 f"{[tuple(getattr(t, 'shape', ())) for t in (q, k, v)]}")
        kv_heads = k.shape[-3]
        groups = q.shape[-3] // kv_heads
        mask = a["attn_mask"]
        if isinstance(mask, torch.Tensor) and mask.dim() >= 3:     # its head dim: H, or 1 (broadcast)
            mask = mask.unflatten(-3, (kv_heads, groups)) if mask.shape[-3] == q.shape[-3] else mask.unsqueeze(-3)
        return dict(a, query=q.unflatten(-3, (kv_heads, groups)), key=k.unsqueeze(-3), value=v.unsqueeze(-3),
                    attn_mask=mask)

    def forward(self, env, call):
        return super().forward(env, call).flatten(-4, -3)          # (B, H/g, g, L, D) -> (B, H, L, D), a view

    def denominator(self, call):
        return call.saved[self.index][2].flatten(-4, -3), self.eps, self.stabilizer

    def output_of(self, call):
        return call.saved[self.index][2].flatten(-4, -3)

    def relprop(self, msg, call):
        o = call.saved[self.index][2]
        grouped = lambda t: t.unflatten(-3, o.shape[-4:-2])   # noqa: E731  (.., H, L, D) -> (.., H/g, g, L, D)
        x = grouped(msg.x) if msg.kind == LAZY and isinstance(msg.x, torch.Tensor) else msg.x
        outs = super().relprop(Msg(msg.kind, grouped(msg.a), x, msg.owned), call)
        # q's (.., H/g, g, L, D) and k's / v's (.., H/g, 1, S, D) back to SDPA's own (.., heads, len, D)
        return [(src, Msg(m.kind, m.a.flatten(-4, -3), m.x.flatten(-4, -3), m.owned)) for src, m in outs]
