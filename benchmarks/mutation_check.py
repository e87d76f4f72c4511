"""Mutation check (issue 14, "tests must be able to fail"): make one deliberate bug at a time in a
copy of the tree, run the tests that should notice it, and print whether they did.

    python benchmarks/mutation_check.py                 # the Python mutations (fallback, rules, contractions)
    python benchmarks/mutation_check.py --count         # full failure counts (no -x; slower)
    python benchmarks/mutation_check.py --cpp           # also the C++ CPU kernel mutations (rebuilds per mutation)
    python benchmarks/mutation_check.py --only stab_div max_pool   # families whose name contains these words
    python benchmarks/mutation_check.py --list          # the mutations, nothing run

How: the working tree (tracked and untracked, not ignored files: `git ls-files -co --exclude-standard`)
is copied to a temporary directory (or --workdir, kept between runs, where an earlier C++ build is
reused); each mutation is a text substitution that must match exactly once; the named test files
then run there with `pytest -x -q` (PYTHONPATH pointing at the copy, so `import lrpfast` is the
mutated one; checked before anything runs). The file is restored before the next mutation; the
repository itself is never touched.

Python mutations run with LRPFAST_DISABLE_EXT=1: the pure-torch fallback is the implementation
under test and nothing compiled is there to compare it with, so only the independent oracles can
catch them. C++ mutations (--cpp) rebuild the extension in the copy after each substitution
(`setup.py build_ext --inplace`, CPU kernels only: FORCE_ONLY_CPU=1; ninja recompiles the changed
file, about 30-60 s each on two cores; the first build in a fresh copy takes a few minutes) and run
with the extension active.

Manual equivalent of one C++ row (what --cpp automates):
    git worktree add /tmp/mut HEAD && cd /tmp/mut
    # edit e.g. csrc/cpu/elementwise_cpu.cpp: lrpfast::stab_div(va, vb, eps, mode) * acc_t(1.5)
    FORCE_ONLY_CPU=1 python setup.py build_ext --inplace
    PYTHONPATH=/tmp/mut python -m pytest -x -q tests/test_ops.py

Baseline: the unmutated copy runs each test selection first; a failure there makes every row
meaningless and is reported. The result table is docs/MUTATIONS.md.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]

OPS = "tests/test_ops.py"
RULE_OPS = "tests/test_rule_ops.py"
RULES = "tests/test_rules.py"
LAYERS = "tests/test_layers.py"
OPCHECK = "tests/test_opcheck.py"
WINDOWS = "tests/test_windows.py"


@dataclass
class Mutation:
    family: str
    what: str  # the bug, in words
    path: str
    old: str
    new: str
    tests: Tuple[str, ...]
    cpp: bool = False


FB = "lrpfast/_fallback.py"
M: List[Mutation] = [
    # ------------------------------------------------------------------ fallback: fused primitives
    Mutation("stab_div", "result 50% too large", FB,
             "s = safe_div(rk, stabilize(zk, eps, stabilizer))",
             "s = 1.5 * safe_div(rk, stabilize(zk, eps, stabilizer))",
             (OPS,)),
    Mutation("stab_div", "sign(0) = -1 instead of +1", FB,
             "torch.where(z >= 0, z + eps, z - eps)", "torch.where(z > 0, z + eps, z - eps)", (OPS,)),
    Mutation("stab_div", "division by an exact 0 not caught (inf/NaN)", FB,
             "return torch.where(b == 0, torch.zeros_like(a), a / b)", "return a / b", (OPS,)),
    Mutation("stab_div", "K targets read as target-major (k, b) rows", FB,
             "return r.reshape(b, k, *r.shape[1:]), shared.unsqueeze(1), k",
             "return r.reshape(k, b, *r.shape[1:]).transpose(0, 1), shared.unsqueeze(1), k", (OPS,)),
    Mutation("half types", "float16 results rounded through bfloat16", FB,
             "return out.to(dtype).contiguous(memory_format=_memory_format(like))",
             "return (out.to(torch.bfloat16) if dtype == torch.float16 else out).to(dtype)"
             ".contiguous(memory_format=_memory_format(like))", (OPS,)),
    Mutation("half types", "half types computed in their own dtype (no float32 accumulation)", FB,
             "return t.float() if t.dtype in _HALF else t", "return t", (OPS, RULE_OPS)),
    Mutation("mul_input", "|x| instead of x", FB,
             "return _finish((ck * xk).reshape(c.shape), x, c.dtype)",
             "return _finish((ck * xk.abs()).reshape(c.shape), x, c.dtype)", (OPS,)),
    Mutation("mul_stab_div", "the product with x forgotten", FB,
             "s = safe_div(ck * xk, stabilize(zk, eps, stabilizer))",
             "s = safe_div(ck, stabilize(zk, eps, stabilizer))",
             (OPS,)),
    # ------------------------------------------------------------------ fallback: rule ops
    Mutation("sign_split", "branches swapped ([x-, x+])", FB,
             "torch.cat([xb.clamp(min=0), xb.clamp(max=0)], dim=2)",
             "torch.cat([xb.clamp(max=0), xb.clamp(min=0)], dim=2)",
             (RULE_OPS, RULES)),
    Mutation("sign_split_mul_input", "c branches swapped", FB,
             "return xs.clamp(min=0) * c_pos + xs.clamp(max=0) * c_neg",
             "return xs.clamp(min=0) * c_neg + xs.clamp(max=0) * c_pos", (RULE_OPS, RULES)),
    Mutation("bounds_mul_input", "low and high swapped", FB,
             "return (xs - shared(low)) * c_pos + (xs - shared(high)) * c_neg",
             "return (xs - shared(high)) * c_pos + (xs - shared(low)) * c_neg", (RULE_OPS, RULES)),
    Mutation("alpha_beta_stab_div", "z- = z + z+ instead of z - z+", FB,
             "-beta * safe_div(rb, stabilize(zb - zpb, eps, stabilizer))",
             "-beta * safe_div(rb, stabilize(zb + zpb, eps, stabilizer))", (RULE_OPS, RULES)),
    Mutation("gamma_stab_div", "zn = (1+γ)z - zp instead of (2+γ)z - zp", FB,
             "(2.0 + gamma) * zb - zpb", "(1.0 + gamma) * zb - zpb", (RULE_OPS, RULES)),
    Mutation("gamma_stab_div", "z = 0 counted as positive (mask z >= 0)", FB,
             "torch.where(zb > 0, safe_div(", "torch.where(zb >= 0, safe_div(", (RULE_OPS, RULES)),
    # ------------------------------------------------------------------ fallback: max pooling
    Mutation("max_pool_relprop (scatter)", "overlapping windows overwrite instead of adding", FB,
             "out.scatter_add_(3, idx, _acc(r).reshape(b, k, c, plane_out))",
             "out.scatter_(3, idx, _acc(r).reshape(b, k, c, plane_out))", (OPS,)),
    Mutation("max_pool_relprop (cells)", "overlapping windows (span = stride + 1) flagged disjoint", "lrpfast/ops.py",
             "disjoint = all(d * (k - 1) + 1 <= s and 0 <= p < s", "disjoint = all(d * (k - 1) <= s and 0 <= p < s",
             (OPS,)),
    # ------------------------------------------------------------------ fallback: layer contractions
    Mutation("linear contraction (fallback)", "|W| instead of W", FB,
             "c = s.matmul(weight)  #", "c = s.matmul(weight.abs())  #", (OPS,)),
    Mutation("conv contraction (fallback)", "kernel flipped in the transposed convolution", FB,
             "c = _CONV_T[dims](s, w, None,", "c = _CONV_T[dims](s, w.flip(-1), None,", (OPS,)),
    Mutation("avg pool contract", "count_include_pad ignored (always True) in 1d/2d", FB,
             "one(stride), pad0, ceil_mode, count_include_pad, divisor_override)",
             "one(stride), pad0, ceil_mode, True, divisor_override)", (OPS,)),
    Mutation("avg pool contract", "adaptive 1d/2d contraction mirrored", FB,
             "c = torch.ops.aten._adaptive_avg_pool2d_backward(_as_2d(s, dims), _as_2d(like, dims))",
             "c = torch.ops.aten._adaptive_avg_pool2d_backward(_as_2d(s, dims), _as_2d(like, dims)).flip(-1)", (OPS,)),
    # ------------------------------------------------------------------ lrpfast/contractions.py (the rules')
    Mutation("contractions.transpose (linear)", "|W| instead of W", "lrpfast/contractions.py",
             "return s.matmul(w)", "return s.matmul(w.abs())", (RULES,)),
    Mutation("contractions.transpose (conv)", "kernel flipped", "lrpfast/contractions.py",
             "s, like, w, None, list(stride)", "s, like, w.flip(-1), None, list(stride)", (RULES,)),
    # ------------------------------------------------------------------ lrpfast/rules.py
    Mutation("rules: Epsilon", "eps dropped in relprop (LRP-0)", "lrpfast/rules.py",
             "return ctx.epsilon_step(r, ctx.x, ctx.z, ctx.weight, self.eps, self.stabilizer)",
             "return ctx.epsilon_step(r, ctx.x, ctx.z, ctx.weight, 0.0, self.stabilizer)", (RULES,)),
    Mutation("rules: Epsilon", "fused path multiplies by |x|", "lrpfast/rules.py",
             "return ops.mul_input(C.transpose(ctx, s, ctx.weight), ctx.x)",
             "return ops.mul_input(C.transpose(ctx, s, ctx.weight), ctx.x.abs())", (RULES,)),
    Mutation("rules: ZPlus/AlphaBeta", "z+ uses the bias b instead of b+", "lrpfast/rules.py",
             'bias = _weights(ctx, ("b+",), lambda: MW.positive(ctx.bias))',
             'bias = _weights(ctx, ("b+",), lambda: ctx.bias)', (RULES,)),
    Mutation("rules: AlphaBeta", "signed backward weights swapped (quad(w-, w+))", "lrpfast/rules.py",
             "lambda: MW.quad(wp(), wn(), g)", "lambda: MW.quad(wn(), wp(), g)", (RULES,)),
    Mutation("rules: sign check", "x >= 0 decided by max(x) (x- branch dropped)", "lrpfast/rules.py",
             "bool(x.min() >= 0)", "bool(x.max() >= 0)", (RULES,)),
    Mutation("rules: Gamma", "nw = w + γw+ (instead of w + γw-)", "lrpfast/rules.py",
             "lambda: ctx.weight + self.gamma * ctx.weight.clamp(max=0))",
             "lambda: ctx.weight + self.gamma * ctx.weight.clamp(min=0))", (RULES,)),
    Mutation("rules: ZBox", "offset uses high·w+ (instead of high·w-)", "lrpfast/rules.py",
             "ctx.forward(high, MW.negative(ctx.weight), None)", "ctx.forward(high, MW.positive(ctx.weight), None)",
             (RULES,)),
    Mutation("rules: ZBox", "bounds passed as (high, low)", "lrpfast/rules.py",
             "return ops.bounds_mul_input(c, ctx.x, low, high,", "return ops.bounds_mul_input(c, ctx.x, high, low,",
             (RULES,)),
    Mutation("rules: Flat", "Linear n_j = in_features + 1", "lrpfast/rules.py",
             "float(ctx.x.shape[-1])))", "float(ctx.x.shape[-1] + 1)))", (RULES,)),
    Mutation("rules: WSquare", "|w| instead of w²", "lrpfast/rules.py",
             'lambda: ctx.weight * ctx.weight)', 'lambda: ctx.weight.abs())', (RULES,)),
    # ------------------------------------------------------------------ lrpfast/merged_batch.py (window attention)
    Mutation("merged batch: regroup", "K maps of merged rows read as map-major (k, n) rows", "lrpfast/merged_batch.py",
             "per_map = a.reshape(n_out, k, -1).transpose(0, 1).reshape(k, n_in, -1)",
             "per_map = a.reshape(k, n_out, -1).reshape(k, n_in, -1)", (WINDOWS,)),
    Mutation("merged batch: check_rows", "a reshape mixing samples accepted", "lrpfast/merged_batch.py",
             "if batch is None or batch <= 0 or n_in % batch or n_out % batch:",
             "if batch is None or batch <= 0:", (WINDOWS,)),
    Mutation("merged batch: relevance_sum", "only the first window of each sample summed", "lrpfast/nodes/messages.py",
             "return s.view(b, n // b, k).sum(1)", "return s.view(b, n // b, k)[:, 0]", (WINDOWS,)),
    Mutation("merged batch: per_map", "layer maps (B, K, m, ...) read as (B, m, K, ...)", "lrpfast/merged_batch.py",
             "return a.reshape(b, m, k, *a.shape[1:]).transpose(1, 2)", "return a.reshape(b, k, m, *a.shape[1:])",
             (WINDOWS,)),
    Mutation("merged batch: sdpa key", "a key with another leading dim than the query accepted", "lrpfast/transformer.py",
             "or not q.shape[0] == k.shape[0] == v.shape[0]:", "or q.shape[0] != v.shape[0]:", (WINDOWS,)),
    Mutation("merged batch: repeat rows", "copies of a row read as r blocks of all rows (tile order)",
             "lrpfast/merged_repeat.py", "a.reshape(n, r, k, *a.shape[1:]).sum(1)", "a.reshape(r, n, k, *a.shape[1:]).sum(0)",
             (WINDOWS,)),
    # ------------------------------------------------------------------ C++ CPU kernels (--cpp)
    Mutation("stab_div", "result 50% too large", "csrc/cpu/elementwise_cpu.cpp",
             "v = lrpfast::stab_div(va, vb, eps, mode);", "v = lrpfast::stab_div(va, vb, eps, mode) * acc_t(1.5);",
             (OPS, OPCHECK), cpp=True),
    Mutation("mul_input", "|x| instead of x", "csrc/cpu/elementwise_cpu.cpp",
             "v = lrpfast::mul_input(va, vb);", "v = lrpfast::mul_input(va, vb < acc_t(0) ? -vb : vb);",
             (OPS, OPCHECK), cpp=True),
    Mutation("mul_stab_div", "the product with x forgotten", "csrc/cpu/elementwise_cpu.cpp",
             "v = lrpfast::mul_stab_div(va, vb, static_cast<acc_t>(c[i]), eps, mode);",
             "v = lrpfast::mul_stab_div(va, acc_t(1), static_cast<acc_t>(c[i]), eps, mode);", (OPS, OPCHECK), cpp=True),
    Mutation("sign_split", "negative branch = x+", "csrc/cpu/rules_cpu.cpp",
             "neg[j] = to_storage<scalar_t>(negative_part(v));", "neg[j] = to_storage<scalar_t>(positive_part(v));",
             (RULE_OPS,), cpp=True),
    Mutation("sign_split_mul_input", "c branches swapped", "csrc/cpu/rules_cpu.cpp",
             "sign_split_mul_input(c_pos, c_neg, x)", "sign_split_mul_input(c_neg, c_pos, x)", (RULE_OPS,), cpp=True),
    Mutation("bounds_mul_input", "low and high swapped", "csrc/cpu/rules_cpu.cpp",
             "static_cast<acc_t>(lo[j]), static_cast<acc_t>(hi[j])",
             "static_cast<acc_t>(hi[j]), static_cast<acc_t>(lo[j])", (RULE_OPS,), cpp=True),
    Mutation("alpha_beta_stab_div", "alpha and beta swapped", "csrc/cpu/rules_cpu.cpp",
             "alpha_beta_stab_div(r, z, z2, q0, q1, eps, mode, vp, vn);",
             "alpha_beta_stab_div(r, z, z2, q1, q0, eps, mode, vp, vn);", (RULE_OPS,), cpp=True),
    Mutation("gamma_stab_div", "gamma ignored (0)", "csrc/cpu/rules_cpu.cpp",
             "gamma_stab_div(r, z, z2, q0, eps, mode, vp, vn);",
             "gamma_stab_div(r, z, z2, acc_t(0), eps, mode, vp, vn);",
             (RULE_OPS,), cpp=True),
    Mutation("max_pool_relprop (scatter)", "overlapping windows overwrite instead of adding",
             "csrc/cpu/max_pool_cpu.cpp",
             "acc[t] += static_cast<acc_t>(values[j]);", "acc[t] = static_cast<acc_t>(values[j]);", (OPS, OPCHECK),
             cpp=True),
    Mutation("max_pool_relprop (scatter)", "bfloat16 write-back skips each plane's last element",
             "csrc/cpu/max_pool_cpu.cpp",
             "for (int64_t j = 0; j < a.plane_in; ++j) dst[j] = static_cast<scalar_t>(plane[j]);",
             "for (int64_t j = 0; j + 1 < a.plane_in; ++j) dst[j] = static_cast<scalar_t>(plane[j]);", (OPS,),
             cpp=True),
    Mutation("linear contraction (C++)", "|W| instead of W", "csrc/layers.cpp",
             "return call_mul_input(at::matmul(s, weight), x);",
             "return call_mul_input(at::matmul(s, weight.abs()), x);",
             (OPS, OPCHECK), cpp=True),
    Mutation("conv contraction (C++)", "input gradient mirrored", "csrc/layers.cpp",
             "return call_mul_input(std::get<0>(grads), x);", "return call_mul_input(std::get<0>(grads).flip(-1), x);",
             (OPS, OPCHECK), cpp=True),
    Mutation("avg pool contract (C++)", "count_include_pad ignored (always true) in 2d",
             "csrc/layers.cpp",
             "c = at::avg_pool2d_backward(s, like2d, kernel_size, stride, padding, ceil_mode, count_include_pad, "
             "divisor_override);",
             "c = at::avg_pool2d_backward(s, like2d, kernel_size, stride, padding, ceil_mode, true, divisor_override);",
             (OPS, OPCHECK), cpp=True),
]


# ----------------------------------------------------------------------------- the copy


def tree_files(root: Path) -> List[str]:
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "-co", "--exclude-standard"], check=True,
                         capture_output=True).stdout.decode()
    return [p for p in out.split("\0") if p and (root / p).is_file()]


def sync_copy(root: Path, dest: Path) -> None:
    """Copy the working tree into dest; files whose content is unchanged keep their mtime (so an
    earlier build in dest stays valid for ninja)."""
    for rel in tree_files(root):
        src, dst = root / rel, dest / rel
        if dst.is_file() and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def env_for(copy: Path, ext: bool) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("LRPFAST_TEST_THREADS", "1")
    if ext:
        env.pop("LRPFAST_DISABLE_EXT", None)
    else:
        env["LRPFAST_DISABLE_EXT"] = "1"
    return env


def check_import(copy: Path, ext: bool) -> None:
    code = "import lrpfast, json; print(json.dumps([lrpfast.__file__, lrpfast.HAS_EXT]))"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=copy, env=env_for(copy, ext),
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    path, has_ext = eval(out.replace("true", "True").replace("false", "False"))  # noqa: S307 (our own output)
    if not Path(path).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"import lrpfast resolves to {path}, not the copy in {copy}")
    if has_ext != ext:
        raise SystemExit(f"the copy's extension is {'not ' if not has_ext else ''}loaded; expected ext={ext}")


def build(copy: Path, log: Path) -> bool:
    env = dict(os.environ, FORCE_ONLY_CPU="1", FORCE_CUDA="0")
    env.setdefault("MAX_JOBS", "2")
    with open(log, "a") as f:
        rc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy, env=env, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    return rc == 0


# ----------------------------------------------------------------------------- running


def run_tests(copy: Path, tests: Sequence[str], ext: bool, count: bool, timeout: int) -> Tuple[int, int, str, float]:
    """(failed + errors, passed, first failing test id, seconds)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
           "--tb=no" if count else "--tb=line", *([] if count else ["-x"]), *tests]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env_for(copy, ext), capture_output=True, text=True, timeout=timeout)
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return -1, 0, "timeout", time.time() - t0
    elapsed = time.time() - t0
    summary = text.strip().splitlines()[-1] if text.strip() else ""
    num = lambda word: sum(int(n) for n in re.findall(rf"(\d+) {word}", summary))  # noqa: E731
    failed, passed = num("failed") + num("errors?"), num("passed")
    first = ""
    for line in text.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            first = line.split(" ", 1)[1].split(" - ")[0]
            break
    if failed == 0 and passed == 0:  # collection error, crash: show why
        first = "no result: " + " | ".join(text.strip().splitlines()[-3:])
        failed = -1
    return failed, passed, first, elapsed


