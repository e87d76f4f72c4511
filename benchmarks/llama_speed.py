"""AttnLRP on a Llama-like model: lrpfast against the forward+backward floor and LXT 2.1, side by
side in one process; peak memory of each; a vit_b_16 row against its floor. (Issue 15.)

Runs in the LXT environment (benchmarks/lxt_env.sh builds it; lrpfast comes from this checkout):

    bash benchmarks/lxt_env.sh
    .venv-lxt/bin/python benchmarks/llama_speed.py                      # llama b1/b8 + vit b1/b8
    .venv-lxt/bin/python benchmarks/llama_speed.py --cases llama --batches 8 --rounds 21 --json out.json
    .venv-lxt/bin/python benchmarks/llama_speed.py --profile llama      # where lrpfast's time goes

Model: LlamaConfig with 4 layers, hidden 256, 4 heads (head_dim 64), intermediate 688 (Llama's
8/3 ratio), vocabulary --vocab (default 4096), random weights, eval, float32; seq 64, batch 1 and
8, torch.set_num_threads(--threads, default 2). The explained output is the next-token logit (the
argmax) at the last position; the backward seeded with 1 (in gradient x input the output's
relevance is then the logit: lrpfast's init="logit").

Contenders, each given input_ids:
  floor    DESIGN.md §2: embeddings e = embed(ids) (no grad), e.requires_grad_(); logits =
           model(inputs_embeds=e); torch.autograd.grad(target logit, e): one forward with autograd
           and the input gradient only (no weight gradients).
  lrpfast  AttnLRP (attention="attnlrp") through lrpfast's Hugging Face token API, relevance at the
           embedding output.
  lrpfast compiled   the same with compile=True (lrpfast/compiled.py): the forward and relevance
           pass as one inductor graph per input shape; its compile (two untimed calls) is set-up.
  floor compiled     the floor with the model's forward (and so its autograd backward) compiled by
           torch.compile: for reference, what a compiled gradient costs (--no-compiled skips both).
  LXT      LXT 2.1 efficient AttnLRP: its patches switched on around the call (a few setattr, not
           timed), then the same forward/backward as the floor through the patched modules, and
           relevance = e * e.grad summed over the hidden dim.
Timing: every round runs each contender once, in alternating order (interleaved, like
benchmarks/model_vs_floor.py), after 2 warm-up rounds; medians; ratios to the floor and to LXT.

Memory: the peak of torch's CPU allocations during one warm call, from the profiler's allocation
events (torch.profiler with profile_memory=True records every allocation and free of c10's CPU
allocator with its size and time; the running sum's maximum is the peak above what was live before
the call). tracemalloc does not see torch's allocations and a process's maxrss mixes in the
allocator's retention and everything run before, so neither is used. `retained` is what a
contender keeps allocated between calls (the net allocation of its construction and first call:
caches, workspaces); the comparison uses warm peak + retained. Allocations outside c10's allocator
(oneDNN scratch buffers, glibc arenas) are not counted, for any contender.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import lrpfast  # noqa: E402

TARGETS = {"floor": 0.8, "lxt": 0.8}     # lrpfast time / floor, lrpfast time / LXT


# ============================================================================== models


def llama(vocab: int, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def last_logit(logits):
    """(B,) next-token logits at the last position (the argmax), for a causal LM's (B, L, V)."""
    last = logits[:, -1]
    return last.gather(1, last.argmax(1, keepdim=True)).squeeze(1)


# ============================================================================== contenders


def llama_floor(model):
    emb = model.get_input_embeddings()

    def run(ids):
        with torch.no_grad():
            e = emb(ids)
        e.requires_grad_(True)
        chosen = last_logit(model(inputs_embeds=e, use_cache=False).logits)
        return torch.autograd.grad(chosen, e, grad_outputs=torch.ones_like(chosen))[0]

    return run


def llama_lxt(patch):
    model = patch.model
    emb = model.get_input_embeddings()

    def run(ids):
        with torch.no_grad():
            e = emb(ids)
        e.requires_grad_(True)
        chosen = last_logit(model(inputs_embeds=e, use_cache=False).logits)
        g = torch.autograd.grad(chosen, e, grad_outputs=torch.ones_like(chosen))[0]
        return (e * g).sum(-1)

    return run


