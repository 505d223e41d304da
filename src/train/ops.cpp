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

void Wkv7Backward(int T, int H, int N, const float* r, const float* w, const float* k,
                  const float* v, const float* kk, const float* a, const float* dy,
                  const float* ckpt, int every, float* dS_all, float* dr, float* dw, float* dk,
                  float* dv, float* dkk, float* da) {
  const int C = H * N;
  const size_t NN = static_cast<size_t>(N) * N;
  ParallelFor(H, [&](int64_t h, int) {
    // The states before each token of one checkpoint interval, recomputed from its start.
    thread_local std::vector<float> states, a_vec, b_vec, sa, dsa, db, da_vec;
    states.resize((every + 1) * NN);
    for (auto* vec : {&a_vec, &b_vec, &sa, &dsa, &db, &da_vec}) vec->resize(N);
    float* dS = dS_all + h * NN;
    const int intervals = (T + every - 1) / every;
    for (int p = intervals - 1; p >= 0; --p) {
      const int t0 = p * every, t1 = std::min(T, t0 + every);
      std::memcpy(states.data(), ckpt + (static_cast<size_t>(p) * H + h) * NN, NN * sizeof(float));
      for (int t = t0; t < t1; ++t) {  // forward: states[t - t0] -> states[t - t0 + 1]
        const size_t o = static_cast<size_t>(t) * C + h * N;
        const float* S = states.data() + (t - t0) * NN;
        float* S1 = states.data() + (t - t0 + 1) * NN;
        for (int j = 0; j < N; ++j) {
          a_vec[j] = -kk[o + j];
          b_vec[j] = kk[o + j] * a[o + j];
        }
        for (int i = 0; i < N; ++i) {
          const float* Si = S + i * N;
          float s = 0.0f;
          for (int j = 0; j < N; ++j) s += Si[j] * a_vec[j];
          float* S1i = S1 + i * N;
          const float vi = v[o + i];
          for (int j = 0; j < N; ++j) S1i[j] = Si[j] * w[o + j] + s * b_vec[j] + vi * k[o + j];
        }
      }
      for (int t = t1 - 1; t >= t0; --t) {  // backward
        const size_t o = static_cast<size_t>(t) * C + h * N;
        const float* S = states.data() + (t - t0) * NN;
        const float* S1 = states.data() + (t - t0 + 1) * NN;
        for (int j = 0; j < N; ++j) {
          a_vec[j] = -kk[o + j];
          b_vec[j] = kk[o + j] * a[o + j];
        }
        // y = S1 r: dr = S1^T dy, dS1 += dy r^T.
        float* dr_t = dr + o;
        for (int j = 0; j < N; ++j) dr_t[j] = 0.0f;
        for (int i = 0; i < N; ++i) {
          const float dyi = dy[o + i];
          const float* S1i = S1 + i * N;
          float* dSi = dS + i * N;
          for (int j = 0; j < N; ++j) {
            dr_t[j] += dyi * S1i[j];
            dSi[j] += dyi * r[o + j];
          }
        }
        // S1 = S diag(w) + sa b^T + v k^T, sa = S a.
        for (int i = 0; i < N; ++i) {
          const float* Si = S + i * N;
          float s = 0.0f;
          for (int j = 0; j < N; ++j) s += Si[j] * a_vec[j];
          sa[i] = s;
        }
        float *dw_t = dw + o, *dk_t = dk + o, *dkk_t = dkk + o, *da_t = da + o;
        for (int j = 0; j < N; ++j) {
          dw_t[j] = 0.0f;
          dk_t[j] = 0.0f;
          db[j] = 0.0f;
          da_vec[j] = 0.0f;
        }
        for (int i = 0; i < N; ++i) {
          const float* Si = S + i * N;
          const float* dSi = dS + i * N;
          const float vi = v[o + i], sai = sa[i];
          float dv_i = 0.0f, dsa_i = 0.0f;
          for (int j = 0; j < N; ++j) {
            dw_t[j] += dSi[j] * Si[j];
            db[j] += dSi[j] * sai;
            dk_t[j] += dSi[j] * vi;
            dv_i += dSi[j] * k[o + j];
            dsa_i += dSi[j] * b_vec[j];
          }
          dv[o + i] = dv_i;
          dsa[i] = dsa_i;
        }
        // da_vec = S^T dsa; dS = dS diag(w) + dsa a^T.
        for (int i = 0; i < N; ++i) {
          const float* Si = S + i * N;
          float* dSi = dS + i * N;
          const float dsai = dsa[i];
          for (int j = 0; j < N; ++j) {
            da_vec[j] += dsai * Si[j];
            dSi[j] = dSi[j] * w[o + j] + dsai * a_vec[j];
          }
        }
        // a = -kk, b = kk a: dkk = -da_vec + db a; da = db kk.
        for (int j = 0; j < N; ++j) {
          dkk_t[j] = -da_vec[j] + db[j] * a[o + j];
          da_t[j] = db[j] * kk[o + j];
        }
      }
    }
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
