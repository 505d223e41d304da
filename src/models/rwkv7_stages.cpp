#include "models/rwkv7_stages.h"

#include <algorithm>
#include <cmath>
#include <cstddef>

#include "tensor/kernels.h"

namespace aviary {

void Rwkv7DecayAndGates(const float* w0, const float* a0, const float* v0, int C, int t0, int t1,
                        float* w, float* a, float* v_mix) {
  const size_t b = static_cast<size_t>(t0) * C, e = static_cast<size_t>(t1) * C;
  for (int t = t0; t < t1; ++t) {
    for (int c = 0; c < C; ++c) {
      const size_t i = static_cast<size_t>(t) * C + c;
      w[i] = w0[c] + w[i];
      a[i] = a0[c] + a[i];
      if (v0) v_mix[i] = v0[c] + v_mix[i];
    }
  }
  const float decay_scale = std::exp(-0.5f);
  SigmoidInPlace(w + b, e - b);
  for (size_t i = b; i < e; ++i) w[i] = -decay_scale * w[i];
  ExpInPlace(w + b, e - b);
  SigmoidInPlace(a + b, e - b);
  if (v0) SigmoidInPlace(v_mix + b, e - b);
}

void Rwkv7KeysAndValues(const float* k_k, const float* k_a, bool first_layer, int H, int N, int t0,
                        int t1, const float* a, const float* v_mix, float* k, float* v, float* kk,
                        float* v_first) {
  const int C = H * N;
  for (int t = t0; t < t1; ++t) {
    for (int c = 0; c < C; ++c) {
      const size_t i = static_cast<size_t>(t) * C + c;
      kk[i] = k[i] * k_k[c];
      k[i] = k[i] * (1.0f + (a[i] - 1.0f) * k_a[c]);
      if (first_layer) {
        v_first[i] = v[i];
      } else {
        v[i] += (v_first[i] - v[i]) * v_mix[i];
      }
    }
    for (int h = 0; h < H; ++h) {  // kk /= max(|kk|, 1e-12) per head
      float* kh = kk + static_cast<size_t>(t) * C + h * N;
      float norm = 0.0f;
      for (int j = 0; j < N; ++j) norm += kh[j] * kh[j];
      const float inv = 1.0f / std::max(std::sqrt(norm), 1e-12f);
      for (int j = 0; j < N; ++j) kh[j] *= inv;
    }
  }
}

void Rwkv7Bonus(const float* r_k, int H, int N, int t0, int t1, const float* r, const float* k,
                const float* v, float* out) {
  for (int t = t0; t < t1; ++t) {
    const size_t o = static_cast<size_t>(t) * H * N;
    for (int h = 0; h < H; ++h) {
      float bonus = 0.0f;
      for (int j = 0; j < N; ++j) {
        const size_t i = o + h * N + j;
        bonus += r[i] * k[i] * r_k[h * N + j];
      }
      for (int j = 0; j < N; ++j) out[o + h * N + j] += bonus * v[o + h * N + j];
    }
  }
}

}  // namespace aviary
