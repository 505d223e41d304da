#include "train/linear.h"

#include <algorithm>
#include <cstring>

#include "tensor/dtype.h"
#include "tensor/gemm.h"
#include "tensor/thread_pool.h"

namespace aviary::train {
namespace {

// The most floats of a frozen matrix widened at once: a whole layer matrix of a 0.1B-1.5B model
// in one piece, a World-vocabulary head in a handful of tiles (never the whole V x C).
constexpr size_t kTileFloats = size_t{1} << 22;

enum Slot { kTile, kLow, kDLow, kOut };

int64_t TileRows(const TrainLinear& L) {
  return std::max<int64_t>(1, static_cast<int64_t>(kTileFloats) / L.cols);
}

// Rows [r0, r1) of the stored matrix as float (rows r1 - r0, cols).
void Widen(const Tensor& t, int64_t r0, int64_t r1, float* out) {
  const int64_t cols = t.cols();
  ParallelForRanges(r1 - r0, 16, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) DequantizeRow(t.type, t.row(r0 + r), out + r * cols, cols);
  });
}

}  // namespace

void LinearForward(const float* w, int64_t rows, int64_t cols, const float* x, int M, float* y) {
  MatMulForwardF32(w, rows, cols, x, M, y);
}

void LinearBackward(const float* w, int64_t rows, int64_t cols, const float* x, const float* dy,
                    int M, float* dx, bool accumulate_dx, float* dw) {
  if (dx) MatMulBackwardInput(w, rows, cols, dy, M, dx, accumulate_dx);
  if (dw) MatMulBackwardWeight(dy, x, M, rows, cols, dw, true);
}

float* LinearScratch::Get(int slot, size_t floats) {
  AlignedVector<float>& b = buffers_[slot];
  if (b.size() < floats) b.resize(floats);
  return b.data();
}

void LinearForward(const TrainLinear& L, const float* x, int M, float* y, LinearScratch& scratch) {
  const int64_t rows = L.rows, cols = L.cols;
  if (L.w) {
    MatMulForwardF32(L.w, rows, cols, x, M, y);
  } else {
    // y[:, r0:r1] = x W[r0:r1]^T, one widened tile of rows at a time.
    const int64_t tile = std::min(rows, TileRows(L));
    float* w = scratch.Get(kTile, static_cast<size_t>(tile * cols));
    for (int64_t r0 = 0; r0 < rows; r0 += tile) {
      const int64_t r1 = std::min(rows, r0 + tile), n = r1 - r0;
      Widen(*L.stored, r0, r1, w);
      if (n == rows) {
        MatMulForwardF32(w, n, cols, x, M, y);
        break;
      }
      float* part = scratch.Get(kOut, static_cast<size_t>(M) * n);  // (M, n)
      MatMulForwardF32(w, n, cols, x, M, part);
      for (int m = 0; m < M; ++m) std::memcpy(y + m * rows + r0, part + m * n, n * sizeof(float));
    }
  }
  if (L.rank > 0) {
    // low (M, R) = scale x A^T;  y (M, rows) += low B^T.
    const int R = L.rank;
    float* low = scratch.Get(kLow, static_cast<size_t>(M) * R);
    float* out = scratch.Get(kOut, static_cast<size_t>(M) * rows);
    MatMulForwardF32(L.lora_a, R, cols, x, M, low);
    for (size_t i = 0; i < static_cast<size_t>(M) * R; ++i) low[i] *= L.scale;
    MatMulForwardF32(L.lora_b, rows, R, low, M, out);
    ParallelForRanges(M, 16, [&](int64_t a, int64_t b) {
      for (int64_t i = a * rows; i < b * rows; ++i) y[i] += out[i];
    });
  }
}

void LinearBackward(const TrainLinear& L, const float* x, const float* dy, int M, float* dx,
                    bool accumulate_dx, LinearScratch& scratch) {
  const int64_t rows = L.rows, cols = L.cols;
  if (L.w) {
    LinearBackward(L.w, rows, cols, x, dy, M, dx, accumulate_dx, L.dw);
  } else if (dx) {
    // dx (M, cols) = sum over the tiles of dy[:, r0:r1] (M, n) W[r0:r1] (n, cols).
    const int64_t tile = std::min(rows, TileRows(L));
    float* w = scratch.Get(kTile, static_cast<size_t>(tile * cols));
    for (int64_t r0 = 0; r0 < rows; r0 += tile) {
      const int64_t r1 = std::min(rows, r0 + tile), n = r1 - r0;
      Widen(*L.stored, r0, r1, w);
      const bool acc = accumulate_dx || r0 > 0;
      if (n == rows) {
        MatMulBackwardInput(w, n, cols, dy, M, dx, acc);
        break;
      }
      float* part = scratch.Get(kOut, static_cast<size_t>(M) * n);
      for (int m = 0; m < M; ++m) std::memcpy(part + m * n, dy + m * rows + r0, n * sizeof(float));
      MatMulBackwardInput(w, n, cols, part, M, dx, acc);
    }
  }
  if (L.rank > 0) {
    // Recomputed: low (M, R) = scale x A^T. Then
    //   dB (rows, R) += dy^T low
    //   dlow (M, R) = scale dy B
    //   dA (R, cols) += dlow^T x
    //   dx (M, cols) += dlow A
    const int R = L.rank;
    float* low = scratch.Get(kLow, static_cast<size_t>(M) * R);
    float* dlow = scratch.Get(kDLow, static_cast<size_t>(M) * R);
    MatMulForwardF32(L.lora_a, R, cols, x, M, low);
    for (size_t i = 0; i < static_cast<size_t>(M) * R; ++i) low[i] *= L.scale;
    if (L.d_lora_b) MatMulBackwardWeight(dy, low, M, rows, R, L.d_lora_b, true);
    MatMulBackwardInput(L.lora_b, rows, R, dy, M, dlow, false);
    for (size_t i = 0; i < static_cast<size_t>(M) * R; ++i) dlow[i] *= L.scale;
    if (L.d_lora_a) MatMulBackwardWeight(dlow, x, M, R, cols, L.d_lora_a, true);
    if (dx) MatMulBackwardInput(L.lora_a, R, cols, dlow, M, dx, accumulate_dx || L.w || L.stored);
  }
}

}  // namespace aviary::train
