/* C-level tests of every type-family block type (csrc/quants_*.c), run by ctest and under ASan/UBSan: random
 * blocks with finite scales in buffers of exactly their size (a kernel reading past a row's or an expert's end
 * hits the sanitizer's red zone), hk2_linear and hk2_moe_forward on every ISA this build runs against a double
 * reference on the hk2_dequantize'd weights and the activations as the kernels quantize them
 * (hk2_quantize_act). Built natively and against SIMDe, as test_kernels.c. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "check.h"

/* type, activation block (0: float activations), byte offsets of fp16 scales (-1 ends; IQ1_M: special) */
typedef struct { int type; int act; int scales[3]; } type_case;
static const type_case TYPES[] = {
    {HK2_Q2_K, 256, {80, 82, -1}}, {HK2_Q3_K, 256, {108, -1}}, {HK2_Q5_K, 256, {0, 2, -1}},
    {HK2_Q4_1, 32, {0, 2, -1}}, {HK2_Q5_0, 32, {0, -1}}, {HK2_Q5_1, 32, {0, 2, -1}},
    {HK2_IQ4_NL, 32, {0, -1}}, {HK2_IQ4_XS, 256, {0, -1}}, {HK2_IQ2_XXS, 256, {0, -1}},
    {HK2_IQ2_XS, 256, {0, -1}}, {HK2_IQ2_S, 256, {0, -1}}, {HK2_IQ3_XXS, 256, {0, -1}},
    {HK2_IQ3_S, 256, {0, -1}}, {HK2_IQ1_S, 256, {0, -1}}, {HK2_IQ1_M, 256, {-1}},
    {HK2_TQ1_0, 256, {52, -1}}, {HK2_TQ2_0, 256, {64, -1}},
    {HK2_F32, 0, {-1}}, {HK2_F16, 0, {-1}}, {HK2_BF16, 0, {-1}},
};
static const char *ISAS[] = {"scalar", "avx2", "avx512bw", "avx512vnni"};

static uint16_t fp16_bits(float f) { _Float16 h = (_Float16)f; uint16_t u; memcpy(&u, &h, 2); return u; }

/* rows x cols random valid blocks of tc's type, in a malloc of exactly their size */
static uint8_t *random_blocks(const type_case *tc, int64_t rows, int64_t cols) {
    const int64_t rb = hk2_row_bytes(tc->type, cols), bb = hk2_block_bytes(tc->type);
    uint8_t *w = malloc((size_t)(rows * rb));
    if (tc->type == HK2_F32 || tc->type == HK2_F16 || tc->type == HK2_BF16) {
        for (int64_t i = 0; i < rows * cols; i++) {
            const float v = 0.05f * nrand();
            if (tc->type == HK2_F32) memcpy(w + 4 * i, &v, 4);
            else if (tc->type == HK2_F16) { const uint16_t h = fp16_bits(v); memcpy(w + 2 * i, &h, 2); }
            else { uint32_t u; memcpy(&u, &v, 4); const uint16_t h = (uint16_t)(u >> 16); memcpy(w + 2 * i, &h, 2); }
        }
        return w;
    }
    for (int64_t i = 0; i < rows * rb; i++) w[i] = (uint8_t)next_u64();
    for (int64_t b = 0; b < rows * rb / bb; b++) {
        uint8_t *blk = w + b * bb;
        const uint16_t d = fp16_bits(0.005f + 0.01f * (float)(next_u64() % 1000) / 1000.0f);
        if (tc->type == HK2_IQ1_M) {  /* the scale's four nibbles: the top nibble of each uint16 scale word */
            for (int i = 0; i < 4; i++) {
                uint16_t s;
                memcpy(&s, blk + 48 + 2 * i, 2);
                s = (uint16_t)((s & 0x0FFF) | (((d >> (4 * i)) & 0xF) << 12));
                memcpy(blk + 48 + 2 * i, &s, 2);
            }
        }
        for (int k = 0; k < 3 && tc->scales[k] >= 0; k++) memcpy(blk + tc->scales[k], &d, 2);
    }
    return w;
}

/* x as the kernels see it: quantized to Q8_0 / Q8_K blocks and back, or itself for float weights */
static void act_roundtrip(const type_case *tc, const float *x, int64_t n, float *out) {
    if (tc->act == 0) { memcpy(out, x, sizeof(float) * (size_t)n); return; }
    const int at = tc->act == 32 ? HK2_Q8_0 : HK2_Q8_K;
    uint8_t *q = malloc((size_t)hk2_row_bytes(at, n));
    CHECK(hk2_quantize_act(at, x, 1, n, q) == HK2_OK, "quantize_act");
    CHECK(hk2_dequantize(at, q, 1, n, out) == HK2_OK, "dequantize activations");
    free(q);
}

static double max_rel(const float *y, const double *ref, int64_t n) {
    double scale = 0, err = 0;
    for (int64_t i = 0; i < n; i++) { scale = fmax(scale, fabs(ref[i])); err = fmax(err, fabs(y[i] - ref[i])); }
    return scale > 0 ? err / scale : err;
}

