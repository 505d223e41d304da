// BlinkDL's raw checkpoint layout (the official .pth releases, and safetensors made from them)
// -> aviary's canonical layout (formats/weight_file.h), once, at load.
//
// Input: tensor views with BlinkDL names (emb.weight, blocks.N.att.time_decay, ...) or the
// Hugging Face names of the same parameters (transformers' rwkv.blocks.N.attention.* for
// v4/v5/v6 conversions; flash-linear-attention's model.layers.N.attn.* for RWKV-7), holding
// the raw trained values in F32, F16 or BF16.
// Output in `wf`: the canonical tensors. Big matrices (emb, head, the r/k/v/o/gate and FFN
// projections) stay zero-copy views in their stored type; the few small tensors that must be
// transformed (decays, stacked mixes, transposed low-rank matrices) are rebuilt as F32 in
// wf.owned. wf.notes says what was converted.
#pragma once

#include <vector>

#include "formats/weight_file.h"

namespace aviary {

// `raw` tensors carry their names in Tensor::name. wf.path names errors; wf.format,
// file_size and backing are left as the caller set them. Throws aviary::Error
// ("<path>: <problem>") on a missing, duplicated or mis-shaped tensor.
void ConvertBlinkDl(std::vector<Tensor> raw, WeightFile& wf);

}  // namespace aviary
