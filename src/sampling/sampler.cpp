#include "aviary/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "aviary/error.h"

namespace aviary {

int32_t ArgMax(std::span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

void Sampler::Validate(const SamplerOptions& options) {
  if (!(options.temperature >= 0.0f) || !std::isfinite(options.temperature)) {
    throw UsageError("temperature must be a finite number >= 0");
  }
  if (!(options.top_p >= 0.0f && options.top_p <= 1.0f)) {
    throw UsageError("top-p must be between 0 and 1");
  }
  if (options.top_k < 0) throw UsageError("top-k must be >= 0");
  if (!std::isfinite(options.presence_penalty) || !std::isfinite(options.frequency_penalty)) {
    throw UsageError("penalties must be finite numbers");
  }
  if (!(options.penalty_decay > 0.0f && options.penalty_decay <= 1.0f)) {
    throw UsageError("penalty decay must be in (0, 1]");
  }
  for (int32_t t : options.banned_tokens) {
    if (t < 0) throw UsageError("banned token ids must be >= 0");
  }
}

Sampler::Sampler(const SamplerOptions& options) : options_(options), rng_(options.seed) {
  Validate(options);
}

void Sampler::SetOptions(const SamplerOptions& options) {
  Validate(options);
  const uint64_t seed = options_.seed;
  options_ = options;
  options_.seed = seed;
}

void Sampler::Reseed(uint64_t seed) {
  options_.seed = seed;
  rng_.seed(seed);
}

void Sampler::Count(int32_t token) {
  if (options_.penalty_decay != 1.0f) {
    for (auto& [id, count] : occurrence_) count *= options_.penalty_decay;
  }
  occurrence_[token] += 1.0f;
}

int32_t Sampler::Sample(std::span<const float> logits) {
  if (logits.empty()) throw UsageError("no logits to sample from");
  // -infinity is a ban (chat bans tokens that way); NaN and +infinity are a broken model.
  for (size_t i = 0; i < logits.size(); ++i) {
    if (std::isnan(logits[i]) || logits[i] == std::numeric_limits<float>::infinity()) {
      throw Error(std::string("the model's logits are not finite (") +
                  (std::isnan(logits[i]) ? "NaN" : "infinity") + " for token id " +
                  std::to_string(i) + "): nothing can be sampled");
    }
  }
  // Penalties and bans on a copy: logit -= presence + count * frequency; banned = -inf.
  adjusted_.assign(logits.begin(), logits.end());
  const int32_t n = static_cast<int32_t>(adjusted_.size());
  if (options_.presence_penalty != 0.0f || options_.frequency_penalty != 0.0f) {
    for (const auto& [id, count] : occurrence_) {
      if (id < n) adjusted_[id] -= options_.presence_penalty + count * options_.frequency_penalty;
    }
  }
  for (int32_t id : options_.banned_tokens) {
    if (id < n) adjusted_[id] = -std::numeric_limits<float>::infinity();
  }
  const float max_logit = *std::max_element(adjusted_.begin(), adjusted_.end());
  if (!(max_logit > -std::numeric_limits<float>::infinity())) {
    throw Error("every token is banned: nothing left to sample");
  }
  int32_t token;
  if (options_.temperature == 0.0f || options_.top_p == 0.0f) {
    token = ArgMax(adjusted_);
  } else if (options_.order == SamplingOrder::kChatRwkv) {
    token = SampleChatRwkv(adjusted_);
  } else {
    token = SampleTemperatureFirst(adjusted_);
  }
  Count(token);
  return token;
}

int32_t Sampler::SampleTemperatureFirst(std::span<const float> logits) {
  // Softmax at temperature T (max subtracted for stability), sorted by probability.
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  scratch_.resize(logits.size());
  double total = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    const float p = std::exp((logits[i] - max_logit) / options_.temperature);
    scratch_[i] = {p, static_cast<int32_t>(i)};
    total += p;
  }
  std::sort(scratch_.begin(), scratch_.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  // Keep the smallest prefix whose mass reaches top_p (at least one token), then top-k.
  size_t keep = scratch_.size();
  if (options_.top_p < 1.0f) {
    double cum = 0;
    for (size_t i = 0; i < scratch_.size(); ++i) {
      cum += scratch_[i].first / total;
      if (cum >= options_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  if (options_.top_k > 0) keep = std::min<size_t>(keep, options_.top_k);
  // Tokens with probability 0 (banned) are never kept.
  while (keep > 1 && scratch_[keep - 1].first == 0.0f) --keep;
  double kept = 0;
  for (size_t i = 0; i < keep; ++i) kept += scratch_[i].first;
  const double u = std::uniform_real_distribution<double>(0.0, kept)(rng_);
  double cum = 0;
  for (size_t i = 0; i < keep; ++i) {
    cum += scratch_[i].first;
    if (u < cum) return scratch_[i].second;
  }
  return scratch_[keep - 1].second;
}

int32_t Sampler::SampleChatRwkv(std::span<const float> logits) {
  // probs = softmax(logits), in double, sorted most likely first (lower id first on ties).
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  probs_.resize(logits.size());
  double total = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    const double p = std::exp(static_cast<double>(logits[i]) - max_logit);
    probs_[i] = {p, static_cast<int32_t>(i)};
    total += p;
  }
  for (auto& [p, id] : probs_) p /= total;
  std::sort(probs_.begin(), probs_.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  // Top-p cut: the cutoff is the probability of the token where the cumulative sum first
  // reaches top_p; every token at least that likely stays (ties included, as in ChatRWKV). When
  // the sum never reaches top_p (top_p = 1 and rounding), every token stays.
  size_t keep = probs_.size();
  if (options_.top_p < 1.0f) {
    double cum = 0;
    for (size_t i = 0; i < probs_.size(); ++i) {
      cum += probs_[i].first;
      if (cum >= options_.top_p) {
        const double cutoff = probs_[i].first;
        keep = i + 1;
        while (keep < probs_.size() && probs_[keep].first >= cutoff) ++keep;
        break;
      }
    }
  }
  // Then top-k, then drop impossible (banned) tokens.
  if (options_.top_k > 0) keep = std::min<size_t>(keep, options_.top_k);
  while (keep > 1 && probs_[keep - 1].first == 0.0) --keep;
  // Temperature on the kept probabilities: p^(1/T), renormalised by the draw below.
  double kept = 0;
  const double inv_t = 1.0 / options_.temperature;
  for (size_t i = 0; i < keep; ++i) {
    if (options_.temperature != 1.0f) probs_[i].first = std::pow(probs_[i].first, inv_t);
    kept += probs_[i].first;
  }
  if (!(kept > 0.0)) return probs_[0].second;  // every kept power underflowed: the most likely
  const double u = std::uniform_real_distribution<double>(0.0, kept)(rng_);
  double cum = 0;
  for (size_t i = 0; i < keep; ++i) {
    cum += probs_[i].first;
    if (u < cum) return probs_[i].second;
  }
  return probs_[keep - 1].second;
}

}  // namespace aviary
