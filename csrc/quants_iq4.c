/* IQ4_NL IQ4_XS: the non-linear 4-bit types. Block layouts, reference dequantizers and quantizers,
 * the scalar dot kernels and the type table (hk2_type_ops, hk2_internal.h).
 *
 * Both store 4-bit indices into one 16-entry int8 value table, qs[l] holding value l (low nibble) and
 * value l + 16 (high nibble) of each 32-value (sub-)block. IQ4_NL: per 32 values an fp16 scale d,
 * x = d * table[q]. IQ4_XS: per 256 values an fp16 d and eight 6-bit sub-block scales ls (low 4 bits in
 * scales_l, two nibbles a byte; high 2 bits in scales_h, two bits each), x = d * (ls - 32) * table[q].
 * The quantizers are ours (GGML's files come from llama.cpp's imatrix-weighted search): a small search
 * over scales mapping the block's extreme value to table levels, least-squares scale for each, nearest
 * table value per element, and a final pass against the stored (fp16-rounded) scale. */
#include "hk2_internal.h"

/* The IQ4_NL / IQ4_XS format's value table (GGML's kvalues_iq4nl): the int8 level each 4-bit index
 * stands for, ascending; indices 0..7 are the negative levels. Shared with the SIMD files. */
const int8_t hk2_iq4_values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

typedef struct { hk2_half d; uint8_t qs[16]; } block_iq4_nl;
typedef struct { hk2_half d; uint16_t scales_h; uint8_t scales_l[4]; uint8_t qs[128]; } block_iq4_xs;
_Static_assert(sizeof(block_iq4_nl) == 18, "block_iq4_nl layout");
_Static_assert(sizeof(block_iq4_xs) == 136, "block_iq4_xs layout");

static inline int nib(const uint8_t *qs, int l) { return l < 16 ? qs[l] & 0xF : qs[l - 16] >> 4; }
/* sub-block ib's 6-bit scale minus 32 */
static inline int xs_scale(const block_iq4_xs *x, int ib) {
    return (((x->scales_l[ib / 2] >> 4 * (ib % 2)) & 0xF) | ((x->scales_h >> 2 * ib) & 3) << 4) - 32;
}

/* the inverse: the 8 sub-block scales minus 32 (-32..31) packed */
static inline void xs_set_scales(block_iq4_xs *x, const int ls[8]) {
    x->scales_h = 0;
    memset(x->scales_l, 0, 4);
    for (int ib = 0; ib < 8; ib++) {
        const int u = ls[ib] + 32;
        x->scales_l[ib / 2] |= (uint8_t)((u & 0xF) << 4 * (ib % 2));
        x->scales_h |= (uint16_t)((u >> 4) << 2 * ib);
    }
}

/* ---------------- dequantize (gguf's float32 arithmetic) ---------------- */
static void dequantize_row_iq4_nl(const void *blocks, float *y, int64_t n) {
    const block_iq4_nl *x = blocks;
    for (int64_t b = 0; b < n / 32; b++) {
        const float d = hk2_fp16_to_fp32(x[b].d);
        for (int l = 0; l < 32; l++) y[32 * b + l] = d * (float)hk2_iq4_values[nib(x[b].qs, l)];
    }
}
static void dequantize_row_iq4_xs(const void *blocks, float *y, int64_t n) {
    const block_iq4_xs *x = blocks;
    for (int64_t b = 0; b < n / HK2_QK_K; b++) {
        const float d = hk2_fp16_to_fp32(x[b].d);
        for (int ib = 0; ib < 8; ib++) {
            const float dl = d * (float)xs_scale(&x[b], ib);
            for (int l = 0; l < 32; l++) y[HK2_QK_K * b + 32 * ib + l] = dl * (float)hk2_iq4_values[nib(x[b].qs + 16 * ib, l)];
        }
    }
}

