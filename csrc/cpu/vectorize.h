// What the CPU kernels' inner loops share so that GCC vectorises them: an AVX2 clone beside the
// baseline (SSE2) one, picked at load time by the CPU it runs on (GCC's target_clones), and the
// stabiliser mode as a compile-time constant (a run-time mode branch per element keeps loops
// scalar). Inner loops take restrict pointers and a length: no closure state to reload.
#pragma once

#include <cstdint>
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

}  // namespace lrpfast
