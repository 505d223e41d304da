// Pieces shared by the subcommands: loading a model with its tokenizer, reading inputs.
#pragma once

#include <CLI/CLI.hpp>

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "aviary/cache.h"
#include "aviary/model.h"
#include "aviary/runtime.h"
#include "aviary/tokenizer.h"

namespace aviary::cli {

struct LoadedModel {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;
};

// `model_arg` may be a path, or a catalog/file name resolved from the cache (aviary pull);
// `tokenizer_path` overrides the tokenizer chosen for the model when non-empty. The model runs
// with ModelLoadOptions().
LoadedModel LoadModel(const std::string& model_arg, const std::string& tokenizer_path = "");

// Adds --threads, --kernels, --activations and --load to a subcommand that runs a model. Each
// wins over its environment variable (environment.h). One subcommand runs per process, so the
// values are kept here for ModelLoadOptions.
void AddRuntimeOptions(CLI::App* cmd);
// A new Runtime and the load mode from those flags, else the environment, else the defaults.
LoadOptions ModelLoadOptions();
// The cache folder and endpoints (environment.h).
const HubSettings& Hub();

// Adds --model FILE (required) and --tokenizer FILE to a subcommand.
void AddModelOptions(CLI::App* cmd, std::string* model, std::string* tokenizer);

// Reads a whole file as bytes ("-": stdin); throws aviary::Error naming it.
std::string ReadFile(const std::string& path);

// The prompt from --prompt or --prompt-file (exactly one), tokenized; never empty.
std::vector<int32_t> PromptTokens(const Tokenizer& tokenizer, const std::string& prompt,
                                  const std::string& prompt_file);

// Throws Error when a write to stdout has failed (a full disk, a closed pipe): the output is
// incomplete. main checks once at the end; commands that stream check as they go.
void CheckStdout();

// Throws Error naming the position when `logits` hold a NaN or an infinity: the model's
// output at token `position` (from 0) is not a number, whatever is done with it next.
void CheckFinite(std::span<const float> logits, size_t position);

// Checks a --seed value: a whole number from 0 to 2^64 - 1 (no sign, no wrapping, no clamping).
CLI::Validator SeedValidator();

// Adds --prompt / --prompt-file to a subcommand.
void AddPromptOptions(CLI::App* cmd, std::string* prompt, std::string* prompt_file);

// Each subcommand registers itself on the root app; its callback does the work.
void RegisterInfo(CLI::App& app);
void RegisterLogits(CLI::App& app);
void RegisterGenerate(CLI::App& app);
void RegisterPerplexity(CLI::App& app);
void RegisterTokenize(CLI::App& app);  // cmd_tokenize.cpp: tokenize and detokenize
void RegisterConvert(CLI::App& app);   // cmd_convert.cpp: convert and quantize
void RegisterPull(CLI::App& app);      // cmd_pull.cpp
void RegisterBench(CLI::App& app);     // cmd_bench.cpp: speed and memory
void RegisterSynth(CLI::App& app);     // cmd_synth.cpp: random models of real sizes
void RegisterChat(CLI::App& app);      // cmd_chat.cpp
void RegisterTrain(CLI::App& app);     // cmd_train.cpp: training and its loss plot
void RegisterEstimate(CLI::App& app);  // cmd_estimate.cpp: what training would cost
void RegisterServe(CLI::App& app);     // cmd_serve.cpp: the OpenAI-compatible server

}  // namespace aviary::cli
