// `aviary train --tune lora|state` and `aviary merge-lora` end to end on the RWKV-7 stress test
// model (random weights where every term matters, so its state and every matrix move the loss;
// the tiny trained model barely reads its state) and Tiny Shakespeare: each mode lowers the
// validation loss of the frozen base; the merged model gives the logits of base + adapter; the
// tuned state loads into the inference model and gives the logits the training graph computed from
// it; bad input is a clear error.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "aviary/model.h"
#include "aviary/runtime.h"
#include "aviary/state.h"
#include "formats/mapped_file.h"
#include "formats/weight_file.h"
#include "test_data.h"
#include "train/import.h"
#include "train/params.h"
#include "train/rwkv7_graph.h"

namespace aviary::testing {
namespace {

namespace fs = std::filesystem;

const char kBase[] = "models/stress/stress-rwkv-7v0-FP32.bin";
const char kF16Base[] = "models/stress/stress-rwkv-7v0-FP16.bin";

// The log's validation losses, in order (the first is the frozen base's).
std::vector<double> ValLosses(const std::string& dir) {
  std::vector<double> v;
  std::ifstream in(dir + "/log.jsonl");
  std::string s;
  while (std::getline(in, s)) {
    const nlohmann::json j = nlohmann::json::parse(s);
    if (j.contains("val_loss")) v.push_back(j["val_loss"].get<double>());
  }
  return v;
}

std::string Tune(const std::string& base, const std::string& dir, const std::string& extra) {
  return CliPath() + " train --init " + SharedPath(base) + " --data " + ShakespearePart(60000) +
         " --ctx-len 32 --batch 4 --eval-every 10 --eval-windows 8 --threads 2 --out " + dir + " " +
         extra + " 2>&1";
}

const std::vector<int32_t> kTokens = RandomTokens(24, 5);

// The training graph's logits for kTokens from a frozen `base`, with adapters (lora) or a
// start state (state: (StateFloats()) floats).
std::vector<float> GraphLogits(const std::string& base, const train::ParamLayout* lora,
                               const std::vector<float>& adapters, float scale,
                               const float* state) {
  const auto frozen = train::LoadFrozenRwkv7(base);
  train::Rwkv7Graph graph(*frozen, lora, scale, 1, static_cast<int>(kTokens.size()));
  std::vector<float> logits(kTokens.size() * frozen->config().vocab);
  graph.Forward(adapters.data(), kTokens, kTokens, 1, static_cast<int>(kTokens.size()), state,
                nullptr, logits.data());
  return logits;
}

double RelativeDiff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size() || a.empty()) return INFINITY;
  double worst = 0, top = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    worst = std::max(worst, std::fabs(double(a[i]) - b[i]));
    top = std::max(top, std::fabs(double(b[i])));
  }
  return worst / top;
}

