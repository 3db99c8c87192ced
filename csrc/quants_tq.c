/* TQ1_0 TQ2_0: the ternary types. Block layouts, reference dequantizers and quantizers,
 * the scalar dot kernels and the type table (hk2_type_ops, hk2_internal.h).
 *
 * TQ1_0 packs 5 trits (q + 1 in {0, 1, 2}) per byte as a base-3 fraction: byte = ceil(v * 256 / 243) for
 * v = sum t_n 3^(4-n), so trit n is the top "digit" of byte * 3^n (mod 256), read as (p * 3) >> 8.
 * Values 0..159: qs[0..31] (value 32n + m from qs[m], trit n); 160..239: qs[32..47] (160 + 16n + m from
 * qs[32 + m]); 240..255: qh[0..3] (240 + 4n + m from qh[m], 4 trits). TQ2_0: value 128h + 32l + m is
 * bits 2l..2l+1 of qs[32h + m], minus 1. Every byte value decodes as gguf's uint8 arithmetic does. */
#include <math.h>
#include "hk2_internal.h"

/* ggml-common.h's layouts (the SIMD files repeat them) */
typedef struct { uint8_t qs[48]; uint8_t qh[4]; hk2_half d; } block_tq1_0;
typedef struct { uint8_t qs[64]; hk2_half d; } block_tq2_0;
_Static_assert(sizeof(block_tq1_0) == 54, "block_tq1_0 layout");
_Static_assert(sizeof(block_tq2_0) == 66, "block_tq2_0 layout");

/* trit n (0..2) of a TQ1_0 byte, by the uint8 arithmetic of the format */
static inline int tq1_trit(uint8_t byte, int n) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    const uint8_t p = (uint8_t)(byte * pow3[n]);
    return (p * 3) >> 8;
}

/* the 256 values of a TQ1_0 block as q + 1 (0..2) */
static void tq1_0_unpack(const block_tq1_0 *x, uint8_t t[HK2_QK_K]) {
    for (int n = 0; n < 5; n++)
        for (int m = 0; m < 32; m++) t[32 * n + m] = (uint8_t)tq1_trit(x->qs[m], n);
    for (int n = 0; n < 5; n++)
        for (int m = 0; m < 16; m++) t[160 + 16 * n + m] = (uint8_t)tq1_trit(x->qs[32 + m], n);
    for (int n = 0; n < 4; n++)
        for (int m = 0; m < 4; m++) t[240 + 4 * n + m] = (uint8_t)tq1_trit(x->qh[m], n);
}

static void tq2_0_unpack(const block_tq2_0 *x, uint8_t t[HK2_QK_K]) {
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 4; l++)
            for (int m = 0; m < 32; m++) t[128 * h + 32 * l + m] = (x->qs[32 * h + m] >> (2 * l)) & 3;
}



