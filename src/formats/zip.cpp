// ZIP reading (APPNOTE.TXT 6.3): end of central directory -> (ZIP64 locator -> ZIP64 end of
// central directory) -> central directory headers -> each entry's local header -> its data.
// See zip.h for why this is not libzip.
#include "formats/zip.h"
#include "formats/printable.h"

#include <zlib.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <numeric>

#include "aviary/error.h"

namespace aviary::zip {
namespace {

constexpr uint32_t kLocalHeaderSig = 0x04034b50;
constexpr uint32_t kCentralHeaderSig = 0x02014b50;
constexpr uint32_t kEndSig = 0x06054b50;
constexpr uint32_t kZip64EndSig = 0x06064b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr size_t kEndSize = 22;
constexpr size_t kZip64LocatorSize = 20;
constexpr size_t kZip64EndSize = 56;
constexpr size_t kCentralHeaderSize = 46;
constexpr size_t kLocalHeaderSize = 30;
constexpr uint16_t kZip64ExtraId = 0x0001;
constexpr uint16_t kFlagEncrypted = 0x0001;
constexpr uint16_t kFlagDataDescriptor = 0x0008;
constexpr uint16_t kFlagStrongEncryption = 0x0040;
// Deflate cannot expand data by more than about 1032:1.
constexpr uint64_t kMaxDeflateRatio = 1032;

uint16_t U16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t U32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}
uint64_t U64(const uint8_t* p) { return U32(p) | (static_cast<uint64_t>(U32(p + 4)) << 32); }

// Names in errors: 200 bytes at most.
std::string Printable(std::string_view s) { return aviary::Printable(s, 200); }

uint32_t Crc32(std::span<const uint8_t> data) {
  uLong crc = crc32(0L, Z_NULL, 0);
  size_t done = 0;
  while (done < data.size()) {
    const uInt n = static_cast<uInt>(std::min<size_t>(data.size() - done, UINT_MAX));
    crc = crc32(crc, data.data() + done, n);
    done += n;
  }
  return static_cast<uint32_t>(crc);
}

}  // namespace

void Archive::Fail(const std::string& problem) const { throw Error(name_ + ": zip: " + problem); }

Archive::Archive(std::span<const uint8_t> bytes, const std::string& name)
    : bytes_(bytes), name_(name) {
  ReadCentralDirectory();
}

