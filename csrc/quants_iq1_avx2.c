/* IQ1_S IQ1_M: AVX2 dot kernels (hk2_dot_<type>_avx2, listed in quants_iq1.c's table). */
#include "hk2_target_avx2.h"
#include "iq_grids.h"

/* quants_iq1.c's layouts */
typedef struct { hk2_half d; uint8_t qs[32]; uint16_t qh[8]; } block_iq1_s;
typedef struct { uint8_t qs[32]; uint8_t qh[16]; uint8_t scales[8]; } block_iq1_m;

/* The weights are u = 8 (g + 1) + (1 + sign) in 0..18 (unsigned for maddubs), and a 16-value half's
 * sum (8 g + sign) y = sum u y - 9 bsum, bsum being the activations' sum of the half (quants_iq1.c has the
 * layouts). Per block: u (8 vectors of 32 values), the odd half scales ls16 (int16) and c9 = 9 ls16. */

typedef struct {
    __m256i u[8];
    int16_t ls[16];
    __m256i c9;
} iq1_block;

/* u from the grid indices of 32 groups (idx[k]: groups 8k..8k+7, int32) and their delta signs (bit g: -1/8) */
INLINE void iq1_weights(const __m256i idx[4], uint32_t neg, __m256i ls16, iq1_block *w) {
    const __m256i one = _mm256_set1_epi8(1);
    const __m256i bit = _mm256_setr_epi64x(1, 2, 4, 8);
    for (int q = 0; q < 8; q++) {
        const __m128i iq = q % 2 ? _mm256_extracti128_si256(idx[q / 2], 1) : _mm256_castsi256_si128(idx[q / 2]);
        const __m256i g = _mm256_i32gather_epi64((const long long *)hk2_iq1s_grid, iq, 8);
        /* 2 in each byte of a group with delta +1/8 */
        const __m256i nq = _mm256_and_si256(_mm256_set1_epi64x((long long)(neg >> (4 * q))), bit);
        const __m256i dl = _mm256_and_si256(_mm256_cmpeq_epi64(nq, _mm256_setzero_si256()), _mm256_set1_epi8(2));
        w->u[q] = _mm256_add_epi8(_mm256_slli_epi16(_mm256_add_epi8(g, one), 3), dl);
    }
    _mm256_storeu_si256((__m256i *)w->ls, ls16);
    w->c9 = _mm256_mullo_epi16(ls16, _mm256_set1_epi16(9));
}

INLINE __m256i u8_to_epi32(__m128i v) { return _mm256_cvtepu8_epi32(v); }  /* low 8 bytes */

INLINE float iq1_s_unpack(const block_iq1_s *x, iq1_block *w) {
    const __m128i qh = _mm_loadu_si128((const __m128i *)x->qh);
    const __m256i hq = _mm256_cvtepu16_epi32(qh);  /* 8 sub-blocks */
    const __m256i shift = _mm256_setr_epi32(0, 3, 6, 9, 0, 3, 6, 9);
    __m256i idx[4];
    uint32_t neg = 0;
    for (int k = 0; k < 4; k++) {
        const __m256i v = _mm256_permutevar8x32_epi32(hq, _mm256_setr_epi32(2 * k, 2 * k, 2 * k, 2 * k, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1));
        const __m256i hi = _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(v, shift), _mm256_set1_epi32(7)), 8);
        idx[k] = _mm256_or_si256(hi, u8_to_epi32(_mm_loadl_epi64((const __m128i *)(x->qs + 8 * k))));
    }
    for (int ib = 0; ib < 8; ib++) neg |= (uint32_t)(x->qh[ib] >> 15) * (0xFu << (4 * ib));
    const __m128i ls8 = _mm_add_epi16(_mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(qh, 12), _mm_set1_epi16(7)), 1), _mm_set1_epi16(1));
    iq1_weights(idx, neg, _mm256_setr_m128i(_mm_unpacklo_epi16(ls8, ls8), _mm_unpackhi_epi16(ls8, ls8)), w);
    return _cvtsh_ss(x->d);
}

INLINE float iq1_m_unpack(const block_iq1_m *x, iq1_block *w) {
    const __m256i perm = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    const __m256i shift = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    __m256i idx[4];
    uint32_t neg = 0;
    for (int k = 0; k < 4; k++) {
        uint32_t q4;
        memcpy(&q4, x->qh + 4 * k, 4);
        const __m256i nib = _mm256_srlv_epi32(_mm256_permutevar8x32_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi32_si128((int)q4)), perm), shift);
        const __m256i hi = _mm256_slli_epi32(_mm256_and_si256(nib, _mm256_set1_epi32(7)), 8);
        idx[k] = _mm256_or_si256(hi, u8_to_epi32(_mm_loadl_epi64((const __m128i *)(x->qs + 8 * k))));
        /* bit 3 of each group's nibble -> bit 31 of its lane for movemask */
        neg |= (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_slli_epi32(nib, 28))) << (8 * k);
    }
    uint16_t sw[4];
    memcpy(sw, x->scales, 8);
    int16_t ls[16];
    for (int h = 0; h < 16; h++) ls[h] = (int16_t)(2 * ((sw[h / 4] >> (3 * (h % 4))) & 7) + 1);
    iq1_weights(idx, neg, _mm256_loadu_si256((const __m256i *)ls), w);
    return _cvtsh_ss((hk2_half)((sw[0] >> 12) | ((sw[1] >> 8) & 0x00F0) | ((sw[2] >> 4) & 0x0F00) | (sw[3] & 0xF000)));
}

/* sum over the block of ls * (sum u y - 9 bsum), as 8 int32 (maddubs pairs <= 2 * 18 * 128) */
INLINE __m256i iq1_block_dot(const iq1_block *w, const int8_t *y, const int16_t *bs) {
    __m256i acc = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)bs), w->c9));
    for (int q = 0; q < 8; q++) {
        const __m256i p = _mm256_maddubs_epi16(w->u[q], _mm256_loadu_si256((const __m256i *)(y + 32 * q)));
        const __m256i ls = _mm256_setr_m128i(_mm_set1_epi16(w->ls[2 * q]), _mm_set1_epi16(w->ls[2 * q + 1]));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ls));
    }
    return acc;
}

#define IQ1_DOT(type)                                                                                         \
    INLINE void dot_##type##_t(int n, const block_##type *x, const hk2_arow *a, const int NA, float *s) {      \
        __m256 acc[HK2_MAX_NA];                                                                               \
        for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();                                            \
        for (int b = 0; b < n / HK2_QK_K; b++) {                                                              \
            PREFETCH(x + b);                                                                                  \
            iq1_block w;                                                                                      \
            const float dw = 0.125f * type##_unpack(x + b, &w);                                               \
            for (int j = 0; j < NA; j++) {                                                                    \
                const __m256i p = iq1_block_dot(&w, a[j].qs + HK2_QK_K * b, a[j].bs + 16 * b);               \
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[j].d[b]), _mm256_cvtepi32_ps(p), acc[j]);      \
            }                                                                                                 \
        }                                                                                                     \
        for (int j = 0; j < NA; j++) s[j] = hsum_ps(acc[j]);                                                  \
    }
IQ1_DOT(iq1_s)
IQ1_DOT(iq1_m)

HK2_DOT_ENTRY(iq1_s, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(iq1_m, HK2_NA_SWITCH4)

#include "hk2_target_end.h"
