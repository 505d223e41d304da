// A minimal, validating ZIP reader for PyTorch's .pth files (and any other zip we may need).
//
// Written here rather than taken from libzip/minizip because we need the byte offset of each
// stored (uncompressed) entry inside the file: PyTorch writes tensor storages as stored entries,
// and returning them as spans into the memory-mapped file makes loading zero-copy. libzip only
// offers a read-through-a-handle API and does not expose that offset.
//
// Supported: the central directory (the authoritative index), ZIP64 (archives and entries over
// 4 GiB, more than 65535 entries), stored entries (zero-copy) and deflated entries (inflated
// with zlib into a caller-owned buffer). Refused: encrypted entries, other compression
// methods, multi-disk archives. Every count, offset and size is validated against the file
// before it is used; problems throw aviary::Error("<name>: zip: <problem>").
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace aviary::zip {

struct Entry {
  std::string name;
  uint16_t method = 0;  // 0 stored, 8 deflated
  uint16_t flags = 0;
  uint32_t crc32 = 0;
  uint64_t compressed_size = 0;
  uint64_t uncompressed_size = 0;
  uint64_t local_header_offset = 0;
  uint64_t data_offset = 0;  // first byte of the (possibly compressed) data; validated
};

class Archive {
 public:
  // Parses and validates the central directory and every local header. `name` starts every
  // error message. The bytes must outlive the archive and every span it returns.
  Archive(std::span<const uint8_t> bytes, const std::string& name);

  const std::vector<Entry>& entries() const { return entries_; }
  // nullptr when absent.
  const Entry* Find(std::string_view entry_name) const;

  // The contents of an entry. Stored: a span into the file (zero-copy; the CRC is checked only
  // when `check_crc` is set, since that reads every byte). Deflated: inflated into `*buffer`
  // (the CRC is always checked) and a span over it returned. Throws on any inconsistency.
  std::span<const uint8_t> Read(const Entry& entry, std::vector<uint8_t>* buffer,
                                bool check_crc) const;

  // Largest uncompressed size Read() will inflate (guards against zip bombs).
  static constexpr uint64_t kMaxInflatedBytes = uint64_t{1} << 32;

 private:
  [[noreturn]] void Fail(const std::string& problem) const;
  void ReadCentralDirectory();

  std::span<const uint8_t> bytes_;
  std::string name_;
  std::vector<Entry> entries_;
  std::vector<size_t> sorted_;  // entry indices sorted by name, for Find
};

}  // namespace aviary::zip
