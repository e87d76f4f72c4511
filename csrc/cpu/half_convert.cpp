// float16 <-> float for the CPU kernels (declared in vectorize.h): F16C's vcvtph2ps/vcvtps2ph where
// the CPU has them, else c10's software conversion. The library is built for baseline x86-64, so
// the F16C code sits in functions with their own target attribute, chosen once at run time.
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "vectorize.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LRPFAST_HAVE_F16C_PATH 1
#include <immintrin.h>
#endif

namespace lrpfast {
namespace {

void half_to_float_c10(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void float_to_half_c10(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

#ifdef LRPFAST_HAVE_F16C_PATH
// The tails (< 8 values) take c10's conversion: the same bits, and no masked loads past the end.
__attribute__((target("avx2,f16c"))) void half_to_float_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  half_to_float_c10(src + i, dst + i, n - i);
}

// vcvtps2ph rounds to nearest even and overflows to inf as c10 does, but keeps a NaN's payload
// (its top 10 bits) where c10 stores every NaN as 0x7E00 with its sign: NaNs are made that quiet
// NaN first, so that both paths give the same bits. (A signalling NaN read by vcvtph2ps comes out
// quieted where c10 keeps it signalling; every kernel's output goes through this store, so that
// difference never shows.)
__attribute__((target("avx2,f16c"))) void float_to_half_f16c(const float* src, c10::Half* dst, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 quiet_nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(src + i);
    const __m256 canonical = _mm256_or_ps(_mm256_and_ps(v, sign), quiet_nan);
    v = _mm256_blendv_ps(v, canonical, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  float_to_half_c10(src + i, dst + i, n - i);
}

bool use_f16c() {
  static const bool yes = [] {
    const char* env = std::getenv("LRPFAST_CPU_F16C");
    if (env && std::strcmp(env, "0") == 0) return false;
    __builtin_cpu_init();  // idempotent; cheap next to a kernel
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  }();
  return yes;
}
#endif

}  // namespace

void half_to_float(const c10::Half* src, float* dst, int64_t n) {
#ifdef LRPFAST_HAVE_F16C_PATH
  if (use_f16c()) return half_to_float_f16c(src, dst, n);
#endif
  half_to_float_c10(src, dst, n);
}

void float_to_half(const float* src, c10::Half* dst, int64_t n) {
#ifdef LRPFAST_HAVE_F16C_PATH
  if (use_f16c()) return float_to_half_f16c(src, dst, n);
#endif
  float_to_half_c10(src, dst, n);
}

}  // namespace lrpfast
