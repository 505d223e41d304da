#include "train/params.h"

#include <algorithm>
#include <cmath>

#include "aviary/error.h"
#include "models/stages.h"

namespace aviary::train {
namespace {

int LowRank(double k, int C) {
  // RWKV-LM: max(32, int(round((k * C**0.5) / 32) * 32)).
  return std::max(32, static_cast<int>(std::nearbyint(k * std::sqrt(C) / 32.0)) * 32);
}

}  // namespace

Rwkv7Config Rwkv7Config::Official(int n_layer, int n_embd, int vocab) {
  Rwkv7Config c;
  c.n_layer = n_layer;
  c.n_embd = n_embd;
  c.head_size = n_embd < 64 ? n_embd : 64;
  c.vocab = vocab;
  c.n_ffn = 4 * n_embd;
  c.d_decay = LowRank(2.5, n_embd);
  c.d_aaa = LowRank(2.5, n_embd);
  c.d_mv = LowRank(1.7, n_embd);
  c.d_gate = LowRank(5.0, n_embd);
  return c;
}

void Rwkv7Config::Validate() const {
  auto fail = [](const std::string& what) { throw Error("cannot train this model: " + what); };
  if (n_layer < 1 || n_layer > 1024) fail("layers must be 1..1024, not " + std::to_string(n_layer));
  if (n_embd < 1 || n_embd > 65536) fail("width must be 1..65536, not " + std::to_string(n_embd));
  if (head_size < 1 || n_embd % head_size != 0) {
    fail("width " + std::to_string(n_embd) + " is not a multiple of the head size " +
         std::to_string(head_size));
  }
  if (vocab < 2 || vocab > (1 << 24)) fail("vocabulary must be 2..16777216 tokens");
  if (n_ffn < 1 || n_ffn > 16 * n_embd) fail("channel-mix width must be 1..16 x the width");
  for (int d : {d_decay, d_aaa, d_mv, d_gate}) {
    if (d < 1 || d > 4 * n_embd + 64) fail("a low-rank width must be 1..4 x the width");
  }
}

ParamLayout ParamLayout::Rwkv7(const Rwkv7Config& c) {
  c.Validate();
  ParamLayout layout;
  layout.config_ = c;
  const int64_t C = c.n_embd, V = c.vocab, F = c.n_ffn, H = c.n_head(), N = c.head_size;
  auto add = [&](std::string name, std::vector<int64_t> shape, std::vector<int64_t> pth_shape,
                 ParamGroup group, bool transposed = false, bool pad = true) {
    ParamEntry e;
    e.name = std::move(name);
    e.size = 1;
    for (int64_t d : shape) e.size *= static_cast<size_t>(d);
    e.shape = std::move(shape);
    e.pth_shape = std::move(pth_shape);
    e.transposed_in_pth = transposed;
    e.group = group;
    // 16-float (64-byte) alignment: a tensor starts on a cache line and a SIMD vector, except
    // after x_r..x_a, which the (6, C) x_rwkvag view needs adjacent.
    e.offset = layout.total_;
    layout.total_ += pad ? (e.size + 15) / 16 * 16 : e.size;
    layout.entries_.push_back(std::move(e));
  };
  const auto kNo = ParamGroup::kNoDecay, kMat = ParamGroup::kDecay;
  // Registration order of RWKV-LM's modules (the order of its state_dict).
  add("emb.weight", {V, C}, {V, C}, kMat);
  for (int l = 0; l < c.n_layer; ++l) {
    const std::string b = "blocks." + std::to_string(l) + ".";
    add(b + "ln1.weight", {C}, {C}, kNo);
    add(b + "ln1.bias", {C}, {C}, kNo);
    add(b + "ln2.weight", {C}, {C}, kNo);
    add(b + "ln2.bias", {C}, {C}, kNo);
    if (l == 0) {
      add(b + "ln0.weight", {C}, {C}, kNo);
      add(b + "ln0.bias", {C}, {C}, kNo);
    }
    for (const char* s : {"x_r", "x_w", "x_k", "x_v", "x_a", "x_g"}) {
      add(b + "att." + s, {C}, {1, 1, C}, kNo, false, std::string(s) == "x_g");
    }
    auto low_rank = [&](const char* name, int64_t D) {
      const std::string p = b + "att." + name;
      add(p + "1", {D, C}, {C, D}, kNo, true);
      add(p + "2", {C, D}, {D, C}, kNo, true);
    };
    low_rank("w", c.d_decay);
    add(b + "att.w0", {C}, {1, 1, C}, ParamGroup::kDoubleLr);
    low_rank("a", c.d_aaa);
    add(b + "att.a0", {C}, {1, 1, C}, kNo);
    low_rank("v", c.d_mv);
    add(b + "att.v0", {C}, {1, 1, C}, kNo);
    low_rank("g", c.d_gate);
    add(b + "att.k_k", {C}, {1, 1, C}, kNo);
    add(b + "att.k_a", {C}, {1, 1, C}, kNo);
    add(b + "att.r_k", {H, N}, {H, N}, kNo);
    for (const char* s : {"receptance", "key", "value", "output"}) {
      add(b + "att." + s + ".weight", {C, C}, {C, C}, kMat);
    }
    add(b + "att.ln_x.weight", {C}, {C}, kNo);
    add(b + "att.ln_x.bias", {C}, {C}, kNo);
    add(b + "ffn.x_k", {C}, {1, 1, C}, kNo);
    add(b + "ffn.key.weight", {F, C}, {F, C}, kMat);
    add(b + "ffn.value.weight", {C, F}, {C, F}, kMat);
  }
  add("ln_out.weight", {C}, {C}, kNo);
  add("ln_out.bias", {C}, {C}, kNo);
  add("head.weight", {V, C}, {V, C}, kMat);
  return layout;
}

std::pair<int64_t, int64_t> Rwkv7MatrixShape(const Rwkv7Config& c, int m) {
  const int64_t C = c.n_embd, F = c.n_ffn;
  if (m == 4) return {F, C};  // ffn.key
  if (m == 5) return {C, F};  // ffn.value
  return {C, C};
}

ParamLayout ParamLayout::Rwkv7Small(const Rwkv7Config& c) {
  const ParamLayout all = Rwkv7(c);
  auto large = [](const std::string& name) {
    if (name == "emb.weight" || name == "head.weight") return true;
    for (const char* m : kRwkv7MatrixNames) {
      if (name.ends_with(std::string(".") + m + ".weight")) return true;
    }
    return false;
  };
  ParamLayout layout;
  layout.config_ = c;
  layout.tune_ = "small";
  for (const ParamEntry& e : all.entries_) {
    if (large(e.name)) continue;
    ParamEntry kept = e;
    // x_r..x_a stay adjacent (x_rwkvag); every other tensor starts on 16 floats, as in Rwkv7.
    const bool mix = e.name.find(".att.x_") != std::string::npos && !e.name.ends_with("x_g");
    kept.offset = layout.total_;
    layout.total_ += mix ? e.size : (e.size + 15) / 16 * 16;
    layout.entries_.push_back(std::move(kept));
  }
  return layout;
}

ParamLayout ParamLayout::Rwkv7Lora(const Rwkv7Config& c, int rank,
                                   const std::vector<std::string>& targets) {
  c.Validate();
  if (rank < 1 || rank > 4096) {
    throw UsageError("--lora-rank must be 1..4096, not " + std::to_string(rank));
  }
  for (const std::string& t : targets) {
    if (!IsRwkv7MatrixName(t)) {
      std::string valid;
      for (const char* n : kRwkv7MatrixNames) valid += (valid.empty() ? "" : ", ") + std::string(n);
      throw UsageError("unknown LoRA target '" + t + "' (valid: " + valid + ")");
    }
  }
  if (targets.empty()) throw UsageError("--lora-targets: name at least one matrix");
  ParamLayout layout;
  layout.config_ = c;
  layout.tune_ = "lora";
  layout.lora_rank_ = rank;
  for (const char* n : kRwkv7MatrixNames) {  // canonical order, each once
    if (std::find(targets.begin(), targets.end(), n) != targets.end()) {
      layout.lora_targets_.push_back(n);
    }
  }
  auto add = [&](std::string name, int64_t rows, int64_t cols) {
    ParamEntry e;
    e.name = std::move(name);
    e.shape = e.pth_shape = {rows, cols};
    e.size = static_cast<size_t>(rows * cols);
    e.offset = layout.total_;
    layout.total_ += (e.size + 15) / 16 * 16;
    layout.entries_.push_back(std::move(e));
  };
  for (int l = 0; l < c.n_layer; ++l) {
    for (int m = 0; m < kRwkv7LayerMatrices; ++m) {
      if (std::find(targets.begin(), targets.end(), kRwkv7MatrixNames[m]) == targets.end()) {
        continue;
      }
      const auto [out, in] = Rwkv7MatrixShape(c, m);
      const std::string p = "blocks." + std::to_string(l) + "." + kRwkv7MatrixNames[m];
      add(p + ".lora_A", rank, in);
      add(p + ".lora_B", out, rank);
    }
  }
  return layout;
}

ParamLayout ParamLayout::Rwkv7State(const Rwkv7Config& c) {
  c.Validate();
  ParamLayout layout;
  layout.config_ = c;
  layout.tune_ = "state";
  const int64_t H = c.n_head(), N = c.head_size;
  for (int l = 0; l < c.n_layer; ++l) {
    ParamEntry e;
    e.name = "blocks." + std::to_string(l) + ".att.time_state";
    e.shape = e.pth_shape = {H, N, N};
    e.size = static_cast<size_t>(H * N * N);
    e.offset = layout.total_;
    layout.total_ += (e.size + 15) / 16 * 16;
    layout.entries_.push_back(std::move(e));
  }
  return layout;
}

const ParamEntry* ParamLayout::Find(const std::string& name) const {
  for (const ParamEntry& e : entries_) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

const ParamEntry& ParamLayout::Get(const std::string& name) const {
  const ParamEntry* e = Find(name);
  if (!e) throw Error("no parameter named '" + name + "'");
  return *e;
}

Rwkv7Tensors Rwkv7Tensors::Bind(const ParamLayout& layout, float* base) {
  auto at = [&](const std::string& name) { return base + layout.Get(name).offset; };
  auto large = [&](const std::string& name) -> float* {
    const ParamEntry* e = layout.Find(name);
    return e ? base + e->offset : nullptr;
  };
  Rwkv7Tensors t;
  t.emb = large("emb.weight");
  for (int l = 0; l < layout.config().n_layer; ++l) {
    const std::string b = "blocks." + std::to_string(l) + ".";
    Layer L;
    L.ln1_w = at(b + "ln1.weight");
    L.ln1_b = at(b + "ln1.bias");
    L.ln2_w = at(b + "ln2.weight");
    L.ln2_b = at(b + "ln2.bias");
    if (l == 0) {
      L.ln0_w = at(b + "ln0.weight");
      L.ln0_b = at(b + "ln0.bias");
    }
    L.x_rwkvag = at(b + "att.x_r");
    L.w0 = at(b + "att.w0");
    L.a0 = at(b + "att.a0");
    L.v0 = at(b + "att.v0");
    L.w1 = at(b + "att.w1");
    L.w2 = at(b + "att.w2");
    L.a1 = at(b + "att.a1");
    L.a2 = at(b + "att.a2");
    L.v1 = at(b + "att.v1");
    L.v2 = at(b + "att.v2");
    L.g1 = at(b + "att.g1");
    L.g2 = at(b + "att.g2");
    L.k_k = at(b + "att.k_k");
    L.k_a = at(b + "att.k_a");
    L.r_k = at(b + "att.r_k");
    L.receptance = large(b + "att.receptance.weight");
    L.key = large(b + "att.key.weight");
    L.value = large(b + "att.value.weight");
    L.output = large(b + "att.output.weight");
    L.ln_x_w = at(b + "att.ln_x.weight");
    L.ln_x_b = at(b + "att.ln_x.bias");
    L.ffn_x_k = at(b + "ffn.x_k");
    L.ffn_key = large(b + "ffn.key.weight");
    L.ffn_value = large(b + "ffn.value.weight");
    t.layers.push_back(L);
  }
  t.ln_out_w = at("ln_out.weight");
  t.ln_out_b = at("ln_out.bias");
  t.head = large("head.weight");
  return t;
}

Rwkv7Tensors Rwkv7Tensors::None(int n_layer) {
  Rwkv7Tensors t{};
  t.layers.assign(static_cast<size_t>(n_layer), Layer{});
  return t;
}

void TunedStateToSequence(const ParamLayout& layout, const float* params, float* sequence_state) {
  const Rwkv7Config& c = layout.config();
  for (int l = 0; l < c.n_layer; ++l) {
    const ParamEntry& e = layout.entries()[l];
    std::copy_n(params + e.offset, e.size,
                HeadLayerState::Of(sequence_state, l, c.n_embd, c.head_size).S);
  }
}

void AddSequenceStateGradient(const ParamLayout& layout, const float* d_sequence_state,
                              float* grads) {
  const Rwkv7Config& c = layout.config();
  for (int l = 0; l < c.n_layer; ++l) {
    const ParamEntry& e = layout.entries()[l];
    const float* d =
        HeadLayerState::Of(const_cast<float*>(d_sequence_state), l, c.n_embd, c.head_size).S;
    for (size_t i = 0; i < e.size; ++i) grads[e.offset + i] += d[i];
  }
}

}  // namespace aviary::train