/* q + 1 of each value: round(x / max|x|) in {-1, 0, 1}, plus 1; d = max|x| (as gguf.quants, uint8 packing) */
static float tq_ternarize(const float *x, uint8_t t[HK2_QK_K]) {
    float amax = 0.0f;
    for (int i = 0; i < HK2_QK_K; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    const float id = amax != 0.0f ? 1.0f / amax : 0.0f;
    for (int i = 0; i < HK2_QK_K; i++) t[i] = (uint8_t)(hk2_roundf_int(x[i] * id) + 1);
    return amax;
}

/* trits t[0], t[stride], ... (k of them, weights 81, 27, 9, 3, 1) -> byte = ceil(v * 256 / 243) */
static uint8_t tq1_pack(const uint8_t *t, int stride, int k) {
    static const int w[5] = {81, 27, 9, 3, 1};
    int v = 0;
    for (int n = 0; n < k; n++) v += t[stride * n] * w[n];
    return (uint8_t)((v * 256 + 242) / 243);
}

static void quantize_row_tq1_0(const float *x, void *blocks, int64_t n) {
    block_tq1_0 *y = blocks;
    uint8_t t[HK2_QK_K];
    for (int64_t b = 0; b < n / HK2_QK_K; b++) {
        y[b].d = hk2_fp32_to_fp16(tq_ternarize(x + HK2_QK_K * b, t));
        for (int m = 0; m < 32; m++) y[b].qs[m] = tq1_pack(t + m, 32, 5);
        for (int m = 0; m < 16; m++) y[b].qs[32 + m] = tq1_pack(t + 160 + m, 16, 5);
        for (int m = 0; m < 4; m++) y[b].qh[m] = tq1_pack(t + 240 + m, 4, 4);
    }
}

static void quantize_row_tq2_0(const float *x, void *blocks, int64_t n) {
    block_tq2_0 *y = blocks;
    uint8_t t[HK2_QK_K];
    for (int64_t b = 0; b < n / HK2_QK_K; b++) {
        y[b].d = hk2_fp32_to_fp16(tq_ternarize(x + HK2_QK_K * b, t));
        for (int h = 0; h < 2; h++)
            for (int m = 0; m < 32; m++) {
                const uint8_t *v = t + 128 * h + m;
                y[b].qs[32 * h + m] = (uint8_t)(v[0] | v[32] << 2 | v[64] << 4 | v[96] << 6);
            }
    }
}

/* sum (t - 1) * y = sum t * y - sum y; the block's sum of y is its 16 bsums */
static inline int tq_block_sum(const uint8_t *t, const int8_t *y, const int16_t *bs) {
    int sum = 0;
    for (int i = 0; i < HK2_QK_K; i++) sum += t[i] * y[i];
    for (int g = 0; g < HK2_QK_K / 16; g++) sum -= bs[g];
    return sum;
}

/* the dequantizer and the dot: each block unpacked once (<t>_unpack), for all activation rows */
#define TQ_TYPE(t)                                                                                       \
    static void dequantize_row_##t(const void *blocks, float *y, int64_t n) {                            \
        const block_##t *x = blocks;                                                                     \
        uint8_t tr[HK2_QK_K];                                                                            \
        for (int64_t b = 0; b < n / HK2_QK_K; b++) {                                                     \
            const float d = hk2_fp16_to_fp32(x[b].d);                                                    \
            t##_unpack(x + b, tr);                                                                       \
            for (int i = 0; i < HK2_QK_K; i++) y[HK2_QK_K * b + i] = d * (float)(tr[i] - 1);             \
        }                                                                                                \
    }                                                                                                    \
    static void dot_##t(int n, const void *w, const hk2_arow *a, int na, float *s) {                     \
        const block_##t *x = w;                                                                          \
        float acc[HK2_MAX_NA] = {0};                                                                     \
        uint8_t tr[HK2_QK_K];                                                                            \
        for (int b = 0; b < n / HK2_QK_K; b++) {                                                         \
            t##_unpack(x + b, tr);                                                                       \
            const float d = hk2_fp16_to_fp32(x[b].d);                                                    \
            for (int j = 0; j < na; j++)                                                                 \
                acc[j] += d * a[j].d[b] * (float)tq_block_sum(tr, a[j].qs + HK2_QK_K * b, a[j].bs + 16 * b); \
        }                                                                                                \
        for (int j = 0; j < na; j++) s[j] = acc[j];                                                      \
    }
TQ_TYPE(tq1_0)
TQ_TYPE(tq2_0)

HK2_DECLARE_DOTS(tq1_0)
HK2_DECLARE_DOTS(tq2_0)

const hk2_type_ops hk2_types_tq[] = {
    {HK2_TQ1_0, "TQ1_0", HK2_QK_K, sizeof(block_tq1_0), HK2_QK_K, dequantize_row_tq1_0, quantize_row_tq1_0, HK2_DOTS(tq1_0),
     {0}, 1},
    {HK2_TQ2_0, "TQ2_0", HK2_QK_K, sizeof(block_tq2_0), HK2_QK_K, dequantize_row_tq2_0, quantize_row_tq2_0, HK2_DOTS(tq2_0),
     {0}, 1},
    {.name = NULL},
};
