// What the CPU kernels' inner loops share so that GCC vectorises them: an AVX2 clone beside the
// baseline (SSE2) one, picked at load time by the CPU it runs on (GCC's target_clones), and the
// stabiliser mode as a compile-time constant (a run-time mode branch per element keeps loops
// scalar). Inner loops take restrict pointers and a length: no closure state to reload.
// float16 runs through float copies converted by F16C where the CPU has it (run_spans below).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common/relevance_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LRPFAST_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LRPFAST_CPU_CLONES
#endif

namespace lrpfast {

// Calls f(std::integral_constant<int32_t, mode>{}) for the stabiliser code `mode`.
template <typename F>
void with_stabilizer(int32_t mode, F&& f) {
  if (mode == kStabPlus) {
    f(std::integral_constant<int32_t, kStabPlus>{});
  } else {
    f(std::integral_constant<int32_t, kStabSign>{});
  }
}

// A kernel's float result in its storage type. bfloat16 rounds to nearest even, NaN to the quiet
// NaN, bit for bit as c10::BFloat16(float), but without its branch: with the branch GCC left the
// γ loop scalar ("control flow in loop") and turned its sign selects into branches that
// mispredict on half the units (bfloat16 γ ran 12x slower than float32).
template <typename scalar_t, typename acc_t>
inline scalar_t to_storage(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const uint32_t rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1u)) >> 16;
    const bool nan = (bits & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000);
    return c10::BFloat16(static_cast<uint16_t>(nan ? UINT32_C(0x7FC0) : rounded), c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// float16 <-> float over n values, bit for bit as c10::Half's conversions (round to nearest even,
// every NaN stored as the quiet NaN 0x7E00 with its sign). With F16C (x86-64 CPUs since 2012)
// 8 values per instruction; otherwise, or with LRPFAST_CPU_F16C=0 in the environment at the first
// call (for tests of that path), c10's software conversion. csrc/cpu/half_convert.cpp.
void half_to_float(const c10::Half* src, float* dst, int64_t n);
void float_to_half(const float* src, c10::Half* dst, int64_t n);

// The element type a span is called with (decltype of its `out` argument).
template <typename OutArray>
using span_t = std::remove_pointer_t<typename std::decay_t<OutArray>::value_type>;

// Calls span(out, in, n) on runs of n values of the storage type: out and in are std::arrays of
// pointers, span a generic lambda over the element type. float16 goes through float copies of at
// most kHalfChunk values (they stay in L1): c10's conversion element by element is software bit
// manipulation that keeps loops scalar (float16 ops ran 5-70x slower than float32), while the
// span's float arithmetic is what the half types run anyway (they accumulate in float), so the
// results are the same bits. A null input stays null.
inline constexpr int64_t kHalfChunk = 512;

template <typename scalar_t, size_t kOut, size_t kIn, typename Span>
void run_spans(const std::array<scalar_t*, kOut>& out, const std::array<const scalar_t*, kIn>& in, int64_t n,
               Span&& span) {
  if constexpr (!std::is_same_v<scalar_t, c10::Half>) {
    span(out, in, n);
  } else {
    alignas(64) float fin[kIn][kHalfChunk];
    alignas(64) float fout[kOut][kHalfChunk];
    std::array<const float*, kIn> pin;
    std::array<float*, kOut> pout;
    for (size_t t = 0; t < kOut; ++t) pout[t] = fout[t];
    for (int64_t i = 0; i < n; i += kHalfChunk) {
      const int64_t m = std::min(kHalfChunk, n - i);
      for (size_t t = 0; t < kIn; ++t) {
        pin[t] = in[t] ? fin[t] : nullptr;
        if (in[t]) half_to_float(in[t] + i, fin[t], m);
      }
      span(pout, pin, m);
      for (size_t t = 0; t < kOut; ++t) float_to_half(fout[t], out[t] + i, m);
    }
  }
}

}  // namespace lrpfast
