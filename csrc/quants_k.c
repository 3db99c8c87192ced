/* Q2_K Q3_K Q5_K: the rest of the K family. Block layouts, reference dequantizers and quantizers,
 * the scalar dot kernels and the type table (hk2_type_ops, hk2_internal.h). */
#include <math.h>
#include "hk2_internal.h"

/* ---- block layouts (ggml-common.h, byte for byte); the SIMD files repeat these three structs ---- */
typedef struct {
    uint8_t scales[HK2_QK_K / 16];  /* per 16 values: low nibble scale, high nibble min */
    uint8_t qs[HK2_QK_K / 4];       /* 2 bits: value 128c + 32s + l = bits 2s of qs[32c + l] */
    hk2_half d, dmin;
} block_q2_K;
typedef struct {
    uint8_t hmask[HK2_QK_K / 8];    /* third bit: value 32j + l = bit j of hmask[l]; set means no -4 */
    uint8_t qs[HK2_QK_K / 4];       /* low 2 bits, as Q2_K's */
    uint8_t scales[12];             /* 16 6-bit scales biased by 32, packed (q3_K_unpack_scales) */
    hk2_half d;
} block_q3_K;
typedef struct {
    hk2_half d, dmin;
    uint8_t scales[12];             /* 8 scales + 8 mins, 6 bits, packed as Q4_K's */
    uint8_t qh[HK2_QK_K / 8];       /* fifth bit: value 32j + l = bit j of qh[l] */
    uint8_t qs[HK2_QK_K / 2];       /* low 4 bits as Q4_K's: value 64c + l low nibble, 64c + 32 + l high */
} block_q5_K;
_Static_assert(sizeof(block_q2_K) == 84, "block_q2_K layout");
_Static_assert(sizeof(block_q3_K) == 110, "block_q3_K layout");
_Static_assert(sizeof(block_q5_K) == 176, "block_q5_K layout");

/* Q3_K's 12 scale bytes -> 16 signed scales (-32..31). Scale i: low 4 bits in byte i % 8 (low nibble
 * for i < 8, high nibble after), high 2 bits at bit 2 * (i / 4) of byte 8 + i % 4. */
static void q3_K_scales(const uint8_t *p, int8_t sc[16]) {
    for (int i = 0; i < 16; i++) {
        const int lo = (p[i % 8] >> (4 * (i / 8))) & 0xF, hi = (p[8 + i % 4] >> (2 * (i / 4))) & 3;
        sc[i] = (int8_t)((lo | (hi << 4)) - 32);
    }
}

static int q2_at(const uint8_t *qs, int v) { return (qs[32 * (v / 128) + v % 32] >> (2 * ((v % 128) / 32))) & 3; }

/* ---------------- reference dequantizers (the float ops of gguf's numpy, in its order) ---------------- */

static void dequantize_row_q2_K(const void *blocks, float *y, int64_t n) {
    const block_q2_K *x = blocks;
    for (int64_t i = 0; i < n / HK2_QK_K; i++, y += HK2_QK_K) {
        const float d = hk2_fp16_to_fp32(x[i].d), dmin = hk2_fp16_to_fp32(x[i].dmin);
        for (int s = 0; s < 16; s++) {
            const float dl = d * (float)(x[i].scales[s] & 0xF), ml = dmin * (float)(x[i].scales[s] >> 4);
            for (int l = 0; l < 16; l++) y[16 * s + l] = dl * (float)q2_at(x[i].qs, 16 * s + l) - ml;
        }
    }
}

static void dequantize_row_q3_K(const void *blocks, float *y, int64_t n) {
    const block_q3_K *x = blocks;
    for (int64_t i = 0; i < n / HK2_QK_K; i++, y += HK2_QK_K) {
        const float d = hk2_fp16_to_fp32(x[i].d);
        int8_t sc[16];
        q3_K_scales(x[i].scales, sc);
        for (int s = 0; s < 16; s++) {
            const float dl = d * (float)sc[s];
            for (int l = 0; l < 16; l++) {
                const int v = 16 * s + l;
                const int q = q2_at(x[i].qs, v) - (((x[i].hmask[v % 32] >> (v / 32)) & 1) ? 0 : 4);
                y[v] = dl * (float)q;
            }
        }
    }
}

