// How GGUF tensor names map to aviary's canonical names (formats/weight_file.h): the types of
// the per-version tables, which live in the version table (models/versions.cpp), and the names
// every version shares. v6 and v7 use llama.cpp's names, shapes and value conventions (its
// convert_hf_to_gguf.py and llama-model.cpp); v4 and v5 use aviary's own architectures in the
// same naming style. The reader and the writer share these tables so that both directions
// agree. See docs/GGUF.md.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "aviary/model.h"

namespace aviary::gguf {

// How the writer chooses a tensor's type (docs/GGUF.md, "Type policy").
enum class Role {
  kVector,     // 1-D parameters, norms, token-shift mixes, decay/bonus vectors: always F32
  kDecayLora,  // v6 time_maa_w1/w2, time_decay_w1/w2; v7 w1/w2: F32 for float targets,
               // never block-quantized (llama.cpp keeps them F32)
  kLora,       // v7 a1/a2, v1/v2, g1/g2: target float type, never block-quantized
  kEmbedHead,  // emb, head: target float type, kept unquantized for block types
  kMatrix,     // the large projections: the target type
};

enum NameFlags : unsigned {
  kRequired = 0,
  // May be absent (v5's gate and its mix); a layer has all of its optional tensors or none.
  kOptional = 1,
  // Layer 0 has none (v7 v0/v1/v2); llama.cpp still wants the tensor there, so the writer
  // stores a copy of `layer0_stand_in` and the reader drops it.
  kNotLayer0 = 2,
  // A per-head vector the model reads as [heads, head_size]: the reader reshapes it so.
  kHeadRows = 4,
  // Stored as [head_size, heads] (ggml order) rather than flat [C] in GGUF.
  kHeadRowsInGguf = 8,
};

struct NameMap {
  std::string_view gguf;       // without "blk.N." for layer tensors
  std::string_view canonical;  // without "blocks.N." for layer tensors
  Role role;
  unsigned flags = kRequired;
  // > 0: `stacked_rows` vectors of C stacked as one tensor, [rows, C] in aviary and
  // [rows, 1, 1, C] in GGUF (v7's x_rwkvag).
  int stacked_rows = 0;
  std::string_view layer0_stand_in = {};  // with kNotLayer0
};

// Tensors outside the layers (all architectures).
inline constexpr NameMap kGlobalNames[] = {
    {"token_embd.weight", "emb.weight", Role::kEmbedHead},
    {"token_embd_norm.weight", "blocks.0.ln0.weight", Role::kVector},
    {"token_embd_norm.bias", "blocks.0.ln0.bias", Role::kVector},
    {"output_norm.weight", "ln_out.weight", Role::kVector},
    {"output_norm.bias", "ln_out.bias", Role::kVector},
    {"output.weight", "head.weight", Role::kEmbedHead},
};

// The GGUF name of several canonical vectors stored as the rows of one tensor
// ([rows, 1, 1, C]; llama.cpp's rwkv6 time_mix_lerp_fused). `separate` are the names older
// files store them under, one tensor each.
struct FusedMixes {
  std::string_view gguf = {};
  std::span<const std::string_view> slots = {};     // canonical names, in row order
  std::span<const std::string_view> separate = {};  // GGUF names, in the same order
};

// Where a version writes its own metadata keys (VersionSpec::gguf.write_keys). Keys are given
// without the "<architecture>." prefix.
class KeyWriter {
 public:
  virtual const ModelInfo& info() const = 0;
  virtual void U32(std::string_view key, uint32_t value) = 0;
  virtual void F32(std::string_view key, float value) = 0;
  // rows / divisor of blocks.N.<suffix>, which must be the same in every layer from
  // first_layer on: llama.cpp's rwkv6/rwkv7 keep one low-rank size per kind.
  virtual uint32_t UniformRank(const char* suffix, int first_layer, int64_t divisor) const = 0;

 protected:
  ~KeyWriter() = default;
};

}  // namespace aviary::gguf
