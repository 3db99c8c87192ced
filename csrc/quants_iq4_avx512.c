/* IQ4_NL IQ4_XS: AVX-512 (F/BW/VL + VNNI) dot kernels (hk2_dot_<type>_avx512vnni, listed in quants_iq4.c's
 * table for the avx512vnni level). With HK2_USE_SIMDE the same code builds against SIMDe's portable
 * AVX-512 so it is tested on CPUs without AVX-512. */
#include "hk2_target_avx512.h"

extern const int8_t hk2_iq4_values[16];

/* |level| of each 4-bit index, in every 128-bit lane (pshufb looks up within lanes) */
INLINE __m512i abs_levels(void) {
    return _mm512_broadcast_i32x4(_mm_abs_epi8(_mm_loadu_si128((const __m128i *)hk2_iq4_values)));
}
/* 64 packed bytes = 4 (sub-)blocks of 16 -> two vectors of 4-bit indices in value order:
 * v[0] = [lo 0 | hi 0 | lo 1 | hi 1], v[1] = [lo 2 | hi 2 | lo 3 | hi 3] (lo = values 0..15, hi = 16..31) */
INLINE void indices4(__m512i raw, __m512i v[2]) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i lo = _mm512_and_si512(raw, m4), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
    v[0] = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), hi);
    v[1] = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), hi);
}
/* the weights of one index vector as |level| bytes and the mask of the negative ones (indices 0..7) */
INLINE __m512i unsigned_levels(__m512i idx, __m512i tab, __mmask64 *neg) {
    *neg = ~_mm512_test_epi8_mask(idx, _mm512_set1_epi8(8));
    return _mm512_shuffle_epi8(tab, idx);
}
/* y with the weights' signs */
INLINE __m512i signed_y(const int8_t *y, __mmask64 neg) {
    const __m512i v = _mm512_loadu_si512((const void *)y);
    return _mm512_mask_sub_epi8(v, neg, _mm512_setzero_si512(), v);
}

/* ---------------- IQ4_NL: four blocks per step, one vpdpbusd per 64 values and row ---------------- */
#define NL_BYTES 18
INLINE void dot_iq4_nl_t(int n, const uint8_t *x, const hk2_arow *a, const int NA, float *s) {
    __m512 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm512_setzero_ps();
    const __m512i tab = abs_levels();
    const __m512i lo8 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i hi8 = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const int nb = n / 32;
    int b = 0;
    for (; b + 3 < nb; b += 4) {
        const uint8_t *blk = x + (size_t)NL_BYTES * b;
        PREFETCH(blk);
        PREFETCH(blk + 64);
        __mmask64 n0, n1;
        const __m512i w0 = unsigned_levels(nibbles2(blk + 2, blk + NL_BYTES + 2), tab, &n0);
        const __m512i w1 = unsigned_levels(nibbles2(blk + 2 * NL_BYTES + 2, blk + 3 * NL_BYTES + 2), tab, &n1);
        const __m128 dw = four_halves(blk, NL_BYTES);
        for (int j = 0; j < NA; j++) {
            const int8_t *y = a[j].qs + 32 * b;
            const __m512i p0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0, signed_y(y, n0));
            const __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w1, signed_y(y + 64, n1));
            const __m512 sc = _mm512_castps128_ps512(_mm_mul_ps(dw, _mm_loadu_ps(a[j].d + b)));
            acc[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(lo8, sc), _mm512_cvtepi32_ps(p0), acc[j]);
            acc[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(hi8, sc), _mm512_cvtepi32_ps(p1), acc[j]);
        }
    }
    float tail[HK2_MAX_NA] = {0};
    for (; b < nb; b++) {  /* up to three blocks left: the integer sums in plain C */
        const uint8_t *blk = x + (size_t)NL_BYTES * b, *qs = blk + 2;
        const float dw = half_at(blk);
        for (int j = 0; j < NA; j++) {
            const int8_t *y = a[j].qs + 32 * b;
            int sumi = 0;
            for (int l = 0; l < 16; l++)
                sumi += hk2_iq4_values[qs[l] & 0xF] * y[l] + hk2_iq4_values[qs[l] >> 4] * y[l + 16];
            tail[j] += dw * a[j].d[b] * (float)sumi;
        }
    }
    for (int j = 0; j < NA; j++) s[j] = _mm512_reduce_add_ps(acc[j]) + tail[j];
}

