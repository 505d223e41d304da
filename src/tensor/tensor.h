// A view of one stored tensor: type, shape and bytes (inside a memory-mapped file).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tensor/dtype.h"

namespace aviary {

struct Tensor {
  std::string name;
  DType type = DType::kF32;
  // Outermost dimension first (PyTorch order; ggml files store the reverse). The last
  // dimension is contiguous: a matrix [rows, cols] holds `rows` rows of `cols` elements.
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  int64_t cols() const { return shape.empty() ? 1 : shape.back(); }
  int64_t rows() const { return shape.empty() ? 1 : numel() / cols(); }
  size_t row_bytes() const { return StorageBytes(type, cols()); }
  const uint8_t* row(int64_t r) const { return data + r * row_bytes(); }

  // The i-th sub-tensor along the outermost dimension.
  Tensor Slice(int64_t i) const {
    Tensor t{name + "[" + std::to_string(i) + "]", type,
             std::vector<int64_t>(shape.begin() + 1, shape.end()), nullptr, 0};
    t.nbytes = StorageBytes(type, t.numel());
    t.data = data + i * t.nbytes;
    return t;
  }
};

}  // namespace aviary
