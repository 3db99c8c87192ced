/* Q2_K Q3_K Q5_K: AVX-512 (F/BW/VL + VNNI) dot kernels (hk2_dot_<type>_avx512vnni, listed in quants_k.c's
 * table for the avx512vnni level). With HK2_USE_SIMDE the same code builds against SIMDe's portable
 * AVX-512 so it is tested on CPUs without AVX-512.
 * A super-block is four 64-value vectors in natural order (so the activations load straight from the
 * row), each unpacked with one variable shift and a mask from a 256-bit broadcast of the packed bits.
 * Scales are applied in the int domain: Q2_K multiplies them into the weight bytes (q * sc <= 45 fits
 * a byte, so one vpmullw does 64 products) and needs one vpdpbusd per vector and row; Q3_K and Q5_K
 * take maddubs then vpdpwssd with the scales as int16. Mins come from the activations' 16-value sums;
 * one float FMA per super-block and row (the negated mins ride in the upper 8 lanes). */
#include "hk2_target_avx512.h"
#ifdef HK2_USE_SIMDE  /* SIMDe has no F16C */
#define f16(h) hk2_fp16_to_fp32(h)
#else
#define f16(h) _cvtsh_ss(h)
#endif

/* the block layouts of quants_k.c */
typedef struct { uint8_t scales[16]; uint8_t qs[64]; hk2_half d, dmin; } block_q2_K;
typedef struct { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; hk2_half d; } block_q3_K;
typedef struct { hk2_half d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } block_q5_K;
_Static_assert(sizeof(block_q2_K) == 84 && sizeof(block_q3_K) == 110 && sizeof(block_q5_K) == 176, "K layouts");

INLINE __m512i bcast256(const uint8_t *p) { return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p)); }
/* per-half shift counts for _mm512_srlv_epi32: lo in the low 256 bits, hi in the high */
INLINE __m512i counts(int lo, int hi) { return _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(lo), _mm512_set1_epi32(hi)); }
/* a byte-lane mask: bit lo in the low 32 bytes, bit hi in the high */
INLINE __m512i bits(int lo, int hi) { return _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi8((char)(1 << lo)), _mm512_set1_epi8((char)(1 << hi))); }
/* int16 lanes: w[i] = v16[base + i / ratio], i < 32 (the scales of the sub-blocks a vector covers) */
INLINE __m512i spread16(__m512i v16, int base, int ratio) {
    int16_t idx[32];
    for (int i = 0; i < 32; i++) idx[i] = (int16_t)(base + i / ratio);
    return _mm512_permutexvar_epi16(_mm512_loadu_si512((const void *)idx), v16);
}
/* [isum lanes 0..7 + 8..15 | m] as floats: the scaled sums beside the min sums */
INLINE __m512 with_mins(__m512i isum, __m256i m) {
    const __m256i i8 = _mm256_add_epi32(_mm512_castsi512_si256(isum), _mm512_extracti64x4_epi64(isum, 1));
    return _mm512_cvtepi32_ps(_mm512_inserti64x4(_mm512_castsi256_si512(i8), m, 1));
}
/* [d x8 | dmin x8] from the two adjacent fp16 fields (the min sums come negated) */
INLINE __m512 d_dmin(const hk2_half *p) {
#ifdef HK2_USE_SIMDE  /* SIMDe has no F16C */
    const __m128 v = _mm_setr_ps(f16(p[0]), f16(p[1]), 0.0f, 0.0f);
#else
    uint32_t u;
    memcpy(&u, p, 4);
    const __m128 v = _mm_cvtph_ps(_mm_cvtsi32_si128((int)u));
#endif
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), _mm512_castps128_ps512(v));
}

/* ---------------- Q2_K ---------------- */
INLINE void dot_q2_K_t(int n, const block_q2_K *x, const hk2_arow *a, const int NA, float *s) {
    __m512 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm512_setzero_ps();
    const __m512i m3 = _mm512_set1_epi8(3);
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m512i c01 = counts(0, 2), c23 = counts(4, 6);
    /* pshufb: 128-bit lane i of vector k takes scale byte 4k + i into the low byte of each word */
    __m512i sidx[4];
    for (int k = 0; k < 4; k++) {
        int8_t t[64];
        for (int i = 0; i < 64; i++) t[i] = (int8_t)(i % 2 ? -128 : 4 * k + i / 16);
        sidx[k] = _mm512_loadu_si512((const void *)t);
    }
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        PREFETCH(x + b);
        PREFETCH((const uint8_t *)(x + b) + 64);
        const __m512i lo = bcast256(x[b].qs), hi = bcast256(x[b].qs + 32);
        const __m128i raw = _mm_loadu_si128((const __m128i *)x[b].scales);
        const __m512i sc = _mm512_broadcast_i32x4(_mm_and_si128(raw, m4));
        const __m256i mins = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), m4)));
        /* values 64k .. 64k + 63, times their sub-block scale */
        __m512i w[4];
        w[0] = _mm512_and_si512(_mm512_srlv_epi32(lo, c01), m3);
        w[1] = _mm512_and_si512(_mm512_srlv_epi32(lo, c23), m3);
        w[2] = _mm512_and_si512(_mm512_srlv_epi32(hi, c01), m3);
        w[3] = _mm512_and_si512(_mm512_srlv_epi32(hi, c23), m3);
        for (int k = 0; k < 4; k++) w[k] = _mm512_mullo_epi16(w[k], _mm512_shuffle_epi8(sc, sidx[k]));
        const __m512 dd = d_dmin(&x[b].d);
        for (int j = 0; j < NA; j++) {
            const int8_t *y = a[j].qs + HK2_QK_K * b;
            __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_loadu_si512((const void *)y));
            isum = _mm512_dpbusd_epi32(isum, w[1], _mm512_loadu_si512((const void *)(y + 64)));
            isum = _mm512_dpbusd_epi32(isum, w[2], _mm512_loadu_si512((const void *)(y + 128)));
            isum = _mm512_dpbusd_epi32(isum, w[3], _mm512_loadu_si512((const void *)(y + 192)));
            const __m256i msum = _mm256_madd_epi16(mins, _mm256_loadu_si256((const __m256i *)(a[j].bs + 16 * b)));
            acc[j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(a[j].d[b]), dd), with_mins(isum, msum), acc[j]);
        }
    }
    for (int j = 0; j < NA; j++) s[j] = _mm512_reduce_add_ps(acc[j]);
}

