/* F32, F16, BF16 weights: rows of plain floats, multiplied with float32 activations (act_qb 0), so a
 * float checkpoint's experts run at its own precision. Scalar reference and the type table; the SIMD
 * dots are in quants_float_avx2.c / quants_float_avx512.c. */
#include <math.h>
#include "hk2_internal.h"

static inline float bf16_to_fp32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
/* round to nearest even; NaN stays a (quiet) NaN (as gguf's BF16 quantizer) */
static inline uint16_t fp32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + (0x7FFF + ((u >> 16) & 1))) >> 16);
}

static void dequantize_row_f32(const void *x, float *y, int64_t n) { memcpy(y, x, sizeof(float) * (size_t)n); }
static void quantize_row_f32(const float *x, void *y, int64_t n) { memcpy(y, x, sizeof(float) * (size_t)n); }
static void dequantize_row_f16(const void *x, float *y, int64_t n) {
    const hk2_half *h = x;
    for (int64_t i = 0; i < n; i++) y[i] = hk2_fp16_to_fp32(h[i]);
}
static void quantize_row_f16(const float *x, void *y, int64_t n) {
    hk2_half *h = y;
    for (int64_t i = 0; i < n; i++) h[i] = hk2_fp32_to_fp16(x[i]);
}
static void dequantize_row_bf16(const void *x, float *y, int64_t n) {
    const uint16_t *h = x;
    for (int64_t i = 0; i < n; i++) y[i] = bf16_to_fp32(h[i]);
}
static void quantize_row_bf16(const float *x, void *y, int64_t n) {
    uint16_t *h = y;
    for (int64_t i = 0; i < n; i++) h[i] = fp32_to_bf16(x[i]);
}

/* the dot of weights of type T (load: one as a float) */
#define FLOAT_DOT(t, T, load)                                                                \
    static void dot_##t(int n, const void *w, const hk2_arow *a, int na, float *s) {         \
        const T *x = w;                                                                      \
        for (int j = 0; j < na; j++) {                                                       \
            float sum = 0.0f;                                                                \
            for (int i = 0; i < n; i++) sum += load(x[i]) * a[j].f[i];                       \
            s[j] = sum;                                                                      \
        }                                                                                    \
    }
#define AS_FLOAT(v) (v)
FLOAT_DOT(wf32, float, AS_FLOAT)
FLOAT_DOT(f16, hk2_half, hk2_fp16_to_fp32)
FLOAT_DOT(bf16, uint16_t, bf16_to_fp32)

HK2_DECLARE_DOTS(wf32)
HK2_DECLARE_DOTS(f16)
HK2_DECLARE_DOTS(bf16)

const hk2_type_ops hk2_types_float[] = {
    {HK2_F32, "F32", 1, 4, 0, dequantize_row_f32, quantize_row_f32, HK2_DOTS(wf32), {0}, 1},
    {HK2_F16, "F16", 1, 2, 0, dequantize_row_f16, quantize_row_f16, HK2_DOTS(f16), {0}, 1},
    {HK2_BF16, "BF16", 1, 2, 0, dequantize_row_bf16, quantize_row_bf16, HK2_DOTS(bf16), {0}, 1},
    {.name = NULL},
};
