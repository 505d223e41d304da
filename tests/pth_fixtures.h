// Test-only writers for the formats aviary reads from PyTorch land: a zip writer (stored or
// deflated entries, torch's 64-byte data alignment, optional ZIP64 records), a pickle
// assembler that emits exactly what torch.save does for a state dict, .pth and safetensors
// writers on top of them, and a generator of random, well-scaled RWKV-7 checkpoints in
// BlinkDL's raw layout. Header-only (tests/CMakeLists.txt builds each *_test.cpp alone).
// No Python or torch involved.
#pragma once

#include <zlib.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "tensor/dtype.h"

namespace aviary::testing::pth {

using Bytes = std::vector<uint8_t>;

inline void Put(Bytes& b, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
inline void PutStr(Bytes& b, std::string_view s) { b.insert(b.end(), s.begin(), s.end()); }
inline void Patch(Bytes& b, size_t at, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b[at + i] = static_cast<uint8_t>(v >> (8 * i));
}

inline uint16_t ToBF16(float f) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

// Stored values of `v` in `type` (F32, F16 or BF16), little-endian.
inline Bytes Encode(DType type, std::span<const float> v) {
  Bytes out;
  out.reserve(v.size() * (type == DType::kF32 ? 4 : 2));
  for (float f : v) {
    if (type == DType::kF32) {
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      Put(out, bits, 4);
    } else {
      Put(out, type == DType::kBF16 ? ToBF16(f) : F32ToF16(f), 2);
    }
  }
  return out;
}

// ---- zip ----

// Where bytes go: memory or a file, with the running offset.
struct Sink {
  std::function<void(const uint8_t*, size_t)> write;
  uint64_t offset = 0;
  void Write(const Bytes& b) { Write(b.data(), b.size()); }
  void Write(const uint8_t* p, size_t n) {
    write(p, n);
    offset += n;
  }
  static Sink ToBytes(Bytes* out) {
    return Sink{[out](const uint8_t* p, size_t n) { out->insert(out->end(), p, p + n); }, 0};
  }
  static Sink ToFile(std::FILE* f) {
    return Sink{[f](const uint8_t* p, size_t n) { std::fwrite(p, 1, n, f); }, 0};
  }
};

struct ZipOptions {
  bool zip64_end = true;        // write the ZIP64 end record + locator (torch always does)
  bool zip64_entries = false;   // put sizes and offsets of every entry in ZIP64 extra fields
  bool data_descriptor = true;  // torch's style: sizes after the data, zero in local headers
  size_t align = 64;            // pad local headers so data starts at a multiple of this
};

class ZipWriter {
 public:
  ZipWriter(Sink sink, ZipOptions options = {}) : sink_(std::move(sink)), o_(options) {}

  // Offsets of the last entry's local header and data, for tests that corrupt them.
  uint64_t last_local_offset() const { return entries_.back().offset; }
  uint64_t last_data_offset() const { return last_data_; }
  uint64_t central_offset() const { return cd_offset_; }
  uint64_t end_offset() const { return eocd_offset_; }

  void Add(const std::string& name, std::span<const uint8_t> data, bool compress = false) {
    Rec r{
        name,         static_cast<uint32_t>(crc32(0, data.data(), static_cast<uInt>(data.size()))),
        data.size(),  data.size(),
        sink_.offset, static_cast<uint16_t>(compress ? 8 : 0)};
    Bytes payload;
    if (compress) {
      z_stream zs{};
      deflateInit2(&zs, 6, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY);
      payload.resize(deflateBound(&zs, data.size()));
      zs.next_in = const_cast<Bytef*>(data.data());
      zs.avail_in = static_cast<uInt>(data.size());
      zs.next_out = payload.data();
      zs.avail_out = static_cast<uInt>(payload.size());
      deflate(&zs, Z_FINISH);
      payload.resize(zs.total_out);
      deflateEnd(&zs);
      r.csize = payload.size();
    }
    Bytes h;
    Put(h, 0x04034b50, 4);
    Put(h, 20, 2);
    Put(h, o_.data_descriptor ? 0x0808 : 0x0800, 2);
    Put(h, r.method, 2);
    Put(h, 0, 4);  // time, date
    Put(h, o_.data_descriptor ? 0 : r.crc, 4);
    Put(h, o_.data_descriptor ? 0 : r.csize, 4);
    Put(h, o_.data_descriptor ? 0 : r.usize, 4);
    Put(h, name.size(), 2);
    const size_t fixed = h.size() + 2 + name.size() + 4;  // + extra length, name, pad header
    size_t pad = 0;
    if (o_.align > 1) pad = (o_.align - (sink_.offset + fixed) % o_.align) % o_.align;
    Put(h, 4 + pad, 2);
    PutStr(h, name);
    Put(h, 0x4246, 2);  // "FB": torch's padding field
    Put(h, pad, 2);
    h.insert(h.end(), pad, 'Z');
    sink_.Write(h);
    last_data_ = sink_.offset;
    if (compress) {
      sink_.Write(payload);
    } else {
      sink_.Write(data.data(), data.size());
    }
    if (o_.data_descriptor) {
      Bytes d;
      Put(d, 0x08074b50, 4);
      Put(d, r.crc, 4);
      Put(d, r.csize, 4);
      Put(d, r.usize, 4);
      sink_.Write(d);
    }
    entries_.push_back(r);
  }
  void Add(const std::string& name, std::string_view text) {
    Add(name, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
  }

  void Finish() {
    cd_offset_ = sink_.offset;
    Bytes cd;
    for (const Rec& r : entries_) {
      const bool z = o_.zip64_entries;
      Put(cd, 0x02014b50, 4);
      Put(cd, 0x031e, 2);
      Put(cd, z ? 45 : 20, 2);
      Put(cd, o_.data_descriptor ? 0x0808 : 0x0800, 2);
      Put(cd, r.method, 2);
      Put(cd, 0, 4);
      Put(cd, r.crc, 4);
      Put(cd, z ? 0xffffffff : r.csize, 4);
      Put(cd, z ? 0xffffffff : r.usize, 4);
      Put(cd, r.name.size(), 2);
      Put(cd, z ? 28 : 0, 2);  // extra
      Put(cd, 0, 2);           // comment
      Put(cd, 0, 2);           // disk
      Put(cd, 0, 2);
      Put(cd, 0, 4);
      Put(cd, z ? 0xffffffff : r.offset, 4);
      PutStr(cd, r.name);
      if (z) {
        Put(cd, 0x0001, 2);
        Put(cd, 24, 2);
        Put(cd, r.usize, 8);
        Put(cd, r.csize, 8);
        Put(cd, r.offset, 8);
      }
    }
    sink_.Write(cd);
    const uint64_t n = entries_.size(), cd_size = cd.size();
    Bytes end;
    if (o_.zip64_end) {
      const uint64_t z_off = sink_.offset;
      Put(end, 0x06064b50, 4);
      Put(end, 44, 8);
      Put(end, 0x031e, 2);
      Put(end, 45, 2);
      Put(end, 0, 4);
      Put(end, 0, 4);
      Put(end, n, 8);
      Put(end, n, 8);
      Put(end, cd_size, 8);
      Put(end, cd_offset_, 8);
      Put(end, 0x07064b50, 4);
      Put(end, 0, 4);
      Put(end, z_off, 8);
      Put(end, 1, 4);
    }
    eocd_offset_ = sink_.offset + end.size();
    Put(end, 0x06054b50, 4);
    Put(end, 0, 2);
    Put(end, 0, 2);
    Put(end, n, 2);
    Put(end, n, 2);
    Put(end, cd_size, 4);
    Put(end, cd_offset_, 4);
    Put(end, 0, 2);
    sink_.Write(end);
  }

 private:
  struct Rec {
    std::string name;
    uint32_t crc;
    uint64_t csize, usize, offset;
    uint16_t method;
  };
  Sink sink_;
  ZipOptions o_;
  std::vector<Rec> entries_;
  uint64_t last_data_ = 0, cd_offset_ = 0, eocd_offset_ = 0;
};

// ---- pickle ----

// Opcode-level pickle assembly.
class PickleWriter {
 public:
  Bytes bytes;
  PickleWriter& Op(uint8_t op) {
    bytes.push_back(op);
    return *this;
  }
  PickleWriter& Proto(int p = 2) { return Op(0x80).Op(static_cast<uint8_t>(p)); }
  PickleWriter& Global(std::string_view module, std::string_view name) {
    Op('c');
    PutStr(bytes, module);
    bytes.push_back('\n');
    PutStr(bytes, name);
    bytes.push_back('\n');
    return *this;
  }
  PickleWriter& Mark() { return Op('('); }
  PickleWriter& Str(std::string_view s) {
    Op('X');
    Put(bytes, s.size(), 4);
    PutStr(bytes, s);
    return *this;
  }
  PickleWriter& Int(int64_t v) {
    if (v >= 0 && v < 256) {
      Op('K');
      Put(bytes, v, 1);
    } else if (v >= 0 && v < 65536) {
      Op('M');
      Put(bytes, v, 2);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
      Op('J');
      Put(bytes, static_cast<uint32_t>(v), 4);
    } else {
      Op(0x8a);
      Op(8);
      Put(bytes, static_cast<uint64_t>(v), 8);
    }
    return *this;
  }
  PickleWriter& IntTuple(const std::vector<int64_t>& v) {
    Mark();
    for (int64_t x : v) Int(x);
    return Op('t');
  }
  PickleWriter& Put1(int i) { return Op('q').Op(static_cast<uint8_t>(i)); }
  PickleWriter& Get1(int i) { return Op('h').Op(static_cast<uint8_t>(i)); }
  PickleWriter& Stop() { return Op('.'); }
};

// One tensor of a state dict as torch.save pickles it.
struct PickledTensor {
  std::string name;
  std::string storage_type = "FloatStorage";
  std::string key;
  int64_t storage_numel = 0;
  int64_t offset = 0;
  std::vector<int64_t> shape, strides;  // strides default to contiguous
};

inline std::vector<int64_t> ContiguousStrides(const std::vector<int64_t>& shape) {
  // Unsigned, wrapping: the evil-pickle tests build shapes whose strides overflow on purpose.
  std::vector<int64_t> s(shape.size());
  uint64_t acc = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    s[i] = static_cast<int64_t>(acc);
    acc *= static_cast<uint64_t>(shape[i]);
  }
  return s;
}

// Emits torch.save's pickle for an OrderedDict of tensors (protocol 2, as torch writes it:
// _rebuild_tensor_v2(persistent storage, offset, size, stride, False, OrderedDict())).
inline void PickleTensor(PickleWriter& p, const PickledTensor& t) {
  p.Str(t.name);
  p.Global("torch._utils", "_rebuild_tensor_v2");
  p.Mark();
  p.Mark().Str("storage").Global("torch", t.storage_type).Str(t.key).Str("cpu");
  p.Int(t.storage_numel).Op('t').Op('Q');
  p.Int(t.offset);
  p.IntTuple(t.shape);
  p.IntTuple(t.strides.empty() ? ContiguousStrides(t.shape) : t.strides);
  p.Op(0x89);
  p.Global("collections", "OrderedDict").Op(')').Op('R');
  p.Op('t').Op('R');
}

inline Bytes StateDictPickle(const std::vector<PickledTensor>& tensors) {
  PickleWriter p;
  p.Proto(2).Global("collections", "OrderedDict").Op(')').Op('R').Put1(0).Mark();
  for (const PickledTensor& t : tensors) PickleTensor(p, t);
  p.Op('u').Stop();
  return p.bytes;
}

// ---- checkpoints ----

struct RawTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
};

inline const char* StorageName(DType type) {
  return type == DType::kF32   ? "FloatStorage"
         : type == DType::kF16 ? "HalfStorage"
                               : "BFloat16Storage";
}
inline const char* SafetensorsName(DType type) {
  return type == DType::kF32 ? "F32" : type == DType::kF16 ? "F16" : "BF16";
}
inline int64_t Numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// A torch.save-style .pth: <top>/data.pkl, <top>/byteorder, <top>/data/<i>, <top>/version.
// `next(i)` returns tensor i's values (so that huge checkpoints can be streamed).
inline void WritePth(Sink sink, const std::string& top, DType type,
                     const std::vector<std::pair<std::string, std::vector<int64_t>>>& shapes,
                     const std::function<std::vector<float>(size_t)>& next,
                     ZipOptions options = {}) {
  std::vector<PickledTensor> pt;
  for (size_t i = 0; i < shapes.size(); ++i) {
    pt.push_back({shapes[i].first,
                  StorageName(type),
                  std::to_string(i),
                  Numel(shapes[i].second),
                  0,
                  shapes[i].second,
                  {}});
  }
  ZipWriter zip(std::move(sink), options);
  const Bytes pkl = StateDictPickle(pt);
  zip.Add(top + "/data.pkl", pkl);
  zip.Add(top + "/byteorder", std::string_view("little"));
  for (size_t i = 0; i < shapes.size(); ++i) {
    const std::vector<float> v = next(i);
    const Bytes data = Encode(type, v);
    zip.Add(top + "/data/" + std::to_string(i), data);
  }
  zip.Add(top + "/version", std::string_view("3\n"));
  zip.Finish();
}

inline Bytes MakePth(const std::vector<RawTensor>& tensors, DType type,
                     const std::string& top = "archive", ZipOptions options = {}) {
  Bytes out;
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  for (const RawTensor& t : tensors) shapes.emplace_back(t.name, t.shape);
  WritePth(
      Sink::ToBytes(&out), top, type, shapes, [&](size_t i) { return tensors[i].values; }, options);
  return out;
}

inline std::string SafetensorsHeader(
    DType type, const std::vector<std::pair<std::string, std::vector<int64_t>>>& shapes) {
  const uint64_t esize = type == DType::kF32 ? 4 : 2;
  std::string h = "{\"__metadata__\":{\"format\":\"pt\"}";
  uint64_t offset = 0;
  for (const auto& [name, shape] : shapes) {
    h += ",\"" + name + "\":{\"dtype\":\"" + SafetensorsName(type) + "\",\"shape\":[";
    for (size_t i = 0; i < shape.size(); ++i) h += (i ? "," : "") + std::to_string(shape[i]);
    const uint64_t n = static_cast<uint64_t>(Numel(shape)) * esize;
    h += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + n) + "]}";
    offset += n;
  }
  h += "}";
  while (h.size() % 8) h += ' ';
  return h;
}

