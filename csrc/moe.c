/* Fused MoE forward for one layer of routed experts (the dense layer, from the same blocks and kernels, is
 * linear.c's).
 *
 *   plan     (caller): group the (token, expert) pairs by expert; a token that picks the same
 *                      expert twice becomes one pair with the summed weight
 *   phase 0  (pool):   quantize each token's x once to the activation format of gate/up
 *   phase A  (pool):   work items = (expert, chunk of its inter rows); each item computes gate and
 *                      up rows for all tokens of the expert (weights unpacked once for up to
 *                      hk2_na_for tokens), h = silu(g) * u, and quantizes h for down (with
 *                      HK2_MOE_H_RESIDUAL in two 8-bit rows: h ~ q1 * d1 + q2 * d2, q2 the
 *                      rounding residual of q1; see gate_up_item)
 *   phase B  (pool):   work items = chunks of the hidden rows; each item reads those down rows of
 *                      every selected expert once and accumulates w * (down_e . h) into y
 * At decode (one token) phase A is one list over the gate/up rows of all K experts, phase B one
 * list over the down rows. Every output element is produced by one item in a fixed order, so
 * results do not depend on the thread count. Each weight row is read once per call. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include "hk2_internal.h"

typedef struct {
    const hk2_moe_layer *L;
    const hk2_kernels *k;
    const float *x;
    float *y;
    int64_t T, H, I;
    /* plan: group g = expert grp_expert[g], slots [grp_start[g], grp_start[g+1]) */
    int G;
    const int32_t *grp_expert, *grp_start, *slot_token;
    const float *slot_weight;
    /* activations */
    uint8_t *act_gate, *act_up, *act_h;  /* act_h: rows hr*s .. hr*s+hr-1 are slot s's h (and its residual) */
    int hr;                              /* act_h rows per slot: 1, or 2 with HK2_MOE_H_RESIDUAL */
    float *hbuf;  /* per thread: h of one phase-A item, [tokens of the expert][chunk rows] */
    size_t hbuf_stride;
    size_t act_x_stride, act_h_stride;
    int qb_gate, qb_up, qb_down;
    size_t gate_rb, up_rb, down_rb;
    hk2_dot_fn dot_gate, dot_up, dot_down;
    int rg_gate, rg_down;  /* rows per dot call (gate and up share it) */
    int na_gu, na_down;    /* activation rows per dot call (hk2_na_for) */
    /* scheduling */
    int chunk_a, chunks_per_expert, items_a, chunk_b, items_b;
    _Alignas(HK2_CACHE_LINE) atomic_int next_x;
    _Alignas(HK2_CACHE_LINE) atomic_int next_a;
    _Alignas(HK2_CACHE_LINE) atomic_int next_b;
} moe_job;

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* Rows are visited in tiles of HK2_ROW_TILE so that a tile of gate+up rows stays in L2 while every
 * token of the expert passes over it, hk2_na_for tokens at a time (weights unpacked once per
 * block for all of them). h for the whole chunk is kept per thread, then quantized for down. */

