/* IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S: the lattice (grid) 2- and 3-bit types. Reference dequantizers, the
 * scalar dot kernels and the type table (hk2_type_ops, hk2_internal.h); block layouts in quants_iq23.h.
 * No quantizers: files of these types come from llama.cpp's llama-quantize (importance-matrix searches).
 * Dequantization rounds as gguf's: (d * (0.5 + ls) * c) * grid * sign, each step in float32. */
#include "quants_iq23.h"

static inline uint32_t rd32(const void *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* 8 values of grid entry g (value j in byte j) with sign byte s (bit j: value j negative), times db */
static inline void put8(float *y, float db, uint64_t g, uint8_t s) {
    for (int j = 0; j < 8; j++) {
        const float v = db * (float)(int8_t)(g >> (8 * j));
        y[j] = (s >> j) & 1 ? -v : v;
    }
}
/* two iq3 grid entries (4 values each) as one 8-value entry */
static inline uint64_t cat32(uint32_t lo, uint32_t hi) { return (uint64_t)lo | ((uint64_t)hi << 32); }

static void dequantize_row_iq2_xxs(const void *vx, float *y, int64_t n) {
    const block_iq2_xxs *x = vx;
    for (int64_t b = 0; b < n / HK2_QK_K; b++, y += HK2_QK_K) {
        const float d = hk2_fp16_to_fp32(x[b].d);
        for (int ib = 0; ib < 8; ib++) {
            const uint32_t a0 = rd32(x[b].qs + 4 * ib), a1 = rd32(x[b].qs + 4 * ib + 2);
            const float db = d * (0.5f + (float)(a1 >> 28)) * 0.25f;
            for (int l = 0; l < 4; l++)
                put8(y + 32 * ib + 8 * l, db, hk2_iq2xxs_grid[(a0 >> (8 * l)) & 0xFF], hk2_ksigns[(a1 >> (7 * l)) & 0x7F]);
        }
    }
}

static void dequantize_row_iq2_xs(const void *vx, float *y, int64_t n) {
    const block_iq2_xs *x = vx;
    for (int64_t b = 0; b < n / HK2_QK_K; b++, y += HK2_QK_K) {
        const float d = hk2_fp16_to_fp32(x[b].d);
        for (int g = 0; g < 32; g++) {
            const float db = d * (0.5f + (float)((x[b].scales[g / 4] >> (4 * ((g / 2) & 1))) & 0xF)) * 0.25f;
            const uint16_t q = x[b].qs[g];
            put8(y + 8 * g, db, hk2_iq2xs_grid[q & 511], hk2_ksigns[q >> 9]);
        }
    }
}

static void dequantize_row_iq2_s(const void *vx, float *y, int64_t n) {
    const block_iq2_s *x = vx;
    for (int64_t b = 0; b < n / HK2_QK_K; b++, y += HK2_QK_K) {
        const float d = hk2_fp16_to_fp32(x[b].d);
        for (int g = 0; g < 32; g++) {
            const float db = d * (0.5f + (float)((x[b].scales[g / 4] >> (4 * ((g / 2) & 1))) & 0xF)) * 0.25f;
            const int idx = x[b].qs[g] | (((x[b].qh[g / 4] >> (2 * (g % 4))) & 3) << 8);
            put8(y + 8 * g, db, hk2_iq2s_grid[idx], x[b].signs[g]);
        }
    }
}

static void dequantize_row_iq3_xxs(const void *vx, float *y, int64_t n) {
    const block_iq3_xxs *x = vx;
    for (int64_t b = 0; b < n / HK2_QK_K; b++, y += HK2_QK_K) {
        const float d = hk2_fp16_to_fp32(x[b].d);
        const uint8_t *q = x[b].qs;
        for (int ib = 0; ib < 8; ib++) {
            const uint32_t a = rd32(x[b].sas + 4 * ib);
            const float db = d * (0.5f + (float)(a >> 28)) * 0.5f;
            for (int l = 0; l < 4; l++, q += 2)
                put8(y + 32 * ib + 8 * l, db, cat32(hk2_iq3xxs_grid[q[0]], hk2_iq3xxs_grid[q[1]]), hk2_ksigns[(a >> (7 * l)) & 0x7F]);
        }
    }
}

static void dequantize_row_iq3_s(const void *vx, float *y, int64_t n) {
    const block_iq3_s *x = vx;
    for (int64_t b = 0; b < n / HK2_QK_K; b++, y += HK2_QK_K) {
        const float d = hk2_fp16_to_fp32(x[b].d);
        for (int ib = 0; ib < 8; ib++) {
            const float db = d * (float)(1 + 2 * ((x[b].scales[ib / 2] >> (4 * (ib & 1))) & 0xF));
            const uint8_t *q = x[b].qs + 8 * ib;
            const int h = x[b].qh[ib];
            for (int l = 0; l < 4; l++) {
                const uint32_t g0 = hk2_iq3s_grid[q[2 * l] | (((h >> (2 * l)) & 1) << 8)];
                const uint32_t g1 = hk2_iq3s_grid[q[2 * l + 1] | (((h >> (2 * l + 1)) & 1) << 8)];
                put8(y + 32 * ib + 8 * l, db, cat32(g0, g1), x[b].signs[4 * ib + l]);
            }
        }
    }
}

/* sum over 8 values of grid * sign * activation */
static inline int dot8(uint64_t g, uint8_t s, const int8_t *y) {
    int sum = 0;
    for (int j = 0; j < 8; j++) {
        const int v = (int8_t)(g >> (8 * j)) * y[j];
        sum += (s >> j) & 1 ? -v : v;
    }
    return sum;
}

/* The dots: per super-block an integer sum of (integer scale) x (sub-block dot), then one float multiply
 * by d_w * d_a; the constant factor of the scale (1/8, 1/4) is applied once at the end. */
static void dot_iq2_xxs(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_iq2_xxs *x = w;
    for (int j = 0; j < na; j++) {
        float sum = 0.0f;
        for (int b = 0; b < n / HK2_QK_K; b++) {
            const int8_t *y = a[j].qs + b * HK2_QK_K;
            int sumi = 0;
            for (int ib = 0; ib < 8; ib++) {
                const uint32_t a0 = rd32(x[b].qs + 4 * ib), a1 = rd32(x[b].qs + 4 * ib + 2);
                int si = 0;
                for (int l = 0; l < 4; l++)
                    si += dot8(hk2_iq2xxs_grid[(a0 >> (8 * l)) & 0xFF], hk2_ksigns[(a1 >> (7 * l)) & 0x7F], y + 32 * ib + 8 * l);
                sumi += (int)(2 * (a1 >> 28) + 1) * si;
            }
            sum += hk2_fp16_to_fp32(x[b].d) * a[j].d[b] * (float)sumi;
        }
        s[j] = 0.125f * sum;
    }
}

static void dot_iq2_xs(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_iq2_xs *x = w;
    for (int j = 0; j < na; j++) {
        float sum = 0.0f;
        for (int b = 0; b < n / HK2_QK_K; b++) {
            const int8_t *y = a[j].qs + b * HK2_QK_K;
            int sumi = 0;
            for (int h = 0; h < 16; h++) {  /* 16-value halves of the sub-blocks, one scale each */
                int si = 0;
                for (int l = 0; l < 2; l++) {
                    const uint16_t q = x[b].qs[2 * h + l];
                    si += dot8(hk2_iq2xs_grid[q & 511], hk2_ksigns[q >> 9], y + 16 * h + 8 * l);
                }
                sumi += (2 * ((x[b].scales[h / 2] >> (4 * (h & 1))) & 0xF) + 1) * si;
            }
            sum += hk2_fp16_to_fp32(x[b].d) * a[j].d[b] * (float)sumi;
        }
        s[j] = 0.125f * sum;
    }
}

static void dot_iq2_s(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_iq2_s *x = w;
    for (int j = 0; j < na; j++) {
        float sum = 0.0f;
        for (int b = 0; b < n / HK2_QK_K; b++) {
            const int8_t *y = a[j].qs + b * HK2_QK_K;
            int sumi = 0;
            for (int h = 0; h < 16; h++) {
                int si = 0;
                for (int l = 0; l < 2; l++) {
                    const int g = 2 * h + l;
                    const int idx = x[b].qs[g] | (((x[b].qh[g / 4] >> (2 * (g % 4))) & 3) << 8);
                    si += dot8(hk2_iq2s_grid[idx], x[b].signs[g], y + 8 * g);
                }
                sumi += (2 * ((x[b].scales[h / 2] >> (4 * (h & 1))) & 0xF) + 1) * si;
            }
            sum += hk2_fp16_to_fp32(x[b].d) * a[j].d[b] * (float)sumi;
        }
        s[j] = 0.125f * sum;
    }
}

static void dot_iq3_xxs(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_iq3_xxs *x = w;
    for (int j = 0; j < na; j++) {
        float sum = 0.0f;
        for (int b = 0; b < n / HK2_QK_K; b++) {
            const int8_t *y = a[j].qs + b * HK2_QK_K;
            const uint8_t *q = x[b].qs;
            int sumi = 0;
            for (int ib = 0; ib < 8; ib++) {
                const uint32_t sa = rd32(x[b].sas + 4 * ib);
                int si = 0;
                for (int l = 0; l < 4; l++, q += 2)
                    si += dot8(cat32(hk2_iq3xxs_grid[q[0]], hk2_iq3xxs_grid[q[1]]), hk2_ksigns[(sa >> (7 * l)) & 0x7F],
                               y + 32 * ib + 8 * l);
                sumi += (int)(2 * (sa >> 28) + 1) * si;
            }
            sum += hk2_fp16_to_fp32(x[b].d) * a[j].d[b] * (float)sumi;
        }
        s[j] = 0.25f * sum;
    }
}

static void dot_iq3_s(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_iq3_s *x = w;
    for (int j = 0; j < na; j++) {
        float sum = 0.0f;
        for (int b = 0; b < n / HK2_QK_K; b++) {
            const int8_t *y = a[j].qs + b * HK2_QK_K;
            int sumi = 0;
            for (int ib = 0; ib < 8; ib++) {
                const uint8_t *q = x[b].qs + 8 * ib;
                const int h = x[b].qh[ib];
                int si = 0;
                for (int l = 0; l < 4; l++) {
                    const uint32_t g0 = hk2_iq3s_grid[q[2 * l] | (((h >> (2 * l)) & 1) << 8)];
                    const uint32_t g1 = hk2_iq3s_grid[q[2 * l + 1] | (((h >> (2 * l + 1)) & 1) << 8)];
                    si += dot8(cat32(g0, g1), x[b].signs[4 * ib + l], y + 32 * ib + 8 * l);
                }
                sumi += (1 + 2 * ((x[b].scales[ib / 2] >> (4 * (ib & 1))) & 0xF)) * si;
            }
            sum += hk2_fp16_to_fp32(x[b].d) * a[j].d[b] * (float)sumi;
        }
        s[j] = sum;
    }
}

#ifndef HK2_NO_X86
void hk2_dot_iq2_xxs_avx2(int, const void *, const hk2_arow *, int, float *);
void hk2_dot_iq2_xs_avx2(int, const void *, const hk2_arow *, int, float *);
void hk2_dot_iq2_s_avx2(int, const void *, const hk2_arow *, int, float *);
void hk2_dot_iq3_xxs_avx2(int, const void *, const hk2_arow *, int, float *);
void hk2_dot_iq3_s_avx2(int, const void *, const hk2_arow *, int, float *);
void hk2_dot_iq2_xxs_avx512vnni(int, const void *, const hk2_arow *, int, float *);
void hk2_dot_iq2_xs_avx512vnni(int, const void *, const hk2_arow *, int, float *);
void hk2_dot_iq2_s_avx512vnni(int, const void *, const hk2_arow *, int, float *);
void hk2_dot_iq3_xxs_avx512vnni(int, const void *, const hk2_arow *, int, float *);
void hk2_dot_iq3_s_avx512vnni(int, const void *, const hk2_arow *, int, float *);
#endif

#define IQ_ENTRY(T, t, bytes)                                                                  \
    {HK2_##T, #T, HK2_QK_K, bytes, HK2_QK_K, dequantize_row_##t, NULL,                       \
     {dot_##t, HK2_X86(hk2_dot_##t##_avx2), NULL, HK2_X86(hk2_dot_##t##_avx512vnni)}, {0}, 1}
const hk2_type_ops hk2_types_iq23[] = {
    IQ_ENTRY(IQ2_XXS, iq2_xxs, sizeof(block_iq2_xxs)),
    IQ_ENTRY(IQ2_XS, iq2_xs, sizeof(block_iq2_xs)),
    IQ_ENTRY(IQ2_S, iq2_s, sizeof(block_iq2_s)),
    IQ_ENTRY(IQ3_XXS, iq3_xxs, sizeof(block_iq3_xxs)),
    IQ_ENTRY(IQ3_S, iq3_s, sizeof(block_iq3_s)),
    {.name = NULL},
};
