/* Internal definitions shared by the kernel sources: GGML block layouts, fp16 helpers,
 * the activation row layout, the per-ISA kernel table, the thread pool and error reporting. */
#ifndef HK2_INTERNAL_H
#define HK2_INTERNAL_H
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include "hk2.h"

#define HK2_QK 32      /* Q4_0 / Q8_0 block */
#define HK2_QK_K 256   /* K-quant super block */
#define HK2_NA 4       /* activation rows one dot call handles (weights unpacked once for all) */
#define HK2_MAX_NA 8   /* ... for a type whose kernel at the active level takes more (hk2_type_ops.max_na) */
#define HK2_CACHE_LINE 64
#define HK2_MAX_DIM (1 << 28)  /* the largest row count, row length and token count the drivers take */
/* rows visited together by moe.c's and linear.c's items: a tile of weight rows stays in L1/L2 while the
 * item's tokens pass over it, hk2_na_for at a time */
#define HK2_ROW_TILE 16
#define HK2_UNUSED(x) ((void)(x))

/* n rounded up to a whole number of cache lines (job structs with aligned atomics, workspace offsets) */
static inline size_t hk2_align_up(size_t n) { return (n + HK2_CACHE_LINE - 1) & ~(size_t)(HK2_CACHE_LINE - 1); }

/* ---- GGML block layouts (ggml-common.h), byte for byte ---- */
typedef uint16_t hk2_half;

typedef struct { hk2_half d; uint8_t qs[HK2_QK / 2]; } block_q4_0;  /* low nibble j, high nibble j+16 */
typedef struct { hk2_half d; int8_t qs[HK2_QK]; } block_q8_0;
typedef struct {
    hk2_half d;                 /* super-block scale of the 6-bit scales */
    hk2_half dmin;              /* super-block scale of the 6-bit mins */
    uint8_t scales[12];         /* 8 scales + 8 mins, 6 bits each, packed */
    uint8_t qs[HK2_QK_K / 2];   /* 64-value chunks: low nibbles first 32, high nibbles next 32 */
} block_q4_K;
typedef struct {
    uint8_t ql[HK2_QK_K / 2];   /* low 4 bits */
    uint8_t qh[HK2_QK_K / 4];   /* high 2 bits */
    int8_t scales[HK2_QK_K / 16];
    hk2_half d;
} block_q6_K;
typedef struct {
    float d;
    int8_t qs[HK2_QK_K];
    int16_t bsums[HK2_QK_K / 16];
} block_q8_K;

/* HK2_Q4_0_R8: block b of 8 interleaved rows; qs[32c + 4r + i] = row r's Q4_0 qs[4c + i] */
#define HK2_R8 8
typedef struct { hk2_half d[HK2_R8]; uint8_t qs[HK2_R8 * HK2_QK / 2]; } block_q4_0x8;

_Static_assert(sizeof(block_q4_0x8) == 8 * sizeof(block_q4_0), "block_q4_0x8 layout");
/* HK2_Q4_K_R8: super-block b of 8 interleaved rows; sc[j][r], m[j][r]: row r's sub-block j scale and min;
 * qs[256c + 32k + 4r + i] = row r's Q4_K qs[32c + 4k + i] (low nibbles: values 64c + 4k + i, high: +32) */
#define HK2_Q4_K_R8_BYTES 148   /* per row and super-block */
typedef struct { hk2_half d[HK2_R8]; hk2_half dmin[HK2_R8]; uint8_t sc[8][HK2_R8]; uint8_t m[8][HK2_R8]; uint8_t qs[HK2_R8 * 128]; } block_q4_Kx8;
_Static_assert(sizeof(block_q4_Kx8) == HK2_R8 * HK2_Q4_K_R8_BYTES, "block_q4_Kx8 layout");
_Static_assert(sizeof(block_q4_0) == 18, "block_q4_0 layout");
_Static_assert(sizeof(block_q8_0) == 34, "block_q8_0 layout");
_Static_assert(sizeof(block_q4_K) == 144, "block_q4_K layout");
_Static_assert(sizeof(block_q6_K) == 210, "block_q6_K layout");
_Static_assert(sizeof(block_q8_K) == 292, "block_q8_K layout");

