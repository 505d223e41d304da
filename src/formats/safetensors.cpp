// safetensors (huggingface/safetensors): u64 little-endian header length N, N bytes of JSON
// {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...,
//  "__metadata__": {string: string}}, then the data; offsets are relative to the data start.
// Tensors become zero-copy views; BlinkDL and Hugging Face names are accepted (blinkdl.h).
#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "aviary/error.h"
#include "formats/blinkdl.h"
#include "formats/weight_file.h"
#include "formats/json_depth.h"

namespace aviary {
namespace {

constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;  // the reference implementation's cap
constexpr int kMaxJsonDepth = 16;
constexpr size_t kMaxDims = 8;
constexpr uint64_t kMaxDim = uint64_t{1} << 40;
constexpr size_t kMaxNameLength = 1024;

[[noreturn]] void Fail(const std::string& name, const std::string& problem) {
  throw Error(name + ": " + problem);
}


struct Known {
  const char* name;
  bool supported;
  DType type;
};
constexpr Known kDTypes[] = {
    {"F32", true, DType::kF32},   {"F16", true, DType::kF16},      {"BF16", true, DType::kBF16},
    {"F64", false, DType::kF32},  {"I64", false, DType::kF32},     {"I32", false, DType::kF32},
    {"I16", false, DType::kF32},  {"I8", false, DType::kF32},      {"U64", false, DType::kF32},
    {"U32", false, DType::kF32},  {"U16", false, DType::kF32},     {"U8", false, DType::kF32},
    {"BOOL", false, DType::kF32}, {"F8_E4M3", false, DType::kF32}, {"F8_E5M2", false, DType::kF32}};

struct Span {
  uint64_t begin, end;
  std::string name;
};

}  // namespace

WeightFile ReadSafetensors(std::span<const uint8_t> bytes, const std::string& name) {
  auto fail = [&](const std::string& problem) { Fail(name, problem); };
  if (bytes.size() < 8) fail("too short for a safetensors file");
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= static_cast<uint64_t>(bytes[i]) << (8 * i);
  if (header_len > bytes.size() - 8) {
    fail("safetensors header length " + std::to_string(header_len) + " is larger than the file (" +
         std::to_string(bytes.size()) + " bytes): truncated?");
  }
  if (header_len > kMaxHeaderBytes) {
    fail("safetensors header of " + std::to_string(header_len) + " bytes is too large");
  }
  const std::string_view text(reinterpret_cast<const char*>(bytes.data() + 8), header_len);
  if (JsonDepth(text) > kMaxJsonDepth) fail("safetensors header is nested too deeply");
  const nlohmann::json header = nlohmann::json::parse(text.begin(), text.end(), nullptr, false);
  if (header.is_discarded()) fail("safetensors header is not valid JSON");
  if (!header.is_object()) fail("safetensors header is not a JSON object");
  const std::span<const uint8_t> data = bytes.subspan(8 + header_len);

  WeightFile wf;
  wf.path = name;
  wf.file_size = bytes.size();
  wf.format = "safetensors";
  std::vector<Tensor> raw;
  std::vector<Span> spans;
  for (const auto& [key, info] : header.items()) {
    if (key == "__metadata__") {
      if (!info.is_object()) fail("safetensors __metadata__ is not an object");
      continue;
    }
    if (key.empty() || key.size() > kMaxNameLength) fail("a tensor name is empty or too long");
    for (unsigned char c : key) {
      if (c < 0x20 || c >= 0x7f) fail("a tensor name is not printable ASCII");
    }
    const std::string where = "tensor '" + key + "'";
    if (!info.is_object()) fail(where + ": its header entry is not an object");
    const auto dtype = info.find("dtype");
    const auto shape = info.find("shape");
    const auto offsets = info.find("data_offsets");
    if (dtype == info.end() || !dtype->is_string()) fail(where + ": no dtype string");
    if (shape == info.end() || !shape->is_array()) fail(where + ": no shape array");
    if (offsets == info.end() || !offsets->is_array() || offsets->size() != 2) {
      fail(where + ": data_offsets is not a [begin, end] pair");
    }
    Tensor t;
    t.name = key;
    const std::string type_name = dtype->get<std::string>();
    const Known* known = nullptr;
    for (const Known& k : kDTypes) {
      if (type_name == k.name) known = &k;
    }
    if (!known) fail(where + ": unknown dtype '" + type_name.substr(0, 32) + "'");
    if (!known->supported) {
      fail(where + ": dtype " + type_name + " is not supported (F32, F16 and BF16 only)");
    }
    t.type = known->type;
    if (shape->size() > kMaxDims) fail(where + " has too many dimensions");
    uint64_t numel = 1;
    for (const auto& d : *shape) {
      if (!d.is_number_unsigned()) fail(where + ": shape holds something other than sizes");
      const uint64_t v = d.get<uint64_t>();
      if (v > kMaxDim || __builtin_mul_overflow(numel, v, &numel) || numel > kMaxDim) {
        fail(where + ": shape is impossibly large");
      }
      t.shape.push_back(static_cast<int64_t>(v));
    }
    const auto& b = (*offsets)[0];
    const auto& e = (*offsets)[1];
    if (!b.is_number_unsigned() || !e.is_number_unsigned()) {
      fail(where + ": data_offsets must be non-negative integers");
    }
    const uint64_t begin = b.get<uint64_t>(), end = e.get<uint64_t>();
    if (begin > end || end > data.size()) {
      fail(where + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
           "] lie outside the data (" + std::to_string(data.size()) + " bytes)");
    }
    const uint64_t want = numel * Traits(t.type).block_bytes;
    if (end - begin != want) {
      fail(where + ": shape needs " + std::to_string(want) + " bytes but data_offsets span " +
           std::to_string(end - begin));
    }
    t.data = data.data() + begin;
    t.nbytes = static_cast<size_t>(want);
    spans.push_back({begin, end, key});
    raw.push_back(std::move(t));
  }
  if (raw.empty()) fail("the safetensors file holds no tensors");
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i - 1].end > spans[i].begin) {
      fail("tensors '" + spans[i - 1].name + "' and '" + spans[i].name + "' overlap");
    }
  }
  ConvertBlinkDl(std::move(raw), wf);
  return wf;
}

}  // namespace aviary
