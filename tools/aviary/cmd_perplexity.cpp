// aviary perplexity: average next-token loss of a model on a text.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "aviary/error.h"
#include "cli_common.h"

namespace aviary::cli {
namespace {

struct PerplexityOptions {
  std::string model, tokenizer, text;
  int64_t max_tokens = 0;
};

// Negative log-probability of `target` under softmax(logits), computed in double.
double TokenLoss(std::span<const float> logits, int32_t target) {
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float l : logits) sum += std::exp(static_cast<double>(l) - max_logit);
  return std::log(sum) - (static_cast<double>(logits[target]) - max_logit);
}

void RunPerplexity(const PerplexityOptions& o) {
  if (o.max_tokens < 0) throw UsageError("--max-tokens must be >= 0");
  const LoadedModel m = LoadModel(o.model, o.tokenizer);
  std::vector<int32_t> tokens = m.tokenizer->Encode(ReadFile(o.text));
  if (o.max_tokens > 0 && static_cast<int64_t>(tokens.size()) > o.max_tokens) {
    tokens.resize(o.max_tokens);
  }
  if (tokens.size() < 2) {
    throw Error(o.text + ": needs at least 2 tokens to measure perplexity (has " +
                std::to_string(tokens.size()) + ")");
  }
  const size_t V = m.model->info().n_vocab;
  constexpr size_t kChunk = 256;  // bounds the logits buffer for long texts
  State state = m.model->NewState();
  std::vector<float> logits;
  double total = 0;
  const size_t predicted = tokens.size() - 1;
  for (size_t start = 0; start < predicted; start += kChunk) {
    const size_t n = std::min(kChunk, predicted - start);
    m.model->Eval(std::span(tokens).subspan(start, n), state, &logits, true);
    for (size_t i = 0; i < n; ++i) {
      const std::span<const float> row = std::span(logits).subspan(i * V, V);
      CheckFinite(row, start + i);
      total += TokenLoss(row, tokens[start + i + 1]);
    }
  }
  const double loss = total / predicted;
  std::printf("tokens:       %zu\n", tokens.size());
  std::printf("predicted:    %zu\n", predicted);
  std::printf("average loss: %.6f nats/token\n", loss);
  std::printf("perplexity:   %.4f\n", std::exp(loss));
}

}  // namespace

void RegisterPerplexity(CLI::App& app) {
  auto o = std::make_shared<PerplexityOptions>();
  CLI::App* cmd =
      app.add_subcommand("perplexity", "Average loss and perplexity of the model on a text file");
  AddModelOptions(cmd, &o->model, &o->tokenizer);
  AddRuntimeOptions(cmd);
  cmd->add_option("--text", o->text, "Text file (- for stdin)")->required();
  cmd->add_option("--max-tokens", o->max_tokens, "Use only the first N tokens (0 = all)")
      ->capture_default_str();
  cmd->callback([o] { RunPerplexity(*o); });
}

}  // namespace aviary::cli