static void gate_up_item(const moe_job *j, int ith, int g, int64_t r0, int64_t r1) {
    const int e = j->grp_expert[g];
    const uint8_t *gate = j->L->gate[e], *up = j->L->up[e];
    const int first = j->grp_start[g], ns = j->grp_start[g + 1] - first;
    const int64_t cw = r1 - r0;
    float *h = j->hbuf + (size_t)ith * j->hbuf_stride;  /* [ns][cw] */
    for (int64_t rs = r0; rs < r1; rs += HK2_ROW_TILE) {
        const int64_t re = rs + HK2_ROW_TILE < r1 ? rs + HK2_ROW_TILE : r1;
        for (int s0 = 0; s0 < ns; s0 += j->na_gu) {
            const int na = ns - s0 < j->na_gu ? ns - s0 : j->na_gu;
            hk2_arow ag[HK2_MAX_NA], au[HK2_MAX_NA];
            for (int t = 0; t < na; t++) {
                const size_t off = (size_t)j->slot_token[first + s0 + t] * j->act_x_stride;
                ag[t] = hk2_act_row(j->act_gate + off, j->H, j->qb_gate);
                au[t] = hk2_act_row(j->act_up + off, j->H, j->qb_up);
            }
            const int R = j->rg_gate;
            for (int64_t r = rs; r < re; r += R) {
                float gv[HK2_MAX_NA * HK2_R8], uv[HK2_MAX_NA * HK2_R8];
                j->dot_gate((int)j->H, gate + r * j->gate_rb, ag, na, gv);
                j->dot_up((int)j->H, up + r * j->up_rb, au, na, uv);
                for (int t = 0; t < na; t++)
                    for (int i = 0; i < R; i++) h[(s0 + t) * cw + (r - r0) + i] = silu(gv[t * R + i]) * uv[t * R + i];
            }
        }
    }
    /* h = silu(g) * u is heavy-tailed (a few large values set each block's scale), so one 8-bit row
     * loses most of the small values; it is the largest error between these kernels and the float
     * model. The rounding residual quantized again carries h at ~15 bits, for one more activation
     * row in down's dot calls, where the weights are already unpacked. */
    for (int s = 0; s < ns; s++) {
        uint8_t *row = j->act_h + (size_t)(j->hr * (first + s)) * j->act_h_stride;
        float *hs = h + s * cw;
        hk2_act_quantize_into(j->k, hs, (int)cw, j->qb_down, row, j->I, r0);
        if (j->hr == 1) continue;
        const hk2_arow q = hk2_act_row(row, j->I, j->qb_down);
        for (int64_t i = 0; i < cw; i++) hs[i] -= q.d[(r0 + i) / j->qb_down] * (float)q.qs[r0 + i];
        hk2_act_quantize_into(j->k, hs, (int)cw, j->qb_down, row + j->act_h_stride, j->I, r0);
    }
}

static void down_item(const moe_job *j, int64_t r0, int64_t r1) {
    for (int64_t t = 0; t < j->T; t++) memset(j->y + t * j->H + r0, 0, sizeof(float) * (size_t)(r1 - r0));
    for (int g = 0; g < j->G; g++) {
        const uint8_t *down = j->L->down[j->grp_expert[g]];
        const int hr = j->hr, per_call = j->na_down / hr;
        for (int s0 = j->grp_start[g]; s0 < j->grp_start[g + 1]; s0 += per_call) {
            const int ns = j->grp_start[g + 1] - s0 < per_call ? j->grp_start[g + 1] - s0 : per_call;
            hk2_arow ah[HK2_MAX_NA];  /* per slot: h's 8-bit row (then its residual's) */
            for (int i = 0; i < hr * ns; i++) ah[i] = hk2_act_row(j->act_h + (size_t)(hr * s0 + i) * j->act_h_stride, j->I, j->qb_down);
            const int R = j->rg_down;
            for (int64_t r = r0; r < r1; r += R) {
                float out[HK2_MAX_NA * HK2_R8];
                j->dot_down((int)j->I, down + r * j->down_rb, ah, hr * ns, out);
                for (int t = 0; t < ns; t++) {
                    float *yt = j->y + (int64_t)j->slot_token[s0 + t] * j->H + r;
                    const float *o = out + hr * t * R;
                    if (hr == 1)
                        for (int i = 0; i < R; i++) yt[i] += j->slot_weight[s0 + t] * o[i];
                    else
                        for (int i = 0; i < R; i++) yt[i] += j->slot_weight[s0 + t] * (o[i] + o[R + i]);
                }
            }
        }
    }
}

/* Three phases, each its own dynamic pool run (no barriers): a thread the OS has not scheduled yet
 * cannot stall the others, which matters on a machine whose cores are shared (torch, other processes). */
static void quantize_x_task(void *ctx, int ith, int nth) {
    moe_job *j = ctx;
    HK2_UNUSED(ith); HK2_UNUSED(nth);
    for (int t; (t = atomic_fetch_add(&j->next_x, 1)) < j->T;) {
        const float *xt = j->x + (int64_t)t * j->H;
        hk2_act_quantize_into(j->k, xt, (int)j->H, j->qb_gate, j->act_gate + (size_t)t * j->act_x_stride, j->H, 0);
        if (j->act_up != j->act_gate)
            hk2_act_quantize_into(j->k, xt, (int)j->H, j->qb_up, j->act_up + (size_t)t * j->act_x_stride, j->H, 0);
    }
}