/* ---------------- Q3_K: (q + 4) in 0..7, the -4 through the activation sums ---------------- */
INLINE void dot_q3_K_t(int n, const block_q3_K *x, const hk2_arow *a, const int NA, float *s) {
    __m512 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm512_setzero_ps();
    const __m512i m3 = _mm512_set1_epi8(3), four = _mm512_set1_epi8(4);
    const __m512i c01 = counts(0, 2), c23 = counts(4, 6);
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        PREFETCH(x + b);
        PREFETCH((const uint8_t *)(x + b) + 64);
        const __m512i lo = bcast256(x[b].qs), hi = bcast256(x[b].qs + 32), hm = bcast256(x[b].hmask);
        const __m256i sc16 = _mm256_cvtepi8_epi16(q3_K_scales_v(x[b].scales));
        const __m512i scz = _mm512_castsi256_si512(sc16);
        const __m256i scm4 = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(sc16, 2));  /* -4 sc */
        __m512i q[4], scw[4];
        q[0] = _mm512_and_si512(_mm512_srlv_epi32(lo, c01), m3);
        q[1] = _mm512_and_si512(_mm512_srlv_epi32(lo, c23), m3);
        q[2] = _mm512_and_si512(_mm512_srlv_epi32(hi, c01), m3);
        q[3] = _mm512_and_si512(_mm512_srlv_epi32(hi, c23), m3);
        for (int k = 0; k < 4; k++) {  /* value 32j + l has its third bit at bit j of hmask[l] */
            q[k] = _mm512_mask_add_epi8(q[k], _mm512_test_epi8_mask(hm, bits(2 * k, 2 * k + 1)), q[k], four);
            scw[k] = spread16(scz, 4 * k, 8);
        }
        const float dw = f16(x[b].d);
        for (int j = 0; j < NA; j++) {
            const int8_t *y = a[j].qs + HK2_QK_K * b;
            __m512i isum = _mm512_zextsi256_si512(_mm256_madd_epi16(scm4, _mm256_loadu_si256((const __m256i *)(a[j].bs + 16 * b))));
            for (int k = 0; k < 4; k++)
                isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(q[k], _mm512_loadu_si512((const void *)(y + 64 * k))), scw[k]);
            acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(dw * a[j].d[b]), _mm512_cvtepi32_ps(isum), acc[j]);
        }
    }
    for (int j = 0; j < NA; j++) s[j] = _mm512_reduce_add_ps(acc[j]);
}

/* ---------------- Q5_K ---------------- */
INLINE void dot_q5_K_t(int n, const block_q5_K *x, const hk2_arow *a, const int NA, float *s) {
    __m512 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16);
    const __m512i c04 = counts(0, 4);
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        for (size_t o = 0; o < sizeof x[b]; o += 64) PREFETCH((const uint8_t *)(x + b) + o);
        uint32_t u[4];
        q4_K_unpack_scales(x[b].scales, u);
        const __m512i scz = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)u[1], (int)u[0])));
        const __m128i m8 = _mm_set_epi32(0, 0, (int)u[3], (int)u[2]);
        /* -m_j for bs 2j and 2j + 1 */
        const __m256i mins = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8)));
        const __m512i qh = bcast256(x[b].qh);
        __m512i q[4], scw[4];
        for (int c = 0; c < 4; c++) {  /* values 64c .. 64c + 63: sub-blocks 2c, 2c + 1 */
            const __m512i v = _mm512_and_si512(_mm512_srlv_epi32(bcast256(x[b].qs + 32 * c), c04), m4);
            q[c] = _mm512_mask_add_epi8(v, _mm512_test_epi8_mask(qh, bits(2 * c, 2 * c + 1)), v, sixteen);
            scw[c] = spread16(scz, 2 * c, 16);
        }
        const __m512 dd = d_dmin(&x[b].d);
        for (int j = 0; j < NA; j++) {
            const int8_t *y = a[j].qs + HK2_QK_K * b;
            __m512i isum = _mm512_setzero_si512();
            for (int c = 0; c < 4; c++)
                isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(q[c], _mm512_loadu_si512((const void *)(y + 64 * c))), scw[c]);
            const __m256i msum = _mm256_madd_epi16(mins, _mm256_loadu_si256((const __m256i *)(a[j].bs + 16 * b)));
            acc[j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(a[j].d[b]), dd), with_mins(isum, msum), acc[j]);
        }
    }
    for (int j = 0; j < NA; j++) s[j] = _mm512_reduce_add_ps(acc[j]);
}

HK2_DOT_ENTRY(q2_K, HK2_NA_SWITCH8)
HK2_DOT_ENTRY(q3_K, HK2_NA_SWITCH8)
HK2_DOT_ENTRY(q5_K, HK2_NA_SWITCH8)

#include "hk2_target_end.h"
