// The float-path MatMul and row widening for Q6_K weights (matmul-inl.h), in a file of their own
// so that the weight types compile in parallel.
#include "tensor/simd_targets.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tensor/matmul_q6_k.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "tensor/matmul-inl.h"

HWY_BEFORE_NAMESPACE();
namespace aviary {
namespace HWY_NAMESPACE {
AVIARY_MATMUL_INSTANCES(, DType::kQ6_K);
}  // namespace HWY_NAMESPACE
}  // namespace aviary
HWY_AFTER_NAMESPACE();
