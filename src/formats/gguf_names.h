// GGUF tensor names <-> aviary's canonical names (formats/weight_file.h), per architecture.
// v6 and v7 use llama.cpp's names, shapes and value conventions (its convert_hf_to_gguf.py and
// llama-model.cpp); v4 and v5 use aviary's own architectures in the same naming style. Shared
// by the reader and the writer so that both directions use one table. See docs/GGUF.md.
#pragma once

#include <span>
#include <string_view>

#include "aviary/model.h"

namespace aviary::gguf {

// How the writer chooses a tensor's type (docs/GGUF.md, "Type policy").
enum class Role {
  kVector,      // 1-D parameters, norms, token-shift mixes, decay/bonus vectors: always F32
  kDecayLora,   // v6 time_maa_w1/w2, time_decay_w1/w2; v7 w1/w2: F32 for float targets,
                // never block-quantized (llama.cpp keeps them F32)
  kLora,        // v7 a1/a2, v1/v2, g1/g2: target float type, never block-quantized
  kEmbedHead,   // emb, head: target float type, kept unquantized for block types
  kMatrix,      // the large projections: the target type
};

enum NameFlags : unsigned {
  kRequired = 0,
  kOptional = 1,      // v5 gate (and its mix) may be absent
  kNotLayer0 = 2,     // v7 v0/v1/v2: layer 0 has none (llama.cpp stores unused copies of a0..a2)
};

struct NameMap {
  std::string_view gguf;       // without "blk.N." for layer tensors
  std::string_view canonical;  // without "blocks.N." for layer tensors
  Role role;
  unsigned flags = kRequired;
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

#define AVIARY_GGUF_COMMON_LAYER_NAMES                                       \
  {"attn_norm.weight", "ln1.weight", Role::kVector},                         \
      {"attn_norm.bias", "ln1.bias", Role::kVector},                         \
      {"attn_norm_2.weight", "ln2.weight", Role::kVector},                   \
      {"attn_norm_2.bias", "ln2.bias", Role::kVector},                       \
      {"time_mix_key.weight", "att.key.weight", Role::kMatrix},              \
      {"time_mix_value.weight", "att.value.weight", Role::kMatrix},          \
      {"time_mix_receptance.weight", "att.receptance.weight", Role::kMatrix}, \
      {"time_mix_output.weight", "att.output.weight", Role::kMatrix},        \
      {"channel_mix_key.weight", "ffn.key.weight", Role::kMatrix},           \
      {"channel_mix_value.weight", "ffn.value.weight", Role::kMatrix}

inline constexpr NameMap kRwkv4Names[] = {
    AVIARY_GGUF_COMMON_LAYER_NAMES,
    {"time_mix_lerp_k.weight", "att.time_mix_k", Role::kVector},
    {"time_mix_lerp_v.weight", "att.time_mix_v", Role::kVector},
    {"time_mix_lerp_r.weight", "att.time_mix_r", Role::kVector},
    {"time_mix_first.weight", "att.time_first", Role::kVector},
    {"time_mix_decay.weight", "att.time_decay", Role::kVector},
    {"channel_mix_lerp_k.weight", "ffn.time_mix_k", Role::kVector},
    {"channel_mix_lerp_r.weight", "ffn.time_mix_r", Role::kVector},
    {"channel_mix_receptance.weight", "ffn.receptance.weight", Role::kMatrix},
};

inline constexpr NameMap kRwkv5_1Names[] = {
    AVIARY_GGUF_COMMON_LAYER_NAMES,
    {"time_mix_lerp_k.weight", "att.time_mix_k", Role::kVector},
    {"time_mix_lerp_v.weight", "att.time_mix_v", Role::kVector},
    {"time_mix_lerp_r.weight", "att.time_mix_r", Role::kVector},
    {"time_mix_lerp_g.weight", "att.time_mix_g", Role::kVector, kOptional},
    {"time_mix_gate.weight", "att.gate.weight", Role::kMatrix, kOptional},
    {"time_mix_first.weight", "att.time_first", Role::kVector},
    {"time_mix_decay.weight", "att.time_decay", Role::kVector},
    {"time_mix_ln.weight", "att.ln_x.weight", Role::kVector},
    {"time_mix_ln.bias", "att.ln_x.bias", Role::kVector},
    {"channel_mix_lerp_k.weight", "ffn.time_mix_k", Role::kVector},
    {"channel_mix_lerp_r.weight", "ffn.time_mix_r", Role::kVector},
    {"channel_mix_receptance.weight", "ffn.receptance.weight", Role::kMatrix},
};

inline constexpr NameMap kRwkv5_2Names[] = {
    AVIARY_GGUF_COMMON_LAYER_NAMES,
    {"time_mix_lerp_k.weight", "att.time_mix_k", Role::kVector},
    {"time_mix_lerp_v.weight", "att.time_mix_v", Role::kVector},
    {"time_mix_lerp_r.weight", "att.time_mix_r", Role::kVector},
    {"time_mix_lerp_g.weight", "att.time_mix_g", Role::kVector, kOptional},
    {"time_mix_gate.weight", "att.gate.weight", Role::kMatrix, kOptional},
    {"time_mix_first.weight", "att.time_faaaa", Role::kVector},
    {"time_mix_decay.weight", "att.time_decay", Role::kVector},
    {"time_mix_ln.weight", "att.ln_x.weight", Role::kVector},
    {"time_mix_ln.bias", "att.ln_x.bias", Role::kVector},
    {"channel_mix_lerp_k.weight", "ffn.time_mix_k", Role::kVector},
    {"channel_mix_lerp_r.weight", "ffn.time_mix_r", Role::kVector},
    {"channel_mix_receptance.weight", "ffn.receptance.weight", Role::kMatrix},
};

// llama.cpp's rwkv6. The five token-shift mixes (w, k, v, r, g) are one tensor,
// time_mix_lerp_fused [5, 1, 1, C], handled by the reader and writer beside this table.
inline constexpr NameMap kRwkv6Names[] = {
    AVIARY_GGUF_COMMON_LAYER_NAMES,
    {"time_mix_w1.weight", "att.time_maa_w1", Role::kDecayLora},
    {"time_mix_w2.weight", "att.time_maa_w2", Role::kDecayLora},
    {"time_mix_lerp_x.weight", "att.time_maa_x", Role::kVector},
    {"time_mix_first.weight", "att.time_faaaa", Role::kVector},
    {"time_mix_decay.weight", "att.time_decay", Role::kVector},
    {"time_mix_decay_w1.weight", "att.time_decay_w1", Role::kDecayLora},
    {"time_mix_decay_w2.weight", "att.time_decay_w2", Role::kDecayLora},
    {"time_mix_gate.weight", "att.gate.weight", Role::kMatrix},
    {"time_mix_ln.weight", "att.ln_x.weight", Role::kVector},
    {"time_mix_ln.bias", "att.ln_x.bias", Role::kVector},
    {"channel_mix_lerp_k.weight", "ffn.time_maa_k", Role::kVector},
    {"channel_mix_lerp_r.weight", "ffn.time_maa_r", Role::kVector},
    {"channel_mix_receptance.weight", "ffn.receptance.weight", Role::kMatrix},
};
// The slots of rwkv6's time_mix_lerp_fused, in order.
inline constexpr std::string_view kRwkv6FusedSlots[] = {"att.time_maa_w", "att.time_maa_k",
                                                        "att.time_maa_v", "att.time_maa_r",
                                                        "att.time_maa_g"};
// Older llama.cpp files store them separately under these names.
inline constexpr std::string_view kRwkv6SeparateLerps[] = {
    "time_mix_lerp_w.weight", "time_mix_lerp_k.weight", "time_mix_lerp_v.weight",
    "time_mix_lerp_r.weight", "time_mix_lerp_g.weight"};

// llama.cpp's rwkv7. time_mix_lerp_fused [6, 1, 1, C] is aviary's x_rwkvag [6, C] (r, w, k, v,
// a, g); time_mix_r_k is flat [C] (aviary: [H, N]); layer 0's time_mix_v0/v1/v2 are unused
// copies of a0/a1/a2 that llama.cpp requires.
inline constexpr NameMap kRwkv7Names[] = {
    AVIARY_GGUF_COMMON_LAYER_NAMES,
    {"time_mix_lerp_fused.weight", "att.x_rwkvag", Role::kVector},
    {"time_mix_w0.weight", "att.w0", Role::kVector},
    {"time_mix_w1.weight", "att.w1", Role::kDecayLora},
    {"time_mix_w2.weight", "att.w2", Role::kDecayLora},
    {"time_mix_a0.weight", "att.a0", Role::kVector},
    {"time_mix_a1.weight", "att.a1", Role::kLora},
    {"time_mix_a2.weight", "att.a2", Role::kLora},
    {"time_mix_v0.weight", "att.v0", Role::kVector, kNotLayer0},
    {"time_mix_v1.weight", "att.v1", Role::kLora, kNotLayer0},
    {"time_mix_v2.weight", "att.v2", Role::kLora, kNotLayer0},
    {"time_mix_g1.weight", "att.g1", Role::kLora},
    {"time_mix_g2.weight", "att.g2", Role::kLora},
    {"time_mix_k_k.weight", "att.k_k", Role::kVector},
    {"time_mix_k_a.weight", "att.k_a", Role::kVector},
    {"time_mix_r_k.weight", "att.r_k", Role::kVector},
    {"time_mix_ln.weight", "att.ln_x.weight", Role::kVector},
    {"time_mix_ln.bias", "att.ln_x.bias", Role::kVector},
    {"channel_mix_lerp_k.weight", "ffn.x_k", Role::kVector},
};

#undef AVIARY_GGUF_COMMON_LAYER_NAMES

inline std::span<const NameMap> LayerNames(Arch arch) {
  switch (arch) {
    case Arch::kV4: return kRwkv4Names;
    case Arch::kV5_1: return kRwkv5_1Names;
    case Arch::kV5_2: return kRwkv5_2Names;
    case Arch::kV6: return kRwkv6Names;
    case Arch::kV7: return kRwkv7Names;
  }
  return {};
}

inline std::string_view ArchitectureName(Arch arch) {
  switch (arch) {
    case Arch::kV4: return "aviary-rwkv4";
    case Arch::kV5_1:
    case Arch::kV5_2: return "aviary-rwkv5";
    case Arch::kV6: return "rwkv6";
    case Arch::kV7: return "rwkv7";
  }
  return "";
}

// "4", "5.1", "5.2", "6.0", "7.0" (the value of aviary.rwkv_version).
inline std::string_view RwkvVersionString(Arch arch) {
  switch (arch) {
    case Arch::kV4: return "4";
    case Arch::kV5_1: return "5.1";
    case Arch::kV5_2: return "5.2";
    case Arch::kV6: return "6.0";
    case Arch::kV7: return "7.0";
  }
  return "";
}

}  // namespace aviary::gguf
