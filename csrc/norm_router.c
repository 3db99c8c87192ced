/* The float32 pieces of a CPU decode step besides attention (mla.c), each one C call in place of many small
 * torch ops (whose dispatch costs, with caches cold from streaming weights, add up to a large share of decode
 * time).
 *
 * hk2_rms_norm: y = x / sqrt(mean(x^2) + eps) * w per row.
 *
 * hk2_route: the MoE router's scores (the matrix-vector products split over the pool) and its choice. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include "hk2_internal.h"

#define NR_MAX_DIM (1 << 16)            /* experts, hidden */
#define NR_MAX_N ((int64_t)1 << 24)      /* tokens, row length */

/* y = x / sqrt(mean(x^2) + eps) * w for one row of n (y may be x): every RMSNorm of the decode step */
void hk2_norm_row(const hk2_kernels *k, const float *x, const float *w, int64_t n, float eps, float *y) {
    const float inv = 1.0f / sqrtf(k->dot_f32((int)n, x, x) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * inv * w[i];
}

/* v = softmax(v) over n values, in place */
void hk2_softmax(float *v, int64_t n) {
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t i = 0; i < n; i++) mx = v[i] > mx ? v[i] : mx;
    for (int64_t i = 0; i < n; i++) { v[i] = expf(v[i] - mx); sum += v[i]; }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < n; i++) v[i] *= inv;
}

int hk2_rms_norm(const float *x, const float *w, int64_t n_rows, int64_t n, float eps, float *y) {
    hk2_clear_error();
    if (n_rows < 0 || n < 1 || n > NR_MAX_N)
        return hk2_fail(HK2_ESHAPE, "rms_norm: n_rows=%lld, n=%lld out of range", (long long)n_rows, (long long)n);
    if (!(eps >= 0.0f) || !isfinite(eps)) return hk2_fail(HK2_EINVAL, "rms_norm: eps=%g is not a number >= 0", eps);
    if (!x || !w || !y) return hk2_fail(HK2_EINVAL, "rms_norm: %s is NULL", !x ? "x" : !w ? "w" : "y");
    const hk2_kernels *k = hk2_active_kernels();
    for (int64_t r = 0; r < n_rows; r++) hk2_norm_row(k, x + r * n, w, n, eps, y + r * n);
    return HK2_OK;
}


/* ---- router ---- */
typedef struct {
    const hk2_router *r;
    const hk2_kernels *k;
    const float *x;
    float *logits;          /* [T, E] */
    int64_t T, chunk, n_items;
    _Alignas(HK2_CACHE_LINE) atomic_llong next;
} route_job;

static void logits_task(void *ctx, int ith, int nth) {   /* items: runs of experts, all tokens */
    route_job *j = ctx;
    const int64_t E = j->r->n_experts, H = j->r->hidden;
    HK2_UNUSED(ith); HK2_UNUSED(nth);
    for (int64_t i; (i = atomic_fetch_add(&j->next, 1)) < j->n_items;) {
        const int64_t e1 = (i + 1) * j->chunk < E ? (i + 1) * j->chunk : E;
        for (int64_t e = i * j->chunk; e < e1; e++)
            for (int64_t t = 0; t < j->T; t++)
                j->logits[t * E + e] = j->k->dot_f32((int)H, j->r->weight + e * H, j->x + t * H);
    }
}