TEST(TuneCli, LoraLowersValidationLossAndMergesIntoTheSameModel) {
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  REQUIRE_SHARED(kBase);
  const std::string dir = ProcessTempDir() + "lora";
  const CommandResult r =
      RunCommand(Tune(kBase, dir, "--lora-rank 8 --lora-alpha 16 --steps 10 --lr 1e-2"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("LoRA adapters"), std::string::npos) << r.output;
  const std::vector<double> val = ValLosses(dir);
  ASSERT_GE(val.size(), 2u);
  std::printf("LoRA: validation loss %.4f -> %.4f\n", val.front(), val.back());
  EXPECT_LT(val.back(), val.front() - 0.5);
  EXPECT_TRUE(fs::exists(dir + "/adapter.pth"));
  EXPECT_TRUE(fs::exists(dir + "/adapter.json"));
  EXPECT_FALSE(fs::exists(dir + "/model.pth"));

  // merge-lora, f32: the inference model's logits equal the graph's with base + adapter.
  const std::string merged = dir + "/merged.gguf";
  const CommandResult m = RunCommand(CliPath() + " merge-lora " + SharedPath(kBase) + " " + dir +
                                     "/adapter.pth " + merged + " --type f32 2>&1");
  ASSERT_EQ(m.exit_code, 0) << m.output;
  const nlohmann::json meta = nlohmann::json::parse(std::ifstream(dir + "/adapter.json"));
  EXPECT_EQ(meta["lora_rank"], 8);
  const auto frozen = train::LoadFrozenRwkv7(SharedPath(kBase));
  const train::ParamLayout lora = train::ParamLayout::Rwkv7Lora(
      frozen->config(), 8,
      {std::begin(train::kRwkv7MatrixNames), std::end(train::kRwkv7MatrixNames)});
  std::vector<float> adapters(lora.total_floats(), 0.0f);
  auto file = std::make_shared<MappedFile>(dir + "/adapter.pth");
  const WeightFile wf = ReadPthRaw(file->bytes(), dir + "/adapter.pth");
  for (const train::ParamEntry& e : lora.entries()) {
    const Tensor* t = wf.Find(e.name);
    ASSERT_NE(t, nullptr) << e.name;
    ASSERT_EQ(t->shape, e.shape) << e.name;
    std::memcpy(adapters.data() + e.offset, t->data, e.size * sizeof(float));
  }
  const std::vector<float> want = GraphLogits(SharedPath(kBase), &lora, adapters, 2.0f, nullptr);
  const std::vector<float> got = F32Logits(merged, kTokens);
  const double diff = RelativeDiff(got, want);
  std::printf("merged vs base + adapter: max |difference| / max |logit| %.3g\n", diff);
  EXPECT_LE(diff, 1e-4);
  // And the adapter is not a no-op: the base's own logits differ.
  EXPECT_GT(RelativeDiff(F32Logits(SharedPath(kBase), kTokens), want), 1e-3);

  // A resumed LoRA run continues from its checkpoint.
  const CommandResult resumed =
      RunCommand(CliPath() + " train --resume " + dir + " --steps 12 --threads 2 2>&1");
  EXPECT_EQ(resumed.exit_code, 0) << resumed.output;
}

TEST(TuneCli, LoraOnAnF16BaseLowersValidationLoss) {
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  REQUIRE_SHARED(kF16Base);
  const std::string dir = ProcessTempDir() + "lora-f16";
  const CommandResult r = RunCommand(
      Tune(kF16Base, dir, "--lora-rank 4 --lora-targets att.key,ffn.value --steps 10 --lr 1e-2"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::vector<double> val = ValLosses(dir);
  ASSERT_GE(val.size(), 2u);
  EXPECT_LT(val.back(), val.front() - 0.5);
  const nlohmann::json meta = nlohmann::json::parse(std::ifstream(dir + "/adapter.json"));
  EXPECT_EQ(meta["targets"], nlohmann::json({"att.key", "ffn.value"}));
}

TEST(TuneCli, StateTuningLowersValidationLossAndTheStateLoadsForInference) {
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  REQUIRE_SHARED(kBase);
  const std::string dir = ProcessTempDir() + "state";
  const CommandResult r = RunCommand(Tune(kBase, dir, "--tune state --steps 20 --lr 0.1"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::vector<double> val = ValLosses(dir);
  ASSERT_GE(val.size(), 2u);
  std::printf("state: validation loss %.4f -> %.4f\n", val.front(), val.back());
  EXPECT_LT(val.back(), val.front() - 0.5);
  EXPECT_FALSE(fs::exists(dir + "/model.pth"));

  // The inference model from the saved state gives the graph's logits from the same state.
  RuntimeOptions f32;
  f32.activations = Activations::kF32;
  LoadOptions options;
  options.runtime = std::make_shared<Runtime>(f32);
  const auto model = Model::Load(SharedPath(kBase), options);
  State state = State::Load(dir + "/state.avstate", *model);
  const std::vector<float> start = state.data();
  EXPECT_GT(*std::max_element(start.begin(), start.end()), 0.0f);
  std::vector<float> got;
  model->Eval(kTokens, state, &got, /*all_positions=*/true);
  const std::vector<float> want = GraphLogits(SharedPath(kBase), nullptr, {}, 0.0f, start.data());
  const double diff = RelativeDiff(got, want);
  std::printf("inference from state.avstate vs the graph: %.3g\n", diff);
  EXPECT_LE(diff, 1e-4);
  EXPECT_GT(RelativeDiff(F32Logits(SharedPath(kBase), kTokens), want), 1e-3);
  // A resumed state-tuning run continues from its checkpoint.
  const CommandResult resumed =
      RunCommand(CliPath() + " train --resume " + dir + " --steps 22 --threads 2 2>&1");
  EXPECT_EQ(resumed.exit_code, 0) << resumed.output;
  // aviary chat starts from it.
  const CommandResult chat =
      RunCommand("printf 'Hello\\n' | " + CliPath() + " chat --model " + SharedPath(kBase) +
                 " --load-state " + dir + "/state.avstate --max-tokens 8 --seed 1 2>&1");
  EXPECT_EQ(chat.exit_code, 0) << chat.output;
}

TEST(TuneCli, BadInputIsAClearError) {
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  REQUIRE_SHARED(kBase);
  const std::string dir = ProcessTempDir() + "tune-bad";
  const std::string base = SharedPath(kBase);
  const std::string data = ShakespearePart(20000);
  struct Case {
    std::string args, message;
  };
  const std::vector<Case> cases = {
      {"--init " + base + " --data " + data + " --lora-rank 0 --out " + dir + "1", "--lora-rank"},
      {"--init " + base + " --data " + data + " --lora-rank 100000 --out " + dir + "2",
       "--lora-rank"},
      {"--init " + base + " --data " + data + " --lora-rank 8 --lora-targets att.kee --out " + dir +
           "3",
       "att.receptance, att.key"},
      {"--init " + base + " --data " + data + " --tune state --lora-rank 8 --out " + dir + "4",
       "--tune lora"},
      {"--data " + data + " --tune lora --lora-rank 8 --layers 2 --embd 64 --out " + dir + "5",
       "--init"},
  };
  for (const Case& c : cases) {
    const CommandResult r = RunCommand(CliPath() + " train " + c.args + " 2>&1");
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << c.args << "\n" << r.output;
  }
}

// The checkpoint records the base's fingerprint: a resume refuses a base file that changed.
TEST(TuneCli, ResumeRefusesAChangedBase) {
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  REQUIRE_SHARED(kBase);
  REQUIRE_SHARED(kF16Base);
  const std::string base = ProcessTempDir() + "changing-base.bin";
  fs::copy_file(SharedPath(kBase), base, fs::copy_options::overwrite_existing);
  const std::string dir = ProcessTempDir() + "lora-changed";
  const CommandResult r =
      RunCommand(CliPath() + " train --init " + base + " --data " + ShakespearePart(60000) +
                 " --ctx-len 32 --batch 4 --lora-rank 2 --steps 1 --eval-every 0"
                 " --eval-windows 2 --out " +
                 dir + " 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  fs::copy_file(SharedPath(kF16Base), base, fs::copy_options::overwrite_existing);
  const CommandResult resumed =
      RunCommand(CliPath() + " train --resume " + dir + " --steps 2 2>&1");
  EXPECT_EQ(resumed.exit_code, 1) << resumed.output;
  EXPECT_NE(resumed.output.find("changed since the run started"), std::string::npos)
      << resumed.output;
}

TEST(TuneCli, MergeLoraRefusesAnAdapterForAnotherModel) {
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  REQUIRE_SHARED(kBase);
  const std::string dir = ProcessTempDir() + "lora-other";
  ASSERT_EQ(RunCommand(Tune(kBase, dir, "--lora-rank 2 --steps 1")).exit_code, 0);
  const std::string other = SharedPath("models/tiny-rwkv-7v0-834K-FP32.bin");
  const CommandResult r = RunCommand(CliPath() + " merge-lora " + other + " " + dir +
                                     "/adapter.pth " + dir + "/x.gguf 2>&1");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("the adapter is for a model of"), std::string::npos) << r.output;
  const CommandResult missing = RunCommand(CliPath() + " merge-lora " + SharedPath(kBase) + " " +
                                           SharedPath(kBase) + " " + dir + "/y.gguf 2>&1");
  EXPECT_EQ(missing.exit_code, 1) << missing.output;
  EXPECT_NE(missing.output.find("adapter"), std::string::npos) << missing.output;
}

}  // namespace
}  // namespace aviary::testing
