// aviary estimate: parameter counts against ParamLayout, the FLOP arithmetic, the LLaMA-2 70B
// check, memory ordering, and bad input as clear errors (library and CLI).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "aviary/error.h"
#include "test_data.h"
#include "train/estimate.h"
#include "train/params.h"
#include "train/rwkv7_graph.h"

namespace aviary::testing {
namespace {

using namespace aviary::train;

TEST(Estimate, PresetParameterCountsAreTheLayoutsAndNearTheirNames) {
  struct Named {
    const char* preset;
    double billions;  // BlinkDL's name, or the RWKV-7 paper's count for the World models
  };
  // The RWKV-7 paper counts the 0.1B and 0.4B World models as 0.19B and 0.45B.
  const Named kNamed[] = {{"rwkv7-0.1b", 0.19}, {"rwkv7-0.4b", 0.45}, {"rwkv7-1.5b", 1.5},
                          {"rwkv7-2.9b", 2.9},  {"rwkv7-7.2b", 7.2},  {"rwkv4-1.5b", 1.5},
                          {"rwkv4-14b", 14}};
  for (const Named& n : kNamed) {
    const ModelShape s = ShapeFromPreset(n.preset);
    EXPECT_NEAR(s.params / 1e9, n.billions, 0.05 * n.billions) << n.preset;
    if (s.kind == ShapeKind::kRwkv7) {
      const ParamLayout layout = ParamLayout::Rwkv7(s.rwkv7);
      double sum = 0;
      for (const ParamEntry& e : layout.entries()) sum += static_cast<double>(e.size);
      EXPECT_EQ(s.params, sum) << n.preset;
      EXPECT_EQ(s.embedding, static_cast<double>(layout.Get("emb.weight").size));
      // The matrices are nearly everything but the embedding: the vectors are a few C per layer.
      EXPECT_LT(s.matrix_params, s.params - s.embedding);
      EXPECT_GT(s.matrix_params, 0.99 * (s.params - s.embedding)) << n.preset;
    }
  }
}

TEST(Estimate, SixNDIsTheMatrixTermAndRwkvTermsAreSeparate) {
  const FlopCount g = CountTrainingFlops(ShapeGeneric(70e9), 2e12);
  ASSERT_EQ(g.terms.size(), 1u);
  EXPECT_DOUBLE_EQ(g.model_total(), 6 * 70e9 * 2e12);
  EXPECT_DOUBLE_EQ(g.executed_total(), g.model_total());

  const ModelShape s = ShapeRwkv7(12, 768, 65536);
  const FlopCount f = CountTrainingFlops(s, 1e9);
  EXPECT_DOUBLE_EQ(f.terms[0].per_token, 6 * s.matrix_params);
  // The wkv recurrence: 28 FLOPs per state element (H N N = C N per layer) and token in model
  // FLOPs, 7 more recomputed; the head's logits recomputed, 2 V C.
  const double state = 12.0 * 768 * 64;
  EXPECT_DOUBLE_EQ(f.model_per_token, 6 * s.matrix_params + 28 * state);
  EXPECT_DOUBLE_EQ(f.executed_per_token, f.model_per_token + 7 * state + 2.0 * 65536 * 768);
}

TEST(Estimate, TheLlama2ExampleLandsOnMetasGpuHoursAtTheUtilisationItImplies) {
  // Meta reports 1,720,320 A100-80GB hours for LLaMA-2 70B on 2T tokens; 6 N D at 312 TFLOP/s
  // over those hours is a utilisation of 0.4352.
  const double reported = 1720320;
  const double implied = 6 * 70e9 * 2e12 / (312e12 * 3600 * reported);
  EXPECT_NEAR(implied, 0.435, 0.001);
  GpuSetup g;
  g.peak_tflops = FindGpu("A100").peak_tflops;
  g.devices = 2048;
  g.utilisation = 0.435;
  g.scaling = 1;
  const TimeCost t = EstimateGpuTime(CountTrainingFlops(ShapeGeneric(70e9), 2e12).model_total(), g);
  EXPECT_NEAR(t.device_hours / reported, 1.0, 0.01);
  // The default utilisation (0.4) lands within 10% above it.
  g.utilisation = 0.4;
  const TimeCost d = EstimateGpuTime(CountTrainingFlops(ShapeGeneric(70e9), 2e12).model_total(), g);
  EXPECT_GT(d.device_hours, reported);
  EXPECT_LT(d.device_hours, 1.1 * reported);
}

TEST(Estimate, GpuTimeScalesWithDevicesAndNodes) {
  GpuSetup g;
  g.peak_tflops = 100;
  g.utilisation = 0.5;
  g.price_per_hour = 2;
  const TimeCost one = EstimateGpuTime(1.8e17, g);  // 1.8e17 / 5e13 = 3600 s
  EXPECT_DOUBLE_EQ(one.wall_seconds, 3600);
  EXPECT_DOUBLE_EQ(one.device_hours, 1);
  EXPECT_DOUBLE_EQ(one.cost, 2);
  g.devices = 8;  // one node: no multi-node loss
  EXPECT_DOUBLE_EQ(EstimateGpuTime(1.8e17, g).device_hours, 1);
  g.devices = 16;  // two nodes: scaling 0.9
  EXPECT_NEAR(EstimateGpuTime(1.8e17, g).device_hours, 1 / 0.9, 1e-12);
  const TimeCost cpu = EstimateCpuTime(7200, 2, 0.5);
  EXPECT_DOUBLE_EQ(cpu.device_hours, 1);
  EXPECT_DOUBLE_EQ(cpu.cost, 0.5);
}

TEST(Estimate, MemoryOrdersFullAboveLoraAboveState) {
  for (const char* preset : {"rwkv7-0.1b", "rwkv7-1.5b", "rwkv7-7.2b"}) {
    const ModelShape s = ShapeFromPreset(preset);
    MemoryOptions o;
    o.base_type = "bf16";
    const TrainingMemory m = EstimateMemory(s, o);
    EXPECT_DOUBLE_EQ(m.full_fp32, 16 * s.params);
    EXPECT_DOUBLE_EQ(m.base, 2 * s.params);
    EXPECT_LT(m.lora_total, m.full_fp32) << preset;
    EXPECT_GT(m.lora_total, m.base) << preset;
    EXPECT_LT(m.state_total, m.lora_total) << preset;
    EXPECT_GT(m.state_total, m.base) << preset;
    // LoRA at rank 32 per layer: 4 C x C (2 C each) and F x C, C x F (C + F each).
    const double C = s.n_embd, F = s.n_ffn;
    EXPECT_DOUBLE_EQ(m.lora_params, 32 * s.n_layer * (8 * C + 2 * (C + F)));
    EXPECT_DOUBLE_EQ(m.state_params, s.n_layer * C * s.head_size);
    o.base_type = "q4_0";
    EXPECT_DOUBLE_EQ(EstimateMemory(s, o).base, 18.0 / 32 * s.params);
  }
}

TEST(Estimate, ActivationsAreTheGraphsArenaAndChunksBoundThem) {
  const ModelShape s = ShapeRwkv7(2, 64, 256);
  MemoryOptions o;
  o.batch = 3;
  o.ctx_len = 40;
  const TrainingMemory whole = EstimateMemory(s, o);
  const ParamLayout layout = ParamLayout::Rwkv7(s.rwkv7);
  Rwkv7Graph graph(layout, 3, 40);
  EXPECT_EQ(whole.activations, static_cast<double>(graph.ActivationBytes()));
  o.chunk_len = 8;
  const TrainingMemory chunked = EstimateMemory(s, o);
  EXPECT_EQ(chunked.chunk_len, 8);
  EXPECT_LT(chunked.activations, whole.activations / 3);
}

TEST(Estimate, ChunkedWindowsRecomputeTheForwardAndKeepTheStartStates) {
  const ModelShape s = ShapeRwkv7(2, 64, 256);
  const FlopCount whole = CountTrainingFlops(s, 1e6, 256, 0);
  const FlopCount chunked = CountTrainingFlops(s, 1e6, 256, 64);  // 4 chunks: 3 run twice
  EXPECT_EQ(chunked.model_per_token, whole.model_per_token);
  const double forward = 2 * s.matrix_params + 9.0 * 2 * 64 * 64;
  EXPECT_DOUBLE_EQ(chunked.executed_per_token - whole.executed_per_token, 0.75 * forward);
  EXPECT_EQ(CountTrainingFlops(s, 1e6, 256, 256).executed_per_token, whole.executed_per_token);

  MemoryOptions o;
  o.batch = 3;
  o.ctx_len = 100;
  o.chunk_len = 40;  // 3 chunks, the last of 20
  const TrainingMemory m = EstimateMemory(s, o);
  const ParamLayout layout = ParamLayout::Rwkv7(s.rwkv7);
  Rwkv7Graph graph(layout, 3, 40);
  EXPECT_EQ(m.activations, static_cast<double>(graph.ActivationBytes()));
  EXPECT_EQ(m.chunk_states, 3.0 * 3 * graph.StateFloats() * sizeof(float));
  o.chunk_len = 0;
  EXPECT_EQ(EstimateMemory(s, o).chunk_states, 0);
}

TEST(Estimate, BadInputIsAUsageErrorNamingTheValue) {
  auto message = [](auto&& fn) {
    try {
      fn();
    } catch (const UsageError& e) {
      return std::string(e.what());
    }
    return std::string("no UsageError");
  };
  EXPECT_NE(message([] { FindGpu("tpu-v9"); }).find("a100, h100"), std::string::npos);
  EXPECT_NE(message([] { ShapeFromPreset("rwkv7-99b"); }).find("rwkv7-0.1b"), std::string::npos);
  EXPECT_NE(message([] { CountTrainingFlops(ShapeGeneric(1e9), 0); }).find("--tokens"),
            std::string::npos);
  EXPECT_NE(message([] { CountTrainingFlops(ShapeGeneric(1e9), -5); }).find("--tokens"),
            std::string::npos);
  EXPECT_NE(message([] { ShapeGeneric(-1); }).find("--params"), std::string::npos);
  for (double mfu : {0.0, -0.1, 1.5, std::nan("")}) {
    GpuSetup g;
    g.peak_tflops = 312;
    g.utilisation = mfu;
    EXPECT_NE(message([&] { EstimateGpuTime(1e20, g); }).find("--mfu"), std::string::npos) << mfu;
  }
  EXPECT_NE(message([] { BytesPerParam("q3_x"); }).find("q4_0"), std::string::npos);
  EXPECT_NE(message([] { ShapeRwkv7(2, 100, 256); }).find("multiple of the head"),
            std::string::npos);
  EXPECT_NE(message([] { MeasureCpuTraining(ShapeGeneric(1e6), 1, 8, 1); }).find("RWKV-7"),
            std::string::npos);
  EXPECT_NE(message([] { MeasureCpuTraining(ShapeRwkv7(1, 64, 256), 0, 8, 1); }).find("--batch"),
            std::string::npos);
}

// The CLI: the FAQ example's printout, JSON, a model file, and bad input as one-line errors.
TEST(EstimateCli, PrintsTheFaqExampleAndReadsAModelFile) {
  const CommandResult r =
      RunCommand(CliPath() + " estimate --params 70e9 --tokens 2e12 --gpu a100 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* want : {"Assumptions", "312 TFLOP/s", "8.4e+23", "A100-hours", "1.87 M"}) {
    EXPECT_NE(r.output.find(want), std::string::npos) << want << "\n" << r.output;
  }
  const CommandResult j = RunCommand(CliPath() +
                                     " estimate --preset rwkv7-0.1b --tokens 1e9 --gpu h100 "
                                     "--gpus 16 --price-per-hour 2 --json");
  ASSERT_EQ(j.exit_code, 0) << j.output;
  const nlohmann::json out = nlohmann::json::parse(j.output);
  EXPECT_GT(out["time"]["cost_usd"].get<double>(), 0);
  EXPECT_NEAR(out["time"]["device_hours"].get<double>() * 2, out["time"]["cost_usd"].get<double>(),
              1e-9);

  const std::string model = SharedPath("models/tiny-rwkv-7v0-834K-FP32.bin");
  if (!std::filesystem::exists(model)) {
    if (InCI()) FAIL() << "missing " << model;
    GTEST_SKIP() << "missing " << model;
  }
  const CommandResult f = RunCommand(CliPath() + " estimate --model " + model +
                                     " --tokens 1M --cpu-tokens-per-s 1000 2>&1");
  ASSERT_EQ(f.exit_code, 0) << f.output;
  EXPECT_NE(f.output.find("RWKV-7"), std::string::npos) << f.output;
  EXPECT_NE(f.output.find("16.7 min"), std::string::npos) << f.output;  // 1e6 / 1000 s
}

// --measure trains a tiny shape for real and reports what it measured.
TEST(EstimateCli, MeasureTrainsTheShapeHere) {
  const CommandResult r = RunCommand(CliPath() +
                                     " estimate --layers 1 --embd 64 --vocab 256 --ctx-len 16 "
                                     "--batch 2 --measure --measure-steps 2 --threads 1 "
                                     "--tokens 1M --json 2>&1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const nlohmann::json j = nlohmann::json::parse(r.output);
  const double tps = j["hardware"]["tokens_per_second"].get<double>();
  EXPECT_GT(tps, 0);
  EXPECT_GT(j["hardware"]["measured_seconds"].get<double>(), 0);
  EXPECT_NE(j["hardware"]["label"].get<std::string>().find("1 threads"), std::string::npos);
  EXPECT_NEAR(j["time"]["wall_seconds"].get<double>(), 1e6 / tps, 1e-6 * 1e6 / tps);
}

TEST(EstimateCli, BadInputIsAOneLineError) {
  const std::string text = ProcessTempDir() + "not-a-model.txt";
  {
    FILE* f = std::fopen(text.c_str(), "w");
    std::fputs("hello", f);
    std::fclose(f);
  }
  struct Case {
    std::string args, message;
    int code;
  };
  const std::vector<Case> cases = {
      {"--params 70e9 --tokens 2e12 --gpu tpu", "known GPUs are a100", 2},
      {"--params 70e9 --tokens 0 --gpu a100", "--tokens", 2},
      {"--params 70e9 --tokens -3 --gpu a100", "--tokens", 2},
      {"--params 70e9 --tokens lots --gpu a100", "--tokens", 2},
      {"--params 70e9 --gpu a100", "--tokens is required", 2},
      {"--params 70e9 --tokens 2e12 --gpu a100 --mfu 1.5", "--mfu", 2},
      {"--params 70e9 --tokens 2e12 --gpu a100 --mfu 0", "--mfu", 2},
      {"--preset rwkv7-0.1b --tokens 2e12 --mfu 2", "--mfu", 2},
      {"--preset rwkv7-0.1b --tokens 2e12 --gpu a100 --gpus 16 --scaling 0", "--scaling", 2},
      {"--preset rwkv7-0.1b --tokens 1e9 --base-type q3", "known types are f32", 2},
      {"--preset rwkv7-0.1b --tokens 1e9 --ctx-len 64 --chunk-len 128", "--chunk-len", 2},
      {"--preset rwkv7-7.2b --tokens 1e9 --batch 1048576 --ctx-len 16777216", "tokens per pass", 2},
      {"--tokens 2e12 --gpu a100", "give the model one way", 2},
      {"--preset rwkv7-0.1b --params 1e9 --tokens 1e9", "give the model one way", 2},
      {"--preset rwkv7-0.1b --vocab 256 --tokens 1e9", "--vocab and --arch", 2},
      {"--preset rwkv7-0.1b --tokens 1e9 --gpu a100 --cpu-tokens-per-s 5", "hardware one way", 2},
      {"--model " + text + " --tokens 1e9", "not-a-model.txt", 1},
      {"--layers 2 --embd 100 --tokens 1e9", "multiple of the head", 2},
  };
  for (const Case& c : cases) {
    const CommandResult r = RunCommand(CliPath() + " estimate " + c.args + " 2>&1");
    EXPECT_EQ(r.exit_code, c.code) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.message), std::string::npos) << c.args << "\n" << r.output;
    EXPECT_LE(std::count(r.output.begin(), r.output.end(), '\n'), 1) << c.args << "\n" << r.output;
  }
}

}  // namespace
}  // namespace aviary::testing
