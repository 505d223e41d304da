// The matrix products of training, on fp32 weights held in memory (not a stored Tensor): the
// forward y = x W^T of a linear layer and its two backward products.
//
// Deterministic: each output is one fixed chain of multiply-adds (the forward: MatMul's own
// order; the backward: over the reduction index in increasing order), whatever the thread
// count and however the work is cut; threads split the outputs, never a sum. So training
// with the same seed gives bit-identical results on any number of threads.
//
// Shapes as nn.Linear: W is (rows, cols) = [out, in], row-major; x is (T, cols), y (T, rows);
// T is all the positions of a batch. Buffers must not overlap.
#pragma once

#include <cstdint>

namespace aviary {

// Forward of a training step: y (T, rows) = x (T, cols) W^T with W f32 (rows, cols). Each
// output is bit-identical to what MatMul() (kernels.h) gives for an F32 Tensor of the same data,
// with the current runtime's kernels (fast or reference).
void MatMulForwardF32(const float* w, int64_t rows, int64_t cols, const float* x, int T, float* y);

// dx (T, cols) = dy (T, rows) W, or += when accumulate (the chain then starts from dx's values).
void MatMulBackwardInput(const float* w, int64_t rows, int64_t cols, const float* dy, int T,
                         float* dx, bool accumulate);

// dw (rows, cols) = dy^T x (the sum over the T rows of dy and x), or += when accumulate (the
// chain then starts from dw's values).
void MatMulBackwardWeight(const float* dy, const float* x, int T, int64_t rows, int64_t cols,
                          float* dw, bool accumulate);

}  // namespace aviary
