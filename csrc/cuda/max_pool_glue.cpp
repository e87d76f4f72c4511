// CUDA registration of max_pool_relprop: checks, device guard, current stream, launcher.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../max_pool.h"
#include "kernels.cuh"
#include "launch_check.h"

namespace lrpfast {
namespace {

at::Tensor max_pool_relprop_cuda(const at::Tensor& r, const at::Tensor& indices, at::IntArrayRef input_size,
                                 at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(r.is_cuda(), "lrpfast::max_pool_relprop: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(r.device());
  auto a = prepare_max_pool(r, indices, input_size, stride, padding, /*gather_kernel=*/true);
  cuda::MaxPoolParams p{a.out.data_ptr(), a.r.const_data_ptr(), a.indices.const_data_ptr<int64_t>(), a.rows,
                        a.channels, a.plane_out, a.plane_in, a.k, dtype_code("max_pool_relprop", r.scalar_type())};
  if (a.disjoint) {
    p.dims = static_cast<int32_t>(a.in_size.size());
    for (int32_t d = 0; d < p.dims; ++d) {
      p.in_size[d] = a.in_size[d];
      p.pooled_size[d] = a.pooled_size[d];
      p.stride[d] = a.stride[d];
      p.padding[d] = a.padding[d];
    }
  }
  check_launch("max_pool_relprop", cuda::launch_max_pool_relprop(p, c10::cuda::getCurrentCUDAStream()));
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpfast, CUDA, m) { m.impl("max_pool_relprop", &max_pool_relprop_cuda); }

}  // namespace lrpfast
