#!/usr/bin/env bash
# Static resource report of lrpfast's CUDA kernels (issue 7): no GPU and no torch needed.
#
# Compiles every csrc/cuda/*.cu for one SM architecture with the flags setup.py's nvcc build uses
# (plus -Xptxas -v), then reads the SASS: per kernel instantiation, registers, stack frame, spills
# (ptxas), global load/store widths (LDG/STG .128/.64/32/16), atomics (RED vs ATOM.CAS loops),
# local-memory traffic (LDL/STL) and the calls to the 64-bit integer division helpers
# (__cuda_sm20_{div,rem}_{s,u}64), split into those inside a loop (per element) and outside.
#
#   bash benchmarks/cuda_resources.sh OUT_DIR              # sm_90, about 10 s of compiling
#   ARCH=80 bash benchmarks/cuda_resources.sh OUT_DIR      # another architecture
#   KEEP_RAW=0 bash benchmarks/cuda_resources.sh OUT_DIR   # drop raw/ (16 MB) at the end
#
# Writes OUT_DIR/table.txt (what is printed), table.md, loops.txt (each loop body's size),
# resources.json (every count) and raw/ (ptxas logs, SASS, ELF listings, objects). Tools: nvcc ($NVCC, $CUDA_HOME/bin,
# PATH); cuobjdump ($CUOBJDUMP, next to nvcc, PATH, or the copy bundled with triton: the CPU
# machines' toolkit has none); cu++filt or c++filt; python3 (stdlib only). The "occ" column is the
# theoretical occupancy (resident warps per SM, of 64) of $THREADS-thread blocks (256: every
# launcher's) under the register count alone. Compiles run one at a time (the CPU machines are
# shared). Exit status 1 when a compile fails or cuobjdump is missing (then only ptxas's columns).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

OUT=${1:?usage: cuda_resources.sh OUT_DIR}
mkdir -p "$OUT/raw"
OUT=$(cd "$OUT" && pwd)
ARCH=${ARCH:-90}
STD=${NVCC_STD:-c++17}  # torch 2.11's build passes -std=c++20; the SASS is the same (checked 2026-11-26)

find_tool() {  # find_tool NAME CANDIDATE...: first executable candidate, else NAME on PATH
  local name=$1; shift
  local c
  for c in "$@"; do [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }; done
  command -v "$name" 2>/dev/null
}

CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC=$(find_tool nvcc "${NVCC:-}" "$CUDA_HOME/bin/nvcc" /usr/local/cuda/bin/nvcc) || { echo "cuda_resources: no nvcc" >&2; exit 1; }
NVCC_DIR=$(dirname "$(readlink -f "$NVCC")")
# The CPU machines' toolkit lacks cuobjdump; triton (a torch dependency) bundles one.
TRITON_BIN=""
for d in "$ROOT"/.venv/lib/python3*/site-packages/triton/backends/nvidia/bin \
         "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)/triton/backends/nvidia/bin"; do
  [ -x "$d/cuobjdump" ] && { TRITON_BIN=$d; break; }
done
FAILED=0
CUOBJDUMP=$(find_tool cuobjdump "${CUOBJDUMP:-}" "$NVCC_DIR/cuobjdump" "$CUDA_HOME/bin/cuobjdump" \
  "${TRITON_BIN:+$TRITON_BIN/cuobjdump}") || {
  echo "cuda_resources: no cuobjdump (set CUOBJDUMP=): ptxas columns only" >&2; CUOBJDUMP=""; FAILED=1; }
DEMANGLE=$(find_tool cu++filt "$NVCC_DIR/cu++filt" "$CUDA_HOME/bin/cu++filt") || DEMANGLE=$(command -v c++filt) || DEMANGLE=""

# The nvcc flags of setup.py (-O3 --use_fast_math -lineinfo -DWITH_CUDA) and those torch's
# CUDAExtension adds (the no-half-operator defines, --expt-relaxed-constexpr, the extension name).
FLAGS=(-O3 --use_fast_math -lineinfo -DWITH_CUDA -std="$STD"
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
       -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -DTORCH_API_INCLUDE_EXTENSION_H
       -DTORCH_EXTENSION_NAME=_C -Icsrc -Icsrc/cuda
       "-gencode=arch=compute_$ARCH,code=sm_$ARCH" -Xptxas -v)
{
  echo "nvcc: $NVCC ($("$NVCC" --version | grep -o 'release [0-9.]*, V[0-9.]*'))"
  echo "cuobjdump: ${CUOBJDUMP:-none}${CUOBJDUMP:+ ($("$CUOBJDUMP" --version | grep -o 'release [0-9.]*, V[0-9.]*'))}"
  echo "demangler: ${DEMANGLE:-none}"
  if git rev-parse --short HEAD > /dev/null 2>&1; then
    echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- csrc || echo ' (csrc has uncommitted changes)')"
  fi
  echo "flags: ${FLAGS[*]}"
} > "$OUT/tools.txt"
cat "$OUT/tools.txt"

