/* IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S: the lattice (grid) 2- and 3-bit types. Reference dequantizers, the
 * scalar dot kernels and the type table (hk2_type_ops, hk2_internal.h); block layouts in quants_iq23.h.
 * No quantizers: files of these types come from llama.cpp's llama-quantize (importance-matrix searches).
 * Dequantization rounds as gguf's: (d * (0.5 + ls) * c) * grid * sign, each step in float32. Each type is read
 * through one function that unpacks a super-block into its 32 groups of 8 values (groups_<type>). */
#include "quants_iq23.h"

static inline uint32_t rd32(const void *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* two iq3 grid entries (4 values each) as one 8-value entry */
static inline uint64_t cat32(uint32_t lo, uint32_t hi) { return (uint64_t)lo | ((uint64_t)hi << 32); }

/* A super-block as its 32 groups of 8 values: group g's grid entry (value j in byte j), its sign byte (bit j:
 * value j negative) and the 4-bit scale ls of the (sub-)block it is in. The dequantizer and the dot of every type
 * below read a block through its groups_<type>. */
typedef struct { uint64_t grid[32]; uint8_t sign[32]; int ls[32]; } iq23_groups;

static void groups_iq2_xxs(const void *blk, iq23_groups *o) {
    const block_iq2_xxs *x = blk;
    for (int ib = 0; ib < 8; ib++) {
        const uint32_t a0 = rd32(x->qs + 4 * ib), a1 = rd32(x->qs + 4 * ib + 2);
        for (int l = 0; l < 4; l++) {
            o->grid[4 * ib + l] = hk2_iq2xxs_grid[(a0 >> (8 * l)) & 0xFF];
            o->sign[4 * ib + l] = hk2_ksigns[(a1 >> (7 * l)) & 0x7F];
            o->ls[4 * ib + l] = (int)(a1 >> 28);
        }
    }
}
/* IQ2_XS and IQ2_S: a scale per 16 values, two a byte */
static int half_scale(const uint8_t *scales, int g) { return (scales[g / 4] >> (4 * ((g / 2) & 1))) & 0xF; }
static void groups_iq2_xs(const void *blk, iq23_groups *o) {
    const block_iq2_xs *x = blk;
    for (int g = 0; g < 32; g++) {
        o->grid[g] = hk2_iq2xs_grid[x->qs[g] & 511];
        o->sign[g] = hk2_ksigns[x->qs[g] >> 9];
        o->ls[g] = half_scale(x->scales, g);
    }
}
static void groups_iq2_s(const void *blk, iq23_groups *o) {
    const block_iq2_s *x = blk;
    for (int g = 0; g < 32; g++) {
        o->grid[g] = hk2_iq2s_grid[x->qs[g] | (((x->qh[g / 4] >> (2 * (g % 4))) & 3) << 8)];
        o->sign[g] = x->signs[g];
        o->ls[g] = half_scale(x->scales, g);
    }
}
static void groups_iq3_xxs(const void *blk, iq23_groups *o) {
    const block_iq3_xxs *x = blk;
    for (int ib = 0; ib < 8; ib++) {
        const uint32_t a = rd32(x->sas + 4 * ib);
        for (int l = 0; l < 4; l++) {
            const uint8_t *q = x->qs + 8 * ib + 2 * l;
            o->grid[4 * ib + l] = cat32(hk2_iq3xxs_grid[q[0]], hk2_iq3xxs_grid[q[1]]);
            o->sign[4 * ib + l] = hk2_ksigns[(a >> (7 * l)) & 0x7F];
            o->ls[4 * ib + l] = (int)(a >> 28);
        }
    }
}
static void groups_iq3_s(const void *blk, iq23_groups *o) {
    const block_iq3_s *x = blk;
    for (int ib = 0; ib < 8; ib++) {
        const uint8_t *q = x->qs + 8 * ib;
        const int h = x->qh[ib];
        for (int l = 0; l < 4; l++) {
            o->grid[4 * ib + l] = cat32(hk2_iq3s_grid[q[2 * l] | (((h >> (2 * l)) & 1) << 8)],
                                        hk2_iq3s_grid[q[2 * l + 1] | (((h >> (2 * l + 1)) & 1) << 8)]);
            o->sign[4 * ib + l] = x->signs[4 * ib + l];
            o->ls[4 * ib + l] = (x->scales[ib / 2] >> (4 * (ib & 1))) & 0xF;
        }
    }
}

/* A type: its block reader and the scale's form, value = d * (0.5 + ls) * c * grid * sign, or with c = 0 (IQ3_S)
 * d * (2 ls + 1) * grid * sign. Every block starts with its fp16 d. */
typedef struct { void (*groups)(const void *, iq23_groups *); size_t bytes; float c; } iq23_type;

/* gguf's float32 arithmetic: (d * (0.5 + ls) * c) * grid * sign, each step in float32 */
static void dequantize_iq23(const iq23_type *t, const void *blocks, float *y, int64_t n) {
    for (int64_t b = 0; b < n / HK2_QK_K; b++, y += HK2_QK_K) {
        const uint8_t *blk = (const uint8_t *)blocks + (size_t)b * t->bytes;
        hk2_half hd;
        memcpy(&hd, blk, sizeof hd);
        const float d = hk2_fp16_to_fp32(hd);
        iq23_groups G;
        t->groups(blk, &G);
        for (int g = 0; g < 32; g++) {
            const float db = t->c != 0.0f ? d * (0.5f + (float)G.ls[g]) * t->c : d * (float)(1 + 2 * G.ls[g]);
            for (int j = 0; j < 8; j++) {
                const float v = db * (float)(int8_t)(G.grid[g] >> (8 * j));
                y[8 * g + j] = (G.sign[g] >> j) & 1 ? -v : v;
            }
        }
    }
}

/* The dot: per super-block an integer sum of (2 ls + 1) x (group dot), then one float multiply by d_w * d_a; the
 * constant factor of the scale (c / 2: 1/8, 1/4) is applied once at the end. */
static void dot_iq23(const iq23_type *t, int n, const void *w, const hk2_arow *a, int na, float *s) {
    for (int j = 0; j < na; j++) {
        float sum = 0.0f;
        for (int b = 0; b < n / HK2_QK_K; b++) {
            const uint8_t *blk = (const uint8_t *)w + (size_t)b * t->bytes;
            const int8_t *y = a[j].qs + b * HK2_QK_K;
            iq23_groups G;
            t->groups(blk, &G);
            int sumi = 0;
            for (int g = 0; g < 32; g++) {
                int si = 0;
                for (int k = 0; k < 8; k++) {
                    const int v = (int8_t)(G.grid[g] >> (8 * k)) * y[8 * g + k];
                    si += (G.sign[g] >> k) & 1 ? -v : v;
                }
                sumi += (2 * G.ls[g] + 1) * si;
            }
            hk2_half hd;
            memcpy(&hd, blk, sizeof hd);
            sum += hk2_fp16_to_fp32(hd) * a[j].d[b] * (float)sumi;
        }
        s[j] = (t->c != 0.0f ? 0.5f * t->c : 1.0f) * sum;
    }
}

#define IQ23_TYPE(t, c)                                                                                     \
    static const iq23_type type_##t = {groups_##t, sizeof(block_##t), c};                                  \
    static void dequantize_row_##t(const void *x, float *y, int64_t n) { dequantize_iq23(&type_##t, x, y, n); } \
    static void dot_##t(int n, const void *w, const hk2_arow *a, int na, float *s) { dot_iq23(&type_##t, n, w, a, na, s); }
IQ23_TYPE(iq2_xxs, 0.25f)
IQ23_TYPE(iq2_xs, 0.25f)
IQ23_TYPE(iq2_s, 0.25f)
IQ23_TYPE(iq3_xxs, 0.5f)
IQ23_TYPE(iq3_s, 0.0f)

HK2_DECLARE_DOTS(iq2_xxs)
HK2_DECLARE_DOTS(iq2_xs)
HK2_DECLARE_DOTS(iq2_s)
HK2_DECLARE_DOTS(iq3_xxs)
HK2_DECLARE_DOTS(iq3_s)

#define IQ_ENTRY(T, t) {HK2_##T, #T, HK2_QK_K, sizeof(block_##t), HK2_QK_K, dequantize_row_##t, NULL, HK2_DOTS(t), {0}, 1}
const hk2_type_ops hk2_types_iq23[] = {
    IQ_ENTRY(IQ2_XXS, iq2_xxs),
    IQ_ENTRY(IQ2_XS, iq2_xs),
    IQ_ENTRY(IQ2_S, iq2_s),
    IQ_ENTRY(IQ3_XXS, iq3_xxs),
    IQ_ENTRY(IQ3_S, iq3_s),
    {.name = NULL},
};
