// libFuzzer target: the training data readers on arbitrary bytes. The first byte picks one:
//   even: a binidx index (.idx) -- bytes 1..8 are the size of its .bin (uint64, little-endian),
//         the rest the .idx; ParseBinidxIndex must accept it with a header that adds up, or
//         throw aviary::Error whose message starts with the file name;
//   odd:  a JSONL file -- the rest; ForEachJsonlText must hand over documents on increasing
//         lines or throw aviary::Error "NAME:LINE: ..."; each document's text is cut by
//         TextPieces into pieces that put back together give the text.
// Seeds: make_seeds --train-data (scripts/fuzz.sh).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <string_view>

#include "aviary/error.h"
#include "train/binidx.h"
#include "train/dataset.h"

namespace {
constexpr char kName[] = "fuzz-data";

void CheckError(const aviary::Error& e) {
  if (std::strncmp(e.what(), kName, sizeof kName - 1) != 0) {
    std::fprintf(stderr, "error message does not start with the file name: %s\n", e.what());
    std::abort();
  }
}

void FuzzIndex(std::span<const uint8_t> bytes) {
  if (bytes.size() < 8) return;
  uint64_t bin_bytes;
  std::memcpy(&bin_bytes, bytes.data(), 8);
  const std::span<const uint8_t> idx = bytes.subspan(8);
  try {
    const aviary::train::BinidxHeader h = aviary::train::ParseBinidxIndex(idx, bin_bytes, kName);
    const uint64_t item_bytes = aviary::train::TokenTypeBytes(h.type);
    if (item_bytes == 0 || h.tokens * item_bytes != bin_bytes || h.documents > h.items ||
        aviary::train::kBinidxHeaderBytes + h.items * 12 + (h.documents + 1) * 8 != idx.size()) {
      std::fprintf(stderr, "accepted an index that does not add up\n");
      std::abort();
    }
  } catch (const aviary::Error& e) {
    CheckError(e);
  }
}

void FuzzJsonl(std::string_view text) {
  uint64_t last_line = 0;
  try {
    aviary::train::ForEachJsonlText(
        text, kName, [&](std::string_view doc, uint64_t line, size_t line_end) {
          if (line <= last_line || line_end > text.size()) std::abort();
          last_line = line;
          std::string joined;
          for (std::string_view piece : aviary::train::TextPieces(doc, 8)) joined += piece;
          if (joined != doc) std::abort();
        });
  } catch (const aviary::Error& e) {
    CheckError(e);
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  if (data[0] % 2 == 0) {
    FuzzIndex(std::span<const uint8_t>(data + 1, size - 1));
  } else {
    FuzzJsonl(std::string_view(reinterpret_cast<const char*>(data) + 1, size - 1));
  }
  return 0;
}
