// libFuzzer target: a model file from arbitrary bytes. Loading must either succeed or throw
// aviary::Error whose message starts with the file's name; a model that loads must run.
// Anything else (a sanitizer report, another exception, a timeout, a huge allocation) is a bug.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "aviary/error.h"
#include "aviary/model.h"

namespace {
constexpr char kName[] = "fuzz.bin";
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    std::unique_ptr<aviary::Model> model =
        aviary::Model::LoadFromMemory(std::span<const uint8_t>(data, size), kName);
    const aviary::ModelInfo& info = model->info();
    // Running is O(weights), already bounded by the input size; skip wide models anyway so that
    // each input stays fast.
    if (static_cast<int64_t>(info.n_embd) * info.n_layer <= 4096) {
      aviary::State state = model->NewState();
      std::vector<float> logits;
      const int32_t tokens[2] = {0, info.n_vocab - 1};
      model->Eval(tokens, state, &logits);
      if (logits.size() != static_cast<size_t>(info.n_vocab)) std::abort();
    }
  } catch (const aviary::Error& e) {
    if (std::strncmp(e.what(), kName, sizeof kName - 1) != 0 ||
        std::strncmp(e.what() + sizeof kName - 1, ": ", 2) != 0) {
      std::fprintf(stderr, "error message does not start with the file name: %s\n", e.what());
      std::abort();
    }
  }
  return 0;
}
