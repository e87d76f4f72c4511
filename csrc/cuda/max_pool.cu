// CUDA kernel of max_pool_relprop: one thread per pooled element adds its relevance to the input
// position the forward picked. Overlapping windows can pick the same input, hence atomicAdd: one
// fire-and-forget reduction (REDG.ADD) for float and double; sm_90 has no scalar 16-bit atomic add,
// so for half and bfloat16 ptxas emits a compare-and-swap loop (correct; slower only where windows
// overlap and contend; see the static report in benchmarks/RESULTS.md). Without overlap no two
// threads ever add to one element.
#include "device_types.cuh"
#include "kernels.cuh"

namespace lrpfast {
namespace cuda {
namespace {

template <typename T>
__global__ void max_pool_relprop_kernel(MaxPoolParams p) {
  const int64_t total = p.rows * p.channels * p.plane_out;
  const T* r = static_cast<const T*>(p.r);
  T* out = static_cast<T*>(p.out);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plane = e / p.plane_out;  // (row, channel)
    const int64_t j = e - plane * p.plane_out;
    const int64_t row = plane / p.channels;
    const int64_t ch = plane - row * p.channels;
    const int64_t t = p.indices[(shared_row(row, p.k) * p.channels + ch) * p.plane_out + j];
    // Indices come from the forward; one out of range would write outside the output.
    if (t < 0 || t >= p.plane_in) continue;
    atomicAdd(out + plane * p.plane_in + t, r[e]);
  }
}

}  // namespace

cudaError_t launch_max_pool_relprop(const MaxPoolParams& p, cudaStream_t stream) {
  const int64_t total = p.rows * p.channels * p.plane_out;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20);
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    max_pool_relprop_kernel<T><<<blocks, kThreads, 0, stream>>>(p);
    err = cudaGetLastError();
  });
  return err;
}

}  // namespace cuda
}  // namespace lrpfast
