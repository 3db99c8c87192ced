/* C-level tests of the kernels (run by ctest, also under ASan/UBSan):
 * block formats round-trip, every ISA this build can run matches a double-precision reference on
 * dequantized weights, results do not depend on the thread count, bad arguments give error codes,
 * the pool survives resizing and shutdown. Built twice by CMake: natively, and (HK2_USE_SIMDE)
 * with the AVX-512 kernels on SIMDe's emulation so their logic runs on any x86-64. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "check.h"

static const int WEIGHT_TYPES[] = {HK2_Q4_0, HK2_Q8_0, HK2_Q4_K, HK2_Q6_K};
static const char *ISAS[] = {"scalar", "avx2", "avx512bw", "avx512vnni"};

static int is_k(int t) { return t == HK2_Q4_K || t == HK2_Q6_K || t == HK2_Q4_K_R8; }

/* ---------------------------------------------------------------- formats */
static void test_formats(void) {
    const int rows = 4, cols = 512;
    float *x = malloc(sizeof(float) * rows * cols), *y = malloc(sizeof(float) * rows * cols);
    for (int i = 0; i < rows * cols; i++) x[i] = nrand();
    const double bound[] = {0.1, 0.007, 0.1, 0.03};  /* rms error for unit-variance data */
    for (int ti = 0; ti < 4; ti++) {
        const int t = WEIGHT_TYPES[ti];
        const int64_t rb = hk2_row_bytes(t, cols);
        CHECK(rb == cols / hk2_block_size(t) * hk2_block_bytes(t), "row bytes of type %d", t);
        uint8_t *q = malloc((size_t)(rb * rows));
        CHECK(hk2_quantize(t, x, rows, cols, q) == HK2_OK, "quantize type %d", t);
        CHECK(hk2_dequantize(t, q, rows, cols, y) == HK2_OK, "dequantize type %d", t);
        double se = 0;
        for (int i = 0; i < rows * cols; i++) se += (double)(y[i] - x[i]) * (y[i] - x[i]);
        CHECK(sqrt(se / (rows * cols)) < bound[ti], "round trip of type %d: rms %g", t, sqrt(se / (rows * cols)));
        CHECK(hk2_quantize(t, x, rows, cols - 16, q) == HK2_ESHAPE, "ncols not a block multiple, type %d", t);
        free(q);
    }
    CHECK(hk2_row_bytes(9999, 64) == HK2_ETYPE, "unknown type");
    CHECK(hk2_quantize(HK2_Q8_0, NULL, 1, 32, y) == HK2_EINVAL, "null input");
    CHECK(hk2_quantize(HK2_Q8_0, x, -1, 32, y) == HK2_ESHAPE, "negative rows");
    free(x);
    free(y);
}

/* ---------------------------------------------------------------- MoE */
typedef struct {
    int gate_type, down_type;
    int E, H, I;
    uint8_t *gate, *up, *down;           /* [E, rows, row_bytes] */
    float *gate_f, *up_f, *down_f;       /* dequantized */
    const void **gp, **upp, **dp;
    hk2_moe_layer layer;
} experts;

static void make_experts(experts *ex, int gt, int dt, int E, int H, int I) {
    ex->gate_type = gt; ex->down_type = dt; ex->E = E; ex->H = H; ex->I = I;
    const int64_t grb = hk2_row_bytes(gt, H), drb = hk2_row_bytes(dt, I);
    float *tmp = malloc(sizeof(float) * (size_t)E * H * I);
    uint8_t **dst[3] = {&ex->gate, &ex->up, &ex->down};
    float **dstf[3] = {&ex->gate_f, &ex->up_f, &ex->down_f};
    for (int m = 0; m < 3; m++) {
        const int type = m == 2 ? dt : gt, rows = m == 2 ? H : I, cols = m == 2 ? I : H;
        const int64_t rb = m == 2 ? drb : grb;
        for (int64_t i = 0; i < (int64_t)E * H * I; i++) tmp[i] = 0.05f * nrand();
        *dst[m] = malloc((size_t)(E * rows * rb));
        *dstf[m] = malloc(sizeof(float) * (size_t)E * rows * cols);
        if (type == HK2_Q4_0_R8 || type == HK2_Q4_K_R8) {  /* quantize, repack, check it decodes to the same values */
            const int src = type == HK2_Q4_0_R8 ? HK2_Q4_0 : HK2_Q4_K;
            int (*repack)(const void *, int64_t, int64_t, void *) = type == HK2_Q4_0_R8 ? hk2_repack_q4_0_r8 : hk2_repack_q4_K_r8;
            uint8_t *q = malloc((size_t)(E * rows * hk2_row_bytes(src, cols)));
            float *f = malloc(sizeof(float) * (size_t)E * rows * cols);
            CHECK(hk2_quantize(src, tmp, (int64_t)E * rows, cols, q) == HK2_OK, "quantize experts");
            CHECK(repack(q, (int64_t)E * rows, cols, *dst[m]) == HK2_OK, "repack experts");
            CHECK(hk2_dequantize(src, q, (int64_t)E * rows, cols, f) == HK2_OK, "dequantize the source");
            CHECK(hk2_dequantize(type, *dst[m], (int64_t)E * rows, cols, *dstf[m]) == HK2_OK, "dequantize experts");
            CHECK(memcmp(f, *dstf[m], sizeof(float) * (size_t)E * rows * cols) == 0, "type %d decodes to its source", type);
            CHECK(repack(q, 12, cols, *dst[m]) == HK2_ESHAPE, "repack of 12 rows");
            CHECK(repack(q, 8, cols, q) == HK2_EINVAL, "repack in place");
            CHECK(hk2_quantize(type, tmp, 8, cols, q) == HK2_ETYPE, "quantize straight to type %d", type);
            free(q); free(f);
        } else {
            CHECK(hk2_quantize(type, tmp, (int64_t)E * rows, cols, *dst[m]) == HK2_OK, "quantize experts");
            CHECK(hk2_dequantize(type, *dst[m], (int64_t)E * rows, cols, *dstf[m]) == HK2_OK, "dequantize experts");
        }
    }
    free(tmp);
    ex->gp = malloc(sizeof(void *) * E); ex->upp = malloc(sizeof(void *) * E); ex->dp = malloc(sizeof(void *) * E);
    for (int e = 0; e < E; e++) {
        ex->gp[e] = ex->gate + e * I * grb;
        ex->upp[e] = ex->up + e * I * grb;
        ex->dp[e] = ex->down + e * H * drb;
    }
    ex->layer = (hk2_moe_layer){.n_experts = E, .hidden = H, .inter = I, .gate_type = gt, .up_type = gt, .down_type = dt,
                                .gate = ex->gp, .up = ex->upp, .down = ex->dp};
}