def llama_lrpfast(model, example_ids):
    """lrpfast's AttnLRP through its Hugging Face token API: per-token relevance (B, L)."""
    explain = _lrpfast_token_api(model)
    explain(example_ids)   # trace for this shape outside the timing
    return explain


def llama_lrpfast_compiled(model, example_ids):
    """The same with compile=True: the first call traces (eager), the second compiles (inductor);
    both outside the timing."""
    explain = _lrpfast_token_api(model, compile=True)
    explain(example_ids)
    explain(example_ids)
    return explain


def llama_floor_compiled(model, example_ids):
    """The floor with the model's forward compiled (inductor; its backward compiled by AOTAutograd
    too): what a compiled gradient costs, for reference."""
    emb = model.get_input_embeddings()
    forward = torch.compile(lambda e: last_logit(model(inputs_embeds=e, use_cache=False).logits), dynamic=False)

    def run(ids):
        with torch.no_grad():
            e = emb(ids)
        e.requires_grad_(True)
        chosen = forward(e)
        return torch.autograd.grad(chosen, e, grad_outputs=torch.ones_like(chosen))[0]

    run(example_ids)
    return run


def _lrpfast_token_api(model, compile=False):
    """lrpfast.hf's token API: ids -> (B, L) relevance, AttnLRP, the argmax next-token logit at the
    last position (its defaults)."""
    try:
        import lrpfast.hf as hf
    except ImportError as exc:
        raise NotImplementedError(f"lrpfast has no Hugging Face token API here ({exc}): lrpfast row skipped") from None
    lrp = hf.LRP(model, attention="attnlrp", compile=compile)

    def run(ids):
        return lrp(ids).tokens

    run.lrp = lrp
    return run


# ============================================================================== measuring


def measure(contenders, arg, rounds, warmup=2):
    """contenders: name -> (fn, on, off); on/off run around each call, untimed."""
    times = {k: [] for k in contenders}
    items = list(contenders.items())
    for r in range(warmup + rounds):
        for k, (fn, on, off) in (items if r % 2 == 0 else items[::-1]):
            on()
            t0 = time.perf_counter()
            fn(arg)
            dt = time.perf_counter() - t0
            off()
            if r >= warmup:
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}, times


def peak_allocated(fn) -> int:
    """Peak bytes of torch CPU allocations made during fn() above what was live before it (see the
    module doc)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    cur = best = 0
    for _, nbytes in events:
        cur += nbytes
        best = max(best, cur)
    return best


def net_allocated(fn) -> int:
    """Bytes that fn() leaves allocated (allocations minus frees during it)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        keep = fn()
    total = sum(e.nbytes() for e in prof.profiler.kineto_results.events()
                if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    del keep
    return total


def _drop(result):
    """The call's result is freed inside the measured span, as in a loop over batches."""
    del result


def memory(contenders, arg):
    out = {}
    for k, (fn, on, off) in contenders.items():
        on()
        try:
            out[k] = peak_allocated(lambda: _drop(fn(arg)))
        finally:
            off()
    return out


# ============================================================================== cases


def case_llama(batch, seq, vocab, rounds, do_memory, compiled=True):
    from lxt_common import Built, LxtPatch
    import transformers.models.llama.modeling_llama as modeling_llama

    model = llama(vocab)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch))
    noop = lambda: None  # noqa: E731
    contenders = {"floor": (llama_floor(model), noop, noop)}
    retained = {"floor": 0}
    try:
        holder = {}
        retained["lrpfast"] = net_allocated(lambda: holder.setdefault("fn", llama_lrpfast(model, ids)))
        contenders["lrpfast"] = (holder["fn"], noop, noop)
        skipped = None
    except NotImplementedError as exc:
        skipped = str(exc)
    if compiled and skipped is None:
        t0 = time.perf_counter()
        retained["lrpfast compiled"] = net_allocated(
            lambda: holder.setdefault("compiled", llama_lrpfast_compiled(model, ids)))
        contenders["lrpfast compiled"] = (holder["compiled"], noop, noop)
        contenders["floor compiled"] = (llama_floor_compiled(model, ids), noop, noop)
        retained["floor compiled"] = 0
        print(f"(compiling lrpfast and the floor took {time.perf_counter() - t0:.0f} s)", flush=True)
    patch = LxtPatch(Built("llama", modeling_llama, "LlamaForCausalLM", "causal", model))
    contenders["LXT"] = (llama_lxt(patch), patch.on, patch.off)
    retained["LXT"] = 0
    med, raw = measure(contenders, ids, rounds)
    row = {"case": f"llama b{batch}", "batch": batch, "seq": seq, "vocab": vocab, "median_s": med, "raw_s": raw,
           "rounds": rounds, "skipped": skipped}
    if do_memory:
        peak = memory(contenders, ids)
        row["peak_bytes"] = peak
        row["retained_bytes"] = retained
    return row