/* ---------------- quantize ---------------- */
/* mid[k]: the boundary between levels k and k+1 */
static void level_midpoints(float mid[15]) {
    for (int k = 0; k < 15; k++) mid[k] = 0.5f * (float)(hk2_iq4_values[k] + hk2_iq4_values[k + 1]);
}
/* index of the table value nearest v (ties to the lower one): a binary search over the midpoints */
static inline int nearest_index(const float *mid, float v) {
    int i = v > mid[7] ? 8 : 0;
    i += v > mid[i + 3] ? 4 : 0;
    i += v > mid[i + 1] ? 2 : 0;
    return i + (v > mid[i] ? 1 : 0);
}
/* 32 values -> indices q and the least-squares scale for them; returns that scale (0 for an all-zero block) */
static float best_scale_32(const float *mid, const float *x, uint8_t q[32]) {
    float amax = 0.0f, mx = 0.0f;
    for (int l = 0; l < 32; l++) {
        const float a = x[l] < 0 ? -x[l] : x[l];
        if (a > amax) { amax = a; mx = x[l]; }
    }
    if (amax == 0.0f) {
        memset(q, 0, 32);
        return 0.0f;
    }
    /* candidates map the extreme value mx onto levels near the table's end -127 (the sign of the scale
     * follows mx, so -127 reaches the larger side); score: (sum x t)^2 / sum t^2 = the squared error saved */
    float best = -1.0f, best_d = 0.0f;
    for (int t = -6; t <= 6; t++) {
        const float id = ((float)hk2_iq4_values[0] + 2.0f * (float)t) / mx;
        float sxt = 0.0f, stt = 0.0f;
        uint8_t qt[32];
        for (int l = 0; l < 32; l++) {
            qt[l] = (uint8_t)nearest_index(mid, x[l] * id);
            const float v = (float)hk2_iq4_values[qt[l]];
            sxt += x[l] * v;
            stt += v * v;
        }
        const float score = sxt * sxt / stt;
        if (score > best) {
            best = score;
            best_d = sxt / stt;
            memcpy(q, qt, 32);
        }
    }
    return best_d;
}
/* indices of 32 values for the stored scale d */
static void requantize_32(const float *mid, const float *x, float d, uint8_t q[32]) {
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int l = 0; l < 32; l++) q[l] = (uint8_t)nearest_index(mid, x[l] * id);
}
static void pack_nibbles(const uint8_t q[32], uint8_t qs[16]) {
    for (int l = 0; l < 16; l++) qs[l] = (uint8_t)(q[l] | q[l + 16] << 4);
}
static void quantize_row_iq4_nl(const float *x, void *blocks, int64_t n) {
    block_iq4_nl *y = blocks;
    float mid[15];
    level_midpoints(mid);
    for (int64_t b = 0; b < n / 32; b++) {
        uint8_t q[32];
        const float d = best_scale_32(mid, x + 32 * b, q);
        y[b].d = hk2_fp32_to_fp16(d);
        requantize_32(mid, x + 32 * b, hk2_fp16_to_fp32(y[b].d), q);
        pack_nibbles(q, y[b].qs);
    }
}
static void quantize_row_iq4_xs(const float *x, void *blocks, int64_t n) {
    block_iq4_xs *y = blocks;
    float mid[15];
    level_midpoints(mid);
    for (int64_t b = 0; b < n / HK2_QK_K; b++) {
        const float *xb = x + HK2_QK_K * b;
        float sc[8], smax = 0.0f, amax = 0.0f;
        uint8_t q[32];
        for (int ib = 0; ib < 8; ib++) {
            sc[ib] = best_scale_32(mid, xb + 32 * ib, q);
            const float a = sc[ib] < 0 ? -sc[ib] : sc[ib];
            if (a > amax) { amax = a; smax = sc[ib]; }
        }
        /* the largest sub-block scale becomes ls - 32 = -32, the end of the 6-bit range with the most room */
        y[b].d = hk2_fp32_to_fp16(smax / -32.0f);
        const float d = hk2_fp16_to_fp32(y[b].d);
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        int ls[8];
        for (int ib = 0; ib < 8; ib++) {
            ls[ib] = hk2_roundf_int(sc[ib] * id);
            ls[ib] = ls[ib] < -32 ? -32 : ls[ib] > 31 ? 31 : ls[ib];
            requantize_32(mid, xb + 32 * ib, d * (float)ls[ib], q);
            pack_nibbles(q, y[b].qs + 16 * ib);
        }
        xs_set_scales(&y[b], ls);
    }
}

/* ---------------- scalar dots: integer sums per (sub-)block, one float multiply-add per block ---------------- */
/* the 32 values of a (sub-)block: indices q (value l) times the activations */
static inline int levels_dot(const uint8_t q[32], const int8_t *y) {
    int sum = 0;
    for (int l = 0; l < 32; l++) sum += hk2_iq4_values[q[l]] * y[l];
    return sum;
}
static inline void unpack_nibbles(const uint8_t qs[16], uint8_t q[32]) {
    for (int l = 0; l < 32; l++) q[l] = (uint8_t)nib(qs, l);
}
static inline float blk_iq4_nl(const block_iq4_nl *x, const int8_t *y, const int16_t *bs, float da) {
    uint8_t q[32];
    unpack_nibbles(x->qs, q);
    return hk2_fp16_to_fp32(x->d) * da * (float)levels_dot(q, y);
}
HK2_SCALAR_DOT(iq4_nl, block_iq4_nl, 32)
static inline float blk_iq4_xs(const block_iq4_xs *x, const int8_t *y, const int16_t *bs, float da) {
    int sumi = 0;
    for (int ib = 0; ib < 8; ib++) {
        uint8_t q[32];
        unpack_nibbles(x->qs + 16 * ib, q);
        sumi += xs_scale(x, ib) * levels_dot(q, y + 32 * ib);
    }
    return hk2_fp16_to_fp32(x->d) * da * (float)sumi;
}
HK2_SCALAR_DOT(iq4_xs, block_iq4_xs, HK2_QK_K)

