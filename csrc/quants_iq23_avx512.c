/* IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S: AVX-512 (F/BW/VL + VNNI) dot kernels (hk2_dot_<type>_avx512vnni, listed in
 * quants_iq23.c's table for the avx512vnni level). Two sub-blocks (64 values) per vector: one gather brings
 * the grid entries, the weight signs become a 64-bit mask that negates the activations (masked subtract),
 * _mm512_maddubs_epi16 multiplies the unsigned grid values with them and _mm512_dpwssd_epi32 adds the pairs
 * times the integer sub-block scales. One float FMA per super-block and activation row.
 * With HK2_USE_SIMDE the same code builds against SIMDe's portable AVX-512 so it is tested on CPUs without
 * AVX-512 (SIMDe has no 512-bit gathers: those two are plain loads there). */
#include "hk2_target_avx512.h"
#include "quants_iq23.h"

INLINE uint32_t rd32(const void *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}
/* t[idx[i]] for 8 (uint64 table) or 16 (uint32 table) int32 indices */
INLINE __m512i gather64(const uint64_t *t, __m256i idx) {
#ifdef HK2_USE_SIMDE
    int32_t i[8];
    uint64_t v[8];
    _mm256_storeu_si256((__m256i *)i, idx);
    for (int k = 0; k < 8; k++) v[k] = t[i[k]];
    return _mm512_loadu_si512(v);
#else
    return _mm512_i32gather_epi64(idx, (const void *)t, 8);
#endif
}
INLINE __m512i gather32(const uint32_t *t, __m512i idx) {
#ifdef HK2_USE_SIMDE
    int32_t i[16];
    uint32_t v[16];
    _mm512_storeu_si512(i, idx);
    for (int k = 0; k < 16; k++) v[k] = t[i[k]];
    return _mm512_loadu_si512(v);
#else
    return _mm512_i32gather_epi32(idx, (const void *)t, 4);
#endif
}

/* zero extension of bytes (SIMDe lacks the 512-bit forms) */
INLINE __m512i u8_to_16(__m256i b) {
#ifdef HK2_USE_SIMDE
    uint8_t i[32];
    uint16_t r[32];
    _mm256_storeu_si256((__m256i *)i, b);
    for (int k = 0; k < 32; k++) r[k] = i[k];
    return _mm512_loadu_si512(r);
#else
    return _mm512_cvtepu8_epi16(b);
#endif
}
INLINE __m512i u8_to_32(__m128i b) {
#ifdef HK2_USE_SIMDE
    uint8_t i[16];
    uint32_t r[16];
    _mm_storeu_si128((__m128i *)i, b);
    for (int k = 0; k < 16; k++) r[k] = i[k];
    return _mm512_loadu_si512(r);
#else
    return _mm512_cvtepu8_epi32(b);
#endif
}

/* per 16-bit lane: a 7-bit index in bits 0..6 -> its sign byte in the low byte */
INLINE __m512i ksigns1_16(__m512i t) {
    __m512i p = _mm512_xor_si512(t, _mm512_srli_epi16(t, 4));
    p = _mm512_xor_si512(p, _mm512_srli_epi16(p, 2));
    p = _mm512_xor_si512(p, _mm512_srli_epi16(p, 1));
    return _mm512_or_si512(t, _mm512_slli_epi16(_mm512_and_si512(p, _mm512_set1_epi16(1)), 7));
}
/* The int16 scale of each maddubs pair of vector v (values 64v .. 64v+63), picked from the int16 lanes of sc:
 * per16: 16 scales of 16 values each in lanes 0..15; per32: 8 scales of 32 values, scale k in lane stride * k */
