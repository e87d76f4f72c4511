// Shapes of the winner-take-all scatter of max pooling, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include "relprop_args.h"

namespace lrpfast {

struct MaxPoolArgs {
  at::Tensor out, r, indices;
  int64_t rows = 0;      // rows of r (K*B)
  int64_t channels = 0;  // C
  int64_t plane_out = 0;  // pooled elements per (row, channel)
  int64_t plane_in = 0;   // input elements per (row, channel)
  int64_t k = 1;
};

inline MaxPoolArgs prepare_max_pool(const at::Tensor& r, const at::Tensor& indices, at::IntArrayRef input_size) {
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
  a.out = at::zeros(out_size, r.options());
  return a;
}

}  // namespace lrpfast
