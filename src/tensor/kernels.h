// Numeric kernels shared by every model version. Model code calls only these (and wkv.h), so
// speed work changes this folder and not the models.
#pragma once

#include <cstdint>

#include "tensor/tensor.h"

namespace aviary {

// y[t, r] = sum_c w[r, c] * x[t, c] for t < T. `w` is [rows, cols] in its stored type and is
// read once for all T tokens; x is [T, cols], y is [T, rows]. Each output is computed by the
// same code whatever T is, so sequence mode and one-token mode agree bit for bit.
void MatMul(const Tensor& w, const float* x, int T, float* y);

// Row `row` of `table` (e.g. the embedding) widened to float.
void GatherRow(const Tensor& table, int64_t row, float* y);

void LayerNorm(const float* x, const float* weight, const float* bias, int n, float eps,
               float* y);
// GroupNorm over `groups` equal slices of x[0..n), each normalised on its own.
void GroupNorm(const float* x, const float* weight, const float* bias, int n, int groups,
               float eps, float* y);

inline float Sigmoid(float x) { return 1.0f / (1.0f + __builtin_expf(-x)); }

}  // namespace aviary
