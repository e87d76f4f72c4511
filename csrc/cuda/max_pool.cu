// CUDA kernels of max_pool_relprop, two of them:
// - Disjoint windows (the forward's stride/padding given, window span <= stride, e.g. VGG's 2x2
//   stride 2): one thread per pooled element writes its whole cell of the input, r at the winner
//   and 0 elsewhere. Every input element is written exactly once and nothing is read back: no zero
//   fill, no atomics, the same in 16 bits as in 32 (H100, 2026-11-26: the scatter below reached
//   41% of a copy in float32 on VGG's geometry, counting only r, the indices and one write).
// - Any geometry: one thread per pooled element adds its relevance to the input position the
//   forward picked, into a zeroed output. Overlapping windows can pick the same input, hence
//   atomicAdd: one fire-and-forget reduction (REDG.ADD) for float and double; sm_90 has no
//   scalar 16-bit atomic add, so for half and bfloat16 ptxas emits a compare-and-swap loop.
// Index arithmetic is 32-bit whenever the tensors allow (64-bit integer division is a software
// routine of dozens of instructions; these kernels are otherwise a few instructions per element).
#include "device_types.cuh"
#include "kernels.cuh"

namespace lrpfast {
namespace cuda {
namespace {

template <typename T, typename I>
__global__ void max_pool_scatter_kernel(MaxPoolParams p) {
  const I total = static_cast<I>(p.rows * p.channels * p.plane_out);
  const I plane_out = static_cast<I>(p.plane_out), plane_in = static_cast<I>(p.plane_in);
  const I channels = static_cast<I>(p.channels), k = static_cast<I>(p.k);
  const T* r = static_cast<const T*>(p.r);
  T* out = static_cast<T*>(p.out);
  for (I e = blockIdx.x * static_cast<I>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    const I plane = e / plane_out;  // (row, channel)
    const I j = e - plane * plane_out;
    I src = plane;  // the plane of the indices: K relevance rows share one row of indices
    if (k != 1) {
      const I row = plane / channels;
      src = (row / k) * channels + (plane - row * channels);
    }
    const int64_t t = p.indices[static_cast<int64_t>(src) * plane_out + j];
    // Indices come from the forward; one out of range would write outside the output.
    if (t < 0 || t >= plane_in) continue;
    atomicAdd(out + static_cast<int64_t>(plane) * plane_in + t, r[e]);
  }
}

// Cell of pooled coordinate c along one dim: [c*s - pad, c*s - pad + s), the last to the end of
// the input, clipped to it. With span <= stride a window lies inside its cell, so the cells
// partition the input and the winner of window c can only be in cell c.
struct Cell {
  int lo, hi;
};
__device__ __forceinline__ Cell cell(int c, int pooled, int in, int s, int pad) {
  const int lo = c * s - pad;
  return {max(lo, 0), c == pooled - 1 ? in : min(lo + s, in)};
}

template <typename T, typename I, int DIMS>
__global__ void max_pool_gather_kernel(MaxPoolParams p) {
  const I total = static_cast<I>(p.rows * p.channels * p.plane_out);
  const I plane_out = static_cast<I>(p.plane_out), plane_in = static_cast<I>(p.plane_in);
  const I channels = static_cast<I>(p.channels), k = static_cast<I>(p.k);
  int in[3], pooled[3], stride[3], pad[3];
#pragma unroll
  for (int d = 0; d < DIMS; ++d) {
    in[d] = static_cast<int>(p.in_size[d]);
    pooled[d] = static_cast<int>(p.pooled_size[d]);
    stride[d] = static_cast<int>(p.stride[d]);
    pad[d] = static_cast<int>(p.padding[d]);
  }
  const T* r = static_cast<const T*>(p.r);
  const T zero = from_acc<T>(0);
  for (I e = blockIdx.x * static_cast<I>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    const I plane = e / plane_out;
    const I j = e - plane * plane_out;
    I src = plane;
    if (k != 1) {
      const I row = plane / channels;
      src = (row / k) * channels + (plane - row * channels);
    }
    const int64_t t = p.indices[static_cast<int64_t>(src) * plane_out + j];
    const T rv = r[e];
    T* dst = static_cast<T*>(p.out) + static_cast<int64_t>(plane) * plane_in;
    // pooled coordinates of j, last dim fastest
    int c[3];
    I rest = j;
#pragma unroll
    for (int d = DIMS - 1; d > 0; --d) {
      const I q = rest / static_cast<I>(pooled[d]);
      c[d] = static_cast<int>(rest - q * static_cast<I>(pooled[d]));
      rest = q;
    }
    c[0] = static_cast<int>(rest);
    Cell cl[3];
#pragma unroll
    for (int d = 0; d < DIMS; ++d) cl[d] = cell(c[d], pooled[d], in[d], stride[d], pad[d]);
    if constexpr (DIMS == 1) {
      for (int x = cl[0].lo; x < cl[0].hi; ++x) dst[x] = x == t ? rv : zero;
    } else if constexpr (DIMS == 2) {
      // A cell two wide at an even offset (2x2 stride 2 on an even width: VGG) is one pair store:
      // a warp's stores then cover whole sectors instead of every other element.
      // (`out` is fresh from at::empty, so an even element offset is a 2-element-aligned address)
      const bool pairs = cl[1].hi - cl[1].lo == 2 && in[1] % 2 == 0 && (plane * plane_in + cl[1].lo) % 2 == 0;
      for (int y = cl[0].lo; y < cl[0].hi; ++y) {
        const I base = static_cast<I>(y) * in[1];
        if (pairs) {
          Vec<T, 2> v;
          v.v[0] = base + cl[1].lo == t ? rv : zero;
          v.v[1] = base + cl[1].lo + 1 == t ? rv : zero;
          *reinterpret_cast<Vec<T, 2>*>(dst + base + cl[1].lo) = v;
        } else {
          for (int x = cl[1].lo; x < cl[1].hi; ++x) dst[base + x] = base + x == t ? rv : zero;
        }
      }
    } else {
      for (int z = cl[0].lo; z < cl[0].hi; ++z) {
        for (int y = cl[1].lo; y < cl[1].hi; ++y) {
          const I base = (static_cast<I>(z) * in[1] + y) * in[2];
          for (int x = cl[2].lo; x < cl[2].hi; ++x) dst[base + x] = base + x == t ? rv : zero;
        }
      }
    }
  }
}

template <typename T, typename I>
void launch_typed(const MaxPoolParams& p, int64_t blocks, cudaStream_t stream) {
  switch (p.dims) {
    case 1: max_pool_gather_kernel<T, I, 1><<<blocks, kBlockThreads, 0, stream>>>(p); break;
    case 2: max_pool_gather_kernel<T, I, 2><<<blocks, kBlockThreads, 0, stream>>>(p); break;
    case 3: max_pool_gather_kernel<T, I, 3><<<blocks, kBlockThreads, 0, stream>>>(p); break;
    default: max_pool_scatter_kernel<T, I><<<blocks, kBlockThreads, 0, stream>>>(p); break;
  }
}

}  // namespace

cudaError_t launch_max_pool_relprop(const MaxPoolParams& p, cudaStream_t stream) {
  const int64_t total = p.rows * p.channels * p.plane_out;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = grid_blocks(total);
  // 32-bit indices when every flat offset (and one grid stride past the end) fits
  const int64_t largest = std::max(p.rows * p.channels * p.plane_in, total) + blocks * kBlockThreads;
  const bool narrow = largest < (int64_t(1) << 31);
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (narrow) {
      launch_typed<T, uint32_t>(p, blocks, stream);
    } else {
      launch_typed<T, int64_t>(p, blocks, stream);
    }
    err = cudaGetLastError();
  });
  return err;
}

}  // namespace cuda
}  // namespace lrpfast
