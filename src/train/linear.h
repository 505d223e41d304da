// The linear layers of training: y = x W^T over rows of tokens and its two backward products.
// Every matrix in RWKV-7 is used this way (W stored [out, in], as params.h explains), so these
// products are the whole of the model's matrix work.
#pragma once

#include <cstdint>

#include "tensor/aligned.h"
#include "tensor/tensor.h"

namespace aviary::train {

// y (M, rows) = x (M, cols) W^T, W (rows, cols). Each output equals the inference MatMul's for
// the same F32 weights, bit for bit.
void LinearForward(const float* w, int64_t rows, int64_t cols, const float* x, int M, float* y);

// Backward of LinearForward: dx (M, cols) = dy (M, rows) W (+= when accumulate_dx; dx may be
// null when the input needs no gradient) and dw (rows, cols) += dy^T x (dw may be null for a
// frozen matrix).
void LinearBackward(const float* w, int64_t rows, int64_t cols, const float* x, const float* dy,
                    int M, float* dx, bool accumulate_dx, float* dw);

// One of a model's large products (the six per layer and the head), as a run trains it:
//   full training: W a float matrix of the parameter buffer, dW its gradient;
//   LoRA / state tuning: W frozen as the model file stores it (any type, quantized included;
//     never widened whole: products dequantize it a tile of rows at a time), no dW;
//   LoRA: plus an adapter, y = x W^T + scale (x A^T) B^T with A (rank, cols), B (rows, rank)
//     trained (dA, dB), as PEFT and BlinkDL/RWKV-PEFT define it.
struct TrainLinear {
  int64_t rows = 0, cols = 0;      // W [rows, cols] = [out, in]
  const float* w = nullptr;        // a float matrix ...
  float* dw = nullptr;             // ... and its gradient (null: not trained)
  const Tensor* stored = nullptr;  // or the frozen matrix as stored
  int rank = 0;                    // the adapter, when rank > 0
  float scale = 0;                 // alpha / rank
  const float* lora_a = nullptr;   // (rank, cols)
  const float* lora_b = nullptr;   // (rows, rank)
  float* d_lora_a = nullptr;       // their gradients (+=)
  float* d_lora_b = nullptr;
};

// The float scratch of the frozen and adapter products (a dequantized tile of W, the adapter's
// (M, rank) activations), grown on first use and reused.
class LinearScratch {
 public:
  float* Get(int slot, size_t floats);

 private:
  AlignedVector<float> buffers_[4];
};

// y (M, rows) = x (M, cols) W^T (+ the adapter's term).
void LinearForward(const TrainLinear& L, const float* x, int M, float* y, LinearScratch& scratch);

// dx (M, cols) = dy (M, rows) (W + scale B A) (+= when accumulate_dx; dx may be null), dW += dy^T
// x when W is trained, and for an adapter: dB += scale dy^T (x A^T), dA += scale (dy B)^T x.
void LinearBackward(const TrainLinear& L, const float* x, const float* dy, int M, float* dx,
                    bool accumulate_dx, LinearScratch& scratch);

}  // namespace aviary::train
