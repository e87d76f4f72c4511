// Turns a launcher's cudaError_t into a torch error that names the op.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace lrpfast {

inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "lrpfast::", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace lrpfast
