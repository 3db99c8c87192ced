/* Q4_1 Q5_0 Q5_1: the 32-value legacy types with a min or a fifth bit. Block layouts, reference dequantizers and quantizers,
 * the scalar dot kernels and the type table (hk2_type_ops, hk2_internal.h).
 *
 * Layouts (ggml-common.h): qs[l] holds value l in its low nibble and value l + 16 in its high nibble; Q5's
 * qh is a little-endian uint32 whose bit l is value l's fifth bit. Q4_1/Q5_1: x = d * q + m; Q5_0: x = d * (q - 16).
 * The quantizers round exactly like ggml's reference ones (and gguf.quants.quantize): float32 min/max,
 * id = 1 / d, q = trunc(x * id + offset) clamped; the build has -ffp-contract=off so nothing fuses. */
#include "hk2_internal.h"

typedef struct { hk2_half d, m; uint8_t qs[16]; } block_q4_1;
typedef struct { hk2_half d; uint8_t qh[4]; uint8_t qs[16]; } block_q5_0;
typedef struct { hk2_half d, m; uint8_t qh[4]; uint8_t qs[16]; } block_q5_1;
_Static_assert(sizeof(block_q4_1) == 20, "block_q4_1 layout");
_Static_assert(sizeof(block_q5_0) == 22, "block_q5_0 layout");
_Static_assert(sizeof(block_q5_1) == 24, "block_q5_1 layout");

