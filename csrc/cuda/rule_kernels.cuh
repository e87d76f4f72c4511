// Launchers of the CUDA kernels of the rule ops (sign_split, sign_split_mul_input,
// bounds_mul_input, alpha_beta_stab_div, gamma_stab_div). Torch-free, like kernels.cuh: raw
// pointers, sizes and dtype codes in a plain struct. Layouts: csrc/rule_args.h ("paired").
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lrpfast {
namespace cuda {

enum class RuleOp : int32_t {
  kSignSplit = 0,          // out (paired) = [x+, x-]                       a = x
  kSignSplitMulInput = 1,  // out = x+ c0 + x- c1                          a = c (paired), s1 = x
  kBoundsMulInput = 2,     // out = (x - low) c0 + (x - high) c1           a = c (paired), s1 = x
  kAlphaBetaStabDiv = 3,   // out (paired) = [α r/stab(z+), -β r/stab(z-z+)]  a = r, s1 = z, s2 = z+
  kGammaStabDiv = 4,       // out (paired) = γ rule's [s_p, s_n]           a = r, s1 = z, s2 = zp
};

struct RuleParams {
  void* out;
  const void* a;     // K*B rows (B for sign_split)
  const void* s1;    // B rows, unpaired
  const void* s2;    // B rows, unpaired (div ops)
  const void* low;   // bound_rows rows (bounds_mul_input)
  const void* high;
  int64_t rows;        // rows of a / out
  int64_t n;           // elements per row, unpaired
  int64_t block;       // elements per block (n = nb * block)
  int64_t k;           // rows of a per shared row
  int64_t bound_rows;  // 1, or the rows of s1
  double p0, p1, eps;  // α, β / γ / -
  int32_t stabilizer;  // lrpfast::Stabilizer
  int32_t dtype;       // lrpfast::DType
};

cudaError_t launch_rule_op(RuleOp op, const RuleParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace lrpfast
