// Test helper: builds GGUF bytes field by field, so that tests can make valid files and every
// kind of broken one (lying counts, lengths, offsets, types). Starts empty or from a parsed file.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "formats/gguf.h"

namespace aviary::testing {

class GgufBuilder {
 public:
  struct Kv {
    std::string key;
    std::vector<uint8_t> payload;  // u32 value type, then the value, exactly as written
  };
  struct Tensor {
    std::string name;
    std::vector<uint64_t> ne;  // ggml order
    uint32_t type = 0;
    std::vector<uint8_t> data;
    std::optional<uint64_t> offset;  // default: packed in order, aligned
  };

  uint32_t version = 3;
  uint64_t alignment = 32;  // used for offsets and padding; write the key separately
  std::optional<uint64_t> n_tensors_override, n_kv_override;
  std::vector<Kv> kvs;
  std::vector<Tensor> tensors;

  // A copy of a parsed file (values re-encoded, tensor bytes copied).
  static GgufBuilder From(const gguf::File& f) {
    GgufBuilder b;
    b.version = f.version;
    b.alignment = f.alignment;
    for (const auto& [key, v] : f.kvs) b.kvs.push_back({key, Encode(v)});
    for (const gguf::TensorInfo& t : f.tensors) {
      Tensor o;
      o.name = t.name;
      o.ne.assign(t.ne.begin(), t.ne.end());
      o.type = t.ggml_type;
      o.data.assign(t.data, t.data + t.nbytes);
      b.tensors.push_back(std::move(o));
    }
    return b;
  }

  Kv* FindKv(const std::string& key) {
    for (Kv& kv : kvs) {
      if (kv.key == key) return &kv;
    }
    return nullptr;
  }
  Tensor* FindTensor(const std::string& name) {
    for (Tensor& t : tensors) {
      if (t.name == name) return &t;
    }
    return nullptr;
  }
  void Set(const std::string& key, std::vector<uint8_t> payload) {
    if (Kv* kv = FindKv(key)) {
      kv->payload = std::move(payload);
    } else {
      kvs.push_back({key, std::move(payload)});
    }
  }
  void Remove(const std::string& key) {
    std::erase_if(kvs, [&](const Kv& kv) { return kv.key == key; });
  }

  // Payload makers.
  template <typename T>
  static void Put(std::vector<uint8_t>& out, T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    out.insert(out.end(), p, p + sizeof v);
  }
  static void PutStr(std::vector<uint8_t>& out, const std::string& s) {
    Put<uint64_t>(out, s.size());
    out.insert(out.end(), s.begin(), s.end());
  }
  static std::vector<uint8_t> U32(uint32_t v) {
    std::vector<uint8_t> p;
    Put<uint32_t>(p, 4);
    Put(p, v);
    return p;
  }
  static std::vector<uint8_t> U64(uint64_t v) {
    std::vector<uint8_t> p;
    Put<uint32_t>(p, 10);
    Put(p, v);
    return p;
  }
  static std::vector<uint8_t> Str(const std::string& s) {
    std::vector<uint8_t> p;
    Put<uint32_t>(p, 8);
    PutStr(p, s);
    return p;
  }
  static std::vector<uint8_t> StrArray(const std::vector<std::string>& v) {
    std::vector<uint8_t> p;
    Put<uint32_t>(p, 9);
    Put<uint32_t>(p, 8);
    Put<uint64_t>(p, v.size());
    for (const std::string& s : v) PutStr(p, s);
    return p;
  }

  static std::vector<uint8_t> Encode(const gguf::Value& v) {
    std::vector<uint8_t> p;
    Put<uint32_t>(p, static_cast<uint32_t>(v.type));
    using gguf::ValueType;
    auto scalar = [&](ValueType t, const gguf::Value& x) {
      switch (t) {
        case ValueType::kU8: Put<uint8_t>(p, static_cast<uint8_t>(x.u)); break;
        case ValueType::kI8: Put<int8_t>(p, static_cast<int8_t>(x.i)); break;
        case ValueType::kU16: Put<uint16_t>(p, static_cast<uint16_t>(x.u)); break;
        case ValueType::kI16: Put<int16_t>(p, static_cast<int16_t>(x.i)); break;
        case ValueType::kU32: Put<uint32_t>(p, static_cast<uint32_t>(x.u)); break;
        case ValueType::kI32: Put<int32_t>(p, static_cast<int32_t>(x.i)); break;
        case ValueType::kU64: Put<uint64_t>(p, x.u); break;
        case ValueType::kI64: Put<int64_t>(p, x.i); break;
        case ValueType::kF32: Put<float>(p, static_cast<float>(x.f)); break;
        case ValueType::kF64: Put<double>(p, x.f); break;
        case ValueType::kBool: Put<uint8_t>(p, static_cast<uint8_t>(x.u)); break;
        case ValueType::kString: PutStr(p, std::string(x.str)); break;
        default: break;
      }
    };
    if (v.type != ValueType::kArray) {
      scalar(v.type, v);
      return p;
    }
    Put<uint32_t>(p, static_cast<uint32_t>(v.elem));
    Put<uint64_t>(p, v.count);
    if (v.elem == ValueType::kString) {
      for (std::string_view s : v.strings) PutStr(p, std::string(s));
    } else {
      p.insert(p.end(), v.raw.begin(), v.raw.end());
    }
    return p;
  }

  std::vector<uint8_t> Build() const {
    std::vector<uint8_t> out = {'G', 'G', 'U', 'F'};
    Put<uint32_t>(out, version);
    Put<uint64_t>(out, n_tensors_override.value_or(tensors.size()));
    Put<uint64_t>(out, n_kv_override.value_or(kvs.size()));
    for (const Kv& kv : kvs) {
      PutStr(out, kv.key);
      out.insert(out.end(), kv.payload.begin(), kv.payload.end());
    }
    std::vector<uint64_t> offsets;
    uint64_t next = 0;
    for (const Tensor& t : tensors) {
      offsets.push_back(t.offset.value_or(next));
      next += (t.data.size() + alignment - 1) / alignment * alignment;
      PutStr(out, t.name);
      Put<uint32_t>(out, static_cast<uint32_t>(t.ne.size()));
      for (uint64_t d : t.ne) Put<uint64_t>(out, d);
      Put<uint32_t>(out, t.type);
      Put<uint64_t>(out, offsets.back());
    }
    while (out.size() % alignment) out.push_back(0);
    const size_t data_start = out.size();
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].offset) continue;  // a lying offset: its data is not placed
      out.resize(std::max(out.size(), data_start + offsets[i]));
      out.insert(out.begin() + data_start + offsets[i], tensors[i].data.begin(),
                 tensors[i].data.end());
      while (out.size() % alignment) out.push_back(0);
    }
    return out;
  }
};

}  // namespace aviary::testing
