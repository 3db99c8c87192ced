/* Q4_0 Q8_0 Q4_K Q6_K Q4_0_R8 Q4_K_R8: AVX2 + FMA + F16C dot kernels (hk2_dot_<type>_avx2, listed in
 * quants_base.c's table). Integer dot products with _mm256_maddubs_epi16 (u8 x s8 -> s16 pairs) and
 * _mm256_madd_epi16 (-> s32); one fp32 FMA per Q8_0 block, per Q4_0 block pair and per K-quant super-block.
 * Weights are unpacked once per block and reused for up to HK2_MAX_NA activation rows (prefill tiles). As
 * llama.cpp's ggml-cpu x86 code, in our own arrangement. */
#include "hk2_target_avx2.h"

INLINE float hsum_ps128(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
INLINE float f16(hk2_half h) { return _cvtsh_ss(h); }
/* two floats into lanes 0 and 1 (an 8-byte load with no alignment requirement) */
INLINE __m128 load2f(const float *p) { return _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)p)); }

/* sum of 4 adjacent products of unsigned u and signed s bytes, as 8 int32 */
INLINE __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
/* u8 x s8 -> s16 pairs, then weighted by the int16 scales in sc -> 8 int32 */
INLINE __m256i dot_u8s8_scaled(__m256i u, __m256i s, __m256i sc) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), sc);
}
/* shuffle control: int16 word k of a broadcast 128-bit row in every lane */
INLINE __m256i word_ctrl(int k) { return _mm256_set1_epi16((short)(2 * k | (2 * k + 1) << 8)); }
/* shuffle control: lane 0 = int16 word 2c of a broadcast row, lane 1 = word 2c+1 */
INLINE __m256i pair_ctrl(int c) {
    const char lo0 = (char)(4 * c), lo1 = (char)(4 * c + 1), hi0 = (char)(4 * c + 2), hi1 = (char)(4 * c + 3);
    return _mm256_setr_epi8(lo0, lo1, lo0, lo1, lo0, lo1, lo0, lo1, lo0, lo1, lo0, lo1, lo0, lo1, lo0, lo1,
                            hi0, hi1, hi0, hi1, hi0, hi1, hi0, hi1, hi0, hi1, hi0, hi1, hi0, hi1, hi0, hi1);
}

/* ---------------- Q4_0 ---------------- */
/* A pair of blocks per step: one 256-bit load-and-shift yields [lo b | lo b+1] and [hi b | hi b+1],
 * multiplied against the activations in the same order (qp). The q - 8 offset is subtracted in
 * int16 (s8), so one madd, one convert and one FMA serve both blocks: int32 lanes 0-3 are block
 * b, lanes 4-7 block b+1, matched by the scale vector [s_b x4, s_b1 x4]. */
INLINE __m256 two_block_scales(__m128 dw01, const float *da) {
    const __m128 s = _mm_mul_ps(dw01, load2f(da));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}
/* fp16 scales of blocks b and b+1 (stride bytes apart) as floats in lanes 0 and 1 */
INLINE __m128 two_fp16(const hk2_half *d0, const hk2_half *d1) {
    return _mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)*d0 | ((uint32_t)*d1 << 16))));
}

