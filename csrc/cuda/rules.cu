// CUDA kernels of the rule ops: a grid-stride loop over VEC consecutive unpaired elements per
// step, the arithmetic of common/relevance_math.h in float (half types) or the storage type.
// Element e of a row maps to (block blk, offset j); in a paired tensor branch b of that element
// sits at blk * 2 * block + b * block + j (layout: csrc/rule_args.h). When block % VEC == 0 the
// VEC elements of a step are contiguous in every operand, paired or not, so each operand moves as
// one 16-byte access and the index arithmetic (64-bit divisions) is paid once per VEC elements:
// the static report (benchmarks/RESULTS.md) found the one-element loop issue-bound in 16 bits.
#include "device_types.cuh"
#include "rule_kernels.cuh"

namespace lrpfast {
namespace cuda {
namespace {

template <RuleOp OP, typename T, int VEC>
__global__ void rule_kernel(RuleParams p) {
  using acc_t = typename Acc<T>::type;
  using V = Vec<T, VEC>;
  const int64_t total_vec = p.rows * p.n / VEC;
  const T* a = static_cast<const T*>(p.a);
  const T* s1 = static_cast<const T*>(p.s1);
  const T* s2 = static_cast<const T*>(p.s2);
  T* out = static_cast<T*>(p.out);
  const acc_t q0 = static_cast<acc_t>(p.p0), q1 = static_cast<acc_t>(p.p1), eps = static_cast<acc_t>(p.eps);
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < total_vec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = v * VEC;
    const int64_t row = e / p.n;
    const int64_t i = e - row * p.n;
    // Uniform branches that skip a division in the common cases (one block per row: Linear;
    // one relevance map per sample).
    const int64_t blk = p.block == p.n ? 0 : i / p.block;
    const int64_t j = i - blk * p.block;
    const int64_t srow = p.k == 1 ? row : shared_row(row, p.k);
    const int64_t pair0 = row * 2 * p.n + blk * 2 * p.block + j;  // branch 0; branch 1 is + block
    const int64_t shared = srow * p.n + i;
    if constexpr (OP == RuleOp::kSignSplit) {
      const V x = load_vec<T, VEC>(a, e);
      V pos, neg;
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        const acc_t xv = to_acc(x.v[l]);
        pos.v[l] = from_acc<T>(positive_part(xv));
        neg.v[l] = from_acc<T>(negative_part(xv));
      }
      store_vec<T, VEC>(out, pair0, pos);
      store_vec<T, VEC>(out, pair0 + p.block, neg);
    } else if constexpr (OP == RuleOp::kSignSplitMulInput || OP == RuleOp::kBoundsMulInput) {
      const V c0 = load_vec<T, VEC>(a, pair0), c1 = load_vec<T, VEC>(a, pair0 + p.block);
      const V x = load_vec<T, VEC>(s1, shared);
      V lo, hi, o;
      if constexpr (OP == RuleOp::kBoundsMulInput) {
        const int64_t b = (p.bound_rows == 1 ? 0 : srow) * p.n + i;
        lo = load_vec<T, VEC>(static_cast<const T*>(p.low), b);
        hi = load_vec<T, VEC>(static_cast<const T*>(p.high), b);
      }
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        if constexpr (OP == RuleOp::kSignSplitMulInput) {
          o.v[l] = from_acc<T>(sign_split_mul_input(to_acc(c0.v[l]), to_acc(c1.v[l]), to_acc(x.v[l])));
        } else {
          o.v[l] = from_acc<T>(bounds_mul_input(to_acc(c0.v[l]), to_acc(c1.v[l]), to_acc(x.v[l]),
                                                to_acc(lo.v[l]), to_acc(hi.v[l])));
        }
      }
      store_vec<T, VEC>(out, e, o);
    } else {
      const V r = load_vec<T, VEC>(a, e), z = load_vec<T, VEC>(s1, shared), z2 = load_vec<T, VEC>(s2, shared);
      V sp, sn;
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        acc_t pos, neg;
        if constexpr (OP == RuleOp::kAlphaBetaStabDiv) {
          alpha_beta_stab_div(to_acc(r.v[l]), to_acc(z.v[l]), to_acc(z2.v[l]), q0, q1, eps, p.stabilizer, pos, neg);
        } else {
          gamma_stab_div(to_acc(r.v[l]), to_acc(z.v[l]), to_acc(z2.v[l]), q0, eps, p.stabilizer, pos, neg);
        }
        sp.v[l] = from_acc<T>(pos);
        sn.v[l] = from_acc<T>(neg);
      }
      store_vec<T, VEC>(out, pair0, sp);
      store_vec<T, VEC>(out, pair0 + p.block, sn);
    }
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
    const int64_t blocks = grid_blocks(p.rows * p.n / (vec_ok ? kVec : 1));
    if (vec_ok) {
      rule_kernel<OP, T, kVec><<<blocks, kBlockThreads, 0, stream>>>(p);
    } else {
      rule_kernel<OP, T, 1><<<blocks, kBlockThreads, 0, stream>>>(p);
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
