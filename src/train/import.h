// Finetuning's starting point: any RWKV-7 model file aviary loads (.pth, safetensors, GGUF,
// rwkv.cpp .bin; F32, F16, BF16 or quantized weights, all widened to float) as a config and a
// flat parameter buffer in ParamLayout order (params.h).
#pragma once

#include <string>
#include <vector>

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

}  // namespace aviary::train
