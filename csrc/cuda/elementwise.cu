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
cudaError_t launch_typed(const ElementwiseParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t total = p.rows * p.n;
  const bool vec_ok = aligned16(p.out) && aligned16(p.a) && aligned16(p.b) && aligned16(p.c) &&
                      total % kVec == 0 && (p.k == 1 || p.n % kVec == 0);
  const int64_t blocks = grid_blocks(vec_ok ? total / kVec : total);
  if (vec_ok) {
    elementwise_kernel<OP, T, kVec><<<blocks, kBlockThreads, 0, stream>>>(p);
  } else {
    elementwise_kernel<OP, T, 1><<<blocks, kBlockThreads, 0, stream>>>(p);
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
