// Access to ../shared test data. A test that needs a file calls RequireShared(): when the file
// is missing it FAILS in CI (CI=true) and SKIPS with a printed reason elsewhere.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace aviary::testing {

// Absolute path of a file under ../shared (e.g. "models/stress/stress-rwkv-7v0-FP32.bin").
std::string SharedPath(const std::string& relative);
bool InCI();
// A directory private to this test process (TempDir()/aviary-<pid>/, created on first use, with a
// trailing slash): ctest runs the tests of one binary as parallel processes, so fixed names in
// TempDir() would collide.
const std::string& ProcessTempDir();
// Reads a whole file; empty vector if unreadable.
std::vector<uint8_t> ReadFileBytes(const std::string& path);
// 256 (or n) float32 little-endian values.
std::vector<float> ReadFloats(const std::string& path);

// Every model under ../shared/models, with the file of its exact float64 logits and tolerance.
struct ModelCase {
  std::string model;      // relative to shared/
  std::string expected;   // relative to shared/
  double tolerance;       // FP32 1e-4, FP16 5e-3, quantized 0.15 (issue bounds)
  bool fp32;
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
inline std::string CliPath() { return AVIARY_CLI; }

}  // namespace aviary::testing

// Skips (or fails in CI) when a shared file is missing.
#define REQUIRE_SHARED(relative)                                                         \
  do {                                                                                   \
    const std::string _p = ::aviary::testing::SharedPath(relative);                      \
    if (::aviary::testing::ReadFileBytes(_p).empty()) {                                  \
      if (::aviary::testing::InCI()) FAIL() << "missing test data in CI: " << _p;        \
      GTEST_SKIP() << "test data not found: " << _p << " (needs ../shared)";             \
    }                                                                                    \
  } while (0)
