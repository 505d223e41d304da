// The 8-bit-activation MatMul for Q4_1 weights (int8_matmul-inl.h), in a file of its own so
// that the weight types compile in parallel.
#include "tensor/int8_matmul-inl.h"

#if AVIARY_HAVE_VNNI_CODE
namespace aviary::int8::vnni {
AVIARY_INT8_MATMUL_INSTANCE(, DType::kQ4_1);
}  // namespace aviary::int8::vnni
#endif
