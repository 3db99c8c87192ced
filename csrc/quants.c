/* GGML block formats: type table, reference quantizers and dequantizers, the scalar
 * activation quantizer, and the hk2_quantize / hk2_dequantize entry points.
 * Q8_0 and Q4_0 quantization follow ggml's reference rounding (quantize_row_*_ref), so the
 * bytes equal gguf.quants.quantize; Q4_K / Q6_K use a simple min-max quantizer that
 * produces valid blocks (decoded by any GGML reader) without ggml's iterative search. */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include "hk2_internal.h"

typedef struct { int qtype; const char *name; int block_size; int block_bytes; int weight; int row_group; } type_info;

static const type_info TYPES[] = {
    {HK2_Q4_0, "Q4_0", HK2_QK, sizeof(block_q4_0), 1, 1},
    {HK2_Q8_0, "Q8_0", HK2_QK, sizeof(block_q8_0), 1, 1},
    {HK2_Q4_K, "Q4_K", HK2_QK_K, sizeof(block_q4_K), 1, 1},
    {HK2_Q6_K, "Q6_K", HK2_QK_K, sizeof(block_q6_K), 1, 1},
    {HK2_Q8_K, "Q8_K", HK2_QK_K, sizeof(block_q8_K), 0, 1},
    {HK2_Q4_0_R8, "Q4_0_R8", HK2_QK, sizeof(block_q4_0), 1, HK2_R8},  /* bytes per row-block, as Q4_0 */
    {HK2_Q4_K_R8, "Q4_K_R8", HK2_QK_K, HK2_Q4_K_R8_BYTES, 1, HK2_R8},  /* Q4_K's 144 + 4 unpacked scale bytes */
};

static const hk2_type_ops *const FAMILIES[] = {hk2_types_k, hk2_types_q, hk2_types_iq4, hk2_types_iq23,
                                               hk2_types_iq1, hk2_types_tq, hk2_types_float};

const hk2_type_ops *hk2_type_ops_for(int qtype) {
    for (size_t f = 0; f < sizeof FAMILIES / sizeof FAMILIES[0]; f++)
        for (const hk2_type_ops *o = FAMILIES[f]; o->name; o++)
            if (o->qtype == qtype) return o;
    return NULL;
}

/* the family types as type_info entries (filled once: the tables are constant) */
static type_info FAMILY_INFO[64];
static int n_family_info;
static void fill_family_info(void) {
    for (size_t f = 0; f < sizeof FAMILIES / sizeof FAMILIES[0]; f++)
        for (const hk2_type_ops *o = FAMILIES[f]; o->name && n_family_info < 64; o++)
            FAMILY_INFO[n_family_info++] =
                (type_info){o->qtype, o->name, o->block_size, o->block_bytes, 1, o->row_group > 1 ? o->row_group : 1};
}

static const type_info *find_type(int qtype) {
    for (size_t i = 0; i < sizeof TYPES / sizeof TYPES[0]; i++)
        if (TYPES[i].qtype == qtype) return &TYPES[i];
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, fill_family_info);
    for (int i = 0; i < n_family_info; i++)
        if (FAMILY_INFO[i].qtype == qtype) return &FAMILY_INFO[i];
    return NULL;
}

int hk2_type_known(int qtype) { return find_type(qtype) != NULL; }
int hk2_type_is_weight(int qtype) { const type_info *t = find_type(qtype); return t && t->weight; }
const char *hk2_type_name(int qtype) { const type_info *t = find_type(qtype); return t ? t->name : "unknown"; }
int hk2_act_qb(int weight_type) {
    const hk2_type_ops *o = hk2_type_ops_for(weight_type);
    if (o) return o->act_qb;
    const type_info *t = find_type(weight_type);
    return t ? t->block_size : HK2_QK;
}

int hk2_type_row_group(int qtype) { const type_info *t = find_type(qtype); return t ? t->row_group : 1; }
int hk2_row_group(int qtype) { const type_info *t = find_type(qtype); return t ? t->row_group : hk2_fail(HK2_ETYPE, "unsupported block type %d", qtype); }

int hk2_block_size(int qtype) { const type_info *t = find_type(qtype); return t ? t->block_size : HK2_ETYPE; }
int hk2_block_bytes(int qtype) { const type_info *t = find_type(qtype); return t ? t->block_bytes : HK2_ETYPE; }

