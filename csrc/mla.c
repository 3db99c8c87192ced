/* MLA attention of one decode token, for a model whose attention runs on the CPU.
 *
 * hk2_attn_decode: a layer's whole attention for one decode token (norm, projections, MLA, output), so the
 * decode loop leaves C once per attention block instead of once per op.
 *
 * hk2_mla_decode: absorbed MLA attention for one decode token. With W_k, W_v the per-head
 * blocks of kv_b_proj, c the cached latents and r the rotated shared rope keys:
 *   q_lat[h] = sum_d q_nope[h, d] W_k[h, d, :]           (absorb W_k into the query)
 *   p[h, s]  = softmax_s(scale * (q_lat[h] . c[s] + q_pe[h] . r[s]))
 *   o[h, :]  = W_v[h] (sum_s p[h, s] c[s])                 (absorb W_v into the output)
 * Per-head work is split over heads, the two passes over the cache over positions (scores) and latent
 * columns (weighted sum), so each pass reads each cached row once. */
#include <math.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdlib.h>
#include "hk2_internal.h"

#define MLA_MAX_DIM (1 << 16)
#define MLA_MAX_POS ((int64_t)1 << 24)

/* a matrix of GGML block rows with n values each, as the dot kernels run it */
typedef struct {
    hk2_dot_fn dot;
    size_t rb, act_stride;   /* bytes per weight row and per activation row */
    int64_t n;
    int qb, rg;              /* activation block size, rows per dot call */
} block_rows;

static block_rows block_rows_for(const hk2_kernels *k, int qtype, int64_t n) {
    const int qb = hk2_act_qb(qtype);
    return (block_rows){.dot = hk2_dot_for(k, qtype), .rb = (size_t)hk2_row_bytes(qtype, n),
                        .act_stride = hk2_act_row_bytes(n, qb), .n = n, .qb = qb, .rg = hk2_row_group(qtype)};
}

/* out[r] = w_r . x for `rows` block rows from w, x quantized to 8 bits into act first (as hk2_linear does) */
static void block_rows_dot(const hk2_kernels *k, const block_rows *b, const uint8_t *w, int64_t rows, const float *x,
                           uint8_t *act, float *out) {
    hk2_act_quantize_into(k, x, (int)b->n, b->qb, act, b->n, 0);
    const hk2_arow a = hk2_act_row(act, b->n, b->qb);
    for (int64_t r = 0; r < rows; r += b->rg) b->dot((int)b->n, w + r * b->rb, &a, 1, out + r);
}

typedef struct {
    const hk2_mla *m;
    const hk2_kernels *k;
    int64_t pos, n_pos;
    const float *q, *kv_a, *rot;
    float *kv_cache, *pe_cache, *o;
    float *q_lat;   /* [H, rank] */
    float *q_pe;    /* [H, rope], rotated */
    float *p;       /* [H, n_pos] scores, then probabilities */
    float *o_lat;   /* [H, rank] */
    /* kv_b as GGML blocks (m->k_b.w set): how k_b and v_b run, and per head q_nope's and o_lat's 8-bit rows */
    block_rows kb, vb;
    uint8_t *q_act, *o_act;
    int64_t n_items, chunk;  /* this phase's work items, and positions or latent columns per item */
    _Alignas(HK2_CACHE_LINE) atomic_llong next;
} mla_job;

static void rotate(const float *x, const float *rot, int64_t n, float *out) {
    for (int64_t i = 0; i < n / 2; i++) {
        const float a = x[2 * i], b = x[2 * i + 1], c = rot[2 * i], s = rot[2 * i + 1];
        out[2 * i] = a * c - b * s;
        out[2 * i + 1] = a * s + b * c;
    }
}

/* Phases, each its own dynamic pool run over an atomic item counter (no barriers, so a thread the OS has
 * not scheduled cannot stall the others). */