/* ---- fp16 (IEEE half, round to nearest even, as ggml) ---- */
static inline float hk2_fp16_to_fp32(hk2_half h) {
    _Float16 v;
    memcpy(&v, &h, sizeof v);
    return (float)v;
}
static inline hk2_half hk2_fp32_to_fp16(float f) {
    _Float16 v = (_Float16)f;
    hk2_half h;
    memcpy(&h, &v, sizeof h);
    return h;
}

/* ---- activation rows ----
 * Activations are quantized on the fly to int8 in blocks of `qb` values (32: Q8_0-style, the
 * scale rounded through fp16 exactly as block_q8_0 stores it; 256: Q8_K-style, float scale).
 * Stored structure-of-arrays so SIMD loads are contiguous across blocks:
 *   qs int8[n] | qp int8[n] | s8 int16[n/4] | m8 float[n/32] | d float[n/qb] | bs int16[n/16],
 * padded to 64 bytes (qp, s8 and m8 only for qb 32). bs[g] = sum of qs[16g .. 16g+15] serves the
 * K-quants' mins/offsets; m8[b] = 8 * d[b] * (sum of block b's qs) is Q4_0_R8's q - 8 offset term.
 * qp/s8 are the Q4_0 pair view: a Q4_0 pair of blocks (b, b+1) unpacks with one shift into
 * [lo nibbles b | lo nibbles b+1] and [hi b | hi b+1], so qp holds per pair the activations in
 * that order, [y_b[0:16] y_b1[0:16] | y_b[16:32] y_b1[16:32]], and s8 the offset term of q - 8
 * in maddubs's int16 pairs: s8[16p + i] = 8 * (sum of the 4 activations lane i pairs with).
 * A trailing odd block keeps its natural order in qp. */
typedef struct {
    const int8_t *qs;
    const int8_t *qp;
    const int16_t *s8;
    const float *m8;
    const float *d;
    const int16_t *bs;
    const float *f;   /* qb 0 (float weight types): the float32 values themselves, nothing else */
} hk2_arow;

static inline size_t hk2_act_qp_bytes(int64_t n, int qb) { return qb == 32 ? (size_t)n : 0; }
static inline size_t hk2_act_s8_bytes(int64_t n, int qb) { return qb == 32 ? (size_t)n / 2 : 0; }
static inline size_t hk2_act_m8_bytes(int64_t n, int qb) { return qb == 32 ? sizeof(float) * (size_t)(n / 32) : 0; }
static inline size_t hk2_act_row_bytes(int64_t n, int qb) {
    if (qb == 0) return hk2_align_up(sizeof(float) * (size_t)n);
    const size_t b = (size_t)n + hk2_act_qp_bytes(n, qb) + hk2_act_s8_bytes(n, qb) + hk2_act_m8_bytes(n, qb) +
                     sizeof(float) * (size_t)(n / qb) + sizeof(int16_t) * (size_t)(n / 16);
    return hk2_align_up(b);
}
static inline hk2_arow hk2_act_row(const uint8_t *base, int64_t n, int qb) {
    hk2_arow r;
    if (qb == 0) {
        memset(&r, 0, sizeof r);
        r.f = (const float *)base;
        return r;
    }
    r.f = NULL;
    r.qs = (const int8_t *)base;
    r.qp = (const int8_t *)(base + n);
    r.s8 = (const int16_t *)(base + n + hk2_act_qp_bytes(n, qb));
    r.m8 = (const float *)(base + n + hk2_act_qp_bytes(n, qb) + hk2_act_s8_bytes(n, qb));
    r.d = (const float *)((const uint8_t *)r.m8 + hk2_act_m8_bytes(n, qb));
    r.bs = (const int16_t *)((const uint8_t *)r.d + sizeof(float) * (size_t)(n / qb));
    return r;
}
/* fill qp, s8 and m8 of blocks [b0, b1) (b0 even) from qs and d */
static inline void hk2_act_q4_0_view(const int8_t *qs, const float *d, int8_t *qp, int16_t *s8, float *m8, int b0, int b1,
                                     int nb_total) {
    for (int b = b0; b < b1; b++) {
        int sum = 0;
        for (int i = 0; i < 32; i++) sum += qs[32 * b + i];
        m8[b] = 8.0f * d[b] * (float)sum;
    }
    for (int b = b0; b < b1; b += 2) {
        if (b + 1 < nb_total) {
            const int8_t *y0 = qs + 32 * b, *y1 = y0 + 32;
            int8_t *o = qp + 32 * b;
            for (int i = 0; i < 16; i++) {
                o[i] = y0[i]; o[16 + i] = y1[i]; o[32 + i] = y0[16 + i]; o[48 + i] = y1[16 + i];
            }
            for (int i = 0; i < 16; i++) s8[16 * (b / 2) + i] = (int16_t)(8 * (o[2 * i] + o[2 * i + 1] + o[32 + 2 * i] + o[32 + 2 * i + 1]));
        } else {
            memcpy(qp + 32 * b, qs + 32 * b, 32);
        }
    }
}

