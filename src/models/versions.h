// One entry per RWKV version: every fact about a version that code outside its model file
// needs. The loader, the format readers and writers, and synth look a version up here and never
// switch on Arch, so a new version is its model file (src/models/rwkvN.cpp, which holds the
// forward pass and the state layout) plus one entry in versions.cpp (docs/DEVELOPING.md).
#pragma once

#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "aviary/model.h"
#include "formats/blinkdl.h"
#include "formats/gguf_names.h"
#include "formats/weight_file.h"
#include "models/synth.h"

namespace aviary {

// Builds the model from a file whose tensors are in the canonical layout; defined in the
// version's model file.
using ModelFactory = std::unique_ptr<Model> (*)(WeightFile wf, ModelInfo info);
std::unique_ptr<Model> MakeRwkv4(WeightFile wf, ModelInfo info);
std::unique_ptr<Model> MakeRwkv5(WeightFile wf, ModelInfo info);  // v5.1 and v5.2
std::unique_ptr<Model> MakeRwkv6(WeightFile wf, ModelInfo info);
std::unique_ptr<Model> MakeRwkv7(WeightFile wf, ModelInfo info);

// How a version's GGUF files look (docs/GGUF.md).
struct GgufVersion {
  std::string_view architecture = {};  // general.architecture
  // aviary.rwkv_version: tells versions that share an architecture name apart.
  std::string_view rwkv_version = {};
  std::span<const gguf::NameMap> layer_names = {};  // without "blk.N." / "blocks.N."
  gguf::FusedMixes fused_mixes = {};  // canonical vectors GGUF stores as one tensor; empty if none
  // llama.cpp's rescale_every_n_layers is undone on reading (its rwkv6 converter divides
  // layer l's output matrices by 2^(l / n) for Hugging Face checkpoints).
  bool undo_rescale = false;
  // Sets the version's own "<architecture>.*" keys.
  void (*write_keys)(gguf::KeyWriter& keys) = nullptr;
};

struct VersionSpec {
  Arch arch = Arch::kV4;
  std::string_view name = {};  // ArchName: "v7.0"
  // What `aviary synth --version` accepts besides the name (with or without a leading 'v').
  std::span<const std::string_view> aliases = {};

  // Detection from canonical or BlinkDL tensor names under "blocks.0.att.": the version is the
  // first in table order (newest first) for which one of `markers` is present, or all of them
  // when `all_markers` is set.
  std::span<const std::string_view> markers = {};
  bool all_markers = false;

  // Heads: the first dimension of this layer-0 tensor (its element count when `head_numel`),
  // or one head as wide as the model when empty.
  std::string_view heads_from = {};
  bool head_numel = false;

  // The channel mix gates its output with sigmoid(Wr xr) (ffn.receptance.weight).
  bool gated_channel_mix = true;

  ModelFactory make = nullptr;

  // BlinkDL's raw trained values -> the canonical form (formats/blinkdl.h).
  void (*from_blinkdl)(BlinkDlTensors& tensors) = nullptr;

  GgufVersion gguf = {};

  // synth: the release FFN width as a multiple of n_embd (rounded down to a multiple of 32),
  // and the version's layer tensors (everything but the norms and the FFN's key and value).
  double ffn_ratio = 4.0;
  void (*synth_layer)(SynthLayer& layer) = nullptr;
};

// Every version, newest first (the order detection tries them in).
std::span<const VersionSpec> Versions();
// The entry for `arch`; every Arch value has one (throws Error for a value outside the enum).
const VersionSpec& Version(Arch arch);
const VersionSpec* FindVersion(Arch arch);  // nullptr for a value outside the enum
// The version whose alias is `name` (a leading 'v' or 'V' ignored), or nullptr.
const VersionSpec* FindVersionByName(std::string_view name);
// The version of a file's tensors (canonical or BlinkDL names), or nullptr.
const VersionSpec* DetectVersion(const std::function<bool(const std::string&)>& has_tensor);

}  // namespace aviary
