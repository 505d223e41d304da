#include "tensor/wkv.h"

#include <algorithm>
#include <cmath>

namespace aviary {

void Wkv4(int C, const float* k, const float* v, const float* first, const float* decay,
          float* aa, float* bb, float* pp, float* out) {
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

}  // namespace aviary
