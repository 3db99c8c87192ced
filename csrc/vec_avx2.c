/* The AVX2 + FMA + F16C kernel table (hk2_kernels, vec.c has the reference): the activation quantizer, the
 * bandwidth probe, and the float32 math of the router and MLA (also the AVX-512 tables'). */
#include <math.h>
#include "hk2_target_avx2.h"

/* round half away from zero (C roundf), exactly: t = trunc(v); t += sign(v) if |v - t| >= 0.5 */
INLINE __m256i round_away(__m256 v) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 frac = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t));
    const __m256 step = _mm256_or_ps(_mm256_and_ps(v, sign), _mm256_set1_ps(1.0f));
    const __m256 adj = _mm256_and_ps(_mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ), step);
    return _mm256_cvttps_epi32(_mm256_add_ps(t, adj));
}

static void quantize_act(const float *x, int n, int qb, int8_t *qs, float *d, int16_t *bs) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int b = 0; b < n / qb; b++) {
        const float *xb = x + (size_t)b * qb;
        __m256 mx = _mm256_setzero_ps();
        for (int i = 0; i < qb; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const float amax = _mm_cvtss_f32(m);
        const float dd = amax / 127.0f;
        const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
        d[b] = qb == HK2_QK ? _cvtsh_ss(_cvtss_sh(dd, 0)) : dd;
        const __m256 vid = _mm256_set1_ps(id);
        for (int i = 0; i < qb; i += 32) {
            const __m256i i0 = round_away(_mm256_mul_ps(_mm256_loadu_ps(xb + i), vid));
            const __m256i i1 = round_away(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8), vid));
            const __m256i i2 = round_away(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 16), vid));
            const __m256i i3 = round_away(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 24), vid));
            const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            _mm256_storeu_si256((__m256i *)(qs + (size_t)b * qb + i), _mm256_permutevar8x32_epi32(p, perm));
        }
    }
    const __m256i ones = _mm256_set1_epi8(1);
    for (int g = 0; g < n / 32; g++) {  /* 16-sums: pairs of bytes, then pairs of pairs, ... */
        const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * g));
        const __m256i s16 = _mm256_maddubs_epi16(ones, q);              /* 16 x (2 values) */
        const __m256i s32 = _mm256_madd_epi16(s16, _mm256_set1_epi16(1)); /* 8 x (4 values) */
        const __m256i s64 = _mm256_hadd_epi32(s32, s32);                 /* per lane: 8-sums x2 (dup) */
        const __m256i s128 = _mm256_hadd_epi32(s64, s64);                /* per lane: 16-sum */
        bs[2 * g] = (int16_t)_mm256_extract_epi32(s128, 0);
        bs[2 * g + 1] = (int16_t)_mm256_extract_epi32(s128, 4);
    }
    if (n % 32) {
        for (int g = (n / 32) * 2; g < n / 16; g++) {
            int sum = 0;
            for (int l = 0; l < 16; l++) sum += qs[16 * g + l];
            bs[g] = (int16_t)sum;
        }
    }
}

static uint64_t read_sum(const void *p, size_t n) {
    const __m256i *v = p;
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0, nv = n / 32;
    for (; i + 4 <= nv; i += 4) {
        _mm_prefetch((const char *)(v + i) + HK2_PF_DIST, _MM_HINT_T0);
        _mm_prefetch((const char *)(v + i) + HK2_PF_DIST + 64, _MM_HINT_T0);
        s0 = _mm256_add_epi64(s0, _mm256_loadu_si256(v + i));
        s1 = _mm256_add_epi64(s1, _mm256_loadu_si256(v + i + 1));
        s2 = _mm256_add_epi64(s2, _mm256_loadu_si256(v + i + 2));
        s3 = _mm256_add_epi64(s3, _mm256_loadu_si256(v + i + 3));
    }
    for (; i < nv; i++) s0 = _mm256_add_epi64(s0, _mm256_loadu_si256(v + i));
    s0 = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
    uint64_t out[4], tail = 0;
    _mm256_storeu_si256((__m256i *)out, s0);
    for (size_t o = nv * 32; o + 8 <= n; o += 8) {
        uint64_t w;
        memcpy(&w, (const uint8_t *)p + o, 8);
        tail += w;
    }
    return out[0] + out[1] + out[2] + out[3] + tail;
}

float hk2_dot_f32_avx2(int n, const float *a, const float *b) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

void hk2_axpy_f32_avx2(int n, float alpha, const float *x, float *y) {
    const __m256 va = _mm256_set1_ps(alpha);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += alpha * x[i];
}

