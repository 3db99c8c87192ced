/* Q2_K Q3_K Q5_K: AVX2 dot kernels (hk2_dot_<type>_avx2, listed in quants_k.c's table).
 * 32 values per vector in their natural order; maddubs (u8 weights x s8 activations) then madd with
 * the sub-block scales as int16 gives the scaled int32 sums; one float FMA per super-block (two with mins). */
#include "hk2_target_avx2.h"

/* the block layouts of quants_k.c */
typedef struct { uint8_t scales[16]; uint8_t qs[64]; hk2_half d, dmin; } block_q2_K;
typedef struct { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; hk2_half d; } block_q3_K;
typedef struct { hk2_half d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } block_q5_K;
_Static_assert(sizeof(block_q2_K) == 84 && sizeof(block_q3_K) == 110 && sizeof(block_q5_K) == 176, "K layouts");

/* int16 words of the scale bytes b (16 bytes in each lane) for sub-blocks 2p (low lane) and 2p+1 (high
 * lane), zero-extended; for signed bytes put each in the high byte and shift it down arithmetically */
INLINE __m256i pair_scales_u(__m256i b, int p) {
    const __m256i idx = _mm256_setr_epi8(0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128,
                                         1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128);
    return _mm256_shuffle_epi8(b, _mm256_add_epi16(idx, _mm256_set1_epi16((short)(2 * p))));
}
INLINE __m256i pair_scales_s(__m256i b, int p) {
    const __m256i idx = _mm256_setr_epi8(-128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0, -128, 0,
                                         -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1, -128, 1);
    return _mm256_srai_epi16(_mm256_shuffle_epi8(b, _mm256_add_epi16(idx, _mm256_set1_epi16((short)(2 * p << 8)))), 8);
}
/* bit j of each byte of h moved to bit t (j, t constants after unrolling) */
INLINE __m256i bit_to(__m256i h, int j, int t) {
    const __m256i v = j >= t ? _mm256_srli_epi16(h, j - t) : _mm256_slli_epi16(h, t - j);
    return _mm256_and_si256(v, _mm256_set1_epi8((char)(1 << t)));
}

/* ---------------- Q2_K ---------------- */
INLINE void dot_q2_K_t(int n, const block_q2_K *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        PREFETCH(x + b);
        PREFETCH((const uint8_t *)(x + b) + 64);
        const __m128i raw = _mm_loadu_si128((const __m128i *)x[b].scales);
        const __m256i sc = _mm256_broadcastsi128_si256(_mm_and_si128(raw, m4));
        const __m256i mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), m4));
        __m256i sumi[HK2_MAX_NA];
        for (int j = 0; j < NA; j++) sumi[j] = _mm256_setzero_si256();
        for (int c = 0; c < 2; c++) {
            const __m256i q2 = _mm256_loadu_si256((const __m256i *)(x[b].qs + 32 * c));
            for (int sh = 0; sh < 4; sh++) {
                const int p = 4 * c + sh;  /* values 32p .. 32p + 31: sub-blocks 2p, 2p + 1 */
                const __m256i q = _mm256_and_si256(_mm256_srli_epi16(q2, 2 * sh), m3);
                const __m256i scw = pair_scales_u(sc, p);
                for (int j = 0; j < NA; j++) {
                    const __m256i y = _mm256_loadu_si256((const __m256i *)(a[j].qs + HK2_QK_K * b + 32 * p));
                    sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), scw));
                }
            }
        }
        const float dw = _cvtsh_ss(x[b].d), dmin = _cvtsh_ss(x[b].dmin);
        for (int j = 0; j < NA; j++) {
            const __m256i msum = _mm256_madd_epi16(mins, _mm256_loadu_si256((const __m256i *)(a[j].bs + 16 * b)));
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[j].d[b]), _mm256_cvtepi32_ps(sumi[j]), acc[j]);
            acc[j] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * a[j].d[b]), _mm256_cvtepi32_ps(msum), acc[j]);
        }
    }
    for (int j = 0; j < NA; j++) s[j] = hsum_ps(acc[j]);
}

