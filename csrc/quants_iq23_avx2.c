/* IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S: AVX2 dot kernels (hk2_dot_<type>_avx2, listed in quants_iq23.c's table).
 * One 32-value sub-block per vector: the grid entries come in with one gather, the weight signs are applied
 * to the activations (_mm256_sign_epi8) so _mm256_maddubs_epi16 multiplies the unsigned grid values with
 * them, and _mm256_madd_epi16 applies the integer sub-block scales. One float FMA per super-block and
 * activation row; the weights are unpacked once per sub-block for all rows. */
#include "hk2_target_avx2.h"
#include "quants_iq23.h"

INLINE uint32_t rd32(const void *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* 4 sign bytes (bit j of byte k: value 8k + j negative) -> 32 bytes of -1 / +1 */
INLINE __m256i sign_vec(uint32_t sg) {
    const __m256i spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)sg), spread), bit);
    return _mm256_or_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(1));
}
/* per 16-bit lane: a 7-bit index in bits 0..6 -> its sign byte in the low byte */
INLINE __m256i ksigns1_16(__m256i t) {
    __m256i p = _mm256_xor_si256(t, _mm256_srli_epi16(t, 4));
    p = _mm256_xor_si256(p, _mm256_srli_epi16(p, 2));
    p = _mm256_xor_si256(p, _mm256_srli_epi16(p, 1));
    return _mm256_or_si256(t, _mm256_slli_epi16(_mm256_and_si256(p, _mm256_set1_epi16(1)), 7));
}

/* per activation row: sumi += (grid . (sign * y)) pairs times the int16 scales sc */
#define ACC_ROWS(g, sv, sc, off)                                                                      \
    for (int j = 0; j < NA; j++) {                                                                    \
        const __m256i y = _mm256_loadu_si256((const __m256i *)(a[j].qs + HK2_QK_K * b + (off)));      \
        const __m256i p = _mm256_maddubs_epi16(g, _mm256_sign_epi8(y, sv));                           \
        sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(p, sc));                                \
    }
#define BLOCK_BEGIN(blk)                                                                   \
    for (size_t o = 0; o < sizeof(blk); o += 64) PREFETCH((const uint8_t *)&(blk) + o);  \
    __m256i sumi[HK2_MAX_NA];                                                             \
    for (int j = 0; j < NA; j++) sumi[j] = _mm256_setzero_si256();
#define BLOCK_END(dw)                                                                                             \
    for (int j = 0; j < NA; j++)                                                                                  \
        acc[j] = _mm256_fmadd_ps(_mm256_set1_ps((dw) * a[j].d[b]), _mm256_cvtepi32_ps(sumi[j]), acc[j]);

INLINE void dot_iq2_xxs_t(int n, const block_iq2_xxs *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    for (int b = 0; b < n / HK2_QK_K; b++) {
        BLOCK_BEGIN(x[b])
        /* words 2ib (grid indices) and 2ib + 1 (sign indices, scale) of sub-block ib */
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)x[b].qs), w1 = _mm256_loadu_si256((const __m256i *)(x[b].qs + 16));
        const __m256i odd = _mm256_setr_epi32(1, 3, 5, 7, 0, 2, 4, 6);
        const __m256i aux = _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(w0, odd), _mm256_permutevar8x32_epi32(w1, odd), 0x20);
        uint32_t sg[8];
        int16_t ls[8];
        _mm256_storeu_si256((__m256i *)sg, ksigns4(aux));
        _mm_storeu_si128((__m128i *)ls, _mm_packs_epi32(_mm256_castsi256_si128(_mm256_srli_epi32(aux, 28)),
                                                        _mm256_extracti128_si256(_mm256_srli_epi32(aux, 28), 1)));
        for (int ib = 0; ib < 8; ib++) {
            const __m128i idx = _mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)rd32(x[b].qs + 4 * ib)));
            const __m256i g = _mm256_i32gather_epi64((const long long *)hk2_iq2xxs_grid, idx, 8);
            const __m256i sv = sign_vec(sg[ib]);
            const __m256i sc = _mm256_set1_epi16((int16_t)(2 * ls[ib] + 1));
            ACC_ROWS(g, sv, sc, 32 * ib)
        }
        BLOCK_END(hk2_fp16_to_fp32(x[b].d))
    }
    for (int j = 0; j < NA; j++) s[j] = 0.125f * hsum_ps(acc[j]);
}

/* two 16-value halves, two scales: [lo x8 | hi x8] in maddubs's int16 pairs */
INLINE __m256i half_scales(uint8_t sc) {
    return _mm256_set_m128i(_mm_set1_epi16((int16_t)(2 * (sc >> 4) + 1)), _mm_set1_epi16((int16_t)(2 * (sc & 0xF) + 1)));
}

