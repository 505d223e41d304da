// LoRA and state tuning in the training graph (src/train/rwkv7_graph.cpp, linear.cpp): a frozen
// base as the file stores it (F32, BF16, Q8_0) gives the full graph's loss; the adapters'
// gradients and the start state's gradient match finite differences of the graph's own forward
// pass; adapters with B = 0 leave the loss exactly the base's; base + adapter equals the float
// model W + scale B A.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "aviary/model.h"
#include "formats/gguf_writer.h"
#include "formats/mapped_file.h"
#include "formats/weight_file.h"
#include "test_data.h"
#include "aviary/error.h"
#include "train/export.h"
#include "train/import.h"
#include "train/params.h"
#include "train/rwkv7_graph.h"
#include "train_fixtures.h"

namespace aviary::train {
namespace {

using testing::ProcessTempDir;
using testing::RandomRwkv7Params;
using testing::TinyRwkv7Config;

// The tiny model written as a file of `type` (nullopt: F32 .pth; else a GGUF as `aviary
// convert --type` writes it), its float weights (as stored, widened) in `params`.
std::string WriteBase(const std::string& name, std::optional<DType> type,
                      std::vector<float>* params) {
  const ParamLayout layout = ParamLayout::Rwkv7(TinyRwkv7Config());
  const std::vector<float> p = RandomRwkv7Params(layout, 1);
  const std::string pth = ProcessTempDir() + name + ".pth";
  ExportRwkv7Pth(pth, layout, p.data());
  std::string path = pth;
  if (type) {
    path = ProcessTempDir() + name + ".gguf";
    auto file = std::make_shared<MappedFile>(pth);
    WeightFile wf = ReadWeightFile(file->bytes(), pth);
    wf.backing = file;
    const auto model = Model::LoadFromMemory(file->bytes(), pth);
    GgufWriteOptions options;
    options.type = type;
    WriteGguf(wf, model->info(), options, path);
  }
  if (params) {
    ImportedRwkv7 imported = LoadRwkv7Params(path);
    params->assign(imported.params.begin(), imported.params.end());
  }
  return path;
}

struct Batch {
  int B = 2, T = 20;
  std::vector<int32_t> inputs, targets;
};

Batch RandomBatch(int vocab, uint32_t seed) {
  Batch b;
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> tok(0, vocab - 1);
  for (int i = 0; i < b.B * b.T; ++i) {
    b.inputs.push_back(tok(rng));
    b.targets.push_back(tok(rng));
  }
  return b;
}

// scale x (cross-entropy sum + L2Wrap's 1e-4 x each row's largest logit), as train_graph_test.
double Objective(Rwkv7Graph& g, const float* params, const Batch& b, float scale,
                 const float* state, int V) {
  std::vector<float> logits(static_cast<size_t>(b.B) * b.T * V);
  const LossSum loss =
      g.Forward(params, b.inputs, b.targets, b.B, b.T, state, nullptr, logits.data());
  double max_sum = 0;
  for (size_t m = 0; m < logits.size() / V; ++m) {
    max_sum += *std::max_element(logits.begin() + m * V, logits.begin() + (m + 1) * V);
  }
  return scale * (loss.sum + 1e-4 * max_sum);
}

const std::vector<std::string> kAllTargets(std::begin(kRwkv7MatrixNames),
                                           std::end(kRwkv7MatrixNames));

std::vector<float> RandomAdapters(const ParamLayout& lora, uint32_t seed, float b_scale) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-0.3f, 0.3f);
  std::vector<float> p(lora.total_floats(), 0.0f);
  for (const ParamEntry& e : lora.entries()) {
    const float s = e.name.ends_with("lora_B") ? b_scale : 1.0f;
    for (size_t i = 0; i < e.size; ++i) p[e.offset + i] = s * u(rng);
  }
  return p;
}

TEST(FrozenBase, F32BaseGivesTheFullGraphsLossBitForBit) {
  std::vector<float> params;
  const std::string path = WriteBase("frozen-f32", std::nullopt, &params);
  const auto base = LoadFrozenRwkv7(path);
  const ParamLayout full = ParamLayout::Rwkv7(TinyRwkv7Config());
  Rwkv7Graph full_graph(full, 2, 20), frozen_graph(*base, nullptr, 0.0f, 2, 20);
  const Batch b = RandomBatch(24, 7);
  const LossSum want =
      full_graph.Forward(params.data(), b.inputs, b.targets, 2, 20, nullptr, nullptr);
  const LossSum got = frozen_graph.Forward(nullptr, b.inputs, b.targets, 2, 20, nullptr, nullptr);
  EXPECT_EQ(want.sum, got.sum);
  EXPECT_GT(base->StoredBytes(), 0u);
}

