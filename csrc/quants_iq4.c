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
        y[b].scales_h = 0;
        memset(y[b].scales_l, 0, 4);
        for (int ib = 0; ib < 8; ib++) {
            int ls = hk2_roundf_int(sc[ib] * id);
            ls = ls < -32 ? -32 : ls > 31 ? 31 : ls;
            const int u = ls + 32;
            y[b].scales_l[ib / 2] |= (uint8_t)((u & 0xF) << 4 * (ib % 2));
            y[b].scales_h |= (uint16_t)((u >> 4) << 2 * ib);
            requantize_32(mid, xb + 32 * ib, d * (float)ls, q);
            pack_nibbles(q, y[b].qs + 16 * ib);
        }
    }
}

/* ---------------- scalar dots: integer sums per (sub-)block, one float multiply-add per block ---------------- */
static void dot_iq4_nl(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_iq4_nl *x = w;
    for (int j = 0; j < na; j++) {
        float sum = 0.0f;
        for (int b = 0; b < n / 32; b++) {
            const int8_t *y = a[j].qs + 32 * b;
            int sumi = 0;
            for (int l = 0; l < 32; l++) sumi += hk2_iq4_values[nib(x[b].qs, l)] * y[l];
            sum += hk2_fp16_to_fp32(x[b].d) * a[j].d[b] * (float)sumi;
        }
        s[j] = sum;
    }
}
static void dot_iq4_xs(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_iq4_xs *x = w;
    for (int j = 0; j < na; j++) {
        float sum = 0.0f;
        for (int b = 0; b < n / HK2_QK_K; b++) {
            const int8_t *y = a[j].qs + HK2_QK_K * b;
            int sumi = 0;
            for (int ib = 0; ib < 8; ib++) {
                int part = 0;
                for (int l = 0; l < 32; l++) part += hk2_iq4_values[nib(x[b].qs + 16 * ib, l)] * y[32 * ib + l];
                sumi += xs_scale(&x[b], ib) * part;
            }
            sum += hk2_fp16_to_fp32(x[b].d) * a[j].d[b] * (float)sumi;
        }
        s[j] = sum;
    }
}

/* ---------------- IQ4_XS_R8: 8 rows interleaved per super-block (csrc/hk2.h) ----------------
 * Run k (8 bytes) of row r's sub-block j holds that row's IQ4_XS qs[16j + 8k .. +8]: low nibbles are values
 * 8k.. 8k+7 of the sub-block, high nibbles 16 + 8k ... An 8-byte run per row lets a kernel broadcast 8
 * activation bytes (one qword) against 4-byte lanes (row r, half h) of a vector. */
typedef struct { hk2_half d[HK2_R8]; int8_t sc[8][HK2_R8]; uint8_t qs[HK2_R8 * 128]; } block_iq4_xsx8;
_Static_assert(sizeof(block_iq4_xsx8) == HK2_R8 * 138, "block_iq4_xsx8 layout");

/* index byte l (< 16) of row r's sub-block j */
static inline uint8_t xs8_byte(const block_iq4_xsx8 *x, int r, int j, int l) {
    return x->qs[128 * j + 64 * (l / 8) + 8 * r + l % 8];
}

int hk2_repack_iq4_xs_r8(const void *src, int64_t nrows, int64_t ncols, void *dst) {
    hk2_clear_error();
    if (!src || !dst) return hk2_fail(HK2_EINVAL, "repack: null %s pointer", !src ? "input" : "output");
    if (nrows < 0 || nrows % HK2_R8)
        return hk2_fail(HK2_ESHAPE, "repack: nrows=%lld is not a multiple of %d", (long long)nrows, HK2_R8);
    const int64_t rb = hk2_row_bytes(HK2_IQ4_XS, ncols);
    if (rb < 0) return (int)rb;
    const int64_t rb8 = hk2_row_bytes(HK2_IQ4_XS_R8, ncols);
    const uintptr_t s0 = (uintptr_t)src, d0 = (uintptr_t)dst;
    if (s0 < d0 + (uintptr_t)(nrows * rb8) && d0 < s0 + (uintptr_t)(nrows * rb))
        return hk2_fail(HK2_EINVAL, "repack: src and dst overlap");
    const int64_t nb = ncols / HK2_QK_K;
    for (int64_t g = 0; g < nrows / HK2_R8; g++) {
        const block_iq4_xs *in = (const block_iq4_xs *)((const uint8_t *)src + g * HK2_R8 * rb);
        block_iq4_xsx8 *out = (block_iq4_xsx8 *)((uint8_t *)dst + g * HK2_R8 * rb8);
        for (int64_t b = 0; b < nb; b++)
            for (int r = 0; r < HK2_R8; r++) {
                const block_iq4_xs *x = in + r * nb + b;
                out[b].d[r] = x->d;
                for (int j = 0; j < 8; j++) {
                    out[b].sc[j][r] = (int8_t)xs_scale(x, j);
                    for (int k = 0; k < 2; k++) memcpy(out[b].qs + 128 * j + 64 * k + 8 * r, x->qs + 16 * j + 8 * k, 8);
                }
            }
    }
    return HK2_OK;
}

