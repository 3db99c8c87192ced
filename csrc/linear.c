/* The dense layer: y[t, n] = dot(W row n, x[t]) for the non-expert matrices (attention projections, dense and shared
 * FFN, lm_head) with the same activation quantization and per-ISA dot kernels as the experts.
 *   phase 0 (pool): quantize each token's x once
 *   phase 1 (pool): work items = (chunk of output rows, tile of LIN_TOKEN_TILE tokens), row-chunk
 *                   major, so threads busy at the same moment share a chunk's weights through L3.
 *                   Inside an item, HK2_ROW_TILE rows stay in L1/L2 while the tile's tokens pass over
 *                   them hk2_na_for at a time: each weight row is read from memory once per tile.
 * Every output element comes from one item in a fixed order: results do not depend on the thread
 * count, and a token's output does not depend on the other tokens of the call. */
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include "hk2_internal.h"

#define LIN_TOKEN_TILE 32

typedef struct {
    const hk2_kernels *k;
    hk2_dot_fn dot;
    const uint8_t *w;
    const float *x;
    float *y;
    int64_t N, K, T;
    size_t rb, act_stride;
    int qb, rg, na;
    uint8_t *act;
    int64_t chunk, n_tiles, items;
    _Alignas(HK2_CACHE_LINE) atomic_long next_x;
    _Alignas(HK2_CACHE_LINE) atomic_long done_x;
    _Alignas(HK2_CACHE_LINE) atomic_long next;
} linear_job;

static void linear_item(const linear_job *j, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    for (int64_t rs = r0; rs < r1; rs += HK2_ROW_TILE) {
        const int64_t re = rs + HK2_ROW_TILE < r1 ? rs + HK2_ROW_TILE : r1;
        for (int64_t s0 = t0; s0 < t1; s0 += j->na) {
            const int na = t1 - s0 < j->na ? (int)(t1 - s0) : j->na;
            hk2_arow a[HK2_MAX_NA];
            for (int t = 0; t < na; t++) a[t] = hk2_act_row(j->act + (size_t)(s0 + t) * j->act_stride, j->K, j->qb);
            for (int64_t r = rs; r < re; r += j->rg) {
                float out[HK2_MAX_NA * HK2_R8];
                j->dot((int)j->K, j->w + (size_t)r * j->rb, a, na, out);
                for (int t = 0; t < na; t++)
                    for (int i = 0; i < j->rg; i++) j->y[(s0 + t) * j->N + r + i] = out[t * j->rg + i];
            }
        }
    }
}

/* Run with hk2_pool_run_dynamic: a thread waits only for rows of x that another running thread has
 * claimed, never for a thread that has not started, so the caller alone can always finish. */
static void linear_task(void *ctx, int ith, int nth) {
    linear_job *j = ctx;
    HK2_UNUSED(ith); HK2_UNUSED(nth);
    for (int64_t t; (t = atomic_fetch_add(&j->next_x, 1)) < j->T;) {
        hk2_act_quantize_into(j->k, j->x + t * j->K, (int)j->K, j->qb, j->act + (size_t)t * j->act_stride, j->K, 0);
        atomic_fetch_add_explicit(&j->done_x, 1, memory_order_release);
    }
    for (unsigned spins = 0; atomic_load_explicit(&j->done_x, memory_order_acquire) < j->T;) {
        if (++spins < 2000) hk2_cpu_relax();
        else sched_yield();
    }
    for (int64_t i; (i = atomic_fetch_add(&j->next, 1)) < j->items;) {
        const int64_t r0 = i / j->n_tiles * j->chunk, t0 = i % j->n_tiles * LIN_TOKEN_TILE;
        linear_item(j, r0, r0 + j->chunk < j->N ? r0 + j->chunk : j->N, t0, t0 + LIN_TOKEN_TILE < j->T ? t0 + LIN_TOKEN_TILE : j->T);
    }
}

