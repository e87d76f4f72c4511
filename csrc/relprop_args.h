// Argument handling shared by the CPU and CUDA implementations (torch side only; the arithmetic
// lives in common/relevance_math.h).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <string>

#include "common/relevance_math.h"

namespace lrpfast {

inline int32_t parse_stabilizer(const char* op, c10::string_view s) {
  if (s == "sign") return kStabSign;
  if (s == "plus") return kStabPlus;
  TORCH_CHECK(false, "lrpfast::", op, ": stabilizer must be 'sign' or 'plus', got '", std::string(s), "'");
}

inline int32_t dtype_code(const char* op, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: TORCH_CHECK(false, "lrpfast::", op, ": unsupported dtype ", t, " (float32/64, float16, bfloat16)");
  }
}

// The layout an op's output takes: channels_last when the reference tensor is in it, else
// contiguous (lrpfast/_fallback.py::_memory_format makes the same choice).
inline at::MemoryFormat layout_of(const at::Tensor& t) {
  if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (t.dim() == 5 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "lrpfast::", op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "lrpfast::", op, ": ", name, " is on ", t.device(), ", expected ",
              ref.device());
}

// Rows of a relevance tensor per row of the shared tensor (K targets per sample).
inline int64_t k_targets(const char* op, const at::Tensor& r, const at::Tensor& shared) {
  TORCH_CHECK(r.dim() == shared.dim() && r.sizes().slice(1) == shared.sizes().slice(1), "lrpfast::", op,
              ": relevance of shape ", r.sizes(), " does not match ", shared.sizes(), " (expected (K*B, ...))");
  const int64_t b = shared.size(0);
  if (b == 0) return 1;
  TORCH_CHECK(r.size(0) % b == 0, "lrpfast::", op, ": relevance rows ", r.size(0), " not a multiple of batch ", b);
  return r.size(0) / b;
}

// A fused elementwise step over dense tensors of one layout:
//   out[i] = f(a[i], b[shared(i)], c[shared(i)])   with shared(i) mapping K rows onto one.
struct ElementwiseArgs {
  at::Tensor out, a, b, c;  // b and c may be undefined
  int64_t rows = 0;         // rows of a/out (K*B)
  int64_t n = 0;            // elements per row
  int64_t k = 1;            // rows of a per row of b/c
  int32_t stabilizer = kStabSign;
  double eps = 0.0;
};

// Brings a, b, c into the layout of `ref` (a no-op when they already are) and allocates out.
inline ElementwiseArgs prepare_elementwise(const char* op, const at::Tensor& a, const at::Tensor& b,
                                           const at::Tensor& c, const at::Tensor& ref, double eps,
                                           c10::string_view stabilizer) {
  ElementwiseArgs args;
  check_like(op, "shared tensor", b, a);
  if (c.defined()) {
    check_like(op, "z", c, a);
    TORCH_CHECK(c.sizes() == b.sizes(), "lrpfast::", op, ": x and z shapes differ: ", b.sizes(), " vs ", c.sizes());
  }
  dtype_code(op, a.scalar_type());
  args.k = k_targets(op, a, b);
  const auto fmt = layout_of(ref);
  args.a = a.contiguous(fmt);
  args.b = b.contiguous(fmt);
  if (c.defined()) args.c = c.contiguous(fmt);
  args.out = at::empty(a.sizes(), a.options().memory_format(fmt));
  args.rows = a.dim() ? a.size(0) : 1;
  args.n = args.rows ? a.numel() / args.rows : 0;
  args.eps = eps;
  args.stabilizer = parse_stabilizer(op, stabilizer);
  return args;
}

}  // namespace lrpfast
