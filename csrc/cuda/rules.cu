// CUDA kernels of the rule ops: one thread per unpaired element, a grid-stride loop, the
// arithmetic of common/relevance_math.h in float (half types) or the storage type.
// Element e of a row maps to (block blk, offset j); in a paired tensor branch b of that element
// sits at blk * 2 * block + b * block + j (layout: csrc/rule_args.h).
#include "device_types.cuh"
#include "rule_kernels.cuh"

namespace lrpfast {
namespace cuda {
namespace {

template <RuleOp OP, typename T>
__global__ void rule_kernel(RuleParams p) {
  using acc_t = typename Acc<T>::type;
  const int64_t total = p.rows * p.n;
  const T* a = static_cast<const T*>(p.a);
  const T* s1 = static_cast<const T*>(p.s1);
  const T* s2 = static_cast<const T*>(p.s2);
  T* out = static_cast<T*>(p.out);
  const acc_t q0 = static_cast<acc_t>(p.p0), q1 = static_cast<acc_t>(p.p1), eps = static_cast<acc_t>(p.eps);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / p.n;
    const int64_t i = e - row * p.n;
    const int64_t blk = i / p.block;
    const int64_t j = i - blk * p.block;
    const int64_t srow = shared_row(row, p.k);
    const int64_t pair0 = row * 2 * p.n + blk * 2 * p.block + j;  // branch 0; branch 1 is + block
    const int64_t shared = srow * p.n + i;
    if constexpr (OP == RuleOp::kSignSplit) {
      const acc_t v = to_acc(a[e]);
      out[pair0] = from_acc<T>(positive_part(v));
      out[pair0 + p.block] = from_acc<T>(negative_part(v));
    } else if constexpr (OP == RuleOp::kSignSplitMulInput) {
      out[e] = from_acc<T>(sign_split_mul_input(to_acc(a[pair0]), to_acc(a[pair0 + p.block]), to_acc(s1[shared])));
    } else if constexpr (OP == RuleOp::kBoundsMulInput) {
      const int64_t b = (p.bound_rows == 1 ? 0 : srow) * p.n + i;
      const T* low = static_cast<const T*>(p.low);
      const T* high = static_cast<const T*>(p.high);
      out[e] = from_acc<T>(bounds_mul_input(to_acc(a[pair0]), to_acc(a[pair0 + p.block]), to_acc(s1[shared]),
                                            to_acc(low[b]), to_acc(high[b])));
    } else {
      acc_t sp, sn;
      if constexpr (OP == RuleOp::kAlphaBetaStabDiv) {
        alpha_beta_stab_div(to_acc(a[e]), to_acc(s1[shared]), to_acc(s2[shared]), q0, q1, eps, p.stabilizer, sp, sn);
      } else {
        gamma_stab_div(to_acc(a[e]), to_acc(s1[shared]), to_acc(s2[shared]), q0, eps, p.stabilizer, sp, sn);
      }
      out[pair0] = from_acc<T>(sp);
      out[pair0 + p.block] = from_acc<T>(sn);
    }
  }
}

template <RuleOp OP>
cudaError_t launch_op(const RuleParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t total = p.rows * p.n;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(sm_count()) * 16);
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    rule_kernel<OP, T><<<blocks, kThreads, 0, stream>>>(p);
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
