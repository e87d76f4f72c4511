// CPU kernel of max_pool_relprop: each window's relevance is added to the input position its
// forward picked. Planes are independent, so the parallel loop runs over (row, channel) planes
// and the adds within a plane stay serial: overlapping windows add up without atomics.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../max_pool.h"
#include "vectorize.h"

namespace lrpfast {
namespace {

// Planes p0..p1 of the output.
template <typename scalar_t>
void relprop_planes(const MaxPoolArgs& a, int64_t p0, int64_t p1) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* out = a.out.data_ptr<scalar_t>();
  const scalar_t* pr = a.r.const_data_ptr<scalar_t>();
  const int64_t* pi = a.indices.const_data_ptr<int64_t>();
  // Half types add up in a float plane and are rounded once (overlapping windows would
  // otherwise round after every add); float and double add in place.
  constexpr bool kDirect = std::is_same_v<acc_t, scalar_t>;
  // float16 planes are converted whole, in and out (F16C where the CPU has it: vectorize.h);
  // c10's conversion per element is software and cost more than the adds.
  constexpr bool kHalf = std::is_same_v<scalar_t, c10::Half>;
  std::vector<acc_t> plane(kDirect ? 0 : a.plane_in);
  std::vector<float> src_plane(kHalf ? a.plane_out : 0);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t row = p / a.channels, ch = p % a.channels;
    const int64_t* idx = pi + (shared_row(row, a.k) * a.channels + ch) * a.plane_out;
    const scalar_t* src = pr + p * a.plane_out;
    scalar_t* dst = out + p * a.plane_in;
    acc_t* acc = kDirect ? reinterpret_cast<acc_t*>(dst) : plane.data();
    if (!kDirect) std::fill(plane.begin(), plane.end(), acc_t(0));
    auto add_all = [&](const auto* values) {
      for (int64_t j = 0; j < a.plane_out; ++j) {
        const int64_t t = idx[j];
        TORCH_CHECK(t >= 0 && t < a.plane_in, "lrpfast::max_pool_relprop: index ", t,
                    " outside the input plane of ", a.plane_in, " elements (indices from another input?)");
        acc[t] += static_cast<acc_t>(values[j]);
      }
    };
    if constexpr (kHalf) {
      half_to_float(src, src_plane.data(), a.plane_out);
      add_all(src_plane.data());
      float_to_half(plane.data(), dst, a.plane_in);
    } else {
      add_all(src);
      if constexpr (!kDirect) {
        for (int64_t j = 0; j < a.plane_in; ++j) dst[j] = static_cast<scalar_t>(plane[j]);
      }
    }
  }
}

// stride/padding are checked but not needed: a plane is summed in cache, zero fill included.
at::Tensor max_pool_relprop_cpu(const at::Tensor& r, const at::Tensor& indices, at::IntArrayRef input_size,
                                at::IntArrayRef stride, at::IntArrayRef padding) {
  auto a = prepare_max_pool(r, indices, input_size, stride, padding, /*gather_kernel=*/false);
  const int64_t planes = a.rows * a.channels;
  if (planes == 0 || a.plane_out == 0) return a.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "max_pool_relprop", [&] {
    const int64_t grain = std::max<int64_t>(1, 32768 / a.plane_out);
    at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) { relprop_planes<scalar_t>(a, p0, p1); });
  });
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpfast, CPU, m) { m.impl("max_pool_relprop", &max_pool_relprop_cpu); }

}  // namespace lrpfast
