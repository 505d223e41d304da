// aviary convert IN OUT [--type T] [--tokenizer FILE] and aviary quantize IN OUT TYPE:
// any model file aviary reads -> GGUF (docs/GGUF.md), written to OUT.tmp and renamed.

#include <algorithm>
#include <chrono>
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
#include "tokenizers/tokenizers.h"

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
}

}  // namespace aviary::cli
