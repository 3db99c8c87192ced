/* Q4_1 Q5_0 Q5_1: the 32-value legacy types with a min or a fifth bit. Block layouts, reference dequantizers and quantizers,
 * the scalar dot kernels and the type table (hk2_type_ops, hk2_internal.h). */
#include "hk2_internal.h"

const hk2_type_ops hk2_types_q[] = {
    {.name = NULL},
};
