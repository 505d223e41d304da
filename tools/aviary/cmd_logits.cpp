// aviary logits: write the logits of a prompt as float32 little-endian rows of n_vocab.
#include <cstdio>
#include <cstring>
#include <bit>

#include "aviary/cache.h"
#include "aviary/error.h"
#include "aviary/sampler.h"
#include "cli_common.h"
#include "formats/output_file.h"

namespace aviary::cli {
namespace {

struct LogitsOptions {
  std::string model, tokenizer, prompt, prompt_file, output;
  bool all_positions = false;
  bool one_by_one = false;
};

void RunLogits(const LogitsOptions& o) {
  static_assert(std::endian::native == std::endian::little, "output is written as-is");
  const std::string model_path = ResolveModelArgument(o.model, Hub().cache_dir);
  RefuseOverwritingInputs(o.output, {model_path, o.tokenizer, o.prompt_file});
  const LoadedModel m = LoadModel(model_path, o.tokenizer);
  const std::vector<int32_t> tokens = PromptTokens(*m.tokenizer, o.prompt, o.prompt_file);
  const size_t V = m.model->info().n_vocab;
  State state = m.model->NewState();
  // Rows go to the output as they are computed, a chunk of tokens at a time, so that memory
  // does not grow with the prompt.
  constexpr size_t kChunk = 256;
  OutputFile out(o.output);
  std::vector<float> logits;
  size_t rows = 0;
  auto write_rows = [&](size_t n) {
    out.Write(logits.data(), n * V * sizeof(float));
    rows += n;
  };
  for (size_t start = 0; start < tokens.size();) {
    const size_t n = o.one_by_one ? 1 : std::min(kChunk, tokens.size() - start);
    const bool last = start + n == tokens.size();
    // Without --all-positions only the last token's row is written: the head runs once.
    std::vector<float>* out = o.all_positions || last ? &logits : nullptr;
    m.model->Eval(std::span(tokens).subspan(start, n), state, out, o.all_positions);
    start += n;
    if (o.all_positions) write_rows(n);
  }
  if (!o.all_positions) write_rows(1);
  out.Commit();
  const std::span<const float> last(logits.data() + logits.size() - V, V);
  std::fprintf(out.is_stdout() ? stderr : stdout,
               "%zu tokens, wrote %zu row(s) x %zu float32 to %s; last row argmax %d (%.4f)\n",
               tokens.size(), rows, V, out.is_stdout() ? "stdout" : o.output.c_str(), ArgMax(last),
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
  cmd->add_option("--output", o->output, "Output file (raw float32); - for stdout")->required();
  cmd->add_flag("--all-positions", o->all_positions, "One row per prompt token, not only the last");
  cmd->add_flag("--one-by-one", o->one_by_one,
                "Feed the prompt one token at a time instead of in sequence mode");
  cmd->callback([o] { RunLogits(*o); });
}

}  // namespace aviary::cli
