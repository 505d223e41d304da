// Access to ../shared test data. A test that needs a file calls RequireShared(): when the file
// is missing it FAILS in CI (CI=true) and SKIPS with a printed reason elsewhere.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "aviary/runtime.h"
#include "tensor/bf16_matmul.h"
#include "tensor/int8_matmul.h"
#include "tensor/thread_pool.h"

namespace aviary::testing {

// Absolute path of a file under ../shared (e.g. "models/stress/stress-rwkv-7v0-FP32.bin").
std::string SharedPath(const std::string& relative);

// Deterministic pseudo-random byte tokens (splitmix64): the same `n` and `seed`, the same ids.
std::vector<int32_t> RandomTokens(size_t n, uint64_t seed);
bool InCI();
// A directory private to this test process (TempDir()/aviary-<pid>-XXXXXX/, made by mkdtemp on
// first use, with a trailing slash; removed at exit when the process's tests passed): ctest runs
// the tests of one binary as parallel processes, so fixed names in TempDir() would collide.
const std::string& ProcessTempDir();
// Reads a whole file; empty vector if unreadable.
std::vector<uint8_t> ReadFileBytes(const std::string& path);
// The first `bytes` of ../shared/data/tinyshakespeare.txt as a file in ProcessTempDir() (the
// training tests' small corpora); the caller checks the shared file with REQUIRE_SHARED.
std::string ShakespearePart(size_t bytes);
// 256 (or n) float32 little-endian values.
std::vector<float> ReadFloats(const std::string& path);

// Every model under ../shared/models, with the file of its exact float64 logits and tolerance.
struct ModelCase {
  std::string model;     // relative to shared/
  std::string expected;  // relative to shared/
  double tolerance;      // FP32 1e-4, FP16 5e-3, quantized 0.15 (issue bounds)
  bool fp32;
  // With rounded activations (the default where the CPU has them): 8-bit ones for quantized
  // matrices and bfloat16 ones for F16 matrices are held to the quantized bound (F16 models
  // measured at most 0.062, stress 5v1; quantized 0.13). FP32 models have no rounded matrix.
  double rounded_tolerance() const { return fp32 ? tolerance : std::max(tolerance, 0.15); }
};
std::vector<ModelCase> AllModelCases();
// The prompt the expected logits were made with: the bytes `"in` fed one at a time.
inline const std::vector<int32_t>& ExpectedPrompt() {
  static const std::vector<int32_t> kPrompt = {0x22, 0x69, 0x6e};
  return kPrompt;
}

// Runs a command through /bin/sh, capturing stdout (and stderr with 2>&1 in the command).
struct CommandResult {
  int exit_code;
  std::string output;
};
CommandResult RunCommand(const std::string& command);
// Every position's logits of `tokens` from the model file with float activations (the exact
// mode), from a zero state.
std::vector<float> F32Logits(const std::string& model_path, const std::vector<int32_t>& tokens);
inline std::string CliPath() { return AVIARY_CLI; }

// The runtime the kernels use on this thread, for tests that call kernels directly or evaluate
// models loaded without a runtime of their own: one Runtime per set of options, kept for the
// whole test program and installed with SetThreadRuntime (thread_pool.h).
RuntimeOptions CurrentOptions();
void UseOptions(const RuntimeOptions& options);
inline void SetKernels(Kernels kernels) {
  RuntimeOptions o = CurrentOptions();
  o.kernels = kernels;
  UseOptions(o);
}
inline void SetNumThreads(int threads) {  // 0: the hardware threads
  RuntimeOptions o = CurrentOptions();
  o.threads = threads;
  UseOptions(o);
}
// The two rounded-activation paths as Activations allows them: 8-bit on alone is kInt8,
// bfloat16 on brings 8-bit with it (kAuto), 8-bit off takes bfloat16 with it (kF32).
inline void SetInt8Activations(bool on) {
  RuntimeOptions o = CurrentOptions();
  if (!on) o.activations = Activations::kF32;
  if (on && o.activations == Activations::kF32) o.activations = Activations::kInt8;
  UseOptions(o);
}
inline void SetBf16Activations(bool on) {
  RuntimeOptions o = CurrentOptions();
  if (on) o.activations = Activations::kAuto;
  if (!on && o.activations == Activations::kAuto) o.activations = Activations::kInt8;
  UseOptions(o);
}

// Restores this thread's runtime options (kernels, threads, activations) at the end of a scope.
class RuntimeGuard {
 public:
  RuntimeGuard() : saved_(CurrentOptions()) {}
  ~RuntimeGuard() { UseOptions(saved_); }
  RuntimeGuard(const RuntimeGuard&) = delete;
  RuntimeGuard& operator=(const RuntimeGuard&) = delete;

 private:
  RuntimeOptions saved_;
};

// The rounded-activation paths of the fast MatMul (8-bit for quantized matrices, bfloat16 for
// F16/BF16 ones; both on by default where the CPU has them): restored at the end of the scope;
// the second constructor also sets them together (tests of the exact float kernels turn them
// off).
class RoundedActivations {
 public:
  RoundedActivations() : saved_(CurrentOptions().activations) {}
  explicit RoundedActivations(bool on) : RoundedActivations() { Set(on); }
  ~RoundedActivations() {
    RuntimeOptions o = CurrentOptions();
    o.activations = saved_;
    UseOptions(o);
  }
  RoundedActivations(const RoundedActivations&) = delete;
  RoundedActivations& operator=(const RoundedActivations&) = delete;
  static void Set(bool on) {
    RuntimeOptions o = CurrentOptions();
    o.activations = on ? Activations::kAuto : Activations::kF32;
    UseOptions(o);
  }
  // Whether this CPU has either path (else "on" changes nothing).
  static bool CpuSupported() { return int8::CpuSupported() || bf16::CpuSupported(); }

 private:
  Activations saved_;
};

// Debian's Python with PyTorch and NumPy, the independent reference of the training tests.
inline constexpr char kTorchPython[] = "/usr/bin/python3";
bool HaveTorch();

}  // namespace aviary::testing

// Skips (or fails in CI, which installs python3-torch) when Debian's PyTorch is missing.
#define REQUIRE_TORCH()                                                                        \
  do {                                                                                         \
    if (!::aviary::testing::HaveTorch()) {                                                     \
      if (::aviary::testing::InCI()) FAIL() << "CI needs /usr/bin/python3 with python3-torch"; \
      GTEST_SKIP() << "/usr/bin/python3 has no torch (apt install python3-torch)";             \
    }                                                                                          \
  } while (0)

// Skips (or fails in CI) when a shared file is missing.
#define REQUIRE_SHARED(relative)                                                  \
  do {                                                                            \
    const std::string _p = ::aviary::testing::SharedPath(relative);               \
    if (::aviary::testing::ReadFileBytes(_p).empty()) {                           \
      if (::aviary::testing::InCI()) FAIL() << "missing test data in CI: " << _p; \
      GTEST_SKIP() << "test data not found: " << _p << " (needs ../shared)";      \
    }                                                                             \
  } while (0)
