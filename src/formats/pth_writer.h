// Writes a state dict as the file torch.save writes (PyTorch >= 1.6's zip format): a zip of
// archive/data.pkl (the pickled OrderedDict name -> tensor), archive/byteorder, one stored entry
// archive/data/<i> per tensor and archive/version. torch.load(path, map_location='cpu') returns
// the dict, and aviary's own reader (ReadPth) maps it: every data record starts on a 64-byte
// boundary, as torch aligns them, so a memory-mapped read is aligned too.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "tensor/dtype.h"

namespace aviary {

struct PthTensor {
  std::string name;             // printable ASCII, e.g. "blocks.0.att.w0"
  std::vector<int64_t> shape;   // PyTorch order; {} is a scalar
  const float* data = nullptr;  // the product of `shape` floats, row-major
};

struct PthWriteOptions {
  DType type = DType::kF32;  // kF32 or kBF16 (round to nearest even, as torch's .bfloat16())
  // ZIP64 fields are written where a size or an offset needs them (4 GiB and more); this writes
  // them for every entry, so that tests can check that path on small files.
  bool zip64_always = false;
};

// Writes `path` through an OutputFile (path.tmp, renamed when complete). Throws aviary::Error
// naming the file or the tensor: an empty, duplicated or non-printable name, a null data
// pointer, a negative dimension, a type other than F32/BF16, a failed write.
void WritePth(const std::string& path, std::span<const PthTensor> tensors,
              const PthWriteOptions& options = {});

}  // namespace aviary
