#include "formats/rwkvcpp_writer.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "aviary/error.h"
#include "tensor/quantize.h"
#include "tensor/thread_pool.h"

namespace aviary {
namespace {

constexpr int32_t kMagic = 0x67676d66;    // "ggmf"
constexpr int32_t kVersion = 101;         // ggml's block layouts of May 2023 onwards
constexpr size_t kChunkBytes = 16 << 20;  // floats generated and converted per write

}  // namespace

int32_t RwkvCppTypeCode(DType type) {
  if (Traits(type).rwkvcpp_type >= 0) return Traits(type).rwkvcpp_type;
  std::string storable;
  for (int i = 0; i < kNumDTypes; ++i) {
    const DTypeTraits& t = Traits(static_cast<DType>(i));
    if (t.rwkvcpp_type >= 0) storable += (storable.empty() ? "" : ", ") + std::string(t.name);
  }
  throw Error("rwkv.cpp's .bin format cannot store " + std::string(DTypeName(type)) +
              " tensors (it has " + storable + "; write GGUF for the others)");
}

RwkvCppWriter::RwkvCppWriter(const std::string& path, int n_vocab, int n_embd, int n_layer,
                             DType main_type)
    : path_(path) {
  const int32_t code = RwkvCppTypeCode(main_type);
  file_ = std::fopen(path.c_str(), "wb");
  if (!file_) throw Error(path + ": cannot create: " + std::strerror(errno));
  const int32_t header[6] = {kMagic, kVersion, n_vocab, n_embd, n_layer, code};
  Write(header, sizeof header);
}

RwkvCppWriter::~RwkvCppWriter() {
  if (file_) std::fclose(file_);
}

void RwkvCppWriter::Write(const void* data, size_t n) {
  if (std::fwrite(data, 1, n, file_) != n) {
    throw Error(path_ + ": write failed: " + std::strerror(errno));
  }
  bytes_ += n;
}

void RwkvCppWriter::AddTensor(const std::string& name, const std::vector<int64_t>& shape,
                              DType type, const RowFill& fill) {
  if (!file_) throw Error(path_ + ": already finished");
  if (shape.empty() || shape.size() > 4) {
    throw Error(path_ + ": tensor '" + name + "' must have 1 to 4 dimensions");
  }
  const int32_t code = RwkvCppTypeCode(type);
  const int64_t cols = shape.back();
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
  const int block = Traits(type).block_elems;
  if (cols % block != 0) {
    throw Error(path_ + ": tensor '" + name + "': row length " + std::to_string(cols) +
                " is not a multiple of the " + std::string(DTypeName(type)) + " block size");
  }
  const int32_t head[3] = {static_cast<int32_t>(shape.size()), static_cast<int32_t>(name.size()),
                           code};
  Write(head, sizeof head);
  for (auto it = shape.rbegin(); it != shape.rend(); ++it) {
    const int32_t d = static_cast<int32_t>(*it);
    Write(&d, 4);
  }
  Write(name.data(), name.size());

  const size_t row_bytes = StorageBytes(type, cols);
  const int64_t chunk_rows =
      std::max<int64_t>(1, static_cast<int64_t>(kChunkBytes / (sizeof(float) * cols)));
  std::vector<float> values;
  std::vector<uint8_t> bytes;
  for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
    const int64_t n = std::min(chunk_rows, rows - r0);
    values.resize(static_cast<size_t>(n * cols));
    fill(r0, n, values.data());
    bytes.resize(static_cast<size_t>(n) * row_bytes);
    ParallelFor(n, [&](int64_t r, int) {
      QuantizeRow(type, values.data() + r * cols, bytes.data() + r * row_bytes, cols);
    });
    Write(bytes.data(), bytes.size());
  }
  ++tensors_;
  ++type_counts_[std::string(DTypeName(type))];
}

void RwkvCppWriter::AddTensor(const std::string& name, const std::vector<int64_t>& shape,
                              DType type, const float* data) {
  const int64_t cols = shape.empty() ? 1 : shape.back();
  AddTensor(name, shape, type, [&](int64_t row0, int64_t n, float* out) {
    std::memcpy(out, data + row0 * cols, static_cast<size_t>(n * cols) * sizeof(float));
  });
}

uint64_t RwkvCppWriter::Finish() {
  if (!file_) return bytes_;
  const bool flushed = std::fflush(file_) == 0;
  const bool closed = std::fclose(file_) == 0;
  file_ = nullptr;
  if (!flushed || !closed) throw Error(path_ + ": write failed: " + std::strerror(errno));
  return bytes_;
}

}  // namespace aviary