/* the index of the largest v[i] among i in [0, n) with mask[i] (ties: the lower index); -1 if none */
static int64_t argmax_masked(const float *v, const uint8_t *mask, int64_t n) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; i++)
        if (mask[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

static void choose(const hk2_router *r, float *scores, float *choice, uint8_t *open, int32_t *ids, float *w) {
    const int64_t E = r->n_experts, K = r->top_k, G = r->n_group, per = E / G;
    if (r->softmax)
        hk2_softmax(scores, E);
    else
        for (int64_t e = 0; e < E; e++) scores[e] = 1.0f / (1.0f + expf(-scores[e]));
    for (int64_t e = 0; e < E; e++) choice[e] = r->bias ? scores[e] + r->bias[e] : scores[e];
    memset(open, 1, (size_t)E);
    if (G > 1) {   /* keep the topk_group best groups */
        float gs[1024];
        uint8_t gopen[1024];
        for (int64_t g = 0; g < G; g++) {
            const float *c = choice + g * per;
            float a = -INFINITY, b = -INFINITY;   /* best and second best */
            for (int64_t i = 0; i < per; i++) {
                if (c[i] > a) { b = a; a = c[i]; }
                else if (c[i] > b) b = c[i];
            }
            gs[g] = r->bias ? a + b : a;
            gopen[g] = 1;
        }
        uint8_t keep[1024] = {0};
        for (int64_t n = 0; n < r->topk_group; n++) {
            const int64_t g = argmax_masked(gs, gopen, G);
            keep[g] = 1;
            gopen[g] = 0;
        }
        for (int64_t e = 0; e < E; e++) open[e] = keep[e / per];
    }
    float sum = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        const int64_t e = argmax_masked(choice, open, E);
        open[e] = 0;
        ids[k] = (int32_t)e;
        w[k] = scores[e];
        sum += scores[e];
    }
    const float norm = r->norm_topk && K > 1 ? 1.0f / (sum + 1e-20f) : 1.0f;
    for (int64_t k = 0; k < K; k++) w[k] = w[k] * norm * r->scaling;
}

/* the router's own fields (hk2_router_check; every hk2_route call with an unchecked router) */
static int check_router(const hk2_router *r) {
    if (!r) return hk2_fail(HK2_EINVAL, "route: r is NULL");
    const int64_t E = r->n_experts, H = r->hidden, K = r->top_k, G = r->n_group;
    if (E < 1 || E > NR_MAX_DIM) return hk2_fail(HK2_ESHAPE, "route: n_experts=%lld out of range", (long long)E);
    if (H < 1 || H > NR_MAX_DIM) return hk2_fail(HK2_ESHAPE, "route: hidden=%lld out of range", (long long)H);
    if (G < 1 || G > 1024 || E % G)
        return hk2_fail(HK2_ESHAPE, "route: n_group=%lld must divide n_experts=%lld (and be <= 1024)", (long long)G, (long long)E);
    if (G > 1 && (r->topk_group < 1 || r->topk_group > G))
        return hk2_fail(HK2_ESHAPE, "route: topk_group=%lld out of range [1, n_group=%lld]", (long long)r->topk_group, (long long)G);
    if (G > 1 && r->bias && E / G < 2)
        return hk2_fail(HK2_ESHAPE, "route: groups of %lld expert(s) cannot be scored by their top two", (long long)(E / G));
    const int64_t open_experts = G > 1 ? r->topk_group * (E / G) : E;
    if (K < 1 || K > open_experts)
        return hk2_fail(HK2_ESHAPE, "route: top_k=%lld out of range [1, %lld]", (long long)K, (long long)open_experts);
    if (!isfinite(r->scaling)) return hk2_fail(HK2_EINVAL, "route: scaling=%g is not a finite number", r->scaling);
    if (!r->weight) return hk2_fail(HK2_EINVAL, "route: weight is NULL");
    return HK2_OK;
}

HK2_DEFINE_CHECK(hk2_router_check, hk2_router, check_router)

int hk2_route(const hk2_router *r, int64_t n_tokens, const float *x, int32_t *ids, float *weights) {
    hk2_clear_error();
    const int err0 = HK2_SEALED(r, hk2_router) ? HK2_OK : check_router(r);
    if (err0) return err0;
    const int64_t E = r->n_experts, K = r->top_k;
    if (n_tokens < 0 || n_tokens > NR_MAX_N) return hk2_fail(HK2_ESHAPE, "route: n_tokens=%lld out of range", (long long)n_tokens);
    if (!x || !ids || !weights) return hk2_fail(HK2_EINVAL, "route: %s is NULL", !x ? "x" : !ids ? "ids" : "weights");
    if (n_tokens == 0) return HK2_OK;

    float *logits = malloc(sizeof(float) * (size_t)(n_tokens * E + E));
    uint8_t *open = malloc((size_t)E);
    route_job *job = aligned_alloc(HK2_CACHE_LINE, hk2_align_up(sizeof(route_job)));
    if (!logits || !open || !job) {
        free(logits); free(open); free(job);
        return hk2_fail(HK2_ENOMEM, "route: out of memory");
    }
    hk2_api_lock();
    const int64_t nth = hk2_pool_threads();
    int64_t chunk = (E + 4 * nth - 1) / (4 * nth);
    *job = (route_job){.r = r, .k = hk2_active_kernels(), .x = x, .logits = logits, .T = n_tokens, .chunk = chunk,
                       .n_items = (E + chunk - 1) / chunk};
    atomic_init(&job->next, 0);
    const int err = hk2_pool_run_dynamic(logits_task, job);
    hk2_api_unlock();
    if (!err)
        for (int64_t t = 0; t < n_tokens; t++)
            choose(r, logits + t * E, logits + n_tokens * E, open, ids + t * K, weights + t * K);
    free(logits); free(open); free(job);
    return err;
}

