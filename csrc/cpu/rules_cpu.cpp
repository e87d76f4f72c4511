// CPU kernels of the rule ops: the elementwise steps around the one (paired) contraction of the
// z+, αβ, γ and z^B rules. Each is one pass over memory, parallel over (row, block) pairs, with a
// plain inner loop over the block (vectorisable); the arithmetic is common/relevance_math.h's.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <type_traits>

#include "../rule_args.h"
#include "vectorize.h"

namespace lrpfast {
namespace {

// Calls body(row, blk) for every block of every row of `a`, in parallel.
template <typename Body>
void for_each_block(const PairedArgs& a, Body body) {
  const int64_t nb = a.block ? a.n / a.block : 0;
  const int64_t total = a.rows * nb;
  if (total == 0) return;
  const int64_t grain = std::max<int64_t>(1, 32768 / a.block);
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) body(t / nb, t % nb);
  });
}

#define LRPFAST_DISPATCH(T, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T, NAME, __VA_ARGS__)

template <typename scalar_t>
LRPFAST_CPU_CLONES void split_span(scalar_t* __restrict__ pos, scalar_t* __restrict__ neg,
                                   const scalar_t* __restrict__ src, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(src[j]);
    pos[j] = to_storage<scalar_t>(positive_part(v));
    neg[j] = to_storage<scalar_t>(negative_part(v));
  }
}

at::Tensor sign_split_cpu(const at::Tensor& x, int64_t dim, int64_t groups) {
  auto a = prepare_sign_split(x, dim, groups);
  LRPFAST_DISPATCH(x.scalar_type(), "sign_split", [&] {
    const scalar_t* px = a.a.const_data_ptr<scalar_t>();
    scalar_t* po = a.out.data_ptr<scalar_t>();
    for_each_block(a, [&](int64_t row, int64_t blk) {
      scalar_t* pos = po + row * 2 * a.n + blk * 2 * a.block;
      run_spans<scalar_t>(std::array{pos, pos + a.block}, std::array{px + row * a.n + blk * a.block}, a.block,
                          [](const auto& o, const auto& in, int64_t m) {
                            split_span<span_t<decltype(o)>>(o[0], o[1], in[0], m);
                          });
    });
  });
  return a.out;
}

// The product of the z+ rule (kBounds false: x+ c_pos + x- c_neg) or of z^B
// ((x - low) c_pos + (x - high) c_neg), over one block.
template <bool kBounds, typename scalar_t>
LRPFAST_CPU_CLONES void mul_span(scalar_t* __restrict__ out, const scalar_t* __restrict__ cp,
                                 const scalar_t* __restrict__ cn, const scalar_t* __restrict__ xs,
                                 const scalar_t* __restrict__ lo, const scalar_t* __restrict__ hi, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t c_pos = static_cast<acc_t>(cp[j]), c_neg = static_cast<acc_t>(cn[j]), x = static_cast<acc_t>(xs[j]);
    if constexpr (kBounds) {
      out[j] = to_storage<scalar_t>(
          bounds_mul_input(c_pos, c_neg, x, static_cast<acc_t>(lo[j]), static_cast<acc_t>(hi[j])));
    } else {
      out[j] = to_storage<scalar_t>(sign_split_mul_input(c_pos, c_neg, x));
    }
  }
}

template <bool kBounds>
at::Tensor paired_mul(const char* op, const at::Tensor& c, const at::Tensor& x, const at::Tensor& low,
                      const at::Tensor& high, int64_t dim, int64_t groups) {
  auto a = prepare_paired_mul(op, c, x, low, high, dim, groups);
  LRPFAST_DISPATCH(c.scalar_type(), "lrpfast_paired_mul_cpu", [&] {
    const scalar_t* pc = a.a.const_data_ptr<scalar_t>();
    const scalar_t* px = a.s1.const_data_ptr<scalar_t>();
    const scalar_t* plo = kBounds ? a.low.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* phi = kBounds ? a.high.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* po = a.out.data_ptr<scalar_t>();
    for_each_block(a, [&](int64_t row, int64_t blk) {
      const int64_t srow = shared_row(row, a.k);
      const scalar_t* cp = pc + row * 2 * a.n + blk * 2 * a.block;
      const scalar_t* lo = nullptr;
      const scalar_t* hi = nullptr;
      if constexpr (kBounds) {
        const int64_t bound = (a.bound_rows == 1 ? 0 : srow) * a.n + blk * a.block;
        lo = plo + bound;
        hi = phi + bound;
      }
      run_spans<scalar_t>(std::array{po + row * a.n + blk * a.block},
                          std::array{cp, cp + a.block, px + srow * a.n + blk * a.block, lo, hi}, a.block,
                          [](const auto& o, const auto& in, int64_t m) {
                            mul_span<kBounds, span_t<decltype(o)>>(o[0], in[0], in[1], in[2], in[3], in[4], m);
                          });
    });
  });
  return a.out;
}

