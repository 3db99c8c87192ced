/* Ends a kernel file begun with hk2_target_avx2.h or hk2_target_avx512.h. */
#ifdef HK2_TARGET_PUSHED
#pragma clang attribute pop
#undef HK2_TARGET_PUSHED
#endif
