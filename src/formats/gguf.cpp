// GGUF reader: the container (gguf::Parse) and its mapping to aviary's canonical WeightFile
// (ReadGguf) for llama.cpp's rwkv6/rwkv7 and aviary's aviary-rwkv4/aviary-rwkv5 files, as the
// version table (models/versions.cpp) names their tensors.
// Tensors are views into the mapped bytes; only llama.cpp's rwkv6 rescaled layers are copied.
#include "formats/gguf.h"
#include "formats/printable.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <set>

#include "aviary/error.h"
#include "formats/gguf_names.h"
#include "formats/weight_file.h"
#include "models/versions.h"
#include "tensor/quantize.h"

namespace aviary {
namespace gguf {

// ---- Small tables ----

std::string_view ValueTypeName(ValueType type) {
  switch (type) {
    case ValueType::kU8: return "u8";
    case ValueType::kI8: return "i8";
    case ValueType::kU16: return "u16";
    case ValueType::kI16: return "i16";
    case ValueType::kU32: return "u32";
    case ValueType::kI32: return "i32";
    case ValueType::kF32: return "f32";
    case ValueType::kBool: return "bool";
    case ValueType::kString: return "string";
    case ValueType::kArray: return "array";
    case ValueType::kU64: return "u64";
    case ValueType::kI64: return "i64";
    case ValueType::kF64: return "f64";
  }
  return "?";
}

uint32_t GgmlTypeOf(DType type) { return static_cast<uint32_t>(Traits(type).ggml_type); }

std::optional<DType> DTypeFromGgml(uint32_t ggml_type) {
  for (int i = 0; i < kNumDTypes; ++i) {
    const DType t = static_cast<DType>(i);
    if (Traits(t).ggml_type == static_cast<int>(ggml_type)) return t;
  }
  return std::nullopt;
}

std::string GgmlTypeName(uint32_t ggml_type) {
  static const char* const kNames[] = {
      "F32",   "F16",        "Q4_0",       "Q4_1",       "Q4_2",     "Q4_3",     "Q5_0",
      "Q5_1",  "Q8_0",       "Q8_1",       "Q2_K",       "Q3_K",     "Q4_K",     "Q5_K",
      "Q6_K",  "Q8_K",       "IQ2_XXS",    "IQ2_XS",     "IQ3_XXS",  "IQ1_S",    "IQ4_NL",
      "IQ3_S", "IQ2_S",      "IQ4_XS",     "I8",         "I16",      "I32",      "I64",
      "F64",   "IQ1_M",      "BF16",       "Q4_0_4_4",   "Q4_0_4_8", "Q4_0_8_8", "TQ1_0",
      "TQ2_0", "IQ4_NL_4_4", "IQ4_NL_4_8", "IQ4_NL_8_8", "MXFP4"};
  if (ggml_type < std::size(kNames)) return kNames[ggml_type];
  return "type " + std::to_string(ggml_type);
}

uint32_t FileTypeOf(DType type) { return static_cast<uint32_t>(Traits(type).gguf_file_type); }

std::optional<DType> DTypeFromFileType(uint32_t file_type) {
  if (file_type == 15) return DType::kQ4_K;  // "Q4_K_M": some matrices in Q6_K, most in Q4_K
  if (file_type == 17) return DType::kQ5_K;  // "Q5_K_M"
  for (int i = 0; i < kNumDTypes; ++i) {
    const DType t = static_cast<DType>(i);
    if (Traits(t).gguf_file_type == static_cast<int>(file_type)) return t;
  }
  return std::nullopt;
}

// ---- Values and the parsed file ----

bool Value::IsInteger() const {
  switch (type) {
    case ValueType::kU8:
    case ValueType::kI8:
    case ValueType::kU16:
    case ValueType::kI16:
    case ValueType::kU32:
    case ValueType::kI32:
    case ValueType::kU64:
    case ValueType::kI64: return true;
    default: return false;
  }
}

namespace {

size_t ScalarSize(ValueType t) {
  switch (t) {
    case ValueType::kU8:
    case ValueType::kI8:
    case ValueType::kBool: return 1;
    case ValueType::kU16:
    case ValueType::kI16: return 2;
    case ValueType::kU32:
    case ValueType::kI32:
    case ValueType::kF32: return 4;
    case ValueType::kU64:
    case ValueType::kI64:
    case ValueType::kF64: return 8;
    default: return 0;  // string, array
  }
}

bool KnownValueType(uint32_t t) { return t <= static_cast<uint32_t>(ValueType::kF64); }

// Decodes the scalar at p (ScalarSize(t) bytes) into v.
void DecodeScalar(ValueType t, const uint8_t* p, Value* v) {
  auto load = [&](auto tag) {
    decltype(tag) x;
    std::memcpy(&x, p, sizeof x);
    return x;
  };
  auto set_unsigned = [&](uint64_t x) {
    v->u = x;
    v->is_unsigned_ok = true;
    v->is_signed_ok = x <= static_cast<uint64_t>(INT64_MAX);
    v->i = v->is_signed_ok ? static_cast<int64_t>(x) : 0;
    v->f = static_cast<double>(x);
  };
  auto set_signed = [&](int64_t x) {
    v->i = x;
    v->is_signed_ok = true;
    v->is_unsigned_ok = x >= 0;
    v->u = x >= 0 ? static_cast<uint64_t>(x) : 0;
    v->f = static_cast<double>(x);
  };
  switch (t) {
    case ValueType::kU8: set_unsigned(load(uint8_t{})); break;
    case ValueType::kI8: set_signed(load(int8_t{})); break;
    case ValueType::kU16: set_unsigned(load(uint16_t{})); break;
    case ValueType::kI16: set_signed(load(int16_t{})); break;
    case ValueType::kU32: set_unsigned(load(uint32_t{})); break;
    case ValueType::kI32: set_signed(load(int32_t{})); break;
    case ValueType::kU64: set_unsigned(load(uint64_t{})); break;
    case ValueType::kI64: set_signed(load(int64_t{})); break;
    case ValueType::kF32: v->f = load(float{}); break;
    case ValueType::kF64: v->f = load(double{}); break;
    case ValueType::kBool:
      v->u = p[0];
      v->is_unsigned_ok = true;
      break;
    default: break;
  }
}

// Names in errors: 80 bytes at most.
std::string Printable(std::string_view s) { return aviary::Printable(s, 80); }

class Reader {
 public:
  Reader(std::span<const uint8_t> bytes, const File& file) : bytes_(bytes), file_(file) {}
  size_t pos() const { return pos_; }
  size_t remaining() const { return bytes_.size() - pos_; }