INLINE void dot_q4_0_t(int n, const block_q4_0 *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc0[HK2_MAX_NA], acc1[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) { acc0[j] = _mm256_setzero_ps(); acc1[j] = _mm256_setzero_ps(); }
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const int nb = n / HK2_QK;
    int b = 0;
    for (; b + 3 < nb; b += 4) {  /* two pairs, one accumulator each */
        PREFETCH(x + b);
        PREFETCH(x + b + 2);
        __m256i lo[2], hi[2];
        __m128 dw[2];
        for (int p = 0; p < 2; p++) {
            const __m256i raw = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)x[b + 2 * p].qs)),
                                                        _mm_loadu_si128((const __m128i *)x[b + 2 * p + 1].qs), 1);
            lo[p] = _mm256_and_si256(raw, m4);
            hi[p] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            dw[p] = two_fp16(&x[b + 2 * p].d, &x[b + 2 * p + 1].d);
        }
        for (int j = 0; j < NA; j++) {
            for (int p = 0; p < 2; p++) {
                const int8_t *y = a[j].qp + HK2_QK * (b + 2 * p);
                __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(lo[p], _mm256_loadu_si256((const __m256i *)y)),
                                             _mm256_maddubs_epi16(hi[p], _mm256_loadu_si256((const __m256i *)(y + 32))));
                t = _mm256_sub_epi16(t, _mm256_loadu_si256((const __m256i *)(a[j].s8 + 8 * (b + 2 * p))));
                const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(t, ones));
                const __m256 sc = two_block_scales(dw[p], a[j].d + b + 2 * p);
                if (p == 0) acc0[j] = _mm256_fmadd_ps(sc, f, acc0[j]);
                else acc1[j] = _mm256_fmadd_ps(sc, f, acc1[j]);
            }
        }
    }
    for (; b < nb; b++) {  /* up to three blocks left, natural order */
        const __m256i q = nibbles(x[b].qs);
        const float dw = f16(x[b].d);
        for (int j = 0; j < NA; j++) {
            const __m256i y = _mm256_loadu_si256((const __m256i *)(a[j].qs + HK2_QK * b));
            const __m256i t = _mm256_sub_epi16(_mm256_maddubs_epi16(q, y), _mm256_maddubs_epi16(_mm256_set1_epi8(8), y));
            acc0[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[j].d[b]), _mm256_cvtepi32_ps(_mm256_madd_epi16(t, ones)), acc0[j]);
        }
    }
    for (int j = 0; j < NA; j++) s[j] = hsum_ps(_mm256_add_ps(acc0[j], acc1[j]));
}

/* ---------------- Q4_0_R8: 8 rows per pass, lane r = row r ----------------
 * Run c of the block holds 4 bytes of each row: its low nibbles meet activations 4c..4c+3 and
 * its high nibbles 16+4c..16+4c+3, broadcast to every lane, so no horizontal sums are needed.
 * The 8 u8 x s8 products per lane stay below 8 * 2 * 15 * 128 = 30720 in int16; the q - 8 offset
 * comes in as the activation's m8 term: per block acc += dw * (da * sum q*y - m8). */
INLINE void dot_q4_0_r8_t(int n, const block_q4_0x8 *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
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
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)x[b].d));
        for (int j = 0; j < NA; j++) {
            const int8_t *y = a[j].qs + HK2_QK * b;
            __m256i sum = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                int32_t ylo, yhi;
                memcpy(&ylo, y + 4 * c, 4);
                memcpy(&yhi, y + 16 + 4 * c, 4);
                sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(lo[c], _mm256_set1_epi32(ylo)));
                sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(hi[c], _mm256_set1_epi32(yhi)));
            }
            const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum, ones));
            const __m256 g = _mm256_fmsub_ps(_mm256_set1_ps(a[j].d[b]), f, _mm256_set1_ps(a[j].m8[b]));
            acc[j] = _mm256_fmadd_ps(dw, g, acc[j]);
        }
    }
    for (int j = 0; j < NA; j++) _mm256_storeu_ps(s + HK2_R8 * j, acc[j]);
}

/* ---------------- Q4_K_R8: 8 rows per pass, lane r = row r ----------------
 * Per 64-value chunk, run k holds 4 bytes of each row: low nibbles meet activations 4k..4k+3 (sub-block 2c),
 * high nibbles 32+4k.. (sub-block 2c+1), broadcast to every lane. 8 u8 x s8 pairs per int16 lane stay below
 * 8 * 2 * 15 * 128 = 30720; each sub-block's sums take its 6-bit scale per lane in one madd (pairs (sc, sc)),
 * the mins their activation sums the same way. Per super-block: acc += da * (d * sumi - dmin * summ). */
INLINE __m256i pairs16(const uint8_t *v8) {   /* 8 bytes -> 8 lanes of (v, v) as int16 pairs */
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)v8));
    return _mm256_or_si256(v, _mm256_slli_epi32(v, 16));
}

