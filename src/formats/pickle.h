// A restricted unpickler for the `data.pkl` that torch.save writes for a state dict (pickle
// protocol 2; a few protocol-4 opcodes are accepted too). It never imports or calls anything:
// the only globals it accepts are an allow-list of names it interprets itself
// (collections.OrderedDict, torch._utils._rebuild_tensor_v2 / _rebuild_parameter and the
// torch.*Storage types), and every other opcode or global is refused with an error naming it.
// Stack, memo, nesting and object counts are bounded, so any input ends in a result or an
// aviary::Error in time linear in its size.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace aviary::pickle {

// The element type of a torch storage, from its class name (torch.FloatStorage -> kFloat).
enum class StorageType {
  kFloat,
  kHalf,
  kBFloat16,
  kDouble,
  kLong,
  kInt,
  kShort,
  kChar,
  kByte,
  kBool
};
const char* StorageTypeName(StorageType type);  // "FloatStorage", ...
int StorageElementSize(StorageType type);

// One tensor of the state dict, as _rebuild_tensor_v2 would build it. Not yet checked against
// the archive (pth.cpp does that).
struct TensorRecord {
  std::string storage_key;  // names the archive entry <top>/data/<key>
  StorageType type = StorageType::kFloat;
  int64_t storage_numel = 0;   // elements the persistent id says the storage holds
  int64_t storage_offset = 0;  // in elements
  std::vector<int64_t> shape, strides;
};

// Parses a torch.save pickle whose top-level object is a dict (or OrderedDict) from strings to
// tensors, in file order. Throws aviary::Error("<name>: pickle: <problem>") on anything else,
// naming the refused opcode or global.
std::vector<std::pair<std::string, TensorRecord>> ReadStateDict(std::span<const uint8_t> bytes,
                                                                const std::string& name);

}  // namespace aviary::pickle
