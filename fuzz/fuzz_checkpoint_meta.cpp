// libFuzzer target: a training checkpoint's index (meta.json) from arbitrary bytes, through
// ParseCheckpointIndex (JSON, types, config, the layout it names, the data files it lists). An
// index that parses must describe three distinct plain files of the layout's size; anything but
// that or an aviary::Error whose message starts with the file's name (a sanitizer report,
// another exception, a timeout, a huge allocation) is a bug. Seeds: scripts/fuzz.sh.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "aviary/error.h"
#include "train/checkpoint.h"

namespace {
constexpr char kName[] = "fuzz/meta.json";
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const aviary::train::CheckpointIndex index = aviary::train::ParseCheckpointIndex(
        std::string_view(reinterpret_cast<const char*>(data), size), kName);
    const uint64_t bytes = index.layout.total_floats() * sizeof(float);
    for (const auto* f : {&index.params, &index.adam_m, &index.adam_v}) {
      if (f->bytes != bytes || f->name.empty() || f->name.find('/') != std::string::npos) {
        std::abort();
      }
    }
    if (index.params.name == index.adam_m.name || index.adam_m.name == index.adam_v.name ||
        index.params.name == index.adam_v.name || index.meta.step < 0) {
      std::abort();
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
