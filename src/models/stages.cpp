#include "models/stages.h"

#include <cstring>

#include "tensor/kernels.h"

namespace aviary {

void LayerNormRows(const float* x, const std::vector<float>& w, const std::vector<float>& b, int T,
                   int C, float eps, float* y) {
  ForTokens(T, [&](int t0, int t1) {
    for (int t = t0; t < t1; ++t) LayerNorm(x + t * C, w.data(), b.data(), C, eps, y + t * C);
  });
}

void AddAndNorm(float* x, const float* dx, const std::vector<float>& w, const std::vector<float>& b,
                int T, int C, float eps, float* xx) {
  ForTokens(T, [&](int t0, int t1) {
    for (size_t i = static_cast<size_t>(t0) * C; i < static_cast<size_t>(t1) * C; ++i) {
      x[i] += dx[i];
    }
    for (int t = t0; t < t1; ++t) LayerNorm(x + t * C, w.data(), b.data(), C, eps, xx + t * C);
  });
}

void TokenShift(const float* xx, int T, int C, float* last, float* prev) {
  std::memcpy(prev, last, C * sizeof(float));
  if (T > 1) std::memcpy(prev + C, xx, static_cast<size_t>(T - 1) * C * sizeof(float));
  std::memcpy(last, xx + static_cast<size_t>(T - 1) * C, C * sizeof(float));
}

void MixLerp(const float* xx, const float* prev, const float* m, int C, int t0, int t1,
             float* out) {
  for (int t = t0; t < t1; ++t) {
    for (int c = 0; c < C; ++c) {
      const int i = t * C + c;
      out[i] = xx[i] * m[c] + prev[i] * (1.0f - m[c]);
    }
  }
}

void MixAdd(const float* xx, const float* prev, const float* m, int C, int t0, int t1, float* out) {
  for (int t = t0; t < t1; ++t) {
    for (int c = 0; c < C; ++c) {
      const int i = t * C + c;
      out[i] = xx[i] + (prev[i] - xx[i]) * m[c];
    }
  }
}

void GroupNormHeads(const float* wkv, const std::vector<float>& w, const std::vector<float>& b,
                    int C, int H, float eps, int t0, int t1, float* out) {
  for (int t = t0; t < t1; ++t) {
    const size_t o = static_cast<size_t>(t) * C;
    GroupNorm(wkv + o, w.data(), b.data(), C, H, eps, out + o);
  }
}

void Gate(const float* g, int C, int t0, int t1, float* out) {
  for (size_t i = static_cast<size_t>(t0) * C; i < static_cast<size_t>(t1) * C; ++i) {
    out[i] *= g[i];
  }
}

void ChannelMix(const Tensor& key, const Tensor& value, const Tensor* receptance, const float* xk,
                const float* xr, int T, float* x) {
  const size_t C = value.rows(), F = key.rows();
  Scratch& s = Scratch::ForThisThread();
  Scratch::Scope scope(s);                          // every layer reuses the same k, v, r blocks
  float* k = s.Take(T * F);                         // (T, F)
  float* v = s.Take(T * C);                         // (T, C)
  float* r = receptance ? s.Take(T * C) : nullptr;  // (T, C)
  if (receptance) {                                 // the receptance runs beside the key (v4-v6)
    const MatMulJob kr[] = {{key, xk, k}, {*receptance, xr, r}};
    MatMulBatch(kr, T);
  } else {
    MatMul(key, xk, T, k);
  }
  ForTokens(T, [&](int t0, int t1) { SquaredReluInPlace(k + t0 * F, (t1 - t0) * F); });
  MatMul(value, k, T, v);
  ForTokens(T, [&](int t0, int t1) {
    const size_t b = t0 * C, e = t1 * C;
    if (receptance) {
      SigmoidInPlace(r + b, e - b);
      for (size_t i = b; i < e; ++i) x[i] += r[i] * v[i];
    } else {
      for (size_t i = b; i < e; ++i) x[i] += v[i];
    }
  });
}

}  // namespace aviary