  const uint8_t* Take(size_t n, const std::string& what) {
    if (n > remaining()) {
      file_.Fail("truncated: " + what + " needs " + std::to_string(n) + " bytes at offset " +
                 std::to_string(pos_) + ", only " + std::to_string(remaining()) + " left");
    }
    const uint8_t* p = bytes_.data() + pos_;
    pos_ += n;
    return p;
  }
  template <typename T>
  T Read(const std::string& what) {
    T v;
    std::memcpy(&v, Take(sizeof v, what), sizeof v);
    return v;
  }
  std::string_view String(const std::string& what, uint64_t max_len) {
    const uint64_t n = Read<uint64_t>(what + " length");
    if (n > max_len) {
      file_.Fail(what + ": length " + std::to_string(n) + " at offset " + std::to_string(pos_ - 8) +
                 " is larger than " + std::to_string(max_len));
    }
    if (n > remaining()) {
      file_.Fail("truncated: " + what + " of " + std::to_string(n) + " bytes at offset " +
                 std::to_string(pos_) + ", only " + std::to_string(remaining()) + " left");
    }
    return {reinterpret_cast<const char*>(Take(n, what)), static_cast<size_t>(n)};
  }

 private:
  std::span<const uint8_t> bytes_;
  const File& file_;
  size_t pos_ = 0;
};

constexpr uint64_t kMaxKeyLength = 65535;
constexpr uint64_t kMaxTensorNameLength = 1024;

Value ReadValue(Reader& in, const File& file, const std::string& key) {
  Value v;
  const uint32_t type = in.Read<uint32_t>("the type of key '" + key + "'");
  if (!KnownValueType(type)) {
    file.Fail("key '" + key + "' has unknown value type " + std::to_string(type));
  }
  v.type = static_cast<ValueType>(type);
  const std::string what = "the value of key '" + key + "'";
  if (v.type == ValueType::kString) {
    v.str = in.String(what, in.remaining());
    return v;
  }
  if (v.type != ValueType::kArray) {
    DecodeScalar(v.type, in.Take(ScalarSize(v.type), what), &v);
    if (v.type == ValueType::kBool && v.u > 1) {
      file.Fail("key '" + key + "' is a bool with value " + std::to_string(v.u));
    }
    return v;
  }
  const uint32_t elem = in.Read<uint32_t>("the element type of key '" + key + "'");
  if (!KnownValueType(elem)) {
    file.Fail("key '" + key + "' is an array of unknown value type " + std::to_string(elem));
  }
  v.elem = static_cast<ValueType>(elem);
  if (v.elem == ValueType::kArray) {
    file.Fail("key '" + key + "' is an array of arrays, which GGUF readers do not support");
  }
  v.count = in.Read<uint64_t>("the length of key '" + key + "'");
  if (v.elem == ValueType::kString) {
    // Each string takes at least its 8-byte length: refuse counts the file cannot hold
    // before reserving anything.
    if (v.count > in.remaining() / 8) {
      file.Fail("key '" + key + "' claims " + std::to_string(v.count) + " strings but only " +
                std::to_string(in.remaining()) + " bytes are left");
    }
    v.strings.reserve(v.count);
    for (uint64_t i = 0; i < v.count; ++i) {
      v.strings.push_back(in.String(what + " element " + std::to_string(i), in.remaining()));
    }
    return v;
  }
  const size_t size = ScalarSize(v.elem);
  if (v.count > in.remaining() / size) {
    file.Fail("key '" + key + "' claims " + std::to_string(v.count) + " " +
              std::string(ValueTypeName(v.elem)) + " values but only " +
              std::to_string(in.remaining()) + " bytes are left");
  }
  const uint8_t* p = in.Take(v.count * size, what);
  v.raw = {p, v.count * size};
  if (v.elem == ValueType::kBool) {
    for (uint64_t i = 0; i < v.count; ++i) {
      if (p[i] > 1) file.Fail("key '" + key + "' holds a bool with value " + std::to_string(p[i]));
    }
  }
  return v;
}

}  // namespace

void File::Fail(const std::string& problem) const { throw Error(name + ": " + problem); }

const Value* File::Find(std::string_view key) const {
  auto it = kv_index.find(key);
  return it == kv_index.end() ? nullptr : &kvs[it->second].second;
}

const TensorInfo* File::FindTensor(std::string_view tensor) const {
  auto it = tensor_index.find(tensor);
  return it == tensor_index.end() ? nullptr : &tensors[it->second];
}

std::string File::GetString(std::string_view key) const {
  const Value* v = Find(key);
  if (!v) Fail("missing key '" + std::string(key) + "'");
  if (v->type != ValueType::kString) {
    Fail("key '" + std::string(key) + "' is a " + std::string(ValueTypeName(v->type)) +
         ", expected a string");
  }
  return std::string(v->str);
}

std::optional<uint64_t> File::GetUintOr(std::string_view key) const {
  const Value* v = Find(key);
  if (!v) return std::nullopt;
  if (!v->IsInteger()) {
    Fail("key '" + std::string(key) + "' is a " + std::string(ValueTypeName(v->type)) +
         ", expected an integer");
  }
  if (!v->is_unsigned_ok) Fail("key '" + std::string(key) + "' is negative");
  return v->u;
}

uint64_t File::GetUint(std::string_view key) const {
  std::optional<uint64_t> v = GetUintOr(key);
  if (!v) Fail("missing key '" + std::string(key) + "'");
  return *v;
}

std::optional<double> File::GetFloatOr(std::string_view key) const {
  const Value* v = Find(key);
  if (!v) return std::nullopt;
  if (v->type != ValueType::kF32 && v->type != ValueType::kF64 && !v->IsInteger()) {
    Fail("key '" + std::string(key) + "' is a " + std::string(ValueTypeName(v->type)) +
         ", expected a number");
  }
  return v->f;
}

const std::vector<std::string_view>& File::GetStringArray(std::string_view key) const {
  const Value* v = Find(key);
  if (!v) Fail("missing key '" + std::string(key) + "'");
  if (v->type != ValueType::kArray || v->elem != ValueType::kString) {
    Fail("key '" + std::string(key) + "' is not an array of strings");
  }
  return v->strings;
}

std::vector<int64_t> File::GetIntArray(std::string_view key) const {
  const Value* v = Find(key);
  if (!v) Fail("missing key '" + std::string(key) + "'");
  const size_t size = ScalarSize(v->elem);
  Value probe;
  probe.type = v->elem;
  if (v->type != ValueType::kArray || !probe.IsInteger()) {
    Fail("key '" + std::string(key) + "' is not an array of integers");
  }
  std::vector<int64_t> out(v->count);
  for (uint64_t i = 0; i < v->count; ++i) {
    Value e;
    DecodeScalar(v->elem, v->raw.data() + i * size, &e);
    if (!e.is_signed_ok) Fail("key '" + std::string(key) + "' holds a value beyond int64");
    out[i] = e.i;
  }
  return out;
}

File Parse(std::span<const uint8_t> bytes, const std::string& name) {
  File f;
  f.name = name;
  Reader in(bytes, f);
  const uint8_t* magic = in.Take(4, "the magic number");
  if (std::memcmp(magic, kMagic, 4) != 0) f.Fail("not a GGUF file (no 'GGUF' magic)");
  f.version = in.Read<uint32_t>("the GGUF version");
  if (f.version == 1) {
    f.Fail(
        "GGUF version 1 (before October 2023) is not supported; convert it again with a "
        "current llama.cpp or aviary");
  }
  if (f.version != 2 && f.version != 3) {
    uint32_t swapped = __builtin_bswap32(f.version);
    if (swapped >= 1 && swapped <= 3) f.Fail("big-endian GGUF files are not supported");
    f.Fail("unsupported GGUF version " + std::to_string(f.version) + " (supported: 2, 3)");
  }
  const uint64_t n_tensors = in.Read<uint64_t>("the tensor count");
  const uint64_t n_kv = in.Read<uint64_t>("the metadata count");
  // The smallest metadata entry is 14 bytes (8-byte key length, a 1-byte key, 4-byte type, a
  // 1-byte value), the smallest tensor entry 33: refuse counts the file cannot hold.
  if (n_kv > in.remaining() / 14) {
    f.Fail("header claims " + std::to_string(n_kv) + " metadata entries but only " +
           std::to_string(in.remaining()) + " bytes follow");
  }
  if (n_tensors > in.remaining() / 33) {
    f.Fail("header claims " + std::to_string(n_tensors) + " tensors but only " +
           std::to_string(in.remaining()) + " bytes follow");
  }

  f.kvs.reserve(n_kv);
  for (uint64_t i = 0; i < n_kv; ++i) {
    const std::string key(in.String("metadata key " + std::to_string(i), kMaxKeyLength));
    if (key.empty()) f.Fail("metadata key " + std::to_string(i) + " is empty");
    if (f.kv_index.count(key)) f.Fail("key '" + Printable(key) + "' appears twice");
    Value v = ReadValue(in, f, Printable(key));
    f.kv_index.emplace(key, f.kvs.size());
    f.kvs.emplace_back(key, std::move(v));
  }

  if (const Value* a = f.Find("general.alignment")) {
    if (a->type != ValueType::kU32) {
      f.Fail("key 'general.alignment' is a " + std::string(ValueTypeName(a->type)) +
             ", expected u32");
    }
    if (a->u == 0 || (a->u & (a->u - 1)) != 0 || a->u > (uint64_t{1} << 24)) {
      f.Fail("general.alignment " + std::to_string(a->u) +
             " is not a power of two between 1 and 2^24");
    }
    f.alignment = a->u;
  }

  f.tensors.reserve(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    TensorInfo t;
    t.name = std::string(in.String("tensor " + std::to_string(i) + " name", kMaxTensorNameLength));
    const std::string where = "tensor '" + Printable(t.name) + "'";
    if (t.name.empty()) f.Fail("tensor " + std::to_string(i) + " has an empty name");
    if (f.tensor_index.count(t.name)) f.Fail(where + " appears twice");
    const uint32_t n_dims = in.Read<uint32_t>(where + " dimension count");
    if (n_dims < 1 || n_dims > static_cast<uint32_t>(kMaxDims)) {
      f.Fail(where + ": dimension count " + std::to_string(n_dims) + " (expected 1.." +
             std::to_string(kMaxDims) + ")");
    }
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t ne = in.Read<uint64_t>(where + " dimensions");
      if (ne < 1 || ne > (uint64_t{1} << 40)) {
        f.Fail(where + ": dimension " + std::to_string(d) + " is " +
               std::to_string(static_cast<int64_t>(ne)));
      }
      // Every supported type packs at least 4 elements per 9 bytes: more elements than the
      // file could hold means a corrupt shape (and stops the product from overflowing).
      if (numel > bytes.size() * uint64_t{2} / ne + 1) {
        f.Fail(where + ": shape larger than the file (" + std::to_string(bytes.size()) + " bytes)");
      }
      numel *= ne;
      t.ne.push_back(static_cast<int64_t>(ne));
    }
    t.ggml_type = in.Read<uint32_t>(where + " type");
    const std::optional<DType> type = DTypeFromGgml(t.ggml_type);
    if (!type) {
      // GgmlTypeName says "type N" for a number it has no name for.
      const std::string name = GgmlTypeName(t.ggml_type);
      const std::string number = "ggml type " + std::to_string(t.ggml_type);
      const std::string named =
          name.rfind("type ", 0) == 0 ? number : "type " + name + " (" + number + ")";
      f.Fail(where + " has " + named +
             ", which aviary does not read (it reads F32, F16, BF16, Q8_0, Q6_K, Q5_K, Q5_1, "
             "Q5_0, Q4_K, Q4_1, Q4_0)");
    }
    t.type = *type;
    const int block = Traits(t.type).block_elems;
    if (t.ne[0] % block != 0) {
      f.Fail(where + ": row length " + std::to_string(t.ne[0]) + " is not a multiple of the " +
             std::string(DTypeName(t.type)) + " block size " + std::to_string(block));
    }
    t.nbytes = StorageBytes(t.type, numel);
    t.offset = in.Read<uint64_t>(where + " offset");
    if (t.offset % f.alignment != 0) {
      f.Fail(where + ": data offset " + std::to_string(t.offset) +
             " is not a multiple of the alignment " + std::to_string(f.alignment));
    }
    f.tensor_index.emplace(t.name, f.tensors.size());
    f.tensors.push_back(std::move(t));
  }

