// CUDA kernels of the rule ops: a grid-stride loop over VEC consecutive unpaired elements per
// step, the arithmetic of common/relevance_math.h in float (half types) or the storage type.
// Element e of a row maps to (block blk, offset j); in a paired tensor branch b of that element
// sits at blk * 2 * block + b * block + j (layout: csrc/rule_args.h). When block % VEC == 0 the
// VEC elements of a step are contiguous in every operand, paired or not, so each operand moves as
// one 16-byte access and the index arithmetic (divisions) is paid once per VEC elements: the
// static report (benchmarks/RESULTS.md) found the one-element loop issue-bound in 16 bits.
#include "device_types.cuh"
#include "rule_kernels.cuh"

namespace lrpfast {
namespace cuda {
namespace {

// The operands of one step, loaded before any step of the thread stores (see ILP below).
template <typename T, int VEC, typename I>
struct Loaded {
  Vec<T, VEC> x0, x1, x2, x3, x4;
  I e, pair0;  // unpaired offset of the step; offset of its branch 0 in a paired tensor
};

// ILP steps per thread, spaced blockDim apart, all loaded before the first is stored: `out` may
// alias the inputs as far as the compiler knows, so without this it could not issue the next
// step's loads before the current store. The vector path moves 16 bytes an access and keeps
// enough in flight with one step (H100, 2026-11-26: 91-98% of a copy); one element a step did
// not (71-77%). Index type I: 32-bit where the sizes allow (64-bit division is a software routine).
template <RuleOp OP, typename T, int VEC, int ILP, typename I>
__global__ void rule_kernel(RuleParams p) {
  using acc_t = typename Acc<T>::type;
  using V = Vec<T, VEC>;
  const I total_vec = static_cast<I>(p.rows * p.n / VEC);
  const I n = static_cast<I>(p.n), block = static_cast<I>(p.block), k = static_cast<I>(p.k);
  const T* a = static_cast<const T*>(p.a);
  const T* s1 = static_cast<const T*>(p.s1);
  const T* s2 = static_cast<const T*>(p.s2);
  T* out = static_cast<T*>(p.out);
  const acc_t q0 = static_cast<acc_t>(p.p0), q1 = static_cast<acc_t>(p.p1), eps = static_cast<acc_t>(p.eps);
  const I tile = static_cast<I>(blockDim.x) * ILP;
  for (I base = blockIdx.x * tile + threadIdx.x; base < total_vec; base += static_cast<I>(gridDim.x) * tile) {
    Loaded<T, VEC, I> L[ILP];
#pragma unroll
    for (int u = 0; u < ILP; ++u) {
      const I v = base + u * static_cast<I>(blockDim.x);
      if (v >= total_vec) break;
      const I e = v * VEC;
      const I row = e / n;
      const I i = e - row * n;
      // Uniform branches that skip a division in the common cases (one block per row: Linear;
      // one relevance map per sample).
      const I blk = block == n ? 0 : i / block;
      const I j = i - blk * block;
      const I srow = k == 1 ? row : row / k;  // shared_row
      const I pair0 = row * 2 * n + blk * 2 * block + j;  // branch 0; branch 1 is + block
      const I shared = srow * n + i;
      L[u].e = e;
      L[u].pair0 = pair0;
      if constexpr (OP == RuleOp::kSignSplit) {
        L[u].x0 = load_vec<T, VEC>(a, e);
      } else if constexpr (OP == RuleOp::kSignSplitMulInput || OP == RuleOp::kBoundsMulInput) {
        L[u].x0 = load_vec<T, VEC>(a, pair0);
        L[u].x1 = load_vec<T, VEC>(a, pair0 + block);
        L[u].x2 = load_vec<T, VEC>(s1, shared);
        if constexpr (OP == RuleOp::kBoundsMulInput) {
          const I b = (p.bound_rows == 1 ? 0 : srow) * n + i;
          L[u].x3 = load_vec<T, VEC>(static_cast<const T*>(p.low), b);
          L[u].x4 = load_vec<T, VEC>(static_cast<const T*>(p.high), b);
        }
      } else {
        L[u].x0 = load_vec<T, VEC>(a, e);
        L[u].x1 = load_vec<T, VEC>(s1, shared);
        L[u].x2 = load_vec<T, VEC>(s2, shared);
      }
    }
#pragma unroll
    for (int u = 0; u < ILP; ++u) {
      if (base + u * static_cast<I>(blockDim.x) >= total_vec) break;
      const Loaded<T, VEC, I>& l = L[u];
      if constexpr (OP == RuleOp::kSignSplit) {
        V pos, neg;
#pragma unroll
        for (int m = 0; m < VEC; ++m) {
          const acc_t xv = to_acc(l.x0.v[m]);
          pos.v[m] = from_acc<T>(positive_part(xv));
          neg.v[m] = from_acc<T>(negative_part(xv));
        }
        store_vec<T, VEC>(out, l.pair0, pos);
        store_vec<T, VEC>(out, l.pair0 + block, neg);
      } else if constexpr (OP == RuleOp::kSignSplitMulInput || OP == RuleOp::kBoundsMulInput) {
        V o;
#pragma unroll
        for (int m = 0; m < VEC; ++m) {
          if constexpr (OP == RuleOp::kSignSplitMulInput) {
            o.v[m] = from_acc<T>(sign_split_mul_input(to_acc(l.x0.v[m]), to_acc(l.x1.v[m]), to_acc(l.x2.v[m])));
          } else {
            o.v[m] = from_acc<T>(bounds_mul_input(to_acc(l.x0.v[m]), to_acc(l.x1.v[m]), to_acc(l.x2.v[m]),
                                                  to_acc(l.x3.v[m]), to_acc(l.x4.v[m])));
          }
        }
        store_vec<T, VEC>(out, l.e, o);
      } else {
        V sp, sn;
#pragma unroll
        for (int m = 0; m < VEC; ++m) {
          acc_t pos, neg;
          if constexpr (OP == RuleOp::kAlphaBetaStabDiv) {
            alpha_beta_stab_div(to_acc(l.x0.v[m]), to_acc(l.x1.v[m]), to_acc(l.x2.v[m]), q0, q1, eps, p.stabilizer,
                                pos, neg);
          } else {
            gamma_stab_div(to_acc(l.x0.v[m]), to_acc(l.x1.v[m]), to_acc(l.x2.v[m]), q0, eps, p.stabilizer, pos, neg);
          }
          sp.v[m] = from_acc<T>(pos);
          sn.v[m] = from_acc<T>(neg);
        }
        store_vec<T, VEC>(out, l.pair0, sp);
        store_vec<T, VEC>(out, l.pair0 + block, sn);
      }
    }
  }
}

template <RuleOp OP, typename T, int VEC, int ILP>
void launch_steps(const RuleParams& p, cudaStream_t stream) {
  const int64_t steps = p.rows * p.n / VEC;
  const int64_t blocks = grid_blocks((steps + ILP - 1) / ILP);
  // 32-bit offsets when every one (paired tensors are twice as long), and one grid stride past
  // the end, fits
  if (2 * p.rows * p.n + blocks * kBlockThreads * ILP * VEC < (int64_t(1) << 31)) {
    rule_kernel<OP, T, VEC, ILP, uint32_t><<<blocks, kBlockThreads, 0, stream>>>(p);
  } else {
    rule_kernel<OP, T, VEC, ILP, int64_t><<<blocks, kBlockThreads, 0, stream>>>(p);
  }
}

template <RuleOp OP>
cudaError_t launch_op(const RuleParams& p, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    // block % kVec == 0 makes n and every step's offsets multiples of kVec; with 16-byte aligned
    // bases every access is then aligned. Otherwise (odd blocks, offset views) one element a step.
    const bool vec_ok = p.block % kVec == 0 && aligned16(p.out) && aligned16(p.a) && aligned16(p.s1) &&
                        aligned16(p.s2) && aligned16(p.low) && aligned16(p.high);
    if (vec_ok) {
      launch_steps<OP, T, kVec, 1>(p, stream);
    } else {
      launch_steps<OP, T, 1, 4>(p, stream);
    }
    err = cudaGetLastError();
  });
  return err;
}

}  // namespace

cudaError_t launch_rule_op(RuleOp op, const RuleParams& p, cudaStream_t stream) {
  if (p.rows * p.n == 0) return cudaSuccess;
  switch (op) {
    case RuleOp::kSignSplit: return launch_op<RuleOp::kSignSplit>(p, stream);
    case RuleOp::kSignSplitMulInput: return launch_op<RuleOp::kSignSplitMulInput>(p, stream);
    case RuleOp::kBoundsMulInput: return launch_op<RuleOp::kBoundsMulInput>(p, stream);
    case RuleOp::kAlphaBetaStabDiv: return launch_op<RuleOp::kAlphaBetaStabDiv>(p, stream);
    case RuleOp::kGammaStabDiv: return launch_op<RuleOp::kGammaStabDiv>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lrpfast