static void gate_up_task(void *ctx, int ith, int nth) {
    moe_job *j = ctx;
    HK2_UNUSED(nth);
    for (int i; (i = atomic_fetch_add(&j->next_a, 1)) < j->items_a;) {
        const int g = i / j->chunks_per_expert;
        const int64_t r0 = (int64_t)(i % j->chunks_per_expert) * j->chunk_a;
        gate_up_item(j, ith, g, r0, r0 + j->chunk_a < j->I ? r0 + j->chunk_a : j->I);
    }
}

static void down_task(void *ctx, int ith, int nth) {
    moe_job *j = ctx;
    HK2_UNUSED(ith); HK2_UNUSED(nth);
    for (int i; (i = atomic_fetch_add(&j->next_b, 1)) < j->items_b;) {
        const int64_t r0 = (int64_t)i * j->chunk_b;
        down_item(j, r0, r0 + j->chunk_b < j->H ? r0 + j->chunk_b : j->H);
    }
}

static int check_layer(const hk2_moe_layer *L) {
    if (!L) return hk2_fail(HK2_EINVAL, "layer is NULL");
    if (L->n_experts < 1 || L->n_experts > HK2_MAX_DIM) return hk2_fail(HK2_ESHAPE, "layer.n_experts=%lld out of range", (long long)L->n_experts);
    if (L->hidden < 1 || L->hidden > HK2_MAX_DIM) return hk2_fail(HK2_ESHAPE, "layer.hidden=%lld out of range", (long long)L->hidden);
    if (L->inter < 1 || L->inter > HK2_MAX_DIM) return hk2_fail(HK2_ESHAPE, "layer.inter=%lld out of range", (long long)L->inter);
    const struct { const char *name; int type; int64_t ncols; const void *const *ptrs; } m[3] = {
        {"gate", L->gate_type, L->hidden, L->gate}, {"up", L->up_type, L->hidden, L->up}, {"down", L->down_type, L->inter, L->down}};
    for (int i = 0; i < 3; i++) {
        if (!hk2_type_is_weight(m[i].type))
            return hk2_fail(HK2_ETYPE, "%s: unsupported weight type %d (%s)", m[i].name, m[i].type, hk2_type_name(m[i].type));
        if (m[i].ncols % hk2_block_size(m[i].type))
            return hk2_fail(HK2_ESHAPE, "%s: row length %lld is not a multiple of the %s block size %d", m[i].name,
                            (long long)m[i].ncols, hk2_type_name(m[i].type), hk2_block_size(m[i].type));
        const int64_t rows = i < 2 ? L->inter : L->hidden;
        if (rows % hk2_row_group(m[i].type))
            return hk2_fail(HK2_ESHAPE, "%s: %lld rows is not a multiple of the %s row group %d", m[i].name, (long long)rows,
                            hk2_type_name(m[i].type), hk2_row_group(m[i].type));
        if (!m[i].ptrs) return hk2_fail(HK2_EINVAL, "%s: expert pointer array is NULL", m[i].name);
        for (int64_t e = 0; e < L->n_experts; e++) {
            if (!m[i].ptrs[e]) return hk2_fail(HK2_EINVAL, "%s: expert %lld has a NULL pointer", m[i].name, (long long)e);
            if ((uintptr_t)m[i].ptrs[e] % 2)  /* blocks hold fp16 scales */
                return hk2_fail(HK2_EINVAL, "%s: expert %lld is not 2-byte aligned", m[i].name, (long long)e);
        }
    }
    if (hk2_row_group(L->gate_type) != hk2_row_group(L->up_type))
        return hk2_fail(HK2_ETYPE, "gate (%s) and up (%s) must share a row layout", hk2_type_name(L->gate_type),
                        hk2_type_name(L->up_type));
    return HK2_OK;
}

HK2_DEFINE_CHECK(hk2_moe_layer_check, hk2_moe_layer, check_layer)

