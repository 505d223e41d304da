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
  int window = 0;  // > 0: loss by position within windows of this many predictions
  int bucket = 0;  // positions per row of the by-position table (0: window / 16)
  std::string positions_out;
};

// Negative log-probability of `target` under softmax(logits), computed in double.
double TokenLoss(std::span<const float> logits, int32_t target) {
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float l : logits) sum += std::exp(static_cast<double>(l) - max_logit);
  return std::log(sum) - (static_cast<double>(logits[target]) - max_logit);
}

// Loss by position: the text cut into consecutive windows of `window` + 1 tokens, each scored
// from the initial state, and the loss at each position averaged over the windows. A model
// trained on windows of T tokens shows how it does beyond position T; this is the measure
// of whether finetuning to a longer context worked.
void RunByPosition(const PerplexityOptions& o, const LoadedModel& m,
                   const std::vector<int32_t>& tokens) {
  const size_t W = static_cast<size_t>(o.window);
  const size_t windows = (tokens.size() - 1) / W;
  if (windows == 0) {
    throw Error(o.text + ": has " + std::to_string(tokens.size()) + " tokens, fewer than one " +
                "window of --window " + std::to_string(W) + " + 1");
  }
  const int bucket = o.bucket > 0 ? o.bucket : std::max(1, o.window / 16);
  const size_t V = m.model->info().n_vocab;
  constexpr size_t kChunk = 256;  // bounds the logits buffer for long windows
  std::vector<double> sum(W, 0.0);
  std::vector<float> logits;
  for (size_t w = 0; w < windows; ++w) {
    State state = m.model->NewState();
    const size_t first = w * W;
    for (size_t start = 0; start < W; start += kChunk) {
      const size_t n = std::min(kChunk, W - start);
      m.model->Eval(std::span(tokens).subspan(first + start, n), state, &logits, true);
      for (size_t i = 0; i < n; ++i) {
        const std::span<const float> row = std::span(logits).subspan(i * V, V);
        CheckFinite(row, first + start + i);
        sum[start + i] += TokenLoss(row, tokens[first + start + i + 1]);
      }
    }
  }
  std::printf("windows:      %zu of %zu predictions, each from the initial state\n", windows, W);
  double total = 0;
  for (double s : sum) total += s;
  std::printf("average loss: %.6f nats/token\n\n", total / static_cast<double>(windows * W));
  std::printf("%-15s %s\n", "positions", "loss");
  for (size_t p0 = 0; p0 < W; p0 += bucket) {
    const size_t p1 = std::min(W, p0 + bucket);
    double s = 0;
    for (size_t p = p0; p < p1; ++p) s += sum[p];
    char range[32];
    std::snprintf(range, sizeof range, "%zu-%zu", p0, p1 - 1);
    std::printf("%-15s %.4f\n", range, s / static_cast<double>((p1 - p0) * windows));
  }
  if (!o.positions_out.empty()) {
    std::FILE* f = std::fopen(o.positions_out.c_str(), "w");
    if (!f) throw Error(o.positions_out + ": cannot write");
    std::fprintf(f, "# position\tloss (mean over %zu windows)\n", windows);
    for (size_t p = 0; p < W; ++p) std::fprintf(f, "%zu\t%.6f\n", p, sum[p] / windows);
    if (std::fclose(f) != 0) throw Error(o.positions_out + ": write failed");
  }
}

void RunPerplexity(const PerplexityOptions& o) {
  if (o.max_tokens < 0) throw UsageError("--max-tokens must be >= 0");
  if (o.window < 0 || o.window > (1 << 24)) throw UsageError("--window must be 0..16777216");
  if (o.bucket < 0) throw UsageError("--bucket must be >= 0");
  if (o.window == 0 && (o.bucket > 0 || !o.positions_out.empty())) {
    throw UsageError("--bucket and --positions-out need --window");
  }
  const LoadedModel m = LoadModel(o.model, o.tokenizer);
  std::vector<int32_t> tokens = m.tokenizer->Encode(ReadFile(o.text));
  if (o.max_tokens > 0 && static_cast<int64_t>(tokens.size()) > o.max_tokens) {
    tokens.resize(o.max_tokens);
  }
  if (tokens.size() < 2) {
    throw Error(o.text + ": needs at least 2 tokens to measure perplexity (has " +
                std::to_string(tokens.size()) + ")");
  }
  if (o.window > 0) return RunByPosition(o, m, tokens);
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
  cmd->add_option("--window", o->window,
                  "Loss by position: score consecutive windows of N predictions, each from the "
                  "initial state, and print the mean loss per position range")
      ->capture_default_str();
  cmd->add_option("--bucket", o->bucket, "With --window: positions per table row (0 = N / 16)")
      ->capture_default_str();
  cmd->add_option("--positions-out", o->positions_out,
                  "With --window: write every position's mean loss (TSV) to this file");
  cmd->callback([o] { RunPerplexity(*o); });
}

}  // namespace aviary::cli