/* ---------------- Q3_K: (q + 4) in 0..7 through maddubs, the -4 through the activation sums ---------------- */
INLINE void dot_q3_K_t(int n, const block_q3_K *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    const __m256i m3 = _mm256_set1_epi8(3);
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        PREFETCH(x + b);
        PREFETCH((const uint8_t *)(x + b) + 64);
        const __m128i sc8 = q3_K_scales_v(x[b].scales);
        const __m256i sc = _mm256_broadcastsi128_si256(sc8);
        const __m256i scm4 = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(_mm256_cvtepi8_epi16(sc8), 2));  /* -4 sc */
        const __m256i hm = _mm256_loadu_si256((const __m256i *)x[b].hmask);
        __m256i sumi[HK2_MAX_NA];
        for (int j = 0; j < NA; j++) sumi[j] = _mm256_madd_epi16(scm4, _mm256_loadu_si256((const __m256i *)(a[j].bs + 16 * b)));
        for (int c = 0; c < 2; c++) {
            const __m256i q2 = _mm256_loadu_si256((const __m256i *)(x[b].qs + 32 * c));
            for (int sh = 0; sh < 4; sh++) {
                const int p = 4 * c + sh;
                const __m256i q = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q2, 2 * sh), m3), bit_to(hm, p, 2));
                const __m256i scw = pair_scales_s(sc, p);
                for (int j = 0; j < NA; j++) {
                    const __m256i y = _mm256_loadu_si256((const __m256i *)(a[j].qs + HK2_QK_K * b + 32 * p));
                    sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), scw));
                }
            }
        }
        const float dw = _cvtsh_ss(x[b].d);
        for (int j = 0; j < NA; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[j].d[b]), _mm256_cvtepi32_ps(sumi[j]), acc[j]);
    }
    for (int j = 0; j < NA; j++) s[j] = hsum_ps(acc[j]);
}

/* ---------------- Q5_K: one 32-value sub-block per vector ---------------- */
INLINE void dot_q5_K_t(int n, const block_q5_K *x, const hk2_arow *a, const int NA, float *s) {
    __m256 acc[HK2_MAX_NA];
    for (int j = 0; j < NA; j++) acc[j] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const int nb = n / HK2_QK_K;
    for (int b = 0; b < nb; b++) {
        for (size_t o = 0; o < sizeof x[b]; o += 64) PREFETCH((const uint8_t *)(x + b) + o);
        uint32_t u[4];
        q4_K_unpack_scales(x[b].scales, u);
        const uint8_t *sc = (const uint8_t *)u;
        const __m128i m8 = _mm_set_epi32(0, 0, (int)u[3], (int)u[2]);
        const __m256i mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));  /* m_j for bs 2j and 2j + 1 */
        const __m256i qh = _mm256_loadu_si256((const __m256i *)x[b].qh);
        __m256i sumi[HK2_MAX_NA];
        for (int j = 0; j < NA; j++) sumi[j] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i q4 = _mm256_loadu_si256((const __m256i *)(x[b].qs + 32 * c));
            const __m256i qlo = _mm256_or_si256(_mm256_and_si256(q4, m4), bit_to(qh, 2 * c, 4));
            const __m256i qhi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4, 4), m4), bit_to(qh, 2 * c + 1, 4));
            const __m256i s0 = _mm256_set1_epi16(sc[2 * c]), s1 = _mm256_set1_epi16(sc[2 * c + 1]);
            for (int j = 0; j < NA; j++) {
                const int8_t *y = a[j].qs + HK2_QK_K * b + 64 * c;
                const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(qlo, _mm256_loadu_si256((const __m256i *)y)), s0);
                const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(qhi, _mm256_loadu_si256((const __m256i *)(y + 32))), s1);
                sumi[j] = _mm256_add_epi32(sumi[j], _mm256_add_epi32(p0, p1));
            }
        }
        const float dw = _cvtsh_ss(x[b].d), dmin = _cvtsh_ss(x[b].dmin);
        for (int j = 0; j < NA; j++) {
            const __m256i msum = _mm256_madd_epi16(mins, _mm256_loadu_si256((const __m256i *)(a[j].bs + 16 * b)));
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[j].d[b]), _mm256_cvtepi32_ps(sumi[j]), acc[j]);
            acc[j] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * a[j].d[b]), _mm256_cvtepi32_ps(msum), acc[j]);
        }
    }
    for (int j = 0; j < NA; j++) s[j] = hsum_ps(acc[j]);
}

HK2_DOT_ENTRY(q2_K, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(q3_K, HK2_NA_SWITCH4)
HK2_DOT_ENTRY(q5_K, HK2_NA_SWITCH4)

#include "hk2_target_end.h"