TEST(Lora, ZeroBGivesTheBasesLossExactly) {
  const std::string path = WriteBase("frozen-q8", DType::kQ8_0, nullptr);
  const auto base = LoadFrozenRwkv7(path);
  const ParamLayout lora = ParamLayout::Rwkv7Lora(TinyRwkv7Config(), 4, kAllTargets);
  const std::vector<float> adapters = RandomAdapters(lora, 3, 0.0f);  // A random, B = 0
  Rwkv7Graph plain(*base, nullptr, 0.0f, 2, 20), adapted(*base, &lora, 2.0f, 2, 20);
  const Batch b = RandomBatch(24, 8);
  const LossSum want = plain.Forward(nullptr, b.inputs, b.targets, 2, 20, nullptr, nullptr);
  const LossSum got =
      adapted.Forward(adapters.data(), b.inputs, b.targets, 2, 20, nullptr, nullptr);
  EXPECT_EQ(want.sum, got.sum);
}

// Base + adapter equals the float model whose matrices are W + scale B A.
TEST(Lora, AdapterEqualsTheMergedMatrices) {
  std::vector<float> params;
  const std::string path = WriteBase("frozen-merge", std::nullopt, &params);
  const auto base = LoadFrozenRwkv7(path);
  const Rwkv7Config c = TinyRwkv7Config();
  const std::vector<std::string> targets = {"att.key", "att.output", "ffn.value"};
  const ParamLayout lora = ParamLayout::Rwkv7Lora(c, 3, targets);
  const std::vector<float> adapters = RandomAdapters(lora, 4, 1.0f);
  const float scale = 0.5f;
  const ParamLayout full = ParamLayout::Rwkv7(c);
  for (int l = 0; l < c.n_layer; ++l) {
    for (const std::string& t : targets) {
      const std::string p = "blocks." + std::to_string(l) + "." + t;
      const ParamEntry& W = full.Get(p + ".weight");
      const ParamEntry& A = lora.Get(p + ".lora_A");
      const ParamEntry& B = lora.Get(p + ".lora_B");
      const int64_t rows = W.shape[0], cols = W.shape[1], R = A.shape[0];
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) {
          double s = 0;
          for (int64_t r = 0; r < R; ++r) {
            s += double(adapters[B.offset + i * R + r]) * adapters[A.offset + r * cols + j];
          }
          params[W.offset + i * cols + j] += static_cast<float>(scale * s);
        }
      }
    }
  }
  Rwkv7Graph merged(full, 2, 20), adapted(*base, &lora, scale, 2, 20);
  const Batch b = RandomBatch(c.vocab, 9);
  std::vector<float> want(2 * 20 * c.vocab), got(want.size());
  merged.Forward(params.data(), b.inputs, b.targets, 2, 20, nullptr, nullptr, want.data());
  adapted.Forward(adapters.data(), b.inputs, b.targets, 2, 20, nullptr, nullptr, got.data());
  double worst = 0, top = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    worst = std::max(worst, std::fabs(double(want[i]) - got[i]));
    top = std::max(top, std::fabs(double(want[i])));
  }
  EXPECT_LE(worst, 1e-5 * top) << "largest logit " << top;
}

class LoraGradients : public ::testing::TestWithParam<int> {};