  const uint64_t header_end = in.pos();
  f.data_offset = (header_end + f.alignment - 1) / f.alignment * f.alignment;
  for (TensorInfo& t : f.tensors) {
    const uint64_t size = bytes.size();
    if (f.data_offset > size || t.offset > size - f.data_offset ||
        t.nbytes > size - f.data_offset - t.offset) {
      f.Fail("tensor '" + Printable(t.name) + "' (" + std::to_string(t.nbytes) +
             " bytes at data offset " + std::to_string(t.offset) + ") runs past the end of the " +
             "file (" + std::to_string(size) + " bytes): truncated or corrupt");
    }
    t.data = bytes.data() + f.data_offset + t.offset;
  }
  return f;
}

// ---- Tokenizer text encodings ----

std::string EscapeRwkvToken(std::string_view bytes) {
  // Python's bytes repr: single quotes unless the bytes hold ' and no ".
  const bool has_single = bytes.find('\'') != std::string_view::npos;
  const bool has_double = bytes.find('"') != std::string_view::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  std::string out;
  out.reserve(bytes.size());
  for (unsigned char c : bytes) {
    if (c == '\\' || c == static_cast<unsigned char>(quote)) {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c < 0x20 || c >= 0x7f) {
      static const char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

std::optional<std::string> UnescapeRwkvToken(std::string_view text) {
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '\\') {
      out += text[i];
      continue;
    }
    if (++i == text.size()) return std::nullopt;
    switch (text[i]) {
      case 't': out += '\t'; break;
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 'x': {
        if (i + 2 >= text.size()) return std::nullopt;
        const int hi = hex(text[i + 1]), lo = hex(text[i + 2]);
        if (hi < 0 || lo < 0) return std::nullopt;
        out += static_cast<char>(hi * 16 + lo);
        i += 2;
        break;
      }
      default: out += text[i]; break;  // \\, \', \" and anything else: the character itself
    }
  }
  return out;
}

namespace {

// bytes_to_unicode(): printable Latin-1 bytes map to themselves, the other 68 to U+0100...
const std::array<uint32_t, 256>& ByteToCodePoint() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
      t[b] = printable ? b : next++;
    }
    return t;
  }();
  return table;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    *out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    *out += static_cast<char>(0xc0 | (cp >> 6));
    *out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    *out += static_cast<char>(0xe0 | (cp >> 12));
    *out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    *out += static_cast<char>(0x80 | (cp & 0x3f));
  }
}

}  // namespace

