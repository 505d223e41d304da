// The runtime context (aviary/runtime.h): each Runtime's own pool, its options honoured by the
// models loaded with it, and two models on two runtimes running at once in one process.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "aviary/error.h"
#include "aviary/model.h"
#include "aviary/runtime.h"
#include "tensor/kernels.h"
#include "tensor/thread_pool.h"
#include "test_data.h"

namespace aviary::testing {
namespace {

const char* kStress7F16 = "models/stress/stress-rwkv-7v0-FP16.bin";
const char* kStress6F32 = "models/stress/stress-rwkv-6v0-FP32.bin";

// A prompt of one full chunk: long enough that the token loops and the products are split
// over the threads.
std::vector<int32_t> Prompt() {
  std::vector<int32_t> tokens(128);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 37 + 11) % 256);
  return tokens;
}

// The logits after the prompt, then after each of `steps` greedy one-token steps, end to end.
std::vector<float> Evaluate(const Model& model, int steps = 8) {
  State state = model.NewState();
  std::vector<float> logits, all;
  model.Eval(Prompt(), state, &logits);
  all = logits;
  for (int i = 0; i < steps; ++i) {
    const int32_t next =
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    model.Eval({&next, 1}, state, &logits);
    all.insert(all.end(), logits.begin(), logits.end());
  }
  return all;
}

bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

std::unique_ptr<Model> LoadWith(const char* relative, const RuntimeOptions& options) {
  LoadOptions load;
  load.runtime = std::make_shared<Runtime>(options);
  return Model::Load(SharedPath(relative), load);
}

TEST(Runtime, OptionsAndThreadCount) {
  EXPECT_EQ(Runtime({.threads = 3}).threads(), 3);
  EXPECT_EQ(Runtime().threads(), HardwareThreads());
  EXPECT_THROW(Runtime({.threads = -1}), UsageError);
  EXPECT_THROW(Runtime({.threads = 1025}), UsageError);
  const Runtime reference({.kernels = Kernels::kReference});
  EXPECT_STREQ(reference.kernel_target(), "scalar");
  EXPECT_FALSE(reference.int8_activations());
  EXPECT_FALSE(reference.bf16_activations());
  const Runtime fast({.kernels = Kernels::kFast});
  EXPECT_STRNE(fast.kernel_target(), "scalar");
  EXPECT_STREQ(fast.kernel_target(), KernelTargetOf(Kernels::kFast));
  EXPECT_EQ(Runtime({.activations = Activations::kF32}).bf16_activations(), false);
  EXPECT_EQ(Runtime({.activations = Activations::kInt8}).bf16_activations(), false);
  EXPECT_EQ(Runtime({.activations = Activations::kAuto}).bf16_activations(), bf16::CpuSupported());
  EXPECT_EQ(Runtime({.activations = Activations::kInt8}).int8_activations(), int8::CpuSupported());
}

TEST(Runtime, ScopedRuntimeIsWhatTheKernelsSee) {
  Runtime two({.threads = 2, .kernels = Kernels::kReference});
  Runtime* outer = &CurrentRuntime();
  {
    const ScopedRuntime scope(&two);
    EXPECT_EQ(&CurrentRuntime(), &two);
    EXPECT_EQ(NumThreads(), 2);
    EXPECT_EQ(ActiveKernels(), Kernels::kReference);
    const ScopedRuntime keep(nullptr);  // keeps the current one
    EXPECT_EQ(&CurrentRuntime(), &two);
  }
  EXPECT_EQ(&CurrentRuntime(), outer);
}

// A pool's workers evaluate with their owner's options, and its counters see its own loops.
TEST(Runtime, ParallelLoopsRunOnTheCurrentRuntimesPool) {
  Runtime runtime({.threads = 2, .kernels = Kernels::kReference});
  const ScopedRuntime scope(&runtime);
  std::vector<int> kernels(64, -1);
  ParallelFor(64, [&](int64_t task, int) {
    kernels[task] = static_cast<int>(ActiveKernels());
    std::this_thread::sleep_for(std::chrono::microseconds(200));  // let the worker take some
  });
  for (int k : kernels) EXPECT_EQ(k, static_cast<int>(Kernels::kReference));
  EXPECT_EQ(runtime.stats().parallel_runs, 1u);
  EXPECT_EQ(runtime.stats().busy_fallbacks, 0u);
}

// A second thread arriving while the pool is busy runs its loop on its own thread, and the
// runtime counts it (what TwoRuntimesRunAtOnce... checks never happens across runtimes).
TEST(Runtime, ABusyPoolRunsASecondCallerOnItsOwnThreadAndCountsIt) {
  Runtime runtime({.threads = 2});
  const ScopedRuntime scope(&runtime);
  std::atomic<int> inner_tasks{0};
  ParallelFor(2, [&](int64_t task, int) {
    if (task != 0) return;
    std::thread other([&] {  // the pool is running this loop: it is busy
      const ScopedRuntime same(&runtime);
      ParallelFor(8, [&](int64_t, int) { inner_tasks.fetch_add(1); });
    });
    other.join();
  });
  EXPECT_EQ(inner_tasks.load(), 8);
  EXPECT_EQ(runtime.stats().parallel_runs, 1u);
  EXPECT_EQ(runtime.stats().busy_fallbacks, 1u);
}