int hk2_moe_forward(const hk2_moe_layer *L, int64_t T, int64_t K, const float *x, const int32_t *ids,
                    const float *weights, float *y, int flags) {
    hk2_clear_error();
    if (flags & ~HK2_MOE_H_RESIDUAL) return hk2_fail(HK2_EINVAL, "flags=%d has unknown bits", flags);
    int hr = flags & HK2_MOE_H_RESIDUAL ? 2 : 1;
    int err = HK2_SEALED(L, hk2_moe_layer) ? HK2_OK : check_layer(L);   /* a checked layer: only this call's arguments */
    if (err) return err;
    if (T < 0 || T > HK2_MAX_DIM) return hk2_fail(HK2_ESHAPE, "n_tokens=%lld out of range", (long long)T);
    if (K < 1 || K > 4096 || T * K > HK2_MAX_DIM) return hk2_fail(HK2_ESHAPE, "top_k=%lld out of range", (long long)K);
    if (T == 0) return HK2_OK;
    if (!x || !ids || !weights || !y)
        return hk2_fail(HK2_EINVAL, "%s is NULL", !x ? "x" : !ids ? "ids" : !weights ? "weights" : "y");
    const int64_t E = L->n_experts, H = L->hidden, I = L->inter, N = T * K;
    for (int64_t i = 0; i < N; i++)
        if (ids[i] < 0 || ids[i] >= E)
            return hk2_fail(HK2_EID, "ids[%lld, %lld] = %d is not an expert id in [0, %lld)", (long long)(i / K),
                            (long long)(i % K), ids[i], (long long)E);

    const int qb_gate = hk2_act_qb(L->gate_type), qb_up = hk2_act_qb(L->up_type), qb_down = hk2_act_qb(L->down_type);
    if (qb_down == 0) hr = 1;  /* float h for float weights: no rounding residual to carry */
    const size_t act_x_stride = hk2_act_row_bytes(H, qb_gate) > hk2_act_row_bytes(H, qb_up) ? hk2_act_row_bytes(H, qb_gate)
                                                                                            : hk2_act_row_bytes(H, qb_up);
    const size_t act_h_stride = hk2_act_row_bytes(I, qb_down);
    const int separate_up = qb_up != qb_gate;

    hk2_api_lock();
    /* chunk sizes: phase-A chunks are whole activation blocks of down (h is quantized per item)
     * and whole Q4_0 block pairs; shrink them until every thread has several items */
    const int nth = hk2_pool_threads();
    const int64_t G_max = N < E ? N : E;
    const int ca_min = qb_down > 64 ? qb_down : 64;
    int ca = ca_min * 2;
    while (ca > ca_min && G_max * ((I + ca - 1) / ca) < 4 * nth) ca /= 2;
    if (ca > I) ca = (int)I;
    /* phase-B chunks: long runs of each expert's down rows at decode (fewer stream starts);
     * short ones in prefill, so one expert's chunk stays in L2 while its tokens pass over it */
    int cb = T <= 4 ? 128 : 32;
    while (cb > 16 && (H + cb - 1) / cb < 4 * nth) cb /= 2;

    /* workspace layout: counts[E] | grp_expert[N] | grp_start[N+1] | slot_token[N] | slot_weight[N] |
     *                   slot_of[N] | act_gate[T] | act_up[T] | act_h[hr * N] | hbuf[nth][T * ca] */
    const size_t hbuf_stride = hk2_align_up(sizeof(float) * (size_t)T * (size_t)ca) / sizeof(float);
    size_t off = 0, o_cnt, o_ge, o_gs, o_st, o_sw, o_so, o_ag, o_au, o_ah, o_hb;
    o_cnt = off; off = hk2_align_up(off + sizeof(int32_t) * (size_t)(E + 1));
    o_ge = off; off = hk2_align_up(off + sizeof(int32_t) * (size_t)N);
    o_gs = off; off = hk2_align_up(off + sizeof(int32_t) * (size_t)(N + 1));
    o_st = off; off = hk2_align_up(off + sizeof(int32_t) * (size_t)N);
    o_sw = off; off = hk2_align_up(off + sizeof(float) * (size_t)N);
    o_so = off; off = hk2_align_up(off + sizeof(int32_t) * (size_t)N);
    o_ag = off; off += act_x_stride * (size_t)T;
    o_au = off; off += separate_up ? act_x_stride * (size_t)T : 0;
    o_ah = off; off += act_h_stride * (size_t)(hr * N);
    o_hb = off; off += sizeof(float) * hbuf_stride * (size_t)nth;
    uint8_t *ws = hk2_workspace(off);
    if (!ws) {
        hk2_api_unlock();
        return hk2_fail(HK2_ENOMEM, "moe_forward: cannot allocate %zu bytes of workspace", off);
    }
    int32_t *cnt = (int32_t *)(ws + o_cnt), *grp_expert = (int32_t *)(ws + o_ge), *grp_start = (int32_t *)(ws + o_gs);
    int32_t *slot_token = (int32_t *)(ws + o_st), *slot_of = (int32_t *)(ws + o_so);
    float *slot_weight = (float *)(ws + o_sw);

    /* plan: pairs (t, e) unique per token; counting sort by expert keeps tokens ascending */
    memset(cnt, 0, sizeof(int32_t) * (size_t)(E + 1));
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < K; k++) {
            int dup = 0;
            for (int64_t k2 = 0; k2 < k; k2++) dup |= ids[t * K + k2] == ids[t * K + k];
            slot_of[t * K + k] = dup ? -1 : 0;
            if (!dup) cnt[ids[t * K + k] + 1]++;
        }
    int G = 0;
    for (int64_t e = 0; e < E; e++) {
        if (cnt[e + 1]) { grp_expert[G] = (int32_t)e; grp_start[G] = cnt[e]; G++; }
        cnt[e + 1] += cnt[e];  /* cnt[e] = first slot of expert e */
    }
    const int S = cnt[E];
    grp_start[G] = S;
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < K; k++) {
            const int64_t i = t * K + k;
            if (slot_of[i] < 0) continue;
            const int s = cnt[ids[i]]++;
            slot_token[s] = (int32_t)t;
            float w = 0.0f;  /* sum of this token's weights for this expert */
            for (int64_t k2 = k; k2 < K; k2++)
                if (ids[t * K + k2] == ids[i]) w += weights[t * K + k2];
            slot_weight[s] = w;
        }

    moe_job *job = aligned_alloc(HK2_CACHE_LINE, hk2_align_up(sizeof(moe_job)));
    if (!job) {
        hk2_api_unlock();
        return hk2_fail(HK2_ENOMEM, "moe_forward: out of memory");
    }
    memset(job, 0, sizeof *job);
    const hk2_kernels *k = hk2_active_kernels();
    *job = (moe_job){
        .L = L, .k = k, .x = x, .y = y, .T = T, .H = H, .I = I, .G = G,
        .grp_expert = grp_expert, .grp_start = grp_start, .slot_token = slot_token, .slot_weight = slot_weight,
        .act_gate = ws + o_ag, .act_up = separate_up ? ws + o_au : ws + o_ag, .act_h = ws + o_ah, .hr = hr,
        .act_x_stride = act_x_stride, .act_h_stride = act_h_stride,
        .qb_gate = qb_gate, .qb_up = qb_up, .qb_down = qb_down,
        .gate_rb = (size_t)hk2_row_bytes(L->gate_type, H), .up_rb = (size_t)hk2_row_bytes(L->up_type, H),
        .down_rb = (size_t)hk2_row_bytes(L->down_type, I),
        .dot_gate = hk2_dot_for(k, L->gate_type), .dot_up = hk2_dot_for(k, L->up_type), .dot_down = hk2_dot_for(k, L->down_type),
        .rg_gate = hk2_row_group(L->gate_type), .rg_down = hk2_row_group(L->down_type),
        .na_gu = hk2_na_for(k, L->gate_type) < hk2_na_for(k, L->up_type) ? hk2_na_for(k, L->gate_type)
                                                                         : hk2_na_for(k, L->up_type),
        .na_down = hk2_na_for(k, L->down_type),
    };
    job->hbuf = (float *)(ws + o_hb);
    job->hbuf_stride = hbuf_stride;
    job->chunk_a = ca;
    job->chunks_per_expert = (int)((I + ca - 1) / ca);
    job->items_a = G * job->chunks_per_expert;
    job->chunk_b = cb;
    job->items_b = (int)((H + cb - 1) / cb);
    atomic_init(&job->next_x, 0);
    atomic_init(&job->next_a, 0);
    atomic_init(&job->next_b, 0);

    if (T == 1)   /* decode: one row, not worth waking the pool for */
        quantize_x_task(job, 0, 1);
    else
        err = hk2_pool_run_dynamic(quantize_x_task, job);
    if (!err) err = hk2_pool_run_dynamic(gate_up_task, job);
    if (!err) err = hk2_pool_run_dynamic(down_task, job);
    free(job);
    hk2_api_unlock();
    return err;
}
