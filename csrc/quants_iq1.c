/* IQ1_S IQ1_M: the 1.5-bit grid types. Block layouts, reference dequantizers,
 * the scalar dot kernels and the type table (hk2_type_ops, hk2_internal.h).
 *
 * A group of 8 values is one hk2_iq1s_grid entry (values -1/0/1), index qs[g] | 3 high bits << 8, plus a delta
 * of +-1/8 for the group, times an odd scale (2s + 1) and the block's fp16 d. IQ1_S: per 32-value sub-block ib
 * one uint16 qh[ib] = 3 index bits per group (bits 3l..3l+2), the 3-bit scale (bits 12..14) and the delta sign
 * (bit 15, set: -1/8). IQ1_M: qh byte g/2's nibble g%2 = 3 index bits and the delta sign (bit 3); four uint16
 * scale words each hold four 3-bit scales of 16-value halves (bits 3k..3k+2 of word w: half 4w + k) and, in
 * their top nibbles (word w: bits 4w..4w+3), the block's fp16 d. No quantizers: these files come from
 * llama.cpp's (its quantizer needs an importance matrix).
 *
 * Dots: with the delta, 8 * (value / dl) = 8 g + sign is an integer in -9..9, so a 16-value half contributes
 * scale * sum (8 g + sign) * y exactly and the block d_w d_y / 8 times the sum of those. */
#include "hk2_internal.h"
#include "iq_grids.h"

/* ggml-common.h's layouts (the SIMD files repeat them) */
typedef struct { hk2_half d; uint8_t qs[32]; uint16_t qh[8]; } block_iq1_s;
typedef struct { uint8_t qs[32]; uint8_t qh[16]; uint8_t scales[8]; } block_iq1_m;
_Static_assert(sizeof(block_iq1_s) == 50, "block_iq1_s layout");
_Static_assert(sizeof(block_iq1_m) == 56, "block_iq1_m layout");

static inline int8_t grid_value(int idx, int k) { return (int8_t)(hk2_iq1s_grid[idx] >> (8 * k)); }

static inline float iq1_m_d(const block_iq1_m *x) {
    uint16_t sc[4];
    memcpy(sc, x->scales, 8);
    return hk2_fp16_to_fp32((hk2_half)((sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) | ((sc[2] >> 4) & 0x0F00) | (sc[3] & 0xF000)));
}

/* per group g (32 of a block): grid index, delta negative; per 16-value half h: the 3-bit scale; returns d */
static inline float iq1_s_fields(const block_iq1_s *x, int idx[32], int neg[32], int sc[16]) {
    for (int ib = 0; ib < 8; ib++) {
        const int qh = x->qh[ib];
        for (int l = 0; l < 4; l++) {
            idx[4 * ib + l] = x->qs[4 * ib + l] | ((qh >> (3 * l)) & 7) << 8;
            neg[4 * ib + l] = qh >> 15;
        }
        sc[2 * ib] = sc[2 * ib + 1] = (qh >> 12) & 7;
    }
    return hk2_fp16_to_fp32(x->d);
}
static inline float iq1_m_fields(const block_iq1_m *x, int idx[32], int neg[32], int sc[16]) {
    uint16_t w[4];
    memcpy(w, x->scales, 8);
    for (int g = 0; g < 32; g++) {
        const int nib = (x->qh[g / 2] >> (4 * (g % 2))) & 0xF;
        idx[g] = x->qs[g] | (nib & 7) << 8;
        neg[g] = nib >> 3;
    }
    for (int h = 0; h < 16; h++) sc[h] = (w[h / 4] >> (3 * (h % 4))) & 7;
    return iq1_m_d(x);
}

/* y = dl * (grid + delta), dl = d * (2 s + 1), in float32 as gguf computes it */
static void iq1_dequant_block(float d, const int idx[32], const int neg[32], const int sc[16], float *y) {
    for (int g = 0; g < 32; g++) {
        const float dl = d * (float)(2 * sc[g / 2] + 1);
        const float delta = neg[g] ? -0.125f : 0.125f;
        for (int k = 0; k < 8; k++) y[8 * g + k] = dl * ((float)grid_value(idx[g], k) + delta);
    }
}

/* sum over the block of (2 s + 1) * (8 g + sign) * y: 8 / (d_w d_y) times the block's dot */
static int iq1_block_sum(const int idx[32], const int neg[32], const int sc[16], const int8_t *y) {
    int total = 0;
    for (int h = 0; h < 16; h++) {
        int sum = 0;
        for (int g = 2 * h; g < 2 * h + 2; g++)
            for (int k = 0; k < 8; k++) sum += (8 * grid_value(idx[g], k) + (neg[g] ? -1 : 1)) * y[8 * g + k];
        total += (2 * sc[h] + 1) * sum;
    }
    return total;
}

/* the dequantizer and the dot of each type: each block read once (iq1_<t>_fields), for all activation rows */
#define IQ1_TYPE(t)                                                                                         \
    static void dequantize_row_##t(const void *blocks, float *y, int64_t n) {                               \
        const block_##t *x = blocks;                                                                        \
        int idx[32], neg[32], sc[16];                                                                       \
        for (int64_t b = 0; b < n / HK2_QK_K; b++) {                                                        \
            const float d = t##_fields(x + b, idx, neg, sc);                                                \
            iq1_dequant_block(d, idx, neg, sc, y + HK2_QK_K * b);                                           \
        }                                                                                                   \
    }                                                                                                       \
    static void dot_##t(int n, const void *w, const hk2_arow *a, int na, float *s) {                        \
        const block_##t *x = w;                                                                             \
        float acc[HK2_MAX_NA] = {0};                                                                        \
        int idx[32], neg[32], sc[16];                                                                       \
        for (int b = 0; b < n / HK2_QK_K; b++) {                                                            \
            const float d = 0.125f * t##_fields(x + b, idx, neg, sc);                                       \
            for (int j = 0; j < na; j++) acc[j] += d * a[j].d[b] * (float)iq1_block_sum(idx, neg, sc, a[j].qs + HK2_QK_K * b); \
        }                                                                                                   \
        for (int j = 0; j < na; j++) s[j] = acc[j];                                                         \
    }
IQ1_TYPE(iq1_s)
IQ1_TYPE(iq1_m)

HK2_DECLARE_DOTS(iq1_s)
HK2_DECLARE_DOTS(iq1_m)

const hk2_type_ops hk2_types_iq1[] = {
    {HK2_IQ1_S, "IQ1_S", HK2_QK_K, sizeof(block_iq1_s), HK2_QK_K, dequantize_row_iq1_s, NULL, HK2_DOTS(iq1_s), {0}, 1},
    {HK2_IQ1_M, "IQ1_M", HK2_QK_K, sizeof(block_iq1_m), HK2_QK_K, dequantize_row_iq1_m, NULL, HK2_DOTS(iq1_m), {0}, 1},
    {.name = NULL},
};
