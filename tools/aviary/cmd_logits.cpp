// aviary logits: write the logits of a prompt as float32 little-endian rows of n_vocab.
#include <cstdio>
#include <cstring>
#include <bit>
#include <fstream>

#include "aviary/error.h"
#include "aviary/sampler.h"
#include "cli_common.h"

namespace aviary::cli {
namespace {

struct LogitsOptions {
  std::string model, tokenizer, prompt, prompt_file, output;
  bool all_positions = false;
  bool one_by_one = false;
};

void RunLogits(const LogitsOptions& o) {
  static_assert(std::endian::native == std::endian::little, "output is written as-is");
  const LoadedModel m = LoadModel(o.model, o.tokenizer);
  const std::vector<int32_t> tokens = PromptTokens(*m.tokenizer, o.prompt, o.prompt_file);
  const size_t V = m.model->info().n_vocab;
  State state = m.model->NewState();
  std::vector<float> logits;
  if (o.one_by_one) {
    std::vector<float> row;
    for (int32_t t : tokens) {
      m.model->Eval({&t, 1}, state, &row);
      if (o.all_positions) logits.insert(logits.end(), row.begin(), row.end());
    }
    if (!o.all_positions) logits = row;
  } else {
    m.model->Eval(tokens, state, &logits, o.all_positions);
  }
  std::ofstream out(o.output, std::ios::binary | std::ios::trunc);
  if (!out) throw Error(o.output + ": cannot open for writing");
  out.write(reinterpret_cast<const char*>(logits.data()),
            static_cast<std::streamsize>(logits.size() * sizeof(float)));
  out.close();
  if (!out) throw Error(o.output + ": write failed");
  const std::span<const float> last(logits.data() + logits.size() - V, V);
  std::printf("%zu tokens, wrote %zu row(s) x %zu float32 to %s; last row argmax %d (%.4f)\n",
              tokens.size(), logits.size() / V, V, o.output.c_str(), ArgMax(last),
              last[ArgMax(last)]);
}

}  // namespace

void RegisterLogits(CLI::App& app) {
  auto o = std::make_shared<LogitsOptions>();
  CLI::App* cmd = app.add_subcommand(
      "logits", "Write the logits after a prompt as float32 little-endian rows of n_vocab");
  AddModelOptions(cmd, &o->model, &o->tokenizer);
  AddRuntimeOptions(cmd);
  AddPromptOptions(cmd, &o->prompt, &o->prompt_file);
  cmd->add_option("--output", o->output, "Output file (raw float32)")->required();
  cmd->add_flag("--all-positions", o->all_positions, "One row per prompt token, not only the last");
  cmd->add_flag("--one-by-one", o->one_by_one,
                "Feed the prompt one token at a time instead of in sequence mode");
  cmd->callback([o] { RunLogits(*o); });
}

}  // namespace aviary::cli
