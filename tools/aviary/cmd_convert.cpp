// aviary convert IN OUT [--type T] [--tokenizer FILE] and aviary quantize IN OUT TYPE:
// any model file aviary reads -> GGUF (docs/GGUF.md), written to OUT.tmp and renamed.
// aviary merge-lora BASE ADAPTER OUT [--type T]: an RWKV-7 model with a LoRA adapter of
// `aviary train --tune lora` folded in (W + alpha / R B A), as GGUF the same way.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "aviary/cache.h"
#include "aviary/error.h"
#include "cli_common.h"
#include "formats/gguf_writer.h"
#include "formats/mapped_file.h"
#include "formats/output_file.h"
#include "formats/weight_file.h"
#include "tensor/dtype.h"
#include "tokenizers/tokenizers.h"
#include "train/export.h"

namespace aviary::cli {
namespace {

constexpr const char* kTypes = "f32, f16, bf16, q8_0, q6_k, q5_k, q5_1, q5_0, q4_k, q4_1, q4_0";

struct ConvertOptions {
  std::string in, out, type, tokenizer;
};

DType ParseType(std::string name) {
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kQ8_0, DType::kQ6_K, DType::kQ5_K,
                  DType::kQ5_1, DType::kQ5_0, DType::kQ4_K, DType::kQ4_1, DType::kQ4_0}) {
    std::string n(DTypeName(t));
    std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return std::tolower(c); });
    if (n == name) return t;
  }
  throw UsageError("unknown type '" + name + "' (choose one of " + kTypes + ")");
}

// A tokenizer file as data: a Hugging Face tokenizer.json starts with '{', anything else is
// read as a World vocabulary.
TokenizerData ReadTokenizerFile(const std::string& path) {
  LoadTokenizer(path);  // a vocabulary aviary could not use is refused now, naming the file
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open tokenizer file");
  char first = 0;
  in >> first;
  return first == '{' ? ReadTokenizerJson(path) : ReadWorldVocab(path);
}

// The vocabulary to embed: --tokenizer, else the one in the file, else the one aviary would
// pick for this vocabulary size (as TokenizerForModel does).
std::shared_ptr<const TokenizerData> ChooseTokenizer(const ModelInfo& info, const WeightFile& wf,
                                                     const std::string& path, std::string* source) {
  if (!path.empty()) {
    *source = path;
    return std::make_shared<TokenizerData>(ReadTokenizerFile(path));
  }
  if (wf.tokenizer) {
    *source = "from the input file";
    return wf.tokenizer;
  }
  if (info.n_vocab == 256) {
    auto bytes = std::make_shared<TokenizerData>();
    bytes->kind = "bytes";
    for (int i = 0; i < 256; ++i) bytes->tokens.emplace_back(1, static_cast<char>(i));
    *source = "byte vocabulary (token = byte)";
    return bytes;
  }
  const bool world = info.n_vocab == 65536;
  const bool neox = info.n_vocab == 50277 || info.n_vocab == 50304;
  if (!world && !neox) {
    throw Error(info.path + ": no tokenizer known for a vocabulary of " +
                std::to_string(info.n_vocab) + " tokens; give one with --tokenizer FILE");
  }
  const std::string file = world ? "rwkv_vocab_v20230424.txt" : "20B_tokenizer.json";
  std::error_code ec;
  std::optional<std::string> found;
  const std::filesystem::path beside = std::filesystem::path(info.path).parent_path() / file;
  if (std::filesystem::is_regular_file(beside, ec)) found = beside.string();
  if (!found) found = FindInCache(file, Hub().cache_dir);
  if (!found) {
    throw Error(info.path + ": needs the " + std::string(world ? "World" : "GPT-NeoX") +
                " vocabulary " + file +
                " to embed in the GGUF file; put it next to the model, in " + Hub().cache_dir +
                " (aviary pull does), or give --tokenizer FILE");
  }
  *source = *found;
  return std::make_shared<TokenizerData>(ReadTokenizerFile(*found));
}

