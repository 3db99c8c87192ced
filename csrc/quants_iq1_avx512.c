/* IQ1_S IQ1_M: AVX-512 (F/BW/VL + VNNI) dot kernels (hk2_dot_<type>_avx512vnni, listed in quants_iq1.c's
 * table for the avx512vnni level). With HK2_USE_SIMDE the same code builds against SIMDe's portable
 * AVX-512 so it is tested on CPUs without AVX-512. */
#include "hk2_target_avx512.h"
#include "iq_grids.h"

#ifdef HK2_USE_SIMDE
#define F16(h) hk2_fp16_to_fp32(h)
#else
#define F16(h) _cvtsh_ss(h)
#endif

/* quants_iq1.c's layouts */
typedef struct { hk2_half d; uint8_t qs[32]; uint16_t qh[8]; } block_iq1_s;
typedef struct { uint8_t qs[32]; uint8_t qh[16]; uint8_t scales[8]; } block_iq1_m;


/* grid entries of 8 group indices */
#ifdef HK2_USE_SIMDE
static inline __m512i iq1_gather(__m256i idx) {  /* SIMDe lacks the 512-bit gathers */
    int32_t i[8];
    _mm256_storeu_si256((__m256i *)i, idx);
    return _mm512_set_epi64((long long)hk2_iq1s_grid[i[7]], (long long)hk2_iq1s_grid[i[6]], (long long)hk2_iq1s_grid[i[5]],
                            (long long)hk2_iq1s_grid[i[4]], (long long)hk2_iq1s_grid[i[3]], (long long)hk2_iq1s_grid[i[2]],
                            (long long)hk2_iq1s_grid[i[1]], (long long)hk2_iq1s_grid[i[0]]);
}
#else
#define iq1_gather(idx) _mm512_i32gather_epi64(idx, (const void *)hk2_iq1s_grid, 8)
#endif

/* The block's weights u (4 vectors of 64 values) from the grid indices of its 32 groups (idx[0]: groups 0..15,
 * idx[1]: 16..31, as int32) and their delta signs (bit g of neg set: -1/8); ls[q]: the int16 scale of each
 * maddubs lane of vector q, from the 16 half scales ls16 (int16, odd). */
INLINE void iq1_weights(const __m512i idx[2], uint32_t neg, __m256i ls16, __m512i u[4], __m512i ls[4]) {
    const __m512i one = _mm512_set1_epi8(1), two = _mm512_set1_epi8(2);
    const __m512i lane_half = _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2,
                                               1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i ls512 = _mm512_castsi256_si512(ls16);
    for (int q = 0; q < 4; q++) {
        const __m256i iq = q % 2 ? _mm512_extracti64x4_epi64(idx[q / 2], 1) : _mm512_castsi512_si256(idx[q / 2]);
        const __m512i g = iq1_gather(iq);
        const __m512i dl = _mm512_maskz_mov_epi64((uint8_t)~(neg >> (8 * q)), two);
        u[q] = _mm512_add_epi8(_mm512_slli_epi16(_mm512_add_epi8(g, one), 3), dl);
        ls[q] = _mm512_permutexvar_epi16(_mm512_add_epi16(lane_half, _mm512_set1_epi16((short)(4 * q))), ls512);
    }
}

INLINE __m512i u8_to_epi32(__m128i v) { return _mm512_cvtepu16_epi32(_mm256_cvtepu8_epi16(v)); }

/* IQ1_S: qh[ib] holds groups 4ib..4ib+3's index bits (3l..3l+2), the scale (12..14) and the delta sign (15) */
INLINE float iq1_s_unpack(const block_iq1_s *x, __m512i u[4], __m512i ls[4], __m256i *c9) {
    const __m128i qh = _mm_loadu_si128((const __m128i *)x->qh);
    const __m512i hq = _mm512_castsi256_si512(_mm256_cvtepu16_epi32(qh));
    const __m512i shift = _mm512_setr_epi32(0, 3, 6, 9, 0, 3, 6, 9, 0, 3, 6, 9, 0, 3, 6, 9);
    __m512i idx[2];
    uint32_t neg = 0;
    for (int h = 0; h < 2; h++) {
        const __m512i perm = _mm512_setr_epi32(4 * h, 4 * h, 4 * h, 4 * h, 4 * h + 1, 4 * h + 1, 4 * h + 1, 4 * h + 1,
                                               4 * h + 2, 4 * h + 2, 4 * h + 2, 4 * h + 2, 4 * h + 3, 4 * h + 3, 4 * h + 3, 4 * h + 3);
        const __m512i w = _mm512_permutexvar_epi32(perm, hq);  /* lane g: its sub-block's qh */
        const __m512i hi = _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(w, shift), _mm512_set1_epi32(7)), 8);
        idx[h] = _mm512_or_si512(hi, u8_to_epi32(_mm_loadu_si128((const __m128i *)(x->qs + 16 * h))));
        neg |= (uint32_t)_mm512_test_epi32_mask(w, _mm512_set1_epi32(0x8000)) << (16 * h);
    }
    const __m128i ls8 = _mm_add_epi16(_mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(qh, 12), _mm_set1_epi16(7)), 1), _mm_set1_epi16(1));
    const __m256i ls16 = _mm256_setr_m128i(_mm_unpacklo_epi16(ls8, ls8), _mm_unpackhi_epi16(ls8, ls8));
    iq1_weights(idx, neg, ls16, u, ls);
    *c9 = _mm256_mullo_epi16(ls16, _mm256_set1_epi16(9));
    return F16(x->d);
}