INLINE __m512i scales_per16(__m512i sc, int v) {
    const __m512i i = u8_to_16(_mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
    return _mm512_permutexvar_epi16(_mm512_add_epi16(i, _mm512_set1_epi16((short)(4 * v))), sc);
}
INLINE __m512i scales_per32(__m512i sc, int v, int stride) {
    const __m512i i = u8_to_16(_mm256_set_epi64x(0x0101010101010101, 0x0101010101010101, 0, 0));
    return _mm512_permutexvar_epi16(_mm512_mullo_epi16(_mm512_add_epi16(i, _mm512_set1_epi16((short)(2 * v))), _mm512_set1_epi16((short)stride)), sc);
}

#define BLOCK_BEGIN(blk)                                                                   \
    for (size_t o = 0; o < sizeof(blk); o += 64) PREFETCH((const uint8_t *)&(blk) + o);  \
    __m512i sumi[HK2_MAX_NA];                                                             \
    for (int j = 0; j < NA; j++) sumi[j] = _mm512_setzero_si512();
/* per activation row: sumi += (grid . (sign * y)) pairs times the int16 scales sc, for values 64v.. */
#define ACC_ROWS(g, m, sc, v)                                                                         \
    for (int j = 0; j < NA; j++) {                                                                    \
        const __m512i y = _mm512_loadu_si512((const void *)(a[j].qs + HK2_QK_K * b + 64 * (v)));      \
        const __m512i ys = _mm512_mask_sub_epi8(y, m, _mm512_setzero_si512(), y);                    \
        sumi[j] = _mm512_dpwssd_epi32(sumi[j], _mm512_maddubs_epi16(g, ys), sc);                      \
    }
#define BLOCK_END(dw)                                                                                             \
    for (int j = 0; j < NA; j++)                                                                                  \
        acc[j] = _mm512_fmadd_ps(_mm512_set1_ps((dw) * a[j].d[b]), _mm512_cvtepi32_ps(sumi[j]), acc[j]);
#define BEGIN                           \
    __m512 acc[HK2_MAX_NA];            \
    for (int j = 0; j < NA; j++) acc[j] = _mm512_setzero_ps();
#define FINISH(c) for (int j = 0; j < NA; j++) s[j] = (c) * _mm512_reduce_add_ps(acc[j]);

INLINE void dot_iq2_xxs_t(int n, const block_iq2_xxs *x, const hk2_arow *a, const int NA, float *s) {
    BEGIN
    for (int b = 0; b < n / HK2_QK_K; b++) {
        BLOCK_BEGIN(x[b])
        /* 64-bit lane ib: sub-block ib's grid indices (low word) and sign indices + scale (high word) */
        const __m512i q = _mm512_loadu_si512((const void *)x[b].qs);
        const __m512i hi = _mm512_srli_epi64(q, 32);
        uint64_t sg[4];
        uint8_t ix[32];
        _mm256_storeu_si256((__m256i *)sg, ksigns4(_mm512_cvtepi64_epi32(hi)));
        _mm256_storeu_si256((__m256i *)ix, _mm512_cvtepi64_epi32(q));
        const __m512i ls = _mm512_add_epi64(_mm512_slli_epi64(_mm512_srli_epi64(q, 60), 1), _mm512_set1_epi64(1));  /* 2 ls + 1, int16 lane 4 ib */
        for (int v = 0; v < 4; v++) {
            const __m512i g = gather64(hk2_iq2xxs_grid, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ix + 8 * v))));
            ACC_ROWS(g, (__mmask64)sg[v], scales_per32(ls, v, 4), v)
        }
        BLOCK_END(hk2_fp16_to_fp32(x[b].d))
    }
    FINISH(0.125f)
}

/* 16 scales (two 4-bit per byte of sc8) as int16 lanes 2 s + 1 */
INLINE __m512i nibble_scales(const uint8_t *sc8) {
    const __m128i b = _mm_loadl_epi64((const __m128i *)sc8);
    const __m128i nib = _mm_and_si128(_mm_unpacklo_epi8(b, _mm_srli_epi16(b, 4)), _mm_set1_epi8(0xF));
    const __m256i s16 = _mm256_cvtepu8_epi16(nib);
    return _mm512_zextsi256_si512(_mm256_add_epi16(_mm256_add_epi16(s16, s16), _mm256_set1_epi16(1)));
}

INLINE void dot_iq2_xs_t(int n, const block_iq2_xs *x, const hk2_arow *a, const int NA, float *s) {
    BEGIN
    for (int b = 0; b < n / HK2_QK_K; b++) {
        BLOCK_BEGIN(x[b])
        const __m512i q = _mm512_loadu_si512((const void *)x[b].qs);
        uint64_t sg[4];
        uint16_t ix[32];
        _mm256_storeu_si256((__m256i *)sg, _mm512_cvtepi16_epi8(ksigns1_16(_mm512_srli_epi16(q, 9))));
        _mm512_storeu_si512(ix, _mm512_and_si512(q, _mm512_set1_epi16(511)));
        const __m512i sc16 = nibble_scales(x[b].scales);
        for (int v = 0; v < 4; v++) {
            const __m512i g = gather64(hk2_iq2xs_grid, _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(ix + 8 * v))));
            ACC_ROWS(g, (__mmask64)sg[v], scales_per16(sc16, v), v)
        }
        BLOCK_END(hk2_fp16_to_fp32(x[b].d))
    }
    FINISH(0.125f)
}