TEST(Runtime, ModelsKeepTheirRuntime) {
  REQUIRE_SHARED(kStress6F32);
  LoadOptions load;
  load.runtime = std::make_shared<Runtime>(RuntimeOptions{.threads = 2});
  const auto model = Model::Load(SharedPath(kStress6F32), load);
  EXPECT_EQ(&model->runtime(), load.runtime.get());
  const auto plain = Model::Load(SharedPath(kStress6F32));
  EXPECT_EQ(&plain->runtime(), Runtime::Default().get());
  const uint64_t before = load.runtime->stats().parallel_runs;
  Evaluate(*model, 0);
  EXPECT_GT(load.runtime->stats().parallel_runs, before);
}

TEST(Runtime, LoadModeIsHonoured) {
  REQUIRE_SHARED(kStress6F32);
  for (const auto& [mode, name] : {std::pair{LoadMode::kMmap, "mmap"},
                                   {LoadMode::kRead, "read"},
                                   {LoadMode::kAuto, "mmap"}}) {  // auto maps a small file
    LoadOptions load;
    load.load_mode = mode;
    EXPECT_EQ(Model::Load(SharedPath(kStress6F32), load)->info().load_mode, name);
  }
}

// Kernels and activations given to a model's runtime are what its Eval uses, whatever the
// calling thread has installed; they match the thread-wide switches the kernel tests use.
TEST(Runtime, ModelOptionsAreHonoured) {
  REQUIRE_SHARED(kStress7F16);
  RuntimeGuard guard;
  const auto f32 = LoadWith(kStress7F16, {.activations = Activations::kF32});
  const auto reference = LoadWith(kStress7F16, {.kernels = Kernels::kReference});
  const auto plain = Model::Load(SharedPath(kStress7F16));  // the thread's current runtime

  SetKernels(Kernels::kFast);
  RoundedActivations::Set(false);  // float activations, as AVIARY_ACTIVATIONS=f32 was
  const std::vector<float> want_f32 = Evaluate(*plain);
  SetKernels(Kernels::kReference);
  const std::vector<float> want_reference = Evaluate(*plain);
  SetKernels(Kernels::kFast);
  RoundedActivations::Set(true);
  const std::vector<float> want_auto = Evaluate(*plain);

  // The thread's own setting (fast, rounded) does not leak into the models' evaluations.
  EXPECT_TRUE(BitEqual(Evaluate(*f32), want_f32));
  EXPECT_TRUE(BitEqual(Evaluate(*reference), want_reference));
  if (bf16::CpuSupported()) {
    EXPECT_FALSE(BitEqual(want_auto, want_f32)) << "bfloat16 activations should move the logits";
  }
}

// Two models on two runtimes of different thread counts, evaluated at the same time from two
// threads: each gives exactly what it gives alone, and each runtime ran its loops on its own
// pool (none fell back to the caller's thread because the other held a pool).
TEST(Runtime, TwoRuntimesRunAtOnceWithTheResultsOfEachAlone) {
  REQUIRE_SHARED(kStress7F16);
  REQUIRE_SHARED(kStress6F32);
  const auto a = LoadWith(kStress7F16, {.threads = 2});
  const auto b = LoadWith(kStress6F32, {.threads = 3});
  const std::vector<float> alone_a = Evaluate(*a), alone_b = Evaluate(*b);
  // The thread count changes no result.
  EXPECT_TRUE(BitEqual(Evaluate(*LoadWith(kStress7F16, {.threads = 1})), alone_a));
  EXPECT_TRUE(BitEqual(Evaluate(*LoadWith(kStress6F32, {.threads = 1})), alone_b));

  const Runtime::Stats a0 = a->runtime().stats(), b0 = b->runtime().stats();
  constexpr int kRounds = 6;
  std::vector<std::vector<float>> got_a(kRounds), got_b(kRounds);
  std::thread ta([&] {
    for (int r = 0; r < kRounds; ++r) got_a[r] = Evaluate(*a);
  });
  std::thread tb([&] {
    for (int r = 0; r < kRounds; ++r) got_b[r] = Evaluate(*b);
  });
  ta.join();
  tb.join();
  for (int r = 0; r < kRounds; ++r) {
    EXPECT_TRUE(BitEqual(got_a[r], alone_a)) << "round " << r;
    EXPECT_TRUE(BitEqual(got_b[r], alone_b)) << "round " << r;
  }
  const Runtime::Stats a1 = a->runtime().stats(), b1 = b->runtime().stats();
  EXPECT_GT(a1.parallel_runs - a0.parallel_runs, static_cast<uint64_t>(kRounds));
  EXPECT_GT(b1.parallel_runs - b0.parallel_runs, static_cast<uint64_t>(kRounds));
  EXPECT_EQ(a1.busy_fallbacks, a0.busy_fallbacks);
  EXPECT_EQ(b1.busy_fallbacks, b0.busy_fallbacks);
}

// Two threads sharing one runtime still get the right results: the one that finds the pool
// busy runs its loops on its own thread, and the runtime counts it.
TEST(Runtime, OneRuntimeSharedByTwoThreadsStaysExact) {
  REQUIRE_SHARED(kStress6F32);
  const auto model = LoadWith(kStress6F32, {.threads = 2});
  const std::vector<float> alone = Evaluate(*model);
  std::vector<std::vector<float>> got(2 * 4);
  std::thread t1([&] {
    for (int r = 0; r < 4; ++r) got[r] = Evaluate(*model);
  });
  std::thread t2([&] {
    for (int r = 0; r < 4; ++r) got[4 + r] = Evaluate(*model);
  });
  t1.join();
  t2.join();
  for (const auto& g : got) EXPECT_TRUE(BitEqual(g, alone));
}

}  // namespace
}  // namespace aviary::testing