static void free_experts(experts *ex) {
    free(ex->gate); free(ex->up); free(ex->down);
    free(ex->gate_f); free(ex->up_f); free(ex->down_f);
    free(ex->gp); free(ex->upp); free(ex->dp);
}

/* activations as the kernels see them: quantized (scalar code) and dequantized */
static void act_roundtrip(const float *v, int n, int weight_type, float *out) {
    const int at = is_k(weight_type) ? HK2_Q8_K : HK2_Q8_0;
    uint8_t *q = malloc((size_t)hk2_row_bytes(at, n));
    CHECK(hk2_quantize_act(at, v, 1, n, q) == HK2_OK, "quantize_act");
    CHECK(hk2_dequantize(at, q, 1, n, out) == HK2_OK, "dequantize act");
    free(q);
}

/* residual: h as two 8-bit rows (HK2_MOE_H_RESIDUAL), h's and then its rounding residual's */
static void reference(const experts *ex, int T, int K, const float *x, const int32_t *ids, const float *w, int residual,
                      double *y) {
    const int H = ex->H, I = ex->I;
    float *xq = malloc(sizeof(float) * H), *h = malloc(sizeof(float) * I), *hq = malloc(sizeof(float) * I);
    float *hr = malloc(sizeof(float) * I), *hrq = malloc(sizeof(float) * I);
    hk2_set_isa("scalar");
    memset(y, 0, sizeof(double) * (size_t)T * H);
    for (int t = 0; t < T; t++) {
        act_roundtrip(x + (size_t)t * H, H, ex->gate_type, xq);
        for (int k = 0; k < K; k++) {
            const int e = ids[t * K + k];
            for (int i = 0; i < I; i++) {
                double g = 0, u = 0;
                const float *gr = ex->gate_f + ((size_t)e * I + i) * H, *ur = ex->up_f + ((size_t)e * I + i) * H;
                for (int c = 0; c < H; c++) { g += (double)gr[c] * xq[c]; u += (double)ur[c] * xq[c]; }
                h[i] = (float)(g / (1.0 + exp(-g)) * u);
            }
            act_roundtrip(h, I, ex->down_type, hq);
            for (int c = 0; c < I; c++) hr[c] = h[c] - hq[c];
            if (residual) act_roundtrip(hr, I, ex->down_type, hrq);
            else memset(hrq, 0, sizeof(float) * I);
            for (int r = 0; r < H; r++) {
                double s = 0;
                const float *dr = ex->down_f + ((size_t)e * H + r) * I;
                for (int c = 0; c < I; c++) s += (double)dr[c] * ((double)hq[c] + hrq[c]);
                y[(size_t)t * H + r] += w[t * K + k] * s;
            }
        }
    }
    free(xq); free(h); free(hq); free(hr); free(hrq);
}

/* see tests/test_kernels.py: every token within 5e-3 of the scale, all but a few within 1e-5 */
static int close_to_reference(const float *y, const double *ref, int T, int H) {
    double scale = 0;
    for (int i = 0; i < T * H; i++) scale = fmax(scale, fabs(ref[i]));
    int off = 0, ok = 1;
    for (int t = 0; t < T; t++) {
        double m = 0;
        for (int r = 0; r < H; r++) m = fmax(m, fabs(y[t * H + r] - ref[t * H + r]));
        if (m > 5e-3 * scale) ok = 0;
        if (m > 1e-5 * scale) off++;
    }
    return ok && off <= (T / 8 > 1 ? T / 8 : 1);
}

static void test_moe(void) {
    static const int cases[][5] = {  /* gate/up type, down type, E, H, I */
        {HK2_Q4_0, HK2_Q4_0, 6, 96, 64}, {HK2_Q8_0, HK2_Q8_0, 6, 160, 96}, {HK2_Q4_0, HK2_Q6_K, 4, 256, 256},
        {HK2_Q4_K, HK2_Q6_K, 4, 256, 512}, {HK2_Q6_K, HK2_Q4_K, 4, 512, 256},
        {HK2_Q4_0_R8, HK2_Q4_0_R8, 6, 96, 64}, {HK2_Q4_0_R8, HK2_Q6_K, 4, 256, 256}, {HK2_Q8_0, HK2_Q4_0_R8, 5, 160, 96},
        {HK2_Q4_K_R8, HK2_Q4_K_R8, 4, 256, 512}, {HK2_Q4_K_R8, HK2_Q6_K, 4, 512, 256}, {HK2_Q6_K, HK2_Q4_K_R8, 3, 256, 256},
    };
    static const int Ts[] = {1, 3, 17};
    const int K = 4;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        experts ex;
        make_experts(&ex, cases[c][0], cases[c][1], cases[c][2], cases[c][3], cases[c][4]);
        const int H = ex.H;
        for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++) {
            const int T = Ts[ti];
            float *x = malloc(sizeof(float) * T * H), *w = malloc(sizeof(float) * T * K);
            float *y = malloc(sizeof(float) * T * H), *y1 = malloc(sizeof(float) * T * H);
            int32_t *ids = malloc(sizeof(int32_t) * T * K);
            double *ref = malloc(sizeof(double) * T * H), *ref_r = malloc(sizeof(double) * T * H);
            for (int i = 0; i < T * H; i++) x[i] = nrand();
            for (int i = 0; i < T * K; i++) { ids[i] = (int32_t)(urand() * ex.E); w[i] = (float)urand(); }
            ids[0 * K + 1] = ids[0 * K + 0];  /* an expert twice in one token */
            reference(&ex, T, K, x, ids, w, 0, ref);
            reference(&ex, T, K, x, ids, w, 1, ref_r);
            for (size_t ii = 0; ii < sizeof ISAS / sizeof ISAS[0]; ii++) {
                if (hk2_isa_supported(ISAS[ii]) != 1) continue;
                CHECK(hk2_set_isa(ISAS[ii]) == HK2_OK, "set_isa %s", ISAS[ii]);
                for (int flags = 0; flags <= HK2_MOE_H_RESIDUAL; flags++)
                    for (int nt = 1; nt <= 3; nt++) {
                        CHECK(hk2_set_threads(nt) == HK2_OK, "set_threads");
                        float *out = nt == 1 ? y1 : y;
                        CHECK(hk2_moe_forward(&ex.layer, T, K, x, ids, w, out, flags) == HK2_OK, "moe_forward");
                        if (nt == 1)
                            CHECK(close_to_reference(out, flags ? ref_r : ref, T, H), "case %zu T=%d isa=%s flags=%d differs from the reference",
                                  c, T, ISAS[ii], flags);
                        else
                            CHECK(memcmp(y, y1, sizeof(float) * T * H) == 0, "case %zu T=%d isa=%s: %d threads differ from 1", c, T,
                                  ISAS[ii], nt);
                    }
            }
            free(x); free(w); free(y); free(y1); free(ids); free(ref); free(ref_r);
        }
        free_experts(&ex);
    }
}

