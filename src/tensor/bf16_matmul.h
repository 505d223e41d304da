// bfloat16 dot products for the 16-bit float weight types (F16, BF16): the activations are
// rounded to bfloat16 (round to nearest even; 8 significant bits), F16 weights are rounded the
// same way as they are read (BF16 weights already are), and pairs of products are summed into
// float with AVX-512 BF16 (vdpbf16ps: 32 multiply-adds per instruction, twice the float FMA
// rate). llama.cpp does the same for BF16 models (it rounds activations to the weights' 16-bit
// type); it trades a bounded rounding error for half the arithmetic time in sequence mode.
//
// Used by the fast MatMul (kernels.cpp) for F16 and BF16 weights when the CPU has AVX512_BF16
// and the runtime's activations are Activations::kAuto (kInt8 and kF32 keep these matrices in
// float).
// Results still do not depend on T (tokens at once) or on the thread count: one token and a
// whole sequence run the same instructions on the same numbers in the same order.
//
// Error bound (tested): rounding moves each factor by at most 2^-8 of itself, so
// |y_bf16 - y_exact| <= sum_c |w_c x_c| * (2^-7 + 2^-16) for F16 weights (2^-8 + ... for BF16
// weights, which are not rounded), plus float summation error.
#pragma once

#include <cstdint>
#include <cstring>

#include "tensor/aligned.h"
#include "tensor/dtype.h"
#include "tensor/tensor.h"

namespace aviary::bf16 {

// Whether F16/BF16 MatMuls use bfloat16 dot products: the CPU can (AVX512_BF16) and the
// current runtime's activations are Activations::kAuto (thread_pool.h).
bool Enabled();
// The CPU has what the kernels need (x86-64 with AVX-512 F/BW/VL/DQ and BF16).
bool CpuSupported();
inline bool SupportsType(DType type) { return type == DType::kF16 || type == DType::kBF16; }

// A float rounded to bfloat16 as the kernels round it (the bits of the bfloat16): nearest,
// ties to even; values below the smallest normal float become (signed) zero, as the
// instructions treat them; NaN stays NaN.
uint16_t Round(float x);
inline float Widen(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// T tokens of activations rounded to bfloat16, each token padded with zeros to a multiple of
// 32 columns (one vdpbf16ps step).
struct Activations {
  int64_t padded_cols = 0;
  int T = 0;
  AlignedVector<uint16_t> x;  // [T][padded_cols]
  const uint16_t* at(int t) const { return x.data() + t * padded_cols; }
};

// Rounds x [T, cols] into `out` (reusing its memory).
void RoundActivations(const float* x, int T, int64_t cols, Activations* out);

// Rows [r0, r1) of y = W x for all T tokens of `a` (W F16 or BF16, [rows, cols]); y is
// [T, rows]. Needs CpuSupported().
void MatMulRows(DType type, const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols,
                int64_t r0, int64_t r1, const Activations& a, float* y);

// The scalar definition of the same arithmetic (the same rounded factors; their exact
// products summed in double), for tests.
void ReferenceMatMul(const Tensor& w, const float* x, int T, float* y);

}  // namespace aviary::bf16
