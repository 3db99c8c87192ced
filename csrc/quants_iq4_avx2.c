/* IQ4_NL IQ4_XS: AVX2 dot kernels (hk2_dot_<type>_avx2, listed in quants_iq4.c's table).
 * A 32-value (sub-)block per 256-bit vector: the nibbles [low (values 0..15) | high (16..31)] look up their
 * int8 levels with one pshufb, then |w| x (y with w's sign) through maddubs (|w| <= 127, so the int16 pairs
 * cannot saturate) and madd: with ones for IQ4_NL (one FMA per block), with the sub-block scale for IQ4_XS
 * (int32 sums over the super-block, one FMA per super-block). */
#include "hk2_target_avx2.h"

extern const int8_t hk2_iq4_values[16];

INLINE __m256i levels_table(void) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)hk2_iq4_values));
}
/* |w| y_signed pairs of a block whose int8 levels are w */
INLINE __m256i pairs(__m256i w, const int8_t *y) {
    return _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)y), w));
}

#define NL_BYTES 18
INLINE void dot_iq4_nl_t(int n, const uint8_t *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    const __m256i tab = levels_table(), ones = _mm256_set1_epi16(1);
    const int nb = n / 32;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = x + (size_t)NL_BYTES * b;
        PREFETCH(blk);
        const __m256i w = _mm256_shuffle_epi8(tab, nibbles(blk + 2));
        const float dw = half_at(blk);
        for (int j = 0; j < NA; j++) {
            const __m256i p = _mm256_madd_epi16(pairs(w, a[j].qs + 32 * b), ones);
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[j].d[b]), _mm256_cvtepi32_ps(p), acc[j]);
        }
    }
    for (int j = 0; j < NA; j++) s[j] = hsum_ps(acc[j]);
}

#define XS_BYTES 136
INLINE void dot_iq4_xs_t(int n, const uint8_t *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    const __m256i tab = levels_table();
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = x + (size_t)XS_BYTES * b;
        PREFETCH(blk);
        PREFETCH(blk + 64);
        PREFETCH(blk + XS_BYTES - 1);
        uint16_t sh;
        memcpy(&sh, blk + 2, 2);
        const uint8_t *sl = blk + 4, *qs = blk + 8;
        __m256i sumi[HK2_MAX_NA];
        for (int j = 0; j < NA; j++) sumi[j] = _mm256_setzero_si256();
        for (int ib = 0; ib < 8; ib++) {
            const int ls = (((sl[ib / 2] >> 4 * (ib % 2)) & 0xF) | ((sh >> 2 * ib) & 3) << 4) - 32;
            const __m256i sc = _mm256_set1_epi16((short)ls);
            const __m256i w = _mm256_shuffle_epi8(tab, nibbles(qs + 16 * ib));
            for (int j = 0; j < NA; j++)
                sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(pairs(w, a[j].qs + HK2_QK_K * b + 32 * ib), sc));
        }
        const float dw = half_at(blk);
        for (int j = 0; j < NA; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[j].d[b]), _mm256_cvtepi32_ps(sumi[j]), acc[j]);
    }
    for (int j = 0; j < NA; j++) s[j] = hsum_ps(acc[j]);
}

/* ---------------- IQ4_XS_R8: 8 rows per pass (layout: csrc/hk2.h) ----------------
 * 32 bytes = run k of sub-block ib of 4 rows (rows 0..3, then 4..7 at +32); int32 lane 2r + h = row r's bytes
 * 4h..4h+3, so one broadcast qword of activations feeds every lane. |w| x (y with w's sign) through maddubs,
 * then madd with the row's sub-block scale in both int16 halves of its lanes: int32 sums per super-block,
 * one FMA with d * d_a. */
#define XS8_BYTES (8 * 138)
INLINE void dot_iq4_xs_r8_t(int n, const uint8_t *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[2][HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[0][j] = acc[1][j] = _mm256_setzero_ps();
    const __m256i tab = levels_table(), atab = _mm256_abs_epi8(tab), m4 = _mm256_set1_epi8(0x0F);
    const __m128i dup4[2] = {_mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                             _mm_setr_epi8(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7)};
    const __m256i dupd[2] = {_mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)};
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = x + (size_t)XS8_BYTES * b, *qs = blk + 80;
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        for (int hf = 0; hf < 2; hf++) {
            __m256i sumi[HK2_MAX_NA];
            for (int j = 0; j < NA; j++) sumi[j] = _mm256_setzero_si256();
            for (int ib = 0; ib < 8; ib++) {
                const uint8_t *q = qs + 128 * ib + 32 * hf;
                if (!hf) { PREFETCH(q); PREFETCH(q + 64); }
                const __m256i sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(_mm_loadl_epi64((const __m128i *)(blk + 16 + 8 * ib)), dup4[hf]));
                for (int k = 0; k < 2; k++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(q + 64 * k));
                    const __m256i il = _mm256_and_si256(raw, m4), ih = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                    const __m256i wl = _mm256_shuffle_epi8(tab, il), al = _mm256_shuffle_epi8(atab, il);
                    const __m256i wh = _mm256_shuffle_epi8(tab, ih), ah = _mm256_shuffle_epi8(atab, ih);
                    for (int j = 0; j < NA; j++) {
                        const int8_t *y = a[j].qs + HK2_QK_K * b + 32 * ib + 8 * k;
                        long long yl, yh;
                        memcpy(&yl, y, 8);
                        memcpy(&yh, y + 16, 8);
                        const __m256i pl = _mm256_maddubs_epi16(al, _mm256_sign_epi8(_mm256_set1_epi64x(yl), wl));
                        const __m256i ph = _mm256_maddubs_epi16(ah, _mm256_sign_epi8(_mm256_set1_epi64x(yh), wh));
                        sumi[j] = _mm256_add_epi32(sumi[j], _mm256_add_epi32(_mm256_madd_epi16(pl, sc), _mm256_madd_epi16(ph, sc)));
                    }
                }
            }
            const __m256 dw = _mm256_permutevar8x32_ps(d8, dupd[hf]);
            for (int j = 0; j < NA; j++)
                acc[hf][j] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(a[j].d[b])), _mm256_cvtepi32_ps(sumi[j]), acc[hf][j]);
        }
    }
    for (int j = 0; j < NA; j++)  /* hadd: [r0 r1 r4 r5 | r2 r3 r6 r7] */
        _mm256_storeu_ps(s + HK2_R8 * j, _mm256_castpd_ps(_mm256_permute4x64_pd(
                                             _mm256_castps_pd(_mm256_hadd_ps(acc[0][j], acc[1][j])), 0xD8)));
}

HK2_DOT_ENTRY(iq4_nl, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(iq4_xs, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(iq4_xs_r8, HK2_NA_SWITCH4)

#include "hk2_target_end.h"
