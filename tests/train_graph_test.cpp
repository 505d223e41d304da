// The RWKV-7 training graph against finite differences of its own forward pass: every
// parameter tensor's gradient (sampled elements) and the gradient of the start state, on a
// tiny model with random weights where every term of the math matters, over a window that
// crosses a wkv checkpoint; a sequence trained as two chunks with the state carried across
// gives the one-chunk loss and gradients. (tests/train/check_gradients.py checks every element
// against PyTorch autograd.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <cstring>
#include <vector>

#include "aviary/runtime.h"
#include "tensor/thread_pool.h"
#include "train/chunked.h"
#include "train/params.h"
#include "train/rwkv7_graph.h"
#include "train_fixtures.h"

namespace aviary::train {
namespace {

using testing::RandomRwkv7Params;
using testing::TinyRwkv7Config;

struct Batch {
  int B = 2, T = 20;
  std::vector<int32_t> inputs, targets;
  std::vector<float> state;
};

Batch RandomBatch(const Rwkv7Graph& g, const Rwkv7Config& c, uint32_t seed) {
  Batch b;
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> tok(0, c.vocab - 1);
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  for (int i = 0; i < b.B * b.T; ++i) {
    b.inputs.push_back(tok(rng));
    b.targets.push_back(tok(rng));
  }
  b.state.resize(b.B * g.StateFloats());
  for (float& s : b.state) s = u(rng);
  return b;
}

// The scalar the backward pass differentiates: scale x (cross-entropy sum + 1e-4 x the sum of
// each row's largest logit), L2Wrap's pseudo-loss.
double Objective(Rwkv7Graph& g, const std::vector<float>& p, const Batch& b, float scale,
                 const std::vector<float>& state, int V) {
  std::vector<float> logits(static_cast<size_t>(b.B) * b.T * V);
  const LossSum loss =
      g.Forward(p.data(), b.inputs, b.targets, b.B, b.T, state.data(), nullptr, logits.data());
  double max_sum = 0;
  for (size_t m = 0; m < logits.size() / V; ++m) {
    max_sum += *std::max_element(logits.begin() + m * V, logits.begin() + (m + 1) * V);
  }
  return scale * (loss.sum + 1e-4 * max_sum);
}

TEST(Rwkv7Graph, GradientsMatchFiniteDifferences) {
  const ParamLayout layout = ParamLayout::Rwkv7(TinyRwkv7Config());
  const Rwkv7Config& c = layout.config();
  Rwkv7Graph graph(layout, 2, 20);
  std::vector<float> params = RandomRwkv7Params(layout, 1);
  const Batch b = RandomBatch(graph, c, 2);
  const float scale = 1.0f / (b.B * b.T);
  std::vector<float> grads(layout.total_floats(), 0.0f), d_state(b.state.size());
  graph.Forward(params.data(), b.inputs, b.targets, b.B, b.T, b.state.data(), nullptr);
  graph.Backward(params.data(), grads.data(), scale, nullptr, d_state.data());

  std::mt19937 rng(3);
  int checked = 0;
  auto check = [&](std::vector<float>& values, size_t i, float analytic, const std::string& what,
                   const std::vector<float>* state) {
    const float keep = values[i];
    const float h = 1e-2f * std::max(1.0f, std::fabs(keep));
    values[i] = keep + h;
    const double up = Objective(graph, params, b, scale, state ? *state : b.state, c.vocab);
    values[i] = keep - h;
    const double down = Objective(graph, params, b, scale, state ? *state : b.state, c.vocab);
    values[i] = keep;
    const double fd = (up - down) / (2.0 * h);
    EXPECT_NEAR(analytic, fd, 2e-4 + 0.03 * std::fabs(fd)) << what << " element " << i;
    ++checked;
  };
  for (const ParamEntry& e : layout.entries()) {
    if (e.name == "blocks.0.att.v0" || e.name == "blocks.0.att.v1" || e.name == "blocks.0.att.v2") {
      for (size_t i = 0; i < e.size; ++i) EXPECT_EQ(grads[e.offset + i], 0.0f) << e.name;
      continue;
    }
    for (int s = 0; s < 3; ++s) {
      const size_t i = e.offset + rng() % e.size;
      check(params, i, grads[i], e.name, nullptr);
    }
  }
  std::vector<float> state = b.state;
  for (int s = 0; s < 24; ++s) {
    const size_t i = rng() % state.size();
    const float keep = state[i];
    const float h = 1e-2f;
    state[i] = keep + h;
    const double up = Objective(graph, params, b, scale, state, c.vocab);
    state[i] = keep - h;
    const double down = Objective(graph, params, b, scale, state, c.vocab);
    state[i] = keep;
    const double fd = (up - down) / (2.0 * h);
    EXPECT_NEAR(d_state[i], fd, 2e-4 + 0.03 * std::fabs(fd)) << "state element " << i;
  }
  EXPECT_GT(checked, 100);
}

TEST(Rwkv7Graph, TwoChunksEqualOne) {
  const ParamLayout layout = ParamLayout::Rwkv7(TinyRwkv7Config());
  const Rwkv7Config& c = layout.config();
  Rwkv7Graph whole(layout, 1, 40), first(layout, 1, 20), second(layout, 1, 20);
  const std::vector<float> params = RandomRwkv7Params(layout, 4);
  Batch b = RandomBatch(whole, c, 5);
  b.B = 1;
  b.T = 40;
  const size_t SF = whole.StateFloats();
  std::vector<float> state(b.state.begin(), b.state.begin() + SF);
  const float scale = 1.0f / 40;

  std::vector<float> g1(layout.total_floats(), 0.0f), ds1(SF), end1(SF);
  const LossSum l1 =
      whole.Forward(params.data(), std::span(b.inputs).first(40), std::span(b.targets).first(40), 1,
                    40, state.data(), end1.data());
  whole.Backward(params.data(), g1.data(), scale, nullptr, ds1.data());

  std::vector<float> g2(layout.total_floats(), 0.0f), mid(SF), end2(SF), d_mid(SF), ds2(SF);
  const LossSum a = first.Forward(params.data(), std::span(b.inputs).first(20),
                                  std::span(b.targets).first(20), 1, 20, state.data(), mid.data());
  const LossSum z =
      second.Forward(params.data(), std::span(b.inputs).subspan(20, 20),
                     std::span(b.targets).subspan(20, 20), 1, 20, mid.data(), end2.data());
  second.Backward(params.data(), g2.data(), scale, nullptr, d_mid.data());
  first.Backward(params.data(), g2.data(), scale, d_mid.data(), ds2.data());

  EXPECT_NEAR(l1.sum, a.sum + z.sum, 1e-4 * std::fabs(l1.sum));
  for (size_t i = 0; i < SF; ++i) ASSERT_NEAR(end1[i], end2[i], 1e-5f) << "end state " << i;
  for (size_t i = 0; i < g1.size(); ++i) {
    ASSERT_NEAR(g1[i], g2[i], 1e-5f + 1e-3f * std::fabs(g1[i])) << "gradient " << i;
  }
  for (size_t i = 0; i < SF; ++i) {
    ASSERT_NEAR(ds1[i], ds2[i], 1e-5f + 1e-3f * std::fabs(ds1[i])) << "state gradient " << i;
  }
}

// Longer context: a window run as chunks by ChunkedWindows (the infctx scheme: forward chunk
// by chunk keeping each start state, backward from the last chunk, recomputing) gives the
// one-pass loss, parameter gradients and start-state gradient, with uneven chunks (16, 16, 8)
// and two sequences. The two differ only in float summation order.
TEST(ChunkedWindows, ChunksEqualOnePass) {
  const ParamLayout layout = ParamLayout::Rwkv7(TinyRwkv7Config());
  const Rwkv7Config& c = layout.config();
  Rwkv7Graph whole(layout, 2, 40), small(layout, 2, 16);
  const std::vector<float> params = RandomRwkv7Params(layout, 6);
  Batch b = RandomBatch(whole, c, 7);
  b.T = 40;
  b.inputs.resize(2 * 40);
  b.targets.resize(2 * 40);
  std::mt19937 rng(8);
  for (size_t i = 40; i < b.inputs.size(); ++i) {
    b.inputs[i] = rng() % c.vocab;
    b.targets[i] = rng() % c.vocab;
  }
  const float scale = 1.0f / 80;
  std::vector<float> g1(layout.total_floats(), 0.0f), ds1(b.state.size());
  const LossSum l1 =
      whole.Forward(params.data(), b.inputs, b.targets, 2, 40, b.state.data(), nullptr);
  whole.Backward(params.data(), g1.data(), scale, nullptr, ds1.data());

  ChunkedWindows chunks(small, 16, 0);
  std::vector<float> g2(layout.total_floats(), 0.0f), ds2(b.state.size());
  const LossSum l2 = chunks.Gradients(params.data(), g2.data(), b.inputs, b.targets, 2, 40, scale,
                                      b.state.data(), ds2.data());
  const LossSum l3 = chunks.Loss(params.data(), b.inputs, b.targets, 2, 40, b.state.data());
  EXPECT_EQ(l2.tokens, 80);
  EXPECT_NEAR(l1.sum, l2.sum, 1e-5 * std::fabs(l1.sum));
  EXPECT_EQ(l2.sum, l3.sum);  // the same forward passes
  // Relative to each tensor's largest gradient, as tests/train/check_gradients.py measures.
  double worst = 0;
  for (const ParamEntry& e : layout.entries()) {
    float scale_of = 0, diff = 0;
    for (size_t i = e.offset; i < e.offset + e.size; ++i) {
      scale_of = std::max(scale_of, std::fabs(g1[i]));
      diff = std::max(diff, std::fabs(g1[i] - g2[i]));
    }
    if (scale_of > 0) worst = std::max(worst, static_cast<double>(diff / scale_of));
    EXPECT_LE(diff, 1e-5f * std::max(scale_of, 1e-3f)) << e.name;
  }
  float ds_scale = 0, ds_diff = 0;
  for (size_t i = 0; i < ds1.size(); ++i) {
    ds_scale = std::max(ds_scale, std::fabs(ds1[i]));
    ds_diff = std::max(ds_diff, std::fabs(ds1[i] - ds2[i]));
  }
  EXPECT_GT(ds_scale, 0.0f);
  EXPECT_LE(ds_diff, 1e-5f * ds_scale);
  RecordProperty("worst_relative_difference", std::to_string(worst));
}

// --grad-chunks 1: the gradient stops at every chunk's start, so the start state's gradient is
// the first chunk's own (what one pass over the first chunk alone gives), and the parameter
// gradients lose the terms that crossed chunks.
TEST(ChunkedWindows, TruncationStopsTheGradientAtChunkStarts) {
  const ParamLayout layout = ParamLayout::Rwkv7(TinyRwkv7Config());
  const Rwkv7Config& c = layout.config();
  Rwkv7Graph graph(layout, 1, 20), alone(layout, 1, 20);
  const std::vector<float> params = RandomRwkv7Params(layout, 9);
  Batch b = RandomBatch(graph, c, 10);
  b.inputs.resize(40);
  b.targets.resize(40);
  std::mt19937 rng(11);
  for (size_t i = 20; i < 40; ++i) {
    b.inputs[i] = rng() % c.vocab;
    b.targets[i] = rng() % c.vocab;
  }
  const std::vector<float> state(b.state.begin(), b.state.begin() + graph.StateFloats());
  const float scale = 1.0f / 40;
  std::vector<float> g_trunc(layout.total_floats(), 0.0f), g_full(g_trunc), ds_trunc(state.size()),
      ds_full(state.size());
  ChunkedWindows truncated(graph, 20, 1);
  truncated.Gradients(params.data(), g_trunc.data(), b.inputs, b.targets, 1, 40, scale,
                      state.data(), ds_trunc.data());
  ChunkedWindows full(graph, 20, 0);
  full.Gradients(params.data(), g_full.data(), b.inputs, b.targets, 1, 40, scale, state.data(),
                 ds_full.data());

  std::vector<float> g_first(layout.total_floats(), 0.0f), ds_first(state.size());
  alone.Forward(params.data(), std::span(b.inputs).first(20), std::span(b.targets).first(20), 1,
                20, state.data(), nullptr);
  alone.Backward(params.data(), g_first.data(), scale, nullptr, ds_first.data());
  for (size_t i = 0; i < state.size(); ++i) ASSERT_EQ(ds_trunc[i], ds_first[i]) << i;
  float moved = 0;
  for (size_t i = 0; i < ds_full.size(); ++i) moved = std::max(moved, std::fabs(ds_full[i] - ds_trunc[i]));
  EXPECT_GT(moved, 1e-4f) << "the second chunk's loss should reach the start state untruncated";
  float g_moved = 0;
  for (size_t i = 0; i < g_full.size(); ++i) g_moved = std::max(g_moved, std::fabs(g_full[i] - g_trunc[i]));
  EXPECT_GT(g_moved, 1e-5f);
}

// The SIMD kernels (matrix products, wkv forward and backward) against the scalar reference:
// the same gradients up to float rounding, for head sizes a vector divides and one it doesn't.
TEST(Rwkv7Graph, FastAndReferenceKernelsAgree) {
  for (int head_size : {16, 8, 32}) {
    Rwkv7Config config = TinyRwkv7Config();
    config.head_size = head_size;
    if (head_size == 8) config.n_embd = 24;  // 3 heads of 8
    const ParamLayout layout = ParamLayout::Rwkv7(config);
    const std::vector<float> params = RandomRwkv7Params(layout, 7);
    std::vector<std::vector<float>> grads;
    for (Kernels kernels : {Kernels::kFast, Kernels::kReference}) {
      RuntimeOptions options;
      options.kernels = kernels;
      options.threads = 2;
      Runtime runtime(options);
      ScopedRuntime scope(&runtime);
      Rwkv7Graph graph(layout, 2, 20);
      const Batch b = RandomBatch(graph, layout.config(), 8);
      grads.emplace_back(layout.total_floats(), 0.0f);
      graph.Forward(params.data(), b.inputs, b.targets, b.B, b.T, b.state.data(), nullptr);
      graph.Backward(params.data(), grads.back().data(), 0.025f, nullptr, nullptr);
    }
    double worst = 0, scale = 0;
    for (size_t i = 0; i < grads[0].size(); ++i) {
      worst = std::max(worst, double(std::fabs(grads[0][i] - grads[1][i])));
      scale = std::max(scale, double(std::fabs(grads[1][i])));
    }
    EXPECT_GT(scale, 0.01) << "head size " << head_size;
    EXPECT_LT(worst, 1e-4 * scale) << "head size " << head_size;
  }
}

TEST(Rwkv7Graph, RejectsTokensOutsideTheVocabulary) {
  const ParamLayout layout = ParamLayout::Rwkv7(TinyRwkv7Config());
  Rwkv7Graph graph(layout, 1, 4);
  const std::vector<float> params(layout.total_floats(), 0.0f);
  const std::vector<int32_t> ok = {1, 2, 3, 4}, bad = {1, 2, 24, 4};
  EXPECT_THROW(graph.Forward(params.data(), bad, ok, 1, 4, nullptr, nullptr), std::exception);
  EXPECT_THROW(graph.Forward(params.data(), ok, ok, 2, 4, nullptr, nullptr), std::exception);
}

}  // namespace
}  // namespace aviary::train
