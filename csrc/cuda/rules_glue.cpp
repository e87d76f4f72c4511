// CUDA registrations of the rule ops: argument checks (csrc/rule_args.h), device guard, current
// stream, then the torch-free launcher of rule_kernels.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../rule_args.h"
#include "launch_check.h"
#include "rule_kernels.cuh"

namespace lrpfast {
namespace {

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

at::Tensor launch(const char* op, cuda::RuleOp kind, const at::Tensor& device_ref, const PairedArgs& a) {
  cuda::RuleParams p{a.out.data_ptr(), a.a.const_data_ptr(), ptr_or_null(a.s1), ptr_or_null(a.s2),
                     ptr_or_null(a.low), ptr_or_null(a.high), a.rows, a.n, a.block, a.k, a.bound_rows,
                     a.p0, a.p1, a.eps, a.stabilizer, dtype_code(op, device_ref.scalar_type())};
  check_launch(op, cuda::launch_rule_op(kind, p, c10::cuda::getCurrentCUDAStream()));
  return a.out;
}

void require_cuda(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "lrpfast::", op, ": expected CUDA tensors");
}

at::Tensor sign_split_cuda(const at::Tensor& x, int64_t dim, int64_t groups) {
  require_cuda("sign_split", x);
  const c10::cuda::CUDAGuard guard(x.device());
  return launch("sign_split", cuda::RuleOp::kSignSplit, x, prepare_sign_split(x, dim, groups));
}

at::Tensor sign_split_mul_input_cuda(const at::Tensor& c, const at::Tensor& x, int64_t dim, int64_t groups) {
  const char* op = "sign_split_mul_input";
  require_cuda(op, c);
  const c10::cuda::CUDAGuard guard(c.device());
  return launch(op, cuda::RuleOp::kSignSplitMulInput, c,
                prepare_paired_mul(op, c, x, at::Tensor(), at::Tensor(), dim, groups));
}

at::Tensor bounds_mul_input_cuda(const at::Tensor& c, const at::Tensor& x, const at::Tensor& low,
                                 const at::Tensor& high, int64_t dim, int64_t groups) {
  const char* op = "bounds_mul_input";
  require_cuda(op, c);
  const c10::cuda::CUDAGuard guard(c.device());
  return launch(op, cuda::RuleOp::kBoundsMulInput, c, prepare_paired_mul(op, c, x, low, high, dim, groups));
}

at::Tensor alpha_beta_stab_div_cuda(const at::Tensor& r, const at::Tensor& z, const at::Tensor& z_plus, int64_t dim,
                                    int64_t groups, double alpha, double beta, double eps,
                                    c10::string_view stabilizer) {
  const char* op = "alpha_beta_stab_div";
  require_cuda(op, r);
  const c10::cuda::CUDAGuard guard(r.device());
  return launch(op, cuda::RuleOp::kAlphaBetaStabDiv, r,
                prepare_paired_div(op, r, z, z_plus, dim, groups, alpha, beta, eps, stabilizer));
}

at::Tensor gamma_stab_div_cuda(const at::Tensor& r, const at::Tensor& z, const at::Tensor& zp, int64_t dim,
                               int64_t groups, double gamma, double eps, c10::string_view stabilizer) {
  const char* op = "gamma_stab_div";
  require_cuda(op, r);
  const c10::cuda::CUDAGuard guard(r.device());
  return launch(op, cuda::RuleOp::kGammaStabDiv, r,
                prepare_paired_div(op, r, z, zp, dim, groups, gamma, 0.0, eps, stabilizer));
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpfast, CUDA, m) {
  m.impl("sign_split", &sign_split_cuda);
  m.impl("sign_split_mul_input", &sign_split_mul_input_cuda);
  m.impl("bounds_mul_input", &bounds_mul_input_cuda);
  m.impl("alpha_beta_stab_div", &alpha_beta_stab_div_cuda);
  m.impl("gamma_stab_div", &gamma_stab_div_cuda);
}

}  // namespace lrpfast
