/* TQ1_0 TQ2_0: AVX2 dot kernels (hk2_dot_<type>_avx2, listed in quants_tq.c's table). */
#include "hk2_target_avx2.h"

/* quants_tq.c's layouts */
typedef struct { uint8_t qs[48]; uint8_t qh[4]; hk2_half d; } block_tq1_0;
typedef struct { uint8_t qs[64]; hk2_half d; } block_tq2_0;


/* TQ1_0 trits of 32 bytes v, byte i multiplied by the 16-bit lane's c (uint8 arithmetic): ((v * c mod 256) * 3) >> 8.
 * The even bytes go through the lane's high byte so the product wraps at 8 bits; the odd bytes are masked there. */
INLINE __m256i tq1_trits(__m256i v, __m256i c) {
    const __m256i hi8 = _mm256_set1_epi16((short)0xFF00);
    const __m256i lo = _mm256_mulhi_epu16(_mm256_mullo_epi16(_mm256_slli_epi16(v, 8), c), _mm256_set1_epi16(3));
    const __m256i hi = _mm256_mulhi_epu16(_mm256_mullo_epi16(_mm256_and_si256(v, hi8), c), _mm256_set1_epi16(768));
    return _mm256_or_si256(lo, _mm256_and_si256(hi, hi8));
}

/* sum over the block of t * y (t in 0..3, 8 maddubs of 32 summed in int16: <= 8 * 762), minus the block's
 * bsums (sum y, so that t - 1 is the weight), as 8 int32 */
INLINE __m256i tq_block_dot(const __m256i t[8], const int8_t *y, const int16_t *bs) {
    __m256i s16 = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_loadu_si256((const __m256i *)bs));
    for (int k = 0; k < 8; k++)
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(t[k], _mm256_loadu_si256((const __m256i *)(y + 32 * k))));
    return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
}

INLINE void dot_tq1_0_t(int n, const block_tq1_0 *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    /* multipliers of the qs[32..47] and qh vectors: [1 | 3], [9 | 27], [81 | qh's 1 1 3 3 9 9 27 27] */
    const __m256i c13 = _mm256_setr_m128i(_mm_set1_epi16(1), _mm_set1_epi16(3));
    const __m256i c927 = _mm256_setr_m128i(_mm_set1_epi16(9), _mm_set1_epi16(27));
    const __m256i c81h = _mm256_setr_m128i(_mm_set1_epi16(81), _mm_setr_epi16(1, 1, 3, 3, 9, 9, 27, 27));
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        PREFETCH(x + b);
        const __m256i q0 = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const __m128i q1 = _mm_loadu_si128((const __m128i *)(x[b].qs + 32));
        uint32_t qh;
        memcpy(&qh, x[b].qh, 4);
        const __m256i q11 = _mm256_setr_m128i(q1, q1);
        __m256i t[8];
        t[0] = tq1_trits(q0, _mm256_set1_epi16(1));
        t[1] = tq1_trits(q0, _mm256_set1_epi16(3));
        t[2] = tq1_trits(q0, _mm256_set1_epi16(9));
        t[3] = tq1_trits(q0, _mm256_set1_epi16(27));
        t[4] = tq1_trits(q0, _mm256_set1_epi16(81));
        t[5] = tq1_trits(q11, c13);
        t[6] = tq1_trits(q11, c927);
        t[7] = tq1_trits(_mm256_setr_m128i(q1, _mm_set1_epi32((int)qh)), c81h);
        const float dw = _cvtsh_ss(x[b].d);
        for (int j = 0; j < NA; j++) {
            const __m256i p = tq_block_dot(t, a[j].qs + HK2_QK_K * b, a[j].bs + 16 * b);
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[j].d[b]), _mm256_cvtepi32_ps(p), acc[j]);
        }
    }
    for (int j = 0; j < NA; j++) s[j] = hsum_ps(acc[j]);
}

INLINE void dot_tq2_0_t(int n, const block_tq2_0 *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    const __m256i m3 = _mm256_set1_epi8(3);
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        PREFETCH(x + b);
        __m256i t[8];
        for (int h = 0; h < 2; h++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(x[b].qs + 32 * h));
            t[4 * h + 0] = _mm256_and_si256(q, m3);
            t[4 * h + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 2), m3);
            t[4 * h + 2] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m3);
            t[4 * h + 3] = _mm256_and_si256(_mm256_srli_epi16(q, 6), m3);
        }
        const float dw = _cvtsh_ss(x[b].d);
        for (int j = 0; j < NA; j++) {
            const __m256i p = tq_block_dot(t, a[j].qs + HK2_QK_K * b, a[j].bs + 16 * b);
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[j].d[b]), _mm256_cvtepi32_ps(p), acc[j]);
        }
    }
    for (int j = 0; j < NA; j++) s[j] = hsum_ps(acc[j]);
}

HK2_DOT_ENTRY(tq1_0, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(tq2_0, HK2_NA_SWITCH4)

#include "hk2_target_end.h"
