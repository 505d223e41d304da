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

#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/weight_file.h"

namespace aviary {

// What a version's conversion (VersionSpec::from_blinkdl in models/versions.cpp) does to a
// checkpoint's tensors. A `suffix` such as "att.time_decay" names that tensor in every layer
// (blocks.N.<suffix>); each step returns how many tensors it changed. Rebuilt tensors are F32
// unless a step says otherwise.
class BlinkDlTensors {
 public:
  // y = f(x) elementwise, flattened to 1-D unless `keep_shape`.
  virtual int Map(std::string_view suffix, float (*f)(float), bool keep_shape) = 0;
  // [a, b] -> [b, a] (x @ W weights to [out, in]; skips those the file already stores so), as
  // F32 or, with `keep_type`, in the stored type: F32, F16 and BF16 elements are moved as they
  // are, so a BF16 checkpoint's matrix stays BF16 and takes the same kernel as in any other
  // container of the same weights (the kernels choose by type).
  virtual int Transpose(std::string_view suffix, bool keep_type = false) = 0;
  // [S, a, b] -> [S, b, a]; `expected` names the shape in the error for any other rank.
  virtual int TransposeInner(std::string_view suffix, std::string_view expected) = 0;
  virtual int Drop(const std::string& name) = 0;
  // Per layer, blocks.N.<parts...> (equal sizes) -> blocks.N.<into> [parts, C].
  virtual int Stack(std::span<const std::string_view> parts, std::string_view into) = 0;
  // Tells the user what was converted (WeightFile::notes).
  virtual void Note(std::string note) = 0;

 protected:
  ~BlinkDlTensors() = default;
};

// `raw` tensors carry their names in Tensor::name. wf.path names errors; wf.format,
// file_size and backing are left as the caller set them. Throws aviary::Error
// ("<path>: <problem>") on a missing, duplicated or mis-shaped tensor.
void ConvertBlinkDl(std::vector<Tensor> raw, WeightFile& wf);

}  // namespace aviary