INLINE void dot_iq2_s_t(int n, const block_iq2_s *x, const hk2_arow *a, const int NA, float *s) {
    BEGIN
    const __m256i hsh = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    for (int b = 0; b < n / HK2_QK_K; b++) {
        BLOCK_BEGIN(x[b])
        const __m512i sc16 = nibble_scales(x[b].scales);
        uint64_t sg[4];
        memcpy(sg, x[b].signs, sizeof sg);
        for (int v = 0; v < 4; v++) {
            const int h = x[b].qh[2 * v] | (x[b].qh[2 * v + 1] << 8);  /* 2 top bits per index */
            const __m256i hi = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(h), hsh), _mm256_set1_epi32(3));
            const __m256i idx = _mm256_or_si256(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(x[b].qs + 8 * v))),
                                                _mm256_slli_epi32(hi, 8));
            ACC_ROWS(gather64(hk2_iq2s_grid, idx), (__mmask64)sg[v], scales_per16(sc16, v), v)
        }
        BLOCK_END(hk2_fp16_to_fp32(x[b].d))
    }
    FINISH(0.125f)
}

INLINE void dot_iq3_xxs_t(int n, const block_iq3_xxs *x, const hk2_arow *a, const int NA, float *s) {
    BEGIN
    for (int b = 0; b < n / HK2_QK_K; b++) {
        BLOCK_BEGIN(x[b])
        const __m256i aux = _mm256_loadu_si256((const __m256i *)x[b].sas);
        uint64_t sg[4];
        _mm256_storeu_si256((__m256i *)sg, ksigns4(aux));
        /* 2 ls + 1 in int16 lane 2 ib */
        const __m512i ls = _mm512_zextsi256_si512(_mm256_add_epi32(_mm256_slli_epi32(_mm256_srli_epi32(aux, 28), 1), _mm256_set1_epi32(1)));
        for (int v = 0; v < 4; v++) {
            const __m512i idx = u8_to_32(_mm_loadu_si128((const __m128i *)(x[b].qs + 16 * v)));
            ACC_ROWS(gather32(hk2_iq3xxs_grid, idx), (__mmask64)sg[v], scales_per32(ls, v, 2), v)
        }
        BLOCK_END(hk2_fp16_to_fp32(x[b].d))
    }
    FINISH(0.25f)
}

INLINE void dot_iq3_s_t(int n, const block_iq3_s *x, const hk2_arow *a, const int NA, float *s) {
    BEGIN
    const __m512i hsh = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int b = 0; b < n / HK2_QK_K; b++) {
        BLOCK_BEGIN(x[b])
        uint64_t sg[4];
        memcpy(sg, x[b].signs, sizeof sg);
        /* 2 s + 1 in int16 lane 2 ib */
        const __m256i s32 = _mm256_srlv_epi32(_mm256_set1_epi32((int)rd32(x[b].scales)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
        const __m512i ls = _mm512_zextsi256_si512(
            _mm256_add_epi32(_mm256_slli_epi32(_mm256_and_si256(s32, _mm256_set1_epi32(0xF)), 1), _mm256_set1_epi32(1)));
        for (int v = 0; v < 4; v++) {
            const int h = x[b].qh[2 * v] | (x[b].qh[2 * v + 1] << 8);  /* top bit per index */
            const __m512i hi = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(h), hsh), _mm512_set1_epi32(1));
            const __m512i idx = _mm512_or_si512(u8_to_32(_mm_loadu_si128((const __m128i *)(x[b].qs + 16 * v))),
                                                _mm512_slli_epi32(hi, 8));
            ACC_ROWS(gather32(hk2_iq3s_grid, idx), (__mmask64)sg[v], scales_per32(ls, v, 2), v)
        }
        BLOCK_END(hk2_fp16_to_fp32(x[b].d))
    }
    FINISH(1.0f)
}

HK2_DOT_ENTRY(iq2_xxs, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(iq2_xs, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(iq2_s, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(iq3_xxs, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(iq3_s, HK2_NA_SWITCH4)

#include "hk2_target_end.h"