static void q_task(void *ctx, int ith, int nth) {   /* items: heads, then the cache row */
    mla_job *j = ctx;
    const hk2_mla *m = j->m;
    const int64_t nope = m->nope, rope = m->rope, R = m->rank, qd = nope + rope, wd = nope + m->v_dim;
    HK2_UNUSED(ith); HK2_UNUSED(nth);
    for (int64_t h; (h = atomic_fetch_add(&j->next, 1)) < j->n_items;) {
        if (h == m->n_heads) {  /* the new cache row: RMS-normalised latent, rotated shared key */
            hk2_norm_row(j->k, j->kv_a, m->kv_norm, R, m->eps, j->kv_cache + j->pos * R);
            rotate(j->kv_a + R, j->rot, rope, j->pe_cache + j->pos * rope);
            continue;
        }
        const float *qh = j->q + h * qd;
        rotate(qh + nope, j->rot, rope, j->q_pe + h * rope);
        float *ql = j->q_lat + h * R;
        if (m->k_b.w) {   /* q_lat[h, c] = W_k[h]^T[c] . q_nope[h], one block row per c */
            block_rows_dot(j->k, &j->kb, (const uint8_t *)m->k_b.w + (size_t)(h * R) * j->kb.rb, R, qh,
                           j->q_act + (size_t)h * j->kb.act_stride, ql);
            continue;
        }
        memset(ql, 0, sizeof(float) * (size_t)R);
        const float *wk = m->wkv_b + h * wd * R;
        for (int64_t d = 0; d < nope; d++) j->k->axpy_f32((int)R, qh[d], wk + d * R, ql);
    }
}

static void score_task(void *ctx, int ith, int nth) {   /* items: runs of positions, all heads */
    mla_job *j = ctx;
    const hk2_mla *m = j->m;
    const int64_t H = m->n_heads, rope = m->rope, R = m->rank, S = j->n_pos;
    HK2_UNUSED(ith); HK2_UNUSED(nth);
    for (int64_t i; (i = atomic_fetch_add(&j->next, 1)) < j->n_items;) {
        const int64_t s0 = i * j->chunk, n = s0 + j->chunk < S ? j->chunk : S - s0;
        float *p = j->p + s0;   /* p[h * S + s]: latent part, then the rope part added, then scaled */
        j->k->gemm_nt_f32((int)H, (int)n, (int)R, j->q_lat, R, j->kv_cache + s0 * R, R, p, S, 0);
        j->k->gemm_nt_f32((int)H, (int)n, (int)rope, j->q_pe, rope, j->pe_cache + s0 * rope, rope, p, S, 1);
        for (int64_t h = 0; h < H; h++)
            for (int64_t s = 0; s < n; s++) p[h * S + s] *= m->scale;
    }
}

static void softmax_task(void *ctx, int ith, int nth) {   /* items: heads */
    mla_job *j = ctx;
    const int64_t S = j->n_pos;
    HK2_UNUSED(ith); HK2_UNUSED(nth);
    for (int64_t h; (h = atomic_fetch_add(&j->next, 1)) < j->n_items;) hk2_softmax(j->p + h * S, S);
}

static void o_lat_task(void *ctx, int ith, int nth) {   /* items: runs of latent columns, all heads and positions */
    mla_job *j = ctx;
    const int64_t H = j->m->n_heads, R = j->m->rank, S = j->n_pos;
    HK2_UNUSED(ith); HK2_UNUSED(nth);
    for (int64_t i; (i = atomic_fetch_add(&j->next, 1)) < j->n_items;) {
        const int64_t lo = i * j->chunk, n = lo + j->chunk < R ? j->chunk : R - lo;
        j->k->gemm_nn_f32((int)H, (int)n, (int)S, j->p, S, j->kv_cache + lo, R, j->o_lat + lo, R);
    }
}

static void out_task(void *ctx, int ith, int nth) {   /* items: heads */
    mla_job *j = ctx;
    const hk2_mla *m = j->m;
    const int64_t R = m->rank, vd = m->v_dim, wd = m->nope + vd;
    HK2_UNUSED(ith); HK2_UNUSED(nth);
    for (int64_t h; (h = atomic_fetch_add(&j->next, 1)) < j->n_items;) {
        if (m->v_b.w) {
            block_rows_dot(j->k, &j->vb, (const uint8_t *)m->v_b.w + (size_t)(h * vd) * j->vb.rb, vd, j->o_lat + h * R,
                           j->o_act + (size_t)h * j->vb.act_stride, j->o + h * vd);
            continue;
        }
        const float *wv = m->wkv_b + (h * wd + m->nope) * R;
        for (int64_t v = 0; v < vd; v++) j->o[h * vd + v] = j->k->dot_f32((int)R, wv + v * R, j->o_lat + h * R);
    }
}

static int run_phase(mla_job *j, hk2_task_fn fn, int64_t n_items, int64_t chunk) {
    j->n_items = n_items;
    j->chunk = chunk;
    atomic_store(&j->next, 0);
    return hk2_pool_run_dynamic(fn, j);
}

