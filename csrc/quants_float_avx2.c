/* F32, F16, BF16 weights times float32 activations: AVX2 + FMA + F16C. Eight weights per step, converted
 * once and reused for every activation row. */
#include "hk2_target_avx2.h"

INLINE float bf16f(uint16_t h) { const uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

/* kind: 0 F32, 1 F16, 2 BF16 */
INLINE __m256 load8(const void *w, int i, const int kind) {
    if (kind == 0) return _mm256_loadu_ps((const float *)w + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    if (kind == 1) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
INLINE float load1(const void *w, int i, const int kind) {
    if (kind == 0) return ((const float *)w)[i];
    if (kind == 1) return _cvtsh_ss(((const uint16_t *)w)[i]);
    return bf16f(((const uint16_t *)w)[i]);
}

INLINE void dot_t(int n, const void *w, const hk2_arow *a, const int NA, float *s, const int kind) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    const int bytes = kind == 0 ? 4 : 2;
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        if (i % 32 == 0) PREFETCH((const uint8_t *)w + (size_t)i * bytes);
        const __m256 x = load8(w, i, kind);
        for (int j = 0; j < NA; j++) acc[j] = _mm256_fmadd_ps(x, _mm256_loadu_ps(a[j].f + i), acc[j]);
    }
    for (int j = 0; j < NA; j++) {
        float t = hsum_ps(acc[j]);
        for (int k = i; k < n; k++) t += load1(w, k, kind) * a[j].f[k];
        s[j] = t;
    }
}

HK2_DOT_ENTRY_OF(wf32, HK2_NA_SWITCH4, dot_t, 0)
HK2_DOT_ENTRY_OF(f16, HK2_NA_SWITCH4, dot_t, 1)
HK2_DOT_ENTRY_OF(bf16, HK2_NA_SWITCH4, dot_t, 2)

#include "hk2_target_end.h"