/* ---- per-ISA kernel table (vec.c, vec_avx2.c, vec_avx512.c) ----
 * What is not a block type's dot: the activation quantizer, the bandwidth probe and the float32 math of the
 * router and MLA. The dots are in the type tables below (hk2_type_ops.dot[level]).
 * quantize_act: n values (n % qb == 0) -> qs, d, bs as described above (s8 is filled by the caller,
 * hk2_act_quantize_into); bit-identical across ISAs. */
typedef void (*hk2_dot_fn)(int n, const void *w, const hk2_arow *a, int na, float *s);
typedef void (*hk2_quantize_act_fn)(const float *x, int n, int qb, int8_t *qs, float *d, int16_t *bs);

/* kernel table levels, lowest first; hk2_kernels.level */
enum { HK2_LVL_SCALAR, HK2_LVL_AVX2, HK2_LVL_AVX512BW, HK2_LVL_AVX512VNNI, HK2_NLEVELS };

typedef struct {
    const char *name;
    int level;
    hk2_quantize_act_fn quantize_act;
    uint64_t (*read_sum)(const void *p, size_t n);  /* bandwidth probe: touch every byte */
    float (*dot_f32)(int n, const float *a, const float *b);         /* float32 math of norm_router.c, mla.c */
    void (*axpy_f32)(int n, float alpha, const float *x, float *y);  /* y += alpha * x */
    /* MLA's passes over the cache. Each output's sum runs in one fixed order whatever m and n are, so
     * splitting the work differently (another thread count) gives the same bits.
     * gemm_nt: out[i * ldo + j] (+)= a_i . b_j, a_i = a + i * lda, b_j = b + j * ldb (K values; add: 1 adds) */
    void (*gemm_nt_f32)(int m, int n, int K, const float *a, int64_t lda, const float *b, int64_t ldb, float *out,
                        int64_t ldo, int add);
    /* gemm_nn: out[i * ldo + c] = sum over k < K of p[i * ldp + k] * b[k * ldb + c], for i < m, c < n */
    void (*gemm_nn_f32)(int m, int n, int K, const float *p, int64_t ldp, const float *b, int64_t ldb, float *out,
                        int64_t ldo);
} hk2_kernels;

/* quantize n values of v into an activation row of row_len values at column off (a multiple of qb) */
static inline void hk2_act_quantize_into(const hk2_kernels *k, const float *v, int n, int qb, uint8_t *row,
                                         int64_t row_len, int64_t off) {
    if (qb == 0) {
        memcpy((float *)row + off, v, sizeof(float) * (size_t)n);
        return;
    }
    hk2_arow r = hk2_act_row(row, row_len, qb);
    int8_t *qs = (int8_t *)r.qs + off;
    k->quantize_act(v, n, qb, qs, (float *)r.d + off / qb, (int16_t *)r.bs + off / 16);
    if (qb == HK2_QK)
        hk2_act_q4_0_view(r.qs, r.d, (int8_t *)r.qp, (int16_t *)r.s8, (float *)r.m8, (int)(off / HK2_QK),
                          (int)((off + n) / HK2_QK), (int)(row_len / HK2_QK));
}

extern const hk2_kernels hk2_kernels_scalar;
#ifndef HK2_NO_X86
extern const hk2_kernels hk2_kernels_avx2;
extern const hk2_kernels hk2_kernels_avx512bw;
extern const hk2_kernels hk2_kernels_avx512vnni;
/* the AVX2 float math, also the AVX-512 tables' (it is small next to its memory traffic) */
float hk2_dot_f32_avx2(int n, const float *a, const float *b);
void hk2_axpy_f32_avx2(int n, float alpha, const float *x, float *y);
void hk2_gemm_nt_f32_avx2(int m, int n, int K, const float *a, int64_t lda, const float *b, int64_t ldb, float *out,
                          int64_t ldo, int add);