/* the group's 8 rows -> y [8, n]; the same float ops as dequantize_row_iq4_xs, so the same values */
static void dequantize_rows_iq4_xs_r8(const void *blocks, float *y, int64_t n) {
    const block_iq4_xsx8 *x = blocks;
    for (int64_t b = 0; b < n / HK2_QK_K; b++)
        for (int r = 0; r < HK2_R8; r++) {
            const float d = hk2_fp16_to_fp32(x[b].d[r]);
            float *yr = y + r * n + HK2_QK_K * b;
            for (int j = 0; j < 8; j++) {
                const float dl = d * (float)x[b].sc[j][r];
                for (int l = 0; l < 16; l++) {
                    const uint8_t q = xs8_byte(&x[b], r, j, l);
                    yr[32 * j + l] = dl * (float)hk2_iq4_values[q & 0xF];
                    yr[32 * j + 16 + l] = dl * (float)hk2_iq4_values[q >> 4];
                }
            }
        }
}

/* s[8j + r] = row r . a[j] */
static void dot_iq4_xs_r8(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_iq4_xsx8 *x = w;
    for (int j = 0; j < na; j++)
        for (int r = 0; r < HK2_R8; r++) {
            float sum = 0.0f;
            for (int b = 0; b < n / HK2_QK_K; b++) {
                const int8_t *y = a[j].qs + HK2_QK_K * b;
                int sumi = 0;
                for (int ib = 0; ib < 8; ib++) {
                    int part = 0;
                    for (int l = 0; l < 16; l++) {
                        const uint8_t q = xs8_byte(&x[b], r, ib, l);
                        part += hk2_iq4_values[q & 0xF] * y[32 * ib + l] + hk2_iq4_values[q >> 4] * y[32 * ib + 16 + l];
                    }
                    sumi += x[b].sc[ib][r] * part;
                }
                sum += hk2_fp16_to_fp32(x[b].d[r]) * a[j].d[b] * (float)sumi;
            }
            s[HK2_R8 * j + r] = sum;
        }
}

#ifndef HK2_NO_X86
void hk2_dot_iq4_xs_r8_avx2(int, const void *, const hk2_arow *, int, float *);
void hk2_dot_iq4_xs_r8_avx512vnni(int, const void *, const hk2_arow *, int, float *);
void hk2_dot_iq4_nl_avx2(int, const void *, const hk2_arow *, int, float *);
void hk2_dot_iq4_xs_avx2(int, const void *, const hk2_arow *, int, float *);
void hk2_dot_iq4_nl_avx512vnni(int, const void *, const hk2_arow *, int, float *);
void hk2_dot_iq4_xs_avx512vnni(int, const void *, const hk2_arow *, int, float *);
#endif

const hk2_type_ops hk2_types_iq4[] = {
    {HK2_IQ4_NL, "IQ4_NL", 32, 18, 32, dequantize_row_iq4_nl, quantize_row_iq4_nl,
     {dot_iq4_nl, HK2_X86(hk2_dot_iq4_nl_avx2), NULL, HK2_X86(hk2_dot_iq4_nl_avx512vnni)}, {0, 0, 0, 8}, 1},
    {HK2_IQ4_XS, "IQ4_XS", 256, 136, 256, dequantize_row_iq4_xs, quantize_row_iq4_xs,
     {dot_iq4_xs, HK2_X86(hk2_dot_iq4_xs_avx2), NULL, HK2_X86(hk2_dot_iq4_xs_avx512vnni)}, {0, 0, 0, 8}, 1},
    {HK2_IQ4_XS_R8, "IQ4_XS_R8", 256, 138, 256, dequantize_rows_iq4_xs_r8, NULL,
     {dot_iq4_xs_r8, HK2_X86(hk2_dot_iq4_xs_r8_avx2), NULL, HK2_X86(hk2_dot_iq4_xs_r8_avx512vnni)}, {0, 0, 0, 8},
     HK2_R8},
    {.name = NULL},
};
