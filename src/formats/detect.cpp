// Chooses a format reader from the first bytes of a file.
#include <cstdio>
#include <cstring>

#include "aviary/error.h"
#include "formats/weight_file.h"

namespace aviary {

WeightFile ReadWeightFile(std::span<const uint8_t> bytes, const std::string& name) {
  if (LooksLikeRwkvCppBin(bytes)) return ReadRwkvCppBin(bytes, name);
  if (bytes.size() >= 4 && std::memcmp(bytes.data(), "GGUF", 4) == 0) return ReadGguf(bytes, name);
  if (bytes.size() >= 4 && std::memcmp(bytes.data(), "PK\x03\x04", 4) == 0)
    return ReadPth(bytes, name);
  // safetensors: u64 little-endian header length, then a JSON object.
  if (bytes.size() >= 9 && bytes[8] == '{') return ReadSafetensors(bytes, name);
  if (bytes.size() < 4) {
    throw Error(name + ": too short to be a model file (" + std::to_string(bytes.size()) +
                " bytes)");
  }
  char magic[16];
  std::snprintf(magic, sizeof magic, "%02x%02x%02x%02x", bytes[0], bytes[1], bytes[2], bytes[3]);
  throw Error(name + ": unknown model format (first bytes " + magic +
              "); aviary reads rwkv.cpp .bin, PyTorch .pth, safetensors and GGUF");
}

}  // namespace aviary
