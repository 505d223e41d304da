// Random weight matrices as stored bytes, and Tensor views of them, for the kernel tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "tensor/dtype.h"
#include "tensor/tensor.h"

namespace aviary::testing {

// Random stored bytes for rows x cols of `type`: floats ~ N(0, 0.5); quantized blocks with
// random quants, a scale of either sign and (Q4_1/Q5_1) an offset; K-quant super-blocks with
// random sub-block scales (and minima) and super-block scales of either sign.
inline std::vector<uint8_t> RandomMatrix(DType type, int64_t rows, int64_t cols,
                                         std::mt19937& rng) {
  const size_t bytes = StorageBytes(type, static_cast<uint64_t>(rows * cols));
  std::vector<uint8_t> data(bytes);
  std::normal_distribution<float> normal(0.0f, 0.5f);
  if (!IsQuantized(type)) {
    for (int64_t i = 0; i < rows * cols; ++i) {
      const float f = normal(rng);
      if (type == DType::kF32) {
        std::memcpy(&data[4 * i], &f, 4);
      } else {
        uint16_t h;
        if (type == DType::kF16) {
          h = F32ToF16(f);
        } else {
          uint32_t bits;
          std::memcpy(&bits, &f, 4);
          h = static_cast<uint16_t>(bits >> 16);
        }
        std::memcpy(&data[2 * i], &h, 2);
      }
    }
    return data;
  }
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  const int block = Traits(type).block_bytes;
  if (Traits(type).block_elems == kQKBlock) {  // K-quants: super-block scales of either sign
    const size_t d_at = type == DType::kQ6_K ? offsetof(BlockQ6_K, d) : 0;
    for (size_t off = 0; off < bytes; off += block) {
      const uint16_t d = F32ToF16(normal(rng) * (type == DType::kQ6_K ? 0.002f : 0.01f));
      std::memcpy(&data[off + d_at], &d, 2);
      if (type != DType::kQ6_K) {
        const uint16_t dmin = F32ToF16(normal(rng) * 0.01f);
        std::memcpy(&data[off + 2], &dmin, 2);
      }
    }
    return data;
  }
  const bool has_m = type == DType::kQ4_1 || type == DType::kQ5_1;
  for (size_t off = 0; off < bytes; off += block) {
    const uint16_t d = F32ToF16(normal(rng) * 0.1f);
    std::memcpy(&data[off], &d, 2);
    if (has_m) {
      const uint16_t m = F32ToF16(normal(rng) * 0.5f);
      std::memcpy(&data[off + 2], &m, 2);
    }
  }
  return data;
}

// A [rows, cols] tensor of `type` over `data`.
inline Tensor MakeTensor(DType type, int64_t rows, int64_t cols, const uint8_t* data) {
  Tensor t;
  t.name = "w";
  t.type = type;
  t.shape = {rows, cols};
  t.data = data;
  t.nbytes = StorageBytes(type, static_cast<uint64_t>(rows * cols));
  return t;
}

}  // namespace aviary::testing