void Archive::ReadCentralDirectory() {
  const uint64_t size = bytes_.size();
  const uint8_t* base = bytes_.data();
  if (size < kEndSize)
    Fail("file too short (" + std::to_string(size) + " bytes) for a zip archive");

  // The end record sits in the last 22 + 65535 bytes (a comment of up to 65535 bytes may
  // follow it). Prefer a record whose comment ends exactly at the end of the file.
  uint64_t end = UINT64_MAX, loose = UINT64_MAX;
  const uint64_t lowest = size >= kEndSize + 65535 ? size - kEndSize - 65535 : 0;
  for (uint64_t p = size - kEndSize + 1; p-- > lowest;) {
    if (U32(base + p) != kEndSig) continue;
    const uint64_t comment = U16(base + p + 20);
    if (p + kEndSize + comment == size) {
      end = p;
      break;
    }
    if (loose == UINT64_MAX && p + kEndSize + comment <= size) loose = p;
  }
  if (end == UINT64_MAX) end = loose;
  if (end == UINT64_MAX) Fail("no end of central directory record (truncated or not a zip file)");

  const uint8_t* e = base + end;
  const uint16_t disk = U16(e + 4), cd_disk = U16(e + 6);
  uint64_t entries_on_disk = U16(e + 8), total = U16(e + 10);
  uint64_t cd_size = U32(e + 12), cd_offset = U32(e + 16);
  uint64_t directory_end = end;  // the central directory must end before this

  // ZIP64: a locator just before the end record points at the ZIP64 end record.
  const bool has_locator =
      end >= kZip64LocatorSize && U32(base + end - kZip64LocatorSize) == kZip64LocatorSig;
  const bool needs_zip64 = entries_on_disk == 0xffff || total == 0xffff || cd_size == 0xffffffff ||
                           cd_offset == 0xffffffff;
  if (has_locator) {
    const uint8_t* loc = base + end - kZip64LocatorSize;
    const uint64_t z_off = U64(loc + 8);
    if (U32(loc + 4) != 0 || U32(loc + 16) > 1) Fail("multi-disk archives are not supported");
    if (z_off > end - kZip64LocatorSize || end - kZip64LocatorSize - z_off < kZip64EndSize) {
      Fail("ZIP64 end of central directory offset " + std::to_string(z_off) +
           " is outside the file");
    }
    const uint8_t* z = base + z_off;
    if (U32(z) != kZip64EndSig) Fail("bad ZIP64 end of central directory signature");
    if (U32(z + 16) != 0 || U32(z + 20) != 0) Fail("multi-disk archives are not supported");
    const uint64_t z_on_disk = U64(z + 24), z_total = U64(z + 32);
    const uint64_t z_cd_size = U64(z + 40), z_cd_offset = U64(z + 48);
    // Where the classic record holds a real value, both records must agree.
    auto agree = [&](uint64_t classic, uint64_t marker, uint64_t z64, const char* what) {
      if (classic != marker && classic != z64) {
        Fail(std::string("end of central directory and ZIP64 record disagree on ") + what);
      }
    };
    agree(entries_on_disk, 0xffff, z_on_disk, "the entry count");
    agree(total, 0xffff, z_total, "the entry count");
    agree(cd_size, 0xffffffff, z_cd_size, "the directory size");
    agree(cd_offset, 0xffffffff, z_cd_offset, "the directory offset");
    entries_on_disk = z_on_disk;
    total = z_total;
    cd_size = z_cd_size;
    cd_offset = z_cd_offset;
    directory_end = z_off;
  } else if (needs_zip64) {
    Fail("end of central directory needs a ZIP64 record, but there is none");
  }
  if (disk != 0 || cd_disk != 0 || entries_on_disk != total) {
    Fail("multi-disk archives are not supported");
  }
  if (cd_offset > directory_end || cd_size > directory_end - cd_offset) {
    Fail("central directory (offset " + std::to_string(cd_offset) + ", " + std::to_string(cd_size) +
         " bytes) lies outside the file (" + std::to_string(size) +
         " bytes): truncated or corrupt");
  }
  if (total == 0) Fail("the archive is empty");
  if (total > cd_size / kCentralHeaderSize) {
    Fail(std::to_string(total) + " entries cannot fit in a central directory of " +
         std::to_string(cd_size) + " bytes");
  }

  entries_.reserve(total);
  uint64_t p = cd_offset;
  const uint64_t cd_end = cd_offset + cd_size;
  for (uint64_t i = 0; i < total; ++i) {
    const std::string where = "central directory entry " + std::to_string(i);
    if (cd_end - p < kCentralHeaderSize) Fail(where + " runs past the central directory");
    const uint8_t* h = base + p;
    if (U32(h) != kCentralHeaderSig) Fail(where + ": bad signature");
    Entry entry;
    entry.flags = U16(h + 8);
    entry.method = U16(h + 10);
    entry.crc32 = U32(h + 16);
    entry.compressed_size = U32(h + 20);
    entry.uncompressed_size = U32(h + 24);
    const uint64_t name_len = U16(h + 28), extra_len = U16(h + 30), comment_len = U16(h + 32);
    uint64_t disk_start = U16(h + 34);
    entry.local_header_offset = U32(h + 42);
    if (cd_end - p - kCentralHeaderSize < name_len + extra_len + comment_len) {
      Fail(where + ": name, extra field or comment runs past the central directory");
    }
    entry.name.assign(reinterpret_cast<const char*>(h + kCentralHeaderSize), name_len);
    if (entry.name.empty() || entry.name.find('\0') != std::string::npos) {
      Fail(where + ": empty or invalid name");
    }
    const std::string ewhere = "entry '" + Printable(entry.name) + "'";

    // ZIP64 extended information: 64-bit values for the fields set to all ones, in order.
    bool need_usize = entry.uncompressed_size == 0xffffffff;
    bool need_csize = entry.compressed_size == 0xffffffff;
    bool need_offset = entry.local_header_offset == 0xffffffff;
    bool need_disk = disk_start == 0xffff;
    const uint8_t* x = h + kCentralHeaderSize + name_len;
    for (uint64_t q = 0; q + 4 <= extra_len;) {
      const uint16_t id = U16(x + q), len = U16(x + q + 2);
      if (q + 4 + len > extra_len) Fail(ewhere + ": extra field runs past its end");
      if (id == kZip64ExtraId) {
        const uint8_t* f = x + q + 4;
        uint64_t left = len;
        auto take64 = [&](uint64_t* out) {
          if (left < 8) Fail(ewhere + ": ZIP64 extra field too short");
          *out = U64(f);
          f += 8;
          left -= 8;
        };
        if (need_usize) take64(&entry.uncompressed_size), need_usize = false;
        if (need_csize) take64(&entry.compressed_size), need_csize = false;
        if (need_offset) take64(&entry.local_header_offset), need_offset = false;
        if (need_disk) {
          if (left < 4) Fail(ewhere + ": ZIP64 extra field too short");
          disk_start = U32(f);
          need_disk = false;
        }
      }
      q += 4 + len;
    }
    if (need_usize || need_csize || need_offset || need_disk) {
      Fail(ewhere + ": sizes or offset need a ZIP64 extra field, but there is none");
    }
    if (disk_start != 0) Fail("multi-disk archives are not supported");
    if (entry.flags & (kFlagEncrypted | kFlagStrongEncryption)) {
      Fail(ewhere + " is encrypted");
    }
    if (entry.method != 0 && entry.method != 8) {
      Fail(ewhere + " uses compression method " + std::to_string(entry.method) +
           " (supported: stored, deflate)");
    }
    if (entry.method == 0 && entry.compressed_size != entry.uncompressed_size) {
      Fail(ewhere + " is stored but its sizes differ (" + std::to_string(entry.compressed_size) +
           " vs " + std::to_string(entry.uncompressed_size) + ")");
    }

    // The local header repeats the name; the data follows it and must end before the central
    // directory.
    const uint64_t lho = entry.local_header_offset;
    if (lho > cd_offset || cd_offset - lho < kLocalHeaderSize) {
      Fail(ewhere + ": local header offset " + std::to_string(lho) + " is outside the data area (" +
           std::to_string(cd_offset) + " bytes)");
    }
    const uint8_t* l = base + lho;
    if (U32(l) != kLocalHeaderSig) {
      Fail(ewhere + ": no local header at offset " + std::to_string(lho));
    }
    const uint16_t l_flags = U16(l + 6), l_method = U16(l + 8);
    const uint32_t l_crc = U32(l + 14), l_csize = U32(l + 18), l_usize = U32(l + 22);
    const uint64_t l_name_len = U16(l + 26), l_extra_len = U16(l + 28);
    entry.data_offset = lho + kLocalHeaderSize + l_name_len + l_extra_len;
    if (entry.data_offset > cd_offset) Fail(ewhere + ": local header runs past the data area");
    if (l_name_len != name_len || std::memcmp(l + kLocalHeaderSize, entry.name.data(), name_len)) {
      Fail(ewhere + ": local header names a different entry");
    }
    if (l_method != entry.method) Fail(ewhere + ": local header disagrees on the method");
    if (!(l_flags & kFlagDataDescriptor)) {
      // Sizes are in the local header (all ones when they live in its ZIP64 extra field).
      if ((l_csize != 0xffffffff && l_csize != entry.compressed_size) ||
          (l_usize != 0xffffffff && l_usize != entry.uncompressed_size) || l_crc != entry.crc32) {
        Fail(ewhere + ": local header disagrees with the central directory on sizes or CRC");
      }
    }
    if (entry.compressed_size > cd_offset - entry.data_offset) {
      Fail(ewhere + ": data (" + std::to_string(entry.compressed_size) + " bytes at offset " +
           std::to_string(entry.data_offset) + ") runs past the data area (" +
           std::to_string(cd_offset) + " bytes): truncated or corrupt");
    }
    entries_.push_back(std::move(entry));
    p += kCentralHeaderSize + name_len + extra_len + comment_len;
  }

  // Entries must not overlap one another (a lying offset could alias two entries' data).
  std::vector<size_t> by_offset(entries_.size());
  std::iota(by_offset.begin(), by_offset.end(), 0);
  std::sort(by_offset.begin(), by_offset.end(), [&](size_t a, size_t b) {
    return entries_[a].local_header_offset < entries_[b].local_header_offset;
  });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const Entry& prev = entries_[by_offset[i - 1]];
    const Entry& next = entries_[by_offset[i]];
    if (prev.data_offset + prev.compressed_size > next.local_header_offset) {
      Fail("entries '" + Printable(prev.name) + "' and '" + Printable(next.name) + "' overlap");
    }
  }

  sorted_.resize(entries_.size());
  std::iota(sorted_.begin(), sorted_.end(), 0);
  std::sort(sorted_.begin(), sorted_.end(),
            [&](size_t a, size_t b) { return entries_[a].name < entries_[b].name; });
  for (size_t i = 1; i < sorted_.size(); ++i) {
    if (entries_[sorted_[i - 1]].name == entries_[sorted_[i]].name) {
      Fail("entry '" + Printable(entries_[sorted_[i]].name) + "' appears twice");
    }
  }
}

