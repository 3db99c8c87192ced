/* hybrid_k2 CPU expert kernels: public C API.
 *
 * Weight formats are GGML's block formats, byte for byte (type ids are GGML's).
 * Every entry point validates its arguments and returns an HK2_E* code (< 0) instead of
 * crashing; hk2_last_error() then holds a message naming the bad argument.
 * The structs a caller builds once and passes to every call (hk2_moe_layer, hk2_router, hk2_mla, hk2_attn)
 * are validated once: their hk2_*_check function checks everything and marks the struct checked; a call
 * with a checked struct then checks only its own arguments (token count, ids, pos, buffers). An unchecked
 * struct (checked = 0, as a zero-initialised struct has it) is checked in full on every call, and so is one
 * whose fields changed after its check (the mark covers them). What a struct points to is not read again:
 * after changing an expert pointer array's entries or moving the weights, call the check again.
 * The text between the CDEF markers is parsed by cffi (hybrid_k2/_kernels_build.py):
 * keep it free of preprocessor directives other than integer #defines. */
#ifndef HK2_H
#define HK2_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

/* CDEF BEGIN */
#define HK2_OK 0
#define HK2_EINVAL -1   /* null pointer or bad scalar argument */
#define HK2_ETYPE -2    /* unsupported block type */
#define HK2_ESHAPE -3   /* ncols not a multiple of the block size, or a bad dimension */
#define HK2_EID -4      /* expert id out of range */
#define HK2_ENOMEM -5
#define HK2_EISA -6     /* unknown ISA name, or the CPU lacks it */
#define HK2_ETHREAD -7  /* thread creation failed */

/* GGML type ids */
#define HK2_F32 0
#define HK2_F16 1
#define HK2_Q4_0 2
#define HK2_Q4_1 3
#define HK2_Q5_0 6
#define HK2_Q5_1 7
#define HK2_Q8_0 8
#define HK2_Q2_K 10
#define HK2_Q3_K 11
#define HK2_Q4_K 12
#define HK2_Q5_K 13
#define HK2_Q6_K 14
#define HK2_Q8_K 15     /* activation format for K-quant weights */
#define HK2_IQ2_XXS 16
#define HK2_IQ2_XS 17
#define HK2_IQ3_XXS 18
#define HK2_IQ1_S 19
#define HK2_IQ4_NL 20
#define HK2_IQ3_S 21
#define HK2_IQ2_S 22
#define HK2_IQ4_XS 23
#define HK2_IQ1_M 29
#define HK2_BF16 30
#define HK2_TQ1_0 34
#define HK2_TQ2_0 35
/* Our own layout, not a GGUF type: Q4_0 with every 8 consecutive rows interleaved per block
 * (8 fp16 scales, then the 8 rows' 16 quant bytes in 4-byte runs: run c of row r at byte
 * 32c + 4r), so one kernel pass computes 8 rows with the activations broadcast. Same bytes per
 * row as Q4_0; the row count must be a multiple of 8. Made from Q4_0 by hk2_repack. */
#define HK2_Q4_0_R8 1002
/* Ours too: Q4_K with every 8 consecutive rows interleaved per super-block (8 fp16 d, 8 fp16 dmin, the 8
 * sub-block scales and mins unpacked to a byte each, then per 64-value chunk the 8 rows' 32 quant bytes in
 * 4-byte runs): 148 bytes per row and super-block (Q4_K: 144). Made from Q4_K by hk2_repack_q4_K_r8. */
#define HK2_Q4_K_R8 1003
/* Ours too: IQ4_XS with every 8 consecutive rows interleaved per super-block (8 fp16 d, the 8 sub-block scales
 * minus 32 as int8, sc[j][r] at byte 16 + 8j + r, then per 32-value sub-block j the 8 rows' 16 index bytes in
 * 8-byte runs: run k of row r at byte 80 + 128j + 64k + 8r): 138 bytes per row and super-block (IQ4_XS: 136).
 * Made from IQ4_XS by hk2_repack_iq4_xs_r8. */
#define HK2_IQ4_XS_R8 1004

int hk2_block_size(int qtype);     /* values per block, or HK2_ETYPE */
int hk2_block_bytes(int qtype);    /* bytes per block, or HK2_ETYPE */
int64_t hk2_row_bytes(int qtype, int64_t ncols);  /* or an HK2_E* code */
int hk2_row_group(int qtype);      /* rows interleaved together (8 for the _R8 types, else 1), or HK2_ETYPE */

/* x [nrows, ncols] float32 -> out [nrows, row_bytes] blocks (Q4_0, Q8_0, Q4_K, Q6_K, Q8_K). */
int hk2_quantize(int qtype, const float *x, int64_t nrows, int64_t ncols, void *out);
/* Activation quantization as the MoE kernels do it, with the active ISA's code, written out as
 * standard blocks: Q8_0 (for Q4_0/Q8_0 weights) or Q8_K (for K-quant weights). */