/* checks hk2_linear's arguments (shared with hk2_attn_decode's matrices) */
int hk2_linear_check(int qtype, const void *w, int64_t n_rows, int64_t n_cols, int64_t n_tokens, const float *x, const float *y) {
    const int64_t N = n_rows, K = n_cols, T = n_tokens;
    if (!hk2_type_is_weight(qtype)) return hk2_fail(HK2_ETYPE, "linear: unsupported weight type %d (%s)", qtype, hk2_type_name(qtype));
    if (N < 1 || N > HK2_MAX_DIM) return hk2_fail(HK2_ESHAPE, "linear: n_rows=%lld out of range", (long long)N);
    if (N % hk2_row_group(qtype))
        return hk2_fail(HK2_ESHAPE, "linear: n_rows=%lld is not a multiple of the %s row group %d", (long long)N,
                        hk2_type_name(qtype), hk2_row_group(qtype));
    if (K < 1 || K > HK2_MAX_DIM || K % hk2_block_size(qtype))
        return hk2_fail(HK2_ESHAPE, "linear: n_cols=%lld is not a positive multiple of the %s block size %d", (long long)K,
                        hk2_type_name(qtype), hk2_block_size(qtype));
    if (T < 0 || T > HK2_MAX_DIM) return hk2_fail(HK2_ESHAPE, "linear: n_tokens=%lld out of range", (long long)T);
    if (T == 0) return HK2_OK;
    if (!w || !x || !y) return hk2_fail(HK2_EINVAL, "linear: %s is NULL", !w ? "w" : !x ? "x" : "y");
    if ((uintptr_t)w % 2) return hk2_fail(HK2_EINVAL, "linear: w is not 2-byte aligned (blocks hold fp16 scales)");
    if ((uintptr_t)x % sizeof(float) || (uintptr_t)y % sizeof(float))
        return hk2_fail(HK2_EINVAL, "linear: %s is not 4-byte aligned", (uintptr_t)x % sizeof(float) ? "x" : "y");
    return HK2_OK;
}

/* the call itself; the caller holds the API lock and has checked the arguments */
int hk2_linear_locked(int qtype, const void *w, int64_t n_rows, int64_t n_cols, int64_t n_tokens, const float *x, float *y) {
    const int64_t N = n_rows, K = n_cols, T = n_tokens;
    if (T == 0) return HK2_OK;
    const int qb = hk2_act_qb(qtype);
    const size_t act_stride = hk2_act_row_bytes(K, qb);
    uint8_t *act = hk2_workspace(act_stride * (size_t)T);
    if (!act) {
        return hk2_fail(HK2_ENOMEM, "linear: cannot allocate %zu bytes of workspace", act_stride * (size_t)T);
    }
    linear_job *job = aligned_alloc(HK2_CACHE_LINE, hk2_align_up(sizeof(linear_job)));
    if (!job) return hk2_fail(HK2_ENOMEM, "linear: out of memory");
    memset(job, 0, sizeof *job);
    const hk2_kernels *k = hk2_active_kernels();
    const int nth = hk2_pool_threads();
    const int64_t n_tiles = (T + LIN_TOKEN_TILE - 1) / LIN_TOKEN_TILE;
    /* long row chunks (fewer stream starts), shrunk until every thread has several items */
    int64_t chunk = 256;
    while (chunk > 16 && (N + chunk - 1) / chunk * n_tiles < 4 * nth) chunk /= 2;
    job->k = k;
    job->dot = hk2_dot_for(k, qtype);
    job->w = w;
    job->x = x;
    job->y = y;
    job->N = N; job->K = K; job->T = T;
    job->rb = (size_t)hk2_row_bytes(qtype, K);
    job->act_stride = act_stride;
    job->qb = qb;
    job->rg = hk2_row_group(qtype);
    job->na = hk2_na_for(k, qtype);
    job->act = act;
    job->chunk = chunk;
    job->n_tiles = n_tiles;
    job->items = (N + chunk - 1) / chunk * n_tiles;
    atomic_init(&job->next_x, 0);
    atomic_init(&job->done_x, 0);
    atomic_init(&job->next, 0);
    const int err = hk2_pool_run_dynamic(linear_task, job);
    free(job);
    return err;
}

int hk2_linear(int qtype, const void *w, int64_t n_rows, int64_t n_cols, int64_t n_tokens, const float *x, float *y) {
    hk2_clear_error();
    int err = hk2_linear_check(qtype, w, n_rows, n_cols, n_tokens, x, y);
    if (err) return err;
    hk2_api_lock();
    err = hk2_linear_locked(qtype, w, n_rows, n_cols, n_tokens, x, y);
    hk2_api_unlock();
    return err;
}
