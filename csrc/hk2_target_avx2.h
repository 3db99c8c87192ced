/* Included first by a type family's AVX2 kernel file: the rest of the file compiles for AVX2 + FMA + F16C.
 * The file ends with hk2_target_end.h. */
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#define HK2_TARGET_PUSHED
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#include <immintrin.h>
#include "hk2_internal.h"

/* helpers every AVX2 kernel file uses */
/* the sum of a vector's 8 floats */
INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* the fp16 at p (any alignment) as a float */
INLINE float half_at(const uint8_t *p) {
    hk2_half h;
    memcpy(&h, p, sizeof h);
    return _cvtsh_ss(h);
}