void hk2_gemm_nn_f32_avx2(int m, int n, int K, const float *p, int64_t ldp, const float *b, int64_t ldb, float *out,
                          int64_t ldo);
#endif

/* scalar helpers reused by the SIMD files for tails and set-up */
void hk2_quantize_act_scalar(const float *x, int n, int qb, int8_t *qs, float *d, int16_t *bs);
static inline void hk2_q4_K_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}
/* the quantizers with signed sub-block scales (Q3_K, Q6_K): per 16 values s of a super-block x, the scale that maps
 * the first value of largest magnitude to q_extreme; returns the scale of largest magnitude (0: all values 0) */
static inline float hk2_signed_scales16(const float *x, float q_extreme, float scale[16]) {
    float max_scale = 0.0f, amax_scale = 0.0f;
    for (int s = 0; s < 16; s++) {
        float amax = 0.0f, max = 0.0f;
        for (int l = 0; l < 16; l++) {
            const float v = x[16 * s + l];
            if (__builtin_fabsf(v) > amax) { amax = __builtin_fabsf(v); max = v; }
        }
        scale[s] = max / q_extreme;
        if (__builtin_fabsf(scale[s]) > amax_scale) { amax_scale = __builtin_fabsf(scale[s]); max_scale = scale[s]; }
    }
    return max_scale;
}
/* the inverse: 8 6-bit scales and mins -> Q4_K's (and Q5_K's) 12 packed bytes */
static inline void hk2_q4_K_pack_scales(const uint8_t sc[8], const uint8_t m[8], uint8_t q[12]) {
    memset(q, 0, 12);
    for (int j = 0; j < 8; j++) {
        if (j < 4) {
            q[j] = sc[j];
            q[j + 4] = m[j];
        } else {
            q[j + 4] = (uint8_t)((sc[j] & 0xF) | ((m[j] & 0xF) << 4));
            q[j - 4] |= (uint8_t)((sc[j] >> 4) << 6);
            q[j] |= (uint8_t)((m[j] >> 4) << 6);
        }
    }
}
/* round half away from zero, as C roundf and gguf's np_roundf */
static inline int hk2_roundf_int(float v) {
    const int t = (int)v;  /* truncation; |v| is small here (<= 127.x) */
    const float r = v - (float)t;
    return t + (r >= 0.5f) - (r <= -0.5f);  /* branch-free: the comparisons are data-random */
}

/* ---- thread pool (threadpool.c) ---- */
static inline void hk2_cpu_relax(void) {  /* one step of a spin-wait */
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}
typedef void (*hk2_task_fn)(void *ctx, int ith, int nth);
int hk2_pool_run(hk2_task_fn fn, void *ctx);  /* runs fn on every pool thread, caller is ith 0 */
/* runs fn on the caller (ith 0) and on the workers that start before the caller's fn returns; for
 * tasks that share out work through atomic counters and never wait for a thread (no barrier) */
int hk2_pool_run_dynamic(hk2_task_fn fn, void *ctx);
void hk2_pool_barrier(void);                   /* only inside a task run by hk2_pool_run */
int hk2_pool_threads(void);
int hk2_pool_resize(int n);
void hk2_pool_shutdown(void);

/* ---- errors, lock, workspace (hk2_api.c) ---- */
int hk2_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void hk2_clear_error(void);
void hk2_api_lock(void);   /* serialises calls that use the pool or shared workspace */
void hk2_api_unlock(void);
void *hk2_workspace(size_t n);  /* n bytes, cache-line aligned, kept between calls; the caller holds the API lock */

/* the bind-time check of a struct (hk2.h): check it in full, mark it checked or not */
#define HK2_DEFINE_CHECK(name, type, check)                 \
    int name(type *s) {                                     \
        hk2_clear_error();                                  \
        const int err = check(s);                           \
        if (s) s->checked = err ? 0 : hk2_seal(s, offsetof(type, checked)); \
        return err;                                         \
    }

