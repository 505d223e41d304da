// AdamW as RWKV-LM trains RWKV-7 (RWKV-v7/train_temp: model.py configure_optimizers,
// trainer.py's learning-rate schedule, Lightning's gradient clipping), over the flat buffers of
// a ParamLayout: parameters, gradients and both moments share its offsets.
//
// Groups (ParamEntry::group): kNoDecay learning rate x1, kDoubleLr (att.w0) x2, kDecay x1 with
// decoupled weight decay when weight_decay > 0. Per trainable float, at step t (1-based):
//   m = beta1 m + (1 - beta1) g
//   v = beta2 v + (1 - beta2) g^2
//   p = p (1 - lr wd)                                   kDecay only
//   p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// in the order and rounding of torch.optim.AdamW (FusedAdam's adam_w_mode computes the same
// terms from the same p). Frozen entries (trainable == false) are neither read nor written.
//
// Work is split into fixed blocks of one tensor each, handed to the thread pool: every float's
// arithmetic, and the gradient norm's summation order, are the same whatever the thread count.
// The moments belong to the caller (a checkpoint saves them; they start at zero).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "train/params.h"

namespace aviary::train {

struct AdamWOptions {
  float lr_init = 6e-4f;   // the rate after warmup
  float lr_final = 1e-5f;  // the rate at the last step
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;  // steps 0 .. total_steps - 1
  float weight_decay = 0;   // kDecay entries only
  float beta1 = 0.9f;
  float beta2 = 0.99f;
  float eps = 1e-18f;
  float grad_clip = 1.0f;  // the largest global gradient L2 norm; 0: no clipping

  // Throws aviary::UsageError naming the first option out of range.
  void Validate() const;
};

// The learning rate of step `step` (0-based), before the group's x2 for att.w0: trainer.py's
// cosine decay from lr_init to lr_final over the steps after warmup (reaching lr_final at step
// total_steps - 1), times 0.01 + 0.99 step / warmup_steps during warmup.
float LearningRate(int64_t step, const AdamWOptions& options);

class AdamW {
 public:
  // Throws aviary::UsageError for options out of range. The layout's `trainable` flags are read
  // here: freeze entries before constructing.
  AdamW(const ParamLayout& layout, const AdamWOptions& options);

  const AdamWOptions& options() const { return options_; }

  // The L2 norm of all trainable gradients (summed in double in a fixed order). When
  // grad_clip > 0 and grad_clip / (norm + 1e-6) < 1 the trainable gradients are multiplied by
  // that factor, as torch.nn.utils.clip_grad_norm_ does. A non-finite norm is returned and the
  // gradients are left alone: the caller decides what to do with the step.
  double ClipGradients(float* grads) const;

  // One update at step `step` (0-based: bias correction uses step + 1; the learning rate is
  // LearningRate(step)). All four buffers are layout.total_floats() long; m and v start at 0.
  void Step(int64_t step, float* params, const float* grads, float* m, float* v) const;

 private:
  struct Block {
    size_t begin, end;  // floats of the flat buffer
    ParamGroup group;
  };
  AdamWOptions options_;
  std::vector<Block> blocks_;  // the trainable floats, in layout order
};

}  // namespace aviary::train
