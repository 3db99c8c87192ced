/* F32, F16, BF16 weights times float32 activations: AVX-512 F, sixteen weights per step (listed for the
 * avx512vnni level; the avx512bw level uses the AVX2 code). Builds against SIMDe with HK2_USE_SIMDE. */
#include "hk2_target_avx512.h"

INLINE float bf16f(uint16_t h) { const uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

INLINE __m512 load16(const void *w, int i, const int kind) {
    if (kind == 0) return _mm512_loadu_ps((const float *)w + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
    if (kind == 1) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
INLINE float load1(const void *w, int i, const int kind) {
    if (kind == 0) return ((const float *)w)[i];
    if (kind == 1) return hk2_fp16_to_fp32(((const uint16_t *)w)[i]);
    return bf16f(((const uint16_t *)w)[i]);
}

INLINE void dot_t(int n, const void *w, const hk2_arow *a, const int NA, float *s, const int kind) {
    __m512 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm512_setzero_ps();
    const int bytes = kind == 0 ? 4 : 2;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        PREFETCH((const uint8_t *)w + (size_t)i * bytes);
        const __m512 x = load16(w, i, kind);
        for (int j = 0; j < NA; j++) acc[j] = _mm512_fmadd_ps(x, _mm512_loadu_ps(a[j].f + i), acc[j]);
    }
    for (int j = 0; j < NA; j++) {
        float t = _mm512_reduce_add_ps(acc[j]);
        for (int k = i; k < n; k++) t += load1(w, k, kind) * a[j].f[k];
        s[j] = t;
    }
}

HK2_DOT_ENTRY_OF(wf32, HK2_NA_SWITCH4, dot_t, 0)
HK2_DOT_ENTRY_OF(f16, HK2_NA_SWITCH4, dot_t, 1)
HK2_DOT_ENTRY_OF(bf16, HK2_NA_SWITCH4, dot_t, 2)

#include "hk2_target_end.h"
