"""Per-token AttnLRP relevance of lrpfast (lrpfast.hf) against LXT 2.1 on unmodified Hugging Face
models: tiny random configs, float64, the same weights, relative L2 per sample (target ≤ 1e-6).

Runs in the LXT environment (benchmarks/lxt_env.sh; lrpfast comes from this checkout):

    bash benchmarks/lxt_env.sh
    .venv-lxt/bin/python benchmarks/lxt_parity.py                  # all families, sdpa + eager
    .venv-lxt/bin/python benchmarks/lxt_parity.py --models llama --attn eager --json /tmp/p.json

For each family (BERT sequence classifier; GPT-2, Llama, Qwen2, Qwen3, Gemma3 causal LMs: the
families LXT 2.1's efficient mode patches; Mistral with a map of LXT's Llama patches), attention implementation and case (one sample; a batch
of 3 with right padding, samples of 12, 10 and 8 tokens), three maps of the same target (the
classifier's argmax class, or the argmax next-token logit at each sample's last real token):

  lxt      LXT 2.1, efficient AttnLRP as shipped: gradient x input at inputs_embeds (the word
           embedding output) of the patched model, summed over the hidden dim;
  lrpfast  lrpfast.hf.LRP(model, attention="attnlrp", eps=--eps)(input_ids, attention_mask=...).tokens;
  oracle   lrpfast.oracle.gradient_oracle: plain autograd of the *unpatched* model under the
           detach rules (σ of norms detached, activations x·(f(x)/x).detach(), products split in
           half, softmax differentiated): what ε-LRP with ε = 0 is, computed by neither library.
  lxt0     LXT with its identity rule's hard-wired ε (f(x)/(x + 1e-10)) set to 0: separates that
           ε's share of the lxt-lrpfast gap from a difference in the rules.

Both libraries' maps start from the logit (gradient x input with the backward seeded by 1; lrpfast's
init="logit"). Relative L2 is per sample over its real tokens; the table shows the largest over
the batch. "alone" compares each padded sample's lrpfast map with the map of the sample alone.
Results go to benchmarks/lxt_parity_results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import lxt_common as C  # noqa: E402

TARGET = 1e-6
CASES = {"b1": (1, 12, False), "b3-padded": (3, 12, True)}


def rel_l2_per_sample(a, b, mask):
    """max over samples of |a - b| / |b| over the sample's real tokens (a zero b: |a - b|)."""
    out = []
    for i in range(a.shape[0]):
        keep = mask[i].bool()
        d, n = (a[i][keep] - b[i][keep]).norm(), b[i][keep].norm()
        out.append((d / n).item() if n > 0 else d.item())
    return max(out)


class _Logits(torch.nn.Module):
    """inputs_embeds -> the explained logits (B, C): for the oracle (a model of one tensor)."""

    def __init__(self, built, mask, positions):
        super().__init__()
        self.model, self.kind, self.mask, self.positions = built.model, built.kind, mask, positions

    def forward(self, e):
        kw = {"use_cache": False} if self.kind == "causal" else {}
        logits = self.model(inputs_embeds=e, attention_mask=self.mask, **kw).logits
        if self.kind == "causal":
            logits = logits.gather(1, self.positions[:, None, None].expand(-1, 1, logits.shape[-1])).squeeze(1)
        return logits


def oracle_tokens(built, ids, mask, target):
    from lrpfast.oracle import gradient_oracle

    e = built.model.get_input_embeddings()(ids).detach()
    f = _Logits(built, mask, C.last_positions(mask)).eval()
    return gradient_oracle(f, e, target, attention="attnlrp").sum(-1)


def lrpfast_tokens(built, ids, mask, target, eps):
    import lrpfast.hf

    e = lrpfast.hf.LRP(built.model, attention="attnlrp", eps=eps)(ids, attention_mask=mask, target=target)
    return e.tokens, e


def lxt_tokens(built, ids, mask, act_eps=None):
    """LXT's map; act_eps: override of its identity rule's ε (1e-10 as shipped)."""
    from lxt.efficient.rules import identity_rule_implicit_fn as fn

    saved = fn.forward.__defaults__
    try:
        if act_eps is not None:
            fn.forward.__defaults__ = (act_eps,)
        with C.lxt_patched(built) as model:
            r, full, logits, t = C.lxt_relevance(built, model, ids, mask)
    finally:
        fn.forward.__defaults__ = saved
    return r, full, logits, t


