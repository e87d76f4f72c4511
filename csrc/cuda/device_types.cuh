// Storage types of the kernels and their accumulation type (float for half types).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

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

// VEC elements of T moved as one 16-byte access when sizeof(T) * VEC == 16 (LDG.E.128/STG.E.128).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// The VEC elements at offset i (a multiple of VEC) of base, as one access. Indexing a Vec pointer
// keeps the 16-byte alignment visible to the compiler; casting base + i instead was compiled to
// scalar stores in the rule kernels (sm_90 SASS, benchmarks/cuda_resources.sh).
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* base, int64_t i) {
  return reinterpret_cast<const Vec<T, VEC>*>(base)[static_cast<uint64_t>(i) / VEC];
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* base, int64_t i, const Vec<T, VEC>& v) {
  reinterpret_cast<Vec<T, VEC>*>(base)[static_cast<uint64_t>(i) / VEC] = v;
}

// A null pointer (an operand the op does not use) does not prevent the vector path.
inline bool aligned16(const void* ptr) { return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) % 16) == 0; }

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

// Threads per block of the grid-stride launchers.
constexpr int kBlockThreads = 256;

// Blocks for `work` grid-stride steps: enough to fill every SM several times over; the loop
// covers the rest.
inline int64_t grid_blocks(int64_t work) {
  return std::min<int64_t>((work + kBlockThreads - 1) / kBlockThreads, int64_t(sm_count()) * 16);
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
