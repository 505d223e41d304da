// A model file's bytes, read-only: memory-mapped, or read into anonymous memory that the kernel
// backs with 2 MiB pages.
//
// Why two ways: mapping is instant and shares the page cache between processes, but each 4 KiB
// page-cache page costs a TLB entry, and generation streams every weight once per token: from
// anonymous memory in 2 MiB pages the same stream takes far fewer TLB misses, which pays for a
// large model and is lost in the noise for a small one. The price is load time (the whole file
// is read before the first token). docs/PERFORMANCE.md ("Loading") has the measurements.
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