inline void WriteSafetensors(
    Sink sink, DType type, const std::vector<std::pair<std::string, std::vector<int64_t>>>& shapes,
    const std::function<std::vector<float>(size_t)>& next) {
  const std::string h = SafetensorsHeader(type, shapes);
  Bytes head;
  Put(head, h.size(), 8);
  PutStr(head, h);
  sink.Write(head);
  for (size_t i = 0; i < shapes.size(); ++i) {
    const std::vector<float> v = next(i);
    sink.Write(Encode(type, v));
  }
}

inline Bytes MakeSafetensors(const std::vector<RawTensor>& tensors, DType type) {
  Bytes out;
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
  for (const RawTensor& t : tensors) shapes.emplace_back(t.name, t.shape);
  WriteSafetensors(Sink::ToBytes(&out), type, shapes, [&](size_t i) { return tensors[i].values; });
  return out;
}

// ---- a random RWKV-7 checkpoint in BlinkDL's raw layout ----

struct Rwkv7Shape {
  int layers = 2, width = 256, head_size = 64, vocab = 1000, ffn = 1024;
  int d_decay = 32, d_aaa = 32, d_mv = 16, d_gate = 64;
};

// Names and shapes in the order of the official .pth files (blocks.0 carries the unused
// v0/v1/v2 like the official releases).
inline std::vector<std::pair<std::string, std::vector<int64_t>>> Rwkv7Tensors(const Rwkv7Shape& s) {
  const int64_t C = s.width, H = s.width / s.head_size, N = s.head_size;
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  out.push_back({"emb.weight", {s.vocab, C}});
  for (int l = 0; l < s.layers; ++l) {
    const std::string b = "blocks." + std::to_string(l) + ".";
    out.push_back({b + "ln1.weight", {C}});
    out.push_back({b + "ln1.bias", {C}});
    out.push_back({b + "ln2.weight", {C}});
    out.push_back({b + "ln2.bias", {C}});
    if (l == 0) {
      out.push_back({b + "ln0.weight", {C}});
      out.push_back({b + "ln0.bias", {C}});
    }
    for (const char* m : {"x_r", "x_w", "x_k", "x_v", "x_a", "x_g"}) {
      out.push_back({b + "att." + m, {1, 1, C}});
    }
    out.push_back({b + "att.w0", {1, 1, C}});
    out.push_back({b + "att.w1", {C, s.d_decay}});
    out.push_back({b + "att.w2", {s.d_decay, C}});
    out.push_back({b + "att.a0", {1, 1, C}});
    out.push_back({b + "att.a1", {C, s.d_aaa}});
    out.push_back({b + "att.a2", {s.d_aaa, C}});
    out.push_back({b + "att.v0", {1, 1, C}});
    out.push_back({b + "att.v1", {C, s.d_mv}});
    out.push_back({b + "att.v2", {s.d_mv, C}});
    out.push_back({b + "att.g1", {C, s.d_gate}});
    out.push_back({b + "att.g2", {s.d_gate, C}});
    out.push_back({b + "att.k_k", {1, 1, C}});
    out.push_back({b + "att.k_a", {1, 1, C}});
    out.push_back({b + "att.r_k", {H, N}});
    for (const char* m : {"receptance", "key", "value", "output"}) {
      out.push_back({b + "att." + m + ".weight", {C, C}});
    }
    out.push_back({b + "att.ln_x.weight", {C}});
    out.push_back({b + "att.ln_x.bias", {C}});
    out.push_back({b + "ffn.x_k", {1, 1, C}});
    out.push_back({b + "ffn.key.weight", {s.ffn, C}});
    out.push_back({b + "ffn.value.weight", {C, s.ffn}});
  }
  out.push_back({"ln_out.weight", {C}});
  out.push_back({"ln_out.bias", {C}});
  out.push_back({"head.weight", {s.vocab, C}});
  return out;
}