/* ---------------------------------------------------------------- bad arguments, pool */
static void test_bad_arguments(void) {
    experts ex;
    make_experts(&ex, HK2_Q4_0, HK2_Q4_0, 4, 64, 64);
    float x[2 * 64], w[4] = {1, 1, 1, 1}, y[2 * 64];
    for (int i = 0; i < 128; i++) x[i] = nrand();
    int32_t ids[4] = {0, 1, 2, 3}, bad_ids[4] = {0, 1, 4, 3}, neg_ids[4] = {0, -1, 2, 3};
    CHECK(hk2_moe_forward(&ex.layer, 2, 2, x, ids, w, y, 0) == HK2_OK, "good call");
    CHECK(hk2_moe_forward(&ex.layer, 2, 2, x, bad_ids, w, y, 0) == HK2_EID, "id 4 of 4");
    CHECK(strstr(hk2_last_error(), "ids[1, 0] = 4") != NULL, "message names the id: %s", hk2_last_error());
    CHECK(hk2_moe_forward(&ex.layer, 2, 2, x, ids, w, y, 6) == HK2_EINVAL, "unknown flag bits");
    CHECK(hk2_moe_forward(&ex.layer, 2, 2, x, neg_ids, w, y, 0) == HK2_EID, "negative id");
    CHECK(hk2_moe_forward(NULL, 2, 2, x, ids, w, y, 0) == HK2_EINVAL, "null layer");
    CHECK(hk2_moe_forward(&ex.layer, 2, 2, NULL, ids, w, y, 0) == HK2_EINVAL, "null x");
    CHECK(hk2_moe_forward(&ex.layer, 2, 2, x, ids, w, NULL, 0) == HK2_EINVAL, "null y");
    CHECK(hk2_moe_forward(&ex.layer, 2, 0, x, ids, w, y, 0) == HK2_ESHAPE, "top_k 0");
    CHECK(hk2_moe_forward(&ex.layer, -1, 2, x, ids, w, y, 0) == HK2_ESHAPE, "negative tokens");
    CHECK(hk2_moe_forward(&ex.layer, 0, 2, x, ids, w, y, 0) == HK2_OK, "no tokens");
    hk2_moe_layer bad = ex.layer;
    bad.gate_type = HK2_Q8_K;
    CHECK(hk2_moe_forward(&bad, 2, 2, x, ids, w, y, 0) == HK2_ETYPE, "activation type as weights");
    bad = ex.layer;
    bad.hidden = 48;
    CHECK(hk2_moe_forward(&bad, 2, 2, x, ids, w, y, 0) == HK2_ESHAPE, "hidden not a block multiple");
    bad = ex.layer;
    bad.down_type = HK2_Q4_K;  /* inter 64 is no multiple of 256 */
    CHECK(hk2_moe_forward(&bad, 2, 2, x, ids, w, y, 0) == HK2_ESHAPE, "inter not a K block multiple");
    const void *null_ptrs[4] = {ex.gp[0], NULL, ex.gp[2], ex.gp[3]};
    bad = ex.layer;
    bad.gate = null_ptrs;
    CHECK(hk2_moe_forward(&bad, 2, 2, x, ids, w, y, 0) == HK2_EINVAL, "null expert pointer");
    const void *odd_ptrs[4] = {ex.gp[0], (const uint8_t *)ex.gp[1] + 1, ex.gp[2], ex.gp[3]};
    bad.gate = odd_ptrs;
    CHECK(hk2_moe_forward(&bad, 2, 2, x, ids, w, y, 0) == HK2_EINVAL, "odd expert pointer");
    CHECK(hk2_set_threads(0) == HK2_EINVAL, "0 threads");
    CHECK(hk2_set_isa("sse9") == HK2_EISA, "unknown isa");
    CHECK(hk2_isa_supported("sse9") == HK2_EISA, "unknown isa name");
    free_experts(&ex);
}

/* Structs validated once (hk2_*_check): the calls then check only their own arguments. An unchecked struct is
 * still checked in full on every call, so a bad pointer is an error, not a crash. */
