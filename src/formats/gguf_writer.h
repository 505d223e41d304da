// Writes a canonical WeightFile as GGUF (docs/GGUF.md): llama.cpp's rwkv6/rwkv7 layout for v6
// and v7 (names, shapes and value conventions exactly as its converter writes them, so
// llama.cpp loads the file), aviary's aviary-rwkv4/aviary-rwkv5 for v4 and v5.
//
// Streaming: every offset is computed up front, then each tensor is written row by row from
// the (memory-mapped) input, converted on the way. Peak memory is the metadata plus one row.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "aviary/model.h"
#include "aviary/tokenizer.h"
#include "formats/weight_file.h"

namespace aviary {

struct GgufWriteOptions {
  // nullopt: keep every tensor's type (vectors are widened to F32, losslessly). Otherwise the
  // type policy of docs/GGUF.md: the large matrices get this type, the sensitive tensors stay
  // in higher precision.
  std::optional<DType> type;
  // Embedded as tokenizer.ggml.*; nullptr writes no tokenizer (llama.cpp then cannot load the
  // file, aviary can with --tokenizer).
  std::shared_ptr<const TokenizerData> tokenizer;
};

struct GgufWriteReport {
  std::map<std::string, int> types_in, types_out;  // type name -> tensor count
  uint64_t tensor_bytes_in = 0, tensor_bytes_out = 0;
  uint64_t file_bytes = 0;
  int tensors_out = 0;
  std::string architecture;        // general.architecture written
  std::vector<std::string> notes;  // e.g. "requantized 24 Q5_1 matrices to Q4_0"
};

// The tensor types `WriteGguf` would produce, by GGUF name, without writing anything.
// Throws aviary::Error naming the file when the model cannot be written (e.g. a v7 model whose
// low-rank sizes differ between layers, which llama.cpp's rwkv7 cannot describe).
struct GgufPlanEntry {
  std::string name;
  DType type;
  std::vector<int64_t> ne;  // ggml order
};
std::vector<GgufPlanEntry> PlanGguf(const WeightFile& wf, const ModelInfo& info,
                                    const GgufWriteOptions& options);

// Writes `path` (directly: callers that want atomicity write to a temporary name and rename).
// `info` is the model loaded from the same file (its architecture and sizes).
GgufWriteReport WriteGguf(const WeightFile& wf, const ModelInfo& info,
                          const GgufWriteOptions& options, const std::string& path);

}  // namespace aviary