// The adapters' gradients against central differences, on a frozen F32, BF16 and Q8_0 base.
TEST_P(LoraGradients, MatchFiniteDifferences) {
  const std::optional<DType> types[] = {std::nullopt, DType::kBF16, DType::kQ8_0};
  const std::optional<DType> type = types[GetParam()];
  const std::string path = WriteBase("lora-grad-" + std::to_string(GetParam()), type, nullptr);
  const auto base = LoadFrozenRwkv7(path);
  const Rwkv7Config c = TinyRwkv7Config();
  const ParamLayout lora = ParamLayout::Rwkv7Lora(c, 4, kAllTargets);
  std::vector<float> adapters = RandomAdapters(lora, 5, 1.0f);
  const float lora_scale = 0.75f;
  Rwkv7Graph graph(*base, &lora, lora_scale, 2, 20);
  const Batch b = RandomBatch(c.vocab, 6);
  const float scale = 1.0f / (b.B * b.T);
  std::vector<float> grads(lora.total_floats(), 0.0f);
  graph.Forward(adapters.data(), b.inputs, b.targets, b.B, b.T, nullptr, nullptr);
  graph.Backward(adapters.data(), grads.data(), scale, nullptr, nullptr);
  std::mt19937 rng(7);
  int checked = 0;
  for (const ParamEntry& e : lora.entries()) {
    for (int s = 0; s < 3; ++s) {
      const size_t i = e.offset + rng() % e.size;
      const float keep = adapters[i];
      const float h = 1e-2f;
      adapters[i] = keep + h;
      const double up = Objective(graph, adapters.data(), b, scale, nullptr, c.vocab);
      adapters[i] = keep - h;
      const double down = Objective(graph, adapters.data(), b, scale, nullptr, c.vocab);
      adapters[i] = keep;
      const double fd = (up - down) / (2.0 * h);
      EXPECT_NEAR(grads[i], fd, 2e-4 + 0.03 * std::fabs(fd)) << e.name << " element " << i;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 3 * 2 * 2 * 6);
}

INSTANTIATE_TEST_SUITE_P(F32Bf16Q8, LoraGradients, ::testing::Values(0, 1, 2));

// State tuning: one start state for the whole batch; its gradient is d_state_in summed over the
// sequences, checked on the wkv part against central differences.
TEST(StateTuning, GradientMatchesFiniteDifferences) {
  const std::string path = WriteBase("state-grad", DType::kBF16, nullptr);
  const auto base = LoadFrozenRwkv7(path);
  const Rwkv7Config c = TinyRwkv7Config();
  Rwkv7Graph graph(*base, nullptr, 0.0f, 2, 20);
  const Batch b = RandomBatch(c.vocab, 11);
  const size_t SF = graph.StateFloats();
  std::mt19937 rng(12);
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  std::vector<float> state(SF);
  for (float& s : state) s = u(rng);
  auto broadcast = [&](const std::vector<float>& s) {
    std::vector<float> all;
    for (int i = 0; i < b.B; ++i) all.insert(all.end(), s.begin(), s.end());
    return all;
  };
  const float scale = 1.0f / (b.B * b.T);
  std::vector<float> batch_state = broadcast(state), d_state(batch_state.size());
  graph.Forward(nullptr, b.inputs, b.targets, b.B, b.T, batch_state.data(), nullptr);
  graph.Backward(nullptr, nullptr, scale, nullptr, d_state.data());
  const int C = c.n_embd, N = c.head_size;
  for (int s = 0; s < 24; ++s) {
    const int layer = s % c.n_layer;
    const size_t i = layer * (2 * C + C * N) + C + rng() % (C * N);  // inside the wkv state
    double analytic = 0;
    for (int k = 0; k < b.B; ++k) analytic += d_state[k * SF + i];
    const float keep = state[i];
    const float h = 1e-2f;
    state[i] = keep + h;
    const double up = Objective(graph, nullptr, b, scale, broadcast(state).data(), c.vocab);
    state[i] = keep - h;
    const double down = Objective(graph, nullptr, b, scale, broadcast(state).data(), c.vocab);
    state[i] = keep;
    const double fd = (up - down) / (2.0 * h);
    EXPECT_NEAR(analytic, fd, 2e-4 + 0.03 * std::fabs(fd)) << "state element " << i;
  }
}

// adapter.json as ExportLoraAdapter writes it parses; each broken field is an error that names
// the file and the field's problem.
TEST(LoraAdapterMeta, ParsesTheDescriptionAndNamesWhatIsWrong) {
  const std::string good =
      R"({"format":"aviary-lora","version":1,"lora_rank":8,"lora_alpha":16,"targets":)"
      R"(["att.key","ffn.value"],"base_model":"m.gguf","base_fingerprint":7,"n_layer":2,)"
      R"("n_embd":32,"n_ffn":64})";
  const LoraAdapterMeta m = ParseLoraAdapterMeta(good, "a.json");
  EXPECT_EQ(m.rank, 8);
  EXPECT_EQ(m.alpha, 16.0);
  EXPECT_EQ(m.targets, (std::vector<std::string>{"att.key", "ffn.value"}));
  EXPECT_EQ(m.base_fingerprint, 7u);
  EXPECT_EQ(m.n_ffn, 64);
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"{", "not an aviary LoRA"},
      {with("aviary-lora", "other"), "not an aviary LoRA"},
      {R"({"format":28})", "not an aviary LoRA"},
      {with(R"("lora_rank":8)", R"("lora_rank":"8")"), "\"lora_rank\" must be an integer"},
      {with(R"("lora_rank":8)", R"("lora_rank":1.2e84)"), "\"lora_rank\" must be an integer"},
      {with(R"("n_layer":2)", R"("n_layer":2.5)"), "\"n_layer\" must be an integer"},
      {with(R"("n_ffn":64)", R"("n_ffn":18446744073709551615)"), "\"n_ffn\" must be"},
      {with(R"("base_fingerprint":7)", R"("base_fingerprint":-1e300)"), "base_fingerprint"},
      {with(R"("lora_alpha":16)", R"("lora_alpha":"16")"), "lora_alpha"},
      {with(R"(["att.key","ffn.value"])", "[1]"), "\"targets\""},
      {with(R"("lora_rank":8)", R"("lora_rank":0)"), "lora_rank"},
      {with(R"("lora_alpha":16)", R"("lora_alpha":-1)"), "lora_alpha"},
      {with(R"("n_embd":32)", R"("n_embd":0)"), "\"n_embd\" must be an integer in 1..1048576"},
      {with("ffn.value", "att.gate"), "unknown target 'att.gate'"},
      {with(R"(["att.key","ffn.value"])", "[]"), "no targets"},
  };
  for (const auto& [text, message] : bad) {
    try {
      ParseLoraAdapterMeta(text, "a.json");
      ADD_FAILURE() << "accepted: " << text;
    } catch (const aviary::Error& e) {
      EXPECT_EQ(std::string(e.what()).rfind("a.json: ", 0), 0u) << e.what();
      EXPECT_NE(std::string(e.what()).find(message), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace aviary::train
