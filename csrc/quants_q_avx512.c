/* Q4_1 Q5_0 Q5_1: AVX-512 (F/BW/VL + VNNI) dot kernels (hk2_dot_<type>_avx512vnni, listed in quants_q.c's
 * table for the avx512vnni level). With HK2_USE_SIMDE the same code builds against SIMDe's portable
 * AVX-512 so it is tested on CPUs without AVX-512. */
#include "hk2_target_avx512.h"

enum { T_Q4_1, T_Q5_0, T_Q5_1 };
/* bytes per block, offset of qs, of qh (Q5) */
#define BLK_BYTES(T) ((T) == T_Q4_1 ? 20 : (T) == T_Q5_0 ? 22 : 24)
#define QS_OFF(T) ((T) == T_Q4_1 ? 4 : (T) == T_Q5_0 ? 6 : 8)
#define QH_OFF(T) ((T) == T_Q5_0 ? 2 : 4)

INLINE uint32_t u32_at(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Four blocks per step, two per 512-bit vector. Q4_1/Q5_1: q unsigned, one vpdpbusd per row and vector; Q5_0:
 * w = q - 16 is negative exactly where the fifth bit is 0, so |w| = the fifth bit ? nibble : 16 - nibble and y
 * takes w's sign under that mask. The four blocks' scales d * d_a are one 128-bit multiply; the min term
 * m * d_a * sum y of the four blocks goes into a 128-bit accumulator from the activation's 16-value sums. */
INLINE void dot_q_t(int n, const uint8_t *x, const hk2_arow *a, const int NA, float *s, const int T) {
    const int B = BLK_BYTES(T);
    __m512 acc[HK2_MAX_NA];
    __m128 accm[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) { acc[j] = _mm512_setzero_ps(); accm[j] = _mm_setzero_ps(); }
    const __m512i lo8 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i hi8 = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const int nb = n / 32;
    int b = 0;
    for (; b + 3 < nb; b += 4) {
        const uint8_t *b0 = x + (size_t)B * b;
        PREFETCH(b0);
        PREFETCH(b0 + 64);
        __m512i q[2];
        __mmask64 hb[2] = {0, 0};
        for (int h = 0; h < 2; h++) {
            const uint8_t *p0 = b0 + 2 * h * B, *p1 = p0 + B;
            q[h] = nibbles2(p0 + QS_OFF(T), p1 + QS_OFF(T));
            if (T != T_Q4_1) {
                hb[h] = (__mmask64)u32_at(p0 + QH_OFF(T)) | (__mmask64)u32_at(p1 + QH_OFF(T)) << 32;
                q[h] = T == T_Q5_0 ? _mm512_mask_blend_epi8(hb[h], _mm512_sub_epi8(_mm512_set1_epi8(16), q[h]), q[h])
                                   : _mm512_mask_add_epi8(q[h], hb[h], q[h], _mm512_set1_epi8(16));
            }
        }
        const __m128 dw = four_halves(b0, B);
        const __m128 mw = T == T_Q5_0 ? dw : four_halves(b0 + 2, B);
        for (int j = 0; j < NA; j++) {
            const int8_t *yb = a[j].qs + 32 * b;
            __m512i y0 = _mm512_loadu_si512((const void *)yb), y1 = _mm512_loadu_si512((const void *)(yb + 64));
            if (T == T_Q5_0) {
                y0 = _mm512_mask_sub_epi8(y0, ~hb[0], _mm512_setzero_si512(), y0);
                y1 = _mm512_mask_sub_epi8(y1, ~hb[1], _mm512_setzero_si512(), y1);
            }
            const __m512i p0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[0], y0);
            const __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[1], y1);
            const __m128 da = _mm_loadu_ps(a[j].d + b);
            const __m512 sc = _mm512_castps128_ps512(_mm_mul_ps(dw, da));
            acc[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(lo8, sc), _mm512_cvtepi32_ps(p0), acc[j]);
            acc[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(hi8, sc), _mm512_cvtepi32_ps(p1), acc[j]);
            if (T != T_Q5_0) {
                const __m128i sy = _mm_madd_epi16(_mm_loadu_si128((const __m128i *)(a[j].bs + 2 * b)), _mm_set1_epi16(1));
                accm[j] = _mm_fmadd_ps(_mm_mul_ps(mw, da), _mm_cvtepi32_ps(sy), accm[j]);
            }
        }
    }
    float tail[HK2_MAX_NA] = {0};
    for (; b < nb; b++) {  /* up to three blocks left: the integer sums in plain C */
        const uint8_t *b0 = x + (size_t)B * b, *qs = b0 + QS_OFF(T);
        const uint32_t qh = T == T_Q4_1 ? 0 : u32_at(b0 + QH_OFF(T));
        const float dw = half_at(b0), mw = T == T_Q5_0 ? 0.0f : half_at(b0 + 2);
        for (int j = 0; j < NA; j++) {
            const int8_t *y = a[j].qs + 32 * b;
            int sumi = 0;
            for (int l = 0; l < 32; l++) {
                const int q = (l < 16 ? qs[l] & 0xF : qs[l - 16] >> 4) | (int)((qh >> l) & 1) << 4;
                sumi += (T == T_Q5_0 ? q - 16 : q) * y[l];
            }
            tail[j] += a[j].d[b] * (dw * (float)sumi + mw * (float)(a[j].bs[2 * b] + a[j].bs[2 * b + 1]));
        }
    }
    for (int j = 0; j < NA; j++) {
        __m128 m = _mm_add_ps(accm[j], _mm_movehl_ps(accm[j], accm[j]));
        m = _mm_add_ss(m, _mm_movehdup_ps(m));
        s[j] = _mm512_reduce_add_ps(acc[j]) + _mm_cvtss_f32(m) + tail[j];
    }
}

HK2_DOT_ENTRY_OF(q4_1, HK2_NA_SWITCH4, dot_q_t, T_Q4_1)
HK2_DOT_ENTRY_OF(q5_0, HK2_NA_SWITCH4, dot_q_t, T_Q5_0)
HK2_DOT_ENTRY_OF(q5_1, HK2_NA_SWITCH4, dot_q_t, T_Q5_1)

#include "hk2_target_end.h"
