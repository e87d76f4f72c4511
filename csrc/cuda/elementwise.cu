// CUDA kernels of the fused primitives stab_div, mul_input, mul_stab_div.
// Memory-bound: each element is read and written once, with 16-byte vector accesses where the
// pointers and sizes allow, and the arithmetic of common/relevance_math.h in float or double.
#include "device_types.cuh"
#include "kernels.cuh"

namespace lrpfast {
namespace cuda {
namespace {

template <ElementwiseOp OP, typename T, int VEC>
__global__ void elementwise_kernel(ElementwiseParams p) {
  using acc_t = typename Acc<T>::type;
  const int64_t total_vec = p.rows * p.n / VEC;
  const int64_t kn = p.k * p.n;
  const acc_t eps = static_cast<acc_t>(p.eps);
  const int32_t mode = p.stabilizer;
  const auto* a = reinterpret_cast<const Vec<T, VEC>*>(p.a);
  auto* out = reinterpret_cast<Vec<T, VEC>*>(p.out);
  const T* b = static_cast<const T*>(p.b);
  const T* c = static_cast<const T*>(p.c);
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < total_vec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = v * VEC;
    // K maps per sample share x/z; a vector never straddles a row (n % VEC == 0 when k > 1).
    const int64_t is = p.k == 1 ? i : (i / kn) * p.n + i % p.n;
    const Vec<T, VEC> va = a[v];
    const Vec<T, VEC> vb = *reinterpret_cast<const Vec<T, VEC>*>(b + is);
    Vec<T, VEC> vc;
    if constexpr (OP == ElementwiseOp::kMulStabDiv) vc = *reinterpret_cast<const Vec<T, VEC>*>(c + is);
    Vec<T, VEC> vo;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_t r;
      if constexpr (OP == ElementwiseOp::kStabDiv) {
        r = lrpfast::stab_div(to_acc(va.v[j]), to_acc(vb.v[j]), eps, mode);
      } else if constexpr (OP == ElementwiseOp::kMulInput) {
        r = lrpfast::mul_input(to_acc(va.v[j]), to_acc(vb.v[j]));
      } else {
        r = lrpfast::mul_stab_div(to_acc(va.v[j]), to_acc(vb.v[j]), to_acc(vc.v[j]), eps, mode);
      }
      vo.v[j] = from_acc<T>(r);
    }
    out[v] = vo;
  }
}

template <ElementwiseOp OP, typename T>
__device__ __forceinline__ T apply(T a, T b, T c, typename Acc<T>::type eps, int32_t mode) {
  if constexpr (OP == ElementwiseOp::kStabDiv) {
    return from_acc<T>(lrpfast::stab_div(to_acc(a), to_acc(b), eps, mode));
  } else if constexpr (OP == ElementwiseOp::kMulInput) {
    return from_acc<T>(lrpfast::mul_input(to_acc(a), to_acc(b)));
  } else {
    return from_acc<T>(lrpfast::mul_stab_div(to_acc(a), to_acc(b), to_acc(c), eps, mode));
  }
}

// One element a step (unaligned pointers, odd sizes): kIlp elements per thread, all loaded before
// any is stored, a block's kIlp * blockDim elements contiguous. One element per thread and loop
// trip, as before, kept too few loads in flight (H100, 2026-11-26: 71-81% of a copy against
// 93-97% on the vector path): out may alias a, so the compiler could not hoist the next loads
// above a store. Index type I: 32-bit where the sizes allow.
constexpr int kIlp = 4;

template <ElementwiseOp OP, typename T, typename I>
__global__ void elementwise_scalar_kernel(ElementwiseParams p) {
  using acc_t = typename Acc<T>::type;
  const I total = static_cast<I>(p.rows * p.n), n = static_cast<I>(p.n), kn = static_cast<I>(p.k * p.n);
  const acc_t eps = static_cast<acc_t>(p.eps);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const T* c = static_cast<const T*>(p.c);
  T* out = static_cast<T*>(p.out);
  const I tile = static_cast<I>(blockDim.x) * kIlp;
  for (I base = blockIdx.x * tile + threadIdx.x; base < total; base += static_cast<I>(gridDim.x) * tile) {
    T va[kIlp], vb[kIlp], vc[kIlp] = {};
#pragma unroll
    for (int u = 0; u < kIlp; ++u) {
      const I i = base + u * static_cast<I>(blockDim.x);
      if (i < total) {
        const I is = p.k == 1 ? i : (i / kn) * n + i % n;
        va[u] = a[i];
        vb[u] = b[is];
        if constexpr (OP == ElementwiseOp::kMulStabDiv) vc[u] = c[is];
      }
    }
#pragma unroll
    for (int u = 0; u < kIlp; ++u) {
      const I i = base + u * static_cast<I>(blockDim.x);
      // (vc is only loaded, and only read, by mul_stab_div)
      if (i < total) out[i] = apply<OP, T>(va[u], vb[u], vc[u], eps, p.stabilizer);
    }
  }
}

template <ElementwiseOp OP, typename T>
cudaError_t launch_typed(const ElementwiseParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t total = p.rows * p.n;
  const bool vec_ok = aligned16(p.out) && aligned16(p.a) && aligned16(p.b) && aligned16(p.c) &&
                      total % kVec == 0 && (p.k == 1 || p.n % kVec == 0);
  if (vec_ok) {
    elementwise_kernel<OP, T, kVec><<<grid_blocks(total / kVec), kBlockThreads, 0, stream>>>(p);
  } else {
    const int64_t blocks = grid_blocks((total + kIlp - 1) / kIlp);
    // 32-bit offsets when every one, and one grid stride past the end, fits
    if (total + blocks * kBlockThreads * kIlp < (int64_t(1) << 31)) {
      elementwise_scalar_kernel<OP, T, uint32_t><<<blocks, kBlockThreads, 0, stream>>>(p);
    } else {
      elementwise_scalar_kernel<OP, T, int64_t><<<blocks, kBlockThreads, 0, stream>>>(p);
    }
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_elementwise(ElementwiseOp op, const ElementwiseParams& p, cudaStream_t stream) {
  if (p.rows * p.n == 0) return cudaSuccess;
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    switch (op) {
      case ElementwiseOp::kStabDiv: err = launch_typed<ElementwiseOp::kStabDiv, T>(p, stream); break;
      case ElementwiseOp::kMulInput: err = launch_typed<ElementwiseOp::kMulInput, T>(p, stream); break;
      case ElementwiseOp::kMulStabDiv: err = launch_typed<ElementwiseOp::kMulStabDiv, T>(p, stream); break;
    }
  });
  return err;
}

}  // namespace cuda
}  // namespace lrpfast