INLINE void dot_q4_K_r8_t(int n, const block_q4_Kx8 *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        const block_q4_Kx8 *xb = x + b;
        __m256i sumi[HK2_MAX_NA];
        for (int j = 0; j < NA; j++) sumi[j] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const uint8_t *q = xb->qs + 256 * c;
            for (int o = 0; o < 256; o += 64) PREFETCH(q + o);
            __m256i slo[HK2_MAX_NA], shi[HK2_MAX_NA];
            for (int j = 0; j < NA; j++) slo[j] = shi[j] = _mm256_setzero_si256();
            for (int k = 0; k < 8; k++) {   /* one run at a time: few registers live with NA tokens */
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(q + 32 * k));
                const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                for (int j = 0; j < NA; j++) {
                    const int8_t *y = a[j].qs + HK2_QK_K * b + 64 * c + 4 * k;
                    int32_t ylo, yhi;
                    memcpy(&ylo, y, 4);
                    memcpy(&yhi, y + 32, 4);
                    slo[j] = _mm256_add_epi16(slo[j], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(ylo)));
                    shi[j] = _mm256_add_epi16(shi[j], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(yhi)));
                }
            }
            const __m256i sc_lo = pairs16(xb->sc[2 * c]), sc_hi = pairs16(xb->sc[2 * c + 1]);
            for (int j = 0; j < NA; j++)
                sumi[j] = _mm256_add_epi32(sumi[j], _mm256_add_epi32(_mm256_madd_epi16(slo[j], sc_lo), _mm256_madd_epi16(shi[j], sc_hi)));
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)xb->d));
        const __m256 dm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)xb->dmin));
        for (int j = 0; j < NA; j++) {
            __m256i summ = _mm256_setzero_si256();   /* mins: m (per lane) x the sub-block's two 16-value sums */
            for (int sb = 0; sb < 8; sb++) {
                int32_t bs2;
                memcpy(&bs2, a[j].bs + 16 * b + 2 * sb, 4);
                summ = _mm256_add_epi32(summ, _mm256_madd_epi16(pairs16(xb->m[sb]), _mm256_set1_epi32(bs2)));
            }
            const __m256 g = _mm256_fmsub_ps(dw, _mm256_cvtepi32_ps(sumi[j]), _mm256_mul_ps(dm, _mm256_cvtepi32_ps(summ)));
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(a[j].d[b]), g, acc[j]);
        }
    }
    for (int j = 0; j < NA; j++) _mm256_storeu_ps(s + HK2_R8 * j, acc[j]);
}

/* ---------------- Q8_0 ---------------- */
INLINE __m256i q8_0_block_dot(__m256i w, __m256i y) {
    return dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w));  /* |w| x (y with w's sign) */
}

INLINE void dot_q8_0_t(int n, const block_q8_0 *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc0[HK2_MAX_NA], acc1[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) { acc0[j] = _mm256_setzero_ps(); acc1[j] = _mm256_setzero_ps(); }
    const __m256i bcast1 = _mm256_set1_epi32(1);
    const int nb = n / HK2_QK;
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        PREFETCH(x + b);
        PREFETCH(x + b + 1);
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)x[b + 1].qs);
        const __m128 dw = two_fp16(&x[b].d, &x[b + 1].d);
        for (int j = 0; j < NA; j++) {
            const int8_t *y = a[j].qs + HK2_QK * b;
            const __m256i p0 = q8_0_block_dot(w0, _mm256_loadu_si256((const __m256i *)y));
            const __m256i p1 = q8_0_block_dot(w1, _mm256_loadu_si256((const __m256i *)(y + HK2_QK)));
            const __m256 s01 = _mm256_castps128_ps256(_mm_mul_ps(dw, load2f(a[j].d + b)));
            acc0[j] = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm256_castps256_ps128(s01)), _mm256_cvtepi32_ps(p0), acc0[j]);
            acc1[j] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(s01, bcast1), _mm256_cvtepi32_ps(p1), acc1[j]);
        }
    }
    if (b < nb) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)x[b].qs);
        const float d0 = f16(x[b].d);
        for (int j = 0; j < NA; j++) {
            const __m256i p0 = q8_0_block_dot(w0, _mm256_loadu_si256((const __m256i *)(a[j].qs + HK2_QK * b)));
            acc0[j] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * a[j].d[b]), _mm256_cvtepi32_ps(p0), acc0[j]);
        }
    }
    for (int j = 0; j < NA; j++) s[j] = hsum_ps(_mm256_add_ps(acc0[j], acc1[j]));
}

