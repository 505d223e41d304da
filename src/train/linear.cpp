#include "train/linear.h"

#include <cstring>

#include "tensor/kernels.h"
#include "tensor/tensor.h"
#include "tensor/thread_pool.h"

namespace aviary::train {

void LinearForward(const float* w, int64_t rows, int64_t cols, const float* x, int M, float* y) {
  Tensor t{"",
           DType::kF32,
           {rows, cols},
           reinterpret_cast<const uint8_t*>(w),
           static_cast<size_t>(rows * cols) * sizeof(float)};
  MatMul(t, x, M, y);
}

void LinearBackward(const float* w, int64_t rows, int64_t cols, const float* x, const float* dy,
                    int M, float* dx, bool accumulate_dx, float* dw) {
  if (dx) {
    ParallelForRanges(M, 8, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        float* out = dx + m * cols;
        if (!accumulate_dx) std::memset(out, 0, cols * sizeof(float));
        for (int64_t r = 0; r < rows; ++r) {
          const float g = dy[m * rows + r];
          const float* wr = w + r * cols;
          for (int64_t c = 0; c < cols; ++c) out[c] += g * wr[c];
        }
      }
    });
  }
  if (dw) {
    ParallelForRanges(rows, 4, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* out = dw + r * cols;
        for (int m = 0; m < M; ++m) {
          const float g = dy[static_cast<int64_t>(m) * rows + r];
          const float* xm = x + static_cast<int64_t>(m) * cols;
          for (int64_t c = 0; c < cols; ++c) out[c] += g * xm[c];
        }
      }
    });
  }
}

}  // namespace aviary::train