int64_t hk2_row_bytes(int qtype, int64_t ncols) {
    const type_info *t = find_type(qtype);
    if (!t) return hk2_fail(HK2_ETYPE, "unsupported block type %d", qtype);
    if (ncols <= 0 || ncols % t->block_size)
        return hk2_fail(HK2_ESHAPE, "ncols=%lld is not a positive multiple of the %s block size %d",
                        (long long)ncols, t->name, t->block_size);
    return ncols / t->block_size * t->block_bytes;
}

/* ---------------- activations ---------------- */

void hk2_quantize_act_scalar(const float *x, int n, int qb, int8_t *qs, float *d, int16_t *bs) {
    for (int b = 0; b < n / qb; b++) {
        const float *xb = x + (size_t)b * qb;
        float amax = 0.0f;
        for (int j = 0; j < qb; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float dd = amax / 127.0f;
        const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
        /* Q8_0-style rows keep the scale block_q8_0 would store (fp16); Q8_K keeps float */
        d[b] = qb == HK2_QK ? hk2_fp16_to_fp32(hk2_fp32_to_fp16(dd)) : dd;
        for (int j = 0; j < qb; j++) qs[(size_t)b * qb + j] = (int8_t)hk2_roundf_int(xb[j] * id);
    }
    for (int g = 0; g < n / 16; g++) {
        int s = 0;
        for (int j = 0; j < 16; j++) s += qs[g * 16 + j];
        bs[g] = (int16_t)s;
    }
}

/* ---------------- reference quantizers (one row) ---------------- */

static void quantize_row_q8_0(const float *x, block_q8_0 *y, int64_t n) {
    for (int64_t i = 0; i < n / HK2_QK; i++, x += HK2_QK) {
        float amax = 0.0f;
        for (int j = 0; j < HK2_QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = hk2_fp32_to_fp16(d);
        for (int j = 0; j < HK2_QK; j++) y[i].qs[j] = (int8_t)hk2_roundf_int(x[j] * id);
    }
}

static void quantize_row_q4_0(const float *x, block_q4_0 *y, int64_t n) {
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

static void quantize_row_q4_K(const float *x, block_q4_K *y, int64_t n) {
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

static void quantize_row_q6_K(const float *x, block_q6_K *y, int64_t n) {
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

static void quantize_row_q8_K(const float *x, block_q8_K *y, int64_t n) {
    for (int64_t i = 0; i < n / HK2_QK_K; i++)
        hk2_quantize_act_scalar(x + i * HK2_QK_K, HK2_QK_K, HK2_QK_K, y[i].qs, &y[i].d, y[i].bsums);
}

/* ---------------- reference dequantizers (one row) ---------------- */

static void dequantize_row_q8_0(const block_q8_0 *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n / HK2_QK; i++) {
        const float d = hk2_fp16_to_fp32(x[i].d);
        for (int j = 0; j < HK2_QK; j++) y[i * HK2_QK + j] = d * x[i].qs[j];
    }
}

static void dequantize_row_q4_0(const block_q4_0 *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n / HK2_QK; i++) {
        const float d = hk2_fp16_to_fp32(x[i].d);
        for (int j = 0; j < HK2_QK / 2; j++) {
            y[i * HK2_QK + j] = d * ((x[i].qs[j] & 0xF) - 8);
            y[i * HK2_QK + j + HK2_QK / 2] = d * ((x[i].qs[j] >> 4) - 8);
        }
    }
}

/* 8 interleaved rows: y [8, n] */
static void dequantize_rows_q4_0_r8(const block_q4_0x8 *x, float *y, int64_t n) {
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
static void dequantize_rows_q4_K_r8(const block_q4_Kx8 *x, float *y, int64_t n) {
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

static void dequantize_row_q4_K(const block_q4_K *x, float *y, int64_t n) {
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

static void dequantize_row_q6_K(const block_q6_K *x, float *y, int64_t n) {
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

static void dequantize_row_q8_K(const block_q8_K *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n / HK2_QK_K; i++)
        for (int j = 0; j < HK2_QK_K; j++) y[i * HK2_QK_K + j] = x[i].d * x[i].qs[j];
}

/* ---------------- entry points (rows split across the pool) ---------------- */

typedef struct {
    int qtype, quantize;
    const hk2_type_ops *ops;   /* a family type's conversions, or NULL for the types of this file */
    int64_t nrows, ncols, row_bytes;
    const void *src;
    void *dst;
    _Alignas(HK2_CACHE_LINE) atomic_long next;
} convert_job;

#define CONVERT_CHUNK 16

static void convert_rows(const convert_job *job, int64_t r) {
    const int64_t n = job->ncols;
    const hk2_type_ops *o = job->ops;
    if (o) {
        if (job->quantize) o->quantize((const float *)job->src + r * n, (uint8_t *)job->dst + r * job->row_bytes, n);
        else if (o->row_group > 1 && r % o->row_group) return;  /* done with its group's first row */
        else o->dequantize((const uint8_t *)job->src + r * job->row_bytes, (float *)job->dst + r * n, n);
    } else if (job->quantize) {
        const float *x = (const float *)job->src + r * n;
        void *y = (uint8_t *)job->dst + r * job->row_bytes;
        switch (job->qtype) {
        case HK2_Q4_0: quantize_row_q4_0(x, y, n); break;
        case HK2_Q8_0: quantize_row_q8_0(x, y, n); break;
        case HK2_Q4_K: quantize_row_q4_K(x, y, n); break;
        case HK2_Q6_K: quantize_row_q6_K(x, y, n); break;
        case HK2_Q8_K: quantize_row_q8_K(x, y, n); break;
        }
    } else {
        const void *x = (const uint8_t *)job->src + r * job->row_bytes;
        float *y = (float *)job->dst + r * n;
        switch (job->qtype) {
        case HK2_Q4_0: dequantize_row_q4_0(x, y, n); break;
        case HK2_Q8_0: dequantize_row_q8_0(x, y, n); break;
        case HK2_Q4_K: dequantize_row_q4_K(x, y, n); break;
        case HK2_Q6_K: dequantize_row_q6_K(x, y, n); break;
        case HK2_Q8_K: dequantize_row_q8_K(x, y, n); break;
        case HK2_Q4_0_R8: if (r % HK2_R8 == 0) dequantize_rows_q4_0_r8(x, y, n); break;  /* the group's 8 rows */
        case HK2_Q4_K_R8: if (r % HK2_R8 == 0) dequantize_rows_q4_K_r8(x, y, n); break;
        }
    }
}

static void convert_task(void *ctx, int ith, int nth) {
    convert_job *job = ctx;
    HK2_UNUSED(ith); HK2_UNUSED(nth);
    for (;;) {
        const int64_t r0 = (int64_t)atomic_fetch_add(&job->next, CONVERT_CHUNK);
        if (r0 >= job->nrows) break;
        const int64_t r1 = r0 + CONVERT_CHUNK < job->nrows ? r0 + CONVERT_CHUNK : job->nrows;
        for (int64_t r = r0; r < r1; r++) convert_rows(job, r);
    }
}

static int convert(int qtype, const void *src, int64_t nrows, int64_t ncols, void *dst, int quantize) {
    hk2_clear_error();
    if (!src || !dst) return hk2_fail(HK2_EINVAL, "%s: null %s pointer", quantize ? "quantize" : "dequantize", !src ? "input" : "output");
    if (nrows < 0) return hk2_fail(HK2_ESHAPE, "nrows=%lld is negative", (long long)nrows);
    const int64_t rb = hk2_row_bytes(qtype, ncols);
    if (rb < 0) return (int)rb;
    const hk2_type_ops *ops = hk2_type_ops_for(qtype);
    if (quantize && ops && !ops->quantize)
        return hk2_fail(HK2_ETYPE, "quantize: no quantizer for %s (make such files with llama.cpp's llama-quantize)", ops->name);
    if (hk2_type_row_group(qtype) > 1 && quantize)
        return hk2_fail(HK2_ETYPE, "quantize: %s is made by repacking blocks (hk2_repack_*)", hk2_type_name(qtype));
    if (nrows % hk2_type_row_group(qtype))
        return hk2_fail(HK2_ESHAPE, "dequantize: %s needs a multiple of %d rows, got %lld", hk2_type_name(qtype),
                        hk2_type_row_group(qtype), (long long)nrows);
    if (nrows == 0) return HK2_OK;
    convert_job job = {.qtype = qtype, .quantize = quantize, .ops = ops, .nrows = nrows, .ncols = ncols,
                       .row_bytes = rb, .src = src, .dst = dst};
    atomic_init(&job.next, 0);
    hk2_api_lock();
    int err = nrows > CONVERT_CHUNK ? hk2_pool_run(convert_task, &job) : (convert_task(&job, 0, 1), HK2_OK);
    hk2_api_unlock();
    return err;
}

/* whether [a, a + na) and [b, b + nb) share a byte (as integers: the buffers may be unrelated objects) */
static int overlap(const void *a, int64_t na, const void *b, int64_t nb) {
    const uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + (uintptr_t)nb && y < x + (uintptr_t)na;
}

/* a repack's arguments: src rows of type `from`, dst rows of type `to` (their row bytes out) */
static int repack_args(int from, int to, const void *src, int64_t nrows, int64_t ncols, const void *dst, int64_t *rb,
                       int64_t *rb_to) {
    hk2_clear_error();
    if (!src || !dst) return hk2_fail(HK2_EINVAL, "repack: null %s pointer", !src ? "input" : "output");
    if (nrows < 0 || nrows % HK2_R8)
        return hk2_fail(HK2_ESHAPE, "repack: nrows=%lld is not a multiple of %d", (long long)nrows, HK2_R8);
    *rb = hk2_row_bytes(from, ncols);
    if (*rb < 0) return (int)*rb;
    *rb_to = hk2_row_bytes(to, ncols);
    if (overlap(src, nrows * *rb, dst, nrows * *rb_to)) return hk2_fail(HK2_EINVAL, "repack: src and dst overlap");
    return HK2_OK;
}

int hk2_repack_q4_0_r8(const void *src, int64_t nrows, int64_t ncols, void *dst) {
    int64_t rb, rb8;
    const int err = repack_args(HK2_Q4_0, HK2_Q4_0_R8, src, nrows, ncols, dst, &rb, &rb8);
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
    const int err = repack_args(HK2_Q4_K, HK2_Q4_K_R8, src, nrows, ncols, dst, &rb, &rb8);
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

int hk2_quantize(int qtype, const float *x, int64_t nrows, int64_t ncols, void *out) {
    return convert(qtype, x, nrows, ncols, out, 1);
}

int hk2_dequantize(int qtype, const void *blocks, int64_t nrows, int64_t ncols, float *out) {
    return convert(qtype, blocks, nrows, ncols, out, 0);
}

int hk2_quantize_act(int qtype, const float *x, int64_t nrows, int64_t ncols, void *out) {
    hk2_clear_error();
    if (qtype != HK2_Q8_0 && qtype != HK2_Q8_K)
        return hk2_fail(HK2_ETYPE, "quantize_act: type %d (%s) is not an activation type (Q8_0, Q8_K)", qtype, hk2_type_name(qtype));
    if (!x || !out) return hk2_fail(HK2_EINVAL, "quantize_act: null %s pointer", !x ? "input" : "output");
    if (nrows < 0) return hk2_fail(HK2_ESHAPE, "nrows=%lld is negative", (long long)nrows);
    const int64_t rb = hk2_row_bytes(qtype, ncols);
    if (rb < 0) return (int)rb;
    if (ncols > (1 << 28)) return hk2_fail(HK2_ESHAPE, "ncols=%lld too large", (long long)ncols);
    const int qb = qtype == HK2_Q8_0 ? HK2_QK : HK2_QK_K;
    const hk2_kernels *k = hk2_active_kernels();
    int8_t *qs = malloc((size_t)ncols);
    float *d = malloc(sizeof(float) * (size_t)(ncols / qb));
    int16_t *bs = malloc(sizeof(int16_t) * (size_t)(ncols / 16));
    if (!qs || !d || !bs) {
        free(qs); free(d); free(bs);
        return hk2_fail(HK2_ENOMEM, "quantize_act: out of memory");
    }
    for (int64_t r = 0; r < nrows; r++) {
        k->quantize_act(x + r * ncols, (int)ncols, qb, qs, d, bs);
        uint8_t *row = (uint8_t *)out + r * rb;
        for (int64_t b = 0; b < ncols / qb; b++) {
            if (qtype == HK2_Q8_0) {
                block_q8_0 *y = (block_q8_0 *)row + b;
                y->d = hk2_fp32_to_fp16(d[b]);  /* d[b] is already fp16-exact */
                memcpy(y->qs, qs + b * qb, qb);
            } else {
                block_q8_K *y = (block_q8_K *)row + b;
                y->d = d[b];
                memcpy(y->qs, qs + b * qb, qb);
                memcpy(y->bsums, bs + b * (qb / 16), sizeof y->bsums);
            }
        }
    }
    free(qs); free(d); free(bs);
    return HK2_OK;
}
