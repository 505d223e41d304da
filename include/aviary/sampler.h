// Logits -> token id.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

namespace aviary {

struct SamplerOptions {
  float temperature = 1.0f;  // 0 = greedy argmax
  float top_p = 1.0f;        // keep the smallest set of tokens whose probability sums to top_p
  int top_k = 0;             // 0 = off
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplerOptions& options);
  int32_t Sample(std::span<const float> logits);

 private:
  SamplerOptions options_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> scratch_;
};

// Index of the largest logit (the first one on ties).
int32_t ArgMax(std::span<const float> logits);

}  // namespace aviary