/* ---- pieces shared by the drivers; *_locked: the caller holds the API lock ---- */
/* linear.c: hk2_linear's argument checks (also hk2_attn_check's, for its matrices) and the call itself */
int hk2_linear_check(int qtype, const void *w, int64_t n_rows, int64_t n_cols, int64_t n_tokens, const float *x, const float *y);
int hk2_linear_locked(int qtype, const void *w, int64_t n_rows, int64_t n_cols, int64_t n_tokens, const float *x, float *y);
/* norm_router.c: y = x / sqrt(mean(x^2) + eps) * w for one row of n (y may be x); v = softmax(v) in place */
void hk2_norm_row(const hk2_kernels *k, const float *x, const float *w, int64_t n, float eps, float *y);
void hk2_softmax(float *v, int64_t n);
/* The mark hk2_*_check leaves in a valid struct's `checked` field (its last): a hash of all the bytes before it,
 * so a struct changed after its check, or a copy changed, no longer carries it and is checked in full again. */
static inline int hk2_seal(const void *s, size_t n) {
    const uint8_t *p = s;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = (h ^ w) * 0x100000001b3ull;
        h ^= h >> 29;
    }
    for (size_t i = n & ~(size_t)7; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return (int)((uint32_t)(h ^ (h >> 32)) | 1u);   /* never 0, the unchecked value */
}
#define HK2_SEALED(s, type) ((s) && (s)->checked == hk2_seal((s), offsetof(type, checked)))

/* ---- block types (quants.c: the registry; quants_<family>.c: the types) ----
 * Each family file defines one table of these, ended by an entry with name NULL. dequantize/quantize
 * convert one row of n values (n a multiple of block_size); quantize NULL: no quantizer of ours (such
 * files come from llama.cpp's). dot[level]: the type's kernel for that kernel table level; NULL takes the
 * next lower level's; dot[HK2_LVL_SCALAR] NULL: not a weight type (Q8_K, the K-quants' activation
 * blocks). act_qb: the activation row the dot reads: 32 (Q8_0 style), 256 (Q8_K style) or 0 (float32
 * values, hk2_arow.f). */
typedef void (*hk2_dequant_row_fn)(const void *blocks, float *y, int64_t n);
typedef void (*hk2_quant_row_fn)(const float *x, void *blocks, int64_t n);
typedef struct {
    int qtype;
    const char *name;
    int block_size, block_bytes;
    int act_qb;
    hk2_dequant_row_fn dequantize;
    hk2_quant_row_fn quantize;
    hk2_dot_fn dot[HK2_NLEVELS];
    int max_na[HK2_NLEVELS];  /* activation rows dot[level] takes per call (<= HK2_MAX_NA); 0: HK2_NA */
    /* rows stored interleaved (0: 1). With row_group g > 1 the dot computes g rows, s[g * j + r], and
     * dequantize converts a whole group: the g rows' bytes -> y [g, n] */
    int row_group;
} hk2_type_ops;
extern const hk2_type_ops hk2_types_base[];   /* quants_base.c: Q4_0 Q8_0 Q4_K Q6_K Q8_K Q4_0_R8 Q4_K_R8 */
extern const hk2_type_ops hk2_types_k[];      /* quants_k.c: Q2_K Q3_K Q5_K */
extern const hk2_type_ops hk2_types_q[];      /* quants_q.c: Q4_1 Q5_0 Q5_1 */
extern const hk2_type_ops hk2_types_iq4[];    /* quants_iq4.c: IQ4_NL IQ4_XS IQ4_XS_R8 */
extern const hk2_type_ops hk2_types_iq23[];   /* quants_iq23.c: IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S */
extern const hk2_type_ops hk2_types_iq1[];    /* quants_iq1.c: IQ1_S IQ1_M */
extern const hk2_type_ops hk2_types_tq[];     /* quants_tq.c: TQ1_0 TQ2_0 */
extern const hk2_type_ops hk2_types_float[];  /* quants_float.c: F32 F16 BF16 */
/* per-ISA entry points are named hk2_dot_<type>_<isa> (isa: avx2, avx512bw, avx512vnni) and are declared by
 * the family's table file under this guard, so non-x86 builds leave them NULL */
