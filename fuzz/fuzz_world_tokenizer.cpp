// libFuzzer target: the World tokenizer on arbitrary bytes. Encode then Decode must give the
// input back exactly, every id must be a real token (1..vocab-1: id 0 is end-of-text and is
// never produced), and encoding the decoded text must give the same ids. The vocabulary is
// read once at start-up from $AVIARY_FUZZ_WORLD_VOCAB, else ../shared/tokenizers.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "aviary/error.h"
#include "aviary/tokenizer.h"

namespace {
std::unique_ptr<aviary::Tokenizer> g_world;
}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* env = std::getenv("AVIARY_FUZZ_WORLD_VOCAB");
  const char* path = env && *env ? env : AVIARY_FUZZ_DEFAULT_WORLD_VOCAB;
  try {
    g_world = aviary::LoadTokenizer(path);
  } catch (const aviary::Error& e) {
    std::fprintf(stderr,
                 "fuzz_world_tokenizer: cannot load the World vocabulary (set "
                 "AVIARY_FUZZ_WORLD_VOCAB): %s\n",
                 e.what());
    std::exit(2);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const std::vector<int32_t> ids = g_world->Encode(text);
  if (ids.size() > size) std::abort();  // every token covers at least one byte
  for (int32_t id : ids) {
    if (id <= 0 || id >= g_world->vocab_size()) {
      std::fprintf(stderr, "id %d outside 1..%d\n", id, g_world->vocab_size() - 1);
      std::abort();
    }
  }
  const std::string back = g_world->Decode(ids);
  if (back != text) {
    std::fprintf(stderr, "round trip changed the bytes (%zu in, %zu out)\n", size, back.size());
    std::abort();
  }
  if (g_world->Encode(back) != ids) std::abort();
  return 0;
}
