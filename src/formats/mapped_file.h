// A read-only memory-mapped file.
#pragma once

#include <cstdint>
#include <span>
#include <string>

namespace aviary {

class MappedFile {
 public:
  // Throws aviary::Error naming the path on any failure (missing, a directory, unreadable).
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace aviary