/* a weight matrix's shape (rows x cols expected) and blocks, the matrix named in the error */
static int check_matrix(const char *who, const char *name, const hk2_matrix *mat, int64_t rows, int64_t cols) {
    if (mat->rows != rows || mat->cols != cols)
        return hk2_fail(HK2_ESHAPE, "%s: %s is %lld x %lld, expected %lld x %lld", who, name, (long long)mat->rows,
                        (long long)mat->cols, (long long)rows, (long long)cols);
    float io = 0.0f;   /* hk2_linear_check also looks at x and y; these are the caller's, checked elsewhere */
    const int err = hk2_linear_check(mat->qtype, mat->w, rows, cols, 1, &io, &io);
    if (err) {   /* the message is copied out first: hk2_fail writes the same buffer */
        char why[256];
        snprintf(why, sizeof why, "%s", hk2_last_error());
        hk2_fail(err, "%s: %s: %s", who, name, why);
    }
    return err;
}

static int bad_dim(const char *name, int64_t v, int64_t lo) {
    return hk2_fail(HK2_ESHAPE, "mla_decode: %s=%lld out of range [%lld, %d]", name, (long long)v, (long long)lo, MLA_MAX_DIM);
}

/* n float arrays: each set and 4-byte aligned, the first bad one named */
static int check_floats(const char *who, int n, const void *const *ptrs, const char *const *names) {
    for (int i = 0; i < n; i++) {
        if (!ptrs[i]) return hk2_fail(HK2_EINVAL, "%s: %s is NULL", who, names[i]);
        if ((uintptr_t)ptrs[i] % sizeof(float)) return hk2_fail(HK2_EINVAL, "%s: %s is not 4-byte aligned", who, names[i]);
    }
    return HK2_OK;
}

/* the struct's own fields (hk2_mla_check, hk2_attn_check; every call with an unchecked struct) */
static int check_mla(const hk2_mla *m) {
    if (!m) return hk2_fail(HK2_EINVAL, "mla_decode: m is NULL");
    if (m->n_heads < 1 || m->n_heads > MLA_MAX_DIM) return bad_dim("n_heads", m->n_heads, 1);
    if (m->nope < 1 || m->nope > MLA_MAX_DIM) return bad_dim("nope", m->nope, 1);
    if (m->rope < 2 || m->rope > MLA_MAX_DIM || m->rope % 2)
        return hk2_fail(HK2_ESHAPE, "mla_decode: rope=%lld must be even and in [2, %d]", (long long)m->rope, MLA_MAX_DIM);
    if (m->v_dim < 1 || m->v_dim > MLA_MAX_DIM) return bad_dim("v_dim", m->v_dim, 1);
    if (m->rank < 1 || m->rank > MLA_MAX_DIM) return bad_dim("rank", m->rank, 1);
    if (!(m->scale > 0.0f) || !isfinite(m->scale)) return hk2_fail(HK2_EINVAL, "mla_decode: scale=%g is not a positive number", m->scale);
    if (!(m->eps >= 0.0f) || !isfinite(m->eps)) return hk2_fail(HK2_EINVAL, "mla_decode: eps=%g is not a number >= 0", m->eps);
    if (m->k_b.w || m->v_b.w) {   /* kv_b as blocks: both halves, whole per-head row groups */
        int err = check_matrix("mla_decode", "k_b", &m->k_b, m->n_heads * m->rank, m->nope);
        if (!err) err = check_matrix("mla_decode", "v_b", &m->v_b, m->n_heads * m->v_dim, m->rank);
        if (err) return err;
        if (m->rank % hk2_row_group(m->k_b.qtype))   /* a head's rows must not share a row group */
            return hk2_fail(HK2_ESHAPE, "mla_decode: k_b: rank=%lld rows per head do not fill %s row groups of %d",
                            (long long)m->rank, hk2_type_name(m->k_b.qtype), hk2_row_group(m->k_b.qtype));
        if (m->v_dim % hk2_row_group(m->v_b.qtype))
            return hk2_fail(HK2_ESHAPE, "mla_decode: v_b: v_dim=%lld rows per head do not fill %s row groups of %d",
                            (long long)m->v_dim, hk2_type_name(m->v_b.qtype), hk2_row_group(m->v_b.qtype));
    }
    /* wkv_b only without blocks (check_matrix has checked those) */
    const void *ptrs[] = {m->wkv_b, m->kv_norm};
    static const char *const names[] = {"wkv_b", "kv_norm"};
    return m->k_b.w ? check_floats("mla_decode", 1, ptrs + 1, names + 1) : check_floats("mla_decode", 2, ptrs, names);
}

