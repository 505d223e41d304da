#include "aviary/sampler.h"

#include <algorithm>
#include <cmath>

#include "aviary/error.h"

namespace aviary {

int32_t ArgMax(std::span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

Sampler::Sampler(const SamplerOptions& options) : options_(options), rng_(options.seed) {
  if (!(options.temperature >= 0.0f) || !std::isfinite(options.temperature)) {
    throw UsageError("temperature must be a finite number >= 0");
  }
  if (!(options.top_p >= 0.0f && options.top_p <= 1.0f)) {
    throw UsageError("top-p must be between 0 and 1");
  }
  if (options.top_k < 0) throw UsageError("top-k must be >= 0");
}

int32_t Sampler::Sample(std::span<const float> logits) {
  if (logits.empty()) throw UsageError("no logits to sample from");
  if (options_.temperature == 0.0f || options_.top_p == 0.0f) return ArgMax(logits);
  // Softmax at temperature T (max subtracted for stability), sorted by probability.
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  scratch_.resize(logits.size());
  double total = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    const float p = std::exp((logits[i] - max_logit) / options_.temperature);
    scratch_[i] = {p, static_cast<int32_t>(i)};
    total += p;
  }
  std::sort(scratch_.begin(), scratch_.end(),
            [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
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

}  // namespace aviary