std::string TypeCounts(const std::map<std::string, int>& counts) {
  std::string s;
  for (const auto& [name, n] : counts)
    s += (s.empty() ? "" : ", ") + name + " x" + std::to_string(n);
  return s;
}

void RunConvert(const ConvertOptions& o) {
  const auto start = std::chrono::steady_clock::now();
  std::optional<DType> type;
  if (!o.type.empty()) type = ParseType(o.type);
  const std::string in = ResolveModelArgument(o.in, Hub().cache_dir);
  RefuseOverwritingInputs(o.out, {in, o.tokenizer});
  if (o.out == "-") throw UsageError("convert writes a file, not stdout: give an output name");
  std::error_code ec;
  if (std::filesystem::is_directory(o.out, ec)) throw UsageError(o.out + ": is a directory");

  // Every tensor is read once, so the input is mapped whatever AVIARY_LOAD says: reading it
  // into anonymous memory would hold a second copy of the model for nothing.
  auto file = std::make_shared<MappedFile>(in, LoadMode::kMmap);
  WeightFile wf = ReadWeightFile(file->bytes(), in);
  wf.backing = file;
  // Loading checks every name and shape and tells the architecture and sizes.
  const std::unique_ptr<Model> model = Model::LoadFromMemory(file->bytes(), in);
  const ModelInfo& info = model->info();

  GgufWriteOptions options;
  options.type = type;
  std::string tokenizer_source;
  options.tokenizer = ChooseTokenizer(info, wf, o.tokenizer, &tokenizer_source);

  OutputFile out(o.out);
  const GgufWriteReport report = WriteGguf(wf, info, options, out.temp_path());
  LoadOptions check;
  check.load_mode = LoadMode::kMmap;    // touches the headers and small tensors only
  Model::Load(out.temp_path(), check);  // the result must load
  out.Commit();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double in_mib = info.file_size / 1048576.0, out_mib = report.file_bytes / 1048576.0;
  std::printf("input:     %s (%s, RWKV %s)\n", in.c_str(), info.format.c_str(),
              std::string(ArchName(info.arch)).c_str());
  std::printf("output:    %s (GGUF v3, architecture %s)\n", o.out.c_str(),
              report.architecture.c_str());
  std::printf("types:     %s -> %s\n", TypeCounts(report.types_in).c_str(),
              TypeCounts(report.types_out).c_str());
  std::printf("tensors:   %zu -> %d\n", wf.tensors.size(), report.tensors_out);
  std::printf("size:      %llu -> %llu bytes (%.2f MiB -> %.2f MiB, %.1f%%)\n",
              static_cast<unsigned long long>(info.file_size),
              static_cast<unsigned long long>(report.file_bytes), in_mib, out_mib,
              100.0 * report.file_bytes / std::max<uint64_t>(1, info.file_size));
  std::printf("tokenizer: %s, %zu tokens (%s)\n", options.tokenizer->kind.c_str(),
              options.tokenizer->tokens.size(), tokenizer_source.c_str());
  for (const std::string& note : report.notes) std::printf("note:      %s\n", note.c_str());
  std::printf("time:      %.2f s\n", seconds);
}

struct MergeOptions {
  std::string base, adapter, out, type, tokenizer;
};

std::string AdapterJsonPath(const std::string& adapter) {
  const std::filesystem::path p(adapter);
  return (p.parent_path() / (p.stem().string() + ".json")).string();
}

