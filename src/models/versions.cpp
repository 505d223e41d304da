// The version table: per RWKV version, its names, how its files show it, its tensors in each
// format (BlinkDL's raw values, GGUF), its synthetic shapes and its factory. One section per
// version, then the table itself at the bottom.
#include "models/versions.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <iterator>
#include <string>

#include "aviary/error.h"

namespace aviary {
namespace {

using gguf::KeyWriter;
using gguf::kHeadRows;
using gguf::kHeadRowsInGguf;
using gguf::kNotLayer0;
using gguf::kOptional;
using gguf::NameMap;
using gguf::Role;

// Every version's layer norms, r/k/v/output projections and FFN key/value, then `own`.
template <size_t N>
constexpr auto WithCommonLayerNames(const NameMap (&own)[N]) {
  constexpr NameMap kCommon[] = {
      {"attn_norm.weight", "ln1.weight", Role::kVector},
      {"attn_norm.bias", "ln1.bias", Role::kVector},
      {"attn_norm_2.weight", "ln2.weight", Role::kVector},
      {"attn_norm_2.bias", "ln2.bias", Role::kVector},
      {"time_mix_key.weight", "att.key.weight", Role::kMatrix},
      {"time_mix_value.weight", "att.value.weight", Role::kMatrix},
      {"time_mix_receptance.weight", "att.receptance.weight", Role::kMatrix},
      {"time_mix_output.weight", "att.output.weight", Role::kMatrix},
      {"channel_mix_key.weight", "ffn.key.weight", Role::kMatrix},
      {"channel_mix_value.weight", "ffn.value.weight", Role::kMatrix},
  };
  std::array<NameMap, std::size(kCommon) + N> all{};
  std::copy(std::begin(kCommon), std::end(kCommon), all.begin());
  std::copy(own, own + N, all.begin() + std::size(kCommon));
  return all;
}

float NegExp(float w) { return -std::exp(w); }
float ExpNegExp(float w) { return std::exp(-std::exp(w)); }
float Exp(float u) { return std::exp(u); }

// BlinkDL's low-rank sizes: max(32, round(scale * C^power / 32) * 32).
int64_t Lora(int64_t C, double scale, double power) {
  const double v = std::round(scale * std::pow(static_cast<double>(C), power) / 32.0) * 32.0;
  return std::max<int64_t>(32, static_cast<int64_t>(v));
}

// ---- v4 ----
// BlinkDL: time_decay -> -exp(w); time_first raw.

constexpr std::string_view kV4Markers[] = {"time_first", "time_decay"};
constexpr std::string_view kV4Aliases[] = {"4", "4.0"};

constexpr auto kV4Names = WithCommonLayerNames({
    {"time_mix_lerp_k.weight", "att.time_mix_k", Role::kVector},
    {"time_mix_lerp_v.weight", "att.time_mix_v", Role::kVector},
    {"time_mix_lerp_r.weight", "att.time_mix_r", Role::kVector},
    {"time_mix_first.weight", "att.time_first", Role::kVector},
    {"time_mix_decay.weight", "att.time_decay", Role::kVector},
    {"channel_mix_lerp_k.weight", "ffn.time_mix_k", Role::kVector},
    {"channel_mix_lerp_r.weight", "ffn.time_mix_r", Role::kVector},
    {"channel_mix_receptance.weight", "ffn.receptance.weight", Role::kMatrix},
});

void V4FromBlinkDl(BlinkDlTensors& t) {
  const int n = t.Map("att.time_decay", NegExp, false);
  t.Note("time_decay = -exp(w) (" + std::to_string(n) + " layers)");
}

void V4Keys(KeyWriter& k) { k.U32("attention.head_count", 1); }

// v4 and v5: the token-shift mixes of k, v, r (and v5.2's g), the decay and bonus, the
// projections, v5's GroupNorm, the FFN mixes.
void V4V5SynthLayer(SynthLayer& s, Arch arch) {
  const int64_t C = s.C, H = s.H, N = s.N;
  const bool v52 = arch == Arch::kV5_2;
  s.add("att.time_mix_k", {C}, s.mix);
  s.add("att.time_mix_v", {C}, s.mix);
  s.add("att.time_mix_r", {C}, s.mix);
  if (v52) s.add("att.time_mix_g", {C}, s.mix);
  if (arch == Arch::kV4) {
    s.add("att.time_decay", {C}, Uniform(-5.0f, 2.0f, SynthInit::kNegExp));  // -exp(w)
    s.add("att.time_first", {C}, Uniform(-1.0f, 1.0f));
  } else if (v52) {
    s.add("att.time_decay", {H, N, 1}, Uniform(-6.0f, -1.0f, SynthInit::kExpNegExp));
    s.add("att.time_faaaa", {H, N, 1}, Normal(0.0f, 0.3f));
  } else {
    s.add("att.time_decay", {H, 1, 1}, Uniform(-6.0f, -1.0f, SynthInit::kExpNegExp));
    s.add("att.time_first", {H, 1, 1}, Uniform(-1.0f, 0.5f, SynthInit::kExp));
  }
  s.add("att.key.weight", {C, C}, s.proj);
  s.add("att.value.weight", {C, C}, s.proj);
  s.add("att.receptance.weight", {C, C}, s.proj);
  if (v52) s.add("att.gate.weight", {C, C}, s.proj);
  s.add("att.output.weight", {C, C}, s.out_proj);
  if (arch != Arch::kV4) {
    s.add("att.ln_x.weight", {C}, s.ln_w);
    s.add("att.ln_x.bias", {C}, s.ln_b);
  }
  s.add("ffn.time_mix_k", {C}, s.mix);
  s.add("ffn.time_mix_r", {C}, s.mix);
}

void V4SynthLayer(SynthLayer& s) { V4V5SynthLayer(s, Arch::kV4); }

// ---- v5.1 ----
// BlinkDL: ln_x, no time_faaaa; one decay per head, shape [H] or [H, 1, 1];
// time_decay -> exp(-exp(w)); time_first -> exp(u).

constexpr std::string_view kV51Markers[] = {"ln_x.weight"};
constexpr std::string_view kV51Aliases[] = {"5.1"};

constexpr auto kV51Names = WithCommonLayerNames({
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
});

void V51FromBlinkDl(BlinkDlTensors& t) {
  const int n = t.Map("att.time_decay", ExpNegExp, false);
  t.Map("att.time_first", Exp, false);
  t.Note("time_decay = exp(-exp(w)), time_first = exp(u) (" + std::to_string(n) + " layers)");
}

void V5Keys(KeyWriter& k) {
  k.U32("attention.head_count", k.info().n_head);
  k.U32("wkv.head_size", k.info().head_size);
  k.F32("attention.group_norm_epsilon", 1e-5f);
}

void V51SynthLayer(SynthLayer& s) { V4V5SynthLayer(s, Arch::kV5_1); }

// ---- v5.2 ----
// BlinkDL: time_decay [H, N] -> exp(-exp(w)); time_faaaa [H, N] raw (the bonus u itself).

constexpr std::string_view kV52Markers[] = {"time_faaaa"};
constexpr std::string_view kV52Aliases[] = {"5.2", "5"};

constexpr auto kV52Names = WithCommonLayerNames({
    {"time_mix_lerp_k.weight", "att.time_mix_k", Role::kVector},
    {"time_mix_lerp_v.weight", "att.time_mix_v", Role::kVector},
    {"time_mix_lerp_r.weight", "att.time_mix_r", Role::kVector},
    {"time_mix_lerp_g.weight", "att.time_mix_g", Role::kVector, kOptional},
    {"time_mix_gate.weight", "att.gate.weight", Role::kMatrix, kOptional},
    {"time_mix_first.weight", "att.time_faaaa", Role::kVector, kHeadRows | kHeadRowsInGguf},
    {"time_mix_decay.weight", "att.time_decay", Role::kVector, kHeadRowsInGguf},
    {"time_mix_ln.weight", "att.ln_x.weight", Role::kVector},
    {"time_mix_ln.bias", "att.ln_x.bias", Role::kVector},
    {"channel_mix_lerp_k.weight", "ffn.time_mix_k", Role::kVector},
    {"channel_mix_lerp_r.weight", "ffn.time_mix_r", Role::kVector},
    {"channel_mix_receptance.weight", "ffn.receptance.weight", Role::kMatrix},
});

void V52FromBlinkDl(BlinkDlTensors& t) {
  const int n = t.Map("att.time_decay", ExpNegExp, true);
  t.Note("time_decay = exp(-exp(w)) (" + std::to_string(n) + " layers)");
}

void V52SynthLayer(SynthLayer& s) { V4V5SynthLayer(s, Arch::kV5_2); }

// ---- v6 ----
// BlinkDL: time_decay raw (the decay is data-dependent, the model applies exp(-exp(.)));
// time_faaaa raw; the low-rank matrices are used as x @ W, so they are transposed to
// [out, in]: time_maa_w1 [C, 5D] -> [5D, C], time_maa_w2 [5, D, C] -> [5, C, D],
// time_decay_w1 [C, D] -> [D, C], time_decay_w2 [D, C] -> [C, D].

constexpr std::string_view kV6Markers[] = {"time_maa_x"};
constexpr std::string_view kV6Aliases[] = {"6", "6.0"};

// The five token-shift mixes (w, k, v, r, g) are one GGUF tensor, time_mix_lerp_fused
// [5, 1, 1, C] (kV6Fused).
constexpr auto kV6Names = WithCommonLayerNames({
    {"time_mix_w1.weight", "att.time_maa_w1", Role::kDecayLora},
    {"time_mix_w2.weight", "att.time_maa_w2", Role::kDecayLora},
    {"time_mix_lerp_x.weight", "att.time_maa_x", Role::kVector},
    {"time_mix_first.weight", "att.time_faaaa", Role::kVector, kHeadRows | kHeadRowsInGguf},
    {"time_mix_decay.weight", "att.time_decay", Role::kVector},
    {"time_mix_decay_w1.weight", "att.time_decay_w1", Role::kDecayLora},
    {"time_mix_decay_w2.weight", "att.time_decay_w2", Role::kDecayLora},
    {"time_mix_gate.weight", "att.gate.weight", Role::kMatrix},
    {"time_mix_ln.weight", "att.ln_x.weight", Role::kVector},
    {"time_mix_ln.bias", "att.ln_x.bias", Role::kVector},
    {"channel_mix_lerp_k.weight", "ffn.time_maa_k", Role::kVector},
    {"channel_mix_lerp_r.weight", "ffn.time_maa_r", Role::kVector},
    {"channel_mix_receptance.weight", "ffn.receptance.weight", Role::kMatrix},
});
constexpr std::string_view kV6FusedSlots[] = {"att.time_maa_w", "att.time_maa_k", "att.time_maa_v",
                                              "att.time_maa_r", "att.time_maa_g"};
// Older llama.cpp files store them separately under these names.
constexpr std::string_view kV6SeparateMixes[] = {"time_mix_lerp_w.weight", "time_mix_lerp_k.weight",
                                                 "time_mix_lerp_v.weight", "time_mix_lerp_r.weight",
                                                 "time_mix_lerp_g.weight"};
constexpr gguf::FusedMixes kV6Fused = {"time_mix_lerp_fused.weight", kV6FusedSlots,
                                       kV6SeparateMixes};

void V6FromBlinkDl(BlinkDlTensors& t) {
  int n = t.Transpose("att.time_maa_w1");
  n += t.Transpose("att.time_decay_w1");
  n += t.Transpose("att.time_decay_w2");
  n += t.TransposeInner("att.time_maa_w2", "[5, D, C]");
  t.Note("transposed " + std::to_string(n) +
         " low-rank matrices (time_maa_w1/w2, time_decay_w1/w2) to [out, in], F32");
}

void V6Keys(KeyWriter& k) {
  k.U32("rescale_every_n_layers", 0);
  k.U32("wkv.head_size", k.info().head_size);
  k.U32("time_mix_extra_dim", k.UniformRank("att.time_maa_w1", 0, 5));
  k.U32("time_decay_extra_dim", k.UniformRank("att.time_decay_w1", 0, 1));
  k.U32("attention.head_count", 0);  // llama.cpp: "required, unused"
}

void V6SynthLayer(SynthLayer& s) {
  const int64_t C = s.C, H = s.H, N = s.N;
  const float sc = 1.0f / std::sqrt(static_cast<float>(C));
  const int64_t D = C >= 4096 ? 64 : 32, Dd = C >= 4096 ? 128 : 64;
  for (const char* m : {"x", "w", "k", "v", "r", "g"}) {
    s.add("att.time_maa_" + std::string(m), {C}, s.mix);
  }
  s.add("att.time_maa_w1", {5 * D, C}, Normal(0.0f, 0.5f * sc));
  s.add("att.time_maa_w2", {5, C, D}, Normal(0.0f, 0.1f / std::sqrt(static_cast<float>(D))));
  s.add("att.time_decay", {H, N, 1}, Uniform(-6.0f, -1.0f));
  s.add("att.time_decay_w1", {Dd, C}, Normal(0.0f, 0.5f * sc));
  s.add("att.time_decay_w2", {C, Dd}, Normal(0.0f, 0.1f / std::sqrt(static_cast<float>(Dd))));
  s.add("att.time_faaaa", {H, N, 1}, Normal(0.0f, 0.3f));
  s.add("att.receptance.weight", {C, C}, s.proj);
  s.add("att.key.weight", {C, C}, s.proj);
  s.add("att.value.weight", {C, C}, s.proj);
  s.add("att.output.weight", {C, C}, s.out_proj);
  s.add("att.gate.weight", {C, C}, s.proj);
  s.add("att.ln_x.weight", {C}, s.ln_w);
  s.add("att.ln_x.bias", {C}, s.ln_b);
  s.add("ffn.time_maa_k", {C}, s.mix);
  s.add("ffn.time_maa_r", {C}, s.mix);
}

// ---- v7 ----
// BlinkDL: x_r, x_w, x_k, x_v, x_a, x_g ([1, 1, C] each) stacked as x_rwkvag [6, C];
// w1, a1, v1, g1 [C, D] -> [D, C]; w2, a2, v2, g2 [D, C] -> [C, D]; the unused
// blocks.0.att.v0/v1/v2 are dropped. Everything else is raw.

constexpr std::string_view kV7Markers[] = {"k_k", "x_rwkvag", "x_r"};
constexpr std::string_view kV7Aliases[] = {"7", "7.0"};

// llama.cpp's rwkv7. time_mix_lerp_fused [6, 1, 1, C] is aviary's x_rwkvag [6, C] (r, w, k, v,
// a, g); time_mix_r_k is flat [C] (aviary: [H, N]); layer 0's time_mix_v0/v1/v2 are unused
// copies of a0/a1/a2 that llama.cpp requires.
constexpr auto kV7Names = WithCommonLayerNames({
    {"time_mix_lerp_fused.weight", "att.x_rwkvag", Role::kVector, 0, 6},
    {"time_mix_w0.weight", "att.w0", Role::kVector},
    {"time_mix_w1.weight", "att.w1", Role::kDecayLora},
    {"time_mix_w2.weight", "att.w2", Role::kDecayLora},
    {"time_mix_a0.weight", "att.a0", Role::kVector},
    {"time_mix_a1.weight", "att.a1", Role::kLora},
    {"time_mix_a2.weight", "att.a2", Role::kLora},
    {"time_mix_v0.weight", "att.v0", Role::kVector, kNotLayer0, 0, "att.a0"},
    {"time_mix_v1.weight", "att.v1", Role::kLora, kNotLayer0, 0, "att.a1"},
    {"time_mix_v2.weight", "att.v2", Role::kLora, kNotLayer0, 0, "att.a2"},
    {"time_mix_g1.weight", "att.g1", Role::kLora},
    {"time_mix_g2.weight", "att.g2", Role::kLora},
    {"time_mix_k_k.weight", "att.k_k", Role::kVector},
    {"time_mix_k_a.weight", "att.k_a", Role::kVector},
    {"time_mix_r_k.weight", "att.r_k", Role::kVector, kHeadRows},
    {"time_mix_ln.weight", "att.ln_x.weight", Role::kVector},
    {"time_mix_ln.bias", "att.ln_x.bias", Role::kVector},
    {"channel_mix_lerp_k.weight", "ffn.x_k", Role::kVector},
});

void V7FromBlinkDl(BlinkDlTensors& t) {
  // blocks.0 has no value residual; official files carry unused v0/v1/v2 there.
  int dropped = 0;
  for (const char* s : {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}) {
    dropped += t.Drop(s);
  }
  if (dropped) t.Note("dropped the unused blocks.0.att.v0/v1/v2");

  static constexpr std::string_view kMixes[] = {"att.x_r", "att.x_w", "att.x_k",
                                                "att.x_v", "att.x_a", "att.x_g"};
  const int stacked = t.Stack(kMixes, "att.x_rwkvag");
  t.Note("stacked x_r, x_w, x_k, x_v, x_a, x_g as x_rwkvag [6, C] (" + std::to_string(stacked) +
         " layers)");

  // The decay pair becomes F32, as GGUF's type policy has it for float types (llama.cpp keeps
  // them F32); the others keep their type: the same weights then take the same kernels from a
  // .pth as from its GGUF conversion.
  int n = t.Transpose("att.w1") + t.Transpose("att.w2");
  for (const char* s : {"att.a1", "att.v1", "att.g1", "att.a2", "att.v2", "att.g2"}) {
    n += t.Transpose(s, /*keep_type=*/true);
  }
  if (n) {
    t.Note("transposed " + std::to_string(n) +
           " low-rank matrices (w1/w2, a1/a2, v1/v2, g1/g2) to [out, in] (w1/w2 as F32, the "
           "others in their type)");
  }
}

void V7Keys(KeyWriter& k) {
  const ModelInfo& info = k.info();
  k.U32("wkv.head_size", info.head_size);
  const uint32_t iclr = k.UniformRank("att.a1", 0, 1);
  k.U32("attention.decay_lora_rank", k.UniformRank("att.w1", 0, 1));
  k.U32("attention.iclr_lora_rank", iclr);
  k.U32("attention.value_residual_mix_lora_rank",
        info.n_layer > 1 ? k.UniformRank("att.v1", 1, 1) : iclr);
  k.U32("attention.gate_lora_rank", k.UniformRank("att.g1", 0, 1));
  k.U32("attention.head_count", 0);
}

void V7SynthLayer(SynthLayer& s) {
  const int64_t C = s.C, H = s.H, N = s.N;
  const float sc = 1.0f / std::sqrt(static_cast<float>(C));
  const int64_t Dw = Lora(C, 1.8, 0.5), Da = Dw;
  const int64_t Dv = Lora(C, 1.3, 0.5), Dg = Lora(C, 0.6, 0.8);
  auto lora_in = [&](float gain) { return Normal(0.0f, gain * sc); };
  auto lora_out = [&](int64_t D, float gain) {
    return Normal(0.0f, gain / std::sqrt(static_cast<float>(D)));
  };
  s.add("att.x_rwkvag", {6, 1, C}, s.mix);
  s.add("att.w1", {Dw, C}, lora_in(0.5f));
  s.add("att.w2", {C, Dw}, lora_out(Dw, 0.1f));
  s.add("att.w0", {1, 1, C}, Uniform(-6.5f, -1.5f));
  s.add("att.a1", {Da, C}, lora_in(0.5f));
  s.add("att.a2", {C, Da}, lora_out(Da, 0.2f));
  s.add("att.a0", {1, 1, C}, Normal(0.0f, 0.3f));
  if (s.layer > 0) {
    s.add("att.v1", {Dv, C}, lora_in(0.5f));
    s.add("att.v2", {C, Dv}, lora_out(Dv, 0.2f));
    s.add("att.v0", {1, 1, C}, Normal(1.0f, 0.2f));
  }
  s.add("att.g1", {Dg, C}, lora_in(1.0f));
  s.add("att.g2", {C, Dg}, lora_out(Dg, 1.0f));
  s.add("att.k_k", {1, 1, C}, Normal(0.85f, 0.05f));
  s.add("att.k_a", {1, 1, C}, Normal(1.0f, 0.05f));
  s.add("att.r_k", {H, N}, Normal(0.0f, 0.3f));
  s.add("att.receptance.weight", {C, C}, s.proj);
  s.add("att.key.weight", {C, C}, s.proj);
  s.add("att.value.weight", {C, C}, s.proj);
  s.add("att.output.weight", {C, C}, s.out_proj);
  s.add("att.ln_x.weight", {C}, s.ln_w);
  s.add("att.ln_x.bias", {C}, s.ln_b);
  s.add("ffn.x_k", {1, 1, C}, s.mix);
}

// ---- The table, newest first ----

const VersionSpec kVersions[] = {
    {
        .arch = Arch::kV7,
        .name = "v7.0",
        .aliases = kV7Aliases,
        .markers = kV7Markers,
        .heads_from = "att.r_k",
        .gated_channel_mix = false,
        .make = MakeRwkv7,
        .from_blinkdl = V7FromBlinkDl,
        .gguf = {.architecture = "rwkv7",
                 .rwkv_version = "7.0",
                 .layer_names = kV7Names,
                 .write_keys = V7Keys},
        .ffn_ratio = 4.0,
        .synth_layer = V7SynthLayer,
    },
    {
        .arch = Arch::kV6,
        .name = "v6.0",
        .aliases = kV6Aliases,
        .markers = kV6Markers,
        .heads_from = "att.time_faaaa",
        .make = MakeRwkv6,
        .from_blinkdl = V6FromBlinkDl,
        .gguf = {.architecture = "rwkv6",
                 .rwkv_version = "6.0",
                 .layer_names = kV6Names,
                 .fused_mixes = kV6Fused,
                 .undo_rescale = true,
                 .write_keys = V6Keys},
        .ffn_ratio = 3.5,
        .synth_layer = V6SynthLayer,
    },
    {
        .arch = Arch::kV5_2,
        .name = "v5.2",
        .aliases = kV52Aliases,
        .markers = kV52Markers,
        .heads_from = "att.time_faaaa",
        .make = MakeRwkv5,
        .from_blinkdl = V52FromBlinkDl,
        .gguf = {.architecture = "aviary-rwkv5",
                 .rwkv_version = "5.2",
                 .layer_names = kV52Names,
                 .write_keys = V5Keys},
        .ffn_ratio = 3.5,
        .synth_layer = V52SynthLayer,
    },
    {
        .arch = Arch::kV5_1,
        .name = "v5.1",
        .aliases = kV51Aliases,
        .markers = kV51Markers,
        .heads_from = "att.time_decay",
        .head_numel = true,
        .make = MakeRwkv5,
        .from_blinkdl = V51FromBlinkDl,
        .gguf = {.architecture = "aviary-rwkv5",
                 .rwkv_version = "5.1",
                 .layer_names = kV51Names,
                 .write_keys = V5Keys},
        .ffn_ratio = 4.0,
        .synth_layer = V51SynthLayer,
    },
    {
        .arch = Arch::kV4,
        .name = "v4",
        .aliases = kV4Aliases,
        .markers = kV4Markers,
        .all_markers = true,
        .make = MakeRwkv4,
        .from_blinkdl = V4FromBlinkDl,
        .gguf = {.architecture = "aviary-rwkv4",
                 .rwkv_version = "4",
                 .layer_names = kV4Names,
                 .write_keys = V4Keys},
        .ffn_ratio = 4.0,
        .synth_layer = V4SynthLayer,
    },
};

}  // namespace

std::span<const VersionSpec> Versions() { return kVersions; }

const VersionSpec* FindVersion(Arch arch) {
  for (const VersionSpec& v : kVersions) {
    if (v.arch == arch) return &v;
  }
  return nullptr;
}

const VersionSpec& Version(Arch arch) {
  if (const VersionSpec* v = FindVersion(arch)) return *v;
  throw Error("architecture " + std::to_string(static_cast<uint32_t>(arch)) +
              " has no entry in the version table");
}

const VersionSpec* FindVersionByName(std::string_view name) {
  if (!name.empty() && (name[0] == 'v' || name[0] == 'V')) name.remove_prefix(1);
  for (const VersionSpec& v : kVersions) {
    if (std::find(v.aliases.begin(), v.aliases.end(), name) != v.aliases.end()) return &v;
  }
  return nullptr;
}

const VersionSpec* DetectVersion(const std::function<bool(const std::string&)>& has_tensor) {
  for (const VersionSpec& v : kVersions) {
    auto has = [&](std::string_view m) { return has_tensor("blocks.0.att." + std::string(m)); };
    const bool found = v.all_markers ? std::all_of(v.markers.begin(), v.markers.end(), has)
                                     : std::any_of(v.markers.begin(), v.markers.end(), has);
    if (found) return &v;
  }
  return nullptr;
}

std::string_view ArchName(Arch arch) {
  const VersionSpec* v = FindVersion(arch);
  return v ? v->name : "unknown";
}

}  // namespace aviary
