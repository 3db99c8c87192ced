/* Scalar kernels: the reference every SIMD variant is tested against, and the fallback on
 * CPUs without AVX2. Integer dot products per block, one float multiply-add per block. */
#include "hk2_internal.h"

static void dot_q4_0(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_q4_0 *x = w;
    for (int j = 0; j < na; j++) {
        float sum = 0.0f;
        for (int b = 0; b < n / HK2_QK; b++) {
            const int8_t *y = a[j].qs + b * HK2_QK;
            int sumi = 0;
            for (int l = 0; l < HK2_QK / 2; l++)
                sumi += ((x[b].qs[l] & 0xF) - 8) * y[l] + ((x[b].qs[l] >> 4) - 8) * y[l + HK2_QK / 2];
            sum += hk2_fp16_to_fp32(x[b].d) * a[j].d[b] * (float)sumi;
        }
        s[j] = sum;
    }
}

/* 8 interleaved rows; the same integer sums per block as dot_q4_0 */
static void dot_q4_0_r8(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_q4_0x8 *x = w;
    for (int j = 0; j < na; j++)
        for (int r = 0; r < HK2_R8; r++) {
            float sum = 0.0f;
            for (int b = 0; b < n / HK2_QK; b++) {
                const int8_t *y = a[j].qs + b * HK2_QK;
                int sumi = 0;
                for (int l = 0; l < HK2_QK / 2; l++) {
                    const uint8_t q = x[b].qs[32 * (l / 4) + 4 * r + l % 4];
                    sumi += ((q & 0xF) - 8) * y[l] + ((q >> 4) - 8) * y[l + HK2_QK / 2];
                }
                sum += hk2_fp16_to_fp32(x[b].d[r]) * a[j].d[b] * (float)sumi;
            }
            s[HK2_R8 * j + r] = sum;
        }
}

/* 8 interleaved rows; the same integer sums per super-block as dot_q4_K */
static void dot_q4_K_r8(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_q4_Kx8 *x = w;
    for (int j = 0; j < na; j++)
        for (int r = 0; r < HK2_R8; r++) {
            float sum = 0.0f;
            for (int b = 0; b < n / HK2_QK_K; b++) {
                const int8_t *y = a[j].qs + b * HK2_QK_K;
                const int16_t *bs = a[j].bs + b * (HK2_QK_K / 16);
                int sumi = 0, summ = 0;
                for (int c = 0; c < HK2_QK_K / 64; c++) {
                    int s1 = 0, s2 = 0;
                    for (int l = 0; l < 32; l++) {
                        const uint8_t q = x[b].qs[256 * c + 32 * (l / 4) + 4 * r + l % 4];
                        s1 += (q & 0xF) * y[64 * c + l];
                        s2 += (q >> 4) * y[64 * c + 32 + l];
                    }
                    sumi += x[b].sc[2 * c][r] * s1 + x[b].sc[2 * c + 1][r] * s2;
                    summ += x[b].m[2 * c][r] * (bs[4 * c] + bs[4 * c + 1]) + x[b].m[2 * c + 1][r] * (bs[4 * c + 2] + bs[4 * c + 3]);
                }
                sum += a[j].d[b] * (hk2_fp16_to_fp32(x[b].d[r]) * (float)sumi - hk2_fp16_to_fp32(x[b].dmin[r]) * (float)summ);
            }
            s[HK2_R8 * j + r] = sum;
        }
}

static void dot_q8_0(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_q8_0 *x = w;
    for (int j = 0; j < na; j++) {
        float sum = 0.0f;
        for (int b = 0; b < n / HK2_QK; b++) {
            const int8_t *y = a[j].qs + b * HK2_QK;
            int sumi = 0;
            for (int l = 0; l < HK2_QK; l++) sumi += x[b].qs[l] * y[l];
            sum += hk2_fp16_to_fp32(x[b].d) * a[j].d[b] * (float)sumi;
        }
        s[j] = sum;
    }
}

