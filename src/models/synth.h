// Synthetic RWKV models: any version and shape, random but well-scaled weights, written in
// rwkv.cpp's .bin layout with its type policy, so speed can be measured at real release sizes
// (RWKV-7 0.1B 12x768, 0.4B 24x1024, 1.5B 24x2048, 2.9B 32x2560; RWKV-6 1.6B 24x2048) without
// downloading them, by aviary and by rwkv.cpp alike.
//
// Scaling: activations stay near unit size through every layer (matrices ~ N(0, 1/fan_in),
// output projections halved, decays spread like BlinkDL's initialisation), so outputs are
// finite and logits have a spread of a few units. The weights mean nothing: the text is noise.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "aviary/model.h"
#include "tensor/dtype.h"

namespace aviary {

struct SynthOptions {
  Arch arch = Arch::kV7;
  int n_layer = 12;
  int n_embd = 768;
  int n_vocab = 65536;
  int head_size = 64;  // v5.x, v6, v7 (n_embd must be a multiple)
  int n_ffn = 0;       // 0: the release default (v4, v5.1, v7: 4 n_embd; v5.2, v6: 3.5 n_embd)
  // F32: every tensor F32. F16: as rwkv.cpp's converter writes FP16 (matrices F16; vectors,
  // decays and mixes F32). Quantized: that F16 file as rwkv.cpp's quantizer leaves it (the 2-D
  // matrices quantized except emb, head and v7's low-rank ones, which stay F16).
  DType type = DType::kF16;
  uint64_t seed = 1;
};

struct SynthTensor {
  std::string name;
  std::vector<int64_t> shape;  // outermost first
  DType type;
};

// How a synthetic tensor's values are drawn, then transformed into rwkv.cpp's prepared form.
struct SynthInit {
  enum Dist { kNormal, kUniform } dist = kNormal;
  float a = 0, b = 0;  // normal: mean a, std b; uniform: [a, b)
  enum Post { kNone, kNegExp, kExpNegExp, kExp } post = kNone;
};
inline SynthInit Normal(float mean, float std) {
  return {SynthInit::kNormal, mean, std, SynthInit::kNone};
}
inline SynthInit Uniform(float lo, float hi, SynthInit::Post post = SynthInit::kNone) {
  return {SynthInit::kUniform, lo, hi, post};
}

// One layer as a version's synth_layer (models/versions.cpp) sees it: the sizes, the usual
// initialisations, and `add` for each of its tensors (name without "blocks.N.", shape
// outermost first, in the order rwkv.cpp's converter writes them).
struct SynthLayer {
  int64_t layer = 0, C = 0, H = 1, N = 0;     // N: head size; H heads of N make C
  SynthInit proj, out_proj, mix, ln_w, ln_b;  // matrices ~ N(0, 1/C), output ones halved
  std::function<void(std::string_view name, std::vector<int64_t> shape, SynthInit init)> add;
};

// The tensors WriteSynthModel writes, in order. Throws UsageError on an impossible shape.
std::vector<SynthTensor> PlanSynthModel(const SynthOptions& options);

struct SynthReport {
  uint64_t file_bytes = 0;
  uint64_t n_params = 0;
  int tensors = 0;
  std::map<std::string, int> types;  // type name -> tensor count
};

// Writes the model to `path` in rwkv.cpp's format (the extension is not looked at).
// Deterministic: the same options give the same bytes.
SynthReport WriteSynthModel(const SynthOptions& options, const std::string& path);

// "4", "5.1", "5.2", "6", "7" (also with a leading 'v' or a trailing ".0"). Throws UsageError.
Arch ParseArch(const std::string& version);

}  // namespace aviary