/* ---------------- IQ4_XS: one 256-value super-block per step ----------------
 * The 128 index bytes unpack into four vectors of 64 values in activation order, two sub-blocks each.
 * Per row: maddubs |w| x signed y -> int16 pairs (<= 2 * 127 * 127), then vpdpwssd multiplies them by
 * the sub-block scale (int16 lanes [ls 2k x16 | ls 2k+1 x16]) and accumulates in int32, so the whole
 * super-block is one int32 vector and one FMA with d * d_a. */
#define XS_BYTES 136
/* the eight 6-bit scales minus 32 as int16: low nibbles spread from scales_l, high bit pairs from scales_h */
INLINE __m128i xs_scales(const uint8_t *blk) {
    uint32_t l4;
    uint16_t h2;
    memcpy(&h2, blk + 2, 2);
    memcpy(&l4, blk + 4, 4);
    uint64_t lo = l4;  /* nibble i -> byte i */
    lo = (lo | lo << 16) & 0x0000FFFF0000FFFFull;
    lo = (lo | lo << 8) & 0x00FF00FF00FF00FFull;
    lo = (lo | lo << 4) & 0x0F0F0F0F0F0F0F0Full;
    uint64_t hi = h2;  /* bit pair i -> bits 4..5 of byte i */
    hi = (hi | hi << 24) & 0x000000FF000000FFull;
    hi = (hi | hi << 12) & 0x000F000F000F000Full;
    hi = (hi | hi << 6) & 0x0303030303030303ull;
    const __m128i u = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)(lo | hi << 4)));
    return _mm_sub_epi16(u, _mm_set1_epi16(32));
}
INLINE void dot_iq4_xs_t(int n, const uint8_t *x, const hk2_arow *a, const int NA, float *s) {
    __m512 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm512_setzero_ps();
    const __m512i tab = abs_levels();
    /* vpermw control: words 0..15 take scale 2k, words 16..31 scale 2k+1 */
    const __m512i sidx = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_setzero_si512(), _mm512_set1_epi16(1));
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = x + (size_t)XS_BYTES * b;
        PREFETCH(blk);
        PREFETCH(blk + 64);
        PREFETCH(blk + XS_BYTES - 1);
        const __m512i ls = _mm512_castsi128_si512(xs_scales(blk));
        __m512i idx[4], w[4], sc[4];
        __mmask64 neg[4];
        indices4(_mm512_loadu_si512((const void *)(blk + 8)), idx);
        indices4(_mm512_loadu_si512((const void *)(blk + 72)), idx + 2);
        for (int k = 0; k < 4; k++) {
            w[k] = unsigned_levels(idx[k], tab, &neg[k]);
            sc[k] = _mm512_permutexvar_epi16(_mm512_add_epi16(sidx, _mm512_set1_epi16((short)(2 * k))), ls);
        }
        const float dw = half_at(blk);
        for (int j = 0; j < NA; j++) {
            const int8_t *y = a[j].qs + HK2_QK_K * b;
            __m512i sumi = _mm512_setzero_si512();
            for (int k = 0; k < 4; k++)
                sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(w[k], signed_y(y + 64 * k, neg[k])), sc[k]);
            acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(dw * a[j].d[b]), _mm512_cvtepi32_ps(sumi), acc[j]);
        }
    }
    for (int j = 0; j < NA; j++) s[j] = _mm512_reduce_add_ps(acc[j]);
}

/* ---------------- IQ4_XS_R8: 8 rows per pass (layout: csrc/hk2.h) ----------------
 * 64 bytes = run k of sub-block ib of all 8 rows; int32 lane 2r + h = row r's bytes 4h..4h+3 of the run, so one
 * broadcast qword of activations feeds every lane. The levels go in as unsigned bytes (level + 128) against the
 * signed activations in vpdpbusd; each sub-block's sums start at -128 * (its activation sum) / 2 per lane (the
 * two lanes of a row add up later), then take the row's scale (vpmulld) into the super-block's int32 sums:
 * one FMA with d * d_a per super-block. Per lane and sub-block |sum| <= 16 * 241 * 127 + 64 * 4064. */