void RunMergeLora(const MergeOptions& o) {
  const auto start = std::chrono::steady_clock::now();
  const std::string base = ResolveModelArgument(o.base, Hub().cache_dir);
  const std::string meta_path = AdapterJsonPath(o.adapter);
  RefuseOverwritingInputs(o.out, {base, o.adapter, meta_path, o.tokenizer});
  std::error_code ec;
  if (std::filesystem::is_directory(o.out, ec)) throw UsageError(o.out + ": is a directory");

  // adapter.json: rank, alpha, targets and the shape of the model the adapter was trained on.
  std::ifstream in(meta_path, std::ios::binary);
  if (!in) {
    throw Error(meta_path +
                ": cannot read the adapter's description (written beside adapter.pth by aviary "
                "train --tune lora)");
  }
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const train::LoraAdapterMeta meta = train::ParseLoraAdapterMeta(text, meta_path);
  const int rank = meta.rank, n_layer = meta.n_layer, n_embd = meta.n_embd, n_ffn = meta.n_ffn;
  const double alpha = meta.alpha;
  const std::vector<std::string>& targets = meta.targets;

  auto file = std::make_shared<MappedFile>(base, LoadMode::kMmap);
  WeightFile wf = ReadWeightFile(file->bytes(), base);
  wf.backing = file;
  const std::unique_ptr<Model> model = Model::LoadFromMemory(file->bytes(), base);
  const ModelInfo& info = model->info();
  if (info.arch != Arch::kV7) throw Error(base + ": merge-lora works on RWKV-7 models");
  if (info.n_layer != n_layer || info.n_embd != n_embd || info.n_ffn != n_ffn) {
    throw Error(o.adapter + ": the adapter is for a model of " + std::to_string(n_layer) +
                " layers x " + std::to_string(n_embd) + " (channel mix " + std::to_string(n_ffn) +
                "), " + base + " has " + std::to_string(info.n_layer) + " x " +
                std::to_string(info.n_embd) + " (" + std::to_string(info.n_ffn) + ")");
  }
  if (meta.base_fingerprint != info.fingerprint) {
    std::fprintf(stderr,
                 "note: %s is not the file the adapter was trained on (%s); merging anyway\n",
                 base.c_str(), meta.base_model.empty() ? "?" : meta.base_model.c_str());
  }

  auto adapter_file = std::make_shared<MappedFile>(o.adapter, LoadMode::kMmap);
  const WeightFile adapter = ReadPthRaw(adapter_file->bytes(), o.adapter);
  const float scale = static_cast<float>(alpha / rank);
  int merged = 0;
  for (int l = 0; l < n_layer; ++l) {
    for (const std::string& target : targets) {
      const std::string prefix = "blocks." + std::to_string(l) + "." + target;
      const auto w_it = wf.tensors.find(prefix + ".weight");
      if (w_it == wf.tensors.end()) throw Error(base + ": no tensor '" + prefix + ".weight'");
      Tensor& w = w_it->second;
      const Tensor* a = adapter.Find(prefix + ".lora_A");
      const Tensor* b = adapter.Find(prefix + ".lora_B");
      if (!a || !b) throw Error(o.adapter + ": missing '" + prefix + ".lora_A' or '.lora_B'");
      const int64_t rows = w.rows(), cols = w.cols();
      if (a->rows() != rank || a->cols() != cols || b->rows() != rows || b->cols() != rank) {
        throw Error(o.adapter + ": '" + prefix + "' adapters of shape [" +
                    std::to_string(a->rows()) + ", " + std::to_string(a->cols()) + "] and [" +
                    std::to_string(b->rows()) + ", " + std::to_string(b->cols()) +
                    "] do not fit its [" + std::to_string(rows) + ", " + std::to_string(cols) +
                    "] matrix at rank " + std::to_string(rank));
      }
      // W' = W + scale B A, in float; the writer gives it the output type.
      std::vector<float> fa(rank * cols), fb(rows * rank);
      for (int64_t r = 0; r < rank; ++r) DequantizeRow(a->type, a->row(r), &fa[r * cols], cols);
      for (int64_t r = 0; r < rows; ++r) DequantizeRow(b->type, b->row(r), &fb[r * rank], rank);
      std::vector<uint8_t>& bytes = wf.owned.emplace_back(rows * cols * sizeof(float));
      float* out = reinterpret_cast<float*>(bytes.data());
      for (int64_t i = 0; i < rows; ++i) {
        float* row = out + i * cols;
        DequantizeRow(w.type, w.row(i), row, cols);
        for (int64_t r = 0; r < rank; ++r) {
          const float bs = scale * fb[i * rank + r];
          const float* arow = &fa[r * cols];
          for (int64_t j = 0; j < cols; ++j) row[j] += bs * arow[j];
        }
      }
      w.type = DType::kF32;
      w.data = bytes.data();
      w.nbytes = bytes.size();
      ++merged;
    }
  }

  GgufWriteOptions options;
  // The merged matrices are float: give them (and the rest) the base's main type again unless
  // --type says otherwise.
  if (!o.type.empty()) {
    options.type = ParseType(o.type);
  } else {
    try {
      options.type = ParseType(info.main_type);
    } catch (const UsageError&) {
      options.type = DType::kF32;  // a header type that is no single weight type
    }
  }
  std::string tokenizer_source;
  options.tokenizer = ChooseTokenizer(info, wf, o.tokenizer, &tokenizer_source);
  OutputFile out(o.out);
  const GgufWriteReport report = WriteGguf(wf, info, options, out.temp_path());
  LoadOptions check;
  check.load_mode = LoadMode::kMmap;
  Model::Load(out.temp_path(), check);
  out.Commit();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("merged %d matrices (rank %d, alpha %g, scale %g) into %s\n", merged, rank, alpha,
              scale, o.out.c_str());
  std::printf("types:     %s -> %s\n", TypeCounts(report.types_in).c_str(),
              TypeCounts(report.types_out).c_str());
  std::printf("time:      %.2f s\n", seconds);
}

}  // namespace

