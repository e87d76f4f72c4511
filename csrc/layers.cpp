// The relevance step of each layer type, written once for every device:
//   s = r / stab(z)          lrpfast::stab_div   (fused kernel of the device)
//   c = rho(W)^T s           ATen: the same input-gradient contraction autograd would run
//                            (oneDNN / cuBLAS / cuDNN), by design: a hand-written one would not beat it
//   R = x * c                lrpfast::mul_input  (fused kernel of the device)
// Registered for CPU and (when built) CUDA; the primitives re-dispatch to the device's kernels.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "relprop_args.h"

namespace lrpfast {
namespace {

at::Tensor call_stab_div(const at::Tensor& r, const at::Tensor& z, double eps, c10::string_view stabilizer) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrpfast::stab_div", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, c10::string_view)>();
  return op.call(r, z, eps, stabilizer);
}

at::Tensor call_mul_input(const at::Tensor& c, const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrpfast::mul_input", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(c, x);
}

// A tensor with x's per-sample shape and layout but `rows` rows. The backward ATen functions
// read only the sizes (and layout) of the forward input, so for K maps per sample it is an
// uninitialised allocation the kernels never touch, not K copies of x.
at::Tensor input_like(const at::Tensor& x, int64_t rows) {
  if (rows == x.size(0)) return x;
  auto sizes = x.sizes().vec();
  sizes[0] = rows;
  return at::empty(sizes, x.options().memory_format(layout_of(x)));
}

void check_layer(const char* op, const at::Tensor& r, const at::Tensor& x, const at::Tensor& z) {
  check_like(op, "x", x, r);
  check_like(op, "z", z, r);
  TORCH_CHECK(x.dim() >= 1 && z.dim() == x.dim() && x.size(0) == z.size(0), "lrpfast::", op,
              ": x ", x.sizes(), " and z ", z.sizes(), " must share the batch dimension");
  k_targets(op, r, z);
}

at::Tensor linear_relprop(const at::Tensor& r, const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
                          double eps, c10::string_view stabilizer) {
  check_layer("linear_relprop", r, x, z);
  check_like("linear_relprop", "weight", weight, r);
  TORCH_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1) && z.size(-1) == weight.size(0),
              "lrpfast::linear_relprop: weight ", weight.sizes(), " does not fit x ", x.sizes(), " and z ", z.sizes());
  const auto s = call_stab_div(r, z, eps, stabilizer);
  return call_mul_input(at::matmul(s, weight), x);
}

at::Tensor conv_relprop(const at::Tensor& r, const at::Tensor& x, const at::Tensor& z, const at::Tensor& weight,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        double eps, c10::string_view stabilizer) {
  check_layer("conv_relprop", r, x, z);
  check_like("conv_relprop", "weight", weight, r);
  const int64_t dims = weight.dim() - 2;
  TORCH_CHECK(dims >= 1 && dims <= 3 && x.dim() == dims + 2, "lrpfast::conv_relprop: weight ", weight.sizes(),
              " and x ", x.sizes(), " are not a 1d/2d/3d convolution");
  TORCH_CHECK(static_cast<int64_t>(stride.size()) == dims && static_cast<int64_t>(padding.size()) == dims &&
                  static_cast<int64_t>(dilation.size()) == dims,
              "lrpfast::conv_relprop: stride, padding and dilation need ", dims, " entries each");
  const auto s = call_stab_div(r, z, eps, stabilizer);
  std::vector<int64_t> no_output_padding(dims, 0);
  // The input gradient of the forward convolution: output_padding is implied by the input size.
  auto grads = at::convolution_backward(s, input_like(x, s.size(0)), weight, at::OptionalIntArrayRef(), stride,
                                        padding, dilation, /*transposed=*/false, no_output_padding, groups,
                                        {true, false, false});
  return call_mul_input(std::get<0>(grads), x);
}

// 1d pools run as 2d pools of height 1.
at::Tensor as_2d(const at::Tensor& t) { return t.unsqueeze(-2); }

at::Tensor avg_pool_relprop(const at::Tensor& r, const at::Tensor& x, const at::Tensor& z,
                            at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                            bool ceil_mode, bool count_include_pad, std::optional<int64_t> divisor_override,
                            double eps, c10::string_view stabilizer) {
  check_layer("avg_pool_relprop", r, x, z);
  const int64_t dims = x.dim() - 2;
  TORCH_CHECK(dims >= 1 && dims <= 3, "lrpfast::avg_pool_relprop: x must be (B, C, *spatial) with 1-3 spatial dims");
  const auto s = call_stab_div(r, z, eps, stabilizer);
  const auto like = input_like(x, s.size(0));
  at::Tensor c;
  if (dims == 3) {
    c = at::avg_pool3d_backward(s, like, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override);
  } else if (dims == 2) {
    // CUDA's channels_last avg_pool2d backward returns wrong values when there is padding (torch
    // 2.11, also through autograd): hand it a contiguous-format `like`, which selects the NCHW
    // kernel (only sizes are read, so an empty tensor will do).
    const bool nhwc_cuda = like.is_cuda() && like.is_contiguous(at::MemoryFormat::ChannelsLast);
    const auto like2d = nhwc_cuda ? at::empty(like.sizes(), like.options(), at::MemoryFormat::Contiguous) : like;
    c = at::avg_pool2d_backward(s, like2d, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override);
  } else {
    c = at::avg_pool2d_backward(as_2d(s), as_2d(like), {1, kernel_size[0]}, {1, stride[0]}, {0, padding[0]},
                                ceil_mode, count_include_pad, divisor_override)
            .squeeze(-2);
  }
  return call_mul_input(c, x);
}

at::Tensor adaptive_avg_pool_relprop(const at::Tensor& r, const at::Tensor& x, const at::Tensor& z, double eps,
                                     c10::string_view stabilizer) {
  check_layer("adaptive_avg_pool_relprop", r, x, z);
  const int64_t dims = x.dim() - 2;
  TORCH_CHECK(dims >= 1 && dims <= 3, "lrpfast::adaptive_avg_pool_relprop: x must be (B, C, *spatial)");
  const auto s = call_stab_div(r, z, eps, stabilizer);
  const auto like = input_like(x, s.size(0));
  at::Tensor c;
  if (dims == 3) {
    c = at::_adaptive_avg_pool3d_backward(s, like);
  } else if (dims == 2) {
    c = at::_adaptive_avg_pool2d_backward(s, like);
  } else {
    c = at::_adaptive_avg_pool2d_backward(as_2d(s), as_2d(like)).squeeze(-2);
  }
  return call_mul_input(c, x);
}

template <typename Lib>
void register_layers(Lib& m) {
  m.impl("linear_relprop", &linear_relprop);
  m.impl("conv_relprop", &conv_relprop);
  m.impl("avg_pool_relprop", &avg_pool_relprop);
  m.impl("adaptive_avg_pool_relprop", &adaptive_avg_pool_relprop);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpfast, CPU, m) { register_layers(m); }

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(lrpfast, CUDA, m) { register_layers(m); }
#endif

}  // namespace lrpfast