static void dequantize_row_q5_K(const void *blocks, float *y, int64_t n) {
    const block_q5_K *x = blocks;
    for (int64_t i = 0; i < n / HK2_QK_K; i++, y += HK2_QK_K) {
        const float d = hk2_fp16_to_fp32(x[i].d), dmin = hk2_fp16_to_fp32(x[i].dmin);
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            hk2_q4_K_scale_min(j, x[i].scales, &sc, &m);
            const float dl = d * (float)sc, ml = dmin * (float)m;
            for (int l = 0; l < 32; l++) {
                const int q = ((x[i].qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0xF) | (((x[i].qh[l] >> j) & 1) << 4);
                y[32 * j + l] = dl * (float)q - ml;
            }
        }
    }
}

/* ---------------- quantizers: min-max (or signed max) per sub-block, then a +-1 search on each
 * quantized sub-block scale for the least squared error ---------------- */

static int nearest_int(float v) { return (int)lrintf(v); }
/* v as fp16, but never flushed to zero when v is not: a tiny row keeps a (subnormal) step rather than
 * dequantizing to nothing */
static hk2_half fp16_nonzero(float v) {
    const hk2_half h = hk2_fp32_to_fp16(v);
    return v != 0.0f && (h & 0x7FFF) == 0 ? (hk2_half)(h | 1) : h;
}
static int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* squared error of x[0..len) as dl * q - ml, q = round((x + ml) / dl) in [qlo, qhi]; q out to L */
static float fit_sub(const float *x, int len, float dl, float ml, int qlo, int qhi, uint8_t *L, int bias) {
    float err = 0.0f;
    for (int l = 0; l < len; l++) {
        const int q = dl != 0.0f ? clampi(nearest_int((x[l] + ml) / dl), qlo, qhi) : clampi(0, qlo, qhi);
        const float e = dl * (float)q - ml - x[l];
        err += e * e;
        if (L) L[l] = (uint8_t)(q + bias);
    }
    return err;
}

/* asymmetric K-quant of one super-block: nsub sub-blocks of len values, value = d*sc*q - dmin*m with
 * q in 0..qmax and sc, m in 0..smax; out: sc[], m[], L[] (q per value), *d, *dmin (already fp16) */
static void quantize_asym(const float *x, int nsub, int len, int qmax, int smax, uint8_t *sc, uint8_t *m, uint8_t *L,
                          hk2_half *hd, hk2_half *hdmin) {
    float scale[16], minv[16], max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < nsub; j++) {
        float lo = x[len * j], hi = x[len * j];
        for (int l = 1; l < len; l++) { lo = fminf(lo, x[len * j + l]); hi = fmaxf(hi, x[len * j + l]); }
        if (lo > 0.0f) lo = 0.0f;
        scale[j] = (hi - lo) / (float)qmax;
        minv[j] = -lo;
        max_scale = fmaxf(max_scale, scale[j]);
        max_min = fmaxf(max_min, minv[j]);
    }
    *hd = fp16_nonzero(max_scale / (float)smax);
    *hdmin = fp16_nonzero(max_min / (float)smax);
    const float d = hk2_fp16_to_fp32(*hd), dmin = hk2_fp16_to_fp32(*hdmin);
    for (int j = 0; j < nsub; j++) {
        const int s0 = d > 0.0f ? clampi(nearest_int(scale[j] / d), 0, smax) : 0;
        const int m0 = dmin > 0.0f ? clampi(nearest_int(minv[j] / dmin), 0, smax) : 0;
        float best = INFINITY;
        for (int ds = -1; ds <= 1; ds++)
            for (int dm = -1; dm <= 1; dm++) {
                const int s1 = s0 + ds, m1 = m0 + dm;
                if (s1 < 0 || s1 > smax || m1 < 0 || m1 > smax) continue;
                const float e = fit_sub(x + len * j, len, d * (float)s1, dmin * (float)m1, 0, qmax, NULL, 0);
                if (e < best) { best = e; sc[j] = (uint8_t)s1; m[j] = (uint8_t)m1; }
            }
        fit_sub(x + len * j, len, d * (float)sc[j], dmin * (float)m[j], 0, qmax, L + len * j, 0);
    }
}

