/* SIMD helpers that more than one kernel file uses, AVX2-level code (every AVX-512 file compiles for AVX2 too);
 * included by hk2_target_avx2.h and hk2_target_avx512.h. */
#ifndef HK2_SIMD_H
#define HK2_SIMD_H

/* the fp16 at p (any alignment) as a float */
INLINE float half_at(const uint8_t *p) {
    hk2_half h;
    memcpy(&h, p, sizeof h);
    return hk2_fp16_to_fp32(h);
}
/* the sum of a vector's 8 floats */
INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* 16 packed bytes -> 32 nibbles: low nibbles (elements 0..15) then high nibbles (16..31) */
INLINE __m256i nibbles(const uint8_t *p) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
}
/* IQ2/IQ3 (quants_iq23_*.c): per 32-bit lane, four 7-bit sign indices (bits 0..27) -> the four sign bytes
 * (hk2_ksigns by its definition: bit 7 = parity of the 7 bits) */
INLINE __m256i ksigns4(__m256i a) {
    const __m256i m7 = _mm256_set1_epi32(0x7F);
    __m256i t = _mm256_and_si256(a, m7);
    t = _mm256_or_si256(t, _mm256_and_si256(_mm256_slli_epi32(a, 1), _mm256_slli_epi32(m7, 8)));
    t = _mm256_or_si256(t, _mm256_and_si256(_mm256_slli_epi32(a, 2), _mm256_slli_epi32(m7, 16)));
    t = _mm256_or_si256(t, _mm256_and_si256(_mm256_slli_epi32(a, 3), _mm256_slli_epi32(m7, 24)));
    __m256i p = _mm256_xor_si256(t, _mm256_srli_epi32(t, 4));
    p = _mm256_xor_si256(p, _mm256_srli_epi32(p, 2));
    p = _mm256_xor_si256(p, _mm256_srli_epi32(p, 1));
    return _mm256_or_si256(t, _mm256_slli_epi32(_mm256_and_si256(p, _mm256_set1_epi8(1)), 7));
}
/* Q3_K (quants_k_*.c): its 16 packed 6-bit scales -> int8 (-32..31); layout in quants_k.c's q3_K_scales */
INLINE __m128i q3_K_scales_v(const uint8_t *p) {
    uint32_t u[3];
    memcpy(u, p, 12);
    const uint32_t m4 = 0x0f0f0f0f, m2 = 0x03030303;
    const __m128i v = _mm_setr_epi32((int)((u[0] & m4) | ((u[2] & m2) << 4)), (int)((u[1] & m4) | (((u[2] >> 2) & m2) << 4)),
                                     (int)(((u[0] >> 4) & m4) | (((u[2] >> 4) & m2) << 4)),
                                     (int)(((u[1] >> 4) & m4) | (((u[2] >> 6) & m2) << 4)));
    return _mm_sub_epi8(v, _mm_set1_epi8(32));
}
#endif
