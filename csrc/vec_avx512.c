/* The AVX-512 kernel tables (hk2_kernels, vec.c has the reference): the activation quantizer (bit-identical
 * to the scalar one) and the bandwidth probe; the float32 math is the AVX2 code (small next to its memory
 * traffic). Both AVX-512 levels share these, compiled without VNNI (they do not use it). */
#define HK2_AVX512_VNNI 0
#include "hk2_target_avx512.h"

static void quantize_act(const float *x, int n, int qb, int8_t *qs, float *d, int16_t *bs) {
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    const __m512 half = _mm512_set1_ps(0.5f);
    for (int bi = 0; bi < n / qb; bi++) {
        const float *xb = x + (size_t)bi * qb;
        __m512 mx = _mm512_setzero_ps();
        for (int i = 0; i < qb; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(xb + i)));
        const float amax = _mm512_reduce_max_ps(mx);
        const float dd = amax / 127.0f;
        const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
        d[bi] = qb == HK2_QK ? hk2_fp16_to_fp32(hk2_fp32_to_fp16(dd)) : dd;
        const __m512 vid = _mm512_set1_ps(id);
        for (int i = 0; i < qb; i += 16) {
            /* round half away from zero: t = trunc(v); t += sign(v) where |v - t| >= 0.5 */
            const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(xb + i), vid);
            const __m512 t = _mm512_cvtepi32_ps(_mm512_cvttps_epi32(v));  /* trunc; |v| <= 127.x */
            const __mmask16 up = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(v, t)), half, _CMP_GE_OQ);
            const __m512 step = _mm512_castsi512_ps(
                _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(v), sign), _mm512_castps_si512(_mm512_set1_ps(1.0f))));
            const __m512i q = _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, step));
            _mm_storeu_si128((__m128i *)(qs + (size_t)bi * qb + i), _mm512_cvtepi32_epi8(q));
        }
    }
    for (int g = 0; g < n / 16; g++) {
        const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16 * g)));
        bs[g] = (int16_t)_mm512_reduce_add_epi32(q);
    }
}

static uint64_t read_sum(const void *p, size_t n) {
    const uint8_t *c = p;
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 256 <= n; i += 256) {
        _mm_prefetch((const char *)(c + i) + HK2_PF_DIST, _MM_HINT_T0);
        _mm_prefetch((const char *)(c + i) + HK2_PF_DIST + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)(c + i) + HK2_PF_DIST + 128, _MM_HINT_T0);
        _mm_prefetch((const char *)(c + i) + HK2_PF_DIST + 192, _MM_HINT_T0);
        s0 = _mm512_add_epi64(s0, _mm512_loadu_si512((const void *)(c + i)));
        s1 = _mm512_add_epi64(s1, _mm512_loadu_si512((const void *)(c + i + 64)));
        s2 = _mm512_add_epi64(s2, _mm512_loadu_si512((const void *)(c + i + 128)));
        s3 = _mm512_add_epi64(s3, _mm512_loadu_si512((const void *)(c + i + 192)));
    }
    uint64_t tail = 0;
    for (; i + 8 <= n; i += 8) { uint64_t v; memcpy(&v, c + i, 8); tail += v; }
    return (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3))) + tail;
}

#define AVX512_KERNELS(NAME, LEVEL)                                                      \
    {.name = NAME, .level = LEVEL, .quantize_act = quantize_act, .read_sum = read_sum,    \
     .dot_f32 = hk2_dot_f32_avx2, .axpy_f32 = hk2_axpy_f32_avx2, .gemm_nt_f32 = hk2_gemm_nt_f32_avx2, \
     .gemm_nn_f32 = hk2_gemm_nn_f32_avx2}
const hk2_kernels hk2_kernels_avx512bw = AVX512_KERNELS("avx512bw", HK2_LVL_AVX512BW);
const hk2_kernels hk2_kernels_avx512vnni = AVX512_KERNELS("avx512vnni", HK2_LVL_AVX512VNNI);

#include "hk2_target_end.h"
