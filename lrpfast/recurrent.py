"""nn.LSTM and nn.GRU as one node each: gated recurrent LRP (Arras et al. 2017).

A gate (a sigmoid output multiplying a signal) passes no relevance: the product's relevance goes
to the signal whole ("signal-take-all"). tanh passes relevance through like any activation. The
sums in between take the ε rule, a bias absorbing its share:

    LSTM  c_t = f ⊙ c_{t-1} + i ⊙ g,   g = tanh(W_g x_t + U_g h_{t-1} + b_g),   h_t = o ⊙ tanh(c_t)
          R(c_t) = R(h_t) + R(c_t from step t+1)
          R(c_{t-1}) += f ⊙ c_{t-1} ⊙ s,   R(g) = i ⊙ g ⊙ s,          s = R(c_t) / stab(c_t)
          R(x_t) = x_t ⊙ W_gᵀ s_g,   R(h_{t-1}) += h_{t-1} ⊙ U_gᵀ s_g,   s_g = R(g) / stab(z_g)

    GRU   h_t = (1 - z) ⊙ n + z ⊙ h_{t-1},   n = tanh(W_n x_t + b_in + r ⊙ (U_n h_{t-1} + b_hn))
          R(n) = (1 - z) ⊙ n ⊙ s,   R(h_{t-1}) += z ⊙ h_{t-1} ⊙ s,        s = R(h_t) / stab(h_t)
          R(x_t) = x_t ⊙ W_nᵀ s_n,   R(h_{t-1}) += h_{t-1} ⊙ U_nᵀ (r ⊙ s_n), s_n = R(n) / stab(a_n)

At eps = 0 this is gradient x input of the network with its gates and tanh ratios held constant
(lrpfast.oracle writes the cells out that way, from its own code). Layers run top to bottom,
directions apart (a bidirectional layer's output is [forward | backward]); relevance reaching the
final states h_n / c_n enters where they were computed. The input projections of all time steps
are one GEMM each way; only the recurrence runs step by step.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .nodes import DENSE, Msg, Step, materialize
from .ops import RelevanceError, stab_div

RECURRENT = (nn.LSTM, nn.GRU)


class RecurrentStep(Step):
    """The module's own output: (output, (h_n, c_n)) for an LSTM, (output, h_n) for a GRU."""

    batch_anywhere = True      # batch_first=False: (T, B, F)

    def __init__(self, name, module, eps, stabilizer):
        super().__init__(name)
        self.module, self.eps, self.stabilizer = module, eps, stabilizer
        self.lstm = isinstance(module, nn.LSTM)
        self.op = type(module).__name__
        if getattr(module, "proj_size", 0):
            raise RelevanceError(f"LRP: {self.describe()} has proj_size={module.proj_size}, which has no relevance "
                                 "rule (the projected hidden state)")

    # ------------------------------------------------------------------------- forward

    def _weights(self, layer, direction):
        m, sfx = self.module, f"_l{layer}" + ("_reverse" if direction else "")
        w_ih, w_hh = getattr(m, "weight_ih" + sfx).detach(), getattr(m, "weight_hh" + sfx).detach()
        b_ih = getattr(m, "bias_ih" + sfx).detach() if m.bias else None
        b_hh = getattr(m, "bias_hh" + sfx).detach() if m.bias else None
        return w_ih, w_hh, b_ih, b_hh

    def _run(self, x, layer, direction):
        """One layer and direction over x (B, T, F): its outputs (B, T, H) in time order and what
        the relevance pass needs."""
        w_ih, w_hh, b_ih, b_hh = self._weights(layer, direction)
        b, t_len, _ = x.shape
        h_size = w_hh.shape[1]
        steps = range(t_len - 1, -1, -1) if direction else range(t_len)
        xw = torch.nn.functional.linear(x, w_ih, b_ih)          # every time step's input part at once
        h = x.new_zeros(b, h_size)
        c = x.new_zeros(b, h_size) if self.lstm else None
        keep = {k: x.new_empty(b, t_len, h_size) for k in
                (("h_prev", "c_prev", "i", "f", "g", "z_g", "c", "h") if self.lstm
                 else ("h_prev", "r", "z", "n", "a_n", "h"))}
        for t in steps:
            hw = torch.nn.functional.linear(h, w_hh, b_hh)
            keep["h_prev"][:, t] = h
            if self.lstm:
                zi, zf, zg, zo = (xw[:, t] + hw).chunk(4, 1)
                i, f, g, o = torch.sigmoid(zi), torch.sigmoid(zf), torch.tanh(zg), torch.sigmoid(zo)
                keep["c_prev"][:, t] = c
                c = f * c + i * g
                h = o * torch.tanh(c)
                for k, v in (("i", i), ("f", f), ("g", g), ("z_g", zg), ("c", c)):
                    keep[k][:, t] = v
            else:
                xr, xz, xn = xw[:, t].chunk(3, 1)
                hr, hz, hn = hw.chunk(3, 1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                a_n = xn + r * hn
                n = torch.tanh(a_n)
                h = (1 - z) * n + z * h
                for k, v in (("r", r), ("z", z), ("n", n), ("a_n", a_n)):
                    keep[k][:, t] = v
            keep["h"][:, t] = h
        keep["x"] = x
        return keep["h"], h, c, keep

    def forward(self, env, call):
        m = self.module
        x = env[self.src]
        if m.training and m.dropout > 0 and m.num_layers > 1:
            raise RelevanceError(f"LRP: {self.describe()} has dropout={m.dropout} in training mode; LRP explains a "
                                 "deterministic function: call model.eval() first")
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise RelevanceError(f"LRP: {self.describe()} expects a batched 3-d input (packed sequences are not "
                                 f"supported), got {tuple(getattr(x, 'shape', ()))}")
        want = 0 if m.batch_first else 1
        if call.bdim.get(self.src, 0) != want:
            raise RelevanceError(f"LRP: {self.describe()} has batch_first={m.batch_first}, but its input has the "
                                 f"batch at dim {call.bdim.get(self.src, 0)}: it would run across samples")
        xb = x if m.batch_first else x.transpose(0, 1)
        dirs = 2 if m.bidirectional else 1
        records, h_n, c_n = [], [], []
        inp = xb
        for layer in range(m.num_layers):
            outs = []
            for d in range(dirs):
                seq, h, c, keep = self._run(inp, layer, d)
                outs.append(seq)
                records.append(keep)
                h_n.append(h)
                c_n.append(c)
            inp = torch.cat(outs, -1) if dirs > 1 else outs[0]
        out = inp if m.batch_first else inp.transpose(0, 1)
        if not m.batch_first:
            call.bdim[self.index] = 1
        call.saved[self.index] = {"records": records, "out_shape": inp.shape, "state_relevance": {}}
        h_n = torch.stack(h_n)
        return (out, (h_n, torch.stack(c_n))) if self.lstm else (out, h_n)

    # ------------------------------------------------------------------------- relevance

    def relprop(self, msg, call):
        m = self.module
        saved = call.saved[self.index]
        records, extra = saved["records"], saved["state_relevance"]
        b = records[0]["x"].shape[0]
        r_out = materialize(msg)     # (K*B, T, dirs*H), batch-first like every message: the output's relevance
        k = r_out.shape[0] // b
        dirs = 2 if m.bidirectional else 1
        r_seq = r_out.reshape(b, k, *r_out.shape[1:])
        for layer in range(m.num_layers - 1, -1, -1):
            r_in = None
            for d in range(dirs):
                j = layer * dirs + d
                h = records[j]["h"].shape[-1]
                part = r_seq[..., d * h:(d + 1) * h]
                r_x = self._cell_relprop(records[j], part, d, extra.get(("h", j)), extra.get(("c", j)), layer)
                r_in = r_x if r_in is None else r_in + r_x
            r_seq = r_in
        r_x = r_seq.reshape(b * k, *r_seq.shape[2:])
        return [(self.src, Msg(DENSE, r_x, None, True))]

    def _div(self, r, z):
        """r (B, K, ...) / stab(z) with z (B, ...), zero where stab(z) is 0."""
        b, k = r.shape[:2]
        s = stab_div(r.reshape(b * k, *r.shape[2:]).contiguous(), z.contiguous(), self.eps, self.stabilizer)
        return s.reshape(r.shape)

    def _cell_relprop(self, keep, r_seq, direction, r_h_final, r_c_final, layer):
        """The relevance of one layer-direction's input sequence (B, K, T, F) from that of its
        outputs (B, K, T, H) and of its final states ((K*B, H) or None)."""
        w_ih, w_hh, _, _ = self._weights(layer, direction)
        b, k, t_len, h_size = r_seq.shape
        x = keep["x"]
        one = lambda v: v.unsqueeze(1)    # noqa: E731  (B, ...) -> (B, 1, ...): the K maps alike
        carry_h = r_seq.new_zeros(b, k, h_size) if r_h_final is None else r_h_final.reshape(b, k, h_size).clone()
        carry_c = None
        if self.lstm:
            carry_c = r_seq.new_zeros(b, k, h_size) if r_c_final is None else r_c_final.reshape(b, k, h_size).clone()
            w_g, u_g = w_ih[2 * h_size:3 * h_size], w_hh[2 * h_size:3 * h_size]
        else:
            w_g, u_g = w_ih[2 * h_size:], w_hh[2 * h_size:]
        s_all = r_seq.new_zeros(b, k, t_len, h_size)     # s_g (LSTM) or s_n (GRU) of every step
        steps = range(t_len) if direction else range(t_len - 1, -1, -1)   # the forward's order, reversed
        for t in steps:
            r_h = r_seq[:, :, t] + carry_h
            h_prev = one(keep["h_prev"][:, t])
            if self.lstm:
                r_c = r_h + carry_c            # h_t = o ⊙ tanh(c_t): all of it to c_t
                s = self._div(r_c, keep["c"][:, t])
                carry_c = one(keep["f"][:, t] * keep["c_prev"][:, t]) * s
                s_g = self._div(one(keep["i"][:, t] * keep["g"][:, t]) * s, keep["z_g"][:, t])
                s_all[:, :, t] = s_g
                carry_h = h_prev * (s_g @ u_g)
            else:
                z = keep["z"][:, t]
                s = self._div(r_h, keep["h"][:, t])
                r_n = one((1 - z) * keep["n"][:, t]) * s
                s_n = self._div(r_n, keep["a_n"][:, t])
                s_all[:, :, t] = s_n
                carry_h = one(z) * h_prev * s + h_prev * ((one(keep["r"][:, t]) * s_n) @ u_g)
        # h_0 = c_0 = 0: what the carries hold now is relevance of zeros (0), dropped
        return x.unsqueeze(1) * (s_all @ w_g)


class RecurrentStateStep(Step):
    """out[1] of an LSTM/GRU and its parts: h_n (layers*dirs, B, H), c_n, or the (h_n, c_n) tuple.
    The relevance of h_n / c_n enters the recurrent step as that of its final states (kept with
    the step's saved state: the relevance pass sums messages per tensor, and these are not the
    step's output); the step gets a zero message so that it runs even when nothing else reaches
    its output."""

    op = "getitem"
    batch_anywhere = True

    def __init__(self, name, producer, which, item):
        super().__init__(name)
        self.producer, self.which, self.item = producer, which, item   # which: "h", "c" or "hc" (the tuple)

    def forward(self, env, call):
        v = env[self.src][self.item]
        if self.which != "hc":
            call.bdim[self.index] = 1          # (layers*dirs, B, H), whatever batch_first says
        return v

    def relprop(self, msg, call):
        if self.which == "hc":
            return []
        saved = call.saved[self.producer]
        r = materialize(msg)                   # batch-first: (K*B, layers*dirs, H)
        for j in range(r.shape[1]):
            key = (self.which, j)
            prev = saved["state_relevance"].get(key)
            saved["state_relevance"][key] = r[:, j] if prev is None else prev + r[:, j]
        shape = list(saved["out_shape"])
        shape[0] = r.shape[0]
        return [(self.producer, Msg(DENSE, r.new_zeros(shape), None, True))]
