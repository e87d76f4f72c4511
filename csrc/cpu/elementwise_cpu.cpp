// CPU kernels of the fused primitives stab_div, mul_input, mul_stab_div.
// One pass over memory each, parallel over elements, the arithmetic from common/relevance_math.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../relprop_args.h"
#include "vectorize.h"

namespace lrpfast {
namespace {

// Calls body(i_begin, i_end, shared_offset) over contiguous runs of one row each, so that the
// innermost loop is a plain, vectorisable loop: element i of `a` pairs with i + shared_offset of
// the shared tensors (the K maps of a sample read the same x/z row).
template <typename Body>
void for_each_run(const ElementwiseArgs& args, Body body) {
  const int64_t total = args.rows * args.n;
  if (total == 0) return;
  const int64_t n = args.n, k = args.k;
  at::parallel_for(0, total, 32768, [&](int64_t begin, int64_t end) {
    int64_t row = begin / n;
    while (begin < end) {
      const int64_t stop = std::min(end, (row + 1) * n);
      body(begin, stop, (shared_row(row, k) - row) * n);
      begin = stop;
      ++row;
    }
  });
}

enum class Op { kStabDiv, kMulInput, kMulStabDiv };

// One contiguous run: a plain loop over restrict pointers (no closure state to reload), with the
// op and the stabiliser mode as compile-time constants, so that the compiler vectorises it.
template <Op op, int32_t mode, typename scalar_t>
LRPFAST_CPU_CLONES void run_span(scalar_t* __restrict__ out, const scalar_t* __restrict__ a,
                                 const scalar_t* __restrict__ b, const scalar_t* __restrict__ c, int64_t n,
                                 at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t va = static_cast<acc_t>(a[i]);
    const acc_t vb = static_cast<acc_t>(b[i]);
    acc_t v;
    if constexpr (op == Op::kStabDiv) {
      v = lrpfast::stab_div(va, vb, eps, mode);
    } else if constexpr (op == Op::kMulInput) {
      v = lrpfast::mul_input(va, vb);
    } else {
      v = lrpfast::mul_stab_div(va, vb, static_cast<acc_t>(c[i]), eps, mode);
    }
    out[i] = to_storage<scalar_t>(v);
  }
}

template <Op op>
at::Tensor run(const char* name, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
               const at::Tensor& ref, double eps, c10::string_view stabilizer) {
  auto args = prepare_elementwise(name, a, b, c, ref, eps, stabilizer);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "lrpfast_elementwise_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* out = args.out.data_ptr<scalar_t>();
    const scalar_t* pa = args.a.const_data_ptr<scalar_t>();
    const scalar_t* pb = args.b.const_data_ptr<scalar_t>();
    const scalar_t* pc = args.c.defined() ? args.c.const_data_ptr<scalar_t>() : nullptr;
    const acc_t e = static_cast<acc_t>(args.eps);
    with_stabilizer(args.stabilizer, [&](auto mode_constant) {
      constexpr int32_t mode = decltype(mode_constant)::value;
      for_each_run(args, [&](int64_t i0, int64_t i1, int64_t off) {
        run_spans<scalar_t>(std::array{out + i0}, std::array{pa + i0, pb + off + i0, pc ? pc + off + i0 : nullptr},
                            i1 - i0, [&](const auto& o, const auto& in, int64_t m) {
                              run_span<op, mode, span_t<decltype(o)>>(o[0], in[0], in[1], in[2], m, e);
                            });
      });
    });
  });
  return args.out;
}

at::Tensor stab_div_cpu(const at::Tensor& r, const at::Tensor& z, double eps, c10::string_view stabilizer) {
  return run<Op::kStabDiv>("stab_div", r, z, at::Tensor(), z, eps, stabilizer);
}

at::Tensor mul_input_cpu(const at::Tensor& c, const at::Tensor& x) {
  return run<Op::kMulInput>("mul_input", c, x, at::Tensor(), x, 0.0, "sign");
}

at::Tensor mul_stab_div_cpu(const at::Tensor& c, const at::Tensor& x, const at::Tensor& z, double eps,
                            c10::string_view stabilizer) {
  return run<Op::kMulStabDiv>("mul_stab_div", c, x, z, z, eps, stabilizer);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpfast, CPU, m) {
  m.impl("stab_div", &stab_div_cpu);
  m.impl("mul_input", &mul_input_cpu);
  m.impl("mul_stab_div", &mul_stab_div_cpu);
}

}  // namespace lrpfast