static void test_bind_checks(void) {
    experts ex;
    make_experts(&ex, HK2_Q8_0, HK2_Q4_0, 4, 64, 64);
    float x[2 * 64], w[4] = {0.5f, 0.25f, 1, 2}, y0[2 * 64], y1[2 * 64];
    for (int i = 0; i < 128; i++) x[i] = nrand();
    int32_t ids[4] = {0, 1, 2, 1}, bad_ids[4] = {0, 1, 2, 4};
    const void *null_ptrs[4] = {ex.gp[0], ex.gp[1], ex.gp[2], NULL};
    hk2_moe_layer bad = ex.layer;
    bad.gate = null_ptrs;
    CHECK(bad.checked == 0, "a new layer is unchecked");
    CHECK(hk2_moe_forward(&bad, 2, 2, x, ids, w, y0, 0) == HK2_EINVAL && strstr(hk2_last_error(), "expert 3"),
          "unchecked layer with a NULL expert pointer: %s", hk2_last_error());
    bad.checked = 1;   /* not the mark hk2_moe_layer_check sets: still checked in full */
    CHECK(hk2_moe_forward(&bad, 2, 2, x, ids, w, y0, 0) == HK2_EINVAL, "layer with a made-up checked value");
    CHECK(hk2_moe_layer_check(&bad) == HK2_EINVAL && bad.checked == 0, "hk2_moe_layer_check finds the NULL pointer");
    CHECK(hk2_moe_layer_check(NULL) == HK2_EINVAL, "hk2_moe_layer_check(NULL)");
    hk2_moe_layer good = ex.layer;
    CHECK(hk2_moe_forward(&good, 2, 2, x, ids, w, y0, 0) == HK2_OK, "unchecked good layer");
    CHECK(hk2_moe_layer_check(&good) == HK2_OK && good.checked != 0, "hk2_moe_layer_check of a good layer");
    CHECK(hk2_moe_forward(&good, 2, 2, x, ids, w, y1, 0) == HK2_OK, "checked layer runs");
    CHECK(memcmp(y0, y1, sizeof y0) == 0, "checked and unchecked layer give the same y");
    CHECK(hk2_moe_forward(&good, 2, 2, x, bad_ids, w, y1, 0) == HK2_EID && strstr(hk2_last_error(), "ids[1, 1] = 4"),
          "checked layer, id out of range: %s", hk2_last_error());
    CHECK(hk2_moe_forward(&good, -1, 2, x, ids, w, y1, 0) == HK2_ESHAPE, "checked layer, negative tokens");
    CHECK(hk2_moe_forward(&good, 2, 0, x, ids, w, y1, 0) == HK2_ESHAPE, "checked layer, top_k 0");
    CHECK(hk2_moe_forward(&good, 2, 2, x, NULL, w, y1, 0) == HK2_EINVAL, "checked layer, null ids");
    CHECK(hk2_moe_forward(&good, 2, 2, x, ids, w, y1, 8) == HK2_EINVAL, "checked layer, unknown flag bits");
    /* a field changed after the check, in the struct or in a copy of it: checked in full again */
    bad = good;
    bad.gate = null_ptrs;
    CHECK(hk2_moe_forward(&bad, 2, 2, x, ids, w, y1, 0) == HK2_EINVAL, "checked layer copied, its gate array changed");
    bad = good;
    bad.down_type = HK2_Q8_K;
    CHECK(hk2_moe_forward(&bad, 2, 2, x, ids, w, y1, 0) == HK2_ETYPE, "checked layer copied, its down type changed");
    good.inter = 48;
    CHECK(hk2_moe_forward(&good, 2, 2, x, ids, w, y1, 0) == HK2_ESHAPE, "checked layer, its inter changed");
    good.inter = ex.I;
    CHECK(hk2_moe_forward(&good, 2, 2, x, ids, w, y1, 0) == HK2_OK, "the mark again matches the checked fields");
    /* what the layer points to is not walked again per call: an entry of its pointer arrays changed after the check
     * goes unseen by a call that does not use that expert (the caller's promise), until the layer is checked again */
    const void *keep = ex.gp[3];
    ex.gp[3] = NULL;
    CHECK(hk2_moe_forward(&good, 2, 2, x, ids, w, y1, 0) == HK2_OK, "checked layer: expert 3 not walked per call");
    CHECK(memcmp(y0, y1, sizeof y0) == 0, "the same y without expert 3");
    CHECK(hk2_moe_layer_check(&good) == HK2_EINVAL && good.checked == 0, "checking again finds the change");
    CHECK(hk2_moe_forward(&good, 2, 2, x, ids, w, y1, 0) == HK2_EINVAL, "and the calls check it in full again");
    ex.gp[3] = keep;
    free_experts(&ex);

    enum { E = 8, RH = 32, RK = 2 };
    float rw[E * RH], rx[2 * RH], rw0[2 * RK], rw1[2 * RK];
    int32_t id0[2 * RK], id1[2 * RK];
    for (int i = 0; i < E * RH; i++) rw[i] = nrand();
    for (int i = 0; i < 2 * RH; i++) rx[i] = nrand();
    hk2_router r = {.n_experts = E, .hidden = RH, .top_k = RK, .n_group = 1, .topk_group = 1, .softmax = 1,
                    .norm_topk = 1, .scaling = 1.0f, .weight = NULL};
    CHECK(hk2_route(&r, 2, rx, id0, rw0) == HK2_EINVAL && strstr(hk2_last_error(), "weight"), "unchecked router, no weight");
    CHECK(hk2_router_check(&r) == HK2_EINVAL && r.checked == 0, "hk2_router_check finds the NULL weight");
    r.weight = rw;
    CHECK(hk2_route(&r, 2, rx, id0, rw0) == HK2_OK, "unchecked router");
    CHECK(hk2_router_check(&r) == HK2_OK && r.checked != 0, "hk2_router_check");
    CHECK(hk2_route(&r, 2, rx, id1, rw1) == HK2_OK, "checked router runs");
    CHECK(memcmp(id0, id1, sizeof id0) == 0 && memcmp(rw0, rw1, sizeof rw0) == 0, "checked router, same choice");
    CHECK(hk2_route(&r, -1, rx, id1, rw1) == HK2_ESHAPE, "checked router, negative tokens");
    CHECK(hk2_route(&r, 2, rx, NULL, rw1) == HK2_EINVAL, "checked router, null ids");
    r.top_k = E + 1;
    CHECK(hk2_route(&r, 2, rx, id1, rw1) == HK2_ESHAPE, "checked router, its top_k changed");
}

static void test_pool_lifecycle(void) {
    experts ex;
    make_experts(&ex, HK2_Q8_0, HK2_Q8_0, 4, 64, 64);
    float x[3 * 64], w[6] = {1, 1, 1, 1, 1, 1}, y[3 * 64], y0[3 * 64];
    int32_t ids[6] = {0, 1, 2, 3, 3, 0};
    for (int i = 0; i < 192; i++) x[i] = nrand();
    CHECK(hk2_set_threads(1) == HK2_OK && hk2_get_threads() == 1, "1 thread");
    CHECK(hk2_moe_forward(&ex.layer, 3, 2, x, ids, w, y0, 0) == HK2_OK, "1-thread call");
    for (int round = 0; round < 20; round++) {
        const int n = 1 + round % 5;
        CHECK(hk2_set_threads(n) == HK2_OK && hk2_get_threads() == n, "resize to %d", n);
        CHECK(hk2_moe_forward(&ex.layer, 3, 2, x, ids, w, y, 0) == HK2_OK, "call after resize");
        CHECK(memcmp(y, y0, sizeof y) == 0, "result after resize to %d", n);
        if (round % 7 == 3) hk2_shutdown();  /* the next call rebuilds the pool */
    }
    uint8_t buf[100000];
    uint64_t want = 0;
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (uint8_t)(i * 31 + 7);
    for (size_t i = 0; i + 8 <= sizeof buf; i += 8) { uint64_t v; memcpy(&v, buf + i, 8); want += v; }
    CHECK(hk2_read_probe(buf, sizeof buf) == want, "probe checksum");
    free_experts(&ex);
}