void RegisterConvert(CLI::App& app) {
  auto c = std::make_shared<ConvertOptions>();
  CLI::App* convert = app.add_subcommand(
      "convert", "Convert a model file (rwkv.cpp .bin, .pth, safetensors, GGUF) to GGUF");
  convert->add_option("IN", c->in, "Input model file")->required();
  convert->add_option("OUT", c->out, "Output GGUF file (written as OUT.tmp, then renamed)")
      ->required();
  convert->add_option("--type", c->type,
                      std::string("Weight type of the large matrices: ") + kTypes +
                          " (default: keep each tensor's type)");
  convert->add_option("--tokenizer", c->tokenizer,
                      "Tokenizer to embed (World rwkv_vocab_*.txt or tokenizer.json); default: "
                      "the input's, else chosen from the vocabulary size");
  convert->callback([c] { RunConvert(*c); });

  auto q = std::make_shared<ConvertOptions>();
  CLI::App* quantize = app.add_subcommand(
      "quantize", "Shorthand for convert IN OUT --type TYPE (see docs/GGUF.md for what is kept)");
  quantize->add_option("IN", q->in, "Input model file")->required();
  quantize->add_option("OUT", q->out, "Output GGUF file")->required();
  quantize->add_option("TYPE", q->type, kTypes)->required();
  quantize->add_option("--tokenizer", q->tokenizer, "Tokenizer to embed (as for convert)");
  quantize->callback([q] { RunConvert(*q); });

  auto m = std::make_shared<MergeOptions>();
  CLI::App* merge = app.add_subcommand(
      "merge-lora",
      "Fold a LoRA adapter (aviary train --tune lora) into its RWKV-7 base: an ordinary GGUF");
  merge->add_option("BASE", m->base, "The base model the adapter was trained on")->required();
  merge->add_option("ADAPTER", m->adapter, "adapter.pth (adapter.json beside it)")->required();
  merge->add_option("OUT", m->out, "Output GGUF file (written as OUT.tmp, then renamed)")
      ->required();
  merge->add_option("--type", m->type,
                    std::string("Weight type of the large matrices: ") + kTypes +
                        " (default: the base's main type)");
  merge->add_option("--tokenizer", m->tokenizer, "Tokenizer to embed (as for convert)");
  merge->callback([m] { RunMergeLora(*m); });
}

}  // namespace aviary::cli
