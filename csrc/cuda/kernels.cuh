// Launchers of lrpfast's CUDA kernels. Torch-free: raw pointers, sizes and dtype codes in plain
// structs, so the .cu files compile in seconds and could serve another framework.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lrpfast {
namespace cuda {

enum class ElementwiseOp : int32_t { kStabDiv = 0, kMulInput = 1, kMulStabDiv = 2 };

// out[i] = op(a[i], b[shared(i)], c[shared(i)]) over rows * n elements; `a`/`out` have `rows`
// rows of n elements, b and c have rows / k (K relevance maps share one row of x and z).
struct ElementwiseParams {
  void* out;
  const void* a;
  const void* b;
  const void* c;  // z of mul_stab_div, else nullptr
  int64_t rows;
  int64_t n;
  int64_t k;
  double eps;
  int32_t stabilizer;  // lrpfast::Stabilizer
  int32_t dtype;       // lrpfast::DType
};

cudaError_t launch_elementwise(ElementwiseOp op, const ElementwiseParams& p, cudaStream_t stream);

// out (rows, C, plane_in) += scatter of r (rows, C, plane_out) at indices (rows / k, C, plane_out).
// `out` must be zeroed by the caller.
struct MaxPoolParams {
  void* out;
  const void* r;
  const int64_t* indices;
  int64_t rows;
  int64_t channels;
  int64_t plane_out;
  int64_t plane_in;
  int64_t k;
  int32_t dtype;
};

cudaError_t launch_max_pool_relprop(const MaxPoolParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace lrpfast