def apply(copy: Path, m: Mutation) -> str:
    path = copy / m.path
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        raise SystemExit(f"mutation {m.family!r} / {m.what!r}: {m.old!r} occurs {n} times in {m.path} (expected 1)")
    path.write_text(text.replace(m.old, m.new))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cpp", action="store_true", help="also the C++ kernel mutations (rebuild per mutation)")
    ap.add_argument("--cpp-only", action="store_true", help="only the C++ kernel mutations")
    ap.add_argument("--count", action="store_true", help="run without -x: the number of failing tests")
    ap.add_argument("--only", nargs="*", default=[], help="families containing any of these words")
    ap.add_argument("--workdir", type=Path, help="the copy to use (kept; reuses its earlier build)")
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per pytest run")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = ap.parse_args(argv)

    muts = [m for m in M if (m.cpp if args.cpp_only else (args.cpp or not m.cpp))]
    if args.only:
        muts = [m for m in muts if any(w.lower() in m.family.lower() for w in args.only)]
    if args.list:
        for m in muts:
            print(f"{'C++' if m.cpp else 'py '} {m.family:32} {m.what:55} {m.path}  [{' '.join(m.tests)}]")
        return 0

    tmp = None
    if args.workdir:
        copy = args.workdir.resolve()
        if copy == ROOT or ROOT in copy.parents:
            raise SystemExit("--workdir must not be the repository (mutations would hit other people's tree)")
        copy.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="lrpfast-mutation-")
        copy = Path(tmp.name)
    log = copy / "mutation_build.log"
    try:
        sync_copy(ROOT, copy)
        need_cpp = any(m.cpp for m in muts)
        if need_cpp:
            print(f"building the extension in {copy} (log: {log}) ...", flush=True)
            if not build(copy, log):
                raise SystemExit(f"the unmutated build failed: see {log}")
            check_import(copy, ext=True)
        if any(not m.cpp for m in muts):
            check_import(copy, ext=False)

        # Baseline: every test selection must pass unmutated.
        baseline_bad = []
        for key in sorted({(m.tests, m.cpp) for m in muts}):
            failed, passed, first, secs = run_tests(copy, key[0], key[1], args.count, args.timeout)
            print(f"baseline {'ext' if key[1] else 'fallback'} {' '.join(key[0])}: {passed} passed, "
                  f"{max(failed, 0)} failed ({secs:.0f} s){' ' + first if failed else ''}", flush=True)
            if failed:
                baseline_bad.append((key, first))

        rows = []
        for m in muts:
            original = apply(copy, m)
            try:
                if m.cpp and not build(copy, log):
                    rows.append((m, "build failed", "", 0.0))
                    continue
                failed, passed, first, secs = run_tests(copy, m.tests, m.cpp, args.count, args.timeout)
            finally:
                (copy / m.path).write_text(original)
            if failed < 0:
                verdict = f"ERROR ({first})"
            elif failed:
                verdict = f"yes ({failed}{'' if args.count else ', -x'})"
            else:
                verdict = f"NO ({passed} passed)"
            rows.append((m, verdict, first, secs))
            print(f"  {'C++' if m.cpp else 'py '} {m.family:30} {m.what:55} -> {verdict}  {first}", flush=True)
        if need_cpp:
            build(copy, log)  # leave the copy's extension unmutated

        print()
        if args.markdown:
            print("| family | mutation | where | tests | caught (failures) | first failing test |")
            print("|---|---|---|---|---|---|")
            esc = lambda text: text.replace("|", "\\|")  # noqa: E731
            for m, verdict, first, _ in rows:
                tests = ", ".join(Path(t).name for t in m.tests)
                kind = "C++" if m.cpp else "py"
                print(f"| {esc(m.family)} | {esc(m.what)} | {kind} `{m.path}` | {tests} | {esc(verdict)} | "
                      f"`{esc(first)}` |")
        else:
            print(f"{'family':32} | {'mutation':55} | {'where':30} | caught (failures)")
            print("-" * 140)
            for m, verdict, first, _ in rows:
                print(f"{m.family:32} | {m.what:55} | {m.path:30} | {verdict}")
        missed = [r for r in rows if not r[1].startswith("yes")]
        print(f"\n{len(rows) - len(missed)} of {len(rows)} mutations caught"
              + (f"; NOT caught: {', '.join(r[0].family + ' / ' + r[0].what for r in missed)}" if missed else ""))
        if baseline_bad:
            print(f"WARNING: the unmutated baseline failed: {baseline_bad}")
        return 1 if missed or baseline_bad else 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
