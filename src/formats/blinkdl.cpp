// Raw BlinkDL checkpoints -> canonical layout: the names Hugging Face and flash-linear-attention
// give the same parameters are mapped back to BlinkDL's, the version is detected, and its entry
// in the version table (models/versions.cpp, from_blinkdl) says which values to transform. The
// conventions were checked against the reference code (BlinkDL/ChatRWKV
// rwkv_pip_package/src/rwkv/model.py, BlinkDL/RWKV-LM RWKV-v7/rwkv_v7_demo.py, RWKV/rwkv.cpp
// python/convert_pytorch_to_ggml.py).
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
#include "models/versions.h"

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
      {"time_mix_key", "time_mix_k"},        {"time_mix_value", "time_mix_v"},
      {"time_mix_receptance", "time_mix_r"}, {"time_mix_gate", "time_mix_g"},
      {"time_maa_key", "time_maa_k"},        {"time_maa_value", "time_maa_v"},
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
  static const std::pair<const char*, const char*> kParts[] = {{"attn", "att"},
                                                               {"ffn", "ffn"},
                                                               {"pre_norm", "ln0"},
                                                               {"attn_norm", "ln1"},
                                                               {"ffn_norm", "ln2"}};
  bool known = false;
  for (const auto& [from, to] : kParts) {
    if (part == from) part = to, known = true;
  }
  if (!known) return name;
  if (part == "att") {
    static const std::pair<const char*, const char*> kProj[] = {{"r_proj.", "receptance."},
                                                                {"k_proj.", "key."},
                                                                {"v_proj.", "value."},
                                                                {"o_proj.", "output."},
                                                                {"g_norm.", "ln_x."}};
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

class Converter final : public BlinkDlTensors {
 public:
  explicit Converter(WeightFile& wf) : wf_(wf) {}

  void Run(std::vector<Tensor> raw) {
    Rename(raw);
    RefuseVariants();
    Detect().from_blinkdl(*this);
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

  const VersionSpec& Detect() const {
    const VersionSpec* v = DetectVersion([&](const std::string& name) { return Has(name); });
    if (v) return *v;
    std::string some;
    int n = 0;
    for (const auto& [name, t] : tensors_) {
      if (n++ == 4) break;
      some += (some.empty() ? "" : ", ") + name;
    }
    Fail("not an RWKV checkpoint: no blocks.0.att tensors of a known version (tensors: " + some +
         (tensors_.size() > 4 ? ", ..." : "") + ")");
  }

  // Every layer's tensor blocks.N.<suffix>.
  std::vector<std::string> Named(std::string_view suffix) const {
    std::vector<std::string> out;
    for (const auto& [name, t] : tensors_) {
      if (StartsWith(name, "blocks.") && EndsWith(name, suffix) && name.size() > suffix.size() &&
          name[name.size() - suffix.size() - 1] == '.') {
        out.push_back(name);
      }
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

  int Map(std::string_view suffix, float (*f)(float), bool keep_shape) override {
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

  int Transpose(std::string_view suffix, bool keep_type) override {
    int n = 0;
    for (const std::string& name : Named(suffix)) {
      if (already_out_in_.count(name)) continue;
      const Tensor& t = tensors_.at(name);
      if (t.shape.size() != 2) {
        Fail("tensor '" + name + "' has shape " + ShapeString(t.shape) +
             ", expected a 2-D low-rank matrix");
      }
      const int64_t a = t.shape[0], b = t.shape[1];
      const bool raw =
          keep_type && (t.type == DType::kF32 || t.type == DType::kF16 || t.type == DType::kBF16);
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

  int TransposeInner(std::string_view suffix, std::string_view expected) override {
    int n = 0;
    for (const std::string& name : Named(suffix)) {
      const Tensor& t = tensors_.at(name);
      if (t.shape.size() != 3) {
        Fail("tensor '" + name + "' has shape " + ShapeString(t.shape) + ", expected " +
             std::string(expected));
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
    return n;
  }

  int Drop(const std::string& name) override { return static_cast<int>(tensors_.erase(name)); }

  int Stack(std::span<const std::string_view> parts, std::string_view into) override {
    int stacked = 0;
    for (const std::string& first : Named(parts.front())) {
      const std::string prefix = first.substr(0, first.size() - parts.front().size());
      std::vector<float> stack;
      int64_t C = 0;
      for (std::string_view part : parts) {
        const std::string name = prefix + std::string(part);
        auto it = tensors_.find(name);
        if (it == tensors_.end()) Fail("missing tensor '" + name + "'");
        const Tensor& t = it->second;
        if (C == 0) C = t.numel();
        if (t.numel() != C || C == 0) {
          Fail("tensor '" + t.name + "' has shape " + ShapeString(t.shape) + ", expected " +
               std::to_string(C) + " elements like " + first);
        }
        const std::vector<float> v = Floats(t);
        stack.insert(stack.end(), v.begin(), v.end());
      }
      for (std::string_view part : parts) tensors_.erase(prefix + std::string(part));
      Own(prefix + std::string(into), {static_cast<int64_t>(parts.size()), C}, stack);
      ++stacked;
    }
    return stacked;
  }

  void Note(std::string note) override { notes_.push_back(std::move(note)); }

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
