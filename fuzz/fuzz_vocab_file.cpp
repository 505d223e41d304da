// libFuzzer target: the tokenizer file parsers on arbitrary bytes, as LoadTokenizer sniffs them
// (a first non-space '{': tokenizer.json, else the World vocabulary format), parsed from memory.
// Each input must either give a tokenizer or throw aviary::Error whose message starts with the
// file name; a tokenizer that loads must round-trip the input bytes (World: exactly; BPE: up to
// NFC normalization).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>

#include "aviary/error.h"
#include "aviary/tokenizer.h"
#include "tokenizers/bpe.h"
#include "tokenizers/world.h"

namespace {
constexpr char kName[] = "fuzz-vocab";

void CheckError(const aviary::Error& e) {
  if (std::strncmp(e.what(), kName, sizeof kName - 1) != 0) {
    std::fprintf(stderr, "error message does not start with the file name: %s\n", e.what());
    std::abort();
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const size_t first = text.find_first_not_of(" \t\r\n");
  const bool json = first != std::string_view::npos && text[first] == '{';
  aviary::TokenizerData vocab;
  try {
    vocab = json ? aviary::ParseTokenizerJson(text, kName) : aviary::ParseWorldVocab(text, kName);
  } catch (const aviary::Error& e) {
    CheckError(e);
    return 0;
  }
  // Parsed: the tokenizer may still refuse the vocabulary (no token for some byte, ...), with an
  // aviary::Error; when it accepts it, it must round-trip.
  std::unique_ptr<aviary::Tokenizer> tokenizer;
  try {
    tokenizer = aviary::MakeTokenizer(vocab);
  } catch (const aviary::Error&) {
    return 0;
  }
  const std::vector<int32_t> ids = tokenizer->Encode(text);
  for (int32_t id : ids) {
    if (id < 0 || id >= tokenizer->vocab_size()) std::abort();
  }
  const std::string back = tokenizer->Decode(ids);
  if (!json && back != text) std::abort();
  // BPE normalizes (NFC), so the bytes may come back normalized; encoding them again must give
  // the same ids.
  if (json && back != text && tokenizer->Encode(back) != ids) std::abort();
  return 0;
}