INLINE void dot_iq2_xs_t(int n, const block_iq2_xs *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    for (int b = 0; b < n / HK2_QK_K; b++) {
        BLOCK_BEGIN(x[b])
        const __m256i q0 = _mm256_loadu_si256((const __m256i *)x[b].qs), q1 = _mm256_loadu_si256((const __m256i *)(x[b].qs + 16));
        const __m256i sb = _mm256_permute4x64_epi64(
            _mm256_packus_epi16(ksigns1_16(_mm256_srli_epi16(q0, 9)), ksigns1_16(_mm256_srli_epi16(q1, 9))), 0xD8);
        uint32_t sg[8];
        _mm256_storeu_si256((__m256i *)sg, sb);
        for (int ib = 0; ib < 8; ib++) {
            const __m128i idx = _mm_and_si128(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)(x[b].qs + 4 * ib))), _mm_set1_epi32(511));
            const __m256i g = _mm256_i32gather_epi64((const long long *)hk2_iq2xs_grid, idx, 8);
            const __m256i sv = sign_vec(sg[ib]);
            const __m256i sc = half_scales(x[b].scales[ib]);
            ACC_ROWS(g, sv, sc, 32 * ib)
        }
        BLOCK_END(hk2_fp16_to_fp32(x[b].d))
    }
    for (int j = 0; j < NA; j++) s[j] = 0.125f * hsum_ps(acc[j]);
}

INLINE void dot_iq2_s_t(int n, const block_iq2_s *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    const __m128i hsh = _mm_setr_epi32(0, 2, 4, 6);
    for (int b = 0; b < n / HK2_QK_K; b++) {
        BLOCK_BEGIN(x[b])
        for (int ib = 0; ib < 8; ib++) {
            const __m128i hi = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32(x[b].qh[ib]), hsh), _mm_set1_epi32(3));
            const __m128i idx = _mm_or_si128(_mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)rd32(x[b].qs + 4 * ib))), _mm_slli_epi32(hi, 8));
            const __m256i g = _mm256_i32gather_epi64((const long long *)hk2_iq2s_grid, idx, 8);
            const __m256i sv = sign_vec(rd32(x[b].signs + 4 * ib));
            const __m256i sc = half_scales(x[b].scales[ib]);
            ACC_ROWS(g, sv, sc, 32 * ib)
        }
        BLOCK_END(hk2_fp16_to_fp32(x[b].d))
    }
    for (int j = 0; j < NA; j++) s[j] = 0.125f * hsum_ps(acc[j]);
}

INLINE void dot_iq3_xxs_t(int n, const block_iq3_xxs *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    for (int b = 0; b < n / HK2_QK_K; b++) {
        BLOCK_BEGIN(x[b])
        const __m256i aux = _mm256_loadu_si256((const __m256i *)x[b].sas);
        uint32_t sg[8];
        int32_t ls[8];
        _mm256_storeu_si256((__m256i *)sg, ksigns4(aux));
        _mm256_storeu_si256((__m256i *)ls, _mm256_srli_epi32(aux, 28));
        for (int ib = 0; ib < 8; ib++) {
            const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(x[b].qs + 8 * ib)));
            const __m256i g = _mm256_i32gather_epi32((const int *)hk2_iq3xxs_grid, idx, 4);
            const __m256i sv = sign_vec(sg[ib]);
            const __m256i sc = _mm256_set1_epi16((int16_t)(2 * ls[ib] + 1));
            ACC_ROWS(g, sv, sc, 32 * ib)
        }
        BLOCK_END(hk2_fp16_to_fp32(x[b].d))
    }
    for (int j = 0; j < NA; j++) s[j] = 0.25f * hsum_ps(acc[j]);
}

INLINE void dot_iq3_s_t(int n, const block_iq3_s *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    const __m256i hsh = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int b = 0; b < n / HK2_QK_K; b++) {
        BLOCK_BEGIN(x[b])
        for (int ib = 0; ib < 8; ib++) {
            const __m256i hi = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(x[b].qh[ib]), hsh), _mm256_set1_epi32(1));
            const __m256i idx = _mm256_or_si256(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(x[b].qs + 8 * ib))),
                                                _mm256_slli_epi32(hi, 8));
            const __m256i g = _mm256_i32gather_epi32((const int *)hk2_iq3s_grid, idx, 4);
            const __m256i sv = sign_vec(rd32(x[b].signs + 4 * ib));
            const __m256i sc = _mm256_set1_epi16((int16_t)(1 + 2 * ((x[b].scales[ib / 2] >> (4 * (ib & 1))) & 0xF)));
            ACC_ROWS(g, sv, sc, 32 * ib)
        }
        BLOCK_END(hk2_fp16_to_fp32(x[b].d))
    }
    for (int j = 0; j < NA; j++) s[j] = hsum_ps(acc[j]);
}

HK2_DOT_ENTRY(iq2_xxs, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(iq2_xs, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(iq2_s, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(iq3_xxs, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(iq3_s, HK2_NA_SWITCH4)

#include "hk2_target_end.h"
