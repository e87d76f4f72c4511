// Shapes of the winner-take-all step of max pooling, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "relprop_args.h"

namespace lrpfast {

struct MaxPoolArgs {
  at::Tensor out, r, indices;
  int64_t rows = 0;      // rows of r (K*B)
  int64_t channels = 0;  // C
  int64_t plane_out = 0;  // pooled elements per (row, channel)
  int64_t plane_in = 0;   // input elements per (row, channel)
  int64_t k = 1;
  // Disjoint windows (the forward's stride/padding given, window span <= stride): every input
  // element lies in at most one window's cell, so a kernel can write each once (gather) into an
  // uninitialised `out` instead of zero-filling it and scattering adds into it.
  bool disjoint = false;
  std::vector<int64_t> in_size, pooled_size, stride, padding;  // spatial dims
};

// stride/padding: the forward's, passed only when its windows do not overlap (lrpfast.ops checks
// kernel_size and dilation); empty: any geometry, scatter. `gather_kernel`: the device kernel
// writes every element itself, so `out` is left uninitialised.
inline MaxPoolArgs prepare_max_pool(const at::Tensor& r, const at::Tensor& indices, at::IntArrayRef input_size,
                                    at::IntArrayRef stride = {}, at::IntArrayRef padding = {},
                                    bool gather_kernel = false) {
  const char* op = "max_pool_relprop";
  TORCH_CHECK(indices.scalar_type() == at::kLong, "lrpfast::", op, ": indices must be int64");
  TORCH_CHECK(indices.device() == r.device(), "lrpfast::", op, ": indices on ", indices.device(), ", r on ", r.device());
  TORCH_CHECK(indices.dim() >= 3 && static_cast<int64_t>(input_size.size()) == indices.dim() &&
                  input_size[0] == indices.size(0) && input_size[1] == indices.size(1),
              "lrpfast::", op, ": input_size ", input_size, " does not fit indices ", indices.sizes());
  dtype_code(op, r.scalar_type());
  MaxPoolArgs a;
  a.k = k_targets(op, r, indices);
  a.r = r.contiguous();
  a.indices = indices.contiguous();
  a.rows = r.size(0);
  a.channels = indices.size(1);
  a.plane_out = 1;
  for (int64_t d = 2; d < indices.dim(); ++d) a.plane_out *= indices.size(d);
  a.plane_in = 1;
  std::vector<int64_t> out_size{a.rows, a.channels};
  for (size_t d = 2; d < input_size.size(); ++d) {
    a.plane_in *= input_size[d];
    out_size.push_back(input_size[d]);
  }
  const int64_t dims = indices.dim() - 2;
  TORCH_CHECK(stride.size() == padding.size() && (stride.empty() || static_cast<int64_t>(stride.size()) == dims),
              "lrpfast::", op, ": stride ", stride, " and padding ", padding, " must both be empty or have ", dims,
              " entries");
  if (!stride.empty()) {
    for (int64_t d = 0; d < dims; ++d) {
      const int64_t in = input_size[d + 2], pooled = indices.size(d + 2), s = stride[d], pad = padding[d];
      // The cells [c*s - pad, c*s - pad + s) (the last one to the end) partition the input only
      // when the first starts at or before 0 and the last inside the input.
      TORCH_CHECK(s > 0 && pad >= 0 && pad < s && (pooled == 0 || (pooled - 1) * s - pad < in), "lrpfast::", op,
                  ": stride ", stride, " and padding ", padding, " do not fit pooling ", input_size,
                  " to ", indices.sizes());
      a.in_size.push_back(in);
      a.pooled_size.push_back(pooled);
      a.stride.push_back(s);
      a.padding.push_back(pad);
    }
    // (no pooled elements but a non-empty input: nothing would write the zeros)
    a.disjoint = dims >= 1 && dims <= 3 && a.plane_out > 0;
  }
  a.out = gather_kernel && a.disjoint ? at::empty(out_size, r.options()) : at::zeros(out_size, r.options());
  return a;
}

}  // namespace lrpfast
