// aviary synth: writes a model with random, well-scaled weights of any version and shape, for
// speed measurements at real release sizes (src/models/synth.h).
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "aviary/error.h"
#include "cli_common.h"
#include "formats/gguf_writer.h"
#include "formats/mapped_file.h"
#include "formats/output_file.h"
#include "formats/weight_file.h"
#include "models/synth.h"

namespace aviary::cli {
namespace {

DType ParseSynthType(std::string name) {
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (name == "fp32") name = "f32";
  if (name == "fp16") name = "f16";
  for (DType t : {DType::kF32, DType::kF16, DType::kQ8_0, DType::kQ6_K, DType::kQ5_K, DType::kQ5_1,
                  DType::kQ5_0, DType::kQ4_K, DType::kQ4_1, DType::kQ4_0}) {
    std::string n(DTypeName(t));
    std::transform(n.begin(), n.end(), n.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    if (n == name) return t;
  }
  throw UsageError("unknown type '" + name +
                   "' (choose one of f32, f16, q8_0, q6_k, q5_k, q5_1, q5_0, q4_k, q4_1, q4_0)");
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string Counts(const std::map<std::string, int>& types) {
  std::string s;
  for (const auto& [name, n] : types)
    s += (s.empty() ? "" : ", ") + name + " x" + std::to_string(n);
  return s;
}

}  // namespace

void RegisterSynth(CLI::App& app) {
  struct Options {
    std::string version = "7", type = "f16", output;
    int layers = 12, embd = 768, vocab = 65536, head_size = 64, ffn = 0;
    uint64_t seed = 1;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "synth", "Write a model with random, well-scaled weights (for speed measurements)");
  cmd->add_option("--version", o->version, "RWKV version: 4, 5.1, 5.2, 6 or 7")
      ->capture_default_str();
  cmd->add_option("--layers", o->layers, "Layers")->capture_default_str();
  cmd->add_option("--embd", o->embd, "Embedding width (a multiple of 32)")->capture_default_str();
  cmd->add_option("--vocab", o->vocab, "Vocabulary size")->capture_default_str();
  cmd->add_option("--head-size", o->head_size, "Head size (v5, v6, v7)")->capture_default_str();
  cmd->add_option("--ffn", o->ffn, "Channel-mix width (0: the release default)")
      ->capture_default_str();
  cmd->add_option(
         "--type", o->type,
         "f32, f16, q8_0, q5_1, q5_0, q4_1 or q4_0 (rwkv.cpp's type policy); q6_k, q5_k, q4_k "
         "(GGUF output only; rows that are no multiple of 256 fall back as in convert)")
      ->capture_default_str();
  cmd->add_option("--seed", o->seed, "Random seed")->capture_default_str()->check(SeedValidator());
  cmd->add_option("-o,--output", o->output,
                  "Output file: rwkv.cpp .bin, or GGUF when the name ends in .gguf")
      ->required();
  cmd->callback([o] {
    const auto start = std::chrono::steady_clock::now();
    SynthOptions s;
    s.arch = ParseArch(o->version);
    s.n_layer = o->layers;
    s.n_embd = o->embd;
    s.n_vocab = o->vocab;
    s.head_size = o->head_size;
    s.n_ffn = o->ffn;
    s.type = ParseSynthType(o->type);
    // rwkv.cpp's format has no K-quants: synthesize in F16, then quantize while writing GGUF.
    std::optional<DType> gguf_type;
    if (Traits(s.type).block_elems == kQKBlock) {
      if (!EndsWith(o->output, ".gguf")) {
        throw UsageError(std::string(DTypeName(s.type)) +
                         " needs GGUF output (a name ending in .gguf): "
                         "rwkv.cpp's .bin format has no K-quants");
      }
      gguf_type = s.type;
      s.type = DType::kF16;
    }
    s.seed = o->seed;
    if (o->output == "-") throw UsageError("synth writes a file, not stdout: give an output name");
    const bool gguf = EndsWith(o->output, ".gguf");
    // GGUF output is converted from an rwkv.cpp file written first beside it: both exist at
    // the end. Refused before anything is written when the disk cannot hold them.
    uint64_t need = 0;
    for (const SynthTensor& t : PlanSynthModel(s)) {
      int64_t n = 1;
      for (int64_t d : t.shape) n *= d;
      need += StorageBytes(t.type, n);
    }
    if (gguf) need *= 2;
    std::error_code ec;
    if (std::filesystem::is_directory(o->output, ec))
      throw UsageError(o->output + ": is a directory");
    const std::filesystem::path dir = std::filesystem::absolute(o->output, ec).parent_path();
    const std::filesystem::space_info space = std::filesystem::space(dir, ec);
    if (!ec && need > space.available) {
      throw Error(o->output + ": the model needs " + std::to_string(need >> 20) + " MiB but " +
                  dir.string() + " has " + std::to_string(space.available >> 20) + " MiB free");
    }

    OutputFile out(o->output);
    SynthReport report;
    uint64_t out_bytes = 0;
    std::string format = "rwkv.cpp ggmf v101";
    std::map<std::string, int> types;
    if (!gguf) {
      report = WriteSynthModel(s, out.temp_path());
      out_bytes = report.file_bytes;
      types = report.types;
    } else {
      // Through the GGUF writer, from an rwkv.cpp file (types kept; no tokenizer is embedded:
      // `aviary convert --tokenizer` adds one).
      OutputFile bin(o->output + ".bin");
      report = WriteSynthModel(s, bin.temp_path());
      auto file = std::make_shared<MappedFile>(bin.temp_path());
      WeightFile wf = ReadWeightFile(file->bytes(), bin.temp_path());
      wf.backing = file;
      const std::unique_ptr<Model> model = Model::LoadFromMemory(file->bytes(), bin.temp_path());
      GgufWriteOptions options;
      options.type = gguf_type;
      const GgufWriteReport g = WriteGguf(wf, model->info(), options, out.temp_path());
      out_bytes = g.file_bytes;
      types = g.types_out;
      format = "GGUF (" + g.architecture + ")";
    }  // `bin` is removed here, never committed
    LoadOptions check;
    check.load_mode = LoadMode::kMmap;    // touches the headers and small tensors only
    Model::Load(out.temp_path(), check);  // the result must load
    out.Commit();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("wrote %s: %s, RWKV %s, %d layers x %d, vocab %d, %.1f M parameters\n",
                o->output.c_str(), format.c_str(), std::string(ArchName(s.arch)).c_str(), s.n_layer,
                s.n_embd, s.n_vocab, report.n_params / 1e6);
    std::printf("types: %s; %llu bytes (%.1f MiB) in %.1f s\n", Counts(types).c_str(),
                static_cast<unsigned long long>(out_bytes), out_bytes / 1048576.0, seconds);
  });
}

}  // namespace aviary::cli
