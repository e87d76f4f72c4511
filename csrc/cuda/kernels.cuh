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

// out (rows, C, plane_in) = winner-take-all of r (rows, C, plane_out) at indices (rows / k, C,
// plane_out). Scatter (any geometry): `out` zeroed by the caller, overlapping windows add up.
// Disjoint windows (dims > 0): each pooled element writes its whole cell of the input, the
// winner r and the rest 0, so `out` needs no initialisation.
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
  int32_t dims = 0;  // 1-3: disjoint windows with the geometry below; 0: scatter
  int64_t in_size[3] = {1, 1, 1};
  int64_t pooled_size[3] = {1, 1, 1};
  int64_t stride[3] = {1, 1, 1};
  int64_t padding[3] = {0, 0, 0};
};

cudaError_t launch_max_pool_relprop(const MaxPoolParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace lrpfast
