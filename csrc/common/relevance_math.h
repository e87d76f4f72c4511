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
  return z + (z >= acc_t(0) ? eps : -eps);
}

// a / b with 0 where b == 0. With eps > 0 the sign stabiliser never yields 0, but eps = 0
// (LRP-0) and the plus stabiliser at z = -eps would: a unit whose denominator vanishes passes
// no relevance instead of poisoning the whole map with inf/NaN (the seed's bug B6).
// The quotient is computed unconditionally and then discarded where b == 0: a branch around the
// division would keep compilers from vectorising the loop (they may not speculate a trapping op).
template <typename acc_t>
LRPFAST_HD acc_t safe_div(acc_t a, acc_t b) {
  const acc_t q = a / b;
  return b == acc_t(0) ? acc_t(0) : q;
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

// ------------------------------------------------------------------ rules with two branches
// (lrpfast/rules.py; DESIGN.md §1.) The z+/αβ/γ/z^B rules run one contraction over two branches
// side by side: "paired" tensors hold, per group of channels, branch 0 then branch 1 (see
// csrc/rule_args.h). These are the elementwise steps around those contractions.

template <typename acc_t>
LRPFAST_HD acc_t positive_part(acc_t x) {
  return x > acc_t(0) ? x : acc_t(0);
}

template <typename acc_t>
LRPFAST_HD acc_t negative_part(acc_t x) {
  return x < acc_t(0) ? x : acc_t(0);
}

// R = x+ * c_pos + x- * c_neg: the relevance of a signed input, whose positive and negative parts
// met different modified weights (c_pos, c_neg: the two halves of one transposed contraction).
template <typename acc_t>
LRPFAST_HD acc_t sign_split_mul_input(acc_t c_pos, acc_t c_neg, acc_t x) {
  return positive_part(x) * c_pos + negative_part(x) * c_neg;
}

// z^B: R = x*W^T s - low*W+^T s - high*W-^T s = (x - low) * c_pos + (x - high) * c_neg,
// with c_pos = W+^T s and c_neg = W-^T s (w = w+ + w-).
template <typename acc_t>
LRPFAST_HD acc_t bounds_mul_input(acc_t c_pos, acc_t c_neg, acc_t x, acc_t low, acc_t high) {
  return (x - low) * c_pos + (x - high) * c_neg;
}

// αβ: s+ = α r / stab(z+), s- = -β r / stab(z-). z- is not contracted: z = z+ + z- holds for every
// input (x w + b splits into the positive and the negative products), so z- = z - z+, with the
// same rounding the forward's own z already carries.
template <typename acc_t>
LRPFAST_HD void alpha_beta_stab_div(acc_t r, acc_t z, acc_t z_plus, acc_t alpha, acc_t beta, acc_t eps,
                                    int32_t mode, acc_t& s_pos, acc_t& s_neg) {
  s_pos = alpha * stab_div(r, z_plus, eps, mode);
  s_neg = -beta * stab_div(r, z - z_plus, eps, mode);
}

// Generalised γ: units with z > 0 divide by zp = z + γ z+, units with z < 0 by
// zn = z + γ z- = (2 + γ) z - zp (again z- = z - z+: one contraction gives both).
// Both quotients are computed for every unit, then selected: no division under a condition, so
// compilers keep the loop branch-free (vector blends on CPU, predication on GPU).
template <typename acc_t>
LRPFAST_HD void gamma_stab_div(acc_t r, acc_t z, acc_t zp, acc_t gamma, acc_t eps, int32_t mode, acc_t& s_pos,
                               acc_t& s_neg) {
  const acc_t q_pos = stab_div(r, zp, eps, mode);
  const acc_t q_neg = stab_div(r, (acc_t(2) + gamma) * z - zp, eps, mode);
  s_pos = z > acc_t(0) ? q_pos : acc_t(0);
  s_neg = z < acc_t(0) ? q_neg : acc_t(0);
}

}  // namespace lrpfast