at::Tensor sign_split_mul_input_cpu(const at::Tensor& c, const at::Tensor& x, int64_t dim, int64_t groups) {
  return paired_mul<false>("sign_split_mul_input", c, x, at::Tensor(), at::Tensor(), dim, groups);
}

at::Tensor bounds_mul_input_cpu(const at::Tensor& c, const at::Tensor& x, const at::Tensor& low,
                                const at::Tensor& high, int64_t dim, int64_t groups) {
  return paired_mul<true>("bounds_mul_input", c, x, low, high, dim, groups);
}

enum class DivRule { kAlphaBeta, kGamma };

// One block of the αβ/γ division: the two branches of each unit, in a loop the compiler
// vectorises (rule and stabiliser mode fixed at compile time, restrict pointers, branch-free
// conversion to the storage type: csrc/cpu/vectorize.h).
template <DivRule rule, int32_t mode, typename scalar_t>
LRPFAST_CPU_CLONES void div_span(scalar_t* __restrict__ sp, scalar_t* __restrict__ sn, const scalar_t* __restrict__ rs,
                                 const scalar_t* __restrict__ zs, const scalar_t* __restrict__ z2s, int64_t n,
                                 at::opmath_type<scalar_t> q0, at::opmath_type<scalar_t> q1,
                                 at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t r = static_cast<acc_t>(rs[j]), z = static_cast<acc_t>(zs[j]), z2 = static_cast<acc_t>(z2s[j]);
    acc_t vp, vn;
    if constexpr (rule == DivRule::kAlphaBeta) {
      alpha_beta_stab_div(r, z, z2, q0, q1, eps, mode, vp, vn);
    } else {
      gamma_stab_div(r, z, z2, q0, eps, mode, vp, vn);
    }
    sp[j] = to_storage<scalar_t>(vp);
    sn[j] = to_storage<scalar_t>(vn);
  }
}

template <DivRule rule>
at::Tensor paired_div(const char* op, const at::Tensor& r, const at::Tensor& z, const at::Tensor& z2, int64_t dim,
                      int64_t groups, double p0, double p1, double eps, c10::string_view stabilizer) {
  auto a = prepare_paired_div(op, r, z, z2, dim, groups, p0, p1, eps, stabilizer);
  LRPFAST_DISPATCH(r.scalar_type(), "lrpfast_paired_div_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pr = a.a.const_data_ptr<scalar_t>();
    const scalar_t* pz = a.s1.const_data_ptr<scalar_t>();
    const scalar_t* pz2 = a.s2.const_data_ptr<scalar_t>();
    scalar_t* po = a.out.data_ptr<scalar_t>();
    const acc_t q0 = static_cast<acc_t>(a.p0), q1 = static_cast<acc_t>(a.p1), e = static_cast<acc_t>(a.eps);
    const int64_t n = a.n, block = a.block, k = a.k;
    with_stabilizer(a.stabilizer, [&](auto mode_constant) {
      constexpr int32_t mode = decltype(mode_constant)::value;
      for_each_block(a, [&](int64_t row, int64_t blk) {
        const int64_t off = shared_row(row, k) * n + blk * block;
        scalar_t* sp = po + row * 2 * n + blk * 2 * block;
        run_spans<scalar_t>(std::array{sp, sp + block}, std::array{pr + row * n + blk * block, pz + off, pz2 + off},
                            block, [&](const auto& o, const auto& in, int64_t m) {
                              using T = span_t<decltype(o)>;
                              div_span<rule, mode, T>(o[0], o[1], in[0], in[1], in[2], m, q0, q1, e);
                            });
      });
    });
  });
  return a.out;
}

at::Tensor alpha_beta_stab_div_cpu(const at::Tensor& r, const at::Tensor& z, const at::Tensor& z_plus, int64_t dim,
                                   int64_t groups, double alpha, double beta, double eps,
                                   c10::string_view stabilizer) {
  return paired_div<DivRule::kAlphaBeta>("alpha_beta_stab_div", r, z, z_plus, dim, groups, alpha, beta, eps,
                                         stabilizer);
}

at::Tensor gamma_stab_div_cpu(const at::Tensor& r, const at::Tensor& z, const at::Tensor& zp, int64_t dim,
                              int64_t groups, double gamma, double eps, c10::string_view stabilizer) {
  return paired_div<DivRule::kGamma>("gamma_stab_div", r, z, zp, dim, groups, gamma, 0.0, eps, stabilizer);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrpfast, CPU, m) {
  m.impl("sign_split", &sign_split_cpu);
  m.impl("sign_split_mul_input", &sign_split_mul_input_cpu);
  m.impl("bounds_mul_input", &bounds_mul_input_cpu);
  m.impl("alpha_beta_stab_div", &alpha_beta_stab_div_cpu);
  m.impl("gamma_stab_div", &gamma_stab_div_cpu);
}

}  // namespace lrpfast
