// Raw BlinkDL checkpoints -> canonical layout. The conventions, checked against the reference
// code (BlinkDL/ChatRWKV rwkv_pip_package/src/rwkv/model.py, BlinkDL/RWKV-LM
// RWKV-v7/rwkv_v7_demo.py, RWKV/rwkv.cpp python/convert_pytorch_to_ggml.py):
//   v4    time_decay -> -exp(w); time_first raw.
//   v5.1  (ln_x, no time_faaaa; one decay per head, shape [H] or [H,1,1])
//         time_decay -> exp(-exp(w)); time_first -> exp(u).
//   v5.2  time_decay [H, N] -> exp(-exp(w)); time_faaaa [H, N] raw (the bonus u itself).
//   v6    time_decay raw (the decay is data-dependent, the model applies exp(-exp(.)));
//         time_faaaa raw; low-rank matrices are used as x @ W, so they are transposed to
//         [out, in]: time_maa_w1 [C, 5D] -> [5D, C], time_maa_w2 [5, D, C] -> [5, C, D],
//         time_decay_w1 [C, D] -> [D, C], time_decay_w2 [D, C] -> [C, D].
//   v7    x_r, x_w, x_k, x_v, x_a, x_g ([1, 1, C] each) stacked as x_rwkvag [6, C];
//         w1, a1, v1, g1 [C, D] -> [D, C]; w2, a2, v2, g2 [D, C] -> [C, D]; the unused
//         blocks.0.att.v0/v1/v2 are dropped. Everything else is raw.
// The embedding is not pre-normalised (ChatRWKV folds ln0 into emb at load; the model code
// applies blocks.0.ln0 itself), and nn.Linear weights are already [out, in].
#include "formats/blinkdl.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>
#include <string_view>

#include "aviary/error.h"