static void quantize_row_q2_K(const float *x, void *blocks, int64_t n) {
    block_q2_K *y = blocks;
    for (int64_t i = 0; i < n / HK2_QK_K; i++, x += HK2_QK_K) {
        uint8_t sc[16], m[16], L[HK2_QK_K];
        quantize_asym(x, 16, 16, 3, 15, sc, m, L, &y[i].d, &y[i].dmin);
        for (int s = 0; s < 16; s++) y[i].scales[s] = (uint8_t)(sc[s] | (m[s] << 4));
        memset(y[i].qs, 0, sizeof y[i].qs);
        for (int v = 0; v < HK2_QK_K; v++) y[i].qs[32 * (v / 128) + v % 32] |= (uint8_t)(L[v] << (2 * ((v % 128) / 32)));
    }
}

static void quantize_row_q5_K(const float *x, void *blocks, int64_t n) {
    block_q5_K *y = blocks;
    for (int64_t i = 0; i < n / HK2_QK_K; i++, x += HK2_QK_K) {
        uint8_t sc[8], m[8], L[HK2_QK_K];
        quantize_asym(x, 8, 32, 31, 63, sc, m, L, &y[i].d, &y[i].dmin);
        hk2_q4_K_pack_scales(sc, m, y[i].scales);   /* Q4_K's packing */
        memset(y[i].qh, 0, sizeof y[i].qh);
        memset(y[i].qs, 0, sizeof y[i].qs);
        for (int v = 0; v < HK2_QK_K; v++) {
            y[i].qs[32 * (v / 64) + v % 32] |= (uint8_t)((L[v] & 0xF) << (4 * ((v / 32) % 2)));
            y[i].qh[v % 32] |= (uint8_t)((L[v] >> 4) << (v / 32));
        }
    }
}

/* symmetric: value = d * sc * q, q in -4..3, sc in -32..31; the extreme of each sub-block maps to -4 */
static void quantize_row_q3_K(const float *x, void *blocks, int64_t n) {
    block_q3_K *y = blocks;
    for (int64_t i = 0; i < n / HK2_QK_K; i++, x += HK2_QK_K) {
        float scale[16];
        const float max_scale = hk2_signed_scales16(x, -4.0f, scale);
        y[i].d = fp16_nonzero(max_scale != 0.0f ? max_scale / -32.0f : 0.0f);
        const float d = hk2_fp16_to_fp32(y[i].d);
        int sc[16];
        uint8_t L[HK2_QK_K];  /* q + 4 */
        for (int s = 0; s < 16; s++) {
            const int s0 = d != 0.0f ? clampi(nearest_int(scale[s] / d), -32, 31) : 0;
            float best = INFINITY;
            for (int ds = -1; ds <= 1; ds++) {
                const int s1 = s0 + ds;
                if (s1 < -32 || s1 > 31) continue;
                const float e = fit_sub(x + 16 * s, 16, d * (float)s1, 0.0f, -4, 3, NULL, 0);
                if (e < best) { best = e; sc[s] = s1; }
            }
            fit_sub(x + 16 * s, 16, d * (float)sc[s], 0.0f, -4, 3, L + 16 * s, 4);
        }
        memset(y[i].scales, 0, sizeof y[i].scales);
        for (int s = 0; s < 16; s++) {
            const int u = sc[s] + 32;
            y[i].scales[s % 8] |= (uint8_t)((u & 0xF) << (4 * (s / 8)));
            y[i].scales[8 + s % 4] |= (uint8_t)((u >> 4) << (2 * (s / 4)));
        }
        memset(y[i].qs, 0, sizeof y[i].qs);
        memset(y[i].hmask, 0, sizeof y[i].hmask);
        for (int v = 0; v < HK2_QK_K; v++) {
            y[i].qs[32 * (v / 128) + v % 32] |= (uint8_t)((L[v] & 3) << (2 * ((v % 128) / 32)));
            y[i].hmask[v % 32] |= (uint8_t)((L[v] >> 2) << (v / 32));
        }
    }
}

