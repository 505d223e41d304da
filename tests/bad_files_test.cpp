// Bad model and state files: each must give an aviary::Error that starts with the file's name
// and names the problem -- never a crash, a hang, undefined behaviour or an absurd allocation.
// Run it under -DAVIARY_SANITIZE=ON too: that is what turns a silent over-read into a failure.
//
// The byte buffers handed to the loaders are always exactly as long as the (truncated or
// corrupted) file, so that AddressSanitizer sees any read past the end.
#include <gtest/gtest.h>
#include <malloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <new>
#include <random>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "aviary/error.h"
#include "aviary/model.h"
#include "formats/mapped_file.h"
#include "aviary/state.h"
#include "test_data.h"

// ---- Allocation accounting (plain builds only: sanitizers bring their own allocator) ----

#if defined(__SANITIZE_ADDRESS__)
#define AVIARY_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define AVIARY_TEST_SANITIZED 1
#endif
#endif

#ifndef AVIARY_TEST_SANITIZED
namespace {
std::atomic<int64_t> g_live_bytes{0};
std::atomic<int64_t> g_peak_bytes{0};

void* CountedAlloc(size_t n) {
  void* p = std::malloc(n ? n : 1);
  if (!p) return nullptr;
  const int64_t live = g_live_bytes += static_cast<int64_t>(malloc_usable_size(p));
  int64_t peak = g_peak_bytes.load();
  while (live > peak && !g_peak_bytes.compare_exchange_weak(peak, live)) {}
  return p;
}
void CountedFree(void* p) {
  if (!p) return;
  g_live_bytes -= static_cast<int64_t>(malloc_usable_size(p));
  std::free(p);
}
}  // namespace

void* operator new(size_t n) {
  if (void* p = CountedAlloc(n)) return p;
  throw std::bad_alloc();
}
void* operator new[](size_t n) {
  if (void* p = CountedAlloc(n)) return p;
  throw std::bad_alloc();
}
void* operator new(size_t n, const std::nothrow_t&) noexcept { return CountedAlloc(n); }
void* operator new[](size_t n, const std::nothrow_t&) noexcept { return CountedAlloc(n); }
void operator delete(void* p) noexcept { CountedFree(p); }
void operator delete[](void* p) noexcept { CountedFree(p); }
void operator delete(void* p, size_t) noexcept { CountedFree(p); }
void operator delete[](void* p, size_t) noexcept { CountedFree(p); }
#endif

namespace aviary {
namespace {

using Bytes = std::vector<uint8_t>;
using testing::ReadFileBytes;
using testing::SharedPath;

// Every shared file read once per test binary run.
const Bytes& SharedBytes(const std::string& relative) {
  static std::map<std::string, Bytes> cache;
  auto it = cache.find(relative);
  if (it == cache.end()) it = cache.emplace(relative, ReadFileBytes(SharedPath(relative))).first;
  return it->second;
}

int32_t GetI32(const Bytes& b, size_t offset) {
  int32_t v;
  std::memcpy(&v, b.data() + offset, 4);
  return v;
}
void SetI32(Bytes& b, size_t offset, int32_t v) { std::memcpy(b.data() + offset, &v, 4); }
void PutI32(Bytes& b, int32_t v) {
  const size_t at = b.size();
  b.resize(at + 4);
  SetI32(b, at, v);
}

// ---- The rwkv.cpp layout, parsed independently of the library ----

constexpr size_t kHeaderBytes = 24;

// Bytes of n elements of an rwkv.cpp data type code; 0 for an unknown code.
uint64_t DataBytes(int32_t type, uint64_t n) {
  switch (type) {
    case 0: return n * 4;
    case 1: return n * 2;
    case 2: return n / 32 * 18;
    case 3: return n / 32 * 20;
    case 7: return n / 32 * 22;
    case 8: return n / 32 * 24;
    case 9: return n / 32 * 34;
    default: return 0;
  }
}

struct TensorRecord {
  size_t offset = 0;  // of its dim_count field
  int32_t type = 0;
  std::vector<int32_t> dims;  // ggml order
  std::string name;
  size_t data_offset = 0;
  size_t data_bytes = 0;

