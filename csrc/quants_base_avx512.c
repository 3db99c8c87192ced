/* Q4_0 Q8_0 Q4_K Q6_K Q4_0_R8: AVX-512 (F/BW/VL) dot kernels (hk2_dot_<type>_avx512vnni and _avx512bw, listed
 * in quants_base.c's table), two 32-value blocks or one 64-value chunk per 512-bit vector. Compiled twice: here
 * with VNNI (one vpdpbusd for the u8 x s8 sums) and, through quants_base_avx512bw.c, with HK2_AVX512_VNNI 0
 * (maddubs + madd). */
#include "hk2_target_avx512.h"

#define f16(h) hk2_fp16_to_fp32(h)

/* sum of 4 adjacent products of unsigned u and signed s bytes, as int32 lanes */
INLINE __m512i dp_u8s8(__m512i u, __m512i s) {
#if HK2_AVX512_VNNI
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s);
#else
    return _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
#endif
}
INLINE __m256i dp_u8s8_256(__m256i u, __m256i s) {
#if HK2_AVX512_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
INLINE __m512i cat256(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }
/* [a x8, b x8] */
INLINE __m512 two_scales(float a, float b) { return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a), _mm512_set1_ps(b)); }

/* ---------------- Q4_0: sum (q-8)*y = sum q*y - sum 8*y ---------------- */
INLINE void dot_q4_0_t(int n, const block_q4_0 *x, const hk2_arow *a, const int NA, float *s) {
    __m512 acc[HK2_MAX_NA];
    __m256 acc2[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) { acc[j] = _mm512_setzero_ps(); acc2[j] = _mm256_setzero_ps(); }
    const __m512i m8 = _mm512_set1_epi8(8);
    const int nb = n / HK2_QK;
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        PREFETCH(x + b);
        PREFETCH(x + b + 1);
        const __m512i q = cat256(nibbles(x[b].qs), nibbles(x[b + 1].qs));
        const float d0 = f16(x[b].d), d1 = f16(x[b + 1].d);
        for (int j = 0; j < NA; j++) {
            const __m512i y = _mm512_loadu_si512((const void *)(a[j].qs + HK2_QK * b));
            const __m512i p = _mm512_sub_epi32(dp_u8s8(q, y), dp_u8s8(m8, y));
            acc[j] = _mm512_fmadd_ps(two_scales(d0 * a[j].d[b], d1 * a[j].d[b + 1]), _mm512_cvtepi32_ps(p), acc[j]);
        }
    }
    if (b < nb) {
        const __m256i q = nibbles(x[b].qs);
        const float d0 = f16(x[b].d);
        for (int j = 0; j < NA; j++) {
            const __m256i y = _mm256_loadu_si256((const __m256i *)(a[j].qs + HK2_QK * b));
            const __m256i p = _mm256_sub_epi32(dp_u8s8_256(q, y), dp_u8s8_256(_mm256_set1_epi8(8), y));
            acc2[j] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * a[j].d[b]), _mm256_cvtepi32_ps(p), acc2[j]);
        }
    }
    for (int j = 0; j < NA; j++) s[j] = _mm512_reduce_add_ps(acc[j]) + hsum_ps(acc2[j]);
}

/* ---------------- Q8_0: |w| x (y with w's sign) ---------------- */
INLINE void dot_q8_0_t(int n, const block_q8_0 *x, const hk2_arow *a, const int NA, float *s) {
    __m512 acc[HK2_MAX_NA];
    __m256 acc2[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) { acc[j] = _mm512_setzero_ps(); acc2[j] = _mm256_setzero_ps(); }
    const int nb = n / HK2_QK;
    const __m512i pair_idx = _mm512_mask_blend_epi32(0xFF00, _mm512_setzero_si512(), _mm512_set1_epi32(1));
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        PREFETCH(x + b);
        PREFETCH(x + b + 1);
        const __m512i w = cat256(_mm256_loadu_si256((const __m256i *)x[b].qs), _mm256_loadu_si256((const __m256i *)x[b + 1].qs));
        const __m512i aw = _mm512_abs_epi8(w);
        const __mmask64 neg = _mm512_movepi8_mask(w);
        const __m512 dw = two_scales(f16(x[b].d), f16(x[b + 1].d));
        for (int j = 0; j < NA; j++) {
            const __m512i y = _mm512_loadu_si512((const void *)(a[j].qs + HK2_QK * b));
            const __m512i sy = _mm512_mask_sub_epi8(y, neg, _mm512_setzero_si512(), y);
            /* [d_a[b] x8, d_a[b+1] x8] by one 8-byte load and one permute (not two broadcasts and a blend) */
            const __m512 da = _mm512_permutexvar_ps(pair_idx, _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(a[j].d + b)))));
            acc[j] = _mm512_fmadd_ps(_mm512_mul_ps(dw, da), _mm512_cvtepi32_ps(dp_u8s8(aw, sy)), acc[j]);
        }
    }
    if (b < nb) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const __m256i aw = _mm256_abs_epi8(w);
        const float d0 = f16(x[b].d);
        for (int j = 0; j < NA; j++) {
            const __m256i y = _mm256_loadu_si256((const __m256i *)(a[j].qs + HK2_QK * b));
            const __m256i p = dp_u8s8_256(aw, _mm256_sign_epi8(y, w));
            acc2[j] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * a[j].d[b]), _mm256_cvtepi32_ps(p), acc2[j]);
        }
    }
    for (int j = 0; j < NA; j++) s[j] = _mm512_reduce_add_ps(acc[j]) + hsum_ps(acc2[j]);
}

