// What every format reader produces: named tensor views over the file's bytes, in the
// canonical layout the model code expects, plus the header facts the file states.
//
// Canonical layout (the one rwkv.cpp's converter writes, which is also the cheapest to run):
//  - shapes outermost first; matrices are [out, in] so y = W x reads whole rows;
//  - parameters in their prepared form: v4 time_decay = -exp(x); v5.x time_decay =
//    exp(-exp(x)); v5.1 time_first = exp(x); v7 x_r..x_g stacked as x_rwkvag [6, C];
//    low-rank matrices (v6 time_maa_w1/w2, time_decay_w1/w2; v7 w1..g2) as [out, in].
// Readers of formats that store raw values (.pth, safetensors) transform to this form.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "aviary/tokenizer.h"
#include "tensor/tensor.h"

namespace aviary {

struct WeightFile {
  std::string path;    // for error messages
  std::string format;  // human-readable, e.g. "rwkv.cpp ggmf v101"
  uint64_t file_size = 0;
  // Header facts (0 where the format has none).
  int n_vocab = 0, n_embd = 0, n_layer = 0;
  DType main_type = DType::kF32;
  std::map<std::string, Tensor> tensors;
  std::shared_ptr<const void> backing;  // keeps the mapped bytes alive
  std::string load_mode = "memory";     // how the bytes got there: "mmap", "read" or "memory"
  // Buffers of tensors the reader had to build (transposed, stacked, transformed). Their data
  // pointers stay valid when the WeightFile is moved.
  std::vector<std::vector<uint8_t>> owned;
  // A tokenizer stored inside the file (GGUF), if any.
  std::shared_ptr<const TokenizerData> tokenizer;
  // What the reader converted on the fly, in words, for the user ("transposed 24 low-rank
  // matrices", "time_decay: -exp(w)").
  std::vector<std::string> notes;

  const Tensor* Find(const std::string& name) const {
    auto it = tensors.find(name);
    return it == tensors.end() ? nullptr : &it->second;
  }
};

// rwkv.cpp's `.bin` format (magic "ggmf", versions 100 and 101). Validates every count, size
// and offset against the bytes before use; throws aviary::Error("<name>: <problem>").
WeightFile ReadRwkvCppBin(std::span<const uint8_t> bytes, const std::string& name);

// True when the bytes start with rwkv.cpp's magic.
bool LooksLikeRwkvCppBin(std::span<const uint8_t> bytes);

// PyTorch .pth (zip of a pickle + raw storages) as BlinkDL publishes them. src/formats/pth.cpp
WeightFile ReadPth(std::span<const uint8_t> bytes, const std::string& name);
// The same file's tensors as stored, under their own names, with none of the RWKV checks and
// conversions: LoRA adapters and tuned states.
WeightFile ReadPthRaw(std::span<const uint8_t> bytes, const std::string& name);
// safetensors with BlinkDL or Hugging Face names. src/formats/safetensors.cpp
WeightFile ReadSafetensors(std::span<const uint8_t> bytes, const std::string& name);
// GGUF: llama.cpp's rwkv6/rwkv7 and aviary's own files. src/formats/gguf.cpp
WeightFile ReadGguf(std::span<const uint8_t> bytes, const std::string& name);

// Picks the reader from the file's first bytes. src/formats/detect.cpp
WeightFile ReadWeightFile(std::span<const uint8_t> bytes, const std::string& name);

}  // namespace aviary