def run_case(name, attn, case, eps):
    batch, seq, padded = CASES[case]
    built = C.build(name, attn=attn)
    ids, mask = C.inputs(batch, seq, padded)
    row = {"model": name, "class": built.model_class, "attn": attn, "case": case, "batch": batch, "seq": seq}
    lxt, lxt_full, logits, t = lxt_tokens(built, ids, mask)
    if not torch.isfinite(logits.gather(-1, logits.argmax(-1, keepdim=True))).all() or not torch.isfinite(lxt).all():
        row["skipped"] = "NaN in the model's own logits (transformers issue with this mask and attention)"
        return row
    lxt0 = lxt_tokens(built, ids, mask, act_eps=0.0)[0]
    oracle = oracle_tokens(built, ids, mask, t)
    row.update(lxt_vs_oracle=rel_l2_per_sample(lxt, oracle, mask), lxt0_vs_oracle=rel_l2_per_sample(lxt0, oracle, mask))
    try:
        ours, e = lrpfast_tokens(built, ids, mask, t, eps)
    except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
        row["lrpfast_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        return row
    row.update(lrpfast_vs_lxt=rel_l2_per_sample(ours, lxt, mask), lrpfast_vs_lxt0=rel_l2_per_sample(ours, lxt0, mask),
               lrpfast_vs_oracle=rel_l2_per_sample(ours, oracle, mask),
               full_map_vs_lxt=rel_l2_per_sample(e.relevance, lxt_full, mask),
               targets_equal=bool((e.targets.reshape(-1) == t.reshape(-1)).all()))
    if padded:
        alone = []
        for i in range(batch):
            n = int(mask[i].sum())
            r1, _ = lrpfast_tokens(built, ids[i:i + 1, :n], mask[i:i + 1, :n], t[i:i + 1], eps)
            alone.append(((r1[0] - ours[i, :n]).norm() / r1[0].norm()).item())
        row["lrpfast_batch_vs_alone"] = max(alone)
    row["ok"] = row["lrpfast_vs_lxt"] <= TARGET and row["targets_equal"]
    return row


def fmt(v):
    return "—" if v is None else f"{v:.1e}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(C.MODELS), choices=list(C.MODELS))
    ap.add_argument("--attn", nargs="+", default=["sdpa", "eager"], choices=["sdpa", "eager"])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--eps", type=float, default=0.0, help="lrpfast's ε (LXT has none in its Linear layers)")
    ap.add_argument("--json", default=os.path.join(HERE, "lxt_parity_results.json"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import lxt
    import transformers

    print(f"# lrpfast vs LXT {getattr(lxt, '__version__', '2.1')} (AttnLRP, float64, eps={args.eps}) — transformers "
          f"{transformers.__version__}, torch {torch.__version__}; relative L2 of per-token relevance, max over samples")
    print("| model | attn | case | lrpfast vs LXT | lrpfast vs oracle | LXT vs oracle | LXT(ε=0) vs oracle | "
          "full (B,L,D) vs LXT | batch vs alone | ok |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    for name in args.models:
        for attn in args.attn:
            for case in args.cases:
                row = run_case(name, attn, case, args.eps)
                rows.append(row)
                if "skipped" in row:
                    print(f"| {name} | {attn} | {case} | skipped: {row['skipped']} |||||||", flush=True)
                    continue
                if "lrpfast_error" in row:
                    print(f"| {name} | {attn} | {case} | lrpfast: {row['lrpfast_error']} | — | {fmt(row['lxt_vs_oracle'])} "
                          f"| {fmt(row['lxt0_vs_oracle'])} | — | — | no |", flush=True)
                    continue
                print(f"| {name} | {attn} | {case} | {fmt(row['lrpfast_vs_lxt'])} | {fmt(row['lrpfast_vs_oracle'])} | "
                      f"{fmt(row['lxt_vs_oracle'])} | {fmt(row['lxt0_vs_oracle'])} | {fmt(row['full_map_vs_lxt'])} | "
                      f"{fmt(row.get('lrpfast_batch_vs_alone'))} | {'yes' if row['ok'] else 'NO'} |", flush=True)
    meta = {"target": TARGET, "eps": args.eps, "transformers": transformers.__version__, "torch": torch.__version__,
            "machine": platform.machine(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    ok = [r for r in rows if "skipped" not in r]
    return 0 if all(r.get("ok") for r in ok) else 1


if __name__ == "__main__":
    sys.exit(main())
