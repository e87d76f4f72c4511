// CUDA registrations of the fused primitives and max_pool_relprop: argument checks, device guard,
// current stream, then the torch-free launchers of kernels.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../max_pool.h"
#include "../relprop_args.h"
#include "kernels.cuh"

namespace lrpfast {
namespace {

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "lrpfast::", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

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

at::Tensor max_pool_relprop_cuda(const at::Tensor& r, const at::Tensor& indices, at::IntArrayRef input_size) {
  TORCH_CHECK(r.is_cuda(), "lrpfast::max_pool_relprop: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(r.device());
  auto a = prepare_max_pool(r, indices, input_size);
  cuda::MaxPoolParams p{a.out.data_ptr(), a.r.const_data_ptr(), a.indices.const_data_ptr<int64_t>(), a.rows,
                        a.channels, a.plane_out, a.plane_in, a.k, dtype_code("max_pool_relprop", r.scalar_type())};
  check_launch("max_pool_relprop", cuda::launch_max_pool_relprop(p, c10::cuda::getCurrentCUDAStream()));
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpfast, CUDA, m) {
  m.impl("stab_div", &stab_div_cuda);
  m.impl("mul_input", &mul_input_cuda);
  m.impl("mul_stab_div", &mul_stab_div_cuda);
  m.impl("max_pool_relprop", &max_pool_relprop_cuda);
}

}  // namespace lrpfast
