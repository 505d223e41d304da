// The scalar reference kernels (the original implementation, unchanged in arithmetic).
#include "tensor/reference.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "tensor/kernels.h"

namespace aviary::ref {
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

void LayerNorm(const float* x, const float* weight, const float* bias, int n, float eps, float* y) {
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

void GroupNorm(const float* x, const float* weight, const float* bias, int n, int groups, float eps,
               float* y) {
  const int g = n / groups;
  for (int h = 0; h < groups; ++h) {
    LayerNorm(x + h * g, weight + h * g, bias + h * g, g, eps, y + h * g);
  }
}

void Tanh(float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] = std::tanh(x[i]);
}
void Sigmoid(float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] = aviary::Sigmoid(x[i]);
}
void Exp(float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}
void Silu(float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] *= aviary::Sigmoid(x[i]);
}
void SquaredRelu(float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float r = x[i] < 0.0f ? 0.0f : x[i];  // NaN stays NaN, as torch.relu
    x[i] = r * r;
  }
}

void Wkv4(int C, const float* k, const float* v, const float* first, const float* decay, float* aa,
          float* bb, float* pp, float* out) {
  for (int c = 0; c < C; ++c) {
    const float ww = first[c] + k[c];
    float p = std::max(pp[c], ww);
    float e1 = std::exp(pp[c] - p);
    float e2 = std::exp(ww - p);
    out[c] = (e1 * aa[c] + e2 * v[c]) / (e1 * bb[c] + e2);
    const float ww2 = pp[c] + decay[c];
    p = std::max(ww2, k[c]);
    e1 = std::exp(ww2 - p);
    e2 = std::exp(k[c] - p);
    aa[c] = e1 * aa[c] + e2 * v[c];
    bb[c] = e1 * bb[c] + e2;
    pp[c] = p;
  }
}

void Wkv5(int H, int N, const float* r, const float* k, const float* v, const float* decay,
          const float* first, float* S, float* out) {
  for (int h = 0; h < H; ++h) {
    const int o = h * N;
    float* s = S + static_cast<long>(h) * N * N;
    for (int j = 0; j < N; ++j) out[o + j] = 0.0f;
    for (int i = 0; i < N; ++i) {
      const float ri = r[o + i], ki = k[o + i], ui = first[o + i], wi = decay[o + i];
      float* si = s + static_cast<long>(i) * N;
      for (int j = 0; j < N; ++j) {
        const float kv = ki * v[o + j];
        out[o + j] += ri * (ui * kv + si[j]);
        si[j] = wi * si[j] + kv;
      }
    }
  }
}

void Wkv7(int H, int N, const float* r, const float* decay, const float* k, const float* v,
          const float* kk, const float* a, float* S, float* out) {
  for (int h = 0; h < H; ++h) {
    const int o = h * N;
    float* s = S + static_cast<long>(h) * N * N;
    for (int i = 0; i < N; ++i) {
      float* si = s + static_cast<long>(i) * N;
      float sa = 0.0f;  // (S (-kk))[i], before decay
      for (int j = 0; j < N; ++j) sa -= si[j] * kk[o + j];
      const float vi = v[o + i];
      float acc = 0.0f;
      for (int j = 0; j < N; ++j) {
        si[j] = si[j] * decay[o + j] + sa * kk[o + j] * a[o + j] + vi * k[o + j];
        acc += si[j] * r[o + j];
      }
      out[o + i] = acc;
    }
  }
}

}  // namespace aviary::ref