namespace aviary {
namespace {

bool StartsWith(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
bool EndsWith(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.substr(s.size() - p.size()) == p;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

enum class Naming { kBlinkDl, kTransformers, kFla };

// "blocks.<N>.<part>.<rest>" -> its pieces; false if the name is not of that form.
bool SplitBlock(const std::string& name, std::string_view prefix, std::string* layer,
                std::string* part, std::string* rest) {
  if (!StartsWith(name, prefix)) return false;
  const size_t a = prefix.size();
  const size_t b = name.find('.', a);
  if (b == std::string::npos || b == a) return false;
  for (size_t i = a; i < b; ++i) {
    if (name[i] < '0' || name[i] > '9') return false;
  }
  const size_t c = name.find('.', b + 1);
  *layer = name.substr(a, b - a);
  *part = name.substr(b + 1, c == std::string::npos ? std::string::npos : c - b - 1);
  *rest = c == std::string::npos ? "" : name.substr(c + 1);
  return true;
}

// Hugging Face transformers' RWKV (v4; the v5/v6 conversions use the same scheme): a pure
// rename, values stay raw (convert_rwkv_checkpoint_to_hf.py).
std::string FromTransformers(const std::string& name) {
  if (!StartsWith(name, "rwkv.")) return name;  // head.weight keeps its name
  std::string n = name.substr(5);
  if (StartsWith(n, "embeddings.")) return "emb." + n.substr(11);
  std::string layer, part, rest;
  if (!SplitBlock(n, "blocks.", &layer, &part, &rest)) return n;  // ln_out.*
  if (part == "pre_ln") part = "ln0";
  if (part == "attention") part = "att";
  if (part == "feed_forward") part = "ffn";
  static const std::pair<const char*, const char*> kSuffixes[] = {
      {"time_mix_key", "time_mix_k"},     {"time_mix_value", "time_mix_v"},
      {"time_mix_receptance", "time_mix_r"}, {"time_mix_gate", "time_mix_g"},
      {"time_maa_key", "time_maa_k"},     {"time_maa_value", "time_maa_v"},
      {"time_maa_receptance", "time_maa_r"}, {"time_maa_gate", "time_maa_g"}};
  for (const auto& [from, to] : kSuffixes) {
    if (rest == from) rest = to;
  }
  return "blocks." + layer + "." + part + (rest.empty() ? "" : "." + rest);
}

// flash-linear-attention's RWKV-7 (fla-hub/rwkv7-*, utils/convert_from_rwkv7.py): renamed, the
// x_* mixes squeezed to [C], and the low-rank pairs stored as nn.Linear weights, i.e. already
// [out, in] (`*lowrank_canonical` is set for those).
std::string FromFla(const std::string& name, bool* lowrank_canonical) {
  *lowrank_canonical = false;
  if (name == "model.embeddings.weight") return "emb.weight";
  if (name == "model.norm.weight") return "ln_out.weight";
  if (name == "model.norm.bias") return "ln_out.bias";
  if (name == "lm_head.weight") return "head.weight";
  std::string layer, part, rest;
  if (!SplitBlock(name, "model.layers.", &layer, &part, &rest)) return name;
  static const std::pair<const char*, const char*> kParts[] = {
      {"attn", "att"}, {"ffn", "ffn"}, {"pre_norm", "ln0"}, {"attn_norm", "ln1"},
      {"ffn_norm", "ln2"}};
  bool known = false;
  for (const auto& [from, to] : kParts) {
    if (part == from) part = to, known = true;
  }
  if (!known) return name;
  if (part == "att") {
    static const std::pair<const char*, const char*> kProj[] = {
        {"r_proj.", "receptance."}, {"k_proj.", "key."}, {"v_proj.", "value."},
        {"o_proj.", "output."},     {"g_norm.", "ln_x."}};
    for (const auto& [from, to] : kProj) {
      if (StartsWith(rest, from)) rest = to + rest.substr(std::strlen(from));
    }
    // {w,a,v,g}_lora.lora.0.weight -> X1, .lora.2.weight -> X2, .lora.2.bias -> X0
    if (rest.size() > 12 && rest.compare(1, 11, "_lora.lora.") == 0 &&
        std::string_view("wavg").find(rest[0]) != std::string_view::npos) {
      const std::string tail = rest.substr(12);
      const char c = rest[0];
      if (tail == "0.weight") rest = std::string(1, c) + "1", *lowrank_canonical = true;
      if (tail == "2.weight") rest = std::string(1, c) + "2", *lowrank_canonical = true;
      if (tail == "2.bias") rest = std::string(1, c) + "0";
    }
  }
  return "blocks." + layer + "." + part + "." + rest;
}

enum class Version { kV4, kV5_1, kV5_2, kV6, kV7 };

class Converter {
 public:
  explicit Converter(WeightFile& wf) : wf_(wf) {}

  void Run(std::vector<Tensor> raw) {
    Rename(raw);
    RefuseVariants();
    const Version v = DetectVersion();
    switch (v) {
      case Version::kV4: ConvertV4(); break;
      case Version::kV5_1: ConvertV51(); break;
      case Version::kV5_2: ConvertV52(); break;
      case Version::kV6: ConvertV6(); break;
      case Version::kV7: ConvertV7(); break;
    }
    Squeeze();
    Finish();
  }

 private:
  [[noreturn]] void Fail(const std::string& problem) const {
    throw Error(wf_.path + ": " + problem);
  }

  void Rename(std::vector<Tensor>& raw) {
    Naming naming = Naming::kBlinkDl;
    for (const Tensor& t : raw) {
      if (StartsWith(t.name, "rwkv.")) naming = Naming::kTransformers;
      if (StartsWith(t.name, "model.layers.") || StartsWith(t.name, "model.embeddings.")) {
        naming = Naming::kFla;
      }
    }
    int renamed = 0;
    for (Tensor& t : raw) {
      std::string n = t.name;
      bool canonical = false;
      if (naming == Naming::kTransformers) n = FromTransformers(t.name);
      if (naming == Naming::kFla) n = FromFla(t.name, &canonical);
      if (n != t.name) ++renamed;
      if (canonical) already_out_in_.insert(n);
      const std::string original = t.name;
      t.name = n;
      if (!tensors_.emplace(n, std::move(t)).second) {
        Fail("tensor '" + n + "' appears twice" +
             (n != original ? " (after renaming '" + original + "')" : ""));
      }
    }
    if (naming == Naming::kTransformers) {
      notes_.push_back("renamed " + std::to_string(renamed) +
                       " tensors from Hugging Face transformers names (rwkv.blocks.N.attention."
                       "*) to BlinkDL's");
    } else if (naming == Naming::kFla) {
      notes_.push_back("renamed " + std::to_string(renamed) +
                       " tensors from flash-linear-attention names (model.layers.N.attn.*) to "
                       "BlinkDL's");
    }
  }

  void RefuseVariants() const {
    for (const auto& [name, t] : tensors_) {
      if (name.find(".ffn.s_emb") != std::string::npos ||
          name.find(".ffn.s0") != std::string::npos) {
        Fail("tensor '" + name + "': DeepEmbed checkpoints are not supported");
      }
      if (name.find("time_state") != std::string::npos) {
        Fail("tensor '" + name + "': this is a tuned initial state, not a model");
      }
    }
  }

  bool Has(const std::string& name) const { return tensors_.count(name) != 0; }

  Version DetectVersion() const {
    if (Has("blocks.0.att.k_k") || Has("blocks.0.att.x_r")) return Version::kV7;
    if (Has("blocks.0.att.time_maa_x")) return Version::kV6;
    if (Has("blocks.0.att.time_faaaa")) return Version::kV5_2;
    if (Has("blocks.0.att.ln_x.weight")) return Version::kV5_1;
    if (Has("blocks.0.att.time_first") && Has("blocks.0.att.time_decay")) return Version::kV4;
    std::string some;
    int n = 0;
    for (const auto& [name, t] : tensors_) {
      if (n++ == 4) break;
      some += (some.empty() ? "" : ", ") + name;
    }
    Fail("not an RWKV checkpoint: no blocks.0.att tensors of a known version (tensors: " + some +
         (tensors_.size() > 4 ? ", ..." : "") + ")");
  }

  // Every tensor whose name ends in `suffix` (e.g. ".att.time_decay").
  std::vector<std::string> Named(std::string_view suffix) const {
    std::vector<std::string> out;
    for (const auto& [name, t] : tensors_) {
      if (StartsWith(name, "blocks.") && EndsWith(name, suffix)) out.push_back(name);
    }
    return out;
  }

  static std::vector<float> Floats(const Tensor& t) {
    std::vector<float> v(static_cast<size_t>(t.numel()));
    if (!v.empty()) DequantizeRow(t.type, t.data, v.data(), t.numel());
    return v;
  }

  // Replaces (or adds) `name` with F32 data owned by the WeightFile.
  void Own(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
    std::vector<uint8_t> buf(v.size() * sizeof(float));
    if (!v.empty()) std::memcpy(buf.data(), v.data(), buf.size());
    OwnBytes(name, DType::kF32, std::move(shape), std::move(buf));
  }

  // Replaces (or adds) `name` with `type` data owned by the WeightFile.
  void OwnBytes(const std::string& name, DType type, std::vector<int64_t> shape,
                std::vector<uint8_t> bytes) {
    wf_.owned.push_back(std::move(bytes));
    Tensor t;
    t.name = name;
    t.type = type;
    t.shape = std::move(shape);
    t.data = wf_.owned.back().data();
    t.nbytes = wf_.owned.back().size();
    tensors_[name] = std::move(t);
  }

  // y = f(x) elementwise, flattened to 1-D unless `keep_shape`.
  template <typename F>
  int Map(std::string_view suffix, F f, bool keep_shape) {
    int n = 0;
    for (const std::string& name : Named(suffix)) {
      const Tensor& t = tensors_.at(name);
      std::vector<float> v = Floats(t);
      for (float& x : v) x = f(x);
      Own(name, keep_shape ? t.shape : std::vector<int64_t>{t.numel()}, v);
      ++n;
    }
    return n;
  }

  // [a, b] -> [b, a], as F32 (`keep_type` false) or in the stored type: F32, F16 and BF16
  // elements are moved as they are, so a BF16 checkpoint's matrix stays BF16 and takes the
  // same kernel as in any other container of the same weights (the kernels choose by type).
  int Transpose(std::string_view suffix, bool keep_type = false) {
    int n = 0;
    for (const std::string& name : Named(suffix)) {
      if (already_out_in_.count(name)) continue;
      const Tensor& t = tensors_.at(name);
      if (t.shape.size() != 2) {
        Fail("tensor '" + name + "' has shape " + ShapeString(t.shape) +
             ", expected a 2-D low-rank matrix");
      }
      const int64_t a = t.shape[0], b = t.shape[1];
      const bool raw = keep_type && (t.type == DType::kF32 || t.type == DType::kF16 ||
                                     t.type == DType::kBF16);
      if (raw) {
        const size_t size = t.type == DType::kF32 ? 4 : 2;
        std::vector<uint8_t> out(static_cast<size_t>(a * b) * size);
        const auto* in = static_cast<const uint8_t*>(t.data);
        for (int64_t i = 0; i < a; ++i) {
          for (int64_t j = 0; j < b; ++j) {
            std::memcpy(&out[(j * a + i) * size], &in[(i * b + j) * size], size);
          }
        }
        OwnBytes(name, t.type, {b, a}, std::move(out));
      } else {
        const std::vector<float> v = Floats(t);
        std::vector<float> out(v.size());
        for (int64_t i = 0; i < a; ++i) {
          for (int64_t j = 0; j < b; ++j) out[j * a + i] = v[i * b + j];
        }
        Own(name, {b, a}, out);
      }
      ++n;
    }
    return n;
  }

  void ConvertV4() {
    const int n = Map(".att.time_decay", [](float w) { return -std::exp(w); }, false);
    notes_.push_back("time_decay = -exp(w) (" + std::to_string(n) + " layers)");
  }

  void ConvertV51() {
    const int n = Map(".att.time_decay", [](float w) { return std::exp(-std::exp(w)); }, false);
    Map(".att.time_first", [](float u) { return std::exp(u); }, false);
    notes_.push_back("time_decay = exp(-exp(w)), time_first = exp(u) (" + std::to_string(n) +
                     " layers)");
  }

  void ConvertV52() {
    const int n = Map(".att.time_decay", [](float w) { return std::exp(-std::exp(w)); }, true);
    notes_.push_back("time_decay = exp(-exp(w)) (" + std::to_string(n) + " layers)");
  }

  void ConvertV6() {
    int n = Transpose(".att.time_maa_w1") + Transpose(".att.time_decay_w1") +
            Transpose(".att.time_decay_w2");
    for (const std::string& name : Named(".att.time_maa_w2")) {  // [S, D, C] -> [S, C, D]
      const Tensor& t = tensors_.at(name);
      if (t.shape.size() != 3) {
        Fail("tensor '" + name + "' has shape " + ShapeString(t.shape) + ", expected [5, D, C]");
      }
      const int64_t S = t.shape[0], D = t.shape[1], C = t.shape[2];
      const std::vector<float> v = Floats(t);
      std::vector<float> out(v.size());
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t d = 0; d < D; ++d) {
          for (int64_t c = 0; c < C; ++c) out[(s * C + c) * D + d] = v[(s * D + d) * C + c];
        }
      }
      Own(name, {S, C, D}, out);
      ++n;
    }
    notes_.push_back("transposed " + std::to_string(n) +
                     " low-rank matrices (time_maa_w1/w2, time_decay_w1/w2) to [out, in], F32");
  }

  void ConvertV7() {
    // blocks.0 has no value residual; official files carry unused v0/v1/v2 there.
    int dropped = 0;
    for (const char* s : {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}) {
      dropped += static_cast<int>(tensors_.erase(s));
    }
    if (dropped) notes_.push_back("dropped the unused blocks.0.att.v0/v1/v2");

    int stacked = 0;
    static const char* kMixes[] = {"x_r", "x_w", "x_k", "x_v", "x_a", "x_g"};
    for (const std::string& first : Named(".att.x_r")) {
      const std::string prefix = first.substr(0, first.size() - 3);  // "blocks.N.att."
      std::vector<float> stack;
      int64_t C = 0;
      for (const char* m : kMixes) {
        auto it = tensors_.find(prefix + m);
        if (it == tensors_.end()) Fail("missing tensor '" + prefix + m + "'");
        const Tensor& t = it->second;
        if (C == 0) C = t.numel();
        if (t.numel() != C || C == 0) {
          Fail("tensor '" + t.name + "' has shape " + ShapeString(t.shape) + ", expected " +
               std::to_string(C) + " elements like " + prefix + "x_r");
        }
        const std::vector<float> v = Floats(t);
        stack.insert(stack.end(), v.begin(), v.end());
      }
      for (const char* m : kMixes) tensors_.erase(prefix + m);
      Own(prefix + "x_rwkvag", {6, C}, stack);
      ++stacked;
    }
    notes_.push_back("stacked x_r, x_w, x_k, x_v, x_a, x_g as x_rwkvag [6, C] (" +
                     std::to_string(stacked) + " layers)");

    // The decay pair becomes F32 as GGUF's type policy has it for float types (llama.cpp
    // keeps them F32); the others keep their type: the same weights then take the same kernels
    // from a .pth as from its GGUF conversion.
    int n = Transpose(".att.w1") + Transpose(".att.w2");
    for (const char* s : {".att.a1", ".att.v1", ".att.g1", ".att.a2", ".att.v2", ".att.g2"}) {
      n += Transpose(s, /*keep_type=*/true);
    }
    if (n) {
      notes_.push_back("transposed " + std::to_string(n) +
                       " low-rank matrices (w1/w2, a1/a2, v1/v2, g1/g2) to [out, in] (w1/w2 as "
                       "F32, the others in their type)");
    }
  }

  // [1, ..., 1, C] -> [C] for the per-channel vectors, as rwkv.cpp's converter does. Not for
  // r_k and time_faaaa: their first dimension is the head count the model reads.
  void Squeeze() {
    for (auto& [name, t] : tensors_) {
      if (t.shape.size() < 2 || EndsWith(name, ".r_k") || EndsWith(name, ".time_faaaa")) continue;
      if (std::all_of(t.shape.begin(), t.shape.end() - 1, [](int64_t d) { return d == 1; })) {
        t.shape = {t.shape.back()};
      }
    }
  }

  void Finish() {
    std::map<DType, uint64_t> bytes_by_type;
    for (const auto& [name, t] : tensors_) bytes_by_type[t.type] += t.nbytes;
    uint64_t best = 0;
    for (const auto& [type, n] : bytes_by_type) {
      if (n >= best) best = n, wf_.main_type = type;
    }
    wf_.tensors = std::move(tensors_);
    wf_.notes.insert(wf_.notes.end(), notes_.begin(), notes_.end());
  }

  WeightFile& wf_;
  std::map<std::string, Tensor> tensors_;
  std::set<std::string> already_out_in_;
  std::vector<std::string> notes_;
};

}  // namespace

void ConvertBlinkDl(std::vector<Tensor> raw, WeightFile& wf) { Converter(wf).Run(std::move(raw)); }

}  // namespace aviary