#ifndef HK2_NO_X86
#define HK2_X86(f) f
#else
#define HK2_X86(f) NULL
#endif
const hk2_type_ops *hk2_type_ops_for(int qtype);  /* the type's table entry, or NULL */
int hk2_type_is_weight(int qtype);      /* has dot kernels: usable as MoE or linear weights */
int hk2_act_qb(int weight_type);        /* activation block size for a weight type: 32, 256 or 0 */
const char *hk2_type_name(int qtype);
const hk2_kernels *hk2_active_kernels(void);
hk2_dot_fn hk2_dot_for(const hk2_kernels *k, int weight_type);
int hk2_na_for(const hk2_kernels *k, int weight_type);  /* rows per call of that dot: HK2_NA, or its max_na */
/* a repack to an 8-row layout (hk2_repack_*): checks the arguments (nrows a multiple of 8, src and dst not
 * overlapping), then put(out, r, in) stores each source block in of row r of a group into the group's out block */
typedef void (*hk2_repack_fn)(void *out, int r, const void *in);
int hk2_repack(int from, int to, const void *src, int64_t nrows, int64_t ncols, void *dst, hk2_repack_fn put);
/* the dequantizer of 8-row layout `to`: get(out, r, in) takes row r's block back out of the group's block in, which
 * the source type `from` then dequantizes: the group's 8 rows -> y [8, n] */
void hk2_dequantize_r8(int from, int to, hk2_repack_fn get, const void *blocks, float *y, int64_t n);

/* A scalar dot kernel dot_<t> (the reference the type's SIMD kernels are tested against): s[j] = the sum over the
 * blocks b of blk_<t>(x + b, y, bs, d), block b's float term from activation row j's values y, 16-value sums bs
 * and scale d there, added in block order. */
#define HK2_SCALAR_DOT(t, block_t, qk)                                                                        \
    static void dot_##t(int n, const void *w, const hk2_arow *a, int na, float *s) {                          \
        const block_t *x = w;                                                                                 \
        for (int j = 0; j < na; j++) {                                                                        \
            float sum = 0.0f;                                                                                 \
            for (int b = 0; b < n / (qk); b++)                                                                \
                sum += blk_##t(x + b, a[j].qs + (qk) * b, a[j].bs + (qk) / 16 * b, a[j].d[b]);              \
            s[j] = sum;                                                                                       \
        }                                                                                                     \
    }
/* the same for a type of 8 interleaved rows: s[8 j + r] from blk_<t>(x + b, r, y, bs, d) */
#define HK2_SCALAR_DOT_R8(t, block_t, qk)                                                                     \
    static void dot_##t(int n, const void *w, const hk2_arow *a, int na, float *s) {                          \
        const block_t *x = w;                                                                                 \
        for (int j = 0; j < na; j++)                                                                          \
            for (int r = 0; r < HK2_R8; r++) {                                                                \
                float sum = 0.0f;                                                                             \
                for (int b = 0; b < n / (qk); b++)                                                            \
                    sum += blk_##t(x + b, r, a[j].qs + (qk) * b, a[j].bs + (qk) / 16 * b, a[j].d[b]);       \
                s[HK2_R8 * j + r] = sum;                                                                      \
            }                                                                                                 \
    }
/* A K-quant super-block's scalar term where values have mins (Q2_K Q4_K Q5_K): value v = d * sc * q[v] - dmin * m
 * over sub-blocks of `sub` values (16 or 32; sc, m one per sub-block), the min term from the activation's
 * 16-value sums bs */
static inline float hk2_k_min_term(const uint8_t *q, int sub, const uint8_t *sc, const uint8_t *m, hk2_half d,
                                   hk2_half dmin, const int8_t *y, const int16_t *bs, float da) {
    int sumi = 0, summ = 0;
    for (int sb = 0; sb < HK2_QK_K / sub; sb++) {
        int p = 0;
        for (int l = 0; l < sub; l++) p += q[sub * sb + l] * y[sub * sb + l];
        sumi += sc[sb] * p;
        summ += m[sb] * (sub == 32 ? bs[2 * sb] + bs[2 * sb + 1] : bs[sb]);
    }
    return da * (hk2_fp16_to_fp32(d) * (float)sumi - hk2_fp16_to_fp32(dmin) * (float)summ);
}
/* A family type's dots for its table: dot_<t> (scalar, the table's file), hk2_dot_<t>_avx2 and
 * hk2_dot_<t>_avx512vnni (the family's SIMD files), declared by HK2_DECLARE_DOTS(t) */
