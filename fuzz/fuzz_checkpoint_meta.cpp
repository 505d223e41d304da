// libFuzzer target: the JSON descriptions a training run writes, from arbitrary bytes: a
// checkpoint's index (meta.json) through ParseCheckpointIndex (JSON, types, config, the layout
// it names, the data files it lists) and the run's options in it through OptionsFromJson, and
// a LoRA adapter's adapter.json through ParseLoraAdapterMeta. An index that parses must describe three distinct plain files of the
// layout's size, an adapter description sizes in range and known targets; anything but that or
// an aviary::Error whose message starts with the file's name (a sanitizer report, another
// exception, a timeout, a huge allocation) is a bug. Seeds: scripts/fuzz.sh.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "aviary/error.h"
#include "train/checkpoint.h"
#include "train/export.h"
#include "train/trainer.h"

namespace {
constexpr char kName[] = "fuzz/meta.json";
}

// True when `e` names the file first, as every parser's error must.
static bool NamesTheFile(const aviary::Error& e) {
  return std::strncmp(e.what(), kName, sizeof kName - 1) == 0 &&
         std::strncmp(e.what() + sizeof kName - 1, ": ", 2) == 0;
}

static void FuzzAdapterMeta(std::string_view text) {
  try {
    const aviary::train::LoraAdapterMeta m = aviary::train::ParseLoraAdapterMeta(text, kName);
    if (m.rank < 1 || m.rank > 65536 || !(m.alpha > 0) || m.targets.empty() || m.n_layer < 1 ||
        m.n_embd < 1 || m.n_ffn < 1) {
      std::abort();
    }
  } catch (const aviary::Error& e) {
    if (!NamesTheFile(e)) {
      std::fprintf(stderr, "error message does not start with the file name: %s\n", e.what());
      std::abort();
    }
  }
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzAdapterMeta(std::string_view(reinterpret_cast<const char*>(data), size));
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
    // The run's options, as a resume reads them; its errors start with the run directory.
    const aviary::train::TrainOptions o = aviary::train::OptionsFromJson(index.meta.options, kName);
    if (o.layers < 0 || o.ctx_len < 0 || o.batch < 0 || o.steps < 0 || o.save_every < 0) {
      std::abort();
    }
  } catch (const aviary::Error& e) {
    if (!NamesTheFile(e)) {
      std::fprintf(stderr, "error message does not start with the file name: %s\n", e.what());
      std::abort();
    }
  }
  return 0;
}
