// torch.save's format, written (see pth_writer.h).
//
// The zip container is written here rather than with libzip or minizip: torch aligns each data
// record to 64 bytes with a padding extra field ("FB") in its local header, which needs the
// offset the local header lands at, and neither library exposes or controls that offset. With
// stored entries only, the container is a few fixed headers (APPNOTE.TXT 4.3); zlib supplies
// the CRC-32.
#include "formats/pth_writer.h"

#include <zlib.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <set>

#include "aviary/error.h"
#include "formats/output_file.h"
#include "tensor/quantize.h"

namespace aviary {
namespace {

static_assert(
    std::endian::native == std::endian::little,
    "the .pth writer stores tensors as the host's bytes; torch's files are little-endian");

using Bytes = std::vector<uint8_t>;

void Put(Bytes& b, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void PutStr(Bytes& b, std::string_view s) { b.insert(b.end(), s.begin(), s.end()); }

// ---- zip: stored entries, torch's layout ----

constexpr uint64_t kAlign = 64;           // torch's kFieldAlignment
constexpr uint64_t kMax32 = 0xffffffffu;  // a 32-bit field this large lives in ZIP64's extra
constexpr uint16_t kDosDate = (0 << 9) | (1 << 5) | 1;  // 1980-01-01: fixed, so output is
constexpr uint16_t kDosTime = 0;                        // byte-identical for the same tensors

class StoredZipWriter {
 public:
  StoredZipWriter(OutputFile& out, bool zip64_always) : out_(out), zip64_always_(zip64_always) {}

  void Add(const std::string& name, std::span<const uint8_t> data) {
    Entry e;
    e.name = name;
    e.size = data.size();
    e.offset = offset_;
    e.crc = static_cast<uint32_t>(crc32_z(0, data.data(), data.size()));
    e.zip64_sizes = zip64_always_ || e.size >= kMax32;
    e.zip64_offset = zip64_always_ || e.offset >= kMax32;

    Bytes h;
    Put(h, 0x04034b50, 4);
    Put(h, e.zip64_sizes ? 45 : 20, 2);  // version needed to extract
    Put(h, 0, 2);                        // flags: sizes and CRC are in this header
    Put(h, 0, 2);                        // method: stored
    Put(h, kDosTime, 2);
    Put(h, kDosDate, 2);
    Put(h, e.crc, 4);
    Put(h, e.zip64_sizes ? kMax32 : e.size, 4);  // compressed
    Put(h, e.zip64_sizes ? kMax32 : e.size, 4);  // uncompressed
    Put(h, name.size(), 2);
    const uint64_t zip64_extra = e.zip64_sizes ? 4 + 16 : 0;
    // The padding field ("FB", then as many 'Z' as it takes) makes the data start on a
    // multiple of kAlign; torch writes it on every record, empty when already aligned.
    const uint64_t unpadded = offset_ + 30 + name.size() + zip64_extra + 4;
    const uint64_t pad = (kAlign - unpadded % kAlign) % kAlign;
    Put(h, zip64_extra + 4 + pad, 2);
    PutStr(h, name);
    if (e.zip64_sizes) {
      Put(h, 0x0001, 2);
      Put(h, 16, 2);
      Put(h, e.size, 8);
      Put(h, e.size, 8);
    }
    Put(h, 0x4246, 2);  // "FB"
    Put(h, pad, 2);
    h.insert(h.end(), pad, 'Z');
    Write(h);
    Write(data);
    entries_.push_back(std::move(e));
  }

  void Finish() {
    const uint64_t cd_offset = offset_;
    Bytes cd;
    for (const Entry& e : entries_) {
      const bool zip64 = e.zip64_sizes || e.zip64_offset;
      Put(cd, 0x02014b50, 4);
      Put(cd, 0x0300 | 45, 2);      // made by: Unix, spec 4.5
      Put(cd, zip64 ? 45 : 20, 2);  // needed
      Put(cd, 0, 2);
      Put(cd, 0, 2);
      Put(cd, kDosTime, 2);
      Put(cd, kDosDate, 2);
      Put(cd, e.crc, 4);
      Put(cd, e.zip64_sizes ? kMax32 : e.size, 4);
      Put(cd, e.zip64_sizes ? kMax32 : e.size, 4);
      Put(cd, e.name.size(), 2);
      // ZIP64 extra: the 64-bit values of the fields set to all ones, in APPNOTE's order.
      const uint64_t values = (e.zip64_sizes ? 2 : 0) + (e.zip64_offset ? 1 : 0);
      Put(cd, zip64 ? 4 + 8 * values : 0, 2);
      Put(cd, 0, 2);  // comment
      Put(cd, 0, 2);  // disk
      Put(cd, 0, 2);  // internal attributes
      Put(cd, 0, 4);  // external attributes
      Put(cd, e.zip64_offset ? kMax32 : e.offset, 4);
      PutStr(cd, e.name);
      if (zip64) {
        Put(cd, 0x0001, 2);
        Put(cd, 8 * values, 2);
        if (e.zip64_sizes) {
          Put(cd, e.size, 8);
          Put(cd, e.size, 8);
        }
        if (e.zip64_offset) Put(cd, e.offset, 8);
      }
    }
    Write(cd);
    const uint64_t n = entries_.size(), cd_size = cd.size();
    // The ZIP64 end record and its locator, always (as torch's writer does); the classic end
    // record's fields say "see ZIP64" (all ones) where they overflow.
    Bytes end;
    const uint64_t zip64_end = offset_;
    Put(end, 0x06064b50, 4);
    Put(end, 44, 8);  // size of the rest of this record
    Put(end, 0x0300 | 45, 2);
    Put(end, 45, 2);
    Put(end, 0, 4);  // this disk
    Put(end, 0, 4);  // disk of the central directory
    Put(end, n, 8);
    Put(end, n, 8);
    Put(end, cd_size, 8);
    Put(end, cd_offset, 8);
    Put(end, 0x07064b50, 4);
    Put(end, 0, 4);
    Put(end, zip64_end, 8);
    Put(end, 1, 4);  // disks
    Put(end, 0x06054b50, 4);
    Put(end, 0, 2);
    Put(end, 0, 2);
    Put(end, std::min<uint64_t>(n, 0xffff), 2);
    Put(end, std::min<uint64_t>(n, 0xffff), 2);
    Put(end, std::min(cd_size, kMax32), 4);
    Put(end, std::min(cd_offset, kMax32), 4);
    Put(end, 0, 2);  // comment
    Write(end);
  }

 private:
  struct Entry {
    std::string name;
    uint64_t size = 0, offset = 0;
    uint32_t crc = 0;
    bool zip64_sizes = false, zip64_offset = false;
  };

  void Write(std::span<const uint8_t> bytes) {
    out_.Write(bytes.data(), bytes.size());
    offset_ += bytes.size();
  }

  OutputFile& out_;
  bool zip64_always_;
  uint64_t offset_ = 0;
  std::vector<Entry> entries_;
};

// ---- pickle: what torch.save's pickler (protocol 2) produces for a state dict ----

class Pickle {
 public:
  Bytes bytes;

  void Op(uint8_t op) { bytes.push_back(op); }
  void Global(std::string_view module, std::string_view name) {
    Op('c');
    PutStr(bytes, module);
    Op('\n');
    PutStr(bytes, name);
    Op('\n');
  }
  void Str(std::string_view s) {
    Op('X');  // BINUNICODE
    Put(bytes, s.size(), 4);
    PutStr(bytes, s);
  }
  // Python's pickler: BININT1, BININT2, BININT, else LONG1 (little-endian two's complement).
  void Int(int64_t v) {
    if (v >= 0 && v < 256) {
      Op('K');
      Put(bytes, static_cast<uint64_t>(v), 1);
    } else if (v >= 0 && v < 65536) {
      Op('M');
      Put(bytes, static_cast<uint64_t>(v), 2);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
      Op('J');
      Put(bytes, static_cast<uint32_t>(v), 4);
    } else {
      Op(0x8a);
      Op(8);
      Put(bytes, static_cast<uint64_t>(v), 8);
    }
  }
  void IntTuple(std::span<const int64_t> values) {
    if (values.empty()) return Op(')');
    Op('(');
    for (int64_t v : values) Int(v);
    Op('t');
  }
  void EmptyOrderedDict() {
    Global("collections", "OrderedDict");
    Op(')');
    Op('R');
  }
};

// torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
// backward_hooks), the storage a persistent id ('storage', torch.<Type>Storage, key, 'cpu',
// numel) that torch.load resolves to archive/data/<key>.
void PickleTensor(Pickle& p, const std::string& name, const std::string& key,
                  const char* storage_type, const std::vector<int64_t>& shape, int64_t numel) {
  p.Str(name);
  p.Global("torch._utils", "_rebuild_tensor_v2");
  p.Op('(');
  p.Op('(');
  p.Str("storage");
  p.Global("torch", storage_type);
  p.Str(key);
  p.Str("cpu");
  p.Int(numel);
  p.Op('t');
  p.Op('Q');  // BINPERSID
  p.Int(0);   // storage offset
  p.IntTuple(shape);
  std::vector<int64_t> strides(shape.size());
  int64_t stride = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= shape[i];
  }
  p.IntTuple(strides);
  p.Op(0x89);  // requires_grad = False
  p.EmptyOrderedDict();
  p.Op('t');
  p.Op('R');
}

constexpr int64_t kMaxElements = int64_t{1} << 50;

int64_t CheckedNumel(const std::string& path, const PthTensor& t) {
  int64_t n = 1;
  for (int64_t d : t.shape) {
    if (d < 0 || (d > 0 && n > kMaxElements / d)) {
      throw Error(path + ": tensor '" + t.name + "' has an invalid shape");
    }
    n *= d;
  }
  return n;
}

}  // namespace

void WritePth(const std::string& path, std::span<const PthTensor> tensors,
              const PthWriteOptions& options) {
  if (options.type != DType::kF32 && options.type != DType::kBF16) {
    throw UsageError(path + ": a .pth is written in F32 or BF16, not " +
                     std::string(DTypeName(options.type)));
  }
  const bool bf16 = options.type == DType::kBF16;
  const char* storage_type = bf16 ? "BFloat16Storage" : "FloatStorage";
  std::vector<int64_t> numels;
  std::set<std::string_view> names;
  Pickle p;
  p.Op(0x80);  // PROTO 2
  p.Op(2);
  p.EmptyOrderedDict();
  // SETITEMS in batches of 1000 pairs, as Python's pickler writes them.
  for (size_t i = 0; i < tensors.size(); ++i) {
    const PthTensor& t = tensors[i];
    if (t.name.empty() || t.name.size() > 1024) {
      throw Error(path + ": a tensor name is empty or longer than 1024 bytes");
    }
    for (unsigned char c : t.name) {
      if (c < 0x20 || c >= 0x7f)
        throw Error(path + ": tensor name '" + t.name + "' is not printable ASCII");
    }
    if (!names.insert(t.name).second)
      throw Error(path + ": tensor '" + t.name + "' is given twice");
    numels.push_back(CheckedNumel(path, t));
    if (!t.data && numels.back() > 0) throw Error(path + ": tensor '" + t.name + "' has no data");
    if (i % 1000 == 0) p.Op('(');
    PickleTensor(p, t.name, std::to_string(i), storage_type, t.shape, numels.back());
    if (i % 1000 == 999 || i + 1 == tensors.size()) p.Op('u');
  }
  p.Op('.');

  OutputFile out(path);
  StoredZipWriter zip(out, options.zip64_always);
  auto text = [](std::string_view s) {
    return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
  };
  zip.Add("archive/data.pkl", p.bytes);
  zip.Add("archive/byteorder", text("little"));
  std::vector<uint8_t> converted;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const size_t n = static_cast<size_t>(numels[i]);
    const auto* src = reinterpret_cast<const uint8_t*>(tensors[i].data);
    std::span<const uint8_t> data(src, n * sizeof(float));
    if (bf16) {
      converted.resize(n * 2);
      QuantizeRow(DType::kBF16, tensors[i].data, converted.data(), static_cast<int64_t>(n));
      data = converted;
    }
    zip.Add("archive/data/" + std::to_string(i), data);
  }
  zip.Add("archive/version", text("3\n"));
  zip.Finish();
  out.Commit();
}

}  // namespace aviary