typedef void hk2_dot_kernel(int n, const void *w, const hk2_arow *a, int na, float *s);
#define HK2_DOTS(t) {dot_##t, HK2_X86(hk2_dot_##t##_avx2), NULL, HK2_X86(hk2_dot_##t##_avx512vnni)}
#ifndef HK2_NO_X86
#define HK2_DECLARE_DOTS(t) hk2_dot_kernel hk2_dot_##t##_avx2, hk2_dot_##t##_avx512vnni;
#else
#define HK2_DECLARE_DOTS(t)
#endif

/* Shared by the per-ISA kernel files. */
#define INLINE static inline __attribute__((always_inline))
/* A dot entry point's body: the kernel template f(n, w, a, NA, s, ...) instantiated for each constant NA up to 4
 * (or 8), so its per-row loops unroll and its accumulators stay in registers. */
#define HK2_NA_SWITCH4(na, f, n, w, a, s, ...)                                                   \
    switch (na) {                                                                                \
    case 1: f(n, w, a, 1, s, ##__VA_ARGS__); break;                                              \
    case 2: f(n, w, a, 2, s, ##__VA_ARGS__); break;                                              \
    case 3: f(n, w, a, 3, s, ##__VA_ARGS__); break;                                              \
    default: f(n, w, a, 4, s, ##__VA_ARGS__); break;                                             \
    }
#define HK2_NA_SWITCH8(na, f, n, w, a, s, ...)                                                   \
    switch (na) {                                                                                \
    case 1: f(n, w, a, 1, s, ##__VA_ARGS__); break;                                              \
    case 2: f(n, w, a, 2, s, ##__VA_ARGS__); break;                                              \
    case 3: f(n, w, a, 3, s, ##__VA_ARGS__); break;                                              \
    case 4: f(n, w, a, 4, s, ##__VA_ARGS__); break;                                              \
    case 5: f(n, w, a, 5, s, ##__VA_ARGS__); break;                                              \
    case 6: f(n, w, a, 6, s, ##__VA_ARGS__); break;                                              \
    case 7: f(n, w, a, 7, s, ##__VA_ARGS__); break;                                              \
    default: f(n, w, a, 8, s, ##__VA_ARGS__); break;                                             \
    }
/* A SIMD file's entry point hk2_dot_<t>_<HK2_ISA> (HK2_ISA: set by hk2_target_avx2.h / hk2_target_avx512.h), the
 * kernel template dot_<t>_t (HK2_DOT_ENTRY_OF: tmpl, with further arguments) instantiated by sw (HK2_NA_SWITCH4
 * or HK2_NA_SWITCH8: up to the type's max_na activation rows) */
#define HK2_CAT4_(a, b, c, d) a##b##c##d
#define HK2_CAT4(a, b, c, d) HK2_CAT4_(a, b, c, d)
#define HK2_DOT_ENTRY_OF(t, sw, tmpl, ...)                                                                  \
    void HK2_CAT4(hk2_dot_, t, _, HK2_ISA)(int n, const void *w, const hk2_arow *a, int na, float *s) {     \
        sw(na, tmpl, n, w, a, s, ##__VA_ARGS__)                                                             \
    }
#define HK2_DOT_ENTRY(t, sw) HK2_DOT_ENTRY_OF(t, sw, dot_##t##_t)
/* Software prefetch distance in bytes along a weight row (rows of one expert are contiguous, so
 * running past a row's end fetches the next). The hardware prefetcher alone leaves a single
 * core well short of its share of DRAM bandwidth. (rw=0, locality=3) is _MM_HINT_T0. */
#ifndef HK2_PF_DIST
#define HK2_PF_DIST 2048
#endif
#define PREFETCH(p) __builtin_prefetch((const char *)(p) + HK2_PF_DIST, 0, 3)

/* Q4_K's 12 packed bytes of 6-bit scales and mins -> u[0..1] scales, u[2..3] mins, one byte each. */
INLINE void q4_K_unpack_scales(const uint8_t *scales, uint32_t u[4]) {
    memcpy(u, scales, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
    const uint32_t mins_lo = u[1] & 0x3f3f3f3f;
    u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
    u[2] = mins_lo;
    u[0] &= 0x3f3f3f3f;
}

#endif
