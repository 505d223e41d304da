// The linear layers of training: y = x W^T over rows of tokens and its two backward products.
// Every matrix in RWKV-7 is used this way (W stored [out, in], as params.h explains), so these
// three products are the whole of the model's matrix work.
#pragma once

#include <cstdint>

namespace aviary::train {

// y (M, rows) = x (M, cols) W^T, W (rows, cols). Each output equals the inference MatMul's for
// the same F32 weights, bit for bit.
void LinearForward(const float* w, int64_t rows, int64_t cols, const float* x, int M, float* y);

// Backward of LinearForward: dx (M, cols) = dy (M, rows) W (+= when accumulate_dx; dx may be
// null when the input needs no gradient) and dw (rows, cols) += dy^T x (dw may be null for a
// frozen matrix).
void LinearBackward(const float* w, int64_t rows, int64_t cols, const float* x, const float* dy,
                    int M, float* dx, bool accumulate_dx, float* dw);

}  // namespace aviary::train
