/* The scalar kernel table (hk2_kernels, hk2_internal.h): the activation quantizer, the bandwidth probe and
 * the float32 math of the router and MLA; the reference the SIMD tables (vec_avx2.c, vec_avx512.c) match, and
 * the fallback on CPUs without AVX2. The block types' dots are in their quants_<family>.c files. */
#include <math.h>
#include "hk2_internal.h"

void hk2_quantize_act_scalar(const float *x, int n, int qb, int8_t *qs, float *d, int16_t *bs) {
    for (int b = 0; b < n / qb; b++) {
        const float *xb = x + (size_t)b * qb;
        float amax = 0.0f;
        for (int j = 0; j < qb; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float dd = amax / 127.0f;
        const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
        /* Q8_0-style rows keep the scale block_q8_0 would store (fp16); Q8_K keeps float */
        d[b] = qb == HK2_QK ? hk2_fp16_to_fp32(hk2_fp32_to_fp16(dd)) : dd;
        for (int j = 0; j < qb; j++) qs[(size_t)b * qb + j] = (int8_t)hk2_roundf_int(xb[j] * id);
    }
    for (int g = 0; g < n / 16; g++) {
        int s = 0;
        for (int j = 0; j < 16; j++) s += qs[g * 16 + j];
        bs[g] = (int16_t)s;
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
    .quantize_act = hk2_quantize_act_scalar,
    .read_sum = read_sum,
    .dot_f32 = dot_f32,
    .axpy_f32 = axpy_f32,
    .gemm_nt_f32 = gemm_nt_f32,
    .gemm_nn_f32 = gemm_nn_f32,
};
