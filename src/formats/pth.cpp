// PyTorch .pth (torch.save's zip format, PyTorch >= 1.6): a zip holding <top>/data.pkl (the
// pickled state dict, whose tensors name their storages by key) and one stored entry
// <top>/data/<key> per storage. The top folder's name varies ("archive", or the file's stem).
// Tensors become views into the mapped file; see zip.h, pickle.h and blinkdl.h.
#include <cstring>
#include <map>

#include "aviary/error.h"
#include "formats/blinkdl.h"
#include "formats/pickle.h"
#include "formats/weight_file.h"
#include "formats/zip.h"

namespace aviary {
namespace {

constexpr uint64_t kMaxPickleBytes = uint64_t{64} << 20;
constexpr size_t kMaxDims = 8;
constexpr int64_t kMaxDim = int64_t{1} << 40;
constexpr size_t kMaxNameLength = 1024;

struct StorageView {
  pickle::StorageType type;
  int64_t numel;
  const uint8_t* data;
};

bool ToDType(pickle::StorageType type, DType* out) {
  switch (type) {
    case pickle::StorageType::kFloat: *out = DType::kF32; return true;
    case pickle::StorageType::kHalf: *out = DType::kF16; return true;
    case pickle::StorageType::kBFloat16: *out = DType::kBF16; return true;
    default: return false;
  }
}

[[noreturn]] void Fail(const std::string& name, const std::string& problem) {
  throw Error(name + ": " + problem);
}

// The tensors as stored; `raw` views into `bytes` or into wf.owned.
WeightFile ReadPthTensors(std::span<const uint8_t> bytes, const std::string& name,
                          std::vector<Tensor>& raw) {
  auto fail = [&](const std::string& problem) { Fail(name, problem); };
  const zip::Archive archive(bytes, name);

  // <top>/data.pkl, exactly one.
  const zip::Entry* pkl = nullptr;
  std::string top;
  for (const zip::Entry& e : archive.entries()) {
    const size_t slash = e.name.find('/');
    if (slash != std::string::npos && e.name.compare(slash, std::string::npos, "/data.pkl") == 0) {
      if (pkl) fail("zip holds more than one data.pkl ('" + pkl->name + "', '" + e.name + "')");
      pkl = &e;
      top = e.name.substr(0, slash + 1);
    }
  }
  if (!pkl) fail("no <folder>/data.pkl in the zip: not a PyTorch checkpoint");
  std::vector<uint8_t> scratch;
  if (const zip::Entry* order = archive.Find(top + "byteorder")) {
    const auto text = archive.Read(*order, &scratch, true);
    if (std::string_view(reinterpret_cast<const char*>(text.data()), text.size()) != "little") {
      fail("tensors are stored big-endian (byteorder file); only little-endian is supported");
    }
  }
  if (pkl->uncompressed_size > kMaxPickleBytes) {
    fail("data.pkl is " + std::to_string(pkl->uncompressed_size) + " bytes; a state dict's " +
         "pickle is never that large");
  }
  std::vector<uint8_t> pkl_buffer;
  const auto records = pickle::ReadStateDict(archive.Read(*pkl, &pkl_buffer, true), name);
  if (records.empty()) fail("the state dict holds no tensors");

  WeightFile wf;
  wf.path = name;
  wf.file_size = bytes.size();
  wf.format = "PyTorch .pth (zip, pickle)";

  std::map<std::string, StorageView> storages;
  raw.reserve(records.size());
  for (const auto& [tensor_name, rec] : records) {
    if (tensor_name.empty() || tensor_name.size() > kMaxNameLength) {
      fail("a tensor name is empty or longer than " + std::to_string(kMaxNameLength));
    }
    for (unsigned char c : tensor_name) {
      if (c < 0x20 || c >= 0x7f) fail("a tensor name is not printable ASCII");
    }
    const std::string where = "tensor '" + tensor_name + "'";
    Tensor t;
    t.name = tensor_name;
    if (!ToDType(rec.type, &t.type)) {
      fail(where + ": storage type torch." + pickle::StorageTypeName(rec.type) +
           " is not supported (Float, Half and BFloat16 only)");
    }
    const uint64_t esize = static_cast<uint64_t>(pickle::StorageElementSize(rec.type));

    // The storage: an archive entry holding exactly numel elements; every tensor naming the same
    // key must agree on its type and size.
    auto it = storages.find(rec.storage_key);
    if (it == storages.end()) {
      if (rec.storage_key.empty() || rec.storage_key.size() > 64 ||
          rec.storage_key.find('/') != std::string::npos) {
        fail(where + ": invalid storage key");
      }
      const std::string entry_name = top + "data/" + rec.storage_key;
      const zip::Entry* entry = archive.Find(entry_name);
      if (!entry) fail(where + ": its storage '" + entry_name + "' is missing from the zip");
      if (entry->uncompressed_size / esize < static_cast<uint64_t>(rec.storage_numel) ||
          entry->uncompressed_size != static_cast<uint64_t>(rec.storage_numel) * esize) {
        fail(where + ": storage '" + entry_name + "' holds " +
             std::to_string(entry->uncompressed_size) + " bytes, but the pickle says " +
             std::to_string(rec.storage_numel) + " elements of " + std::to_string(esize) +
             " bytes");
      }
      std::vector<uint8_t> inflated;
      std::span<const uint8_t> data = archive.Read(*entry, &inflated, false);
      if (entry->method != 0) {  // deflated: keep the inflated copy alive in the WeightFile
        wf.owned.push_back(std::move(inflated));
        data = std::span<const uint8_t>(wf.owned.back().data(), wf.owned.back().size());
      }
      it = storages.emplace(rec.storage_key, StorageView{rec.type, rec.storage_numel, data.data()})
               .first;
    } else if (it->second.type != rec.type || it->second.numel != rec.storage_numel) {
      fail(where + ": storage '" + rec.storage_key + "' is described inconsistently");
    }
    const StorageView& storage = it->second;

    // Shape, contiguity, bounds.
    if (rec.shape.size() > kMaxDims) fail(where + " has too many dimensions");
    int64_t numel = 1;
    for (int64_t d : rec.shape) {
      if (d < 0 || d > kMaxDim) fail(where + ": invalid dimension " + std::to_string(d));
      if (__builtin_mul_overflow(numel, d, &numel) || numel > kMaxDim) {
        fail(where + ": shape is impossibly large");
      }
    }
    int64_t expected_stride = 1;
    for (size_t i = rec.shape.size(); i-- > 0;) {
      if (rec.shape[i] != 1 && rec.strides[i] != expected_stride) {
        fail(where +
             " is not contiguous (strides do not match its shape); save it after "
             ".contiguous()");
      }
      expected_stride *= rec.shape[i];
    }
    if (rec.storage_offset < 0 || rec.storage_offset > storage.numel ||
        numel > storage.numel - rec.storage_offset) {
      fail(where + ": " + std::to_string(numel) + " elements at offset " +
           std::to_string(rec.storage_offset) + " do not fit in its storage of " +
           std::to_string(storage.numel) + " elements");
    }
    t.shape = rec.shape;
    t.data = storage.data + static_cast<uint64_t>(rec.storage_offset) * esize;
    t.nbytes = static_cast<size_t>(static_cast<uint64_t>(numel) * esize);
    raw.push_back(std::move(t));
  }
  return wf;
}

}  // namespace

WeightFile ReadPth(std::span<const uint8_t> bytes, const std::string& name) {
  std::vector<Tensor> raw;
  WeightFile wf = ReadPthTensors(bytes, name, raw);
  ConvertBlinkDl(std::move(raw), wf);
  return wf;
}

WeightFile ReadPthRaw(std::span<const uint8_t> bytes, const std::string& name) {
  std::vector<Tensor> raw;
  WeightFile wf = ReadPthTensors(bytes, name, raw);
  for (Tensor& t : raw) {
    const std::string key = t.name;
    if (!wf.tensors.emplace(key, std::move(t)).second) {
      throw Error(name + ": tensor '" + key + "' appears twice");
    }
  }
  return wf;
}

}  // namespace aviary
