// aviary generate: stream a continuation of the prompt to stdout as it is produced.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <random>

#include "aviary/error.h"
#include "aviary/sampler.h"
#include "cli_common.h"

namespace aviary::cli {
namespace {

struct GenerateOptions {
  std::string model, tokenizer, prompt, prompt_file;
  int tokens = 128;
  float temperature = 1.0f;
  float top_p = 0.85f;
  int top_k = 0;
  uint64_t seed = 0;
  bool seed_given = false;
  bool verbose = false;
};

void RunGenerate(const GenerateOptions& o) {
  if (o.tokens < 0) throw UsageError("--tokens must be >= 0");
  SamplerOptions so;
  so.temperature = o.temperature;
  so.top_p = o.top_p;
  so.top_k = o.top_k;
  so.seed = o.seed_given ? o.seed : std::random_device{}();
  Sampler sampler(so);  // validates the options before the model loads
  const LoadedModel m = LoadModel(o.model, o.tokenizer);
  const std::vector<int32_t> prompt = PromptTokens(*m.tokenizer, o.prompt, o.prompt_file);
  if (o.verbose) {
    const ModelInfo& i = m.model->info();
    std::fprintf(stderr, "model: RWKV %s, %d layers x %d, %s, tokenizer %s; seed %llu\n",
                 std::string(ArchName(i.arch)).c_str(), i.n_layer, i.n_embd, i.main_type.c_str(),
                 m.tokenizer->name().c_str(), static_cast<unsigned long long>(so.seed));
  }
  State state = m.model->NewState();
  std::vector<float> logits;
  const auto t0 = std::chrono::steady_clock::now();
  m.model->Eval(prompt, state, &logits);
  const auto t1 = std::chrono::steady_clock::now();
  Utf8Stream text;
  bool ends_with_newline = true;
  auto write = [&](const std::string& bytes) {
    if (bytes.empty()) return;
    std::fwrite(bytes.data(), 1, bytes.size(), stdout);
    CheckStdout();  // stop at once when nobody can read the text
    ends_with_newline = bytes.back() == '\n';
  };
  for (int i = 0; i < o.tokens; ++i) {
    CheckFinite(logits, prompt.size() + i - 1);
    const int32_t token = sampler.Sample(logits);
    write(text.Push(m.tokenizer->Decode({&token, 1})));
    if (i + 1 < o.tokens) m.model->Eval({&token, 1}, state, &logits);
  }
  write(text.Flush());
  // On a terminal the shell prompt would follow the text on its last line.
  if (!ends_with_newline && ::isatty(STDOUT_FILENO)) write("\n");
  if (o.verbose) {
    const auto t2 = std::chrono::steady_clock::now();
    const double prompt_s = std::chrono::duration<double>(t1 - t0).count();
    const double gen_s = std::chrono::duration<double>(t2 - t1).count();
    std::fprintf(stderr, "\nprompt: %zu tokens, %.1f tok/s; generated: %d tokens, %.1f tok/s\n",
                 prompt.size(), prompt.size() / prompt_s, o.tokens, o.tokens / gen_s);
  }
}

}  // namespace

void RegisterGenerate(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* cmd = app.add_subcommand("generate", "Continue a prompt, streaming text to stdout");
  AddModelOptions(cmd, &o->model, &o->tokenizer);
  AddRuntimeOptions(cmd);
  AddPromptOptions(cmd, &o->prompt, &o->prompt_file);
  cmd->add_option("--tokens", o->tokens, "Tokens to generate")->capture_default_str();
  cmd->add_option("--temperature", o->temperature, "Sampling temperature; 0 = greedy argmax")
      ->capture_default_str();
  cmd->add_option("--top-p", o->top_p,
                  "Nucleus sampling: keep the most likely tokens up to this probability mass")
      ->capture_default_str();
  cmd->add_option("--top-k", o->top_k, "Keep only the k most likely tokens (0 = off)")
      ->capture_default_str();
  cmd->add_option_function<uint64_t>(
         "--seed", [o](uint64_t s) { o->seed = s, o->seed_given = true; },
         "Random seed for an exact repeat (default: random)")
      ->check(SeedValidator());
  cmd->add_flag("-v,--verbose", o->verbose, "Print the model, seed and speed on stderr");
  cmd->callback([o] { RunGenerate(*o); });
}

}  // namespace aviary::cli
