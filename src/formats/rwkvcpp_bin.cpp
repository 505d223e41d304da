// rwkv.cpp's model file (docs/FILE_FORMAT.md in RWKV/rwkv.cpp):
//   header: int32 magic 0x67676d66, version (100|101), n_vocab, n_embed, n_layer, data_type
//   then until EOF, per tensor: int32 dim_count, key_length, data_type; int32 dims[dim_count]
//   (ggml order: innermost first); key bytes; data.
// Version 101 quantized blocks use ggml's layouts of May 2023 onwards; version 100 quantized
// files predate them and are refused (rwkv.cpp refuses them too).
#include <cstring>
#include <string>

#include "aviary/error.h"
#include "formats/weight_file.h"

namespace aviary {
namespace {

constexpr uint32_t kMagic = 0x67676d66;  // "ggmf"
constexpr int kMaxDims = 4;
constexpr int kMaxNameLength = 1024;
constexpr int64_t kMaxDim = int64_t{1} << 32;

// rwkv.cpp's data type codes (DTypeTraits::rwkvcpp_type). 4..6 are old Q4 variants it no
// longer supports.
bool DTypeFromCode(int32_t code, DType* out) {
  for (int i = 0; i < kNumDTypes; ++i) {
    if (Traits(static_cast<DType>(i)).rwkvcpp_type == code) {
      *out = static_cast<DType>(i);
      return true;
    }
  }
  return false;
}

class Cursor {
 public:
  Cursor(std::span<const uint8_t> bytes, const std::string& name) : bytes_(bytes), name_(name) {}
  size_t offset() const { return pos_; }
  bool at_end() const { return pos_ == bytes_.size(); }
  size_t remaining() const { return bytes_.size() - pos_; }

  int32_t I32(const char* what) {
    if (remaining() < 4) Fail(std::string("truncated while reading ") + what);
    int32_t v;
    std::memcpy(&v, bytes_.data() + pos_, 4);
    pos_ += 4;
    return v;
  }
  const uint8_t* Take(size_t n, const std::string& what) {
    if (remaining() < n) {
      Fail("truncated: " + what + " needs " + std::to_string(n) + " bytes at offset " +
           std::to_string(pos_) + ", only " + std::to_string(remaining()) + " left");
    }
    const uint8_t* p = bytes_.data() + pos_;
    pos_ += n;
    return p;
  }
  [[noreturn]] void Fail(const std::string& problem) const { throw Error(name_ + ": " + problem); }

 private:
  std::span<const uint8_t> bytes_;
  const std::string& name_;
  size_t pos_ = 0;
};

}  // namespace

bool LooksLikeRwkvCppBin(std::span<const uint8_t> bytes) {
  uint32_t magic = 0;
  if (bytes.size() < 4) return false;
  std::memcpy(&magic, bytes.data(), 4);
  return magic == kMagic;
}

WeightFile ReadRwkvCppBin(std::span<const uint8_t> bytes, const std::string& name) {
  WeightFile wf;
  wf.path = name;
  wf.file_size = bytes.size();
  Cursor in(bytes, name);

  const uint32_t magic = static_cast<uint32_t>(in.I32("the magic number"));
  if (magic != kMagic) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "not an rwkv.cpp model file (magic 0x%08x, expected 0x%08x)",
                  magic, kMagic);
    in.Fail(buf);
  }
  const int32_t version = in.I32("the file version");
  if (version != 100 && version != 101) {
    in.Fail("unsupported rwkv.cpp file version " + std::to_string(version) +
            " (supported: 100, 101)");
  }
  wf.format = "rwkv.cpp ggmf v" + std::to_string(version);
  wf.n_vocab = in.I32("n_vocab");
  wf.n_embd = in.I32("n_embed");
  wf.n_layer = in.I32("n_layer");
  const int32_t main_code = in.I32("the data type");
  if (wf.n_vocab <= 0 || wf.n_vocab > (1 << 24))
    in.Fail("implausible n_vocab " + std::to_string(wf.n_vocab));
  if (wf.n_embd <= 0 || wf.n_embd > (1 << 20))
    in.Fail("implausible n_embed " + std::to_string(wf.n_embd));
  if (wf.n_layer <= 0 || wf.n_layer > 4096)
    in.Fail("implausible n_layer " + std::to_string(wf.n_layer));
  if (!DTypeFromCode(main_code, &wf.main_type)) {
    in.Fail("unsupported data type " + std::to_string(main_code) + " in the header");
  }

  while (!in.at_end()) {
    const size_t start = in.offset();
    const int32_t n_dims = in.I32("a tensor's dimension count");
    const int32_t name_len = in.I32("a tensor's name length");
    const int32_t code = in.I32("a tensor's data type");
    const std::string where = "tensor at offset " + std::to_string(start);
    if (n_dims < 1 || n_dims > kMaxDims) {
      in.Fail(where + ": dimension count " + std::to_string(n_dims) + " (expected 1.." +
              std::to_string(kMaxDims) + ")");
    }
    if (name_len < 1 || name_len > kMaxNameLength) {
      in.Fail(where + ": name length " + std::to_string(name_len) + " (expected 1.." +
              std::to_string(kMaxNameLength) + ")");
    }
    Tensor t;
    if (!DTypeFromCode(code, &t.type)) {
      in.Fail(where + ": unsupported data type " + std::to_string(code));
    }
    std::vector<int64_t> ggml_dims(n_dims);
    uint64_t numel = 1;
    for (int i = 0; i < n_dims; ++i) {
      const int64_t d = in.I32("a tensor's dimensions");
      if (d < 1 || d > kMaxDim) in.Fail(where + ": dimension " + std::to_string(d));
      ggml_dims[i] = d;
      // More elements than any type could pack into the file: refuse before multiplying on.
      if (numel > bytes.size() * uint64_t{8} / static_cast<uint64_t>(d)) {
        in.Fail(where + ": shape larger than the file (" + std::to_string(bytes.size()) +
                " bytes): truncated or corrupt");
      }
      numel *= static_cast<uint64_t>(d);
    }
    const uint8_t* name_bytes = in.Take(name_len, where + " name");
    t.name.assign(reinterpret_cast<const char*>(name_bytes), name_len);
    const std::string tensor_where = "tensor '" + t.name + "'";
    for (unsigned char c : t.name) {
      if (c < 0x20 || c >= 0x7f) in.Fail(where + ": name is not printable ASCII");
    }
    if (version == 100 && IsQuantized(t.type)) {
      in.Fail(tensor_where + ": quantized with ggml's pre-May-2023 block layout (file version " +
              "100); re-quantize it with a current rwkv.cpp or aviary");
    }
    const int block = Traits(t.type).block_elems;
    if (ggml_dims[0] % block != 0) {
      in.Fail(tensor_where + ": row length " + std::to_string(ggml_dims[0]) +
              " is not a multiple of the " + std::string(DTypeName(t.type)) + " block size");
    }
    t.shape.assign(ggml_dims.rbegin(), ggml_dims.rend());
    t.nbytes = StorageBytes(t.type, numel);
    t.data = in.Take(t.nbytes, tensor_where + " data");
    if (wf.tensors.count(t.name)) in.Fail(tensor_where + " appears twice");
    std::string key = t.name;
    wf.tensors.emplace(std::move(key), std::move(t));
  }
  if (wf.tensors.empty()) in.Fail("no tensors after the header");
  return wf;
}

}  // namespace aviary