// Deterministic values for one tensor, scaled so that every term of the RWKV-7 math matters
// and activations stay O(1) through the layers (uniform noise, fan-in scaled matrices).
inline std::vector<float> Rwkv7Values(const std::string& name, const std::vector<int64_t>& shape,
                                      uint64_t seed) {
  uint64_t h = seed ^ 0x9e3779b97f4a7c15ull;
  for (char c : name) h = (h ^ static_cast<uint8_t>(c)) * 0x100000001b3ull;
  auto next = [&h]() {  // splitmix64 -> uniform [-1, 1)
    uint64_t z = (h += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return static_cast<float>(static_cast<double>(z >> 11) * (2.0 / 9007199254740992.0) - 1.0);
  };
  const int64_t n = Numel(shape);
  std::vector<float> v(static_cast<size_t>(n));
  auto ends = [&](std::string_view s) {
    return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
  };
  float scale = 1, offset = 0;
  const float fan_in = static_cast<float>(shape.size() == 2 ? shape[1] : 1);
  if (ends("ln1.weight") || ends("ln2.weight") || ends("ln0.weight") || ends("ln_out.weight") ||
      ends("ln_x.weight")) {
    offset = 1, scale = 0.2f;
  } else if (ends(".bias")) {
    scale = 0.1f;
  } else if (name.find(".x_") != std::string::npos) {
    offset = 0.5f, scale = 0.5f;  // token-shift mixes in [0, 1)
  } else if (ends(".w0")) {
    offset = -0.5f, scale = 2.0f;
  } else if (ends(".a0") || ends(".v0")) {
    scale = 1.0f;
  } else if (ends(".k_k")) {
    offset = 1.0f, scale = 0.3f;
  } else if (ends(".k_a")) {
    offset = 0.5f, scale = 0.5f;
  } else if (ends(".r_k")) {
    scale = 0.5f;
  } else if (ends("emb.weight")) {
    scale = 1.0f;
  } else if (shape.size() == 2) {  // matrices: fan-in scaled, output projections smaller
    const bool into_residual = ends("output.weight") || ends("ffn.value.weight");
    const bool low_rank_in = ends(".w1") || ends(".a1") || ends(".v1") || ends(".g1");
    // raw low-rank matrices are [in, out] (used as x @ W)
    const float in = low_rank_in || ends(".w2") || ends(".a2") || ends(".v2") || ends(".g2")
                         ? static_cast<float>(shape[0])
                         : fan_in;
    scale = (into_residual ? 0.5f : 1.7f) / std::sqrt(in);
  }
  for (auto& x : v) x = offset + scale * next();
  return v;
}

}  // namespace aviary::testing::pth
