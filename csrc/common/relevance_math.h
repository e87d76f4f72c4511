// The arithmetic of every fused relevance step, written once.
//
// Torch-free and __host__ __device__: the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda)
// include this same file, so the CPU tests exercise exactly the arithmetic the GPU runs.
// Values arrive already converted to the accumulation type (float for half types, else the
// storage type): half and bfloat16 never see an epsilon they cannot represent.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LRPFAST_HD __host__ __device__ __forceinline__
#else
#define LRPFAST_HD inline
#endif

namespace lrpfast {

// How z is moved away from zero before dividing by it. One enum for C++, CUDA and Python
// (lrpfast/ops.py maps "sign" -> 0, "plus" -> 1).
enum Stabilizer : int32_t {
  kStabSign = 0,  // z + eps * sign(z), sign(0) = +1 (Bach et al. 2015; zennit, captum)
  kStabPlus = 1,  // z + eps: the seed notebook's stabiliser ("seed-parity mode")
};

// Storage dtypes the kernels are instantiated for; the codes travel through plain structs.
enum DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

template <typename acc_t>
LRPFAST_HD acc_t stabilize(acc_t z, acc_t eps, int32_t mode) {
  if (mode == kStabPlus) return z + eps;
  return z >= acc_t(0) ? z + eps : z - eps;
}

// a / b with 0 where b == 0. With eps > 0 the sign stabiliser never yields 0, but eps = 0
// (LRP-0) and the plus stabiliser at z = -eps would: a unit whose denominator vanishes passes
// no relevance instead of poisoning the whole map with inf/NaN (the seed's bug B6).
template <typename acc_t>
LRPFAST_HD acc_t safe_div(acc_t a, acc_t b) {
  return b == acc_t(0) ? acc_t(0) : a / b;
}

// s = r / stab(z): the first half of every ε-rule step.
template <typename acc_t>
LRPFAST_HD acc_t stab_div(acc_t r, acc_t z, acc_t eps, int32_t mode) {
  return safe_div(r, stabilize(z, eps, mode));
}

// R = x * c: the second half (relevance at the layer's input).
template <typename acc_t>
LRPFAST_HD acc_t mul_input(acc_t c, acc_t x) {
  return c * x;
}

// s_lower = (x * c) / stab(z_lower): the elementwise work between two contractions fused into
// one pass (the upper layer's product with its input, a ReLU that passes relevance unchanged,
// and the lower layer's stabilised division).
template <typename acc_t>
LRPFAST_HD acc_t mul_stab_div(acc_t c, acc_t x, acc_t z, acc_t eps, int32_t mode) {
  return safe_div(c * x, stabilize(z, eps, mode));
}

// Relevance tensors may carry K targets per sample: r is laid out (B, K, N) while x and z are
// (B, N) and shared by the K maps. Row `row` of r (one of B*K) reads row row / K of x and z.
LRPFAST_HD int64_t shared_row(int64_t row, int64_t k_targets) { return row / k_targets; }

}  // namespace lrpfast