/* ---------------- Q4_K: one 64-value chunk (two 32-value sub-blocks) per vector ---------------- */
INLINE void dot_q4_K_t(int n, const block_q4_K *x, const hk2_arow *a, const int NA, float *s) {
    __m512 acc[HK2_MAX_NA];
    float accm[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) { acc[j] = _mm512_setzero_ps(); accm[j] = 0.0f; }
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        for (size_t o = 0; o < sizeof x[b]; o += 64) PREFETCH((const uint8_t *)(x + b) + o);
        uint32_t u[4];
        q4_K_unpack_scales(x[b].scales, u);
        const uint8_t *sc = (const uint8_t *)u;
        const __m128i mins = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)u[3], (int)u[2]));
        const float dw = f16(x[b].d), dmin = f16(x[b].dmin);
        __m512i sumi[HK2_MAX_NA];
        for (int j = 0; j < NA; j++) {
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(a[j].bs + 16 * b));
            const __m128i bs32 = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
            const __m128i pm = _mm_madd_epi16(mins, bs32);
            const __m128i pm2 = _mm_add_epi32(pm, _mm_shuffle_epi32(pm, 0x4E));
            accm[j] += dmin * a[j].d[b] * (float)_mm_cvtsi128_si32(_mm_add_epi32(pm2, _mm_shuffle_epi32(pm2, 0xB1)));
            sumi[j] = _mm512_setzero_si512();
        }
        for (int c = 0; c < HK2_QK_K / 64; c++) {
            const __m256i q4 = _mm256_loadu_si256((const __m256i *)(x[b].qs + 32 * c));
            const __m512i q = cat256(_mm256_and_si256(q4, m4), _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4));
            const __m512i scv = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(sc[2 * c]), _mm512_set1_epi32(sc[2 * c + 1]));
            for (int j = 0; j < NA; j++) {
                const __m512i y = _mm512_loadu_si512((const void *)(a[j].qs + HK2_QK_K * b + 64 * c));
                sumi[j] = _mm512_add_epi32(sumi[j], _mm512_mullo_epi32(dp_u8s8(q, y), scv));
            }
        }
        for (int j = 0; j < NA; j++)
            acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(dw * a[j].d[b]), _mm512_cvtepi32_ps(sumi[j]), acc[j]);
    }
    for (int j = 0; j < NA; j++) s[j] = _mm512_reduce_add_ps(acc[j]) - accm[j];
}