int hk2_quantize_act(int qtype, const float *x, int64_t nrows, int64_t ncols, void *out);
/* blocks [nrows, row_bytes] -> out [nrows, ncols] float32 (the _R8 types too: nrows a multiple of 8) */
int hk2_dequantize(int qtype, const void *blocks, int64_t nrows, int64_t ncols, float *out);
/* Q4_0 blocks [nrows, row_bytes] -> the same bytes in the Q4_0_R8 layout (nrows a multiple of 8;
 * src and dst must not overlap). */
int hk2_repack_q4_0_r8(const void *src, int64_t nrows, int64_t ncols, void *dst);
/* Q4_K blocks [nrows, row_bytes(Q4_K)] -> [nrows, row_bytes(Q4_K_R8)] in the Q4_K_R8 layout (as above). */
int hk2_repack_q4_K_r8(const void *src, int64_t nrows, int64_t ncols, void *dst);
/* IQ4_XS blocks [nrows, row_bytes(IQ4_XS)] -> [nrows, row_bytes(IQ4_XS_R8)] in the IQ4_XS_R8 layout (as above). */
int hk2_repack_iq4_xs_r8(const void *src, int64_t nrows, int64_t ncols, void *dst);

/* One MoE layer's routed experts. gate[e], up[e] point at [inter, row_bytes(type, hidden)] bytes,
 * down[e] at [hidden, row_bytes(down_type, inter)] bytes. The pointer arrays have n_experts entries.
 * gate and up share a row group; row counts are multiples of their type's row group. */
typedef struct {
    int64_t n_experts;
    int64_t hidden;
    int64_t inter;
    int gate_type;
    int up_type;
    int down_type;
    const void *const *gate;
    const void *const *up;
    const void *const *down;
    int checked;                 /* 0, or set by hk2_moe_layer_check */
} hk2_moe_layer;
/* Checks the layer in full (sizes, types, row groups, each expert pointer: 3 x n_experts of them) and marks it
 * checked: hk2_moe_forward then checks only its call's arguments. */
int hk2_moe_layer_check(hk2_moe_layer *layer);

/* y[t,:] = sum_k weights[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)),  e = ids[t,k].
 * x, y: [n_tokens, hidden] float32; ids: [n_tokens, top_k] int32; weights: [n_tokens, top_k] float32.
 * x and h = silu(g) * u are quantized to 8 bits on the fly; with HK2_MOE_H_RESIDUAL in flags h also
 * carries its rounding residual as a second 8-bit row (~15 bits: the float model's top-1 tokens, for
 * ~1-15% more decode time, ~60% more in prefill). */
#define HK2_MOE_H_RESIDUAL 1
int hk2_moe_forward(const hk2_moe_layer *layer, int64_t n_tokens, int64_t top_k,
                    const float *x, const int32_t *ids, const float *weights, float *y, int flags);

/* Dense layer: y[t, n] = sum_k W[n, k] * x[t, k] for W [n_rows, row_bytes(qtype, n_cols)] blocks (Q4_0, Q8_0,
 * Q4_K, Q6_K, Q4_0_R8), x [n_tokens, n_cols] and y [n_tokens, n_rows] float32 (not overlapping). x is quantized
 * on the fly as for the MoE (Q8_0 or Q8_K blocks); the output rows are split across the pool. */
int hk2_linear(int qtype, const void *w, int64_t n_rows, int64_t n_cols, int64_t n_tokens, const float *x, float *y);

/* y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w for n_rows rows of n float32 values (y may be x). */
int hk2_rms_norm(const float *x, const float *w, int64_t n_rows, int64_t n, float eps, float *y);

/* The MoE router (DeepSeek-V3 / Kimi K2): scores = sigmoid (or softmax) of weight @ x; the correction bias,
 * when given, steers which experts are chosen but not their weights; with n_group > 1 only the topk_group
 * best groups compete (a group's score: the sum of its top two biased scores with a bias, else its best
 * score); the top_k ids come out best first, their weights renormalised if norm_topk, times scaling. */
typedef struct {
    int64_t n_experts, hidden, top_k, n_group, topk_group;
    int softmax;                 /* 0: sigmoid scores, 1: softmax over the experts */
    int norm_topk;               /* divide the chosen weights by their sum (+1e-20) when top_k > 1 */
    float scaling;               /* routed_scaling_factor */
    const float *weight;         /* [n_experts, hidden] */
    const float *bias;           /* [n_experts] e_score_correction_bias, or NULL */
    int checked;                 /* 0, or set by hk2_router_check */
} hk2_router;
int hk2_router_check(hk2_router *r);   /* checks r in full and marks it checked (see above) */
/* x [n_tokens, hidden] -> ids [n_tokens, top_k] int32, weights [n_tokens, top_k] float32. */
int hk2_route(const hk2_router *r, int64_t n_tokens, const float *x, int32_t *ids, float *weights);