/* ---------------- Q4_K ---------------- */
/* the 12 packed bytes -> scales (bytes 0..7) and mins (bytes 8..15) */
INLINE void dot_q4_K_t(int n, const block_q4_K *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    __m128 accm[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) { acc[j] = _mm256_setzero_ps(); accm[j] = _mm_setzero_ps(); }
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        for (size_t o = 0; o < sizeof x[b]; o += 64) PREFETCH((const uint8_t *)(x + b) + o);
        uint32_t u[4];
        q4_K_unpack_scales(x[b].scales, u);
        const __m128i sm = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)u[1], (int)u[0]));
        const __m128i mins = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)u[3], (int)u[2]));
        const __m256i sc = _mm256_broadcastsi128_si256(sm);
        const float dw = f16(x[b].d), dmin = f16(x[b].dmin);
        __m256i sumi[HK2_MAX_NA];
        for (int j = 0; j < NA; j++) {
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(a[j].bs + 16 * b));
            const __m128i bs32 = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
            const __m128i pm = _mm_madd_epi16(mins, bs32);
            accm[j] = _mm_fmadd_ps(_mm_set1_ps(dmin * a[j].d[b]), _mm_cvtepi32_ps(pm), accm[j]);
            sumi[j] = _mm256_setzero_si256();
        }
        for (int c = 0; c < HK2_QK_K / 64; c++) {
            const __m256i q4 = _mm256_loadu_si256((const __m256i *)(x[b].qs + 32 * c));
            const __m256i lo = _mm256_and_si256(q4, m4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
            const __m256i sc_lo = _mm256_shuffle_epi8(sc, word_ctrl(2 * c));  /* sc[2c] in every lane */
            const __m256i sc_hi = _mm256_shuffle_epi8(sc, word_ctrl(2 * c + 1));
            for (int j = 0; j < NA; j++) {
                const int8_t *y = a[j].qs + HK2_QK_K * b + 64 * c;
                const __m256i plo = dot_u8s8_scaled(lo, _mm256_loadu_si256((const __m256i *)y), sc_lo);
                const __m256i phi = dot_u8s8_scaled(hi, _mm256_loadu_si256((const __m256i *)(y + 32)), sc_hi);
                sumi[j] = _mm256_add_epi32(sumi[j], _mm256_add_epi32(plo, phi));
            }
        }
        for (int j = 0; j < NA; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[j].d[b]), _mm256_cvtepi32_ps(sumi[j]), acc[j]);
    }
    for (int j = 0; j < NA; j++) s[j] = hsum_ps(acc[j]) - hsum_ps128(accm[j]);
}

/* ---------------- Q6_K ---------------- */
/* 6-bit q = ql nibble | qh 2 bits << 4 (0..63); sum (q-32)*y*sc = sum q*y*sc - 32 * sum sc*bsum */
INLINE void dot_q6_K_t(int n, const block_q6_K *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(0x03);
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        for (size_t o = 0; o < sizeof x[b]; o += 64) PREFETCH((const uint8_t *)(x + b) + o);
        const uint8_t *ql = x[b].ql, *qh = x[b].qh;
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)x[b].scales));
        const float dw = f16(x[b].d);
        __m256i sumi[HK2_MAX_NA];
        for (int j = 0; j < NA; j++) {
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(a[j].bs + 16 * b));
            sumi[j] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5));
        }
        for (int h = 0; h < 2; h++, ql += 64, qh += 32) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            const __m256i hb = _mm256_loadu_si256((const __m256i *)qh);
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m3), 4));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m3), 4));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                   _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m3), 4));
            /* both lanes = scales of this half (8 int16); q[i] spans sub-blocks 8h+2i, 8h+2i+1 */
            const __m256i sch = h ? _mm256_permute4x64_epi64(sc16, 0xEE) : _mm256_permute4x64_epi64(sc16, 0x44);
            for (int i = 0; i < 4; i++) {
                const __m256i sci = _mm256_shuffle_epi8(sch, pair_ctrl(i));
                for (int j = 0; j < NA; j++) {
                    const int8_t *y = a[j].qs + HK2_QK_K * b + 128 * h + 32 * i;
                    sumi[j] = _mm256_add_epi32(sumi[j], dot_u8s8_scaled(q[i], _mm256_loadu_si256((const __m256i *)y), sci));
                }
            }
        }
        for (int j = 0; j < NA; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[j].d[b]), _mm256_cvtepi32_ps(sumi[j]), acc[j]);
    }
    for (int j = 0; j < NA; j++) s[j] = hsum_ps(acc[j]);
}

HK2_DOT_ENTRY(q4_0, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(q8_0, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(q4_K, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(q6_K, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(q4_0_r8, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(q4_K_r8, HK2_NA_SWITCH4)

#include "hk2_target_end.h"
