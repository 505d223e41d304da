#include "train/export.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <vector>

#include "aviary/error.h"
#include "aviary/model.h"
#include "aviary/state.h"
#include "formats/gguf_writer.h"
#include "formats/json_depth.h"
#include "formats/json_number.h"
#include "formats/mapped_file.h"
#include "formats/output_file.h"
#include "formats/printable.h"
#include "formats/pth_writer.h"
#include "formats/weight_file.h"

namespace aviary::train {

void ExportRwkv7Pth(const std::string& path, const ParamLayout& layout, const float* params,
                    DType type) {
  std::vector<PthTensor> tensors;
  std::vector<std::vector<float>> transposed;  // the low-rank matrices in the .pth's order
  tensors.reserve(layout.entries().size());
  for (const ParamEntry& e : layout.entries()) {
    const float* data = params + e.offset;
    if (e.transposed_in_pth) {
      // [rows, cols] here -> [cols, rows] in the .pth.
      const size_t rows = static_cast<size_t>(e.shape.at(0)),
                   cols = static_cast<size_t>(e.shape.at(1));
      std::vector<float>& t = transposed.emplace_back(e.size);
      for (size_t r = 0; r < rows; ++r) {
        for (size_t c = 0; c < cols; ++c) t[c * rows + r] = data[r * cols + c];
      }
      data = t.data();
    }
    tensors.push_back({e.name, e.pth_shape, data});
  }
  PthWriteOptions options;
  options.type = type;
  WritePth(path, tensors, options);
}

void ExportRwkv7Gguf(const std::string& gguf_path, const std::string& pth_path,
                     std::shared_ptr<const TokenizerData> tokenizer) {
  RefuseOverwritingInputs(gguf_path, {pth_path});
  auto file = std::make_shared<MappedFile>(pth_path, LoadMode::kMmap);
  WeightFile wf = ReadWeightFile(file->bytes(), pth_path);
  wf.backing = file;
  const std::unique_ptr<Model> model = Model::LoadFromMemory(file->bytes(), pth_path);
  const ModelInfo& info = model->info();
  if (info.arch != Arch::kV7) throw Error(pth_path + ": not an RWKV-7 model");
  if (!tokenizer) {
    if (info.n_vocab != 256) {
      throw UsageError(gguf_path + ": a GGUF of a " + std::to_string(info.n_vocab) +
                       "-token model needs its tokenizer to embed");
    }
    auto bytes = std::make_shared<TokenizerData>();
    bytes->kind = "bytes";
    for (int i = 0; i < 256; ++i) bytes->tokens.emplace_back(1, static_cast<char>(i));
    tokenizer = std::move(bytes);
  }
  GgufWriteOptions options;  // no type: every tensor keeps the .pth's
  options.tokenizer = std::move(tokenizer);
  OutputFile out(gguf_path);
  WriteGguf(wf, info, options, out.temp_path());
  LoadOptions check;
  check.load_mode = LoadMode::kMmap;
  Model::Load(out.temp_path(), check);  // the result must load
  out.Commit();
}

void ExportLoraAdapter(const std::string& path, const ParamLayout& layout, const float* params,
                       double lora_alpha, const std::string& base_model,
                       uint64_t base_fingerprint) {
  std::vector<PthTensor> tensors;
  for (const ParamEntry& e : layout.entries()) {
    tensors.push_back({e.name, e.pth_shape, params + e.offset});
  }
  WritePth(path, tensors, PthWriteOptions{});
  const Rwkv7Config& c = layout.config();
  const nlohmann::json meta = {{"format", "aviary-lora"},
                               {"version", 1},
                               {"lora_rank", layout.lora_rank()},
                               {"lora_alpha", lora_alpha},
                               {"targets", layout.lora_targets()},
                               {"base_model", base_model},
                               {"base_fingerprint", base_fingerprint},
                               {"n_layer", c.n_layer},
                               {"n_embd", c.n_embd},
                               {"n_ffn", c.n_ffn}};
  const std::string text = meta.dump(2) + "\n";
  const std::string json_path = path.substr(0, path.rfind('.')) + ".json";
  WriteFileAtomically(json_path,
                      std::span(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
}

LoraAdapterMeta ParseLoraAdapterMeta(std::string_view json, const std::string& name) {
  // adapter.json is a few hundred bytes; the guards keep hostile input from exhausting the
  // stack (nlohmann recurses per nesting level) or memory.
  if (json.size() > (size_t{1} << 20) || JsonDepth(json) > 8) {
    throw Error(name + ": not an aviary LoRA adapter description (too large or nested)");
  }
  const nlohmann::json j = nlohmann::json::parse(json, nullptr, false);
  // value() would throw on a "format" that is not a string: compare the JSON value itself.
  if (j.is_discarded() || !j.is_object() || !j.contains("format") ||
      j["format"] != nlohmann::json("aviary-lora")) {
    throw Error(name + ": not an aviary LoRA adapter description");
  }
  // Sizes are read through JsonInteger: a float or out-of-range number is refused by name,
  // never cast (undefined for values outside int).
  auto integer = [&](const char* key, int64_t lo, int64_t hi) -> int {
    const auto it = j.find(key);
    const std::optional<int64_t> v = it == j.end() ? std::nullopt : JsonInteger(*it, lo, hi);
    if (!v) {
      throw Error(name + ": \"" + key + "\" must be an integer in " + std::to_string(lo) + ".." +
                  std::to_string(hi));
    }
    return static_cast<int>(*v);
  };
  LoraAdapterMeta m;
  m.rank = integer("lora_rank", 1, 65536);
  m.n_layer = integer("n_layer", 1, 1 << 20);
  m.n_embd = integer("n_embd", 1, 1 << 20);
  m.n_ffn = integer("n_ffn", 1, 1 << 20);
  const auto alpha = j.find("lora_alpha");
  if (alpha == j.end() || !alpha->is_number() || !(alpha->get<double>() > 0) ||
      !std::isfinite(alpha->get<double>())) {
    throw Error(name + ": \"lora_alpha\" must be a positive finite number");
  }
  m.alpha = alpha->get<double>();
  if (const auto fp = j.find("base_fingerprint"); fp != j.end()) {
    const std::optional<uint64_t> v = JsonUnsigned(*fp);
    if (!v) throw Error(name + ": \"base_fingerprint\" must be a non-negative integer");
    m.base_fingerprint = *v;
  }
  if (const auto base = j.find("base_model"); base != j.end()) {
    if (!base->is_string()) throw Error(name + ": \"base_model\" must be a string");
    m.base_model = base->get<std::string>();
  }
  const auto targets = j.find("targets");
  if (targets == j.end() || !targets->is_array() ||
      !std::all_of(targets->begin(), targets->end(), [](const auto& t) { return t.is_string(); })) {
    throw Error(name + ": \"targets\" must be a list of tensor names");
  }
  m.targets = targets->get<std::vector<std::string>>();
  if (m.targets.empty()) throw Error(name + ": no targets");
  for (const std::string& t : m.targets) {
    if (!IsRwkv7MatrixName(t)) {
      throw Error(name + ": unknown target '" + Printable(t, 64) + "'");
    }
  }
  return m;
}

void ExportTunedState(const std::string& dir, const ParamLayout& layout, const float* params,
                      const std::string& base_model) {
  LoadOptions options;
  options.load_mode = LoadMode::kMmap;
  const std::unique_ptr<Model> model = Model::Load(base_model, options);
  State state = model->NewState();
  const Rwkv7Config& c = layout.config();
  const size_t per_layer = state.data().size() / c.n_layer;
  if (per_layer * c.n_layer != state.data().size() ||
      per_layer != 2 * static_cast<size_t>(c.n_embd) + layout.entries()[0].size) {
    throw Error(base_model + ": its state layout is not the one the tuned state was trained in");
  }
  std::fill(state.data().begin(), state.data().end(), 0.0f);
  std::vector<PthTensor> tensors;
  TunedStateToSequence(layout, params, state.data().data());
  for (const ParamEntry& e : layout.entries()) tensors.push_back({e.name, e.pth_shape, params + e.offset});
  state.Save(dir + "/state.avstate");
  WritePth(dir + "/state.pth", tensors, PthWriteOptions{});
}

}  // namespace aviary::train