std::string ByteLevelEncode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) AppendUtf8(ByteToCodePoint()[c], &out);
  return out;
}

std::string ByteLevelDecode(std::string_view text) {
  static const std::map<uint32_t, uint8_t> reverse = [] {
    std::map<uint32_t, uint8_t> r;
    for (int b = 0; b < 256; ++b) r[ByteToCodePoint()[b]] = static_cast<uint8_t>(b);
    return r;
  }();
  std::string out;
  out.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    const unsigned char c = text[i];
    int len = c < 0x80             ? 1
              : (c & 0xe0) == 0xc0 ? 2
              : (c & 0xf0) == 0xe0 ? 3
              : (c & 0xf8) == 0xf0 ? 4
                                   : 0;
    uint32_t cp = 0;
    bool valid = len > 0 && i + len <= text.size();
    if (valid) {
      cp = len == 1 ? c : c & (0x7f >> len);
      for (int k = 1; k < len; ++k) {
        const unsigned char cc = text[i + k];
        if ((cc & 0xc0) != 0x80) valid = false;
        cp = (cp << 6) | (cc & 0x3f);
      }
    }
    if (!valid) {  // not UTF-8: keep the byte
      out += static_cast<char>(c);
      ++i;
      continue;
    }
    auto it = reverse.find(cp);
    if (it != reverse.end()) {
      out += static_cast<char>(it->second);
    } else {
      out.append(text.substr(i, len));
    }
    i += len;
  }
  return out;
}

}  // namespace gguf