/* ---- decode ops: hk2_rms_norm and hk2_mla_decode against straightforward double-precision references ---- */
static void mla_reference(const hk2_mla *m, int64_t pos, const float *q, const float *kv_a, const float *rot,
                          const float *kv_cache, const float *pe_cache, double *o) {
    /* expanded form: per-head keys k[s] = [W_k c[s], r[s]] and values v[s] = W_v c[s], then softmax attention;
     * rows < pos come from the caches, row pos from kv_a */
    const int64_t H = m->n_heads, nope = m->nope, rope = m->rope, vd = m->v_dim, R = m->rank, S = pos + 1;
    double *c = calloc((size_t)(S * R), sizeof(double)), *r = calloc((size_t)(S * rope), sizeof(double));
    double *p = calloc((size_t)S, sizeof(double)), *qp = calloc((size_t)rope, sizeof(double));
    for (int64_t s = 0; s < pos; s++) {
        for (int64_t i = 0; i < R; i++) c[s * R + i] = kv_cache[s * R + i];
        for (int64_t i = 0; i < rope; i++) r[s * rope + i] = pe_cache[s * rope + i];
    }
    double ss = 0;
    for (int64_t i = 0; i < R; i++) ss += (double)kv_a[i] * kv_a[i];
    for (int64_t i = 0; i < R; i++) c[pos * R + i] = kv_a[i] / sqrt(ss / R + m->eps) * m->kv_norm[i];
    for (int64_t i = 0; i < rope / 2; i++) {
        const double a = kv_a[R + 2 * i], b = kv_a[R + 2 * i + 1];
        r[pos * rope + 2 * i] = a * rot[2 * i] - b * rot[2 * i + 1];
        r[pos * rope + 2 * i + 1] = a * rot[2 * i + 1] + b * rot[2 * i];
    }
    for (int64_t h = 0; h < H; h++) {
        const float *qh = q + h * (nope + rope), *w = m->wkv_b + h * (nope + vd) * R;
        for (int64_t i = 0; i < rope / 2; i++) {
            const double a = qh[nope + 2 * i], b = qh[nope + 2 * i + 1];
            qp[2 * i] = a * rot[2 * i] - b * rot[2 * i + 1];
            qp[2 * i + 1] = a * rot[2 * i + 1] + b * rot[2 * i];
        }
        double mx = -1e300, sum = 0;
        for (int64_t s = 0; s < S; s++) {
            double dot = 0;
            for (int64_t d = 0; d < nope; d++) {
                double k = 0;
                for (int64_t i = 0; i < R; i++) k += (double)w[d * R + i] * c[s * R + i];
                dot += qh[d] * k;
            }
            for (int64_t i = 0; i < rope; i++) dot += qp[i] * r[s * rope + i];
            p[s] = dot * m->scale;
            if (p[s] > mx) mx = p[s];
        }
        for (int64_t s = 0; s < S; s++) { p[s] = exp(p[s] - mx); sum += p[s]; }
        for (int64_t v = 0; v < vd; v++) {
            double acc = 0;
            for (int64_t s = 0; s < S; s++) {
                double val = 0;
                for (int64_t i = 0; i < R; i++) val += (double)w[(nope + v) * R + i] * c[s * R + i];
                acc += p[s] / sum * val;
            }
            o[h * vd + v] = acc;
        }
    }
    free(c); free(r); free(p); free(qp);
}

/* random MLA weights and inputs: wkv_b, norm, q, kv_a, a rotation, and cache rows 0..pos */
static void fill_mla_inputs(int64_t H, int64_t nope, int64_t rope, int64_t vd, int64_t R, int64_t pos, float *wkv_b,
                            float *norm, float *q, float *kv_a, float *rot, float *kvc, float *pec) {
    for (int64_t i = 0; i < H * (nope + vd) * R; i++) wkv_b[i] = 0.2f * nrand();
    for (int64_t i = 0; i < R; i++) norm[i] = 1.0f + 0.1f * nrand();
    for (int64_t i = 0; i < H * (nope + rope); i++) q[i] = nrand();
    for (int64_t i = 0; i < R + rope; i++) kv_a[i] = nrand();
    for (int64_t i = 0; i < rope / 2; i++) { rot[2 * i] = cosf(0.3f * (float)i); rot[2 * i + 1] = sinf(0.3f * (float)i); }
    for (int64_t i = 0; i < (pos + 1) * R; i++) kvc[i] = nrand();
    for (int64_t i = 0; i < (pos + 1) * rope; i++) pec[i] = nrand();
}

/* hk2_mla_decode on every ISA here at 1-3 threads: within tol (relative to the largest |ref|) of the reference,
 * not exact when inexact (8-bit activations), and the same bits at every thread count */
static void check_mla(const hk2_mla *m, int64_t pos, const float *q, const float *kv_a, const float *rot, float *kvc,
                      float *pec, const double *ref, float *o, float *o1, double tol, int inexact, const char *what) {
    const int64_t n = m->n_heads * m->v_dim;
    for (size_t ii = 0; ii < sizeof ISAS / sizeof ISAS[0]; ii++) {
        if (hk2_isa_supported(ISAS[ii]) != 1) continue;
        CHECK(hk2_set_isa(ISAS[ii]) == HK2_OK, "set_isa %s", ISAS[ii]);
        for (int nt = 1; nt <= 3; nt++) {
            CHECK(hk2_set_threads(nt) == HK2_OK, "set_threads");
            CHECK(hk2_mla_decode(m, pos, q, kv_a, rot, kvc, pec, nt == 1 ? o1 : o) == HK2_OK, "%s: %s", what, hk2_last_error());
            const float *out = nt == 1 ? o1 : o;
            double err = 0, mag = 0;
            for (int64_t i = 0; i < n; i++) {
                err = fmax(err, fabs(out[i] - ref[i]));
                mag = fmax(mag, fabs(ref[i]));
            }
            CHECK(err <= tol * mag && (!inexact || err > 0), "%s isa=%s threads=%d: max error %g of %g", what, ISAS[ii], nt,
                  err, mag);
            if (nt > 1) CHECK(memcmp(o, o1, sizeof(float) * n) == 0, "%s isa=%s: %d threads differ from 1", what, ISAS[ii], nt);
        }
    }
}