/* ---------------- scalar dots: integer sums per sub-block, the float scales once per super-block ---------------- */

/* value = d*sc*q - dmin*m: the min term is m times the activations' 16-value sums */
static inline float blk_q2_K(const block_q2_K *x, const int8_t *y, const int16_t *bs, float da) {
    uint8_t q[HK2_QK_K], sc[16], m[16];
    for (int v = 0; v < HK2_QK_K; v++) q[v] = (uint8_t)q2_at(x->qs, v);
    for (int sb = 0; sb < 16; sb++) {
        sc[sb] = x->scales[sb] & 0xF;
        m[sb] = x->scales[sb] >> 4;
    }
    return hk2_k_min_term(q, 16, sc, m, x->d, x->dmin, y, bs, da);
}
HK2_SCALAR_DOT(q2_K, block_q2_K, HK2_QK_K)

/* q = (q + 4) - 4: the -4 is 4 times the activations' 16-value sums */
static inline float blk_q3_K(const block_q3_K *x, const int8_t *y, const int16_t *bs, float da) {
    int8_t sc[16];
    q3_K_scales(x->scales, sc);
    int sumi = 0;
    for (int sb = 0; sb < 16; sb++) {
        int p = 0;
        for (int l = 0; l < 16; l++) {
            const int v = 16 * sb + l;
            p += (q2_at(x->qs, v) | (((x->hmask[v % 32] >> (v / 32)) & 1) << 2)) * y[v];
        }
        sumi += sc[sb] * (p - 4 * bs[sb]);
    }
    return da * hk2_fp16_to_fp32(x->d) * (float)sumi;
}
HK2_SCALAR_DOT(q3_K, block_q3_K, HK2_QK_K)

static inline float blk_q5_K(const block_q5_K *x, const int8_t *y, const int16_t *bs, float da) {
    uint8_t q[HK2_QK_K], sc[8], m[8];
    for (int sb = 0; sb < 8; sb++) {
        hk2_q4_K_scale_min(sb, x->scales, &sc[sb], &m[sb]);
        for (int l = 0; l < 32; l++)
            q[32 * sb + l] = (uint8_t)(((x->qs[32 * (sb / 2) + l] >> (4 * (sb % 2))) & 0xF) | (((x->qh[l] >> sb) & 1) << 4));
    }
    return hk2_k_min_term(q, 32, sc, m, x->d, x->dmin, y, bs, da);
}
HK2_SCALAR_DOT(q5_K, block_q5_K, HK2_QK_K)

HK2_DECLARE_DOTS(q2_K)
HK2_DECLARE_DOTS(q3_K)
HK2_DECLARE_DOTS(q5_K)

const hk2_type_ops hk2_types_k[] = {
    {HK2_Q2_K, "Q2_K", HK2_QK_K, sizeof(block_q2_K), HK2_QK_K, dequantize_row_q2_K, quantize_row_q2_K, HK2_DOTS(q2_K),
     {0, 0, 0, 8}, 1},
    {HK2_Q3_K, "Q3_K", HK2_QK_K, sizeof(block_q3_K), HK2_QK_K, dequantize_row_q3_K, quantize_row_q3_K, HK2_DOTS(q3_K),
     {0, 0, 0, 8}, 1},
    {HK2_Q5_K, "Q5_K", HK2_QK_K, sizeof(block_q5_K), HK2_QK_K, dequantize_row_q5_K, quantize_row_q5_K, HK2_DOTS(q5_K),
     {0, 0, 0, 8}, 1},
    {.name = NULL},
};