  size_t header_end() const { return data_offset; }
  // Offsets of its int32 fields: dim_count, key_length, data_type, dims...
  std::vector<size_t> FieldOffsets() const {
    std::vector<size_t> f;
    for (size_t i = 0; i < 3 + dims.size(); ++i) f.push_back(offset + 4 * i);
    return f;
  }
};

std::vector<TensorRecord> ParseLayout(const Bytes& b) {
  std::vector<TensorRecord> tensors;
  size_t p = kHeaderBytes;
  while (p < b.size()) {
    TensorRecord t;
    t.offset = p;
    const int32_t n_dims = GetI32(b, p);
    const int32_t name_len = GetI32(b, p + 4);
    t.type = GetI32(b, p + 8);
    p += 12;
    uint64_t numel = 1;
    for (int i = 0; i < n_dims; ++i, p += 4) {
      t.dims.push_back(GetI32(b, p));
      numel *= static_cast<uint64_t>(t.dims.back());
    }
    t.name.assign(reinterpret_cast<const char*>(b.data() + p), name_len);
    p += name_len;
    t.data_offset = p;
    t.data_bytes = DataBytes(t.type, numel);
    p += t.data_bytes;
    tensors.push_back(std::move(t));
  }
  EXPECT_EQ(p, b.size()) << "test's own parser disagrees with the file";
  return tensors;
}

const TensorRecord& FindRecord(const std::vector<TensorRecord>& tensors, const std::string& name) {
  for (const auto& t : tensors) {
    if (t.name == name) return t;
  }
  ADD_FAILURE() << "no tensor " << name;
  return tensors.front();
}

// Writes a file from `src`'s header and the given records (whose data is copied from `src`).
Bytes Rebuild(const Bytes& src, const std::vector<TensorRecord>& tensors) {
  Bytes out(src.begin(), src.begin() + kHeaderBytes);
  for (const auto& t : tensors) {
    PutI32(out, static_cast<int32_t>(t.dims.size()));
    PutI32(out, static_cast<int32_t>(t.name.size()));
    PutI32(out, t.type);
    for (int32_t d : t.dims) PutI32(out, d);
    out.insert(out.end(), t.name.begin(), t.name.end());
    out.insert(out.end(), src.begin() + t.data_offset, src.begin() + t.data_offset + t.data_bytes);
  }
  return out;
}

// ---- Loading with a verdict ----

struct Outcome {
  bool loaded = false;
  std::string error;  // what() of the aviary::Error, when not loaded
};

// Loads `bytes` (copied into a buffer of exactly that size unless `bytes` already ends where
// its buffer does); when it loads and `eval` is set, feeds a few tokens. Anything thrown other
// than aviary::Error is a test failure.
Outcome TryLoad(std::span<const uint8_t> bytes, const std::string& name, bool eval = true,
                bool exact_already = false) {
  Bytes copy;
  if (!exact_already) copy.assign(bytes.begin(), bytes.end());
  const std::span<const uint8_t> exact = exact_already ? bytes : std::span<const uint8_t>(copy);
  Outcome out;
  try {
    std::unique_ptr<Model> model = Model::LoadFromMemory(exact, name);
    out.loaded = true;
    if (eval) {
      State state = model->NewState();
      std::vector<float> logits;
      try {
        model->Eval(testing::ExpectedPrompt(), state, &logits);
        EXPECT_EQ(logits.size(), static_cast<size_t>(model->info().n_vocab));
      } catch (const Error&) {
        // e.g. a vocabulary too small for the prompt: a clean refusal is fine.
      }
    }
  } catch (const Error& e) {
    out.loaded = false;
    out.error = e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << name << ": threw something other than aviary::Error: " << e.what();
    out.error = "<non-aviary exception>";
  }
  return out;
}

bool StartsWith(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

bool ContainsAny(const std::string& s, const std::vector<std::string>& keywords) {
  for (const auto& k : keywords) {
    if (s.find(k) != std::string::npos) return true;
  }
  return false;
}

// Must be refused with "<name>: ..." mentioning one of the keywords.
void ExpectRefused(std::span<const uint8_t> bytes, const std::string& name,
                   const std::vector<std::string>& keywords) {
  const Outcome out = TryLoad(bytes, name);
  ASSERT_FALSE(out.loaded) << name << " loaded but should have been refused";
  EXPECT_TRUE(StartsWith(out.error, name + ": ")) << out.error;
  EXPECT_TRUE(ContainsAny(out.error, keywords))
      << "message does not name the problem: " << out.error;
  EXPECT_EQ(out.error.find('\n'), std::string::npos) << "message is not one line: " << out.error;
}

// A per-test scratch folder, removed afterwards.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = ::testing::TempDir() + "aviary-bad-files-XXXXXX";
    if (!::mkdtemp(tmpl.data())) ADD_FAILURE() << "mkdtemp failed";
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string Write(const std::string& name, std::span<const uint8_t> bytes) const {
    const std::string p = path_ + "/" + name;
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    return p;
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// ---- Systematic truncation ----

class Truncation : public ::testing::TestWithParam<const char*> {};

TEST_P(Truncation, EveryPrefixIsRefusedNamingTheFile) {
  REQUIRE_SHARED(GetParam());
  const Bytes& bytes = SharedBytes(GetParam());
  const std::string name = std::string("cut:") + GetParam();
  ASSERT_TRUE(TryLoad(bytes, name).loaded) << TryLoad(bytes, name).error;
  const std::vector<TensorRecord> tensors = ParseLayout(bytes);
  ASSERT_GE(tensors.size(), 3u);

  std::set<size_t> cuts;
  for (size_t n = 0; n <= kHeaderBytes; ++n) cuts.insert(n);
  for (int i = 0; i < 3; ++i) {
    for (size_t n = tensors[i].offset; n <= tensors[i].header_end(); ++n) cuts.insert(n);
  }
  const size_t rest = tensors[2].header_end();
  for (size_t k = 0; k <= 200; ++k) cuts.insert(rest + (bytes.size() - rest) * k / 200);
  cuts.insert(bytes.size() - 1);
  cuts.erase(bytes.size());

  for (size_t n : cuts) {
    const Outcome out = TryLoad(std::span(bytes).subspan(0, n), name, /*eval=*/false);
    EXPECT_FALSE(out.loaded) << "a file cut to " << n << " bytes loaded";
    EXPECT_TRUE(StartsWith(out.error, name + ": ")) << "cut to " << n << ": " << out.error;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Models, Truncation,
    ::testing::Values(
        "models/stress/stress-rwkv-4v0-FP32.bin", "models/stress/stress-rwkv-4v0-FP16.bin",
        "models/stress/stress-rwkv-5v1-FP32.bin", "models/stress/stress-rwkv-5v1-FP16.bin",
        "models/stress/stress-rwkv-5v2-FP32.bin", "models/stress/stress-rwkv-5v2-FP16.bin",
        "models/stress/stress-rwkv-6v0-FP32.bin", "models/stress/stress-rwkv-6v0-FP16.bin",
        "models/stress/stress-rwkv-7v0-FP32.bin", "models/stress/stress-rwkv-7v0-FP16.bin",
        "models/tiny-rwkv-6v0-1m-Q5_1.bin", "models/tiny-rwkv-7v0-834K-Q5_0.bin",
        "models/quantized/tiny-rwkv-5v1-730K-Q4_0.bin",
        "models/quantized/tiny-rwkv-4v0-660K-Q4_1.bin",
        "models/quantized/tiny-rwkv-5v2-730K-Q8_0.bin"));

// ---- Systematic corruption of every int32 field ----

class FieldCorruption : public ::testing::TestWithParam<const char*> {};

TEST_P(FieldCorruption, EveryHeaderFieldWithEvilValuesLoadsOrIsRefused) {
  REQUIRE_SHARED(GetParam());
  Bytes bytes = SharedBytes(GetParam());  // mutated in place and restored
  const std::string name = std::string("corrupt:") + GetParam();
  const std::vector<TensorRecord> tensors = ParseLayout(bytes);

  std::vector<size_t> fields;
  for (size_t off = 0; off < kHeaderBytes; off += 4) fields.push_back(off);
  for (const auto& t : tensors) {
    for (size_t off : t.FieldOffsets()) fields.push_back(off);
  }
  int loaded = 0, refused = 0;
  for (size_t off : fields) {
    const int32_t original = GetI32(bytes, off);
    const uint32_t u = static_cast<uint32_t>(original);
    const int32_t evil[] = {0,
                            -1,
                            1,
                            2,
                            7,
                            100,
                            INT32_MAX,
                            INT32_MIN,
                            static_cast<int32_t>(u + 1),
                            static_cast<int32_t>(u * 2)};
    for (int32_t v : evil) {
      if (v == original) continue;
      SetI32(bytes, off, v);
      const Outcome out = TryLoad(bytes, name, /*eval=*/true, /*exact_already=*/true);
      if (out.loaded) {
        ++loaded;
      } else {
        ++refused;
        EXPECT_TRUE(StartsWith(out.error, name + ": "))
            << "field at " << off << " = " << v << ": " << out.error;
      }
    }
    SetI32(bytes, off, original);
  }
  EXPECT_GT(refused, 0);
  RecordProperty("loaded", loaded);
  RecordProperty("refused", refused);
}

INSTANTIATE_TEST_SUITE_P(Models, FieldCorruption,
                         ::testing::Values("models/stress/stress-rwkv-4v0-FP16.bin",
                                           "models/stress/stress-rwkv-5v1-FP16.bin",
                                           "models/stress/stress-rwkv-5v2-FP16.bin",
                                           "models/stress/stress-rwkv-6v0-FP16.bin",
                                           "models/stress/stress-rwkv-7v0-FP16.bin",
                                           "models/tiny-rwkv-6v0-1m-Q5_1.bin"));

// ---- Structural corruption with message checks ----

constexpr const char* kV7 = "models/stress/stress-rwkv-7v0-FP32.bin";
constexpr const char* kV6 = "models/stress/stress-rwkv-6v0-FP16.bin";

TEST(BadModelFile, TensorNameByteChangedMakesARequiredTensorMissing) {
  REQUIRE_SHARED(kV7);
  Bytes bytes = SharedBytes(kV7);
  const std::vector<TensorRecord> tensors = ParseLayout(bytes);
  const auto& head = FindRecord(tensors, "head.weight");
  bytes[head.data_offset - head.name.size() + 2] = 'X';  // "heXd.weight"
  ExpectRefused(bytes, "renamed.bin", {"missing tensor 'head.weight'"});
}

TEST(BadModelFile, NonPrintableTensorName) {
  REQUIRE_SHARED(kV7);
  Bytes bytes = SharedBytes(kV7);
  const std::vector<TensorRecord> tensors = ParseLayout(bytes);
  const auto& t = FindRecord(tensors, "blocks.1.att.key.weight");
  for (uint8_t c : {0x00, 0x0a, 0x7f, 0xc3, 0xff}) {
    Bytes copy = bytes;
    copy[t.data_offset - 3] = c;
    ExpectRefused(copy, "name-byte.bin", {"not printable"});
  }
}

TEST(BadModelFile, DuplicatedTensor) {
  REQUIRE_SHARED(kV7);
  const Bytes& bytes = SharedBytes(kV7);
  std::vector<TensorRecord> tensors = ParseLayout(bytes);
  tensors.push_back(FindRecord(tensors, "blocks.0.ln1.weight"));
  ExpectRefused(Rebuild(bytes, tensors), "dup.bin", {"'blocks.0.ln1.weight' appears twice"});
}

TEST(BadModelFile, SwappedShapes) {
  REQUIRE_SHARED(kV7);
  const Bytes& bytes = SharedBytes(kV7);
  std::vector<TensorRecord> tensors = ParseLayout(bytes);
  // Same element count, transposed shapes: the file still parses, the shapes are wrong.
  auto find = [&](const std::string& n) {
    return std::find_if(tensors.begin(), tensors.end(), [&](auto& t) { return t.name == n; });
  };
  std::swap(find("blocks.1.ffn.key.weight")->dims, find("blocks.1.ffn.value.weight")->dims);
  ExpectRefused(Rebuild(bytes, tensors), "swapped.bin", {"shape"});

  tensors = ParseLayout(bytes);
  std::swap(find("blocks.2.att.w1")->dims, find("blocks.2.att.w2")->dims);
  ExpectRefused(Rebuild(bytes, tensors), "swapped2.bin", {"shape"});
}

TEST(BadModelFile, ExtraLeadingDimensionOnASlicedTensor) {
  // v6's time_maa_w2 [5, C, D] is used slice by slice: an extra leading 1 must not be
  // accepted (it used to be, and slices 1..4 then read past the tensor).
  REQUIRE_SHARED(kV6);
  const Bytes& bytes = SharedBytes(kV6);
  std::vector<TensorRecord> tensors = ParseLayout(bytes);
  for (auto& t : tensors) {
    if (t.name == "blocks.2.att.time_maa_w2") t.dims.push_back(1);  // ggml order: outermost last
  }
  ExpectRefused(Rebuild(bytes, tensors), "4d.bin", {"shape"});
}

TEST(BadModelFile, GarbageAfterTheLastTensor) {
  REQUIRE_SHARED(kV7);
  const Bytes& bytes = SharedBytes(kV7);
  const std::string at = "offset " + std::to_string(bytes.size());
  for (size_t n : {1, 3, 5, 11, 12, 64, 4096}) {
    Bytes copy = bytes;
    for (size_t i = 0; i < n; ++i) copy.push_back(static_cast<uint8_t>(0xa5 ^ i));
    ExpectRefused(copy, "garbage.bin", {"truncated", at});
  }
  // A plausible-looking header with nothing after it.
  Bytes copy = bytes;
  for (int32_t v : {2, 11, 0, 64, 64}) PutI32(copy, v);
  ExpectRefused(copy, "garbage.bin", {"truncated"});
}

TEST(BadModelFile, ExtraTensorsAndOddNames) {
  REQUIRE_SHARED(kV7);
  const Bytes& bytes = SharedBytes(kV7);
  const std::vector<TensorRecord> base = ParseLayout(bytes);
  TensorRecord extra = FindRecord(base, "blocks.0.ln1.weight");
  auto with = [&](const std::string& name) {
    std::vector<TensorRecord> tensors = base;
    extra.name = name;
    tensors.push_back(extra);
    return Rebuild(bytes, tensors);
  };
  // Unknown tensors are ignored; a 1024-byte name is allowed and cheap.
  EXPECT_TRUE(TryLoad(with("blocks.0." + std::string(1015, 'a')), "long.bin").loaded);
  EXPECT_TRUE(TryLoad(with(std::string(1024, '.')), "dots.bin").loaded);
  ExpectRefused(with(std::string(1025, 'a')), "toolong.bin", {"name length"});
  ExpectRefused(with("blocks.7.att.w0"), "gap.bin", {"not numbered"});
  ExpectRefused(with("blocks.99999999999999999999.x"), "absurd.bin", {"layer index"});
  ExpectRefused(with("blocks.2147483648.x"), "absurd2.bin", {"layer index", "not numbered"});
}

// The header fields one by one, with what the message must say.
TEST(BadModelFile, NamedHeaderCases) {
  REQUIRE_SHARED(kV7);
  const Bytes& good = SharedBytes(kV7);
  auto with_field = [&](size_t off, int32_t v) {
    Bytes b = good;
    SetI32(b, off, v);
    return b;
  };
  {
    Bytes b = good;
    b[0] ^= 0x01;
    ExpectRefused(b, "magic.bin", {"not an rwkv.cpp model file", "unknown model format"});
    ExpectRefused(with_field(0, 0x67676d6c), "ggml.bin", {"unknown model format"});
  }
  ExpectRefused(with_field(4, 99), "v99.bin", {"version 99"});
  ExpectRefused(with_field(4, 102), "v102.bin", {"version 102"});
  ExpectRefused(with_field(4, -1), "vneg.bin", {"version -1"});
  ExpectRefused(with_field(8, 0), "vocab0.bin", {"n_vocab"});
  ExpectRefused(with_field(8, 255), "vocab255.bin", {"n_vocab"});
  ExpectRefused(with_field(12, 1 << 20), "embd.bin", {"n_embed"});
  ExpectRefused(with_field(12, (1 << 20) + 1), "embd2.bin", {"n_embed"});
  ExpectRefused(with_field(16, 4), "layer4.bin", {"n_layer"});
  ExpectRefused(with_field(16, 100000), "layerbig.bin", {"n_layer"});
  ExpectRefused(with_field(20, 5), "dtype5.bin", {"data type 5"});
  ExpectRefused(with_field(20, 42), "dtype42.bin", {"data type 42"});
  // The header's main type is informative only: any supported type loads.
  EXPECT_TRUE(TryLoad(with_field(20, 9), "dtype9.bin").loaded);
}

TEST(BadModelFile, NamedTensorHeaderCases) {
  REQUIRE_SHARED(kV7);
  const Bytes& good = SharedBytes(kV7);
  const std::vector<TensorRecord> tensors = ParseLayout(good);
  const TensorRecord& emb = tensors.front();  // the first tensor: emb.weight
  ASSERT_EQ(emb.name, "emb.weight");
  auto with_field = [&](size_t off, int32_t v) {
    Bytes b = good;
    SetI32(b, off, v);
    return b;
  };
  const size_t dim_count = emb.offset, key_length = emb.offset + 4, type = emb.offset + 8;
  const size_t dim0 = emb.offset + 12, dim1 = emb.offset + 16;
  ExpectRefused(with_field(type, 42), "tdtype.bin", {"data type 42"});
  ExpectRefused(with_field(type, 4), "tdtype4.bin", {"data type 4"});
  ExpectRefused(with_field(dim_count, 0), "dims0.bin", {"dimension count 0"});
  ExpectRefused(with_field(dim_count, 1000), "dims1000.bin", {"dimension count 1000"});
  ExpectRefused(with_field(dim_count, -1), "dimsneg.bin", {"dimension count -1"});
  ExpectRefused(with_field(key_length, 0), "key0.bin", {"name length 0"});
  ExpectRefused(with_field(key_length, -5), "keyneg.bin", {"name length -5"});
  ExpectRefused(with_field(key_length, 1 << 30), "keybig.bin", {"name length 1073741824"});
  ExpectRefused(with_field(dim0, 0), "dim0.bin", {"dimension 0"});
  ExpectRefused(with_field(dim0, -128), "dimneg.bin", {"dimension -128"});
  {
    Bytes b = with_field(dim0, 1 << 20);
    SetI32(b, dim1, 1 << 20);
    ExpectRefused(b, "huge.bin", {"larger than the file"});
  }
  ExpectRefused(with_field(dim1, INT32_MAX), "huge2.bin", {"larger than the file"});
  // Quantized row length not a multiple of the block size.
  {
    Bytes b = with_field(type, 8);  // Q5_1, row of 128 is fine; make it 100
    SetI32(b, dim0, 100);
    ExpectRefused(b, "block.bin", {"block size"});
  }
  // Data claimed bigger than what is left.
  {
    const TensorRecord& last = tensors.back();
    Bytes b = good;
    SetI32(b, last.offset + 12 + 4 * (last.dims.size() - 1), last.dims.back() + 1);
    ExpectRefused(b, "short.bin", {"truncated"});
  }
}

TEST(BadModelFile, QuantizedTensorInAVersion100File) {
  const char* q = "models/tiny-rwkv-6v0-1m-Q5_1.bin";
  REQUIRE_SHARED(q);
  Bytes b = SharedBytes(q);
  ASSERT_EQ(GetI32(b, 4), 101);
  SetI32(b, 4, 100);
  ExpectRefused(b, "v100q.bin", {"version 100"});
  // An unquantized v100 file is fine.
  REQUIRE_SHARED(kV7);
  Bytes f = SharedBytes(kV7);
  SetI32(f, 4, 100);
  EXPECT_TRUE(TryLoad(f, "v100.bin").loaded);
}

TEST(BadModelFile, TinyAndEmptyBuffers) {
  const uint8_t magic[] = {0x66, 0x6d, 0x67, 0x67, 0x65, 0, 0, 0};
  ExpectRefused(std::span<const uint8_t>(), "empty.bin", {"too short", "empty"});
  ExpectRefused(std::span(magic, 3), "three.bin", {"too short"});
  ExpectRefused(std::span(magic, 4), "four.bin", {"truncated"});
  ExpectRefused(std::span(magic, 8), "eight.bin", {"truncated"});
}

TEST(BadModelFile, HeaderWithoutTensors) {
  Bytes b;
  for (int32_t v : {0x67676d66, 101, 256, 128, 3, 1}) PutI32(b, v);
  ExpectRefused(b, "header-only.bin", {"no tensors"});
}

// ---- Files on disk (the mmap path) ----

TEST(BadModelPath, EmptyDirectoryMissingShortAndTruncatedFiles) {
  TempDir dir;
  auto expect_error = [](const std::string& path, const std::string& keyword) {
    try {
      Model::Load(path);
      ADD_FAILURE() << path << " loaded";
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_TRUE(StartsWith(what, path + ": ")) << what;
      EXPECT_NE(what.find(keyword), std::string::npos) << what;
    } catch (const std::exception& e) {
      ADD_FAILURE() << path << ": not an aviary::Error: " << e.what();
    }
  };
  expect_error(dir.Write("empty.bin", {}), "empty");
  expect_error(dir.path(), "directory");
  expect_error(dir.path() + "/does-not-exist.bin", "cannot open");
  const uint8_t three[] = {0x66, 0x6d, 0x67};
  expect_error(dir.Write("three.bin", three), "too short");
  if (!SharedBytes(kV7).empty()) {
    expect_error(dir.Write("cut.bin", std::span(SharedBytes(kV7)).subspan(0, 1000)), "truncated");
  }
}

// Both ways of holding a file give its bytes, and refuse what cannot be held with the same
// errors. Sizes around the readers' split and a huge page's 2 MiB.
TEST(BadModelPath, ReadAndMappedFilesHoldTheSameBytes) {
  TempDir dir;
  std::mt19937 rng(5);
  for (const size_t size :
       {size_t{1}, size_t{7}, size_t{4096}, (size_t{2} << 20) + 3, size_t{5000001}}) {
    std::vector<uint8_t> bytes(size);
    for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    const std::string path = dir.Write("bytes-" + std::to_string(size) + ".bin", bytes);
    for (const LoadMode mode : {LoadMode::kMmap, LoadMode::kRead}) {
      const MappedFile file(path, mode);
      EXPECT_EQ(file.mode(), mode);
      ASSERT_EQ(file.bytes().size(), size);
      EXPECT_EQ(std::memcmp(file.bytes().data(), bytes.data(), size), 0)
          << LoadModeName(mode) << " " << size;
    }
  }
  for (const LoadMode mode : {LoadMode::kMmap, LoadMode::kRead}) {
    auto expect_error = [&](const std::string& path, const std::string& keyword) {
      try {
        MappedFile file(path, mode);
        ADD_FAILURE() << path << " opened";
      } catch (const Error& e) {
        EXPECT_TRUE(StartsWith(e.what(), path + ": ")) << e.what();
        EXPECT_NE(std::string(e.what()).find(keyword), std::string::npos) << e.what();
      }
    };
    expect_error(dir.Write("empty-" + std::string(LoadModeName(mode)), {}), "empty");
    expect_error(dir.path(), "directory");
    expect_error(dir.path() + "/does-not-exist.bin", "cannot open");
  }
  // kAuto maps small files; an explicit mode is kept whatever the size.
  EXPECT_EQ(ResolveLoadMode(LoadMode::kAuto, kReadMinBytes - 1), LoadMode::kMmap);
  EXPECT_EQ(ResolveLoadMode(LoadMode::kRead, 1), LoadMode::kRead);
  EXPECT_EQ(ResolveLoadMode(LoadMode::kMmap, kReadMinBytes * 4), LoadMode::kMmap);
  const std::vector<uint8_t> three = {1, 2, 3};
  EXPECT_EQ(MappedFile(dir.Write("auto.bin", three), LoadMode::kAuto).mode(), LoadMode::kMmap);
}

// ---- Memory and time bounds on crafted files ----

TEST(BadModelFile, CraftedHugeDeclarationsAreRefusedQuicklyAndCheaply) {
  struct Case {
    const char* name;
    Bytes bytes;
    const char* keyword;
  };
  std::vector<Case> cases;
  auto header = [](int32_t vocab, int32_t embd, int32_t layer) {
    Bytes b;
    for (int32_t v : {0x67676d66, 101, vocab, embd, layer, 0}) PutI32(b, v);
    return b;
  };
  auto tensor = [](Bytes& b, const std::string& name, int32_t type, std::vector<int32_t> dims,
                   size_t data_bytes) {
    PutI32(b, static_cast<int32_t>(dims.size()));
    PutI32(b, static_cast<int32_t>(name.size()));
    PutI32(b, type);
    for (int32_t d : dims) PutI32(b, d);
    b.insert(b.end(), name.begin(), name.end());
    b.resize(b.size() + data_bytes, 0);
  };
  {
    Bytes b = header(1 << 24, 1 << 20, 4096);
    tensor(b, "emb.weight", 0, {1 << 20, 1 << 24}, 64);
    cases.push_back({"emb-huge.bin", b, "larger than the file"});
  }
  {
    Bytes b = header(256, 1 << 20, 1);
    tensor(b, "emb.weight", 0, {1 << 20, 256}, 4096);
    cases.push_back({"emb-short.bin", b, "larger than the file"});
  }
  {
    // A consistent little file whose header claims width 2^20: emb is [1, 2^20] in Q4_0
    // (590 KB); everything else is missing.
    Bytes b = header(1, 1 << 20, 1);
    tensor(b, "emb.weight", 2, {1 << 20, 1}, (1 << 20) / 32 * 18);
    tensor(b, "blocks.0.att.x_rwkvag", 2, {1 << 20, 6}, 6 * (1 << 20) / 32 * 18);
    cases.push_back({"wide.bin", b, "missing tensor"});
  }
  {
    // 4096 layers declared, one present.
    Bytes b = header(256, 128, 4096);
    tensor(b, "emb.weight", 0, {128, 256}, 128 * 256 * 4);
    tensor(b, "blocks.0.att.k_k", 0, {128}, 128 * 4);
    cases.push_back({"layers.bin", b, "n_layer"});
  }
  {
    // Many tiny tensors: parsing is linear.
    Bytes b = header(256, 128, 1);
    for (int i = 0; i < 20000; ++i)
      tensor(b, std::string("t").append(std::to_string(i)), 0, {1}, 4);
    cases.push_back({"many.bin", b, "architecture"});
  }
  for (const Case& c : cases) {
#ifndef AVIARY_TEST_SANITIZED
    const int64_t before = g_live_bytes.load();
    g_peak_bytes.store(before);
#endif
    const auto start = std::chrono::steady_clock::now();
    ExpectRefused(c.bytes, c.name, {c.keyword});
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(seconds, 5.0) << c.name;
#ifndef AVIARY_TEST_SANITIZED
    // The loader copies only small vectors: at most a few times the file (TryLoad's own
    // copy of the bytes is one file size).
    const int64_t extra = g_peak_bytes.load() - before;
    EXPECT_LT(extra, static_cast<int64_t>(4 * c.bytes.size() + (4 << 20)))
        << c.name << " allocated " << extra << " bytes for a " << c.bytes.size() << "-byte file";
#endif
  }
}

#ifndef AVIARY_TEST_SANITIZED
TEST(BadModelFile, AGoodModelAllocatesAboutItsOwnSize) {
  REQUIRE_SHARED(kV7);
  const Bytes& bytes = SharedBytes(kV7);
  const int64_t before = g_live_bytes.load();
  g_peak_bytes.store(before);
  auto model = Model::LoadFromMemory(bytes, "good.bin");
  const int64_t extra = g_peak_bytes.load() - before;
  EXPECT_LT(extra, static_cast<int64_t>(bytes.size())) << extra;
}
#endif

// ---- State files ----

class BadStateFile : public ::testing::Test {
 protected:
  void SetUp() override {
    REQUIRE_SHARED(kV7);
    model_ = Model::LoadFromMemory(SharedBytes(kV7), SharedPath(kV7));
    state_ = model_->NewState();
    model_->Eval(testing::ExpectedPrompt(), state_, nullptr);
    path_ = dir_.path() + "/saved.state";
    state_.Save(path_);
    bytes_ = ReadFileBytes(path_);
    ASSERT_FALSE(bytes_.empty());
  }

  // Must be refused with "<name>: ..." mentioning one of the keywords.
  void ExpectStateRefused(std::span<const uint8_t> bytes, const std::vector<std::string>& keywords,
                          const std::string& what) {
    const std::string name = "bad.state";
    const Bytes exact(bytes.begin(), bytes.end());
    try {
      State::Deserialize(exact, *model_, name);
      ADD_FAILURE() << what << ": accepted";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_TRUE(StartsWith(msg, name + ": ")) << what << ": " << msg;
      if (!keywords.empty()) {
        EXPECT_TRUE(ContainsAny(msg, keywords)) << what << ": " << msg;
      }
    } catch (const std::exception& e) {
      ADD_FAILURE() << what << ": not an aviary::Error: " << e.what();
    }
  }

  TempDir dir_;
  std::unique_ptr<Model> model_;
  State state_;
  std::string path_;
  Bytes bytes_;
};

constexpr size_t kStateHeader =
    40;  // magic 8, version 4, n_layer 4, fingerprint 8, tokens 8, count 8

TEST_F(BadStateFile, RoundTrip) {
  EXPECT_EQ(State::Deserialize(bytes_, *model_, "x"), state_);
  EXPECT_EQ(State::Load(path_, *model_), state_);
  EXPECT_EQ(bytes_.size(), kStateHeader + state_.size_bytes() + 8);
}

TEST_F(BadStateFile, EveryTruncationIsRefused) {
  std::set<size_t> cuts;
  for (size_t n = 0; n <= kStateHeader + 8; ++n) cuts.insert(n);
  for (size_t k = 0; k <= 200; ++k) cuts.insert(bytes_.size() * k / 200);
  cuts.insert(bytes_.size() - 1);
  cuts.erase(bytes_.size());
  for (size_t n : cuts) {
    ExpectStateRefused(std::span(bytes_).subspan(0, n), {"truncated", "not an aviary state file"},
                       "cut to " + std::to_string(n));
  }
}

TEST_F(BadStateFile, HeaderFieldsAndBytes) {
  auto with = [&](size_t off, const void* v, size_t n) {
    Bytes b = bytes_;
    std::memcpy(b.data() + off, v, n);
    return b;
  };
  const uint32_t version = 2, layers = 4;
  const uint64_t other = 12345, huge = ~uint64_t{0}, count = state_.data().size() + 1;
  ExpectStateRefused(with(0, "AVSTATE2", 8), {"not an aviary state file"}, "magic");
  ExpectStateRefused(with(8, &version, 4), {"version 2"}, "version");
  ExpectStateRefused(with(12, &layers, 4), {"different model"}, "n_layer");
  ExpectStateRefused(with(16, &other, 8), {"different model"}, "fingerprint");
  ExpectStateRefused(with(32, &count, 8), {"different model"}, "count+1");
  ExpectStateRefused(with(32, &huge, 8), {"different model"}, "count huge");
  ExpectStateRefused(with(24, &huge, 8), {"checksum"}, "tokens without checksum");
  Bytes longer = bytes_;
  longer.push_back(0);
  ExpectStateRefused(longer, {"trailing"}, "trailing byte");

  // Any single byte changed anywhere is caught (the checksum covers everything).
  for (size_t k = 0; k < 300; ++k) {
    const size_t at = bytes_.size() * k / 300;
    Bytes b = bytes_;
    b[at] ^= 0x5a;
    ExpectStateRefused(b, {}, "byte " + std::to_string(at));
  }
  // Every u32 / u64 header field with evil values.
  for (size_t off = 8; off < kStateHeader; off += 4) {
    for (uint32_t v : {0u, 1u, 2u, 0x7fffffffu, 0x80000000u, 0xffffffffu}) {
      Bytes b = bytes_;
      uint32_t old;
      std::memcpy(&old, b.data() + off, 4);
      if (old == v) continue;
      std::memcpy(b.data() + off, &v, 4);
      ExpectStateRefused(b, {}, "field " + std::to_string(off) + " = " + std::to_string(v));
    }
  }
}

TEST_F(BadStateFile, StateOfAnotherModel) {
  const char* other = "models/stress/stress-rwkv-6v0-FP16.bin";
  REQUIRE_SHARED(other);
  auto model6 = Model::LoadFromMemory(SharedBytes(other), "v6.bin");
  try {
    State::Deserialize(bytes_, *model6, "v7.state");
    ADD_FAILURE() << "accepted a v7 state for a v6 model";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("different model"), std::string::npos) << e.what();
  }
}

TEST_F(BadStateFile, LoadFromDisk) {
  auto expect = [&](const std::string& path, const std::string& keyword) {
    try {
      State::Load(path, *model_);
      ADD_FAILURE() << path << " accepted";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_TRUE(StartsWith(msg, path + ": ")) << msg;
      EXPECT_NE(msg.find(keyword), std::string::npos) << msg;
    }
  };
  expect(dir_.path() + "/missing.state", "cannot open");
  expect(dir_.Write("empty.state", {}), "not an aviary state file");
  expect(dir_.Write("cut.state", std::span(bytes_).subspan(0, bytes_.size() - 1)), "truncated");
  Bytes longer = bytes_;
  longer.resize(longer.size() + 100000, 0);
  expect(dir_.Write("long.state", longer), "trailing");
}

// ---- Through the CLI: `aviary info --model FILE` exits 1 with one line on stderr ----

class BadFileCli : public ::testing::Test {
 protected:
  void ExpectOneLineError(const std::string& path) {
    const std::string cli = testing::CliPath();
    struct stat st {};
    if (::stat(cli.c_str(), &st) != 0) {
      if (testing::InCI()) FAIL() << "CLI not built: " << cli;
      GTEST_SKIP() << "CLI not built: " << cli;
    }
    const testing::CommandResult r =
        testing::RunCommand("'" + cli + "' info --model '" + path + "' 2>&1");
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_TRUE(StartsWith(r.output, "aviary: ")) << r.output;
    EXPECT_NE(r.output.find(path), std::string::npos) << r.output;
    ASSERT_FALSE(r.output.empty());
    EXPECT_EQ(r.output.back(), '\n') << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
  }
  TempDir dir_;
};

TEST_F(BadFileCli, TruncatedFile) {
  REQUIRE_SHARED(kV7);
  ExpectOneLineError(dir_.Write("truncated.bin", std::span(SharedBytes(kV7)).subspan(0, 5000)));
}

TEST_F(BadFileCli, EmptyFile) { ExpectOneLineError(dir_.Write("empty.bin", {})); }

TEST_F(BadFileCli, Directory) { ExpectOneLineError(dir_.path()); }

TEST_F(BadFileCli, MissingFile) { ExpectOneLineError(dir_.path() + "/no-such-model.bin"); }

TEST_F(BadFileCli, CorruptHeader) {
  REQUIRE_SHARED(kV7);
  Bytes b = SharedBytes(kV7);
  SetI32(b, 4, 99);
  ExpectOneLineError(dir_.Write("v99.bin", b));
}

}  // namespace
}  // namespace aviary
