/* The block type registry (every type's table entry, from the quants_<family>.c files) and the entry points
 * that convert whole matrices: hk2_quantize / hk2_dequantize (rows split across the pool), hk2_quantize_act,
 * and the repacks' driver. */
#include <stdatomic.h>
#include <stdlib.h>
#include "hk2_internal.h"

static const hk2_type_ops *const FAMILIES[] = {hk2_types_base, hk2_types_k, hk2_types_q, hk2_types_iq4,
                                               hk2_types_iq23, hk2_types_iq1, hk2_types_tq, hk2_types_float};

const hk2_type_ops *hk2_type_ops_for(int qtype) {
    for (size_t f = 0; f < sizeof FAMILIES / sizeof FAMILIES[0]; f++)
        for (const hk2_type_ops *o = FAMILIES[f]; o->name; o++)
            if (o->qtype == qtype) return o;
    return NULL;
}

int hk2_type_is_weight(int qtype) { const hk2_type_ops *o = hk2_type_ops_for(qtype); return o && o->dot[HK2_LVL_SCALAR]; }
const char *hk2_type_name(int qtype) { const hk2_type_ops *o = hk2_type_ops_for(qtype); return o ? o->name : "unknown"; }
int hk2_act_qb(int weight_type) { const hk2_type_ops *o = hk2_type_ops_for(weight_type); return o ? o->act_qb : HK2_QK; }
int hk2_block_size(int qtype) { const hk2_type_ops *o = hk2_type_ops_for(qtype); return o ? o->block_size : HK2_ETYPE; }
int hk2_block_bytes(int qtype) { const hk2_type_ops *o = hk2_type_ops_for(qtype); return o ? o->block_bytes : HK2_ETYPE; }
int hk2_row_group(int qtype) {
    const hk2_type_ops *o = hk2_type_ops_for(qtype);
    if (!o) return hk2_fail(HK2_ETYPE, "unsupported block type %d", qtype);
    return o->row_group > 1 ? o->row_group : 1;
}

int64_t hk2_row_bytes(int qtype, int64_t ncols) {
    const hk2_type_ops *o = hk2_type_ops_for(qtype);
    if (!o) return hk2_fail(HK2_ETYPE, "unsupported block type %d", qtype);
    if (ncols <= 0 || ncols % o->block_size)
        return hk2_fail(HK2_ESHAPE, "ncols=%lld is not a positive multiple of the %s block size %d",
                        (long long)ncols, o->name, o->block_size);
    return ncols / o->block_size * o->block_bytes;
}

/* the type's kernel at level k->level, or the nearest lower level that has one */
static int dot_level(const hk2_kernels *k, const hk2_type_ops *o) {
    int lv = k->level;
    while (lv > HK2_LVL_SCALAR && !o->dot[lv]) lv--;
    return lv;
}

hk2_dot_fn hk2_dot_for(const hk2_kernels *k, int t) {
    const hk2_type_ops *o = hk2_type_ops_for(t);
    return o ? o->dot[dot_level(k, o)] : NULL;
}

int hk2_na_for(const hk2_kernels *k, int t) {
    const hk2_type_ops *o = hk2_type_ops_for(t);
    const int na = o ? o->max_na[dot_level(k, o)] : 0;
    return na > 0 && na <= HK2_MAX_NA ? na : HK2_NA;
}

/* ---------------- entry points (rows split across the pool) ---------------- */

typedef struct {
    int quantize;
    const hk2_type_ops *ops;
    int64_t nrows, ncols, row_bytes;
    const void *src;
    void *dst;
    _Alignas(HK2_CACHE_LINE) atomic_long next;
} convert_job;

#define CONVERT_CHUNK 16

static void convert_rows(const convert_job *job, int64_t r) {
    const int64_t n = job->ncols;
    const hk2_type_ops *o = job->ops;
    if (job->quantize) o->quantize((const float *)job->src + r * n, (uint8_t *)job->dst + r * job->row_bytes, n);
    else if (o->row_group > 1 && r % o->row_group) return;  /* done with its group's first row */
    else o->dequantize((const uint8_t *)job->src + r * job->row_bytes, (float *)job->dst + r * n, n);
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
    const int rg = hk2_row_group(qtype);
    if (quantize && rg > 1)
        return hk2_fail(HK2_ETYPE, "quantize: %s is made by repacking blocks (hk2_repack_*)", ops->name);
    if (quantize && !ops->quantize)
        return hk2_fail(HK2_ETYPE, "quantize: no quantizer for %s (make such files with llama.cpp's llama-quantize)", ops->name);
    if (nrows % rg)
        return hk2_fail(HK2_ESHAPE, "dequantize: %s needs a multiple of %d rows, got %lld", ops->name, rg, (long long)nrows);
    if (nrows == 0) return HK2_OK;
    convert_job job = {.quantize = quantize, .ops = ops, .nrows = nrows, .ncols = ncols,
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

int hk2_repack(int from, int to, const void *src, int64_t nrows, int64_t ncols, void *dst, hk2_repack_fn put) {
    hk2_clear_error();
    if (!src || !dst) return hk2_fail(HK2_EINVAL, "repack: null %s pointer", !src ? "input" : "output");
    if (nrows < 0 || nrows % HK2_R8)
        return hk2_fail(HK2_ESHAPE, "repack: nrows=%lld is not a multiple of %d", (long long)nrows, HK2_R8);
    const int64_t rb = hk2_row_bytes(from, ncols);
    if (rb < 0) return (int)rb;
    const int64_t rb8 = hk2_row_bytes(to, ncols);
    if (overlap(src, nrows * rb, dst, nrows * rb8)) return hk2_fail(HK2_EINVAL, "repack: src and dst overlap");
    const int64_t nb = ncols / hk2_block_size(from);
    const size_t in_bytes = (size_t)hk2_block_bytes(from), out_bytes = HK2_R8 * (size_t)hk2_block_bytes(to);
    for (int64_t g = 0; g < nrows / HK2_R8; g++) {
        const uint8_t *in = (const uint8_t *)src + g * HK2_R8 * rb;
        uint8_t *out = (uint8_t *)dst + g * HK2_R8 * rb8;
        for (int64_t b = 0; b < nb; b++)
            for (int r = 0; r < HK2_R8; r++) put(out + (size_t)b * out_bytes, r, in + (size_t)(r * nb + b) * in_bytes);
    }
    return HK2_OK;
}

void hk2_dequantize_r8(int from, int to, hk2_repack_fn get, const void *blocks, float *y, int64_t n) {
    const hk2_type_ops *o = hk2_type_ops_for(from);
    const size_t group_bytes = HK2_R8 * (size_t)hk2_block_bytes(to);
    _Alignas(16) uint8_t one[512];   /* one source block (the largest is 292 bytes) */
    for (int64_t b = 0; b < n / o->block_size; b++)
        for (int r = 0; r < HK2_R8; r++) {
            get(one, r, (const uint8_t *)blocks + (size_t)b * group_bytes);
            o->dequantize(one, y + r * n + b * o->block_size, o->block_size);
        }
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