HK2_DEFINE_CHECK(hk2_mla_check, hk2_mla, check_mla)

/* what one decode call brings: the position and the token's buffers (first = 3: only rot and the caches) */
static int check_step(int64_t pos, int first, const float *q, const float *kv_a, const float *rot, const float *kv_cache,
                      const float *pe_cache, const float *o) {
    if (pos < 0 || pos >= MLA_MAX_POS)
        return hk2_fail(HK2_ESHAPE, "mla_decode: pos=%lld out of range [0, %lld)", (long long)pos, (long long)MLA_MAX_POS);
    const void *ptrs[] = {q, kv_a, o, rot, kv_cache, pe_cache};
    static const char *const names[] = {"q", "kv_a", "o", "rot", "kv_cache", "pe_cache"};
    return check_floats("mla_decode", 6 - first, ptrs + first, names + first);
}

static int mla_locked(const hk2_mla *m, int64_t pos, const float *q, const float *kv_a, const float *rot,
                      float *kv_cache, float *pe_cache, float *o) {
    const int64_t H = m->n_heads, S = pos + 1;
    const size_t n_lat = (size_t)(H * m->rank), n_pe = (size_t)(H * m->rope), n_p = (size_t)H * (size_t)S;
    float *scratch = malloc(sizeof(float) * (2 * n_lat + n_pe + n_p));
    if (!scratch) return hk2_fail(HK2_ENOMEM, "mla_decode: cannot allocate scratch for %lld positions", (long long)S);
    mla_job *job = aligned_alloc(HK2_CACHE_LINE, hk2_align_up(sizeof(mla_job)));
    const hk2_kernels *k = hk2_active_kernels();
    const int blocks = m->k_b.w != NULL;
    const block_rows kb = blocks ? block_rows_for(k, m->k_b.qtype, m->nope) : (block_rows){0};
    const block_rows vb = blocks ? block_rows_for(k, m->v_b.qtype, m->rank) : (block_rows){0};
    uint8_t *acts = blocks ? aligned_alloc(HK2_CACHE_LINE, (size_t)H * (kb.act_stride + vb.act_stride)) : NULL;
    if (!job || (blocks && !acts)) {
        free(scratch); free(job); free(acts);
        return hk2_fail(HK2_ENOMEM, "mla_decode: out of memory");
    }
    *job = (mla_job){
        .m = m, .k = k, .pos = pos, .n_pos = S, .q = q, .kv_a = kv_a, .rot = rot,
        .kv_cache = kv_cache, .pe_cache = pe_cache, .o = o,
        .q_lat = scratch, .o_lat = scratch + n_lat, .q_pe = scratch + 2 * n_lat, .p = scratch + 2 * n_lat + n_pe,
        .kb = kb, .vb = vb, .q_act = acts, .o_act = acts ? acts + (size_t)H * kb.act_stride : NULL,
    };
    const int64_t nth = hk2_pool_threads(), R = m->rank;
    int64_t pos_chunk = (S + 4 * nth - 1) / (4 * nth), col_chunk = 16;   /* several items per thread */
    if (pos_chunk < 16) pos_chunk = 16;
    while (col_chunk * 2 * 4 * nth <= R) col_chunk *= 2;
    int err = run_phase(job, q_task, H + 1, 1);
    if (!err) err = run_phase(job, score_task, (S + pos_chunk - 1) / pos_chunk, pos_chunk);
    if (!err) err = run_phase(job, softmax_task, H, 1);
    if (!err) err = run_phase(job, o_lat_task, (R + col_chunk - 1) / col_chunk, col_chunk);
    if (!err) err = run_phase(job, out_task, H, 1);
    free(job);
    free(acts);
    free(scratch);
    return err;
}

int hk2_mla_decode(const hk2_mla *m, int64_t pos, const float *q, const float *kv_a, const float *rot,
                   float *kv_cache, float *pe_cache, float *o) {
    hk2_clear_error();
    int err = HK2_SEALED(m, hk2_mla) ? HK2_OK : check_mla(m);
    if (!err) err = check_step(pos, 0, q, kv_a, rot, kv_cache, pe_cache, o);
    if (err) return err;
    hk2_api_lock();
    err = mla_locked(m, pos, q, kv_a, rot, kv_cache, pe_cache, o);
    hk2_api_unlock();
    return err;
}

