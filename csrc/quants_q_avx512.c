/* Q4_1 Q5_0 Q5_1: AVX-512 (F/BW/VL + VNNI) dot kernels (hk2_dot_<type>_avx512vnni, listed in quants_q.c's
 * table for the avx512vnni level). With HK2_USE_SIMDE the same code builds against SIMDe's portable
 * AVX-512 so it is tested on CPUs without AVX-512. */
#ifdef HK2_USE_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include "hk2_simde_shim.h"
#include "hk2_internal.h"
#else
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#endif
#include <immintrin.h>
#include "hk2_internal.h"
#endif

enum { T_Q4_1, T_Q5_0, T_Q5_1 };
/* bytes per block, offset of qs, of qh (Q5) */
#define BLK_BYTES(T) ((T) == T_Q4_1 ? 20 : (T) == T_Q5_0 ? 22 : 24)
#define QS_OFF(T) ((T) == T_Q4_1 ? 4 : (T) == T_Q5_0 ? 6 : 8)
#define QH_OFF(T) ((T) == T_Q5_0 ? 2 : 4)

INLINE float half_at(const uint8_t *p) {
    hk2_half h;
    memcpy(&h, p, sizeof h);
    return hk2_fp16_to_fp32(h);
}
INLINE uint32_t u32_at(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
/* two blocks' 16 packed bytes -> [lo b0 | hi b0 | lo b1 | hi b1]: values 0..31 of each block in order */
INLINE __m512i nibbles2(const uint8_t *p0, const uint8_t *p1) {
    const __m256i raw = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p0)),
                                                _mm_loadu_si128((const __m128i *)p1), 1);
    const __m512i r = _mm512_shuffle_i64x2(_mm512_castsi256_si512(raw), _mm512_castsi256_si512(raw), 0x50); /* lanes 0,0,1,1 */
    return _mm512_and_si512(_mm512_srlv_epi64(r, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)), _mm512_set1_epi8(0x0F));
}
/* [a x8, b x8] */
INLINE __m512 two_scales(__m128 ab) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), _mm512_castps128_ps512(ab));
}
INLINE __m128 load2f(const float *p) { return _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)p)); }

/* Two blocks per 512-bit vector. Q4_1/Q5_1: q unsigned, one vpdpbusd per row; Q5_0: w = q - 16 is negative
 * exactly where the fifth bit is 0, so |w| = the fifth bit ? nibble : 16 - nibble and y takes w's sign
 * under that mask. The min term m * d_a * sum y of the two blocks goes into a 128-bit accumulator. */
INLINE void dot_q_t(int n, const uint8_t *x, const hk2_arow *a, const int NA, float *s, const int T) {
    const int B = BLK_BYTES(T);
    __m512 acc[HK2_MAX_NA];
    __m128 accm[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) { acc[j] = _mm512_setzero_ps(); accm[j] = _mm_setzero_ps(); }
    const int nb = n / 32;
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *b0 = x + (size_t)B * b, *b1 = b0 + B;
        PREFETCH(b0);
        PREFETCH(b1);
        __m512i q = nibbles2(b0 + QS_OFF(T), b1 + QS_OFF(T));
        __mmask64 hb = 0;
        if (T != T_Q4_1) {
            hb = (__mmask64)u32_at(b0 + QH_OFF(T)) | (__mmask64)u32_at(b1 + QH_OFF(T)) << 32;
            q = T == T_Q5_0 ? _mm512_mask_blend_epi8(hb, _mm512_sub_epi8(_mm512_set1_epi8(16), q), q)
                            : _mm512_mask_add_epi8(q, hb, q, _mm512_set1_epi8(16));
        }
        const __m128 dw = _mm_setr_ps(half_at(b0), half_at(b1), 0.0f, 0.0f);
        const __m128 mw = T == T_Q5_0 ? dw : _mm_setr_ps(half_at(b0 + 2), half_at(b1 + 2), 0.0f, 0.0f);
        for (int j = 0; j < NA; j++) {
            __m512i y = _mm512_loadu_si512((const void *)(a[j].qs + 32 * b));
            if (T == T_Q5_0) y = _mm512_mask_sub_epi8(y, ~hb, _mm512_setzero_si512(), y);
            const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, y);
            const __m128 da = load2f(a[j].d + b);
            acc[j] = _mm512_fmadd_ps(two_scales(_mm_mul_ps(dw, da)), _mm512_cvtepi32_ps(p), acc[j]);
            if (T != T_Q5_0) {
                const __m128i sy = _mm_madd_epi16(_mm_loadl_epi64((const __m128i *)(a[j].bs + 2 * b)), _mm_set1_epi16(1));
                accm[j] = _mm_fmadd_ps(_mm_mul_ps(mw, da), _mm_cvtepi32_ps(sy), accm[j]);
            }
        }
    }
    float tail[HK2_MAX_NA] = {0};
    if (b < nb) {  /* an odd last block: the integer sums in plain C */
        const uint8_t *b0 = x + (size_t)B * b, *qs = b0 + QS_OFF(T);
        const uint32_t qh = T == T_Q4_1 ? 0 : u32_at(b0 + QH_OFF(T));
        const float dw = half_at(b0), mw = T == T_Q5_0 ? 0.0f : half_at(b0 + 2);
        for (int j = 0; j < NA; j++) {
            const int8_t *y = a[j].qs + 32 * b;
            int sumi = 0;
            for (int l = 0; l < 32; l++) {
                const int q = (l < 16 ? qs[l] & 0xF : qs[l - 16] >> 4) | (int)((qh >> l) & 1) << 4;
                sumi += (T == T_Q5_0 ? q - 16 : q) * y[l];
            }
            tail[j] = a[j].d[b] * (dw * (float)sumi + mw * (float)(a[j].bs[2 * b] + a[j].bs[2 * b + 1]));
        }
    }
    for (int j = 0; j < NA; j++) {
        const __m128 m = _mm_add_ps(accm[j], _mm_movehdup_ps(accm[j]));
        s[j] = _mm512_reduce_add_ps(acc[j]) + _mm_cvtss_f32(m) + tail[j];
    }
}

#define DOT_ENTRY(name, T)                                                                     \
    void hk2_dot_##name##_avx512vnni(int n, const void *w, const hk2_arow *a, int na, float *s) { \
        switch (na) {                                                                          \
        case 1: dot_q_t(n, w, a, 1, s, T); break;                                              \
        case 2: dot_q_t(n, w, a, 2, s, T); break;                                              \
        case 3: dot_q_t(n, w, a, 3, s, T); break;                                              \
        default: dot_q_t(n, w, a, 4, s, T); break;                                             \
        }                                                                                      \
    }
DOT_ENTRY(q4_1, T_Q4_1)
DOT_ENTRY(q5_0, T_Q5_0)
DOT_ENTRY(q5_1, T_Q5_1)

#if !defined(HK2_USE_SIMDE) && defined(__clang__)
#pragma clang attribute pop
#endif
