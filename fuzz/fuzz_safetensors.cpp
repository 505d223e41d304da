// libFuzzer target: a safetensors file from arbitrary bytes, through the whole loader (header
// JSON -> tensor views -> BlinkDL/Hugging Face name and layout conversion -> model); a model
// that loads must run. Inputs the format detector would send elsewhere go straight to the
// safetensors reader. Anything but success or an aviary::Error whose message starts with the
// file's name (a sanitizer report, another exception, a timeout, a huge allocation) is a bug.
// Seeds: scripts/fuzz.sh (the shared .safetensors files).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "aviary/error.h"
#include "aviary/model.h"
#include "formats/weight_file.h"

namespace {
constexpr char kName[] = "fuzz.safetensors";
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> bytes(data, size);
  try {
    if (size >= 9 && data[8] == '{') {
      std::unique_ptr<aviary::Model> model = aviary::Model::LoadFromMemory(bytes, kName);
      const aviary::ModelInfo& info = model->info();
      if (static_cast<int64_t>(info.n_embd) * info.n_layer <= 4096) {
        aviary::State state = model->NewState();
        std::vector<float> logits;
        const int32_t tokens[2] = {0, info.n_vocab - 1};
        model->Eval(tokens, state, &logits);
        if (logits.size() != static_cast<size_t>(info.n_vocab)) std::abort();
      }
    } else {
      aviary::ReadSafetensors(bytes, kName);
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
