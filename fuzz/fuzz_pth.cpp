// libFuzzer target: a PyTorch .pth from arbitrary bytes. Inputs that start like a zip go through
// the whole loader (zip -> pickle -> BlinkDL conversion -> model) and a model that loads must
// run; inputs that start like a pickle (0x80) go straight to the restricted unpickler, since a
// mutated pickle inside a zip is stopped by its CRC. Anything but success or an aviary::Error
// whose message starts with the file's name (a sanitizer report, another exception, a timeout,
// a huge allocation) is a bug. Seeds: scripts/fuzz.sh (the shared .pth files and their pickles).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "aviary/error.h"
#include "aviary/model.h"
#include "formats/pickle.h"
#include "formats/weight_file.h"

namespace {
constexpr char kName[] = "fuzz.pth";

void RunModel(const aviary::Model& model) {
  const aviary::ModelInfo& info = model.info();
  // Running is O(weights), already bounded by the input size; skip wide models anyway so that
  // each input stays fast.
  if (static_cast<int64_t>(info.n_embd) * info.n_layer > 4096) return;
  aviary::State state = model.NewState();
  std::vector<float> logits;
  const int32_t tokens[2] = {0, info.n_vocab - 1};
  model.Eval(tokens, state, &logits);
  if (logits.size() != static_cast<size_t>(info.n_vocab)) std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> bytes(data, size);
  try {
    if (size >= 4 && std::memcmp(data, "PK\x03\x04", 4) == 0) {
      RunModel(*aviary::Model::LoadFromMemory(bytes, kName));
    } else if (size >= 1 && data[0] == 0x80) {
      aviary::pickle::ReadStateDict(bytes, kName);
    } else {
      aviary::ReadPth(bytes, kName);  // the zip reader on anything else
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