#define XS8_BYTES (8 * 138)
INLINE void dot_iq4_xs_r8_t(int n, const uint8_t *x, const hk2_arow *a, const int NA, float *s) {
    __m512 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm512_setzero_ps();
    const __m512i tab = _mm512_broadcast_i32x4(
        _mm_xor_si128(_mm_loadu_si128((const __m128i *)hk2_iq4_values), _mm_set1_epi8((char)0x80)));
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m128i dup2 = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i dupd = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = x + (size_t)XS8_BYTES * b, *qs = blk + 80;
        __m512i sumi[HK2_MAX_NA];
        for (int j = 0; j < NA; j++) sumi[j] = _mm512_setzero_si512();
        for (int ib = 0; ib < 8; ib++) {
            const uint8_t *q = qs + 128 * ib;
            PREFETCH(q);
            PREFETCH(q + 64);
            const __m512i r0 = _mm512_loadu_si512((const void *)q), r1 = _mm512_loadu_si512((const void *)(q + 64));
            const __m512i lo0 = _mm512_shuffle_epi8(tab, _mm512_and_si512(r0, m4));
            const __m512i hi0 = _mm512_shuffle_epi8(tab, _mm512_and_si512(_mm512_srli_epi16(r0, 4), m4));
            const __m512i lo1 = _mm512_shuffle_epi8(tab, _mm512_and_si512(r1, m4));
            const __m512i hi1 = _mm512_shuffle_epi8(tab, _mm512_and_si512(_mm512_srli_epi16(r1, 4), m4));
            const __m512i sc = _mm512_cvtepi8_epi32(_mm_shuffle_epi8(_mm_loadl_epi64((const __m128i *)(blk + 16 + 8 * ib)), dup2));
            for (int j = 0; j < NA; j++) {
                const int8_t *y = a[j].qs + HK2_QK_K * b + 32 * ib;
                const int16_t *bs = a[j].bs + 16 * b + 2 * ib;
                long long y0, y1, y2, y3;
                memcpy(&y0, y, 8);
                memcpy(&y1, y + 8, 8);
                memcpy(&y2, y + 16, 8);
                memcpy(&y3, y + 24, 8);
                __m512i p = _mm512_set1_epi32(-64 * (bs[0] + bs[1]));
                p = _mm512_dpbusd_epi32(p, lo0, _mm512_set1_epi64(y0));
                p = _mm512_dpbusd_epi32(p, lo1, _mm512_set1_epi64(y1));
                p = _mm512_dpbusd_epi32(p, hi0, _mm512_set1_epi64(y2));
                p = _mm512_dpbusd_epi32(p, hi1, _mm512_set1_epi64(y3));
                sumi[j] = _mm512_add_epi32(sumi[j], _mm512_mullo_epi32(p, sc));
            }
        }
        const __m512 dw = _mm512_permutexvar_ps(dupd, _mm512_castps256_ps512(fp16x8(blk)));
        for (int j = 0; j < NA; j++)
            acc[j] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(a[j].d[b])), _mm512_cvtepi32_ps(sumi[j]), acc[j]);
    }
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int j = 0; j < NA; j++)  /* lanes 2r and 2r + 1: row r */
        _mm256_storeu_ps(s + HK2_R8 * j, _mm512_castps512_ps256(_mm512_add_ps(_mm512_permutexvar_ps(even, acc[j]),
                                                                              _mm512_permutexvar_ps(odd, acc[j]))));
}

HK2_DOT_ENTRY(iq4_nl, HK2_NA_SWITCH8)
HK2_DOT_ENTRY(iq4_xs, HK2_NA_SWITCH8)
HK2_DOT_ENTRY(iq4_xs_r8, HK2_NA_SWITCH8)

#include "hk2_target_end.h"