/* ---------------- Q6_K: 64 values (four 16-value sub-blocks) per vector ---------------- */
INLINE void dot_q6_K_t(int n, const block_q6_K *x, const hk2_arow *a, const int NA, float *s) {
    __m512 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m256i m3 = _mm256_set1_epi8(0x03);
    /* byte i of ctrl[k] = 4k + i/4: each int32 lane of a quarter gets its sub-block's scale */
    const __m128i ctrl0 = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        for (size_t o = 0; o < sizeof x[b]; o += 64) PREFETCH((const uint8_t *)(x + b) + o);
        const uint8_t *ql = x[b].ql, *qh = x[b].qh;
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)x[b].scales);
        const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
        const float dw = f16(x[b].d);
        __m512i sumi[HK2_MAX_NA];
        for (int j = 0; j < NA; j++) {
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(a[j].bs + 16 * b));
            const __m512i off = _mm512_zextsi256_si512(_mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));
            sumi[j] = _mm512_sub_epi32(_mm512_setzero_si512(), off);
        }
        for (int h = 0; h < 2; h++, ql += 64, qh += 32) {
            const __m512i l = _mm512_loadu_si512((const void *)ql);
            const __m256i hb = _mm256_loadu_si256((const __m256i *)qh);
            const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4);
            const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m3), 4);
            const __m256i h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m3), 4);
            const __m256i h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m3), 4);
            /* values 0..63 of this half, then 64..127 */
            const __m512i qlo = _mm512_or_si512(_mm512_and_si512(l, m4), cat256(h0, h1));
            const __m512i qhi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m4), cat256(h2, h3));
            const __m512i sclo = _mm512_cvtepi8_epi32(_mm_shuffle_epi8(sc8, _mm_add_epi8(ctrl0, _mm_set1_epi8((char)(8 * h)))));
            const __m512i schi = _mm512_cvtepi8_epi32(_mm_shuffle_epi8(sc8, _mm_add_epi8(ctrl0, _mm_set1_epi8((char)(8 * h + 4)))));
            for (int j = 0; j < NA; j++) {
                const int8_t *y = a[j].qs + HK2_QK_K * b + 128 * h;
                const __m512i plo = _mm512_mullo_epi32(dp_u8s8(qlo, _mm512_loadu_si512((const void *)y)), sclo);
                const __m512i phi = _mm512_mullo_epi32(dp_u8s8(qhi, _mm512_loadu_si512((const void *)(y + 64))), schi);
                sumi[j] = _mm512_add_epi32(sumi[j], _mm512_add_epi32(plo, phi));
            }
        }
        for (int j = 0; j < NA; j++)
            acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(dw * a[j].d[b]), _mm512_cvtepi32_ps(sumi[j]), acc[j]);
    }
    for (int j = 0; j < NA; j++) s[j] = _mm512_reduce_add_ps(acc[j]);
}

/* ---------------- Q4_0_R8 (8 rows per pass, lane r = row r; see quants_base_avx2.c) ----------------
 * With VNNI one vpdpbusd per run replaces maddubs + add (and the int16 bound); without it the
 * AVX2 kernel is already the best fit, as the 8 rows fill exactly one 256-bit vector. */
#if HK2_AVX512_VNNI
INLINE void dot_q4_0_r8_t(int n, const block_q4_0x8 *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const int nb = n / HK2_QK;
    for (int b = 0; b < nb; b++) {
        PREFETCH(x + b);
        PREFETCH((const uint8_t *)(x + b) + 64);
        PREFETCH((const uint8_t *)(x + b) + 128);
        __m256i lo[4], hi[4];
        for (int c = 0; c < 4; c++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(x[b].qs + 32 * c));
            lo[c] = _mm256_and_si256(raw, m4);
            hi[c] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
        }
        const __m256 dw = fp16x8(x[b].d);
        for (int j = 0; j < NA; j++) {
            const int8_t *y = a[j].qs + HK2_QK * b;
            __m256i sum = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                int32_t ylo, yhi;
                memcpy(&ylo, y + 4 * c, 4);
                memcpy(&yhi, y + 16 + 4 * c, 4);
                sum = _mm256_dpbusd_epi32(sum, lo[c], _mm256_set1_epi32(ylo));
                sum = _mm256_dpbusd_epi32(sum, hi[c], _mm256_set1_epi32(yhi));
            }
            const __m256 g = _mm256_fmsub_ps(_mm256_set1_ps(a[j].d[b]), _mm256_cvtepi32_ps(sum), _mm256_set1_ps(a[j].m8[b]));
            acc[j] = _mm256_fmadd_ps(dw, g, acc[j]);
        }
    }
    for (int j = 0; j < NA; j++) _mm256_storeu_ps(s + HK2_R8 * j, acc[j]);
}
#endif

/* Q8_0: up to 8 activation rows per call (its table entry's max_na) */
HK2_DOT_ENTRY(q4_0, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(q8_0, HK2_NA_SWITCH8)
HK2_DOT_ENTRY(q4_K, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(q6_K, HK2_NA_SWITCH4)
#if HK2_AVX512_VNNI
HK2_DOT_ENTRY(q4_0_r8, HK2_NA_SWITCH4)
#endif

#include "hk2_target_end.h"
