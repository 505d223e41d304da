#include "cli_common.h"

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sys/stat.h>

#include "aviary/cache.h"
#include "aviary/error.h"
#include "environment.h"

namespace aviary::cli {

namespace {

// The flags AddRuntimeOptions adds; empty or 0 = not given.
struct RuntimeFlags {
  int threads = 0;
  std::string kernels, activations, load;
};

RuntimeFlags& Flags() {
  static RuntimeFlags flags;
  return flags;
}

}  // namespace

LoadedModel LoadModel(const std::string& model_arg, const std::string& tokenizer_path) {
  LoadedModel m;
  m.model = Model::Load(ResolveModelArgument(model_arg, Hub().cache_dir), ModelLoadOptions());
  m.tokenizer = TokenizerForModel(m.model->info(), tokenizer_path, Hub().cache_dir);
  return m;
}

void AddRuntimeOptions(CLI::App* cmd) {
  RuntimeFlags& f = Flags();
  cmd->add_option("--threads", f.threads,
                  "Threads that run the model (default: $AVIARY_THREADS, else the hardware "
                  "threads)")
      ->check(CLI::Range(1, 1024));
  cmd->add_option("--kernels", f.kernels,
                  "fast (SIMD) or reference (scalar) kernels (default: $AVIARY_KERNELS, else fast)")
      ->check(CLI::IsMember({"fast", "reference"}));
  cmd->add_option("--activations", f.activations,
                  "auto, int8 or f32: rounded activations where the CPU has them (default: "
                  "$AVIARY_ACTIVATIONS, else auto)")
      ->check(CLI::IsMember({"auto", "int8", "f32"}));
  cmd->add_option("--load", f.load,
                  "auto, mmap or read: how the model file is held (default: $AVIARY_LOAD, else "
                  "auto: read into huge pages from 512 MiB)")
      ->check(CLI::IsMember({"auto", "mmap", "read"}));
}

LoadOptions ModelLoadOptions() {
  const RuntimeFlags& f = Flags();
  const Environment& env = ProcessEnvironment();
  RuntimeOptions r;
  r.threads = f.threads > 0 ? f.threads : env.threads.value_or(0);
  r.kernels = !f.kernels.empty() ? ParseKernels(f.kernels, "--kernels")
                                 : env.kernels.value_or(Kernels::kFast);
  r.activations = !f.activations.empty() ? ParseActivations(f.activations, "--activations")
                                         : env.activations.value_or(Activations::kAuto);
  LoadOptions options;
  options.load_mode =
      !f.load.empty() ? ParseLoadMode(f.load, "--load") : env.load_mode.value_or(LoadMode::kAuto);
  options.runtime = std::make_shared<Runtime>(r);
  return options;
}

const HubSettings& Hub() { return ProcessEnvironment().hub; }

void AddModelOptions(CLI::App* cmd, std::string* model, std::string* tokenizer) {
  cmd->add_option("--model", *model, "Model file (or a name pulled into the cache)")->required();
  cmd->add_option("--tokenizer", *tokenizer,
                  "Tokenizer file (World rwkv_vocab_*.txt or tokenizer.json); default: chosen "
                  "from the model");
}

std::string ReadFile(const std::string& path) {
  if (path == "-") {
    std::string bytes((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    if (std::cin.bad()) throw Error("stdin: read error");
    return bytes;
  }
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    throw Error(path + ": is a directory");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw Error(path + ": read error");
  return bytes;
}

std::vector<int32_t> PromptTokens(const Tokenizer& tokenizer, const std::string& prompt,
                                  const std::string& prompt_file) {
  if (!prompt.empty() && !prompt_file.empty()) {
    throw UsageError("give either --prompt or --prompt-file, not both");
  }
  const std::string text = prompt_file.empty() ? prompt : ReadFile(prompt_file);
  if (text.empty())
    throw UsageError("the prompt is empty (give --prompt TEXT or --prompt-file FILE)");
  return tokenizer.Encode(text);
}

void CheckStdout() {
  errno = 0;
  if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
    const int err = errno;
    throw Error(std::string("cannot write to stdout") +
                (err ? ": " + std::string(std::strerror(err)) : ""));
  }
}

void CheckFinite(std::span<const float> logits, size_t position) {
  for (size_t i = 0; i < logits.size(); ++i) {
    if (!std::isfinite(logits[i])) {
      throw Error("the model's logits are not finite at token " + std::to_string(position) + " (" +
                  (std::isnan(logits[i]) ? "NaN" : "infinity") + " for token id " +
                  std::to_string(i) + "): the weights or the input overflow");
    }
  }
}

CLI::Validator SeedValidator() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        uint64_t value = 0;
        const char* end = text.data() + text.size();
        const auto [p, ec] = std::from_chars(text.data(), end, value);
        if (text.empty() || ec != std::errc() || p != end) {
          return "the seed must be a whole number from 0 to 18446744073709551615, not '" +
                 text.substr(0, 40) + "'";
        }
        return "";
      },
      "0..2^64-1");
}

void AddPromptOptions(CLI::App* cmd, std::string* prompt, std::string* prompt_file) {
  cmd->add_option("--prompt", *prompt, "Prompt text (raw bytes: UTF-8, tabs, newlines as given)");
  cmd->add_option("--prompt-file", *prompt_file,
                  "Read the prompt from a file instead (- for stdin)");
}

}  // namespace aviary::cli
