// The sequence tiles of the float-path MatMul (matmul-inl.h): they run over rows already
// widened to float, so one instance serves every weight type.
#include "tensor/simd_targets.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tensor/matmul_tile.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "tensor/matmul-inl.h"

HWY_BEFORE_NAMESPACE();
namespace aviary {
namespace HWY_NAMESPACE {

void GemmWidenedRows(int n, const float* wbuf, size_t ws, int64_t cols, const float* x, int T,
                     float* y, int64_t rows) {
  switch (n) {
    case 4: return GemmRows<4>(wbuf, ws, cols, x, T, y, rows);
    case 3: return GemmRows<3>(wbuf, ws, cols, x, T, y, rows);
    case 2: return GemmRows<2>(wbuf, ws, cols, x, T, y, rows);
    default: return GemmRows<1>(wbuf, ws, cols, x, T, y, rows);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace aviary
HWY_AFTER_NAMESPACE();
