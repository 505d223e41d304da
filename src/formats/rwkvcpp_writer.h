// Writes rwkv.cpp's `.bin` model format (the inverse of rwkvcpp_bin.cpp):
//   header: int32 magic 0x67676d66 ("ggmf"), version 101, n_vocab, n_embed, n_layer, data_type
//   then per tensor: int32 dim_count, key_length, data_type; int32 dims[dim_count] (ggml order:
//   innermost first); key bytes; data (F32, F16, or ggml's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks as
//   ggml's reference quantizers write them).
// rwkv.cpp has no BF16 type; asking for it is an error. Tensors are streamed in chunks of rows
// (converted on the pool threads), so writing a multi-GB model needs little memory.
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "tensor/dtype.h"

namespace aviary {

// rwkv.cpp's code for a type (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 7 Q5_0, 8 Q5_1, 9 Q8_0); throws
// aviary::Error for a type rwkv.cpp cannot store.
int32_t RwkvCppTypeCode(DType type);

class RwkvCppWriter {
 public:
  // Creates `path` and writes the header. `main_type` is the header's data type (what rwkv.cpp
  // reports as the file's type). Throws aviary::Error naming the file on failure.
  RwkvCppWriter(const std::string& path, int n_vocab, int n_embd, int n_layer, DType main_type);
  ~RwkvCppWriter();
  RwkvCppWriter(const RwkvCppWriter&) = delete;
  RwkvCppWriter& operator=(const RwkvCppWriter&) = delete;

  // Fills rows [row0, row0 + n) of a tensor as floats, row-major (n * row_length values).
  using RowFill = std::function<void(int64_t row0, int64_t n, float* out)>;

  // Appends a tensor of `shape` (outermost first, as Tensor::shape) stored as `type`; the
  // values come from `fill`, a chunk of rows at a time, and are converted (rounded to half, or
  // quantized) on the way. The innermost dimension must be a multiple of the type's block.
  void AddTensor(const std::string& name, const std::vector<int64_t>& shape, DType type,
                 const RowFill& fill);
  // Appends a tensor from floats in memory.
  void AddTensor(const std::string& name, const std::vector<int64_t>& shape, DType type,
                 const float* data);

  // Flushes and closes; returns the file size. Throws on a write error. Called by the
  // destructor if not called (errors then are swallowed: call it).
  uint64_t Finish();

  int tensors() const { return tensors_; }
  const std::map<std::string, int>& type_counts() const { return type_counts_; }

 private:
  void Write(const void* data, size_t n);

  std::string path_;
  std::FILE* file_ = nullptr;
  uint64_t bytes_ = 0;
  int tensors_ = 0;
  std::map<std::string, int> type_counts_;
};

}  // namespace aviary
