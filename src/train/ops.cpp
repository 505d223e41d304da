#include "train/ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "tensor/kernels.h"

namespace aviary::train {
namespace {

// Rows per task of the row-parallel loops: enough work to pay for a hand-off.
constexpr int64_t kRowsPerTask = 16;

// Mean and 1 / sqrt(var + eps) of n floats, in double like the kernels' LayerNorm.
void Moments(const float* x, int n, float eps, float* mean_out, float* rstd_out) {
  double mean = 0;
  for (int i = 0; i < n; ++i) mean += x[i];
  mean /= n;
  double var = 0;
  for (int i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  var /= n;
  *mean_out = static_cast<float>(mean);
  *rstd_out = static_cast<float>(1.0 / std::sqrt(var + eps));
}

// Backward of one normalised slice of n: dx (+)= rstd (dxhat - mean(dxhat) - xhat
// mean(dxhat xhat)) with dxhat = dy w.
void NormSliceBackward(const float* x, const float* w, const float* dy, int n, float mean,
                       float rstd, bool accumulate, float* dx) {
  double sum_d = 0, sum_dx = 0;
  for (int i = 0; i < n; ++i) {
    const float dxhat = dy[i] * w[i];
    sum_d += dxhat;
    sum_dx += dxhat * ((x[i] - mean) * rstd);
  }
  const float mean_d = static_cast<float>(sum_d / n), mean_dx = static_cast<float>(sum_dx / n);
  for (int i = 0; i < n; ++i) {
    const float xhat = (x[i] - mean) * rstd;
    const float g = rstd * (dy[i] * w[i] - mean_d - xhat * mean_dx);
    dx[i] = accumulate ? dx[i] + g : g;
  }
}

}  // namespace

void LayerNormRows(const float* x, const float* w, const float* b, int64_t M, int C, float eps,
                   float* y) {
  ParallelForRanges(M, kRowsPerTask, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) LayerNorm(x + m * C, w, b, C, eps, y + m * C);
  });
}

void LayerNormRowsBackward(const float* x, const float* w, const float* dy, int64_t M, int C,
                           float eps, float* dx, float* dw, float* db) {
  std::vector<float> mean(M), rstd(M);
  ParallelForRanges(M, kRowsPerTask, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      Moments(x + m * C, C, eps, &mean[m], &rstd[m]);
      NormSliceBackward(x + m * C, w, dy + m * C, C, mean[m], rstd[m], true, dx + m * C);
    }
  });
  SumOverRows(M, C, dw, [&](int64_t m, int64_t c) {
    return dy[m * C + c] * ((x[m * C + c] - mean[m]) * rstd[m]);
  });
  SumOverRows(M, C, db, [&](int64_t m, int64_t c) { return dy[m * C + c]; });
}

void GroupNormRowsBackward(const float* x, const float* w, const float* dy, int64_t M, int C, int H,
                           float eps, float* dx, float* dw, float* db) {
  const int N = C / H;
  std::vector<float> mean(M * H), rstd(M * H);
  ParallelForRanges(M, kRowsPerTask, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int h = 0; h < H; ++h) {
        const int64_t o = m * C + h * N;
        Moments(x + o, N, eps, &mean[m * H + h], &rstd[m * H + h]);
        NormSliceBackward(x + o, w + h * N, dy + o, N, mean[m * H + h], rstd[m * H + h], false,
                          dx + o);
      }
    }
  });
  SumOverRows(M, C, dw, [&](int64_t m, int64_t c) {
    const int64_t s = m * H + c / N;
    return dy[m * C + c] * ((x[m * C + c] - mean[s]) * rstd[s]);
  });
  SumOverRows(M, C, db, [&](int64_t m, int64_t c) { return dy[m * C + c]; });
}

void TokenShiftBackward(const float* dprev, int B, int T, int C, float* dxx,
                        float* const* d_last_in, const float* const* d_last_out) {
  for (int b = 0; b < B; ++b) {
    const size_t o = static_cast<size_t>(b) * T * C;
    for (int t = 1; t < T; ++t) {
      const float* src = dprev + o + static_cast<size_t>(t) * C;
      float* dst = dxx + o + static_cast<size_t>(t - 1) * C;
      for (int c = 0; c < C; ++c) dst[c] += src[c];
    }
    // d_last_out first: it may be the same memory as d_last_in (a state updated in place).
    if (d_last_out && d_last_out[b]) {
      float* dst = dxx + o + static_cast<size_t>(T - 1) * C;
      for (int c = 0; c < C; ++c) dst[c] += d_last_out[b][c];
    }
    if (d_last_in && d_last_in[b]) std::memcpy(d_last_in[b], dprev + o, C * sizeof(float));
  }
}

void MixAddBackward(const float* xx, const float* prev, const float* m, const float* dout,
                    int64_t M, int C, float* dxx, float* dprev, float* dm) {
  ParallelForRanges(M, kRowsPerTask, [&](int64_t m0, int64_t m1) {
    for (int64_t r = m0; r < m1; ++r) {
      for (int c = 0; c < C; ++c) {
        const int64_t i = r * C + c;
        dxx[i] += dout[i] * (1.0f - m[c]);
        dprev[i] += dout[i] * m[c];
      }
    }
  });
  SumOverRows(M, C, dm, [&](int64_t r, int64_t c) {
    const int64_t i = r * C + c;
    return dout[i] * (prev[i] - xx[i]);
  });
}

double CrossEntropyRows(float* logits, const int32_t* targets, int64_t rows, int V, float scale,
                        bool backward, int64_t* correct) {
  std::vector<double> loss(rows);
  std::vector<char> right(rows);
  ParallelForRanges(rows, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      float* z = logits + m * V;
      int arg = 0;
      for (int i = 1; i < V; ++i) {
        if (z[i] > z[arg]) arg = i;
      }
      const float max = z[arg];
      double sum = 0;
      for (int i = 0; i < V; ++i) sum += std::exp(static_cast<double>(z[i] - max));
      const double lse = max + std::log(sum);
      const int32_t target = targets[m];
      loss[m] = lse - z[target];
      right[m] = arg == target;
      if (!backward) continue;
      const double inv = 1.0 / sum;
      for (int i = 0; i < V; ++i) {
        z[i] = static_cast<float>(scale * (std::exp(static_cast<double>(z[i] - max)) * inv));
      }
      z[target] -= scale;
      z[arg] += scale * 1e-4f * max;  // L2Wrap
    }
  });
  double total = 0;
  for (int64_t m = 0; m < rows; ++m) {
    total += loss[m];
    if (correct) *correct += right[m];
  }
  return total;
}

}  // namespace aviary::train
