#include "test_data.h"

#include "aviary/model.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

namespace aviary::testing {

RuntimeOptions CurrentOptions() { return CurrentRuntime().options(); }

void UseOptions(const RuntimeOptions& options) {
  static std::mutex mutex;
  static std::map<std::tuple<int, Kernels, Activations>, std::shared_ptr<Runtime>> runtimes;
  std::lock_guard<std::mutex> lock(mutex);
  std::shared_ptr<Runtime>& r = runtimes[{options.threads, options.kernels, options.activations}];
  if (!r) r = std::make_shared<Runtime>(options);
  SetThreadRuntime(r.get());
}

std::string SharedPath(const std::string& relative) {
  const char* env = std::getenv("AVIARY_SHARED_DIR");
  return std::string(env && *env ? env : AVIARY_SHARED_DIR) + "/" + relative;
}

bool InCI() {
  const char* ci = std::getenv("CI");
  return ci && std::string(ci) == "true";
}

namespace {

std::string* temp_dir_made = nullptr;  // by ProcessTempDir, removed at exit
pid_t temp_dir_owner = 0;

void RemoveProcessTempDir() {
  // Forked children share the atexit handlers: only the process that made the directory
  // removes it, and only when its tests passed (a failure's files are kept to look at).
  if (temp_dir_made == nullptr || ::getpid() != temp_dir_owner) return;
  if (!::testing::UnitTest::GetInstance()->Passed()) return;
  std::error_code ignored;
  std::filesystem::remove_all(*temp_dir_made, ignored);
}

}  // namespace

const std::string& ProcessTempDir() {
  static const std::string dir = [] {
    // mkdtemp, not just the pid: pids are reused, and an earlier process's directory of the same
    // name would hand a test another run's files.
    std::string pattern = ::testing::TempDir() + "aviary-" + std::to_string(::getpid()) + "-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) {
      std::perror(("mkdtemp " + pattern).c_str());
      std::abort();
    }
    temp_dir_made = new std::string(pattern);
    temp_dir_owner = ::getpid();
    std::atexit(RemoveProcessTempDir);
    return pattern + "/";
  }();
  return dir;
}

std::vector<uint8_t> ReadFileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {};
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

std::string ShakespearePart(size_t bytes) {
  const std::string path = ProcessTempDir() + "shakespeare-" + std::to_string(bytes) + ".txt";
  if (!std::filesystem::exists(path)) {
    const std::vector<uint8_t> all = ReadFileBytes(SharedPath("data/tinyshakespeare.txt"));
    std::ofstream(path, std::ios::binary)
        .write(reinterpret_cast<const char*>(all.data()),
               static_cast<std::streamsize>(std::min(bytes, all.size())));
  }
  return path;
}

std::vector<float> ReadFloats(const std::string& path) {
  const std::vector<uint8_t> bytes = ReadFileBytes(path);
  std::vector<float> v(bytes.size() / 4);
  std::memcpy(v.data(), bytes.data(), v.size() * 4);
  return v;
}

std::vector<ModelCase> AllModelCases() {
  std::vector<ModelCase> cases;
  const char* stress[] = {"4v0", "5v1", "5v2", "6v0", "7v0"};
  for (const char* v : stress) {
    for (const char* type : {"FP32", "FP16"}) {
      const std::string file = std::string("stress-rwkv-") + v + "-" + type + ".bin";
      const bool fp32 = std::string(type) == "FP32";
      cases.push_back({"models/stress/" + file, "models/stress/expected-logits-" + file,
                       fp32 ? 1e-4 : 5e-3, fp32});
    }
  }
  const char* tiny[] = {"4v0-660K", "5v1-730K", "5v2-730K", "6v0-1m", "7v0-834K"};
  for (const char* v : tiny) {
    for (const char* type : {"FP32", "FP16", "Q5_0", "Q5_1"}) {
      const std::string file = std::string("tiny-rwkv-") + v + "-" + type + ".bin";
      const std::string t = type;
      cases.push_back({"models/" + file, "models/exact-logits-" + file,
                       t == "FP32"   ? 1e-4
                       : t == "FP16" ? 5e-3
                                     : 0.15,
                       t == "FP32"});
    }
    for (const char* type : {"Q4_0", "Q4_1", "Q8_0"}) {
      const std::string file = std::string("tiny-rwkv-") + v + "-" + type + ".bin";
      cases.push_back(
          {"models/quantized/" + file, "models/quantized/expected-logits-" + file, 0.15, false});
    }
  }
  for (const char* type : {"Q5_0", "Q5_1"}) {
    const std::string file = std::string("tiny-rwkv-6v0-3m-") + type + ".bin";
    cases.push_back({"models/" + file, "models/exact-logits-" + file, 0.15, false});
  }
  return cases;
}

CommandResult RunCommand(const std::string& command) {
  CommandResult result{-1, ""};
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) return result;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) result.output.append(buf, n);
  const int status = ::pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

bool HaveTorch() {
  static const bool have =
      RunCommand(std::string(kTorchPython) + " -c 'import torch, numpy' 2>&1").exit_code == 0;
  return have;
}

std::vector<float> F32Logits(const std::string& model_path, const std::vector<int32_t>& tokens) {
  RuntimeOptions f32;
  f32.activations = Activations::kF32;
  LoadOptions options;
  options.runtime = std::make_shared<Runtime>(f32);
  const std::unique_ptr<Model> model = Model::Load(model_path, options);
  State state = model->NewState();
  std::vector<float> logits;
  model->Eval(tokens, state, &logits, /*all_positions=*/true);
  return logits;
}

std::vector<int32_t> RandomTokens(size_t n, uint64_t seed) {
  std::vector<int32_t> t(n);
  uint64_t x = seed;
  for (auto& v : t) {
    x += 0x9e3779b97f4a7c15ull;
    uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    v = static_cast<int32_t>(z & 0xff);
  }
  return t;
}

}  // namespace aviary::testing