/* ---------------- IQ4_XS_R8: 8 rows interleaved per super-block (csrc/hk2.h) ----------------
 * Run k (8 bytes) of row r's sub-block j holds that row's IQ4_XS qs[16j + 8k .. +8]: low nibbles are values
 * 8k.. 8k+7 of the sub-block, high nibbles 16 + 8k ... An 8-byte run per row lets a kernel broadcast 8
 * activation bytes (one qword) against 4-byte lanes (row r, half h) of a vector. */
typedef struct { hk2_half d[HK2_R8]; int8_t sc[8][HK2_R8]; uint8_t qs[HK2_R8 * 128]; } block_iq4_xsx8;
_Static_assert(sizeof(block_iq4_xsx8) == HK2_R8 * 138, "block_iq4_xsx8 layout");


static void put_iq4_xs_r8(void *out, int r, const void *in) {
    block_iq4_xsx8 *o = out;
    const block_iq4_xs *x = in;
    o->d[r] = x->d;
    for (int j = 0; j < 8; j++) {
        o->sc[j][r] = (int8_t)xs_scale(x, j);
        for (int k = 0; k < 2; k++) memcpy(o->qs + 128 * j + 64 * k + 8 * r, x->qs + 16 * j + 8 * k, 8);
    }
}
int hk2_repack_iq4_xs_r8(const void *src, int64_t nrows, int64_t ncols, void *dst) {
    return hk2_repack(HK2_IQ4_XS, HK2_IQ4_XS_R8, src, nrows, ncols, dst, put_iq4_xs_r8);
}
/* the inverse: row r's IQ4_XS block back out of the group's */
static void get_iq4_xs_r8(void *out, int r, const void *in) {
    block_iq4_xs *o = out;
    const block_iq4_xsx8 *x = in;
    int ls[8];
    o->d = x->d[r];
    for (int j = 0; j < 8; j++) {
        ls[j] = x->sc[j][r];
        for (int k = 0; k < 2; k++) memcpy(o->qs + 16 * j + 8 * k, x->qs + 128 * j + 64 * k + 8 * r, 8);
    }
    xs_set_scales(o, ls);
}
static void dequantize_rows_iq4_xs_r8(const void *blocks, float *y, int64_t n) {
    hk2_dequantize_r8(HK2_IQ4_XS, HK2_IQ4_XS_R8, get_iq4_xs_r8, blocks, y, n);
}


/* row r's IQ4_XS block taken back out, so the same integer sums as IQ4_XS's */
static inline float blk_iq4_xs_r8(const block_iq4_xsx8 *x, int r, const int8_t *y, const int16_t *bs, float da) {
    block_iq4_xs one;
    get_iq4_xs_r8(&one, r, x);
    return blk_iq4_xs(&one, y, bs, da);
}
HK2_SCALAR_DOT_R8(iq4_xs_r8, block_iq4_xsx8, HK2_QK_K)

HK2_DECLARE_DOTS(iq4_nl)
HK2_DECLARE_DOTS(iq4_xs)
HK2_DECLARE_DOTS(iq4_xs_r8)

const hk2_type_ops hk2_types_iq4[] = {
    {HK2_IQ4_NL, "IQ4_NL", 32, 18, 32, dequantize_row_iq4_nl, quantize_row_iq4_nl, HK2_DOTS(iq4_nl), {0, 0, 0, 8}, 1},
    {HK2_IQ4_XS, "IQ4_XS", 256, 136, 256, dequantize_row_iq4_xs, quantize_row_iq4_xs, HK2_DOTS(iq4_xs), {0, 0, 0, 8}, 1},
    {HK2_IQ4_XS_R8, "IQ4_XS_R8", 256, 138, 256, dequantize_rows_iq4_xs_r8, NULL, HK2_DOTS(iq4_xs_r8), {0, 0, 0, 8},
     HK2_R8},
    {.name = NULL},
};
