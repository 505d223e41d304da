// libFuzzer target: GGUF files from arbitrary bytes. Parsing, mapping to the canonical layout
// (tokenizer included) and loading must either succeed or throw aviary::Error whose message
// starts with the file's name; a model that loads must run, and must write back to GGUF and
// load again. Anything else (a sanitizer report, another exception, a timeout, a huge
// allocation) is a bug. Inputs that do not start with "GGUF" are given the magic, so that the
// fuzzer spends its time past it.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <unistd.h>
#include <vector>

#include "aviary/error.h"
#include "aviary/model.h"
#include "formats/gguf.h"
#include "formats/gguf_writer.h"
#include "formats/weight_file.h"

namespace {

constexpr char kName[] = "fuzz.gguf";

void CheckMessage(const aviary::Error& e) {
  if (std::strncmp(e.what(), kName, sizeof kName - 1) != 0 ||
      std::strncmp(e.what() + sizeof kName - 1, ": ", 2) != 0) {
    std::fprintf(stderr, "error message does not start with the file name: %s\n", e.what());
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<uint8_t> bytes;
  if (size < 4 || std::memcmp(data, "GGUF", 4) != 0) {
    bytes.assign({'G', 'G', 'U', 'F'});
  }
  bytes.insert(bytes.end(), data, data + size);
  const std::span<const uint8_t> in(bytes);
  try {
    aviary::gguf::Parse(in, kName);
  } catch (const aviary::Error& e) {
    CheckMessage(e);
    return 0;
  }
  try {
    const aviary::WeightFile wf = aviary::ReadGguf(in, kName);
    std::unique_ptr<aviary::Model> model = aviary::Model::LoadFromMemory(in, kName);
    const aviary::ModelInfo& info = model->info();
    if (static_cast<int64_t>(info.n_embd) * info.n_layer <= 4096) {
      aviary::State state = model->NewState();
      std::vector<float> logits;
      const int32_t tokens[2] = {0, info.n_vocab - 1};
      model->Eval(tokens, state, &logits);
      if (logits.size() != static_cast<size_t>(info.n_vocab)) std::abort();
      // Whatever loads must write back as GGUF that loads again.
      char path[] = "/tmp/fuzz_gguf_XXXXXX";
      const int fd = ::mkstemp(path);
      if (fd < 0) return 0;
      ::close(fd);
      aviary::GgufWriteOptions options;
      options.tokenizer = wf.tokenizer;
      try {
        aviary::WriteGguf(wf, info, options, path);
        aviary::Model::Load(path);
      } catch (const aviary::Error& e) {
        // Only writer refusals that name the input are acceptable (e.g. uneven v7 ranks).
        CheckMessage(e);
      }
      ::unlink(path);
    }
  } catch (const aviary::Error& e) {
    CheckMessage(e);
  }
  return 0;
}
