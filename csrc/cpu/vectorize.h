// What the CPU kernels' inner loops share so that GCC vectorises them: an AVX2 clone beside the
// baseline (SSE2) one, picked at load time by the CPU it runs on (GCC's target_clones), and the
// stabiliser mode as a compile-time constant (a run-time mode branch per element keeps loops
// scalar). Inner loops take restrict pointers and a length: no closure state to reload.
#pragma once

#include <c10/util/BFloat16.h>

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

}  // namespace lrpfast
