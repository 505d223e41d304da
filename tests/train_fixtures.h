// A tiny RWKV-7 for the training-graph tests (train_graph_test, train_lora_test): its shape and
// random weights at scales where every stage of the math is in its working range.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "train/params.h"

namespace aviary::testing {

// Two layers of 32 channels, heads of 16. Q8_0 needs rows of whole 32-element blocks: every
// matrix's input width is a multiple of 32, so the LoRA tests can store it quantized too.
inline train::Rwkv7Config TinyRwkv7Config() {
  train::Rwkv7Config c;
  c.n_layer = 2;
  c.n_embd = 32;
  c.head_size = 16;
  c.vocab = 24;
  c.n_ffn = 64;
  c.d_decay = c.d_aaa = c.d_mv = c.d_gate = 8;
  return c;
}

// Uniform random weights scaled per kind: matrices by 1.5/sqrt(fan-in) (r_k is a vector kept
// as a matrix), LayerNorm weights and k_a near 1, token-shift mixes in (0.05, 0.95), the rest
// within +-0.5. Layer 0's value-residual tensors (v0, v1, v2), which its math never reads, as
// the importer fills them, so that a model written from these weights round-trips.
inline std::vector<float> RandomRwkv7Params(const train::ParamLayout& layout, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> p(layout.total_floats(), 0.0f);
  for (const train::ParamEntry& e : layout.entries()) {
    float* d = p.data() + e.offset;
    const std::string& n = e.name;
    for (size_t i = 0; i < e.size; ++i) {
      float v = u(rng);
      if (e.shape.size() == 2 && !n.ends_with("r_k")) {
        v *= 1.5f / std::sqrt(static_cast<float>(e.shape[1]));
      } else if (n.ends_with("ln1.weight") || n.ends_with("ln2.weight") ||
                 n.ends_with("ln0.weight") || n.ends_with("ln_out.weight") ||
                 n.ends_with("ln_x.weight") || n.ends_with("k_a")) {
        v = 1.0f + 0.3f * v;
      } else if (n.find(".x_") != std::string::npos) {
        v = 0.5f + 0.45f * v;
      } else {
        v *= 0.5f;
      }
      d[i] = v;
    }
  }
  const train::ParamEntry& v0 = layout.Get("blocks.0.att.v0");
  const int C = layout.config().n_embd;
  for (int i = 0; i < C; ++i) p[v0.offset + i] = 0.73f - 0.4f * (float(i) / (C - 1) - 0.5f);
  for (const char* z : {"blocks.0.att.v1", "blocks.0.att.v2"}) {
    const train::ParamEntry& e = layout.Get(z);
    std::fill_n(p.begin() + e.offset, e.size, 0.0f);
  }
  return p;
}

}  // namespace aviary::testing
