// Argument handling of the rule ops (sign_split, sign_split_mul_input, bounds_mul_input,
// alpha_beta_stab_div, gamma_stab_div), shared by their CPU and CUDA implementations.
//
// "Paired" layout. The z+/αβ/γ/z^B rules contract two branches at once by concatenating
// channels: along the channel dimension `dim` (1 for convolutions, the last for Linear), each of
// the `groups` channel groups holds branch 0 then branch 1. In row-major order one row (sample)
// of an unpaired tensor is nb blocks of `block` elements, block = (C / groups) * (elements after
// dim); the paired tensor has the same nb blocks of 2 * block: branch 0's block, then branch 1's.
// That is exactly the channel order a grouped convolution with concatenated weights reads and
// writes (lrpfast/modified_weights.py builds those weights).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "relprop_args.h"

namespace lrpfast {

struct PairedArgs {
  at::Tensor out;
  at::Tensor a;           // the operand with K rows per sample (r or c), or x for sign_split
  at::Tensor s1, s2;      // shared operands with one row per sample (x, z, z+, zp)
  at::Tensor low, high;   // bounds_mul_input only: 1 row or one per sample
  int64_t rows = 0;       // rows of `a` and `out`
  int64_t n = 0;          // elements per row of the unpaired shape
  int64_t block = 1;      // elements per block (see above)
  int64_t k = 1;          // rows of `a` per row of the shared operands
  int64_t bound_rows = 1; // rows of low/high
  double p0 = 0.0, p1 = 0.0, eps = 0.0;
  int32_t stabilizer = kStabSign;
};

inline int64_t normalize_dim(const char* op, int64_t dim, int64_t ndim) {
  const int64_t d = dim < 0 ? dim + ndim : dim;
  TORCH_CHECK(d >= 1 && d < ndim, "lrpfast::", op, ": dim ", dim, " is not a channel dimension of a ", ndim,
              "-d tensor (expected 1 .. ndim-1, or negative)");
  return d;
}

// Block size of the unpaired shape `s` (see the header comment).
inline int64_t pair_block(const char* op, at::IntArrayRef s, int64_t dim, int64_t groups) {
  TORCH_CHECK(groups >= 1 && s[dim] % groups == 0, "lrpfast::", op, ": ", s[dim], " channels do not split into ",
              groups, " groups");
  int64_t block = s[dim] / groups;
  for (size_t d = dim + 1; d < s.size(); ++d) block *= s[d];
  return block;
}

inline std::vector<int64_t> paired_sizes(at::IntArrayRef s, int64_t dim, int64_t rows) {
  auto v = s.vec();
  v[0] = rows;
  v[dim] *= 2;
  return v;
}

inline int64_t row_elems(at::IntArrayRef s) {
  int64_t n = 1;
  for (size_t d = 1; d < s.size(); ++d) n *= s[d];
  return n;
}

// Rows of `t` per row of `shared` when t is (K*B, *per_row) for shared (B, ...).
inline int64_t rows_per_sample(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef per_row,
                               const at::Tensor& shared) {
  TORCH_CHECK(t.dim() == static_cast<int64_t>(per_row.size()) && t.sizes().slice(1) == per_row.slice(1),
              "lrpfast::", op, ": ", name, " has shape ", t.sizes(), ", expected (K*B, ", per_row.slice(1), ")");
  const int64_t b = shared.size(0);
  if (b == 0) return 1;
  TORCH_CHECK(t.size(0) % b == 0, "lrpfast::", op, ": ", name, " has ", t.size(0),
              " rows, not a multiple of the batch ", b);
  return t.size(0) / b;
}

// sign_split(x): paired [x+, x-].
inline PairedArgs prepare_sign_split(const at::Tensor& x, int64_t dim, int64_t groups) {
  const char* op = "sign_split";
  dtype_code(op, x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, "lrpfast::", op, ": x must be (B, ...) with a channel dimension, got ", x.sizes());
  dim = normalize_dim(op, dim, x.dim());
  PairedArgs a;
  a.block = pair_block(op, x.sizes(), dim, groups);
  a.a = x.contiguous();
  a.rows = x.size(0);
  a.n = row_elems(x.sizes());
  a.out = at::empty(paired_sizes(x.sizes(), dim, a.rows), x.options());
  return a;
}

// sign_split_mul_input(c, x) and bounds_mul_input(c, x, low, high): c paired with K*B rows,
// x unpaired with B rows; out unpaired with K*B rows.
inline PairedArgs prepare_paired_mul(const char* op, const at::Tensor& c, const at::Tensor& x, const at::Tensor& low,
                                     const at::Tensor& high, int64_t dim, int64_t groups) {
  dtype_code(op, c.scalar_type());
  check_like(op, "x", x, c);
  TORCH_CHECK(x.dim() >= 2, "lrpfast::", op, ": x must be (B, ...) with a channel dimension, got ", x.sizes());
  dim = normalize_dim(op, dim, x.dim());
  PairedArgs a;
  a.block = pair_block(op, x.sizes(), dim, groups);
  const auto want = paired_sizes(x.sizes(), dim, x.size(0));
  a.k = rows_per_sample(op, "c (paired)", c, want, x);
  a.a = c.contiguous();
  a.s1 = x.contiguous();
  if (low.defined()) {
    for (const auto* t : {&low, &high}) {
      check_like(op, t == &low ? "low" : "high", *t, c);
      TORCH_CHECK(t->dim() == x.dim() && t->sizes().slice(1) == x.sizes().slice(1) &&
                      (t->size(0) == 1 || t->size(0) == x.size(0)),
                  "lrpfast::", op, ": ", (t == &low ? "low" : "high"), " has shape ", t->sizes(),
                  ", expected (1 or B, ", x.sizes().slice(1), ") like x");
    }
    TORCH_CHECK(low.size(0) == high.size(0), "lrpfast::", op, ": low and high have different row counts");
    a.low = low.contiguous();
    a.high = high.contiguous();
    a.bound_rows = low.size(0);
  }
  a.rows = c.size(0);
  a.n = row_elems(x.sizes());
  auto out_sizes = x.sizes().vec();
  out_sizes[0] = a.rows;
  a.out = at::empty(out_sizes, c.options());
  return a;
}

// alpha_beta_stab_div(r, z, z_plus) and gamma_stab_div(r, z, zp): r unpaired with K*B rows,
// z and the second shared operand unpaired with B rows; out paired with K*B rows.
inline PairedArgs prepare_paired_div(const char* op, const at::Tensor& r, const at::Tensor& z, const at::Tensor& z2,
                                     int64_t dim, int64_t groups, double p0, double p1, double eps,
                                     c10::string_view stabilizer) {
  dtype_code(op, r.scalar_type());
  check_like(op, "z", z, r);
  check_like(op, "second denominator", z2, r);
  TORCH_CHECK(z.dim() >= 2 && z2.sizes() == z.sizes(), "lrpfast::", op, ": z ", z.sizes(), " and ", z2.sizes(),
              " must have one shape (B, ...) with a channel dimension");
  dim = normalize_dim(op, dim, z.dim());
  PairedArgs a;
  a.block = pair_block(op, z.sizes(), dim, groups);
  a.k = k_targets(op, r, z);
  a.a = r.contiguous();
  a.s1 = z.contiguous();
  a.s2 = z2.contiguous();
  a.rows = r.size(0);
  a.n = row_elems(z.sizes());
  a.out = at::empty(paired_sizes(z.sizes(), dim, a.rows), r.options());
  a.p0 = p0;
  a.p1 = p1;
  a.eps = eps;
  a.stabilizer = parse_stabilizer(op, stabilizer);
  return a;
}

}  // namespace lrpfast