/* the block's own fields, its mla included (hk2_attn_check; every call with an unchecked block) */
static int check_attn(const hk2_attn *a) {
    if (!a) return hk2_fail(HK2_EINVAL, "attn_decode: a is NULL");
    const hk2_mla *m = &a->mla;
    const int64_t D = a->hidden, H = m->n_heads;
    if (D < 1 || D > MLA_MAX_DIM) return hk2_fail(HK2_ESHAPE, "attn_decode: hidden=%lld out of range", (long long)D);
    int err = check_mla(m);   /* first: the matrices' expected shapes come from its dimensions */
    if (err) return err;
    const int lora = a->q_a.w != NULL;
    const int64_t q_in = lora ? a->q_a.rows : D;
    err = lora ? check_matrix("attn_decode", "q_a", &a->q_a, q_in, D) : HK2_OK;
    if (!err) err = check_matrix("attn_decode", "q_b", &a->q_b, H * (m->nope + m->rope), q_in);
    if (!err) err = check_matrix("attn_decode", "kv_a", &a->kv_a, m->rank + m->rope, D);
    if (!err) err = check_matrix("attn_decode", "o", &a->o, D, H * m->v_dim);
    if (err) return err;
    if (!a->input_norm || (lora && !a->q_a_norm))
        return hk2_fail(HK2_EINVAL, "attn_decode: %s is NULL", !a->input_norm ? "input_norm" : "q_a_norm");
    if (!(a->input_eps >= 0.0f) || !isfinite(a->input_eps) || !(a->q_a_eps >= 0.0f) || !isfinite(a->q_a_eps))
        return hk2_fail(HK2_EINVAL, "attn_decode: a norm epsilon is not a number >= 0");
    return HK2_OK;
}

HK2_DEFINE_CHECK(hk2_attn_check, hk2_attn, check_attn)

int hk2_attn_decode(const hk2_attn *a, int64_t pos, const float *x, const float *rot, float *kv_cache,
                    float *pe_cache, float *out) {
    hk2_clear_error();
    int err = HK2_SEALED(a, hk2_attn) ? HK2_OK : check_attn(a);
    if (!err) err = check_step(pos, 3, NULL, NULL, rot, kv_cache, pe_cache, NULL);
    if (err) return err;
    if (!x || !out) return hk2_fail(HK2_EINVAL, "attn_decode: %s is NULL", !x ? "x" : "out");
    const hk2_mla *m = &a->mla;
    const int64_t D = a->hidden, H = m->n_heads;
    const int lora = a->q_a.w != NULL;
    const int64_t q_in = lora ? a->q_a.rows : D;
    const size_t n = (size_t)(D + q_in + a->q_b.rows + a->kv_a.rows + H * m->v_dim + D);
    float *buf = malloc(sizeof(float) * n);
    if (!buf) return hk2_fail(HK2_ENOMEM, "attn_decode: out of memory");
    float *xn = buf, *qa = xn + D, *q = qa + q_in, *kva = q + a->q_b.rows, *att = kva + a->kv_a.rows, *delta = att + H * m->v_dim;
    const hk2_kernels *k = hk2_active_kernels();
    hk2_api_lock();
    hk2_norm_row(k, x, a->input_norm, D, a->input_eps, xn);
    if (lora) {
        err = hk2_linear_locked(a->q_a.qtype, a->q_a.w, a->q_a.rows, D, 1, xn, qa);
        if (!err) hk2_norm_row(k, qa, a->q_a_norm, q_in, a->q_a_eps, qa);
    }
    if (!err) err = hk2_linear_locked(a->q_b.qtype, a->q_b.w, a->q_b.rows, q_in, 1, lora ? qa : xn, q);
    if (!err) err = hk2_linear_locked(a->kv_a.qtype, a->kv_a.w, a->kv_a.rows, D, 1, xn, kva);
    if (!err) err = mla_locked(m, pos, q, kva, rot, kv_cache, pe_cache, att);
    if (!err) err = hk2_linear_locked(a->o.qtype, a->o.w, D, a->o.cols, 1, att, delta);
    hk2_api_unlock();
    if (!err)
        for (int64_t i = 0; i < D; i++) out[i] = x[i] + delta[i];
    free(buf);
    return err;
}
