#include "train/linear.h"

#include "tensor/gemm.h"

namespace aviary::train {

void LinearForward(const float* w, int64_t rows, int64_t cols, const float* x, int M, float* y) {
  MatMulForwardF32(w, rows, cols, x, M, y);
}

void LinearBackward(const float* w, int64_t rows, int64_t cols, const float* x, const float* dy,
                    int M, float* dx, bool accumulate_dx, float* dw) {
  if (dx) MatMulBackwardInput(w, rows, cols, dy, M, dx, accumulate_dx);
  if (dw) MatMulBackwardWeight(dy, x, M, rows, cols, dw, true);
}

}  // namespace aviary::train