// ---- GGUF -> canonical WeightFile ----

namespace {

using gguf::File;
using gguf::NameMap;
using gguf::TensorInfo;

Tensor ViewOf(const TensorInfo& info, const std::string& canonical) {
  Tensor t;
  t.name = canonical;
  t.type = info.type;
  t.shape = info.Shape();
  t.data = info.data;
  t.nbytes = info.nbytes;
  return t;
}

// A copy of `t` with every value multiplied by 2^k (exact unless it overflows): float types
// value by value, block types through their scales.
std::vector<uint8_t> ScaledByPowerOfTwo(const Tensor& t, int k) {
  std::vector<uint8_t> out(t.data, t.data + t.nbytes);
  const float s = std::ldexp(1.0f, k);
  auto scale_f16 = [&](uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    h = F32ToF16(F16ToF32(h) * s);
    std::memcpy(p, &h, 2);
  };
  switch (t.type) {
    case DType::kF32:
      for (size_t i = 0; i < out.size(); i += 4) {
        float x;
        std::memcpy(&x, &out[i], 4);
        x *= s;
        std::memcpy(&out[i], &x, 4);
      }
      break;
    case DType::kF16:
      for (size_t i = 0; i < out.size(); i += 2) scale_f16(&out[i]);
      break;
    case DType::kBF16:
      for (size_t i = 0; i < out.size(); i += 2) {
        uint16_t h;
        std::memcpy(&h, &out[i], 2);
        h = F32ToBF16(BF16ToF32(h) * s);
        std::memcpy(&out[i], &h, 2);
      }
      break;
    default: {  // d first (Q6_K: last); the _1 types and Q4_K/Q5_K carry m or dmin after it
      const size_t block = Traits(t.type).block_bytes;
      const bool has_min = t.type == DType::kQ4_1 || t.type == DType::kQ5_1 ||
                           t.type == DType::kQ4_K || t.type == DType::kQ5_K;
      const size_t d_at = t.type == DType::kQ6_K ? offsetof(BlockQ6_K, d) : 0;
      for (size_t i = 0; i < out.size(); i += block) {
        scale_f16(&out[i + d_at]);
        if (has_min) scale_f16(&out[i + 2]);
      }
    }
  }
  return out;
}

std::shared_ptr<const TokenizerData> ReadTokenizer(const File& f, std::vector<std::string>* notes) {
  const gguf::Value* model = f.Find("tokenizer.ggml.model");
  if (!model) return nullptr;
  const std::string kind = f.GetString("tokenizer.ggml.model");
  if (kind != "rwkv" && kind != "gpt2") {
    notes->push_back("tokenizer '" + kind + "' in the file is not supported; ignored");
    return nullptr;
  }
  const std::vector<std::string_view>& tokens = f.GetStringArray("tokenizer.ggml.tokens");
  std::vector<int64_t> types;
  if (f.Find("tokenizer.ggml.token_type")) {
    types = f.GetIntArray("tokenizer.ggml.token_type");
    if (types.size() != tokens.size()) {
      f.Fail("tokenizer.ggml.token_type has " + std::to_string(types.size()) + " entries for " +
             std::to_string(tokens.size()) + " tokens");
    }
  }
  auto type_of = [&](size_t i) -> int64_t {
    return types.empty() ? int64_t{gguf::kTokenNormal} : types[i];
  };
  auto data = std::make_shared<TokenizerData>();
  data->tokens.reserve(tokens.size());
  if (kind == "rwkv") {
    data->kind = "world";
    for (size_t i = 0; i < tokens.size(); ++i) {
      const int64_t type = type_of(i);
      if (type == gguf::kTokenControl || type == gguf::kTokenUnused) {
        data->tokens.emplace_back();  // "<s>" (end of text) and padding match no text
        continue;
      }
      std::optional<std::string> bytes = gguf::UnescapeRwkvToken(tokens[i]);
      if (!bytes) f.Fail("tokenizer token " + std::to_string(i) + " has a malformed escape");
      data->tokens.push_back(std::move(*bytes));
    }
    bool byte_vocab = data->tokens.size() == 256;
    for (size_t i = 0; byte_vocab && i < 256; ++i) {
      byte_vocab =
          data->tokens[i].size() == 1 && static_cast<unsigned char>(data->tokens[i][0]) == i;
    }
    if (byte_vocab) data->kind = "bytes";
  } else {
    data->kind = "gpt2-bpe";
    for (size_t i = 0; i < tokens.size(); ++i) {
      const int64_t type = type_of(i);
      if (type == gguf::kTokenUnused) {
        data->tokens.emplace_back();
      } else if (type == gguf::kTokenControl || type == gguf::kTokenUserDefined) {
        data->tokens.emplace_back(tokens[i]);  // added tokens are stored as plain text
        data->added_tokens.push_back(static_cast<int32_t>(i));
      } else {
        data->tokens.push_back(gguf::ByteLevelDecode(tokens[i]));
      }
    }
    const std::vector<std::string_view>& merges = f.GetStringArray("tokenizer.ggml.merges");
    data->merges.assign(merges.begin(), merges.end());
    if (f.Find(gguf::kKeyTokenizerNormalizer)) {
      data->normalizer = f.GetString(gguf::kKeyTokenizerNormalizer);
      if (data->normalizer != "NFC" && !data->normalizer.empty()) {
        f.Fail("tokenizer normalizer '" + data->normalizer + "' is not supported (NFC or none)");
      }
    }
  }
  return data;
}

const VersionSpec& DetectGgufVersion(const File& f) {
  const std::string arch = f.GetString("general.architecture");
  std::vector<const VersionSpec*> candidates;
  std::vector<std::string_view> known;
  for (const VersionSpec& v : Versions()) {
    if (v.gguf.architecture == arch) candidates.push_back(&v);
    if (std::find(known.begin(), known.end(), v.gguf.architecture) == known.end()) {
      known.push_back(v.gguf.architecture);
    }
  }
  if (candidates.size() == 1) return *candidates.front();
  if (candidates.empty()) {
    std::string list;
    for (size_t i = 0; i < known.size(); ++i) {
      list += (i == 0 ? "" : i + 1 == known.size() ? " and " : ", ") + std::string(known[i]);
    }
    f.Fail("architecture '" + arch + "' is not one aviary runs (it reads " + list + ")");
  }
  // Versions sharing an architecture name are told apart by aviary.rwkv_version.
  const std::string version = f.GetString(gguf::kKeyRwkvVersion);
  std::string expected;
  for (size_t i = candidates.size(); i-- > 0;) {  // oldest first
    if (candidates[i]->gguf.rwkv_version == version) return *candidates[i];
    expected += std::string(candidates[i]->gguf.rwkv_version) + (i == 0 ? "" : " or ");
  }
  f.Fail(arch + " file with " + std::string(gguf::kKeyRwkvVersion) + " '" + version +
         "' (expected " + expected + ")");
}

}  // namespace

