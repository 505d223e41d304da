// libFuzzer target: a saved state file from arbitrary bytes, for one fixed small model (from
// $AVIARY_FUZZ_MODEL, else the stress v7 FP16 model in ../shared). State::Deserialize must
// either return a state of the model's size or throw aviary::Error naming the file.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>

#include "aviary/error.h"
#include "aviary/model.h"
#include "aviary/state.h"

namespace {
constexpr char kName[] = "fuzz.state";
std::unique_ptr<aviary::Model> g_model;
size_t g_state_bytes = 0;
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* env = std::getenv("AVIARY_FUZZ_MODEL");
  const char* path = env && *env ? env : AVIARY_FUZZ_DEFAULT_MODEL;
  try {
    g_model = aviary::Model::Load(path);
  } catch (const aviary::Error& e) {
    std::fprintf(stderr, "fuzz_state_file: cannot load the model (set AVIARY_FUZZ_MODEL): %s\n",
                 e.what());
    std::exit(2);
  }
  g_state_bytes = g_model->NewState().size_bytes();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const aviary::State state =
        aviary::State::Deserialize(std::span<const uint8_t>(data, size), *g_model, kName);
    if (state.size_bytes() != g_state_bytes ||
        state.model_fingerprint() != g_model->info().fingerprint) {
      std::abort();
    }
  } catch (const aviary::Error& e) {
    if (std::strncmp(e.what(), kName, sizeof kName - 1) != 0) {
      std::fprintf(stderr, "error message does not start with the file name: %s\n", e.what());
      std::abort();
    }
  }
  return 0;
}
