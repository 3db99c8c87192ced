/* Q4_0 Q8_0 Q4_K Q6_K (+ Q8_K, the K-quants' activation blocks) and our 8-row layouts Q4_0_R8 Q4_K_R8: the
 * first types. Reference quantizers and dequantizers, the repacks, the scalar dot kernels and the type table
 * (hk2_type_ops, hk2_internal.h); the block layouts are in hk2_internal.h (the SIMD files share them).
 * Q8_0 and Q4_0 quantization follow ggml's reference rounding (quantize_row_*_ref), so the bytes equal
 * gguf.quants.quantize; Q4_K / Q6_K use a simple min-max quantizer that produces valid blocks (decoded by any
 * GGML reader) without ggml's iterative search. The scalar dots are the reference every SIMD variant is tested
 * against, and the fallback on CPUs without AVX2: integer dot products per block, one float multiply-add per
 * block. */
#include <math.h>
#include "hk2_internal.h"

/* ---------------- reference quantizers (one row) ---------------- */

static void quantize_row_q8_0(const float *x, void *blocks, int64_t n) {
    block_q8_0 *y = blocks;
    for (int64_t i = 0; i < n / HK2_QK; i++, x += HK2_QK) {
        float amax = 0.0f;
        for (int j = 0; j < HK2_QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = hk2_fp32_to_fp16(d);
        for (int j = 0; j < HK2_QK; j++) y[i].qs[j] = (int8_t)hk2_roundf_int(x[j] * id);
    }
}

static void quantize_row_q4_0(const float *x, void *blocks, int64_t n) {
    block_q4_0 *y = blocks;
    for (int64_t i = 0; i < n / HK2_QK; i++, x += HK2_QK) {
        float amax = 0.0f, max = 0.0f;  /* first value of largest magnitude, with its sign */
        for (int j = 0; j < HK2_QK; j++) {
            if (amax < fabsf(x[j])) { amax = fabsf(x[j]); max = x[j]; }
        }
        const float d = max / -8;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = hk2_fp32_to_fp16(d);
        for (int j = 0; j < HK2_QK / 2; j++) {
            const float x0 = x[j] * id, x1 = x[j + HK2_QK / 2] * id;
            int q0 = (int8_t)(x0 + 8.5f), q1 = (int8_t)(x1 + 8.5f);
            q0 = q0 > 15 ? 15 : q0;
            q1 = q1 > 15 ? 15 : q1;
            y[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static int nearest_int(float v) { return (int)lrintf(v); }
static int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

static void quantize_row_q4_K(const float *x, void *blocks, int64_t n) {
    block_q4_K *y = blocks;
    for (int64_t i = 0; i < n / HK2_QK_K; i++, x += HK2_QK_K) {
        float scale[8], minv[8], max_scale = 0.0f, max_min = 0.0f;
        for (int j = 0; j < 8; j++) {  /* value = scale * q - min, q in 0..15 */
            float lo = x[32 * j], hi = x[32 * j];
            for (int l = 1; l < 32; l++) { lo = fminf(lo, x[32 * j + l]); hi = fmaxf(hi, x[32 * j + l]); }
            if (lo > 0.0f) lo = 0.0f;
            scale[j] = (hi - lo) / 15.0f;
            minv[j] = -lo;
            max_scale = fmaxf(max_scale, scale[j]);
            max_min = fmaxf(max_min, minv[j]);
        }
        const float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
        const float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
        uint8_t ls[8], lm[8];
        for (int j = 0; j < 8; j++) {
            ls[j] = (uint8_t)clampi(nearest_int(inv_scale * scale[j]), 0, 63);
            lm[j] = (uint8_t)clampi(nearest_int(inv_min * minv[j]), 0, 63);
        }
        hk2_q4_K_pack_scales(ls, lm, y[i].scales);
        y[i].d = hk2_fp32_to_fp16(max_scale / 63.0f);
        y[i].dmin = hk2_fp32_to_fp16(max_min / 63.0f);
        const float d = hk2_fp16_to_fp32(y[i].d), dmin = hk2_fp16_to_fp32(y[i].dmin);
        uint8_t L[HK2_QK_K];
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            hk2_q4_K_scale_min(j, y[i].scales, &sc, &m);
            const float dl = d * sc, ml = dmin * m;
            for (int l = 0; l < 32; l++)
                L[32 * j + l] = dl != 0.0f ? (uint8_t)clampi(nearest_int((x[32 * j + l] + ml) / dl), 0, 15) : 0;
        }
        for (int j = 0; j < HK2_QK_K / 64; j++)
            for (int l = 0; l < 32; l++) y[i].qs[32 * j + l] = (uint8_t)(L[64 * j + l] | (L[64 * j + 32 + l] << 4));
    }
}

static void quantize_row_q6_K(const float *x, void *blocks, int64_t n) {
    block_q6_K *y = blocks;
    for (int64_t i = 0; i < n / HK2_QK_K; i++, x += HK2_QK_K) {
        float scale[16];
        const float max_scale = hk2_signed_scales16(x, -32.0f, scale);  /* value = scale * q, q in -32..31 */
        if (max_scale == 0.0f) {
            memset(&y[i], 0, sizeof y[i]);
            /* q = 0 is stored as 32 in both halves */
            for (int l = 0; l < 64; l++) y[i].qh[l] = 0xAA;
            continue;
        }
        const float iscale = -128.0f / max_scale;
        for (int s = 0; s < 16; s++) y[i].scales[s] = (int8_t)clampi(nearest_int(iscale * scale[s]), -128, 127);
        y[i].d = hk2_fp32_to_fp16(1.0f / iscale);
        const float d = hk2_fp16_to_fp32(y[i].d);
        uint8_t L[HK2_QK_K];
        for (int s = 0; s < 16; s++) {
            const float ds = d * y[i].scales[s];
            for (int l = 0; l < 16; l++)
                L[16 * s + l] = (uint8_t)(32 + (ds != 0.0f ? clampi(nearest_int(x[16 * s + l] / ds), -32, 31) : 0));
        }
        uint8_t *ql = y[i].ql, *qh = y[i].qh;
        for (int j = 0; j < HK2_QK_K; j += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; l++) {
                const uint8_t *q = L + j + l;
                ql[l] = (uint8_t)((q[0] & 0xF) | ((q[64] & 0xF) << 4));
                ql[l + 32] = (uint8_t)((q[32] & 0xF) | ((q[96] & 0xF) << 4));
                qh[l] = (uint8_t)((q[0] >> 4) | ((q[32] >> 4) << 2) | ((q[64] >> 4) << 4) | ((q[96] >> 4) << 6));
            }
        }
    }
}

static void quantize_row_q8_K(const float *x, void *blocks, int64_t n) {
    block_q8_K *y = blocks;
    for (int64_t i = 0; i < n / HK2_QK_K; i++)
        hk2_quantize_act_scalar(x + i * HK2_QK_K, HK2_QK_K, HK2_QK_K, y[i].qs, &y[i].d, y[i].bsums);
}

/* ---------------- reference dequantizers (one row) ---------------- */

static void dequantize_row_q8_0(const void *blocks, float *y, int64_t n) {
    const block_q8_0 *x = blocks;
    for (int64_t i = 0; i < n / HK2_QK; i++) {
        const float d = hk2_fp16_to_fp32(x[i].d);
        for (int j = 0; j < HK2_QK; j++) y[i * HK2_QK + j] = d * x[i].qs[j];
    }
}

static void dequantize_row_q4_0(const void *blocks, float *y, int64_t n) {
    const block_q4_0 *x = blocks;
    for (int64_t i = 0; i < n / HK2_QK; i++) {
        const float d = hk2_fp16_to_fp32(x[i].d);
        for (int j = 0; j < HK2_QK / 2; j++) {
            y[i * HK2_QK + j] = d * ((x[i].qs[j] & 0xF) - 8);
            y[i * HK2_QK + j + HK2_QK / 2] = d * ((x[i].qs[j] >> 4) - 8);
        }
    }
}



static void dequantize_row_q4_K(const void *blocks, float *y, int64_t n) {
    const block_q4_K *x = blocks;
    for (int64_t i = 0; i < n / HK2_QK_K; i++) {
        const float d = hk2_fp16_to_fp32(x[i].d), dmin = hk2_fp16_to_fp32(x[i].dmin);
        const uint8_t *q = x[i].qs;
        for (int j = 0; j < HK2_QK_K / 64; j++, q += 32) {
            uint8_t sc, m;
            hk2_q4_K_scale_min(2 * j, x[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            hk2_q4_K_scale_min(2 * j + 1, x[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; l++) *y++ = d1 * (q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * (q[l] >> 4) - m2;
        }
    }
}

static void dequantize_row_q6_K(const void *blocks, float *y, int64_t n) {
    const block_q6_K *x = blocks;
    for (int64_t i = 0; i < n / HK2_QK_K; i++) {
        const float d = hk2_fp16_to_fp32(x[i].d);
        const uint8_t *ql = x[i].ql, *qh = x[i].qh;
        const int8_t *sc = x[i].scales;
        for (int j = 0; j < HK2_QK_K; j += 128, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * sc[is] * q1;
                y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3;
                y[l + 96] = d * sc[is + 6] * q4;
            }
        }
    }
}

static void dequantize_row_q8_K(const void *blocks, float *y, int64_t n) {
    const block_q8_K *x = blocks;
    for (int64_t i = 0; i < n / HK2_QK_K; i++)
        for (int j = 0; j < HK2_QK_K; j++) y[i * HK2_QK_K + j] = x[i].d * x[i].qs[j];
}

/* ---------------- repacks: 8 rows interleaved (hk2.h) ---------------- */

static void put_q4_0_r8(void *out, int r, const void *in) {
    block_q4_0x8 *o = out;
    const block_q4_0 *x = in;
    o->d[r] = x->d;
    for (int c = 0; c < 4; c++) memcpy(o->qs + 32 * c + 4 * r, x->qs + 4 * c, 4);
}
int hk2_repack_q4_0_r8(const void *src, int64_t nrows, int64_t ncols, void *dst) {
    return hk2_repack(HK2_Q4_0, HK2_Q4_0_R8, src, nrows, ncols, dst, put_q4_0_r8);
}
/* the inverse: row r's Q4_0 block back out of the group's */
static void get_q4_0_r8(void *out, int r, const void *in) {
    block_q4_0 *o = out;
    const block_q4_0x8 *x = in;
    o->d = x->d[r];
    for (int c = 0; c < 4; c++) memcpy(o->qs + 4 * c, x->qs + 32 * c + 4 * r, 4);
}
static void dequantize_rows_q4_0_r8(const void *blocks, float *y, int64_t n) {
    hk2_dequantize_r8(HK2_Q4_0, HK2_Q4_0_R8, get_q4_0_r8, blocks, y, n);
}

static void put_q4_K_r8(void *out, int r, const void *in) {
    block_q4_Kx8 *o = out;
    const block_q4_K *x = in;
    o->d[r] = x->d;
    o->dmin[r] = x->dmin;
    for (int j = 0; j < 8; j++) hk2_q4_K_scale_min(j, x->scales, &o->sc[j][r], &o->m[j][r]);
    for (int c = 0; c < 4; c++)
        for (int k = 0; k < 8; k++) memcpy(o->qs + 256 * c + 32 * k + 4 * r, x->qs + 32 * c + 4 * k, 4);
}
int hk2_repack_q4_K_r8(const void *src, int64_t nrows, int64_t ncols, void *dst) {
    return hk2_repack(HK2_Q4_K, HK2_Q4_K_R8, src, nrows, ncols, dst, put_q4_K_r8);
}
static void get_q4_K_r8(void *out, int r, const void *in) {
    block_q4_K *o = out;
    const block_q4_Kx8 *x = in;
    uint8_t sc[8], m[8];
    o->d = x->d[r];
    o->dmin = x->dmin[r];
    for (int j = 0; j < 8; j++) {
        sc[j] = x->sc[j][r];
        m[j] = x->m[j][r];
    }
    hk2_q4_K_pack_scales(sc, m, o->scales);
    for (int c = 0; c < 4; c++)
        for (int k = 0; k < 8; k++) memcpy(o->qs + 32 * c + 4 * k, x->qs + 256 * c + 32 * k + 4 * r, 4);
}
static void dequantize_rows_q4_K_r8(const void *blocks, float *y, int64_t n) {
    hk2_dequantize_r8(HK2_Q4_K, HK2_Q4_K_R8, get_q4_K_r8, blocks, y, n);
}

/* ---------------- scalar dots: integer sums per block, one float multiply-add per block ---------------- */

static inline float blk_q4_0(const block_q4_0 *x, const int8_t *y, const int16_t *bs, float da) {
    int sumi = 0;
    for (int l = 0; l < HK2_QK / 2; l++) sumi += ((x->qs[l] & 0xF) - 8) * y[l] + ((x->qs[l] >> 4) - 8) * y[l + HK2_QK / 2];
    return hk2_fp16_to_fp32(x->d) * da * (float)sumi;
}
HK2_SCALAR_DOT(q4_0, block_q4_0, HK2_QK)

/* 8 interleaved rows: row r's Q4_0 block taken back out, so the same integer sums as Q4_0's */
static inline float blk_q4_0_r8(const block_q4_0x8 *x, int r, const int8_t *y, const int16_t *bs, float da) {
    block_q4_0 one;
    get_q4_0_r8(&one, r, x);
    return blk_q4_0(&one, y, bs, da);
}
HK2_SCALAR_DOT_R8(q4_0_r8, block_q4_0x8, HK2_QK)

static inline float blk_q8_0(const block_q8_0 *x, const int8_t *y, const int16_t *bs, float da) {
    int sumi = 0;
    for (int l = 0; l < HK2_QK; l++) sumi += x->qs[l] * y[l];
    return hk2_fp16_to_fp32(x->d) * da * (float)sumi;
}
HK2_SCALAR_DOT(q8_0, block_q8_0, HK2_QK)

static inline float blk_q4_K(const block_q4_K *x, const int8_t *y, const int16_t *bs, float da) {
    uint8_t q[HK2_QK_K], sc[8], m[8];
    for (int j = 0; j < 8; j++) hk2_q4_K_scale_min(j, x->scales, &sc[j], &m[j]);
    for (int c = 0; c < HK2_QK_K / 64; c++)
        for (int l = 0; l < 32; l++) {
            q[64 * c + l] = x->qs[32 * c + l] & 0xF;
            q[64 * c + 32 + l] = x->qs[32 * c + l] >> 4;
        }
    return hk2_k_min_term(q, 32, sc, m, x->d, x->dmin, y, bs, da);
}
HK2_SCALAR_DOT(q4_K, block_q4_K, HK2_QK_K)

/* 8 interleaved rows, as Q4_0_R8 */
static inline float blk_q4_K_r8(const block_q4_Kx8 *x, int r, const int8_t *y, const int16_t *bs, float da) {
    block_q4_K one;
    get_q4_K_r8(&one, r, x);
    return blk_q4_K(&one, y, bs, da);
}
HK2_SCALAR_DOT_R8(q4_K_r8, block_q4_Kx8, HK2_QK_K)

static inline float blk_q6_K(const block_q6_K *x, const int8_t *y, const int16_t *bs, float da) {
    const uint8_t *ql = x->ql, *qh = x->qh;
    const int8_t *sc = x->scales;
    int sumi = 0;
    for (int h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8, y += 128) {
        int part[8] = {0};  /* per 16-value sub-block of this half */
        for (int l = 0; l < 32; l++) {
            const int is = l / 16;
            part[is + 0] += (((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32) * y[l];
            part[is + 2] += (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32) * y[l + 32];
            part[is + 4] += (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32) * y[l + 64];
            part[is + 6] += (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32) * y[l + 96];
        }
        for (int k = 0; k < 8; k++) sumi += sc[k] * part[k];
    }
    return da * hk2_fp16_to_fp32(x->d) * (float)sumi;
}
HK2_SCALAR_DOT(q6_K, block_q6_K, HK2_QK_K)

#ifndef HK2_NO_X86
#define DECLARE_BASE_DOTS(t) hk2_dot_kernel hk2_dot_##t##_avx2, hk2_dot_##t##_avx512bw, hk2_dot_##t##_avx512vnni;
DECLARE_BASE_DOTS(q4_0)
DECLARE_BASE_DOTS(q8_0)
DECLARE_BASE_DOTS(q4_K)
DECLARE_BASE_DOTS(q6_K)
hk2_dot_kernel hk2_dot_q4_K_r8_avx2;
#endif
HK2_DECLARE_DOTS(q4_0_r8)
/* one type's dots at every level: scalar, AVX2, AVX-512 BW, AVX-512 VNNI */
#define DOTS(t) {dot_##t, HK2_X86(hk2_dot_##t##_avx2), HK2_X86(hk2_dot_##t##_avx512bw), HK2_X86(hk2_dot_##t##_avx512vnni)}

/* Q4_0_R8 at AVX-512 BW and Q4_K_R8 at both AVX-512 levels: the AVX2 kernel (its 8 rows fill one 256-bit
 * vector; Q4_K_R8 is memory-bound at 8 rows per pass already). Q8_0 takes 8 activation rows per call at the
 * AVX-512 levels: prefill's dense matrices are mostly Q8_0. */
const hk2_type_ops hk2_types_base[] = {
    {HK2_Q4_0, "Q4_0", HK2_QK, sizeof(block_q4_0), HK2_QK, dequantize_row_q4_0, quantize_row_q4_0, DOTS(q4_0), {0}, 1},
    {HK2_Q8_0, "Q8_0", HK2_QK, sizeof(block_q8_0), HK2_QK, dequantize_row_q8_0, quantize_row_q8_0, DOTS(q8_0),
     {0, 0, 8, 8}, 1},
    {HK2_Q4_K, "Q4_K", HK2_QK_K, sizeof(block_q4_K), HK2_QK_K, dequantize_row_q4_K, quantize_row_q4_K, DOTS(q4_K), {0}, 1},
    {HK2_Q6_K, "Q6_K", HK2_QK_K, sizeof(block_q6_K), HK2_QK_K, dequantize_row_q6_K, quantize_row_q6_K, DOTS(q6_K), {0}, 1},
    {HK2_Q8_K, "Q8_K", HK2_QK_K, sizeof(block_q8_K), HK2_QK_K, dequantize_row_q8_K, quantize_row_q8_K, {NULL}, {0}, 1},
    /* bytes per row-block as Q4_0 */
    {HK2_Q4_0_R8, "Q4_0_R8", HK2_QK, sizeof(block_q4_0), HK2_QK, dequantize_rows_q4_0_r8, NULL,
     HK2_DOTS(q4_0_r8), {0}, HK2_R8},
    /* Q4_K's 144 bytes + 4 unpacked scale bytes */
    {HK2_Q4_K_R8, "Q4_K_R8", HK2_QK_K, HK2_Q4_K_R8_BYTES, HK2_QK_K, dequantize_rows_q4_K_r8, NULL,
     {dot_q4_K_r8, HK2_X86(hk2_dot_q4_K_r8_avx2), NULL, NULL}, {0}, HK2_R8},
    {.name = NULL},
};
