// A model file's bytes, read-only: memory-mapped, or read into anonymous memory that the kernel
// backs with 2 MiB pages.
//
// Why two ways: mapping is instant and shares the page cache between processes. But streaming
// a large model through page-cache pages generates measurably slower than streaming it from
// anonymous memory in 2 MiB pages. Generation, read / mapped, median of 4-6 interleaved pairs
// on the 2-core test VM: RWKV-7 1.5B F16 (2.9 GiB) 1.19x, 1.5B Q8_0 (1.8 GiB) 1.38x, 0.4B F16
// (0.85 GiB) 1.13x; 0.4B Q4_0 and 0.1B files (0.25-0.45 GiB) 1.03-1.04x, within the noise.
// The cost is load time: the first load of 2.9 GiB takes 2.3 s there (the VM serves fresh
// memory slowly; 0.2-0.4 s once it has), against 0.05-0.1 s mapped (docs/PERFORMANCE.md).
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "aviary/runtime.h"

namespace aviary {

// The mode for a file of `file_bytes`: kMmap and kRead as asked; kAuto reads files of at least
// kReadMinBytes where the kernel offers transparent huge pages, and maps the smaller ones (which
// gain too little to pay for the read).
LoadMode ResolveLoadMode(LoadMode requested, uint64_t file_bytes);
constexpr uint64_t kReadMinBytes = uint64_t{512} << 20;
const char* LoadModeName(LoadMode mode);  // "auto", "mmap" or "read"

class MappedFile {
 public:
  // Throws aviary::Error naming the path on any failure (missing, a directory, unreadable,
  // changed size while being read). kAuto is resolved by the file's size (ResolveLoadMode).
  explicit MappedFile(const std::string& path, LoadMode mode = LoadMode::kMmap);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  const std::string& path() const { return path_; }
  LoadMode mode() const { return mode_; }  // kMmap or kRead

 private:
  std::string path_;
  LoadMode mode_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  void* region_ = nullptr;  // what munmap releases (kRead: the aligned buffer plus slack)
  size_t region_bytes_ = 0;
};

}  // namespace aviary