def case_vit(batch, rounds, do_memory):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the head at 0
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, 3, 224, 224)

    def floor(x):
        x = x.detach().requires_grad_()
        logits = model(x)
        t = logits.argmax(1, keepdim=True)
        chosen = logits.gather(1, t)
        return torch.autograd.grad(chosen.sum(), x)[0]

    noop = lambda: None  # noqa: E731
    holder = {}
    retained = {"floor": 0, "lrpfast": net_allocated(
        lambda: _drop(holder.setdefault("lrp", lrpfast.LRP(model, attention="attnlrp", eps=1e-6))(x)))}
    contenders = {"floor": (floor, noop, noop), "lrpfast": (holder["lrp"], noop, noop)}
    med, raw = measure(contenders, x, rounds)
    row = {"case": f"vit_b_16 b{batch}", "batch": batch, "median_s": med, "raw_s": raw, "rounds": rounds,
           "skipped": None}
    if do_memory:
        row["peak_bytes"] = memory(contenders, x)
        row["retained_bytes"] = retained
    return row


def print_row(row):
    """One line per contender: its median, its ratios to the floor and to LXT, its peak memory."""
    med = row["median_s"]
    fl, lx = med["floor"], med.get("LXT")
    for name, t in med.items():
        cells = [row["case"], name, f"{t * 1e3:.1f}", f"{t / fl:.3f}", f"{t / lx:.3f}" if lx else "—"]
        if "peak_bytes" in row and name in row["peak_bytes"]:
            cells.append(f"{(row['peak_bytes'][name] + row['retained_bytes'].get(name, 0)) / 2 ** 20:.1f}")
        else:
            cells.append("")
        print("| " + " | ".join(cells) + " |", flush=True)
    if row.get("skipped"):
        print(f"|   ({row['skipped']}) |", flush=True)


def _time_steps(plan, calls, fn, ids):
    """Wall time per plan step (its forward and its relevance step), summed over `calls` calls."""
    from collections import defaultdict

    acc = defaultdict(float)
    shapes = {}
    saved = []
    for st in plan.steps:
        for meth in ("forward", "relprop"):
            orig = getattr(st, meth)
            key = (meth, type(st).__name__, st.describe()[:70])

            def timed(*a, _orig=orig, _key=key, **k):
                t0 = time.perf_counter()
                out = _orig(*a, **k)
                acc[_key] += time.perf_counter() - t0
                if _key[0] == "forward" and isinstance(out, torch.Tensor):
                    shapes[_key[2]] = tuple(out.shape)
                return out

            setattr(st, meth, timed)
            saved.append((st, meth))
    try:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(ids)
        total = time.perf_counter() - t0
    finally:
        for st, meth in saved:
            delattr(st, meth)   # back to the class's method
    return acc, total, shapes


