/* Q4_1 Q5_0 Q5_1: AVX2 dot kernels (hk2_dot_<type>_avx2, listed in quants_q.c's table).
 * One 32-value block per 256-bit vector: [low nibbles (values 0..15) | high nibbles (16..31)], the fifth bit
 * of Q5 spread from qh onto bytes. Integer sums per block (maddubs + madd), one FMA per block and row;
 * the Q4_1/Q5_1 min term m * d_a * sum y comes from the activation's 16-value sums, two blocks per step. */
#include "hk2_target_avx2.h"

enum { T_Q4_1, T_Q5_0, T_Q5_1 };
/* bytes per block, offset of qs, of qh (Q5) */
#define BLK_BYTES(T) ((T) == T_Q4_1 ? 20 : (T) == T_Q5_0 ? 22 : 24)
#define QS_OFF(T) ((T) == T_Q4_1 ? 4 : (T) == T_Q5_0 ? 6 : 8)
#define QH_OFF(T) ((T) == T_Q5_0 ? 2 : 4)

/* the fp16 at p and at p + stride as floats in lanes 0 and 1 */
INLINE __m128 two_halves(const uint8_t *p, int stride) {
    uint16_t h0, h1;
    memcpy(&h0, p, 2);
    memcpy(&h1, p + stride, 2);
    return _mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)h0 | (uint32_t)h1 << 16)));
}
/* byte l = 0x10 where bit l of qh is set, else 0 */
INLINE __m256i fifth_bits(const uint8_t *qh_p) {
    uint32_t qh;
    memcpy(&qh, qh_p, 4);
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh),
                                               _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}
/* a block's quants as unsigned bytes (Q5_0: still offset by 16) */
INLINE __m256i block_quants(const uint8_t *blk, const int T) {
    const __m256i q = nibbles(blk + QS_OFF(T));
    return T == T_Q4_1 ? q : _mm256_or_si256(q, fifth_bits(blk + QH_OFF(T)));
}
/* sum over the block of w * y as 8 int32; Q5_0's q - 16 goes signed through the sign trick */
INLINE __m256i block_dot(__m256i q, __m256i y, const int T) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (T == T_Q5_0) {
        const __m256i w = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
        return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(y, w)), ones);
    }
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), ones);
}

INLINE void dot_q_t(int n, const uint8_t *x, const hk2_arow *a, const int NA, float *s, const int T) {
    const int B = BLK_BYTES(T);
    __m256 acc[HK2_MAX_NA];
    __m128 accm[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) { acc[j] = _mm256_setzero_ps(); accm[j] = _mm_setzero_ps(); }
    const int nb = n / 32;
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *b0 = x + (size_t)B * b, *b1 = b0 + B;
        PREFETCH(b0);
        PREFETCH(b1);
        const __m256i q0 = block_quants(b0, T), q1 = block_quants(b1, T);
        const __m128 dw = two_halves(b0, B);
        const __m128 mw = T == T_Q5_0 ? dw : two_halves(b0 + 2, B);
        for (int j = 0; j < NA; j++) {
            const int8_t *y = a[j].qs + 32 * b;
            const __m128 sd = _mm_mul_ps(dw, _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(a[j].d + b))));
            const __m256i p0 = block_dot(q0, _mm256_loadu_si256((const __m256i *)y), T);
            const __m256i p1 = block_dot(q1, _mm256_loadu_si256((const __m256i *)(y + 32)), T);
            acc[j] = _mm256_fmadd_ps(_mm256_broadcastss_ps(sd), _mm256_cvtepi32_ps(p0), acc[j]);
            acc[j] = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(sd)), _mm256_cvtepi32_ps(p1), acc[j]);
            if (T != T_Q5_0) {
                /* bs[2b..2b+3] -> the two blocks' sums of y */
                const __m128i sy = _mm_madd_epi16(_mm_loadl_epi64((const __m128i *)(a[j].bs + 2 * b)), _mm_set1_epi16(1));
                const __m128 da = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(a[j].d + b)));
                accm[j] = _mm_fmadd_ps(_mm_mul_ps(mw, da), _mm_cvtepi32_ps(sy), accm[j]);
            }
        }
    }
    float tail[HK2_MAX_NA] = {0};
    if (b < nb) {
        const uint8_t *b0 = x + (size_t)B * b;
        const __m256i q0 = block_quants(b0, T);
        const float dw = half_at(b0), mw = T == T_Q5_0 ? 0.0f : half_at(b0 + 2);
        for (int j = 0; j < NA; j++) {
            const __m256i p0 = block_dot(q0, _mm256_loadu_si256((const __m256i *)(a[j].qs + 32 * b)), T);
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[j].d[b]), _mm256_cvtepi32_ps(p0), acc[j]);
            if (T != T_Q5_0) tail[j] = mw * a[j].d[b] * (float)(a[j].bs[2 * b] + a[j].bs[2 * b + 1]);
        }
    }
    for (int j = 0; j < NA; j++) {
        const __m128 m = _mm_add_ps(accm[j], _mm_movehdup_ps(accm[j]));
        s[j] = hsum_ps(acc[j]) + _mm_cvtss_f32(m) + tail[j];
    }
}

HK2_DOT_ENTRY_OF(q4_1, HK2_NA_SWITCH4, dot_q_t, T_Q4_1)
HK2_DOT_ENTRY_OF(q5_0, HK2_NA_SWITCH4, dot_q_t, T_Q5_0)
HK2_DOT_ENTRY_OF(q5_1, HK2_NA_SWITCH4, dot_q_t, T_Q5_1)

#include "hk2_target_end.h"