for src in csrc/cuda/*.cu; do
  name=$(basename "$src" .cu)
  t0=$SECONDS
  if ! "$NVCC" -c "$src" -o "$OUT/raw/$name.o" "${FLAGS[@]}" > "$OUT/raw/$name.ptxas.txt" 2>&1; then
    echo "cuda_resources: compile of $src failed:" >&2; tail -n 20 "$OUT/raw/$name.ptxas.txt" >&2; FAILED=1; continue
  fi
  rm -f "$OUT/raw/$name.sass" "$OUT/raw/$name.elf.txt"
  if [ -n "$CUOBJDUMP" ]; then
    "$CUOBJDUMP" --dump-sass "$OUT/raw/$name.o" > "$OUT/raw/$name.sass" || FAILED=1
    "$CUOBJDUMP" --dump-elf "$OUT/raw/$name.o" > "$OUT/raw/$name.elf.txt" || FAILED=1
  fi
  echo "compiled $src in $((SECONDS - t0)) s"
done

python3 - "$OUT" "$ARCH" "$DEMANGLE" "$ROOT/csrc/cuda" "${THREADS:-256}" <<'PY' || FAILED=1
import glob, json, os, re, subprocess, sys

out, arch, demangler, cuda_dir, threads = sys.argv[1:6]
threads = int(threads)
raw = os.path.join(out, "raw")

# Enum values -> names (template arguments print as "(lrpfast::cuda::RuleOp)3").
enums = {}
for h in glob.glob(os.path.join(cuda_dir, "*.cuh")) + glob.glob(os.path.join(cuda_dir, "*.h")):
    for m in re.finditer(r"enum\s+class\s+(\w+)[^{]*\{([^}]*)\}", open(h).read()):
        body = re.sub(r"//[^\n]*", "", m.group(2))
        for item in re.finditer(r"(\w+)\s*=\s*(\d+)", body):
            enums[(m.group(1), int(item.group(2)))] = item.group(1)


def rough_demangle(m):
    """Without a demangler: "void kernel<(Enum)v, type, v>()" from the Itanium name of a kernel template."""
    builtin = {"f": "float", "d": "double", "i": "int", "j": "unsigned int", "l": "long", "b": "bool"}

    def name(i):  # <length><identifier>
        n = re.match(r"\d+", m[i:])
        return m[i + n.end(): i + n.end() + int(n.group())], i + n.end() + int(n.group())

    def typ(i):
        if m[i] in builtin:
            return builtin[m[i]], i + 1
        if m[i] == "N":  # nested name: the last component names it
            i += 1
            last = ""
            while m[i] != "E":
                sub = re.match(r"S[0-9A-Z]*_", m[i:])
                if sub:
                    i += sub.end()
                else:
                    last, i = name(i)
            return last, i + 1
        return name(i)

    try:
        assert m.startswith("_ZN")
        i, kernel = 3, ""
        while m[i] != "I":
            sub = re.match(r"S[0-9A-Z]*_", m[i:])
            if sub:
                i += sub.end()
            else:
                kernel, i = name(i)
        i += 1
        args = []
        while m[i] != "E":
            if m[i] == "L":
                t, i = typ(i + 1)
                v = re.match(r"n?\d+", m[i:])
                i += v.end() + 1  # the value and its closing E
                args.append(v.group().replace("n", "-") if t in builtin.values() else f"({t}){v.group()}")
            else:
                t, i = typ(i)
                args.append(t)
        return f"void {kernel}<{', '.join(args)}>()"
    except (AssertionError, AttributeError, IndexError, ValueError):
        return m


def demangle(names):
    if demangler and names:
        res = subprocess.run([demangler], input="\n".join(names) + "\n", capture_output=True, text=True)
        lines = res.stdout.splitlines()
        if res.returncode == 0 and len(lines) == len(names):
            return dict(zip(names, lines))
    return {n: rough_demangle(n) for n in names}


def parse_ptxas(path):
    info, cur = {}, None
    for line in open(path):
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = m.group(1); info[cur] = {}; continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = m.group(1); info.setdefault(cur, {}); continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            info[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            info[cur]["regs"] = int(m.group(1))
            for key, pat in (("smem", r"(\d+) bytes smem"), ("cmem0", r"(\d+) bytes cmem\[0\]"),
                             ("barriers", r"used (\d+) barriers")):
                mm = re.search(pat, line)
                info[cur][key] = int(mm.group(1)) if mm else 0
    return info


def parse_elf(path):
    """Local functions (the division helpers) per .text section: {kernel: {offset: name}}."""
    sections, helpers, mode = {}, {}, None
    for line in open(path):
        s = line.strip()
        if s.startswith("Index Offset"):
            mode = "sec"; continue
        if s.startswith(".section .symtab"):
            mode = "sym"; continue
        if s.startswith(".section") or not s:
            if mode == "sym" and s.startswith(".section"):
                mode = None
            continue
        parts = s.split()
        if mode == "sec" and len(parts) >= 10 and re.fullmatch(r"[0-9a-f]+", parts[0]):
            sections[int(parts[0], 16)] = parts[-1]
        elif mode == "sym" and len(parts) >= 7 and parts[-1].startswith("$__internal"):
            sec = sections.get(int(parts[5], 16), "")
            if sec.startswith(".text."):
                name = re.sub(r"^\$__internal_\d+_\$", "", parts[-1])
                helpers.setdefault(sec[len(".text."):], {})[int(parts[1], 16)] = name
    return helpers


INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse_sass(path):
    funcs, cur = {}, None
    for line in open(path):
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1); funcs[cur] = []; continue
        m = INSN.search(line)
        if m and cur is not None:
            funcs[cur].append((int(m.group(1), 16), m.group(3), m.group(4).strip()))
    return funcs


def width(op):
    mods = op.split(".")[1:]
    for mod, w in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if mod in mods:
            return w
    return 32


def analyse(insns, helpers):
    body_end = min(helpers) if helpers else (insns[-1][0] + 16 if insns else 0)
    body = [i for i in insns if i[0] < body_end]
    loops = []  # (start, end) of every backward branch in the kernel body
    for addr, op, args in body:
        if op.startswith("BRA"):
            t = int(args.split()[-1], 16) if re.fullmatch(r"0x[0-9a-f]+", args.split()[-1]) else None
            if t is not None and t <= addr:
                loops.append((t, addr))
    in_loop = lambda a: any(s <= a <= e for s, e in loops)
    r = {"insns": len(body), "ldg": {}, "stg": {}, "ld_generic": 0, "atomics": {}, "ldl": 0, "stl": 0,
         "lds_sts": 0, "div64_calls": {}, "div64_in_loop": 0, "other_calls": 0, "mufu_rcp_in_loop": 0,
         "loops": []}
    for addr, op, args in body:
        base = op.split(".")[0]
        if base == "LDG":
            r["ldg"][width(op)] = r["ldg"].get(width(op), 0) + 1
        elif base == "STG":
            r["stg"][width(op)] = r["stg"].get(width(op), 0) + 1
        elif base in ("LD",):
            r["ld_generic"] += 1
        elif base in ("RED", "REDG", "ATOM", "ATOMG"):
            r["atomics"][op] = r["atomics"].get(op, 0) + 1
        elif base == "LDL":
            r["ldl"] += 1
        elif base == "STL":
            r["stl"] += 1
        elif base in ("LDS", "STS"):
            r["lds_sts"] += 1
        elif base == "CALL":
            t = int(args.split()[-1], 16) if re.fullmatch(r"0x[0-9a-f]+", args.split()[-1]) else None
            name = helpers.get(t, "?")
            if re.search(r"(div|rem)_[su]64", name):
                key = re.sub(r"^__cuda_sm20_", "", name)
                r["div64_calls"][key] = r["div64_calls"].get(key, 0) + 1
                r["div64_in_loop"] += in_loop(addr)
            else:
                r["other_calls"] += 1
                r.setdefault("other_call_names", []).append(name)
        elif op == "MUFU.RCP" and in_loop(addr):
            r["mufu_rcp_in_loop"] += 1
    def div64_call(i):
        t = i[2].split()[-1] if i[2] else ""
        return i[1].startswith("CALL") and re.search(r"(div|rem)_[su]64", helpers.get(int(t, 16), "")) is not None \
            if re.fullmatch(r"0x[0-9a-f]+", t) else False

    for s, e in loops:  # static sizes: both sides of every branch, the division helpers' slow paths excluded
        inner = [i for i in body if s <= i[0] <= e]
        r["loops"].append({"start": s, "end": e, "insns": len(inner),
                           "ldg_stg": sum(i[1].startswith(("LDG", "STG")) for i in inner),
                           "div64_calls": sum(div64_call(i) for i in inner),
                           "other_calls": sum(i[1].startswith("CALL") and not div64_call(i) for i in inner)})
    return r


def describe(demangled):
    """(file-independent) kernel, op, dtype, VEC from a demangled name."""
    s = re.sub(r"^void\s+", "", demangled)
    if s.endswith(")"):  # drop the parameter list: the balanced (...) at the end
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(s[i], 0)
            if depth == 0:
                s = s[:i]
                break
    s = s.replace("lrpfast::cuda::(anonymous namespace)::", "").replace("lrpfast::cuda::", "")
    m = re.match(r"(\w+)<(.*)>$", s)
    if not m:
        return s, "", "", ""
    kernel, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
    op, dtype, vec = "", "", "1"
    for a in args:
        e = re.fullmatch(r"\((\w+)\)(\d+)", a)
        if e:
            op = enums.get((e.group(1), int(e.group(2))), a)
        elif re.fullmatch(r"-?\d+", a):
            vec = a
        else:
            dtype = {"__half": "half", "__nv_bfloat16": "bf16", "float": "f32", "double": "f64"}.get(a, a)
    return kernel, op, dtype, vec


def hist(h):
    return " ".join(f"{w}x{n}" for w, n in sorted(h.items(), reverse=True)) or "-"


def occupancy(regs):
    """Resident warps per SM (sm_70..sm_90: 64K registers allocated per warp in units of 256,
    at most 64 warps and 32 blocks) for `threads`-thread blocks, from the register count alone."""
    if not regs:
        return None
    per_warp = -(-regs * 32 // 256) * 256
    warps_per_block = -(-threads // 32)
    blocks = min(65536 // per_warp // warps_per_block, 64 // warps_per_block, 32)
    return blocks * warps_per_block


rows = []
for ptxas_log in sorted(glob.glob(os.path.join(raw, "*.ptxas.txt"))):
    name = os.path.basename(ptxas_log)[: -len(".ptxas.txt")]
    sass_path, elf_path = os.path.join(raw, name + ".sass"), os.path.join(raw, name + ".elf.txt")
    res = parse_ptxas(ptxas_log)
    have_sass = os.path.exists(sass_path)
    funcs = parse_sass(sass_path) if have_sass else {m: None for m in res if "stack" in res[m]}
    helpers = parse_elf(elf_path) if os.path.exists(elf_path) else {}
    names = demangle(sorted(funcs))
    for mangled, insns in funcs.items():
        kernel, op, dtype, vec = describe(names[mangled])
        a = analyse(insns, helpers.get(mangled, {})) if insns is not None else {}
        p = res.get(mangled, {})
        rows.append(dict(file=name + ".cu", kernel=kernel, op=op, dtype=dtype, vec=int(vec) if vec.isdigit() else vec,
                         mangled=mangled, demangled=names[mangled], occupancy_warps=occupancy(p.get("regs")),
                         **p, **a))

order = {"f32": 0, "f64": 1, "half": 2, "bf16": 3}
rows.sort(key=lambda r: (r["file"], r["kernel"], r["op"], order.get(r["dtype"], 9), str(r["vec"])))

head = ["file", "kernel<op>", "dtype", "VEC", "regs", "occ", "stack", "spill st/ld", "LDG bits x n", "STG bits x n",
        "atomics", "LDL/STL", "div64 calls (in loops)", "other calls", "SASS"]
table = []
for r in rows:
    cells = [r["file"], f"{r['kernel']}<{r['op']}>" if r["op"] else r["kernel"], r["dtype"], str(r["vec"]),
             str(r.get("regs", "?")), f"{r['occupancy_warps']}/64" if r["occupancy_warps"] else "?",
             str(r.get("stack", "?")), f"{r.get('spill_st', '?')}/{r.get('spill_ld', '?')}"]
    if "insns" in r:
        atom = " ".join(f"{k.replace('.STRONG.GPU', '').replace('.E.', '.')}x{n}" for k, n in sorted(r["atomics"].items()))
        if r["ld_generic"]:
            atom += f" +LDx{r['ld_generic']}"
        divs = " ".join(f"{k}x{n}" for k, n in sorted(r["div64_calls"].items()))
        other = {}
        for c in r.get("other_call_names", []):
            c = re.sub(r"^__cuda_sm20_", "", c)
            other[c] = other.get(c, 0) + 1
        cells += [hist(r["ldg"]), hist(r["stg"]), atom or "-", f"{r['ldl']}/{r['stl']}",
                  f"{divs} ({r['div64_in_loop']})" if divs else "-",
                  " ".join(f"{k}x{n}" for k, n in sorted(other.items())) or "-", str(r["insns"])]
    else:
        cells += ["n/a"] * 7
    table.append(cells)
w = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(head)]
fmt = lambda cells: "  ".join(c.ljust(w[i]) for i, c in enumerate(cells)).rstrip()
txt = [f"Static resources, sm_{arch}, {len(rows)} kernel instantiations. Counts are static SASS instructions "
       f"(an unrolled loop repeats its loads); occ = resident warps/SM for {threads}-thread blocks by registers.",
       fmt(head), fmt(["-" * x for x in w])] + [fmt(t) for t in table]


# Summary lines: the facts the report is read for.
def only(r, key, bits):
    return bool(r.get(key)) and set(r[key]) == {bits}


sass_rows = [r for r in rows if "insns" in r]
vec_rows = [r for r in sass_rows if r["kernel"] == "elementwise_kernel" and r["vec"] != 1]
summary = [
    f"registers {min((r.get('regs', 0) for r in rows), default=0)}..{max((r.get('regs', 0) for r in rows), default=0)}; "
    f"min occupancy {min((r['occupancy_warps'] or 64 for r in rows), default=64)}/64 warps; "
    f"spills {sum(r.get('spill_st', 0) + r.get('spill_ld', 0) for r in rows)} B; "
    f"stack {sum(r.get('stack', 0) for r in rows)} B; LDL+STL {sum(r['ldl'] + r['stl'] for r in sass_rows)}; "
    f"shared-memory ops {sum(r['lds_sts'] for r in sass_rows)}",
    f"elementwise VEC>1 instantiations with only 128-bit LDG and STG: "
    f"{sum(only(r, 'ldg', 128) and only(r, 'stg', 128) for r in vec_rows)}/{len(vec_rows)}",
    f"instantiations calling 64-bit div/rem helpers inside a loop: "
    f"{sum(r['div64_in_loop'] > 0 for r in sass_rows)}/{len(sass_rows)}",
    "instantiations with CAS-loop atomics: " + (", ".join(
        f"{r['kernel']}<{r['dtype']}>" for r in sass_rows if any("CAS" in k for k in r["atomics"])) or "none"),
]
if not sass_rows:
    summary = summary[:1] + ["no SASS (cuobjdump missing): ptxas columns only"]
txt += ["", *summary]
open(os.path.join(out, "table.txt"), "w").write("\n".join(txt) + "\n")
# Loop bodies (static: both sides of each branch), to compare a kernel before and after a change.
loops_txt = ["kernel instantiation: each loop as SASS instructions [LDG+STG, div64 call sites, other calls]"]
for r, t in zip(rows, table):
    if r.get("loops") is not None:
        loops_txt.append(f"{t[1]} {t[2]} VEC={t[3]}: " + ", ".join(
            f"{l['insns']} [{l['ldg_stg']}, {l['div64_calls']}, {l['other_calls']}]" for l in r["loops"]))
open(os.path.join(out, "loops.txt"), "w").write("\n".join(loops_txt) + "\n")
md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(t) + " |" for t in table]
open(os.path.join(out, "table.md"), "w").write("\n".join(md + [""] + ["- " + s for s in summary]) + "\n")
json.dump({"arch": f"sm_{arch}", "threads_per_block": threads, "summary": summary, "kernels": rows},
          open(os.path.join(out, "resources.json"), "w"), indent=1, default=str)
print("\n".join(txt))
PY

# raw/ is about 16 MB (mostly the SASS listings); KEEP_RAW=0 drops it, e.g. when $OUT travels back from a device.
if [ "${KEEP_RAW:-1}" = 0 ]; then rm -rf "$OUT/raw"; fi
echo "written: $OUT/{table.txt,table.md,loops.txt,resources.json$([ -d "$OUT/raw" ] && echo ,raw/)}"
exit $FAILED
