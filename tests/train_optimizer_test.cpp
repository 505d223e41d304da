// AdamW, its learning-rate schedule and gradient clipping (src/train/optimizer.h) against
// torch.optim.AdamW with RWKV-LM's groups and torch.nn.utils.clip_grad_norm_
// (tests/train/official_adamw.py, run by Debian's PyTorch), and against trainer.py's schedule
// formula.
#include "train/optimizer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <sstream>
#include <string>
#include <vector>

#include "aviary/error.h"
#include "test_data.h"
#include "train/init.h"
#include "train/params.h"

namespace aviary::train {
namespace {

using aviary::testing::InCI;
using aviary::testing::kTorchPython;
using aviary::testing::ProcessTempDir;
using aviary::testing::ReadFloats;
using aviary::testing::RunCommand;

void WriteFloats(const std::string& path, const std::vector<float>& v) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  std::fwrite(v.data(), sizeof(float), v.size(), f);
  std::fclose(f);
}

std::string Repr(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", x);
  return buf;
}

// Gaussian gradients times `scale` (the padding between tensors holds garbage: it must not
// matter).
std::vector<float> RandomGrads(const ParamLayout& layout, uint64_t seed, double scale) {
  InitRng rng(seed, 99);
  std::vector<float> g(layout.total_floats());
  for (float& x : g) x = static_cast<float>(rng.Normal() * scale);
  return g;
}

// A small model with RWKV-LM's init and a few frozen tensors.
ParamLayout TestLayout(int C = 64, int V = 97) {
  ParamLayout layout = ParamLayout::Rwkv7(Rwkv7Config::Official(2, C, V));
  for (ParamEntry& e : layout.entries()) {
    if (e.name == "blocks.1.att.r_k" || e.name == "ln_out.weight" ||
        e.name == "blocks.0.ffn.key.weight") {
      e.trainable = false;
    }
  }
  return layout;
}

struct Buffers {
  std::vector<float> params, m, v;
  explicit Buffers(const ParamLayout& layout)
      : params(layout.total_floats()), m(layout.total_floats()), v(layout.total_floats()) {
    InitRwkv7(layout, 5, params.data());
    // Nonzero matrices where the init leaves zeros, so weight decay shows everywhere.
    InitRng rng(6, 0);
    for (float& p : params) {
      if (p == 0) p = static_cast<float>(0.02 * rng.Normal());
    }
  }
};

// Runs `steps` steps here and in torch on the same gradients (grads_scale[step] each) and
// compares parameters, both moments and the gradient norms.
void CompareWithTorch(const AdamWOptions& options, const std::vector<double>& grads_scale) {
  const ParamLayout layout = TestLayout();
  const int steps = static_cast<int>(grads_scale.size());
  Buffers ours(layout);
  const std::vector<float> initial = ours.params;
  const std::string dir = ProcessTempDir() + "adamw-" + std::to_string(steps);
  std::filesystem::create_directories(dir);
  WriteFloats(dir + "/params.f32", initial);

  std::ofstream setup(dir + "/setup.txt");
  setup << Repr(options.beta1) << " " << Repr(options.beta2) << " " << Repr(options.eps) << " "
        << Repr(options.grad_clip) << " " << steps << "\n";
  for (int s = 0; s < steps; ++s) setup << Repr(LearningRate(s, options)) << " ";
  setup << "\n";
  for (const ParamEntry& e : layout.entries()) {
    const double scale = e.group == ParamGroup::kDoubleLr ? 2 : 1;
    const double wd = e.group == ParamGroup::kDecay ? options.weight_decay : 0.0;
    setup << e.offset << " " << e.size << " " << scale << " " << Repr(wd) << " "
          << (e.trainable ? 1 : 0) << "\n";
  }
  setup.close();

  AdamW adamw(layout, options);
  std::vector<double> norms;
  for (int s = 0; s < steps; ++s) {
    std::vector<float> grads = RandomGrads(layout, 100 + s, grads_scale[s]);
    WriteFloats(dir + "/grads_" + std::to_string(s) + ".f32", grads);
    norms.push_back(adamw.ClipGradients(grads.data()));
    adamw.Step(s, ours.params.data(), grads.data(), ours.m.data(), ours.v.data());
  }

  const std::string command = std::string(kTorchPython) +
                              " " AVIARY_SOURCE_DIR "/tests/train/official_adamw.py " + dir +
                              " 2>&1";
  const auto result = RunCommand(command);
  ASSERT_EQ(result.exit_code, 0) << command << "\n" << result.output;

  std::ifstream norm_file(dir + "/out_norms.txt");
  for (int s = 0; s < steps; ++s) {
    double expected = 0;
    norm_file >> expected;
    EXPECT_NEAR(norms[s], expected, 1e-6 * expected) << "step " << s;
  }
  const std::vector<float> torch_p = ReadFloats(dir + "/out_params.f32");
  const std::vector<float> torch_m = ReadFloats(dir + "/out_m.f32");
  const std::vector<float> torch_v = ReadFloats(dir + "/out_v.f32");
  ASSERT_EQ(torch_p.size(), layout.total_floats());
  for (const ParamEntry& e : layout.entries()) {
    SCOPED_TRACE(e.name);
    double max_m = 0, max_v = 0;
    for (size_t i = e.offset; i < e.offset + e.size; ++i) {
      max_m = std::max<double>(max_m, std::fabs(torch_m[i]));
      max_v = std::max<double>(max_v, std::fabs(torch_v[i]));
    }
    // Adam's steps divide m (a sum of terms of both signs) by sqrt(v): the parameters are
    // compared within 1e-6 of the most any step could move them (the sum of the group's
    // rates), plus the rounding of the parameter itself.
    double lr_sum = 0;
    for (int s = 0; s < steps; ++s) {
      lr_sum += (e.group == ParamGroup::kDoubleLr ? 2 : 1) * LearningRate(s, options);
    }
    for (size_t i = e.offset; i < e.offset + e.size; ++i) {
      if (!e.trainable) {
        ASSERT_EQ(ours.params[i], initial[i]) << "a frozen tensor moved";
        ASSERT_EQ(ours.m[i], 0.0f);
        ASSERT_EQ(ours.v[i], 0.0f);
        continue;
      }
      // m and v are sums of terms of both signs: compared relative to the tensor's largest.
      ASSERT_NEAR(ours.m[i], torch_m[i], 1e-6 * max_m) << i;
      ASSERT_NEAR(ours.v[i], torch_v[i], 1e-6 * max_v) << i;
      ASSERT_NEAR(ours.params[i], torch_p[i], 1e-6 * lr_sum + 1.2e-7 * std::fabs(torch_p[i]))
          << i << " (initial " << initial[i] << ")";
    }
  }
}

AdamWOptions Options() {
  AdamWOptions o;
  o.lr_init = 1e-2f;
  o.lr_final = 1e-3f;
  o.warmup_steps = 2;
  o.total_steps = 6;
  o.weight_decay = 0.1f;
  o.grad_clip = 1.0f;
  return o;
}

TEST(TrainOptimizer, OneStepMatchesTorchAdamW) {
  REQUIRE_TORCH();
  AdamWOptions o = Options();
  o.warmup_steps = 0;  // the full rate: bias correction at step 1 moves each weight by ~lr
  o.grad_clip = 0;
  CompareWithTorch(o, {0.01});
}

TEST(TrainOptimizer, SeveralStepsWithClippingMatchTorchAdamW) {
  REQUIRE_TORCH();
  // The first, third and sixth steps' norms are far above the clip, the others below.
  CompareWithTorch(Options(), {0.05, 1e-4, 1.0, 1e-3, 2e-3, 0.2});
}

TEST(TrainOptimizer, NoWeightDecayMatchesTorchAdamW) {
  REQUIRE_TORCH();
  AdamWOptions o = Options();
  o.weight_decay = 0;
  CompareWithTorch(o, {0.01, 0.02, 0.005});
}

TEST(TrainOptimizer, WeightDecayOnlyOnMatricesAndDoubleRateOnW0) {
  // Zero gradients: Adam's step is 0, so only the decay moves a weight.
  const ParamLayout layout = TestLayout();
  Buffers b(layout);
  const std::vector<float> before = b.params;
  AdamWOptions o = Options();
  o.warmup_steps = 0;
  AdamW adamw(layout, o);
  std::vector<float> zero(layout.total_floats(), 0.0f);
  adamw.Step(0, b.params.data(), zero.data(), b.m.data(), b.v.data());
  const float lr = LearningRate(0, o);
  for (const ParamEntry& e : layout.entries()) {
    const size_t i = e.offset;
    const bool decays = e.trainable && e.group == ParamGroup::kDecay;
    EXPECT_EQ(b.params[i], decays ? before[i] * static_cast<float>(1 - lr * 0.1) : before[i])
        << e.name;
  }
  // Equal gradients: w0 moves twice as far as a0 (both no decay).
  std::vector<float> ones(layout.total_floats(), 1.0f);
  Buffers c(layout);
  const std::vector<float> start = c.params;
  adamw.Step(0, c.params.data(), ones.data(), c.m.data(), c.v.data());
  const size_t w0 = layout.Get("blocks.0.att.w0").offset, a0 = layout.Get("blocks.0.att.a0").offset;
  // (within the rounding of the weights themselves, |w0| < 8 and |a0| < 1)
  EXPECT_NEAR(start[w0] - c.params[w0], 2 * lr, 1e-6);
  EXPECT_NEAR(start[a0] - c.params[a0], lr, 1.2e-7);
}

TEST(TrainOptimizer, ScheduleFollowsTrainerPy) {
  AdamWOptions o;
  o.lr_init = 6e-4f;
  o.lr_final = 1e-5f;
  o.warmup_steps = 10;
  o.total_steps = 111;
  // trainer.py with my_exit_tokens = the tokens of steps 0..110 (exit at the last step).
  auto official = [&](int64_t step) {
    const double tokens_per_step = 64 * 12;
    const double progress = std::clamp((step * tokens_per_step - 10 * tokens_per_step) /
                                           (110 * tokens_per_step - 10 * tokens_per_step),
                                       0.0, 1.0);
    const double f = 1e-5 / 6e-4;
    double lr = 6e-4 * ((0.5 + f / 2) + (0.5 - f / 2) * std::cos(std::numbers::pi * progress));
    if (step < 10) lr *= 0.01 + 0.99 * step / 10;
    return lr;
  };
  for (int64_t step : {0, 1, 5, 9, 10, 11, 60, 109, 110, 200}) {
    EXPECT_NEAR(LearningRate(step, o), official(step), 1e-7 * 6e-4) << "step " << step;
  }
  EXPECT_FLOAT_EQ(LearningRate(0, o), 6e-6f);  // warmup starts at 1%
  EXPECT_FLOAT_EQ(LearningRate(5, o), 6e-4f * 0.505f);
  EXPECT_FLOAT_EQ(LearningRate(10, o), 6e-4f);                // the top, after warmup
  EXPECT_FLOAT_EQ(LearningRate(60, o), (6e-4f + 1e-5f) / 2);  // halfway down
  EXPECT_FLOAT_EQ(LearningRate(110, o), 1e-5f);               // the last step
  // Constant when lr_final == lr_init; a run that is all warmup ends its warmup at the top.
  o.lr_final = o.lr_init;
  EXPECT_FLOAT_EQ(LearningRate(50, o), 6e-4f);
  o.total_steps = 5;
  EXPECT_FLOAT_EQ(LearningRate(4, o), 6e-4f * (0.01f + 0.99f * 0.4f));
}

TEST(TrainOptimizer, ClippingScalesToTheClipAndSkipsFrozenTensors) {
  const ParamLayout layout = TestLayout();
  AdamWOptions o = Options();
  o.grad_clip = 0.5f;
  AdamW adamw(layout, o);
  std::vector<float> grads = RandomGrads(layout, 3, 0.1);
  const std::vector<float> original = grads;
  double expected_sq = 0;
  for (const ParamEntry& e : layout.entries()) {
    if (!e.trainable) continue;
    for (size_t i = e.offset; i < e.offset + e.size; ++i)
      expected_sq += double{grads[i]} * grads[i];
  }
  const double norm = adamw.ClipGradients(grads.data());
  EXPECT_NEAR(norm, std::sqrt(expected_sq), 1e-9 * norm);
  ASSERT_GT(norm, 0.5);
  double after_sq = 0;
  for (const ParamEntry& e : layout.entries()) {
    for (size_t i = e.offset; i < e.offset + e.size; ++i) {
      if (e.trainable) {
        after_sq += double{grads[i]} * grads[i];
      } else {
        ASSERT_EQ(grads[i], original[i]) << e.name << ": a frozen gradient was scaled";
      }
    }
  }
  EXPECT_NEAR(std::sqrt(after_sq), 0.5, 1e-5);
  // Below the clip, or with clipping off: unchanged.
  std::vector<float> small = RandomGrads(layout, 3, 1e-5);
  const std::vector<float> small_copy = small;
  EXPECT_LT(adamw.ClipGradients(small.data()), 0.5);
  EXPECT_EQ(small, small_copy);
  o.grad_clip = 0;
  std::vector<float> big = original;
  EXPECT_NEAR(AdamW(layout, o).ClipGradients(big.data()), norm, 1e-9 * norm);
  EXPECT_EQ(big, original);
}

TEST(TrainOptimizer, SameBitsForOneAndTwoThreads) {
  aviary::testing::RuntimeGuard guard;
  const ParamLayout layout = TestLayout(128, 1100);  // emb and head span several blocks
  AdamWOptions o = Options();
  AdamW adamw(layout, o);
  std::vector<std::vector<float>> results;
  std::vector<double> norms;
  for (int threads : {1, 2}) {
    aviary::testing::SetNumThreads(threads);
    Buffers b(layout);
    for (int s = 0; s < 3; ++s) {
      std::vector<float> grads = RandomGrads(layout, 40 + s, 0.05);
      norms.push_back(adamw.ClipGradients(grads.data()));
      adamw.Step(s, b.params.data(), grads.data(), b.m.data(), b.v.data());
    }
    b.params.insert(b.params.end(), b.m.begin(), b.m.end());
    b.params.insert(b.params.end(), b.v.begin(), b.v.end());
    results.push_back(std::move(b.params));
  }
  EXPECT_EQ(0, std::memcmp(results[0].data(), results[1].data(), results[0].size() * 4));
  for (int s = 0; s < 3; ++s) EXPECT_EQ(norms[s], norms[s + 3]);
}

TEST(TrainOptimizer, RejectsOptionsOutOfRange) {
  const ParamLayout layout = TestLayout();
  auto bad = [&](auto change) {
    AdamWOptions o = Options();
    change(o);
    EXPECT_THROW(AdamW(layout, o), UsageError);
  };
  bad([](AdamWOptions& o) { o.lr_init = -1; });
  bad([](AdamWOptions& o) { o.lr_final = std::nanf(""); });
  bad([](AdamWOptions& o) { o.total_steps = 0; });
  bad([](AdamWOptions& o) { o.warmup_steps = -1; });
  bad([](AdamWOptions& o) { o.beta2 = 1; });
  bad([](AdamWOptions& o) { o.weight_decay = -0.1f; });
  bad([](AdamWOptions& o) { o.grad_clip = -1; });
}

}  // namespace
}  // namespace aviary::train
