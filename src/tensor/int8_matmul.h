// Integer dot products for the quantized weight types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and the
// K-quants Q4_K, Q5_K per 32-weight sub-block): the activations are rounded to 8 bits per block
// of 32 (scale = max|x| / 127, as ggml's Q8_0) and each block's products are summed exactly
// in int32 with AVX-512 VNNI (vpdpbusd: 64 multiply-adds per instruction) before one float
// scale per block. This is what rwkv.cpp and llama.cpp do for these types; it trades a bounded
// activation rounding error for 2-4x less arithmetic per weight than widening to float.
//
// Used by the fast MatMul (kernels.cpp) for quantized weights when the CPU has AVX-512 VNNI
// and the runtime's activations are not Activations::kF32 (aviary/runtime.h). Results still
// do not depend on T (tokens at once) or on the thread count: every output is the same
// sequence of exact integer sums and float operations, whatever path or thread computes it.
//
// Error bound (tested): the activation rounding moves each element by at most half its
// block's step d_x, so |y_int8 - y_exact| <= sum_c |w_c| * d_x(c) / 2, plus float rounding.
#pragma once

#include <cstdint>
#include <vector>

#include "tensor/aligned.h"
#include "tensor/dtype.h"
#include "tensor/tensor.h"

namespace aviary::int8 {

// Whether quantized MatMuls use 8-bit activations: the CPU can (AVX-512 with VNNI) and the
// current runtime's activations are not Activations::kF32 (thread_pool.h).
bool Enabled();
// The CPU has what the kernels need (x86-64 with AVX-512 F/BW/VL/VNNI).
bool CpuSupported();
// Every block type whose weights are w = d_w * (u - k) + m per block of 32: all but Q6_K
// (16-weight sub-blocks), which takes the float path.
inline bool SupportsType(DType type) { return IsQuantized(type) && type != DType::kQ6_K; }

// T tokens of activations, rounded to int8 per block of 32. Blocks are padded with zeros to a
// multiple of 16 (the kernels scale 16 blocks' integer sums per 512-bit vector).
struct Activations {
  int64_t cols = 0, blocks = 0, padded_blocks = 0;  // per token
  int T = 0;
  AlignedVector<int8_t> q;  // [T][padded_blocks * 32], element order
  // T > 1 only: the same bytes regrouped for 16 blocks per vector: within each group of 16
  // blocks, 8 steps of 64 bytes, step k holding bytes 4k..4k+3 of blocks 0..15 in turn.
  AlignedVector<int8_t> qt;
  AlignedVector<float> d;       // [T][padded_blocks]: the block's step d_x
  AlignedVector<int32_t> sums;  // [T][padded_blocks]: sum of the block's q
  AlignedVector<float> ds;      // [T][padded_blocks]: d_x * sum q (for types with a minimum)

  const int8_t* q_at(int t) const { return q.data() + t * padded_blocks * 32; }
  const int8_t* qt_at(int t) const { return qt.data() + t * padded_blocks * 32; }
  const float* d_at(int t) const { return d.data() + t * padded_blocks; }
  const int32_t* sums_at(int t) const { return sums.data() + t * padded_blocks; }
  const float* ds_at(int t) const { return ds.data() + t * padded_blocks; }
};

// Rounds x [T, cols] (cols a multiple of 32) into `out` (reusing its memory). Each block:
// d = max|x| / 127, q = nearest-even(x / d) clamped to [-127, 127]; d = 0 gives q = 0.
void Quantize(const float* x, int T, int64_t cols, Activations* out);

// Rows [r0, r1) of y = W x for all T tokens of `a` (W quantized, [rows, cols]); y is [T, rows].
// Needs CpuSupported().
void MatMulRows(DType type, const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols,
                int64_t r0, int64_t r1, const Activations& a, float* y);

// The scalar definition of the same arithmetic (same rounding of x; exact integer sums per
// block; float scale per block), for tests.
void ReferenceMatMul(const Tensor& w, const float* x, int T, float* y);

}  // namespace aviary::int8