static inline uint32_t load_qh(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline void store_qh(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
/* value l (0..31) of a block: 4 low bits from qs, plus the fifth bit from qh for Q5 */
static inline int nib(const uint8_t *qs, int l) { return l < 16 ? qs[l] & 0xF : qs[l - 16] >> 4; }
static inline int q5(const uint8_t *qs, uint32_t qh, int l) { return nib(qs, l) | (int)((qh >> l) & 1) << 4; }

/* ---------------- dequantize (gguf's float32 arithmetic, operation for operation) ---------------- */
static void dequantize_row_q4_1(const void *blocks, float *y, int64_t n) {
    const block_q4_1 *x = blocks;
    for (int64_t b = 0; b < n / 32; b++) {
        const float d = hk2_fp16_to_fp32(x[b].d), m = hk2_fp16_to_fp32(x[b].m);
        for (int l = 0; l < 32; l++) y[32 * b + l] = d * (float)nib(x[b].qs, l) + m;
    }
}
static void dequantize_row_q5_0(const void *blocks, float *y, int64_t n) {
    const block_q5_0 *x = blocks;
    for (int64_t b = 0; b < n / 32; b++) {
        const float d = hk2_fp16_to_fp32(x[b].d);
        const uint32_t qh = load_qh(x[b].qh);
        for (int l = 0; l < 32; l++) y[32 * b + l] = d * (float)(q5(x[b].qs, qh, l) - 16);
    }
}
static void dequantize_row_q5_1(const void *blocks, float *y, int64_t n) {
    const block_q5_1 *x = blocks;
    for (int64_t b = 0; b < n / 32; b++) {
        const float d = hk2_fp16_to_fp32(x[b].d), m = hk2_fp16_to_fp32(x[b].m);
        const uint32_t qh = load_qh(x[b].qh);
        for (int l = 0; l < 32; l++) y[32 * b + l] = d * (float)q5(x[b].qs, qh, l) + m;
    }
}

/* ---------------- quantize (ggml's reference rounding) ---------------- */
static void pack_nibbles(const uint8_t q[32], uint8_t qs[16]) {
    for (int l = 0; l < 16; l++) qs[l] = (uint8_t)((q[l] & 0xF) | (q[l + 16] & 0xF) << 4);
}
static uint32_t pack_qh(const uint8_t q[32]) {
    uint32_t qh = 0;
    for (int l = 0; l < 32; l++) qh |= (uint32_t)(q[l] >> 4) << l;
    return qh;
}
static void min_max(const float *x, float *mn, float *mx) {
    float lo = x[0], hi = x[0];
    for (int l = 1; l < 32; l++) {
        lo = x[l] < lo ? x[l] : lo;
        hi = x[l] > hi ? x[l] : hi;
    }
    *mn = lo;
    *mx = hi;
}
/* the value of largest magnitude (the first of equals), sign kept */
static float abs_max_signed(const float *x) {
    float amax = 0.0f, m = 0.0f;
    for (int l = 0; l < 32; l++) {
        const float a = x[l] < 0 ? -x[l] : x[l];
        if (a > amax) { amax = a; m = x[l]; }
    }
    return m;
}
/* q = min(top, trunc(v)) for v >= 0 */
static inline uint8_t trunc_clamp(float v, int top) {
    const int q = (int)v;
    return (uint8_t)(q > top ? top : q);
}
/* Q4_1 / Q5_1: d = (max - min) / levels, q = trunc((x - min) * id + 0.5) */
static void quantize_min_block(const float *x, int levels, hk2_half *d_out, hk2_half *m_out, uint8_t q[32]) {
    float mn, mx;
    min_max(x, &mn, &mx);
    const float d = (mx - mn) / (float)levels;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int l = 0; l < 32; l++) q[l] = trunc_clamp((x[l] - mn) * id + 0.5f, levels);
    *d_out = hk2_fp32_to_fp16(d);
    *m_out = hk2_fp32_to_fp16(mn);
}
static void quantize_row_q4_1(const float *x, void *blocks, int64_t n) {
    block_q4_1 *y = blocks;
    for (int64_t b = 0; b < n / 32; b++) {
        uint8_t q[32];
        quantize_min_block(x + 32 * b, 15, &y[b].d, &y[b].m, q);
        pack_nibbles(q, y[b].qs);
    }
}
static void quantize_row_q5_1(const float *x, void *blocks, int64_t n) {
    block_q5_1 *y = blocks;
    for (int64_t b = 0; b < n / 32; b++) {
        uint8_t q[32];
        quantize_min_block(x + 32 * b, 31, &y[b].d, &y[b].m, q);
        pack_nibbles(q, y[b].qs);
        store_qh(y[b].qh, pack_qh(q));
    }
}
static void quantize_row_q5_0(const float *x, void *blocks, int64_t n) {
    block_q5_0 *y = blocks;
    for (int64_t b = 0; b < n / 32; b++) {
        const float *xb = x + 32 * b;
        const float d = abs_max_signed(xb) / -16.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        uint8_t q[32];
        for (int l = 0; l < 32; l++) q[l] = trunc_clamp(xb[l] * id + 16.5f, 31);
        y[b].d = hk2_fp32_to_fp16(d);
        pack_nibbles(q, y[b].qs);
        store_qh(y[b].qh, pack_qh(q));
    }
}

/* ---------------- scalar dots: integer sums per block, one float multiply-add per block ----------------
 * Q4_1/Q5_1: sum (d q + m) y_a d_a = d d_a sum q y + m d_a sum y, sum y from the 16-value sums bs. */
static inline float min_term(hk2_half d, hk2_half m, int sumi, const int16_t *bs, float da) {
    return da * (hk2_fp16_to_fp32(d) * (float)sumi + hk2_fp16_to_fp32(m) * (float)(bs[0] + bs[1]));
}
static inline float blk_q4_1(const block_q4_1 *x, const int8_t *y, const int16_t *bs, float da) {
    int sumi = 0;
    for (int l = 0; l < 32; l++) sumi += nib(x->qs, l) * y[l];
    return min_term(x->d, x->m, sumi, bs, da);
}
static inline float blk_q5_1(const block_q5_1 *x, const int8_t *y, const int16_t *bs, float da) {
    const uint32_t qh = load_qh(x->qh);
    int sumi = 0;
    for (int l = 0; l < 32; l++) sumi += q5(x->qs, qh, l) * y[l];
    return min_term(x->d, x->m, sumi, bs, da);
}
static inline float blk_q5_0(const block_q5_0 *x, const int8_t *y, const int16_t *bs, float da) {
    const uint32_t qh = load_qh(x->qh);
    int sumi = 0;
    for (int l = 0; l < 32; l++) sumi += (q5(x->qs, qh, l) - 16) * y[l];
    return da * hk2_fp16_to_fp32(x->d) * (float)sumi;
}
HK2_SCALAR_DOT(q4_1, block_q4_1, 32)
HK2_SCALAR_DOT(q5_0, block_q5_0, 32)
HK2_SCALAR_DOT(q5_1, block_q5_1, 32)

HK2_DECLARE_DOTS(q4_1)
HK2_DECLARE_DOTS(q5_0)
HK2_DECLARE_DOTS(q5_1)

const hk2_type_ops hk2_types_q[] = {
    {HK2_Q4_1, "Q4_1", 32, 20, 32, dequantize_row_q4_1, quantize_row_q4_1, HK2_DOTS(q4_1), {0}, 1},
    {HK2_Q5_0, "Q5_0", 32, 22, 32, dequantize_row_q5_0, quantize_row_q5_0, HK2_DOTS(q5_0), {0}, 1},
    {HK2_Q5_1, "Q5_1", 32, 24, 32, dequantize_row_q5_1, quantize_row_q5_1, HK2_DOTS(q5_1), {0}, 1},
    {.name = NULL},
};