def profile_lrpfast(batch, seq, vocab, top=25, calls=5):
    """Where lrpfast's time goes on the llama case: per plan step (forward and relevance step,
    grouped by step type and the most expensive single steps), against the floor's total; then
    torch.profiler's op tables of both."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    model = llama(vocab)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch))
    fn = llama_lrpfast(model, ids)
    floor = llama_floor(model)
    for _ in range(2):
        fn(ids), floor(ids)
    t0 = time.perf_counter()
    for _ in range(calls):
        floor(ids)
    t_floor = (time.perf_counter() - t0) / calls
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(calls):
            model(input_ids=ids, use_cache=False)
        t_fwd = (time.perf_counter() - t0) / calls
    inner = fn.lrp._explainers["inputs_embeds"][1]
    acc, total, shapes = _time_steps(inner.plan, calls, fn, ids)
    per = {k: v / calls for k, v in acc.items()}
    total /= calls
    by_kind = defaultdict(float)
    for (meth, kind, _), v in per.items():
        by_kind[(meth, kind)] += v
    fwd = sum(v for (m, _), v in by_kind.items() if m == "forward")
    rel = sum(v for (m, _), v in by_kind.items() if m == "relprop")
    print(f"## llama b{batch} seq {seq}: floor {t_floor * 1e3:.1f} ms (model forward alone, no grad: "
          f"{t_fwd * 1e3:.1f} ms); lrpfast {total * 1e3:.1f} ms = steps' forward {fwd * 1e3:.1f} + relevance "
          f"{rel * 1e3:.1f} + outside the steps {(total - fwd - rel) * 1e3:.1f}")
    # the rotary embedding: q*cos + cat(-q2, q1)*sin on (B, heads, L, head_dim) tensors (SDPA keeps
    # attention-score tensors inside its own step, so every other 4-D elementwise step is RoPE)
    rope_kinds = {"MulStep", "AddStep", "IndexStep", "CatStep", "LinearOpStep", "DerivedStep", "PassStep",
                  "RotaryStep"}   # (RotaryStep: the whole embedding as one step, lrpfast/fusion.py)
    rope = {k: v for k, v in per.items() if k[1] in rope_kinds and len(shapes.get(k[2], ())) == 4}
    rf = sum(v for k, v in rope.items() if k[0] == "forward")
    rr = sum(v for k, v in rope.items() if k[0] == "relprop")
    print(f"rotary embedding steps (elementwise/slicing/cat on (B, heads, L, head_dim), {len(rope) // 2} steps): "
          f"forward {rf * 1e3:.1f} ms + relevance {rr * 1e3:.1f} ms = {(rf + rr) / total:.1%} of lrpfast's time")
    print("| pass | step type | ms per call | share |")
    print("|---|---|---:|---:|")
    for (meth, kind), v in sorted(by_kind.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {meth} | {kind} | {v * 1e3:.2f} | {v / total:.1%} |")
    print("\n| pass | most expensive single steps | ms per call |")
    print("|---|---|---:|")
    for (meth, kind, desc), v in sorted(per.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {meth} | {desc} | {v * 1e3:.2f} |")
    for name, f in (("floor", floor), ("lrpfast", fn)):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for _ in range(3):
                f(ids)
        print(f"\n## torch ops: {name} (3 calls)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["llama", "vit"], choices=["llama", "vit"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15 for llama, 7 for vit)")
    ap.add_argument("--no-memory", action="store_true", help="skip the profiler-based peak memory pass")
    ap.add_argument("--no-compiled", action="store_true",
                    help="skip lrpfast with compile=True and the compiled floor (llama rows; compiling takes ~1 min)")
    ap.add_argument("--profile", choices=["llama"], default=None, help="instead: profile lrpfast vs the floor")
    ap.add_argument("--json", default=os.path.join(HERE, "llama_speed_results.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.profile:
        for b in args.batches:
            profile_lrpfast(b, args.seq, args.vocab)
        return 0
    import transformers

    print(f"# AttnLRP vs floor and LXT — {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"extension={lrpfast.HAS_EXT}")
    print("| case | contender | median ms | / floor | / LXT | peak MiB |")
    print("|---|---|---:|---:|---:|---:|")
    rows = []
    for case in args.cases:
        for b in args.batches:
            if case == "llama":
                row = case_llama(b, args.seq, args.vocab, args.rounds or 15, not args.no_memory,
                                 not args.no_compiled)
            else:
                row = case_vit(b, args.rounds or 7, not args.no_memory)
            print_row(row)
            rows.append(row)
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": args.threads, "targets": TARGETS,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