const Entry* Archive::Find(std::string_view entry_name) const {
  auto it = std::lower_bound(sorted_.begin(), sorted_.end(), entry_name,
                             [&](size_t i, std::string_view n) { return entries_[i].name < n; });
  if (it == sorted_.end() || entries_[*it].name != entry_name) return nullptr;
  return &entries_[*it];
}

std::span<const uint8_t> Archive::Read(const Entry& entry, std::vector<uint8_t>* buffer,
                                       bool check_crc) const {
  const std::string where = "entry '" + Printable(entry.name) + "'";
  const std::span<const uint8_t> raw = bytes_.subspan(entry.data_offset, entry.compressed_size);
  if (entry.method == 0) {
    if (check_crc && Crc32(raw) != entry.crc32) Fail(where + ": CRC mismatch (corrupt data)");
    return raw;
  }
  // Deflate. Refuse sizes no deflate stream of this length could produce, then grow the output
  // only as real data arrives, so a lying size cannot make us allocate.
  const uint64_t want = entry.uncompressed_size;
  if (want > kMaxInflatedBytes || want > entry.compressed_size * kMaxDeflateRatio + 1024) {
    Fail(where + ": implausible uncompressed size " + std::to_string(want) + " for " +
         std::to_string(entry.compressed_size) + " compressed bytes");
  }
  buffer->clear();
  buffer->resize(
      static_cast<size_t>(std::min<uint64_t>(want, std::max<uint64_t>(65536, raw.size() * 4))));
  z_stream zs{};
  if (inflateInit2(&zs, -MAX_WBITS) != Z_OK) Fail(where + ": cannot initialise zlib");
  size_t in_done = 0, out_done = 0;
  int rc = Z_OK;
  while (true) {
    if (out_done == buffer->size()) {
      if (buffer->size() == want) {
        // Full: the stream must end here. Probe with a one-byte scratch buffer.
        uint8_t probe;
        zs.next_out = &probe;
        zs.avail_out = 1;
        zs.next_in = const_cast<Bytef*>(raw.data() + in_done);
        zs.avail_in = static_cast<uInt>(std::min<size_t>(raw.size() - in_done, UINT_MAX));
        const uInt before = zs.avail_in;
        rc = inflate(&zs, Z_NO_FLUSH);
        in_done += before - zs.avail_in;
        if (zs.avail_out == 0) rc = Z_DATA_ERROR;  // more data than declared
        break;
      }
      buffer->resize(static_cast<size_t>(std::min<uint64_t>(want, buffer->size() * uint64_t{2})));
    }
    zs.next_out = buffer->data() + out_done;
    zs.avail_out = static_cast<uInt>(std::min<size_t>(buffer->size() - out_done, UINT_MAX));
    zs.next_in = const_cast<Bytef*>(raw.data() + in_done);
    zs.avail_in = static_cast<uInt>(std::min<size_t>(raw.size() - in_done, UINT_MAX));
    const uInt in_before = zs.avail_in, out_before = zs.avail_out;
    rc = inflate(&zs, Z_NO_FLUSH);
    in_done += in_before - zs.avail_in;
    out_done += out_before - zs.avail_out;
    if (rc == Z_STREAM_END) break;
    if (rc == Z_BUF_ERROR && zs.avail_out != 0 && in_done == raw.size()) break;  // input ended
    if (rc != Z_OK && rc != Z_BUF_ERROR) break;
  }
  inflateEnd(&zs);
  if (rc != Z_STREAM_END || out_done != want) {
    Fail(where + ": corrupt deflate data (inflated " + std::to_string(out_done) + " of " +
         std::to_string(want) + " declared bytes)");
  }
  const std::span<const uint8_t> out(buffer->data(), out_done);
  if (Crc32(out) != entry.crc32) Fail(where + ": CRC mismatch (corrupt data)");
  return out;
}

}  // namespace aviary::zip