static void test_decode_ops(void) {
    const int64_t H = 3, nope = 16, rope = 8, vd = 12, R = 40, POS = 6;
    float *wkv_b = malloc(sizeof(float) * H * (nope + vd) * R), *norm = malloc(sizeof(float) * R);
    float *q = malloc(sizeof(float) * H * (nope + rope)), *kv_a = malloc(sizeof(float) * (R + rope));
    float *rot = malloc(sizeof(float) * rope), *kvc = malloc(sizeof(float) * (POS + 1) * R);
    float *pec = malloc(sizeof(float) * (POS + 1) * rope), *o = malloc(sizeof(float) * H * vd);
    float *o1 = malloc(sizeof(float) * H * vd);
    double *ref = malloc(sizeof(double) * H * vd);
    fill_mla_inputs(H, nope, rope, vd, R, POS, wkv_b, norm, q, kv_a, rot, kvc, pec);
    hk2_mla m = {.n_heads = H, .nope = nope, .rope = rope, .v_dim = vd, .rank = R, .scale = 0.2f, .eps = 1e-6f,
                 .wkv_b = wkv_b, .kv_norm = norm};
    mla_reference(&m, POS, q, kv_a, rot, kvc, pec, ref);
    check_mla(&m, POS, q, kv_a, rot, kvc, pec, ref, o, o1, 1e-4, 0, "mla_decode");
    for (size_t ii = 0; ii < sizeof ISAS / sizeof ISAS[0]; ii++) {
        if (hk2_isa_supported(ISAS[ii]) != 1) continue;
        CHECK(hk2_set_isa(ISAS[ii]) == HK2_OK, "set_isa %s", ISAS[ii]);
        /* rms_norm in place on one row and out of place on three */
        float x[3 * 40], y[3 * 40];
        for (int i = 0; i < 3 * 40; i++) x[i] = nrand();
        CHECK(hk2_rms_norm(x, norm, 3, R, 1e-6f, y) == HK2_OK, "rms_norm");
        for (int r = 0; r < 3; r++) {
            double ss = 0;
            for (int i = 0; i < R; i++) ss += (double)x[r * R + i] * x[r * R + i];
            for (int i = 0; i < R; i++) {
                const double want = x[r * R + i] / sqrt(ss / R + 1e-6) * norm[i];
                CHECK(fabs(y[r * R + i] - want) <= 1e-5 * (1 + fabs(want)), "rms_norm isa=%s row %d col %d", ISAS[ii], r, i);
            }
        }
        float z[40];
        memcpy(z, x, sizeof z);
        CHECK(hk2_rms_norm(z, norm, 1, R, 1e-6f, z) == HK2_OK, "rms_norm in place");
        CHECK(memcmp(z, y, sizeof z) == 0, "rms_norm in place isa=%s differs from out of place", ISAS[ii]);
    }
    hk2_set_isa(ISAS[1]);
    hk2_set_threads(2);
    hk2_mla bad = m;
    bad.rope = 7;
    CHECK(hk2_mla_decode(&bad, POS, q, kv_a, rot, kvc, pec, o) == HK2_ESHAPE, "odd rope");
    bad = m;
    bad.wkv_b = NULL;
    CHECK(hk2_mla_decode(&bad, POS, q, kv_a, rot, kvc, pec, o) == HK2_EINVAL, "null wkv_b");
    CHECK(strstr(hk2_last_error(), "wkv_b") != NULL, "message names wkv_b: %s", hk2_last_error());
    bad = m;
    bad.scale = -1.0f;
    CHECK(hk2_mla_decode(&bad, POS, q, kv_a, rot, kvc, pec, o) == HK2_EINVAL, "negative scale");
    CHECK(hk2_mla_decode(NULL, POS, q, kv_a, rot, kvc, pec, o) == HK2_EINVAL, "null m");
    CHECK(hk2_mla_decode(&m, -1, q, kv_a, rot, kvc, pec, o) == HK2_ESHAPE, "negative pos");
    CHECK(hk2_mla_decode(&m, POS, q, kv_a, rot, NULL, pec, o) == HK2_EINVAL, "null kv_cache");
    CHECK(hk2_mla_decode(&m, POS, (const float *)((const char *)q + 1), kv_a, rot, kvc, pec, o) == HK2_EINVAL, "misaligned q");
    CHECK(hk2_rms_norm(kv_a, norm, 1, 0, 1e-6f, o) == HK2_ESHAPE, "rms_norm n=0");
    CHECK(hk2_rms_norm(kv_a, NULL, 1, R, 1e-6f, o) == HK2_EINVAL, "rms_norm null weight");
    CHECK(hk2_rms_norm(kv_a, norm, 1, R, -1.0f, o) == HK2_EINVAL, "rms_norm negative eps");
    bad = m;
    bad.kv_norm = NULL;
    CHECK(hk2_mla_check(&bad) == HK2_EINVAL && bad.checked == 0 && strstr(hk2_last_error(), "kv_norm"),
          "hk2_mla_check finds the NULL kv_norm: %s", hk2_last_error());
    CHECK(hk2_mla_decode(&bad, POS, q, kv_a, rot, kvc, pec, o) == HK2_EINVAL, "unchecked mla, NULL kv_norm");
    CHECK(hk2_mla_decode(&m, POS, q, kv_a, rot, kvc, pec, o1) == HK2_OK, "unchecked mla");
    CHECK(hk2_mla_check(&m) == HK2_OK && m.checked != 0, "hk2_mla_check");
    CHECK(hk2_mla_decode(&m, POS, q, kv_a, rot, kvc, pec, o) == HK2_OK, "checked mla runs");
    CHECK(memcmp(o, o1, sizeof(float) * H * vd) == 0, "checked and unchecked mla give the same o");
    CHECK(hk2_mla_decode(&m, -1, q, kv_a, rot, kvc, pec, o) == HK2_ESHAPE, "checked mla, negative pos");
    CHECK(hk2_mla_decode(&m, POS, q, kv_a, rot, kvc, NULL, o) == HK2_EINVAL, "checked mla, null pe_cache");
    CHECK(hk2_mla_decode(&m, POS, q, kv_a, rot, kvc, pec, (float *)((char *)o + 2)) == HK2_EINVAL, "checked mla, misaligned o");
    bad = m;
    bad.rope = 7;
    CHECK(hk2_mla_decode(&bad, POS, q, kv_a, rot, kvc, pec, o) == HK2_ESHAPE, "checked mla copied, rope changed");
    free(wkv_b); free(norm); free(q); free(kv_a); free(rot); free(kvc); free(pec); free(o); free(o1); free(ref);

    /* router: 12 experts in 3 groups of 4, the best 2 groups compete; ids unique, best first, in kept groups */
    enum { E = 12, RH = 40, RK = 3, RT = 4 };
    float rw[E * RH], rb[E], rx[RT * RH], rwt[RT * RK];
    int32_t rid[RT * RK];
    for (int i = 0; i < E * RH; i++) rw[i] = 0.5f * nrand();
    for (int i = 0; i < E; i++) rb[i] = 0.1f * (float)urand();
    for (int i = 0; i < RT * RH; i++) rx[i] = nrand();
    hk2_router rt = {.n_experts = E, .hidden = RH, .top_k = RK, .n_group = 3, .topk_group = 2, .softmax = 0,
                     .norm_topk = 1, .scaling = 2.5f, .weight = rw, .bias = rb};
    CHECK(hk2_route(&rt, RT, rx, rid, rwt) == HK2_OK, "route: %s", hk2_last_error());
    for (int t = 0; t < RT; t++) {
        float sum = 0;
        int groups[3] = {0, 0, 0};
        for (int k = 0; k < RK; k++) {
            const int e = rid[t * RK + k];
            CHECK(e >= 0 && e < E, "route: id %d", e);
            groups[e / 4] = 1;
            for (int k2 = 0; k2 < k; k2++) CHECK(rid[t * RK + k2] != e, "route: id %d twice", e);
            sum += rwt[t * RK + k];
        }
        CHECK(groups[0] + groups[1] + groups[2] <= 2, "route: ids from more than topk_group groups");
        CHECK(fabsf(sum - 2.5f) < 1e-5f, "route: weights sum to %g, not the scaling", sum);
    }
    rt.top_k = 9;
    CHECK(hk2_route(&rt, RT, rx, rid, rwt) == HK2_ESHAPE, "route: top_k beyond the open experts");
    rt.top_k = RK;
    rt.n_group = 5;
    CHECK(hk2_route(&rt, RT, rx, rid, rwt) == HK2_ESHAPE, "route: n_group not dividing n_experts");
    rt.n_group = 3;
    CHECK(hk2_route(&rt, RT, NULL, rid, rwt) == HK2_EINVAL, "route: null x");
    CHECK(hk2_route(NULL, RT, rx, rid, rwt) == HK2_EINVAL, "route: null router");

    /* attention block: one call equals its pieces called one by one */
    enum { D = 64, AH = 2, ANOPE = 16, AROPE = 8, AV = 16, AR = 32, QA = 32, AP = 3 };
    static float wq_a[QA * D], wq_b[AH * (ANOPE + AROPE) * QA], wkv_a[(AR + AROPE) * D], wo[D * AH * AV];
    static float wkvb[AH * (ANOPE + AV) * AR], nin[D], nqa[QA], nkv[AR], arot[AROPE];
    float *fw[] = {wq_a, wq_b, wkv_a, wo, wkvb, nin, nqa, nkv};
    const int fn[] = {QA * D, AH * (ANOPE + AROPE) * QA, (AR + AROPE) * D, D * AH * AV, AH * (ANOPE + AV) * AR, D, QA, AR};
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < fn[i]; j++) fw[i][j] = i < 5 ? 0.2f * nrand() : 1.0f + 0.1f * nrand();
    for (int i = 0; i < AROPE / 2; i++) { arot[2 * i] = cosf(0.5f * (float)i); arot[2 * i + 1] = sinf(0.5f * (float)i); }
    static uint8_t bq_a[QA * 68], bq_b[48 * 34], bkv_a[40 * 68], bo[D * 34];
    CHECK(hk2_quantize(HK2_Q8_0, wq_a, QA, D, bq_a) == HK2_OK, "quantize q_a");
    CHECK(hk2_quantize(HK2_Q8_0, wq_b, 48, QA, bq_b) == HK2_OK, "quantize q_b");
    CHECK(hk2_quantize(HK2_Q8_0, wkv_a, 40, D, bkv_a) == HK2_OK, "quantize kv_a");
    CHECK(hk2_quantize(HK2_Q8_0, wo, D, AH * AV, bo) == HK2_OK, "quantize o");
    hk2_attn at = {.mla = {.n_heads = AH, .nope = ANOPE, .rope = AROPE, .v_dim = AV, .rank = AR, .scale = 0.2f, .eps = 1e-6f,
                           .wkv_b = wkvb, .kv_norm = nkv},
                   .hidden = D, .input_norm = nin, .input_eps = 1e-6f, .q_a_norm = nqa, .q_a_eps = 1e-6f,
                   .q_a = {HK2_Q8_0, bq_a, QA, D}, .q_b = {HK2_Q8_0, bq_b, 48, QA}, .kv_a = {HK2_Q8_0, bkv_a, 40, D},
                   .o = {HK2_Q8_0, bo, D, AH * AV}};
    float ax[D], aout[D], kc1[AP * AR] = {0}, pc1[AP * AROPE] = {0}, kc2[AP * AR] = {0}, pc2[AP * AROPE] = {0};
    float xn[D], qa[QA], qq[48], kva[40], att[AH * AV], dl[D];
    for (int pos = 0; pos < AP; pos++) {
        for (int i = 0; i < D; i++) ax[i] = nrand();
        CHECK(hk2_attn_decode(&at, pos, ax, arot, kc1, pc1, aout) == HK2_OK, "attn_decode: %s", hk2_last_error());
        CHECK(hk2_rms_norm(ax, nin, 1, D, 1e-6f, xn) == HK2_OK, "rms_norm");
        CHECK(hk2_linear(HK2_Q8_0, bq_a, QA, D, 1, xn, qa) == HK2_OK, "linear q_a");
        CHECK(hk2_rms_norm(qa, nqa, 1, QA, 1e-6f, qa) == HK2_OK, "rms_norm q_a");
        CHECK(hk2_linear(HK2_Q8_0, bq_b, 48, QA, 1, qa, qq) == HK2_OK, "linear q_b");
        CHECK(hk2_linear(HK2_Q8_0, bkv_a, 40, D, 1, xn, kva) == HK2_OK, "linear kv_a");
        CHECK(hk2_mla_decode(&at.mla, pos, qq, kva, arot, kc2, pc2, att) == HK2_OK, "mla_decode");
        CHECK(hk2_linear(HK2_Q8_0, bo, D, AH * AV, 1, att, dl) == HK2_OK, "linear o");
        int same = 1;
        for (int i = 0; i < D; i++) same &= aout[i] == ax[i] + dl[i];
        CHECK(same, "attn_decode at pos %d differs from its pieces", pos);
        CHECK(memcmp(kc1, kc2, sizeof kc1) == 0 && memcmp(pc1, pc2, sizeof pc1) == 0, "attn_decode cache rows at pos %d", pos);
    }
    at.o.cols = 48;
    CHECK(hk2_attn_decode(&at, 0, ax, arot, kc1, pc1, aout) == HK2_ESHAPE, "attn_decode: o of the wrong width");
    CHECK(strstr(hk2_last_error(), "o is 64 x 48") != NULL, "message names o: %s", hk2_last_error());
    at.o.cols = AH * AV;
    at.q_b.qtype = 9999;
    CHECK(hk2_attn_decode(&at, 0, ax, arot, kc1, pc1, aout) == HK2_ETYPE, "attn_decode: bad q_b type");
    CHECK(strstr(hk2_last_error(), "q_b") != NULL, "message names q_b: %s", hk2_last_error());
    CHECK(hk2_attn_decode(NULL, 0, ax, arot, kc1, pc1, aout) == HK2_EINVAL, "attn_decode: null block");
    CHECK(hk2_attn_check(&at) == HK2_ETYPE && at.checked == 0 && strstr(hk2_last_error(), "q_b"),
          "hk2_attn_check finds the bad q_b type: %s", hk2_last_error());
    at.q_b.qtype = HK2_Q8_0;
    at.mla.kv_norm = NULL;
    CHECK(hk2_attn_check(&at) == HK2_EINVAL && strstr(hk2_last_error(), "kv_norm"), "hk2_attn_check checks its mla too");
    at.mla.kv_norm = nkv;
    CHECK(hk2_attn_decode(&at, 1, ax, arot, kc1, pc1, aout) == HK2_OK, "unchecked attn");
    CHECK(hk2_attn_check(&at) == HK2_OK && at.checked != 0, "hk2_attn_check");
    float aout2[D];
    CHECK(hk2_attn_decode(&at, 1, ax, arot, kc2, pc2, aout2) == HK2_OK, "checked attn runs");
    CHECK(memcmp(aout, aout2, sizeof aout) == 0, "checked and unchecked attn give the same out");
    CHECK(hk2_attn_decode(&at, -1, ax, arot, kc1, pc1, aout) == HK2_ESHAPE, "checked attn, negative pos");
    CHECK(hk2_attn_decode(&at, 1, ax, NULL, kc1, pc1, aout) == HK2_EINVAL && strstr(hk2_last_error(), "rot"),
          "checked attn, null rot: %s", hk2_last_error());
    CHECK(hk2_attn_decode(&at, 1, NULL, arot, kc1, pc1, aout) == HK2_EINVAL, "checked attn, null x");
    hk2_attn copy = at;
    copy.o.cols = 48;
    CHECK(hk2_attn_decode(&copy, 1, ax, arot, kc1, pc1, aout) == HK2_ESHAPE, "checked attn copied, o changed");
}

