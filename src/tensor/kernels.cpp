#include "tensor/kernels.h"

#include <cmath>
#include <vector>

namespace aviary {
namespace {

// 8 independent partial sums: lets the compiler vectorise without -ffast-math, and fixes
// the summation order so every caller gets identical results.
float Dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  }
  for (int l = 0; i < n; ++i, ++l) acc[l] += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

}  // namespace

void MatMul(const Tensor& w, const float* x, int T, float* y) {
  const int64_t rows = w.rows(), cols = w.cols();
  thread_local std::vector<float> row_buf;
  row_buf.resize(cols);
  for (int64_t r = 0; r < rows; ++r) {
    const float* wr;
    if (w.type == DType::kF32) {
      wr = reinterpret_cast<const float*>(w.row(r));
      if (reinterpret_cast<uintptr_t>(wr) % alignof(float) != 0) {
        DequantizeRow(w.type, w.row(r), row_buf.data(), cols);
        wr = row_buf.data();
      }
    } else {
      DequantizeRow(w.type, w.row(r), row_buf.data(), cols);
      wr = row_buf.data();
    }
    for (int t = 0; t < T; ++t) y[t * rows + r] = Dot(wr, x + t * cols, cols);
  }
}

void GatherRow(const Tensor& table, int64_t row, float* y) {
  DequantizeRow(table.type, table.row(row), y, table.cols());
}

void LayerNorm(const float* x, const float* weight, const float* bias, int n, float eps,
               float* y) {
  double mean = 0;
  for (int i = 0; i < n; ++i) mean += x[i];
  mean /= n;
  double var = 0;
  for (int i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  var /= n;
  const float inv = static_cast<float>(1.0 / std::sqrt(var + eps));
  const float m = static_cast<float>(mean);
  for (int i = 0; i < n; ++i) y[i] = (x[i] - m) * inv * weight[i] + bias[i];
}

void GroupNorm(const float* x, const float* weight, const float* bias, int n, int groups,
               float eps, float* y) {
  const int g = n / groups;
  for (int h = 0; h < groups; ++h) {
    LayerNorm(x + h * g, weight + h * g, bias + h * g, g, eps, y + h * g);
  }
}

}  // namespace aviary