/* ---- MLA's cache passes: small float32 matrix products with register tiles ---- */
/* gemm_nt: every output is one 8-lane FMA chain over k, one fixed horizontal sum, then the k tail in order */
#define NT_TILE_I 2
#define NT_TILE_J 4
INLINE float nt_finish(__m256 acc, const float *a, const float *b, int k0, int K) {
    float s = hsum_ps(acc);
    for (int k = k0; k < K; k++) s = fmaf(a[k], b[k], s);
    return s;
}
INLINE float nt_one(const float *a, const float *b, int K8, int K) {
    __m256 acc = _mm256_setzero_ps();
    for (int k = 0; k < K8; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
    return nt_finish(acc, a, b, K8, K);
}
INLINE void nt_store(float *o, float s, int add) { *o = add ? *o + s : s; }

void hk2_gemm_nt_f32_avx2(int m, int n, int K, const float *a, int64_t lda, const float *b, int64_t ldb, float *out,
                          int64_t ldo, int add) {
    const int K8 = K - K % 8;
    int j = 0;
    for (; j + NT_TILE_J <= n; j += NT_TILE_J) {   /* b's rows outer: a tile of them stays in L1 over all of a */
        int i = 0;
        for (; i + NT_TILE_I <= m; i += NT_TILE_I) {
            __m256 acc[NT_TILE_I][NT_TILE_J];
            for (int r = 0; r < NT_TILE_I; r++)
                for (int c = 0; c < NT_TILE_J; c++) acc[r][c] = _mm256_setzero_ps();
            for (int k = 0; k < K8; k += 8) {
                __m256 bv[NT_TILE_J];
                for (int c = 0; c < NT_TILE_J; c++) bv[c] = _mm256_loadu_ps(b + (j + c) * ldb + k);
                for (int r = 0; r < NT_TILE_I; r++) {
                    const __m256 av = _mm256_loadu_ps(a + (i + r) * lda + k);
                    for (int c = 0; c < NT_TILE_J; c++) acc[r][c] = _mm256_fmadd_ps(av, bv[c], acc[r][c]);
                }
            }
            for (int r = 0; r < NT_TILE_I; r++)
                for (int c = 0; c < NT_TILE_J; c++)
                    nt_store(out + (i + r) * ldo + j + c, nt_finish(acc[r][c], a + (i + r) * lda, b + (j + c) * ldb, K8, K), add);
        }
        for (; i < m; i++)   /* rows of a left over: one output at a time, the same chain */
            for (int c = 0; c < NT_TILE_J; c++) nt_store(out + i * ldo + j + c, nt_one(a + i * lda, b + (j + c) * ldb, K8, K), add);
    }
    for (; j < n; j++)
        for (int i = 0; i < m; i++) nt_store(out + i * ldo + j, nt_one(a + i * lda, b + j * ldb, K8, K), add);
}

/* gemm_nn: every output lane is one FMA chain over k in order, so any tile gives the same bits */
#define NN_TILE_I 4
void hk2_gemm_nn_f32_avx2(int m, int n, int K, const float *p, int64_t ldp, const float *b, int64_t ldb, float *out,
                          int64_t ldo) {
    int c = 0;
    for (; c + 16 <= n; c += 16) {
        int i = 0;
        for (; i + NN_TILE_I <= m; i += NN_TILE_I) {
            __m256 acc[NN_TILE_I][2];
            for (int r = 0; r < NN_TILE_I; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
            for (int k = 0; k < K; k++) {
                const __m256 b0 = _mm256_loadu_ps(b + k * ldb + c), b1 = _mm256_loadu_ps(b + k * ldb + c + 8);
                for (int r = 0; r < NN_TILE_I; r++) {
                    const __m256 pv = _mm256_broadcast_ss(p + (i + r) * ldp + k);
                    acc[r][0] = _mm256_fmadd_ps(pv, b0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(pv, b1, acc[r][1]);
                }
            }
            for (int r = 0; r < NN_TILE_I; r++) {
                _mm256_storeu_ps(out + (i + r) * ldo + c, acc[r][0]);
                _mm256_storeu_ps(out + (i + r) * ldo + c + 8, acc[r][1]);
            }
        }
        for (; i < m; i++) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;
            for (int k = 0; k < K; k++) {
                const __m256 pv = _mm256_broadcast_ss(p + i * ldp + k);
                a0 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(b + k * ldb + c), a0);
                a1 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(b + k * ldb + c + 8), a1);
            }
            _mm256_storeu_ps(out + i * ldo + c, a0);
            _mm256_storeu_ps(out + i * ldo + c + 8, a1);
        }
    }
    for (; c < n; c++)   /* columns left over: the same chain, one lane at a time */
        for (int i = 0; i < m; i++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) s = fmaf(p[i * ldp + k], b[k * ldb + c], s);
            out[i * ldo + c] = s;
        }
}

const hk2_kernels hk2_kernels_avx2 = {
    .name = "avx2",
    .level = HK2_LVL_AVX2,
    .quantize_act = quantize_act,
    .read_sum = read_sum,
    .dot_f32 = hk2_dot_f32_avx2,
    .axpy_f32 = hk2_axpy_f32_avx2,
    .gemm_nt_f32 = hk2_gemm_nt_f32_avx2,
    .gemm_nn_f32 = hk2_gemm_nn_f32_avx2,
};

#include "hk2_target_end.h"
