// Pieces shared by the subcommands: loading a model with its tokenizer, reading inputs.
#pragma once

#include <CLI/CLI.hpp>

#include <memory>
#include <string>
#include <vector>

#include "aviary/model.h"
#include "aviary/tokenizer.h"

namespace aviary::cli {

struct LoadedModel {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;
};

LoadedModel LoadModel(const std::string& path);

// Reads a whole file as bytes; throws aviary::Error naming it.
std::string ReadFile(const std::string& path);

// The prompt from --prompt or --prompt-file (exactly one), tokenized; never empty.
std::vector<int32_t> PromptTokens(const Tokenizer& tokenizer, const std::string& prompt,
                                  const std::string& prompt_file);

// Adds --prompt / --prompt-file to a subcommand.
void AddPromptOptions(CLI::App* cmd, std::string* prompt, std::string* prompt_file);

// Each subcommand registers itself on the root app; its callback does the work.
void RegisterInfo(CLI::App& app);
void RegisterLogits(CLI::App& app);
void RegisterGenerate(CLI::App& app);
void RegisterPerplexity(CLI::App& app);

}  // namespace aviary::cli
