// The scalar reference kernels: plain C++ loops, the definition the fast (SIMD, threaded)
// kernels in kernels.cpp and wkv.cpp are tested against. Selected at run time for everything
// by a runtime with Kernels::kReference (see kernels.h).
#pragma once

#include <cstddef>
#include <cstdint>

#include "tensor/tensor.h"

namespace aviary::ref {

// y[t, r] = sum_c w[r, c] * x[t, c]: each row widened to float, then a dot product with 8
// fixed partial sums (so the result does not depend on T).
void MatMul(const Tensor& w, const float* x, int T, float* y);

// Double-precision statistics.
void LayerNorm(const float* x, const float* weight, const float* bias, int n, float eps, float* y);
void GroupNorm(const float* x, const float* weight, const float* bias, int n, int groups, float eps,
               float* y);

// Element-wise, in place, with <cmath>: x = tanh(x), 1 / (1 + e^-x), e^x, x * sigmoid(x).
void Tanh(float* x, size_t n);
void Sigmoid(float* x, size_t n);
void Exp(float* x, size_t n);
void Silu(float* x, size_t n);
void SquaredRelu(float* x, size_t n);

// One token of the WKV recurrences (see wkv.h for the math).
void Wkv4(int C, const float* k, const float* v, const float* first, const float* decay, float* aa,
          float* bb, float* pp, float* out);
void Wkv5(int H, int N, const float* r, const float* k, const float* v, const float* decay,
          const float* first, float* S, float* out);
void Wkv7(int H, int N, const float* r, const float* decay, const float* k, const float* v,
          const float* kk, const float* a, float* S, float* out);

}  // namespace aviary::ref
