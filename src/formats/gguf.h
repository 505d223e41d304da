// GGUF (llama.cpp's model file format, versions 2 and 3): the parsed container, the constants
// shared by the reader (gguf.cpp) and the writer (gguf_writer.cpp), and the tokenizer text
// encodings GGUF uses. The layout of aviary's GGUF files is documented in docs/GGUF.md.
//
// File layout (all little-endian):
//   "GGUF" u32 version u64 n_tensors u64 n_kv
//   n_kv x { string key, u32 value_type, value }       string = u64 length + bytes
//   n_tensors x { string name, u32 n_dims, u64 ne[n_dims] (innermost first), u32 ggml_type,
//                 u64 offset (from the start of the data section, a multiple of the alignment) }
//   padding to `general.alignment` (u32, default 32), then the data section.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensor/dtype.h"

namespace aviary::gguf {

constexpr char kMagic[4] = {'G', 'G', 'U', 'F'};
constexpr uint32_t kVersion = 3;  // what aviary writes; it reads 2 and 3
constexpr uint32_t kDefaultAlignment = 32;
constexpr int kMaxDims = 4;            // GGML_MAX_DIMS
constexpr size_t kMaxTensorName = 63;  // ggml's GGML_MAX_NAME (64) minus the terminating NUL

enum class ValueType : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};
std::string_view ValueTypeName(ValueType type);

// ggml's tensor type codes for the types aviary stores.
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kBF16 = 30,
};
uint32_t GgmlTypeOf(DType type);
// nullopt for ggml types aviary does not read (Q2_K, Q3_K, I-quants, integers...).
std::optional<DType> DTypeFromGgml(uint32_t ggml_type);
// "Q4_K", "IQ2_XS", ... or "type 123" for codes ggml does not define.
std::string GgmlTypeName(uint32_t ggml_type);

// llama.cpp's general.file_type (enum llama_ftype) for a file whose main weights are `type`.
uint32_t FileTypeOf(DType type);
std::optional<DType> DTypeFromFileType(uint32_t file_type);

// tokenizer.ggml.token_type values (llama_token_type).
enum TokenType : int32_t {
  kTokenNormal = 1,
  kTokenUnknown = 2,
  kTokenControl = 3,
  kTokenUserDefined = 4,
  kTokenUnused = 5,
  kTokenByte = 6,
};

// Architecture names (general.architecture) are in the version table (models/versions.cpp):
// llama.cpp's rwkv6 and rwkv7, aviary's own aviary-rwkv4 and aviary-rwkv5 (5.1 and 5.2).
// "4", "5.1", "5.2", "6.0" or "7.0"; written in every file aviary makes, required in
// aviary-rwkv5 files (it tells 5.1 from 5.2).
constexpr std::string_view kKeyRwkvVersion = "aviary.rwkv_version";
// BPE vocabularies: Unicode normalization before pre-tokenization ("NFC" for GPT-NeoX), which
// llama.cpp's keys cannot say. Absent means none.
constexpr std::string_view kKeyTokenizerNormalizer = "aviary.tokenizer.normalizer";

// One metadata value. Scalars are widened: integers into `u`/`i` (both set when the value fits),
// floats into `f`. Arrays keep a view of their bytes (numbers) or of each string, so a large
// token list costs no copies. All views point into the parsed bytes.
struct Value {
  ValueType type = ValueType::kU8;  // kArray for arrays
  ValueType elem = ValueType::kU8;  // element type of an array
  uint64_t count = 0;               // array length
  uint64_t u = 0;
  int64_t i = 0;
  bool is_unsigned_ok = false, is_signed_ok = false;  // does the integer fit u / i
  double f = 0;
  std::string_view str;
  std::span<const uint8_t> raw;           // array of numbers: count * element size bytes
  std::vector<std::string_view> strings;  // array of strings

  bool IsInteger() const;
  bool IsArray() const { return type == ValueType::kArray; }
};

struct TensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ggml order: innermost (contiguous) dimension first
  uint32_t ggml_type = 0;
  DType type = DType::kF32;
  uint64_t offset = 0;  // from the start of the data section
  size_t nbytes = 0;
  const uint8_t* data = nullptr;

  // PyTorch order (outermost first), as aviary's Tensor holds it.
  std::vector<int64_t> Shape() const { return {ne.rbegin(), ne.rend()}; }
};

struct File {
  std::string name;  // for error messages
  uint32_t version = 0;
  uint64_t alignment = kDefaultAlignment;
  uint64_t data_offset = 0;                        // start of the data section in the file
  std::vector<std::pair<std::string, Value>> kvs;  // in file order
  std::vector<TensorInfo> tensors;                 // in file order

  const Value* Find(std::string_view key) const;
  const TensorInfo* FindTensor(std::string_view name) const;
  // Typed getters: throw aviary::Error("<file>: key 'k' ...") when missing or of another type.
  std::string GetString(std::string_view key) const;
  uint64_t GetUint(std::string_view key) const;  // any integer type, >= 0
  std::optional<uint64_t> GetUintOr(std::string_view key) const;
  std::optional<double> GetFloatOr(std::string_view key) const;
  // Array of strings / of integers (any integer element type).
  const std::vector<std::string_view>& GetStringArray(std::string_view key) const;
  std::vector<int64_t> GetIntArray(std::string_view key) const;
  [[noreturn]] void Fail(const std::string& problem) const;

  std::map<std::string, size_t, std::less<>> kv_index, tensor_index;
};

// Parses and validates the container: every count, length, type, shape and offset is checked
// against the bytes before use, and nothing is allocated in proportion to a count the bytes
// cannot back. Throws aviary::Error("<name>: <problem>"). Views point into `bytes`.
File Parse(std::span<const uint8_t> bytes, const std::string& name);

// RWKV World tokens as llama.cpp's converter stores them: Python's repr() of the bytes without
// the b'' (`\x00`, `\n`, `\\`, ...); the reader undoes it (llama.cpp's llama_unescape_rwkv_token).
std::string EscapeRwkvToken(std::string_view bytes);
// nullopt on a malformed escape.
std::optional<std::string> UnescapeRwkvToken(std::string_view text);

// GPT-2 byte-level BPE text: each byte as one printable Unicode character (bytes_to_unicode()).
std::string ByteLevelEncode(std::string_view bytes);
// Characters outside the byte alphabet are kept as their UTF-8 bytes.
std::string ByteLevelDecode(std::string_view text);

}  // namespace aviary::gguf
