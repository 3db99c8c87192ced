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
        memset(y[i].scales, 0, sizeof y[i].scales);
        for (int j = 0; j < 8; j++) {
            if (j < 4) {
                y[i].scales[j] = ls[j];
                y[i].scales[j + 4] = lm[j];
            } else {
                y[i].scales[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
                y[i].scales[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
                y[i].scales[j] |= (uint8_t)((lm[j] >> 4) << 6);
            }
        }
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
        float scale[16], max_scale = 0.0f, amax_scale = 0.0f;
        for (int s = 0; s < 16; s++) {  /* value = scale * q, q in -32..31; the extreme maps to -32 */
            float amax = 0.0f, max = 0.0f;
            for (int l = 0; l < 16; l++) {
                const float v = x[16 * s + l];
                if (fabsf(v) > amax) { amax = fabsf(v); max = v; }
            }
            scale[s] = max / -32.0f;
            if (fabsf(scale[s]) > amax_scale) { amax_scale = fabsf(scale[s]); max_scale = scale[s]; }
        }
        if (amax_scale == 0.0f) {
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

/* 8 interleaved rows: y [8, n] */
static void dequantize_rows_q4_0_r8(const void *blocks, float *y, int64_t n) {
    const block_q4_0x8 *x = blocks;
    for (int64_t i = 0; i < n / HK2_QK; i++)
        for (int r = 0; r < HK2_R8; r++) {
            const float d = hk2_fp16_to_fp32(x[i].d[r]);
            float *yr = y + r * n + i * HK2_QK;
            for (int j = 0; j < HK2_QK / 2; j++) {
                const uint8_t q = x[i].qs[32 * (j / 4) + 4 * r + j % 4];
                yr[j] = d * ((q & 0xF) - 8);
                yr[j + HK2_QK / 2] = d * ((q >> 4) - 8);
            }
        }
}

/* 8 interleaved rows: y [8, n]; the same float ops as dequantize_row_q4_K, so the same values */
static void dequantize_rows_q4_K_r8(const void *blocks, float *y, int64_t n) {
    const block_q4_Kx8 *x = blocks;
    for (int64_t i = 0; i < n / HK2_QK_K; i++)
        for (int r = 0; r < HK2_R8; r++) {
            const float d = hk2_fp16_to_fp32(x[i].d[r]), dmin = hk2_fp16_to_fp32(x[i].dmin[r]);
            float *yr = y + r * n + i * HK2_QK_K;
            for (int c = 0; c < 4; c++) {
                const float d1 = d * x[i].sc[2 * c][r], m1 = dmin * x[i].m[2 * c][r];
                const float d2 = d * x[i].sc[2 * c + 1][r], m2 = dmin * x[i].m[2 * c + 1][r];
                for (int l = 0; l < 32; l++) {
                    const uint8_t q = x[i].qs[256 * c + 32 * (l / 4) + 4 * r + l % 4];
                    yr[64 * c + l] = d1 * (q & 0xF) - m1;
                    yr[64 * c + 32 + l] = d2 * (q >> 4) - m2;
                }
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

int hk2_repack_q4_0_r8(const void *src, int64_t nrows, int64_t ncols, void *dst) {
    int64_t rb, rb8;
    const int err = hk2_repack_args(HK2_Q4_0, HK2_Q4_0_R8, src, nrows, ncols, dst, &rb, &rb8);
    if (err) return err;
    const uint8_t *s = src;
    uint8_t *d = dst;
    const int64_t nb = ncols / HK2_QK;
    for (int64_t g = 0; g < nrows / HK2_R8; g++) {
        const block_q4_0 *in = (const block_q4_0 *)(s + g * HK2_R8 * rb);
        block_q4_0x8 *out = (block_q4_0x8 *)(d + g * HK2_R8 * rb8);
        for (int64_t b = 0; b < nb; b++)
            for (int r = 0; r < HK2_R8; r++) {
                const block_q4_0 *x = in + r * nb + b;
                out[b].d[r] = x->d;
                for (int c = 0; c < 4; c++) memcpy(out[b].qs + 32 * c + 4 * r, x->qs + 4 * c, 4);
            }
    }
    return HK2_OK;
}

int hk2_repack_q4_K_r8(const void *src, int64_t nrows, int64_t ncols, void *dst) {
    int64_t rb, rb8;
    const int err = hk2_repack_args(HK2_Q4_K, HK2_Q4_K_R8, src, nrows, ncols, dst, &rb, &rb8);
    if (err) return err;
    const uint8_t *s = src;
    uint8_t *d = dst;
    const int64_t nb = ncols / HK2_QK_K;
    for (int64_t g = 0; g < nrows / HK2_R8; g++) {
        const block_q4_K *in = (const block_q4_K *)(s + g * HK2_R8 * rb);
        block_q4_Kx8 *out = (block_q4_Kx8 *)(d + g * HK2_R8 * rb8);
        for (int64_t b = 0; b < nb; b++)
            for (int r = 0; r < HK2_R8; r++) {
                const block_q4_K *x = in + r * nb + b;
                out[b].d[r] = x->d;
                out[b].dmin[r] = x->dmin;
                for (int j = 0; j < 8; j++) hk2_q4_K_scale_min(j, x->scales, &out[b].sc[j][r], &out[b].m[j][r]);
                for (int c = 0; c < 4; c++)
                    for (int k = 0; k < 8; k++) memcpy(out[b].qs + 256 * c + 32 * k + 4 * r, x->qs + 32 * c + 4 * k, 4);
            }
    }
    return HK2_OK;
}

/* ---------------- scalar dots ---------------- */

static void dot_q4_0(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_q4_0 *x = w;
    for (int j = 0; j < na; j++) {
        float sum = 0.0f;
        for (int b = 0; b < n / HK2_QK; b++) {
            const int8_t *y = a[j].qs + b * HK2_QK;
            int sumi = 0;
            for (int l = 0; l < HK2_QK / 2; l++)
                sumi += ((x[b].qs[l] & 0xF) - 8) * y[l] + ((x[b].qs[l] >> 4) - 8) * y[l + HK2_QK / 2];
            sum += hk2_fp16_to_fp32(x[b].d) * a[j].d[b] * (float)sumi;
        }
        s[j] = sum;
    }
}

/* 8 interleaved rows; the same integer sums per block as dot_q4_0 */
static void dot_q4_0_r8(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_q4_0x8 *x = w;
    for (int j = 0; j < na; j++)
        for (int r = 0; r < HK2_R8; r++) {
            float sum = 0.0f;
            for (int b = 0; b < n / HK2_QK; b++) {
                const int8_t *y = a[j].qs + b * HK2_QK;
                int sumi = 0;
                for (int l = 0; l < HK2_QK / 2; l++) {
                    const uint8_t q = x[b].qs[32 * (l / 4) + 4 * r + l % 4];
                    sumi += ((q & 0xF) - 8) * y[l] + ((q >> 4) - 8) * y[l + HK2_QK / 2];
                }
                sum += hk2_fp16_to_fp32(x[b].d[r]) * a[j].d[b] * (float)sumi;
            }
            s[HK2_R8 * j + r] = sum;
        }
}

/* 8 interleaved rows; the same integer sums per super-block as dot_q4_K */
static void dot_q4_K_r8(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_q4_Kx8 *x = w;
    for (int j = 0; j < na; j++)
        for (int r = 0; r < HK2_R8; r++) {
            float sum = 0.0f;
            for (int b = 0; b < n / HK2_QK_K; b++) {
                const int8_t *y = a[j].qs + b * HK2_QK_K;
                const int16_t *bs = a[j].bs + b * (HK2_QK_K / 16);
                int sumi = 0, summ = 0;
                for (int c = 0; c < HK2_QK_K / 64; c++) {
                    int s1 = 0, s2 = 0;
                    for (int l = 0; l < 32; l++) {
                        const uint8_t q = x[b].qs[256 * c + 32 * (l / 4) + 4 * r + l % 4];
                        s1 += (q & 0xF) * y[64 * c + l];
                        s2 += (q >> 4) * y[64 * c + 32 + l];
                    }
                    sumi += x[b].sc[2 * c][r] * s1 + x[b].sc[2 * c + 1][r] * s2;
                    summ += x[b].m[2 * c][r] * (bs[4 * c] + bs[4 * c + 1]) + x[b].m[2 * c + 1][r] * (bs[4 * c + 2] + bs[4 * c + 3]);
                }
                sum += a[j].d[b] * (hk2_fp16_to_fp32(x[b].d[r]) * (float)sumi - hk2_fp16_to_fp32(x[b].dmin[r]) * (float)summ);
            }
            s[HK2_R8 * j + r] = sum;
        }
}

static void dot_q8_0(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_q8_0 *x = w;
    for (int j = 0; j < na; j++) {
        float sum = 0.0f;
        for (int b = 0; b < n / HK2_QK; b++) {
            const int8_t *y = a[j].qs + b * HK2_QK;
            int sumi = 0;
            for (int l = 0; l < HK2_QK; l++) sumi += x[b].qs[l] * y[l];
            sum += hk2_fp16_to_fp32(x[b].d) * a[j].d[b] * (float)sumi;
        }
        s[j] = sum;
    }
}

/* value = d*sc*q - dmin*m; the min term uses the activation's 16-value sums */
static void dot_q4_K(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_q4_K *x = w;
    for (int j = 0; j < na; j++) {
        float sum = 0.0f;
        for (int b = 0; b < n / HK2_QK_K; b++) {
            const int8_t *y = a[j].qs + b * HK2_QK_K;
            const int16_t *bs = a[j].bs + b * (HK2_QK_K / 16);
            int sumi = 0, summ = 0;
            for (int c = 0; c < HK2_QK_K / 64; c++) {
                const uint8_t *q = x[b].qs + 32 * c;
                uint8_t sc1, m1, sc2, m2;
                hk2_q4_K_scale_min(2 * c, x[b].scales, &sc1, &m1);
                hk2_q4_K_scale_min(2 * c + 1, x[b].scales, &sc2, &m2);
                int s1 = 0, s2 = 0;
                for (int l = 0; l < 32; l++) {
                    s1 += (q[l] & 0xF) * y[64 * c + l];
                    s2 += (q[l] >> 4) * y[64 * c + 32 + l];
                }
                sumi += sc1 * s1 + sc2 * s2;
                summ += m1 * (bs[4 * c] + bs[4 * c + 1]) + m2 * (bs[4 * c + 2] + bs[4 * c + 3]);
            }
            sum += a[j].d[b] * (hk2_fp16_to_fp32(x[b].d) * (float)sumi - hk2_fp16_to_fp32(x[b].dmin) * (float)summ);
        }
        s[j] = sum;
    }
}

static void dot_q6_K(int n, const void *w, const hk2_arow *a, int na, float *s) {
    const block_q6_K *x = w;
    for (int j = 0; j < na; j++) {
        float sum = 0.0f;
        for (int b = 0; b < n / HK2_QK_K; b++) {
            const int8_t *y = a[j].qs + b * HK2_QK_K;
            const uint8_t *ql = x[b].ql, *qh = x[b].qh;
            const int8_t *sc = x[b].scales;
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
            sum += a[j].d[b] * hk2_fp16_to_fp32(x[b].d) * (float)sumi;
        }
        s[j] = sum;
    }
}

#ifndef HK2_NO_X86
#define HK2_BASE_DOTS(isa)                                                    \
    void hk2_dot_q4_0_##isa(int, const void *, const hk2_arow *, int, float *); \
    void hk2_dot_q8_0_##isa(int, const void *, const hk2_arow *, int, float *); \
    void hk2_dot_q4_K_##isa(int, const void *, const hk2_arow *, int, float *); \
    void hk2_dot_q6_K_##isa(int, const void *, const hk2_arow *, int, float *);
HK2_BASE_DOTS(avx2)
HK2_BASE_DOTS(avx512bw)
HK2_BASE_DOTS(avx512vnni)
void hk2_dot_q4_0_r8_avx2(int, const void *, const hk2_arow *, int, float *);
void hk2_dot_q4_K_r8_avx2(int, const void *, const hk2_arow *, int, float *);
void hk2_dot_q4_0_r8_avx512vnni(int, const void *, const hk2_arow *, int, float *);
#endif
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
     {dot_q4_0_r8, HK2_X86(hk2_dot_q4_0_r8_avx2), NULL, HK2_X86(hk2_dot_q4_0_r8_avx512vnni)}, {0}, HK2_R8},
    /* Q4_K's 144 bytes + 4 unpacked scale bytes */
    {HK2_Q4_K_R8, "Q4_K_R8", HK2_QK_K, HK2_Q4_K_R8_BYTES, HK2_QK_K, dequantize_rows_q4_K_r8, NULL,
     {dot_q4_K_r8, HK2_X86(hk2_dot_q4_K_r8_avx2), NULL, NULL}, {0}, HK2_R8},
    {.name = NULL},
};