WeightFile ReadGguf(std::span<const uint8_t> bytes, const std::string& name) {
  const File f = gguf::Parse(bytes, name);
  const VersionSpec& version = DetectGgufVersion(f);
  const GgufVersion& spec = version.gguf;
  const std::string a(spec.architecture);

  WeightFile wf;
  wf.path = name;
  wf.file_size = bytes.size();
  wf.format = "GGUF v" + std::to_string(f.version) + " (" + a + ")";

  const uint64_t n_layer = f.GetUint(a + ".block_count");
  const uint64_t n_embd = f.GetUint(a + ".embedding_length");
  if (n_layer < 1 || n_layer > 4096)
    f.Fail("implausible " + a + ".block_count " + std::to_string(n_layer));
  if (n_embd < 1 || n_embd > (1 << 20)) {
    f.Fail("implausible " + a + ".embedding_length " + std::to_string(n_embd));
  }
  wf.n_layer = static_cast<int>(n_layer);
  wf.n_embd = static_cast<int>(n_embd);
  const int64_t C = static_cast<int64_t>(n_embd);
  // Head size: needed to give the per-head tensors aviary's [heads, head_size] shape.
  int64_t head_size = 0;
  if (std::any_of(spec.layer_names.begin(), spec.layer_names.end(),
                  [](const NameMap& m) { return m.flags & gguf::kHeadRows; })) {
    const uint64_t n = f.GetUint(a + ".wkv.head_size");
    if (n < 1 || n > n_embd || n_embd % n != 0) {
      f.Fail(a + ".wkv.head_size " + std::to_string(n) + " does not divide the width " +
             std::to_string(n_embd));
    }
    head_size = static_cast<int64_t>(n);
  }

  std::set<std::string, std::less<>> used;
  auto find = [&](const std::string& gguf_name) -> const TensorInfo* {
    const TensorInfo* t = f.FindTensor(gguf_name);
    if (t) used.insert(gguf_name);
    return t;
  };
  auto require = [&](const std::string& gguf_name) -> const TensorInfo& {
    const TensorInfo* t = find(gguf_name);
    if (!t) f.Fail("missing tensor '" + gguf_name + "'");
    return *t;
  };
  auto add = [&](Tensor t) {
    std::string key = t.name;
    wf.tensors.emplace(std::move(key), std::move(t));
  };
  // A per-head tensor stored flat (or as [H, N]) becomes [C / N, N].
  auto per_head = [&](const TensorInfo& info, const std::string& canonical) {
    Tensor t = ViewOf(info, canonical);
    if (t.numel() != C) {
      f.Fail("tensor '" + info.name + "' has " + std::to_string(t.numel()) +
             " elements, expected " + std::to_string(C));
    }
    t.shape = {C / head_size, head_size};
    return t;
  };

  for (const NameMap& m : gguf::kGlobalNames) {
    add(ViewOf(require(std::string(m.gguf)), std::string(m.canonical)));
  }
  for (uint64_t l = 0; l < n_layer; ++l) {
    const std::string blk = "blk." + std::to_string(l) + ".";
    const std::string blocks = "blocks." + std::to_string(l) + ".";
    for (const NameMap& m : spec.layer_names) {
      const std::string gguf_name = blk + std::string(m.gguf);
      const std::string canonical = blocks + std::string(m.canonical);
      if ((m.flags & gguf::kNotLayer0) && l == 0) {
        find(gguf_name);  // llama.cpp's unused copies: accepted, dropped
        continue;
      }
      const TensorInfo* info = (m.flags & gguf::kOptional) ? find(gguf_name) : &require(gguf_name);
      if (!info) continue;
      if (m.stacked_rows > 0) {  // [rows, 1, 1, C] -> [rows, C]
        const int64_t rows = m.stacked_rows;
        if (info->ne[0] != C || info->nbytes != rows * StorageBytes(info->type, C)) {
          f.Fail("tensor '" + gguf_name + "' must hold " + std::to_string(rows) + " rows of " +
                 std::to_string(C));
        }
        Tensor t = ViewOf(*info, canonical);
        t.shape = {rows, C};
        add(std::move(t));
      } else if (m.flags & gguf::kHeadRows) {
        add(per_head(*info, canonical));
      } else {
        add(ViewOf(*info, canonical));
      }
    }
    // A layer has all of its optional tensors or none.
    std::string present, absent;
    for (const NameMap& m : spec.layer_names) {
      if (!(m.flags & gguf::kOptional)) continue;
      std::string& list = wf.Find(blocks + std::string(m.canonical)) ? present : absent;
      list += (list.empty() ? "" : ", ") + std::string(m.gguf);
    }
    if (!present.empty() && !absent.empty()) {
      f.Fail("layer " + std::to_string(l) + " has " + present + " but not " + absent +
             " (all or none)");
    }
    const gguf::FusedMixes& fused = spec.fused_mixes;
    if (!fused.slots.empty()) {  // one tensor (current llama.cpp) or one per mix (older files)
      const int64_t n = static_cast<int64_t>(fused.slots.size());
      if (const TensorInfo* rows = find(blk + std::string(fused.gguf))) {
        const size_t row = StorageBytes(rows->type, C);
        if (rows->ne[0] != C || rows->nbytes != n * row) {
          f.Fail("tensor '" + rows->name + "' must hold " + std::to_string(n) + " rows of " +
                 std::to_string(C));
        }
        for (int64_t s = 0; s < n; ++s) {
          Tensor t = ViewOf(*rows, blocks + std::string(fused.slots[s]));
          t.shape = {C};
          t.data = rows->data + s * row;
          t.nbytes = row;
          add(std::move(t));
        }
      } else {
        for (int64_t s = 0; s < n; ++s) {
          add(ViewOf(require(blk + std::string(fused.separate[s])),
                     blocks + std::string(fused.slots[s])));
        }
      }
    }
  }
  for (const TensorInfo& t : f.tensors) {
    if (!used.count(t.name)) {
      f.Fail("unexpected tensor '" + t.name + "' in a " + a + " file with " +
             std::to_string(n_layer) + " layers");
    }
  }

  // llama.cpp's converter divides layer l's time_mix_output and channel_mix_value by
  // 2^(l / n) for Hugging Face rwkv6 checkpoints and halves the residual every n layers
  // instead; aviary runs the undivided weights.
  if (spec.undo_rescale) {
    const uint64_t every = f.GetUintOr(a + ".rescale_every_n_layers").value_or(0);
    if (every > 0) {
      int scaled = 0;
      for (uint64_t l = every; l < n_layer; ++l) {
        const int k = static_cast<int>(l / every);
        if (k > 60)
          f.Fail(a + ".rescale_every_n_layers " + std::to_string(every) + " is implausible");
        for (const char* s : {"att.output.weight", "ffn.value.weight"}) {
          Tensor& t = wf.tensors.at("blocks." + std::to_string(l) + "." + s);
          wf.owned.push_back(ScaledByPowerOfTwo(t, k));
          t.data = wf.owned.back().data();
          ++scaled;
        }
      }
      wf.notes.push_back("undid rescale_every_n_layers=" + std::to_string(every) + ": multiplied " +
                         std::to_string(scaled) + " output/value matrices by powers of 2");
    }
  }
  if (const std::optional<double> eps = f.GetFloatOr(a + ".attention.layer_norm_epsilon")) {
    if (std::fabs(*eps - 1e-5) > 1e-9) {
      wf.notes.push_back("the file's layer_norm_epsilon " + std::to_string(*eps) +
                         " is ignored: aviary uses 1e-5");
    }
  }

  wf.main_type = wf.tensors.at("blocks.0.att.key.weight").type;
  if (std::optional<uint64_t> ft = f.GetUintOr("general.file_type")) {
    if (std::optional<DType> t = gguf::DTypeFromFileType(static_cast<uint32_t>(*ft))) {
      wf.main_type = *t;
    }
  }
  if (std::shared_ptr<const TokenizerData> tok = ReadTokenizer(f, &wf.notes)) {
    const size_t n_vocab = static_cast<size_t>(wf.tensors.at("emb.weight").shape.front());
    if (tok->tokens.size() > n_vocab) {
      // Padding beyond the embedding is harmless (dropped); real tokens beyond it are not.
      for (size_t i = n_vocab; i < tok->tokens.size(); ++i) {
        if (!tok->tokens[i].empty()) {
          f.Fail("the tokenizer has " + std::to_string(tok->tokens.size()) +
                 " tokens but the model's vocabulary only " + std::to_string(n_vocab));
        }
      }
      auto trimmed = std::make_shared<TokenizerData>(*tok);
      trimmed->tokens.resize(n_vocab);
      tok = trimmed;
    }
    wf.tokenizer = std::move(tok);
  }
  return wf;
}

}  // namespace aviary