static void test_linear(const type_case *tc) {
    const int64_t N = 19, K = 512;
    uint8_t *w = random_blocks(tc, N, K);
    float *wf = malloc(sizeof(float) * N * K), *x = malloc(sizeof(float) * 5 * K), *xq = malloc(sizeof(float) * K);
    float *y = malloc(sizeof(float) * 5 * N);
    double *ref = malloc(sizeof(double) * 5 * N);
    CHECK(hk2_dequantize(tc->type, w, N, K, wf) == HK2_OK, "dequantize type %d", tc->type);
    for (int64_t i = 0; i < 5 * K; i++) x[i] = nrand();
    for (int t = 0; t < 5; t++) {
        act_roundtrip(tc, x + t * K, K, xq);
        for (int64_t r = 0; r < N; r++) {
            double s = 0;
            for (int64_t k = 0; k < K; k++) s += (double)wf[r * K + k] * xq[k];
            ref[t * N + r] = s;
        }
    }
    for (int i = 0; i < 4; i++) {
        if (hk2_isa_supported(ISAS[i]) != 1) continue;
        hk2_set_isa(ISAS[i]);
        for (int T = 1; T <= 5; T += 2) {
            CHECK(hk2_linear(tc->type, w, N, K, T, x, y) == HK2_OK, "linear type %d %s", tc->type, ISAS[i]);
            const double e = max_rel(y, ref, T * N);
            CHECK(e < 1e-4, "linear type %d %s T=%d: error %g of scale", tc->type, ISAS[i], T, e);
        }
    }
    free(w); free(wf); free(x); free(xq); free(y); free(ref);
}

static void test_moe(const type_case *tc) {
    enum { E = 3, H = 512, I = 256, T = 3, TOPK = 2 };
    uint8_t *m[3][E];
    float *mf[3][E];
    const void *ptr[3][E];
    for (int k = 0; k < 3; k++)
        for (int e = 0; e < E; e++) {
            const int64_t rows = k < 2 ? I : H, cols = k < 2 ? H : I;
            m[k][e] = random_blocks(tc, rows, cols);
            ptr[k][e] = m[k][e];
            mf[k][e] = malloc(sizeof(float) * rows * cols);
            CHECK(hk2_dequantize(tc->type, m[k][e], rows, cols, mf[k][e]) == HK2_OK, "dequantize expert");
        }
    const hk2_moe_layer L = {.n_experts = E, .hidden = H, .inter = I, .gate_type = tc->type, .up_type = tc->type,
                             .down_type = tc->type, .gate = ptr[0], .up = ptr[1], .down = ptr[2]};
    float x[T * H], xq[H], h[I], hq[I], y[T * H], w[T * TOPK];
    int32_t ids[T * TOPK] = {0, 2, 1, 1, 2, 0};  /* token 1 picks expert 1 twice */
    double ref[T * H];
    for (int i = 0; i < T * H; i++) x[i] = nrand();
    for (int i = 0; i < T * TOPK; i++) w[i] = 0.25f + 0.5f * (float)(next_u64() % 100) / 100.0f;
    memset(ref, 0, sizeof ref);
    for (int t = 0; t < T; t++) {
        act_roundtrip(tc, x + t * H, H, xq);
        for (int k = 0; k < TOPK; k++) {
            const int e = ids[t * TOPK + k];
            for (int r = 0; r < I; r++) {
                double g = 0, u = 0;
                for (int c = 0; c < H; c++) { g += (double)mf[0][e][r * H + c] * xq[c]; u += (double)mf[1][e][r * H + c] * xq[c]; }
                h[r] = (float)(g / (1.0 + exp(-g)) * u);
            }
            act_roundtrip(tc, h, I, hq);
            for (int r = 0; r < H; r++) {
                double s = 0;
                for (int c = 0; c < I; c++) s += (double)mf[2][e][r * I + c] * hq[c];
                ref[t * H + r] += w[t * TOPK + k] * s;
            }
        }
    }
    for (int i = 0; i < 4; i++) {
        if (hk2_isa_supported(ISAS[i]) != 1) continue;
        hk2_set_isa(ISAS[i]);
        CHECK(hk2_moe_forward(&L, T, TOPK, x, ids, w, y, 0) == HK2_OK, "moe type %d %s", tc->type, ISAS[i]);
        const double e = max_rel(y, ref, T * H);
        /* an h within float error of an 8-bit rounding boundary may round the other way */
        CHECK(e < 5e-3, "moe type %d %s: error %g of scale", tc->type, ISAS[i], e);
    }
    for (int k = 0; k < 3; k++)
        for (int e = 0; e < E; e++) { free(m[k][e]); free(mf[k][e]); }
}

int main(void) {
    hk2_set_threads(2);
    for (size_t i = 0; i < sizeof TYPES / sizeof TYPES[0]; i++) {
        const type_case *tc = &TYPES[i];
        if (hk2_block_size(tc->type) < 0) {
            CHECK(0, "type %d is not in the library", tc->type);
            continue;
        }
        test_linear(tc);
        test_moe(tc);
    }
    hk2_shutdown();
    if (g_failures) fprintf(stderr, "%d failure(s)\n", g_failures);
    else printf("all type tests passed\n");
    return g_failures != 0;
}