/* One weight matrix of GGML blocks: y [rows] = W x [cols]. */
typedef struct {
    int qtype;
    const void *w;               /* [rows, row_bytes(qtype, cols)] */
    int64_t rows, cols;
} hk2_matrix;
/* Absorbed MLA attention of one decode token (DeepSeek-V3's "absorb" mode) in one call, for a model
 * whose attention runs on the CPU: the new token's latent and rope key go into the cache, then the
 * query attends over positions 0..pos in the latent space, never expanding per-head keys or values.
 * Weights are the model's float32 tensors (kv_b may be GGML blocks). All float32; rope pairs are interleaved (x[2i], x[2i+1]). */
typedef struct {
    int64_t n_heads, nope, rope, v_dim, rank;  /* qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank */
    float scale;                 /* softmax scale */
    float eps;                   /* kv_a_layernorm's epsilon */
    const float *wkv_b;          /* [n_heads, nope + v_dim, rank]: kv_b_proj.weight */
    const float *kv_norm;        /* [rank]: kv_a_layernorm.weight */
    /* kv_b as GGML blocks instead (both w set; wkv_b is then not read): a GGUF's attn_k_b [n_heads * rank, nope]
     * (each head's W_k transposed) and attn_v_b [n_heads * v_dim, rank]. The head's q_nope and its latent
     * output are quantized to 8 bits for them, as hk2_linear quantizes its input. */
    hk2_matrix k_b, v_b;
    int checked;                 /* 0, or set by hk2_mla_check */
} hk2_mla;
int hk2_mla_check(hk2_mla *m);   /* checks m in full and marks it checked (see above) */
/* q [n_heads, nope + rope]: the token's queries, rope part not yet rotated; kv_a [rank + rope]: kv_a_proj's
 * output (latent, then the shared key's rope part, not normalised or rotated); rot [rope / 2][2]: cos and
 * sin (attention factor included) for position pos; kv_cache [pos + 1, rank] and pe_cache [pos + 1, rope]:
 * this layer's cache, row pos written here; o [n_heads, v_dim] (not overlapping the inputs). */
int hk2_mla_decode(const hk2_mla *m, int64_t pos, const float *q, const float *kv_a, const float *rot,
                   float *kv_cache, float *pe_cache, float *o);

/* A decoder layer's attention for one decode token, end to end in one call (what the model does with
 * input_layernorm, the projections as hk2_linear and hk2_mla_decode): out = x + o(mla(norm(x))).
 * With q_a.w NULL, q_b is q_proj (no query LoRA) and q_a_norm is unused. */
typedef struct {
    hk2_mla mla;
    int64_t hidden;
    const float *input_norm;     /* [hidden] */
    float input_eps;
    const float *q_a_norm;       /* [q_a.rows] */
    float q_a_eps;
    hk2_matrix q_a, q_b, kv_a, o;
    int checked;                 /* 0, or set by hk2_attn_check (which checks a.mla too; a.mla.checked is not read) */
} hk2_attn;
int hk2_attn_check(hk2_attn *a);   /* checks a in full (its four matrices, norms and mla) and marks it checked */
/* x, out [hidden] (may be the same); rot, kv_cache, pe_cache as for hk2_mla_decode. */
int hk2_attn_decode(const hk2_attn *a, int64_t pos, const float *x, const float *rot, float *kv_cache,
                    float *pe_cache, float *out);

int hk2_set_threads(int n);        /* persistent pool of n threads (caller included) */
int hk2_get_threads(void);
int hk2_set_isa(const char *name); /* "scalar" | "avx2" | "avx512"; HK2_EISA if unknown/unsupported */
const char *hk2_isa(void);         /* the ISA in use */
int hk2_isa_supported(const char *name);  /* 1, 0, or HK2_EISA for an unknown name */
const char *hk2_last_error(void);  /* message for the last failing call on this thread */
void hk2_shutdown(void);           /* join the pool's threads (also runs at exit) */

/* Streaming read of n bytes split across the pool (bandwidth probe). Returns a checksum. */
uint64_t hk2_read_probe(const void *buf, size_t n);

/* Test hook for GIL release: hk2_debug_wait blocks until another thread's hk2_debug_signal
 * finds it waiting (returns 0) or timeout_ms passes (returns -1). hk2_debug_signal returns 1 when
 * it released a waiter, 0 when none was waiting. */
int hk2_debug_wait(int timeout_ms);
int hk2_debug_signal(void);
/* The mapped checkpoint files (paths, sizes when mapped) a SIGBUS message names (csrc/sigbus.c); the first
 * call installs the handler. Returns 0, or -1 on bad arguments or no memory. */
int hk2_sigbus_watch(const char *const *paths, const long long *sizes, int n);
/* CDEF END */

#ifdef __cplusplus
}
#endif
#endif