/* value = d*sc*q - dmin*m; the min term uses the activation's 16-value sums */
static void dot_q4_K(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_q4_K *x = w;
    for (int j = 0; j < na; j++) {
        float sum = 0.0f;
        for (int b = 0; b < n / HK2_QK_K; b++) {
            const int8_t *y = a[j].qs + b * HK2_QK_K;
            const int16_t *bs = a[j].bs + b * (HK2_QK_K / 16);
            int sumi = 0, summ = 0;
            for (int c = 0; c < HK2_QK_K / 64; c++) {
                const uint8_t *q = x[b].qs + 32 * c;
                uint8_t sc1, m1, sc2, m2;
                hk2_q4_K_scale_min(2 * c, x[b].scales, &sc1, &m1);
                hk2_q4_K_scale_min(2 * c + 1, x[b].scales, &sc2, &m2);
                int s1 = 0, s2 = 0;
                for (int l = 0; l < 32; l++) {
                    s1 += (q[l] & 0xF) * y[64 * c + l];
                    s2 += (q[l] >> 4) * y[64 * c + 32 + l];
                }
                sumi += sc1 * s1 + sc2 * s2;
                summ += m1 * (bs[4 * c] + bs[4 * c + 1]) + m2 * (bs[4 * c + 2] + bs[4 * c + 3]);
            }
            sum += a[j].d[b] * (hk2_fp16_to_fp32(x[b].d) * (float)sumi - hk2_fp16_to_fp32(x[b].dmin) * (float)summ);
        }
        s[j] = sum;
    }
}

static void dot_q6_K(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_q6_K *x = w;
    for (int j = 0; j < na; j++) {
        float sum = 0.0f;
        for (int b = 0; b < n / HK2_QK_K; b++) {
            const int8_t *y = a[j].qs + b * HK2_QK_K;
            const uint8_t *ql = x[b].ql, *qh = x[b].qh;
            const int8_t *sc = x[b].scales;
            int sumi = 0;
            for (int h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8, y += 128) {
                int part[8] = {0};  /* per 16-value sub-block of this half */
                for (int l = 0; l < 32; l++) {
                    const int is = l / 16;
                    part[is + 0] += (((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32) * y[l];
                    part[is + 2] += (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32) * y[l + 32];
                    part[is + 4] += (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32) * y[l + 64];
                    part[is + 6] += (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32) * y[l + 96];
                }
                for (int k = 0; k < 8; k++) sumi += sc[k] * part[k];
            }
            sum += a[j].d[b] * hk2_fp16_to_fp32(x[b].d) * (float)sumi;
        }
        s[j] = sum;
    }
}

static uint64_t read_sum(const void *p, size_t n) {
    const uint64_t *u = p;
    uint64_t s = 0;
    for (size_t i = 0; i < n / 8; i++) s += u[i];
    return s;
}

static float dot_f32(int n, const float *a, const float *b) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy_f32(int n, float alpha, const float *x, float *y) {
    for (int i = 0; i < n; i++) y[i] += alpha * x[i];
}

static void gemm_nt_f32(int m, int n, int K, const float *a, int64_t lda, const float *b, int64_t ldb, float *out,
                        int64_t ldo, int add) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            const float s = dot_f32(K, a + i * lda, b + j * ldb);
            out[i * ldo + j] = add ? out[i * ldo + j] + s : s;
        }
}

static void gemm_nn_f32(int m, int n, int K, const float *p, int64_t ldp, const float *b, int64_t ldb, float *out,
                        int64_t ldo) {
    for (int i = 0; i < m; i++) {
        float *o = out + i * ldo;
        for (int c = 0; c < n; c++) o[c] = 0.0f;
        for (int k = 0; k < K; k++) axpy_f32(n, p[i * ldp + k], b + k * ldb, o);
    }
}

const hk2_kernels hk2_kernels_scalar = {
    .name = "scalar",
    .level = HK2_LVL_SCALAR,
    .dot_q4_0 = dot_q4_0,
    .dot_q8_0 = dot_q8_0,
    .dot_q4_K = dot_q4_K,
    .dot_q6_K = dot_q6_K,
    .dot_q4_0_r8 = dot_q4_0_r8,
    .dot_q4_K_r8 = dot_q4_K_r8,
    .quantize_act = hk2_quantize_act_scalar,
    .read_sum = read_sum,
    .dot_f32 = dot_f32,
    .axpy_f32 = axpy_f32,
    .gemm_nt_f32 = gemm_nt_f32,
    .gemm_nn_f32 = gemm_nn_f32,
};