/* hk2_mla_decode reading kv_b as GGML blocks (a GGUF's attn_k_b / attn_v_b): against the double reference
 * on the dequantized weights (the only difference left is q_nope's and o_lat's 8-bit rounding) */
static void test_mla_kv_b_blocks(void) {
    const int64_t H = 3, nope = 32, rope = 8, vd = 16, R = 64, POS = 6;
    float *wkv_b = malloc(sizeof(float) * H * (nope + vd) * R), *norm = malloc(sizeof(float) * R);
    float *kt = malloc(sizeof(float) * H * R * nope), *q = malloc(sizeof(float) * H * (nope + rope));
    float *kv_a = malloc(sizeof(float) * (R + rope)), *rot = malloc(sizeof(float) * rope);
    float *kvc = malloc(sizeof(float) * (POS + 1) * R), *pec = malloc(sizeof(float) * (POS + 1) * rope);
    float *o = malloc(sizeof(float) * H * vd), *o1 = malloc(sizeof(float) * H * vd);
    double *ref = malloc(sizeof(double) * H * vd);
    fill_mla_inputs(H, nope, rope, vd, R, POS, wkv_b, norm, q, kv_a, rot, kvc, pec);
    const int types[] = {HK2_Q8_0, HK2_Q4_0};
    for (int ti = 0; ti < 2; ti++) {
        const int t = types[ti];
        /* k_b [H * R, nope] = each head's W_k transposed; v_b [H * vd, R] = each head's W_v */
        for (int64_t h = 0; h < H; h++)
            for (int64_t c = 0; c < R; c++)
                for (int64_t d = 0; d < nope; d++) kt[(h * R + c) * nope + d] = wkv_b[(h * (nope + vd) + d) * R + c];
        uint8_t *kb = malloc((size_t)(H * R * hk2_row_bytes(t, nope))), *vb = malloc((size_t)(H * vd * hk2_row_bytes(t, R)));
        float *vt = malloc(sizeof(float) * H * vd * R);
        for (int64_t h = 0; h < H; h++) memcpy(vt + h * vd * R, wkv_b + (h * (nope + vd) + nope) * R, sizeof(float) * vd * R);
        CHECK(hk2_quantize(t, kt, H * R, nope, kb) == HK2_OK && hk2_quantize(t, vt, H * vd, R, vb) == HK2_OK, "quantize k_b/v_b");
        /* the reference reads the dequantized blocks back in kv_b's layout */
        float *deq = malloc(sizeof(float) * H * (nope + vd) * R);
        CHECK(hk2_dequantize(t, kb, H * R, nope, kt) == HK2_OK && hk2_dequantize(t, vb, H * vd, R, vt) == HK2_OK, "dequantize");
        for (int64_t h = 0; h < H; h++) {
            for (int64_t c = 0; c < R; c++)
                for (int64_t d = 0; d < nope; d++) deq[(h * (nope + vd) + d) * R + c] = kt[(h * R + c) * nope + d];
            memcpy(deq + (h * (nope + vd) + nope) * R, vt + h * vd * R, sizeof(float) * vd * R);
        }
        hk2_mla m = {.n_heads = H, .nope = nope, .rope = rope, .v_dim = vd, .rank = R, .scale = 0.2f, .eps = 1e-6f,
                     .wkv_b = deq, .kv_norm = norm};
        for (int64_t i = 0; i < (POS + 1) * R; i++) kvc[i] = nrand();
        mla_reference(&m, POS, q, kv_a, rot, kvc, pec, ref);
        m.wkv_b = NULL;   /* not read when the blocks are given */
        m.k_b = (hk2_matrix){.qtype = t, .w = kb, .rows = H * R, .cols = nope};
        m.v_b = (hk2_matrix){.qtype = t, .w = vb, .rows = H * vd, .cols = R};
        check_mla(&m, POS, q, kv_a, rot, kvc, pec, ref, o, o1, 2e-2, 1, t == HK2_Q8_0 ? "mla_decode Q8_0 kv_b" : "mla_decode Q4_0 kv_b");
        hk2_set_isa(ISAS[1]);
        hk2_mla bad = m;
        bad.v_b.w = NULL;
        CHECK(hk2_mla_decode(&bad, POS, q, kv_a, rot, kvc, pec, o) == HK2_EINVAL && strstr(hk2_last_error(), "v_b"),
              "k_b without v_b: %s", hk2_last_error());
        bad = m;
        bad.k_b.cols = nope + 32;
        CHECK(hk2_mla_decode(&bad, POS, q, kv_a, rot, kvc, pec, o) == HK2_ESHAPE && strstr(hk2_last_error(), "k_b"),
              "k_b of the wrong width: %s", hk2_last_error());
        bad = m;
        bad.k_b.qtype = HK2_Q4_K;   /* 32 columns do not fill a 256-value block */
        CHECK(hk2_mla_decode(&bad, POS, q, kv_a, rot, kvc, pec, o) == HK2_ESHAPE && strstr(hk2_last_error(), "k_b"),
              "k_b as Q4_K: %s", hk2_last_error());
        free(kb); free(vb); free(vt); free(deq);
    }
    free(wkv_b); free(norm); free(kt); free(q); free(kv_a); free(rot); free(kvc); free(pec); free(o); free(o1); free(ref);
}

int main(void) {
    printf("hk2 kernel tests, ISAs here:");
    for (size_t i = 0; i < sizeof ISAS / sizeof ISAS[0]; i++)
        if (hk2_isa_supported(ISAS[i]) == 1) printf(" %s", ISAS[i]);
    printf("\n");
    test_formats();
    test_moe();
    test_bad_arguments();
    test_decode_ops();
    test_bind_checks();
    test_mla_kv_b_blocks();
    test_pool_lifecycle();
    hk2_shutdown();
    if (g_failures) {
        fprintf(stderr, "%d check(s) failed\n", g_failures);
        return 1;
    }
    printf("all checks passed\n");
    return 0;
}
