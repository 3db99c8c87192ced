/* TQ1_0 TQ2_0: AVX-512 (F/BW/VL + VNNI) dot kernels (hk2_dot_<type>_avx512vnni, listed in quants_tq.c's
 * table for the avx512vnni level). With HK2_USE_SIMDE the same code builds against SIMDe's portable
 * AVX-512 so it is tested on CPUs without AVX-512. */
#include "hk2_target_avx512.h"

#ifdef HK2_USE_SIMDE
#define f16(h) hk2_fp16_to_fp32(h)
/* SIMDe lacks the 512-bit vpmulhuw: two 256-bit halves */
static inline __m512i hk2tq_mulhi_epu16(__m512i a, __m512i b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_mulhi_epu16(_mm512_castsi512_si256(a), _mm512_castsi512_si256(b))),
                              _mm256_mulhi_epu16(_mm512_extracti64x4_epi64(a, 1), _mm512_extracti64x4_epi64(b, 1)), 1);
}
#undef _mm512_mulhi_epu16
#define _mm512_mulhi_epu16 hk2tq_mulhi_epu16
#else
#define f16(h) _cvtsh_ss(h)
#endif

/* quants_tq.c's layouts */
typedef struct { uint8_t qs[48]; uint8_t qh[4]; hk2_half d; } block_tq1_0;
typedef struct { uint8_t qs[64]; hk2_half d; } block_tq2_0;

/* TQ1_0 trits of 64 bytes v, byte i multiplied by its 16-bit lane's c (uint8 arithmetic): ((v * c mod 256) * 3) >> 8.
 * The even bytes go through the lane's high byte so the product wraps at 8 bits; the odd bytes are masked there. */
INLINE __m512i tq1_trits(__m512i v, __m512i c) {
    const __m512i hi8 = _mm512_set1_epi16((short)0xFF00);
    const __m512i lo = _mm512_mulhi_epu16(_mm512_mullo_epi16(_mm512_slli_epi16(v, 8), c), _mm512_set1_epi16(3));
    const __m512i hi = _mm512_mulhi_epu16(_mm512_mullo_epi16(_mm512_and_si512(v, hi8), c), _mm512_set1_epi16(768));
    return _mm512_or_si512(lo, _mm512_and_si512(hi, hi8));
}
/* four 128-bit lanes of 16-bit multipliers */
INLINE __m512i lanes16(__m128i l0, __m128i l1, __m128i l2, __m128i l3) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_setr_m128i(l0, l1)), _mm256_setr_m128i(l2, l3), 1);
}

/* sum over the block of t * y (t = q + 1 in 0..3) minus the block's bsums (sum y), as 16 int32 */
INLINE __m512i tq_block_dot(const __m512i t[4], const int8_t *y, const int16_t *bs) {
    __m512i p = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)bs)));
    for (int k = 0; k < 4; k++) p = _mm512_dpbusd_epi32(p, t[k], _mm512_loadu_si512((const void *)(y + 64 * k)));
    return p;
}

INLINE void dot_tq1_0_t(int n, const block_tq1_0 *x, const hk2_arow *a, const int NA, float *s) {
    __m512 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm512_setzero_ps();
    const __m128i p1 = _mm_set1_epi16(1), p3 = _mm_set1_epi16(3), p9 = _mm_set1_epi16(9), p27 = _mm_set1_epi16(27),
                  p81 = _mm_set1_epi16(81);
    /* values 64k .. 64k + 63 come from these lanes (qs[0..31] twice; qs[32..47]; qh repeated) times these powers */
    const __m512i c0 = lanes16(p1, p1, p3, p3), c1 = lanes16(p9, p9, p27, p27), c2 = lanes16(p81, p81, p1, p3),
                  c3 = lanes16(p9, p27, p81, _mm_setr_epi16(1, 1, 3, 3, 9, 9, 27, 27));
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        PREFETCH(x + b);
        const __m256i q0 = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const __m128i q1 = _mm_loadu_si128((const __m128i *)(x[b].qs + 32));
        uint32_t qh;
        memcpy(&qh, x[b].qh, 4);
        const __m512i v01 = _mm512_broadcast_i64x4(q0);                                           /* q0 q0 */
        const __m512i v2 = _mm512_inserti64x4(_mm512_castsi256_si512(q0), _mm256_setr_m128i(q1, q1), 1);  /* q0 q1 q1 */
        const __m512i v3 = _mm512_inserti32x4(_mm512_broadcast_i32x4(q1), _mm_set1_epi32((int)qh), 3);  /* q1 q1 q1 qh x4 */
        __m512i t[4];
        t[0] = tq1_trits(v01, c0);
        t[1] = tq1_trits(v01, c1);
        t[2] = tq1_trits(v2, c2);
        t[3] = tq1_trits(v3, c3);
        const float dw = f16(x[b].d);
        for (int j = 0; j < NA; j++) {
            const __m512i p = tq_block_dot(t, a[j].qs + HK2_QK_K * b, a[j].bs + 16 * b);
            acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(dw * a[j].d[b]), _mm512_cvtepi32_ps(p), acc[j]);
        }
    }
    for (int j = 0; j < NA; j++) s[j] = _mm512_reduce_add_ps(acc[j]);
}

INLINE void dot_tq2_0_t(int n, const block_tq2_0 *x, const hk2_arow *a, const int NA, float *s) {
    __m512 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm512_setzero_ps();
    const __m512i m3 = _mm512_set1_epi8(3);
    /* values 64k .. 64k + 63: qs[32 (k / 2) ..] shifted by 4 (k % 2) in the low half, 4 (k % 2) + 2 in the high */
    const __m512i sh_lo = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
    const __m512i sh_hi = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1);
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        PREFETCH(x + b);
        __m512i t[4];
        for (int h = 0; h < 2; h++) {
            const __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(x[b].qs + 32 * h)));
            t[2 * h] = _mm512_and_si512(_mm512_srlv_epi16(q, sh_lo), m3);
            t[2 * h + 1] = _mm512_and_si512(_mm512_srlv_epi16(q, sh_hi), m3);
        }
        const float dw = f16(x[b].d);
        for (int j = 0; j < NA; j++) {
            const __m512i p = tq_block_dot(t, a[j].qs + HK2_QK_K * b, a[j].bs + 16 * b);
            acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(dw * a[j].d[b]), _mm512_cvtepi32_ps(p), acc[j]);
        }
    }
    for (int j = 0; j < NA; j++) s[j] = _mm512_reduce_add_ps(acc[j]);
}

HK2_DOT_ENTRY(tq1_0, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(tq2_0, HK2_NA_SWITCH4)

#include "hk2_target_end.h"
