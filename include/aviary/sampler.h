// Logits -> token id.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <unordered_map>
#include <vector>

namespace aviary {

// Order of the filters.
//  kTemperatureFirst (default, `aviary generate`): softmax(logits / T), then top-p, then top-k.
//  kChatRwkv (ChatRWKV's PIPELINE.sample_logits, `aviary chat`): softmax(logits); top-p cut on
//    those probabilities (every token at least as likely as the one where the cumulative sum
//    reaches top_p is kept); then top-k; then temperature as probs^(1/T), renormalised.
//    Unlike ChatRWKV, a top_p the cumulative sum never reaches (rounding) keeps every token
//    instead of silently keeping only the most likely one.
enum class SamplingOrder { kTemperatureFirst, kChatRwkv };

struct SamplerOptions {
  float temperature = 1.0f;  // 0 = greedy argmax
  float top_p =
      1.0f;       // keep the smallest set of tokens whose probability sums to top_p; 0 = greedy
  int top_k = 0;  // 0 = off
  uint64_t seed = 0;
  SamplingOrder order = SamplingOrder::kTemperatureFirst;
  // Repetition penalties (GPT-3 style, as in ChatRWKV): before sampling, every token seen since
  // ResetPenalties() has its logit lowered by presence + count * frequency, where count is its
  // number of occurrences, each decayed by `penalty_decay` per sampled token. 0 = off.
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  float penalty_decay = 1.0f;          // in (0, 1]
  std::vector<int32_t> banned_tokens;  // never sampled
};

class Sampler {
 public:
  // Throws UsageError on an invalid option.
  explicit Sampler(const SamplerOptions& options);
  // Picks a token from `logits` (one row of n_vocab floats) after penalties and bans, and counts
  // it for the penalties. Throws aviary::Error if every token is banned.
  int32_t Sample(std::span<const float> logits);

  const SamplerOptions& options() const { return options_; }
  // Changes the options, keeping the random stream and the penalty counts; validates like the
  // constructor (nothing changes on error). The seed field is ignored: use Reseed.
  void SetOptions(const SamplerOptions& options);
  // Restarts the random stream as if constructed with `seed`.
  void Reseed(uint64_t seed);
  // Forgets the tokens counted for the penalties (start of a new reply).
  void ResetPenalties() { occurrence_.clear(); }
  // Decayed occurrence count per token since ResetPenalties().
  const std::unordered_map<int32_t, float>& occurrences() const { return occurrence_; }

 private:
  static void Validate(const SamplerOptions& options);
  int32_t SampleTemperatureFirst(std::span<const float> logits);
  int32_t SampleChatRwkv(std::span<const float> logits);
  void Count(int32_t token);

  SamplerOptions options_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> scratch_;
  std::vector<float> adjusted_;
  std::vector<std::pair<double, int32_t>> probs_;
  std::unordered_map<int32_t, float> occurrence_;
};

// Index of the largest logit (the first one on ties).
int32_t ArgMax(std::span<const float> logits);

}  // namespace aviary