/* IQ1_M: qh byte g/2's nibble g%2 holds group g's index bits (0..2) and delta sign (3); scale word h/4 bits
 * 3(h%4).. the half scales; the words' top nibbles d */
INLINE float iq1_m_unpack(const block_iq1_m *x, __m512i u[4], __m512i ls[4], __m256i *c9) {
    const __m128i qh = _mm_loadu_si128((const __m128i *)x->qh);
    const __m512i perm = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i shift = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    __m512i idx[2];
    uint32_t neg = 0;
    for (int h = 0; h < 2; h++) {
        const __m512i b = _mm512_castsi256_si512(_mm256_cvtepu8_epi32(h ? _mm_srli_si128(qh, 8) : qh));
        const __m512i nib = _mm512_srlv_epi32(_mm512_permutexvar_epi32(perm, b), shift);  /* lane g: its nibble (+ junk above) */
        const __m512i hi = _mm512_slli_epi32(_mm512_and_si512(nib, _mm512_set1_epi32(7)), 8);
        idx[h] = _mm512_or_si512(hi, u8_to_epi32(_mm_loadu_si128((const __m128i *)(x->qs + 16 * h))));
        neg |= (uint32_t)_mm512_test_epi32_mask(nib, _mm512_set1_epi32(8)) << (16 * h);
    }
    uint16_t w[4];
    memcpy(w, x->scales, 8);
    const __m256i wv = _mm256_permutexvar_epi16(_mm256_setr_epi16(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                                _mm256_castsi128_si256(_mm_loadl_epi64((const __m128i *)x->scales)));
    const __m256i s3 = _mm256_and_si256(_mm256_srlv_epi16(wv, _mm256_setr_epi16(0, 3, 6, 9, 0, 3, 6, 9, 0, 3, 6, 9, 0, 3, 6, 9)),
                                        _mm256_set1_epi16(7));
    const __m256i ls16 = _mm256_add_epi16(_mm256_slli_epi16(s3, 1), _mm256_set1_epi16(1));
    iq1_weights(idx, neg, ls16, u, ls);
    *c9 = _mm256_mullo_epi16(ls16, _mm256_set1_epi16(9));
    return F16((hk2_half)((w[0] >> 12) | ((w[1] >> 8) & 0x00F0) | ((w[2] >> 4) & 0x0F00) | (w[3] & 0xF000)));
}

/* sum over the block of ls * (sum u y - 9 bsum), as 16 int32 */
INLINE __m512i iq1_block_dot(const __m512i u[4], const __m512i ls[4], __m256i c9, const int8_t *y, const int16_t *bs) {
    const __m256i m = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)bs), c9);
    __m512i acc = _mm512_zextsi256_si512(_mm256_sub_epi32(_mm256_setzero_si256(), m));
    for (int q = 0; q < 4; q++) {
        const __m512i p = _mm512_maddubs_epi16(u[q], _mm512_loadu_si512((const void *)(y + 64 * q)));
        acc = _mm512_dpwssd_epi32(acc, p, ls[q]);
    }
    return acc;
}

#define IQ1_DOT(type)                                                                                         \
    INLINE void dot_##type##_t(int n, const block_##type *x, const hk2_arow *a, const int NA, float *s) {      \
        __m512 acc[HK2_MAX_NA];                                                                               \
        for (int j = 0; j < NA; j++) acc[j] = _mm512_setzero_ps();                                            \
        for (int b = 0; b < n / HK2_QK_K; b++) {                                                              \
            PREFETCH(x + b);                                                                                  \
            __m512i u[4], ls[4];                                                                              \
            __m256i c9;                                                                                       \
            const float dw = 0.125f * type##_unpack(x + b, u, ls, &c9);                                       \
            for (int j = 0; j < NA; j++) {                                                                    \
                const __m512i p = iq1_block_dot(u, ls, c9, a[j].qs + HK2_QK_K * b, a[j].bs + 16 * b);         \
                acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(dw * a[j].d[b]), _mm512_cvtepi32_ps(p), acc[j]);      \
            }                                                                                                 \
        }                                                                                                     \
        for (int j = 0; j < NA; j++) s[j] = _mm512_reduce_add_ps(acc[j]);                                     \
    }
IQ1_DOT(iq1_s)
IQ1_DOT(iq1_m)

HK2_DOT_ENTRY(iq1_s, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(iq1_m, HK2_NA_SWITCH4)

#include "hk2_target_end.h"
