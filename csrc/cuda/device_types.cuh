// Storage types of the kernels and their accumulation type (float for half types).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "../common/relevance_math.h"

namespace lrpfast {
namespace cuda {

template <typename T> struct Acc { using type = T; };
template <> struct Acc<__half> { using type = float; };
template <> struct Acc<__nv_bfloat16> { using type = float; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type to_acc(T v) { return v; }
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Multiprocessors of the current device (read once): grids of memory-bound kernels are sized
// to fill every SM a few times over and loop over the rest.
inline int sm_count() {
  static int count = [] {
    int dev = 0, n = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    return n > 0 ? n : 80;
  }();
  return count;
}

// Calls f(T{}) with the storage type of a dtype code; false for an unknown code.
template <typename F>
bool dispatch_dtype(int32_t dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); return true;
    case kFloat64: f(double{}); return true;
    case kFloat16: f(__half{}); return true;
    case kBFloat16: f(__nv_bfloat16{}); return true;
    default: return false;
  }
}

}  // namespace cuda
}  // namespace lrpfast
