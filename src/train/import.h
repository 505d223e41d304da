// Finetuning's starting point: any RWKV-7 model file aviary loads (.pth, safetensors, GGUF,
// rwkv.cpp .bin; F32, F16, BF16 or quantized weights, all widened to float) as a config and a
// flat parameter buffer in ParamLayout order (params.h).
#pragma once

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "formats/weight_file.h"
#include "tensor/aligned.h"
#include "train/params.h"

namespace aviary::train {

struct ImportedRwkv7 {
  ParamLayout layout;              // ParamLayout::Rwkv7 of the config read from the file
  AlignedVector<float> params;     // layout.total_floats(), the gaps between tensors zero
  std::vector<std::string> notes;  // what was widened or filled in, for the user
};

// Reads `model_path` and sizes the model from its tensors: layers, width, head size, vocabulary,
// channel-mix width and the four low-rank widths (one per kind: a file whose layers differ is
// refused, naming the tensor). Layer 0's att.v0/v1/v2, which inference never reads and most
// files do not carry, are always filled as RWKV-LM's initialisation leaves them harmless:
// v0 = 0.73 - 0.4 (i / (C - 1) - 0.5) (its init), v1 = v2 = 0 (layer 0 has no value residual,
// so their gradients are zero and they stay as filled). Throws aviary::Error naming the file:
// "aviary train works on RWKV-7 models; FILE is RWKV-6" for another version, a size that cannot
// be trained, a tensor of an unexpected shape.
ImportedRwkv7 LoadRwkv7Params(const std::string& model_path);

// A model tuned without changing it (LoRA, state tuning): the small tensors widened to float in
// ParamLayout::Rwkv7Small order (vectors, norms, low-rank matrices: a few percent of the
// model), the large matrices left as the file stores them, in the file's mapping, so that
// memory stays about the file's size whatever the weight type.
struct FrozenRwkv7 {
  std::string path;
  uint64_t fingerprint = 0;  // the inference model's (ModelInfo::fingerprint): names, types,
  uint64_t file_size = 0;    // shapes and the first bytes of every tensor
  WeightFile file;           // owns the mapping the tensors point into
  ParamLayout small_layout;  // Rwkv7Small of the model's config
  AlignedVector<float> small;
  const Tensor* emb = nullptr;   // (V, C)
  const Tensor* head = nullptr;  // (V, C)
  // Per layer, the kRwkv7MatrixNames matrices [out, in].
  std::vector<std::array<const Tensor*, kRwkv7LayerMatrices>> matrices;
  std::vector<std::string> notes;

  const Rwkv7Config& config() const { return small_layout.config(); }
  // Bytes of the large matrices as stored.
  size_t StoredBytes() const;
};

// Reads `model_path` as LoadRwkv7Params does (the same checks and messages) without widening
// its large matrices. Held by pointer: the tensor pointers point into `file`.
std::unique_ptr<const FrozenRwkv7> LoadFrozenRwkv7(const std::string& model_path);

}  // namespace aviary::train
