/* IQ1_S IQ1_M: AVX-512 (F/BW/VL + VNNI) dot kernels (hk2_dot_<type>_avx512vnni, listed in quants_iq1.c's
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
#include "iq_grids.h"

#ifdef HK2_USE_SIMDE
#define F16(h) hk2_fp16_to_fp32(h)
#else
#define F16(h) _cvtsh_ss(h)
#endif

/* quants_iq1.c's layouts */
typedef struct { hk2_half d; uint8_t qs[32]; uint16_t qh[8]; } block_iq1_s;
typedef struct { uint8_t qs[32]; uint8_t qh[16]; uint8_t scales[8]; } block_iq1_m;

/* One block's fields as the dots use them: per group g of 8 values the grid index and its delta sign
 * (bit g of neg: -1/8), per 16-value half h the odd scale ls[h] = 2 s + 1 (quants_iq1.c describes the layouts).
 * The weights are then u = 8 (g + 1) + (1 + sign) in 0..18 (unsigned for maddubs), and a half's
 * sum (8 g + sign) y = sum u y - 9 bsum, bsum being the activations' sum of the half. */
typedef struct {
    int idx[32];
    uint32_t neg;
    int16_t ls[16];
} iq1_fields;

INLINE void iq1_s_fields(const block_iq1_s *x, iq1_fields *f) {
    f->neg = 0;
    for (int ib = 0; ib < 8; ib++) {
        const int qh = x->qh[ib];
        for (int l = 0; l < 4; l++) f->idx[4 * ib + l] = x->qs[4 * ib + l] | ((qh >> (3 * l)) & 7) << 8;
        f->neg |= (uint32_t)(qh >> 15) * (0xFu << (4 * ib));
        f->ls[2 * ib] = f->ls[2 * ib + 1] = (int16_t)(2 * ((qh >> 12) & 7) + 1);
    }
}
INLINE float iq1_m_fields(const block_iq1_m *x, iq1_fields *f) {
    uint16_t w[4];
    memcpy(w, x->scales, 8);
    f->neg = 0;
    for (int g = 0; g < 32; g++) {
        const int nib = (x->qh[g / 2] >> (4 * (g % 2))) & 0xF;
        f->idx[g] = x->qs[g] | (nib & 7) << 8;
        f->neg |= (uint32_t)(nib >> 3) << g;
    }
    for (int h = 0; h < 16; h++) f->ls[h] = (int16_t)(2 * ((w[h / 4] >> (3 * (h % 4))) & 7) + 1);
    return F16((hk2_half)((w[0] >> 12) | ((w[1] >> 8) & 0x00F0) | ((w[2] >> 4) & 0x0F00) | (w[3] & 0xF000)));
}
/* the delta term's bytes of group g: 2 (delta +1/8) or 0 */
#define IQ1_DBYTES(f, g) (((f)->neg >> (g)) & 1 ? 0 : 0x0202020202020202ull)

/* the block's u (4 vectors of 64 values) and per vector the int16 scales of its four halves */
INLINE void iq1_unpack(const iq1_fields *f, __m512i u[4], __m512i ls[4], __m256i *c9) {
    const __m512i one = _mm512_set1_epi8(1);
    for (int q = 0; q < 4; q++) {
        const int *i = f->idx + 8 * q;
        const __m512i g = _mm512_set_epi64(
            (long long)hk2_iq1s_grid[i[7]], (long long)hk2_iq1s_grid[i[6]], (long long)hk2_iq1s_grid[i[5]], (long long)hk2_iq1s_grid[i[4]],
            (long long)hk2_iq1s_grid[i[3]], (long long)hk2_iq1s_grid[i[2]], (long long)hk2_iq1s_grid[i[1]], (long long)hk2_iq1s_grid[i[0]]);
        const int g0 = 8 * q;
        const __m512i dl = _mm512_set_epi64(
            (long long)IQ1_DBYTES(f, g0 + 7), (long long)IQ1_DBYTES(f, g0 + 6), (long long)IQ1_DBYTES(f, g0 + 5), (long long)IQ1_DBYTES(f, g0 + 4),
            (long long)IQ1_DBYTES(f, g0 + 3), (long long)IQ1_DBYTES(f, g0 + 2), (long long)IQ1_DBYTES(f, g0 + 1), (long long)IQ1_DBYTES(f, g0));
        u[q] = _mm512_add_epi8(_mm512_slli_epi16(_mm512_add_epi8(g, one), 3), dl);
        const int16_t *l = f->ls + 4 * q;
        ls[q] = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_setr_m128i(_mm_set1_epi16(l[0]), _mm_set1_epi16(l[1]))),
            _mm256_setr_m128i(_mm_set1_epi16(l[2]), _mm_set1_epi16(l[3])), 1);
    }
    *c9 = _mm256_mullo_epi16(_mm256_loadu_si256((const __m256i *)f->ls), _mm256_set1_epi16(9));
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

#define IQ1_DOT(type, FIELDS_D)                                                                               \
    INLINE void dot_##type##_t(int n, const block_##type *x, const hk2_arow *a, const int NA, float *s) {      \
        __m512 acc[HK2_MAX_NA];                                                                               \
        for (int j = 0; j < NA; j++) acc[j] = _mm512_setzero_ps();                                            \
        for (int b = 0; b < n / HK2_QK_K; b++) {                                                              \
            PREFETCH(x + b);                                                                                  \
            iq1_fields f;                                                                                     \
            const float dw = 0.125f * (FIELDS_D);                                                             \
            __m512i u[4], ls[4];                                                                              \
            __m256i c9;                                                                                       \
            iq1_unpack(&f, u, ls, &c9);                                                                       \
            for (int j = 0; j < NA; j++) {                                                                    \
                const __m512i p = iq1_block_dot(u, ls, c9, a[j].qs + HK2_QK_K * b, a[j].bs + 16 * b);         \
                acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(dw * a[j].d[b]), _mm512_cvtepi32_ps(p), acc[j]);      \
            }                                                                                                 \
        }                                                                                                     \
        for (int j = 0; j < NA; j++) s[j] = _mm512_reduce_add_ps(acc[j]);                                     \
    }
IQ1_DOT(iq1_s, (iq1_s_fields(x + b, &f), F16(x[b].d)))
IQ1_DOT(iq1_m, iq1_m_fields(x + b, &f))

#define DOT_ENTRY(name, btype)                                                                 \
    void hk2_##name##_avx512vnni(int n, const void *w, const hk2_arow *a, int na, float *s) { \
        switch (na) {                                                                          \
        case 1: name##_t(n, (const btype *)w, a, 1, s); break;                                 \
        case 2: name##_t(n, (const btype *)w, a, 2, s); break;                                 \
        case 3: name##_t(n, (const btype *)w, a, 3, s); break;                                 \
        default: name##_t(n, (const btype *)w, a, 4, s); break;                                \
        }                                                                                      \
    }
DOT_ENTRY(dot_iq1_s, block_iq1_s)
DOT_ENTRY(dot_iq1_m, block_iq1_m)

#if !defined(HK2_USE_SIMDE) && defined(__clang__)
#pragma clang attribute pop
#endif
