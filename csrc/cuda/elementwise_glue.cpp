// CUDA registrations of the fused primitives: argument checks, device guard, current stream, then
// the torch-free launchers of kernels.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../relprop_args.h"
#include "kernels.cuh"
#include "launch_check.h"

namespace lrpfast {
namespace {

at::Tensor run(const char* name, cuda::ElementwiseOp op, const at::Tensor& a, const at::Tensor& b,
               const at::Tensor& c, const at::Tensor& ref, double eps, c10::string_view stabilizer) {
  TORCH_CHECK(a.is_cuda(), "lrpfast::", name, ": expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(a.device());
  auto args = prepare_elementwise(name, a, b, c, ref, eps, stabilizer);
  cuda::ElementwiseParams p{args.out.data_ptr(), args.a.const_data_ptr(), args.b.const_data_ptr(),
                            args.c.defined() ? args.c.const_data_ptr() : nullptr,
                            args.rows, args.n, args.k, args.eps, args.stabilizer,
                            dtype_code(name, a.scalar_type())};
  check_launch(name, cuda::launch_elementwise(op, p, c10::cuda::getCurrentCUDAStream()));
  return args.out;
}

at::Tensor stab_div_cuda(const at::Tensor& r, const at::Tensor& z, double eps, c10::string_view stabilizer) {
  return run("stab_div", cuda::ElementwiseOp::kStabDiv, r, z, at::Tensor(), z, eps, stabilizer);
}

at::Tensor mul_input_cuda(const at::Tensor& c, const at::Tensor& x) {
  return run("mul_input", cuda::ElementwiseOp::kMulInput, c, x, at::Tensor(), x, 0.0, "sign");
}

at::Tensor mul_stab_div_cuda(const at::Tensor& c, const at::Tensor& x, const at::Tensor& z, double eps,
                             c10::string_view stabilizer) {
  return run("mul_stab_div", cuda::ElementwiseOp::kMulStabDiv, c, x, z, z, eps, stabilizer);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpfast, CUDA, m) {
  m.impl("stab_div", &stab_div_cuda);
  m.impl("mul_input", &mul_input_cuda);
  m.impl("mul_stab_div", &mul_stab_div_cuda);
}

}  // namespace lrpfast
