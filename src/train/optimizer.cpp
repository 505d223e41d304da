#include "train/optimizer.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>

#include "aviary/error.h"
#include "tensor/thread_pool.h"

namespace aviary::train {
namespace {

// Floats per block: large enough that handing a block to a thread costs nothing next to it,
// small enough that the blocks of one 0.1B model spread over many threads.
constexpr size_t kBlockFloats = size_t{1} << 16;

struct AdamWScalars {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps;
  float decay;          // p *= decay
  float neg_step_size;  // -lr / bias_correction1
};

// One AdamW update of n floats, in torch.optim.AdamW's order of operations. The buffers do not
// overlap (restrict), so the compiler vectorises the loop; sqrt and division are IEEE-exact in
// SIMD lanes as in scalar code, so vector and tail elements round alike.
void AdamWFloats(const AdamWScalars& s, size_t n, float* __restrict params,
                 const float* __restrict grads, float* __restrict m, float* __restrict v) {
  for (size_t i = 0; i < n; ++i) {
    const float g = grads[i];
    const float m_i = m[i] * s.beta1 + s.one_minus_beta1 * g;
    const float v_i = v[i] * s.beta2 + s.one_minus_beta2 * g * g;
    m[i] = m_i;
    v[i] = v_i;
    const float denom = std::sqrt(v_i) / s.bias_correction2_sqrt + s.eps;
    params[i] = params[i] * s.decay + s.neg_step_size * (m_i / denom);
  }
}

}  // namespace

void AdamWOptions::Validate() const {
  auto fail = [](const std::string& what) { throw UsageError("optimizer: " + what); };
  auto finite = [](float x) { return std::isfinite(x); };
  if (!finite(lr_init) || lr_init < 0) fail("the learning rate must be >= 0");
  if (!finite(lr_final) || lr_final < 0) fail("the final learning rate must be >= 0");
  if (warmup_steps < 0) fail("warmup steps must be >= 0");
  if (total_steps < 1) fail("the number of steps must be >= 1");
  if (!finite(weight_decay) || weight_decay < 0) fail("weight decay must be >= 0");
  if (!finite(beta1) || beta1 < 0 || beta1 >= 1) fail("beta1 must be in [0, 1)");
  if (!finite(beta2) || beta2 < 0 || beta2 >= 1) fail("beta2 must be in [0, 1)");
  if (!finite(eps) || eps < 0) fail("eps must be >= 0");
  if (!finite(grad_clip) || grad_clip < 0) fail("the gradient clip must be >= 0 (0: none)");
}

float LearningRate(int64_t step, const AdamWOptions& o) {
  if (o.lr_init == 0) return 0;
  step = std::max<int64_t>(step, 0);
  // trainer.py's my_exit_tokens > 0 branch with the tokens of every step equal: progress is
  // measured in steps after warmup, 1 at the last step.
  const int64_t decay_steps = o.total_steps - 1 - o.warmup_steps;
  double progress = step < o.warmup_steps ? 0.0
                    : decay_steps > 0     ? static_cast<double>(step - o.warmup_steps) / decay_steps
                                          : 1.0;
  progress = std::clamp(progress, 0.0, 1.0);
  const double final_factor = static_cast<double>(o.lr_final) / o.lr_init;
  const double mult =
      (0.5 + final_factor / 2) + (0.5 - final_factor / 2) * std::cos(std::numbers::pi * progress);
  double lr = o.lr_init * mult;
  if (step < o.warmup_steps) {
    lr *= 0.01 + 0.99 * static_cast<double>(step) / o.warmup_steps;
  }
  return static_cast<float>(lr);
}

AdamW::AdamW(const ParamLayout& layout, const AdamWOptions& options) : options_(options) {
  options_.Validate();
  for (const ParamEntry& e : layout.entries()) {
    if (!e.trainable) continue;
    for (size_t begin = 0; begin < e.size; begin += kBlockFloats) {
      blocks_.push_back(
          {e.offset + begin, e.offset + std::min(e.size, begin + kBlockFloats), e.group});
    }
  }
}

double AdamW::ClipGradients(float* grads) const {
  std::vector<double> partial(blocks_.size());
  ParallelFor(static_cast<int64_t>(blocks_.size()), [&](int64_t b, int) {
    // Eight running sums (lane i mod 8), added in a fixed order: vectorisable, and the same
    // bits on every run.
    double lane[8] = {};
    const size_t begin = blocks_[b].begin, end = blocks_[b].end;
    size_t i = begin;
    for (; i + 8 <= end; i += 8) {
      for (int k = 0; k < 8; ++k) lane[k] += static_cast<double>(grads[i + k]) * grads[i + k];
    }
    for (; i < end; ++i) lane[0] += static_cast<double>(grads[i]) * grads[i];
    partial[b] =
        ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  });
  double sum = 0;
  for (double s : partial) sum += s;
  const double norm = std::sqrt(sum);
  if (options_.grad_clip <= 0 || !std::isfinite(norm)) return norm;
  const double coefficient = options_.grad_clip / (norm + 1e-6);
  if (coefficient >= 1) return norm;
  const float scale = static_cast<float>(coefficient);
  ParallelFor(static_cast<int64_t>(blocks_.size()), [&](int64_t b, int) {
    for (size_t i = blocks_[b].begin; i < blocks_[b].end; ++i) grads[i] *= scale;
  });
  return norm;
}

void AdamW::Step(int64_t step, float* params, const float* grads, float* m, float* v) const {
  const AdamWOptions& o = options_;
  // The scalars in double, then rounded to float where they meet the tensors, as torch's
  // Python-side arithmetic does.
  const double lr = LearningRate(step, o);
  const double t = static_cast<double>(step + 1);
  const double bias_correction1 = 1 - std::pow(static_cast<double>(o.beta1), t);
  const double bias_correction2 = 1 - std::pow(static_cast<double>(o.beta2), t);
  const float beta1 = o.beta1, beta2 = o.beta2;
  const float one_minus_beta1 = static_cast<float>(1 - static_cast<double>(o.beta1));
  const float one_minus_beta2 = static_cast<float>(1 - static_cast<double>(o.beta2));
  const float bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  const float eps = o.eps;
  struct GroupScalars {
    float decay;          // p *= decay
    float neg_step_size;  // -lr / bias_correction1
  };
  auto scalars = [&](ParamGroup group) {
    const double group_lr = group == ParamGroup::kDoubleLr ? 2 * lr : lr;
    const double wd = group == ParamGroup::kDecay ? o.weight_decay : 0.0;
    return GroupScalars{static_cast<float>(1 - group_lr * wd),
                        static_cast<float>(-(group_lr / bias_correction1))};
  };
  const GroupScalars by_group[3] = {scalars(ParamGroup::kNoDecay), scalars(ParamGroup::kDoubleLr),
                                    scalars(ParamGroup::kDecay)};

  const AdamWScalars shared{
      beta1, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps, 0, 0};
  ParallelFor(static_cast<int64_t>(blocks_.size()), [&](int64_t b, int) {
    const Block& block = blocks_[b];
    AdamWScalars s = shared;
    s.decay = by_group[static_cast<int>(block.group)].decay;
    s.neg_step_size = by_group[static_cast<int>(block.group)].neg_step_size;
    AdamWFloats(s, block.end - block.begin, params + block.begin, grads + block.begin,
                m + block.begin, v + block.begin);
  });
}

}  // namespace aviary::train
