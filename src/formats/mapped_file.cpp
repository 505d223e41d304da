#include "formats/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <system_error>
#include <thread>
#include <vector>

#include "aviary/error.h"

namespace aviary {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;  // x86-64's; elsewhere alignment is harmless

// Whether the kernel will back an madvise(MADV_HUGEPAGE) region with huge pages: its setting
// reads "always [madvise] never" with the choice in brackets.
bool HugePagesOffered() {
  static const bool offered = [] {
    std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string line;
    return std::getline(in, line) && line.find("[never]") == std::string::npos &&
           line.find('[') != std::string::npos;
  }();
  return offered;
}

// Reads all of fd into anonymous memory aligned to a huge page, advised for huge pages.
// Returns the data's start, and the region to unmap in *region / *region_bytes.
const uint8_t* ReadAll(int fd, size_t size, const std::string& path, void** region,
                       size_t* region_bytes) {
  const size_t bytes = size + kHugePage;  // slack to align the start
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    throw Error(path + ": cannot allocate " + std::to_string(size >> 20) +
                " MiB to read it into: " + std::strerror(errno));
  }
  *region = p;
  *region_bytes = bytes;
  auto* data = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + kHugePage - 1) &
                                          ~static_cast<uintptr_t>(kHugePage - 1));
  ::madvise(data, size, MADV_HUGEPAGE);  // advice only: 4 KiB pages if refused
  // Most of the time goes to the first touch of fresh pages, which each CPU serves for itself:
  // 2.9 GiB took 7.3 s with one reader and 2.3 s with two on the 2-core test VM (0.2-0.4 s
  // when the pages were recently freed). Readers: one per hardware thread, up to 4.
  const int readers = static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 4u));
  std::vector<std::string> errors(readers);
  auto read_part = [&](int i) {
    size_t done = size / readers * i;
    const size_t end = i + 1 == readers ? size : size / readers * (i + 1);
    while (done < end) {
      const ssize_t n = ::pread(fd, data + done, end - done, static_cast<off_t>(done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        errors[i] = n < 0 ? std::strerror(errno) : "the file got shorter while being read";
        return;
      }
      done += static_cast<size_t>(n);
    }
  };
  std::vector<std::thread> threads;
  for (int i = 1; i < readers; ++i) {
    try {
      threads.emplace_back(read_part, i);
    } catch (const std::system_error&) {  // no thread to be had: read that part here
      read_part(i);
    }
  }
  read_part(0);
  for (auto& t : threads) t.join();
  for (const std::string& why : errors) {
    if (!why.empty()) {
      ::munmap(p, bytes);
      throw Error(path + ": cannot read: " + why);
    }
  }
  ::mprotect(data, size, PROT_READ);  // read-only like a mapping: a stray write faults
  return data;
}

}  // namespace

LoadMode ResolveLoadMode(LoadMode requested, uint64_t file_bytes) {
  if (requested != LoadMode::kAuto) return requested;
  return file_bytes >= kReadMinBytes && HugePagesOffered() ? LoadMode::kRead : LoadMode::kMmap;
}

const char* LoadModeName(LoadMode mode) {
  switch (mode) {
    case LoadMode::kAuto: return "auto";
    case LoadMode::kMmap: return "mmap";
    case LoadMode::kRead: return "read";
  }
  return "?";
}

MappedFile::MappedFile(const std::string& path, LoadMode mode) : path_(path), mode_(mode) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw Error(path + ": cannot stat: " + std::strerror(err));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    throw Error(path + ": is a directory, not a model file");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(path + ": not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ == 0) {
    ::close(fd);
    throw Error(path + ": file is empty");
  }
  mode_ = ResolveLoadMode(mode, size_);
  if (mode_ == LoadMode::kRead) {
    try {
      data_ = ReadAll(fd, size_, path, &region_, &region_bytes_);
    } catch (...) {
      ::close(fd);
      throw;
    }
    ::close(fd);
    return;
  }
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);
  if (p == MAP_FAILED) throw Error(path + ": cannot map: " + std::strerror(err));
  data_ = static_cast<const uint8_t*>(p);
  region_ = p;
  region_bytes_ = size_;
}

MappedFile::~MappedFile() {
  if (region_) ::munmap(region_, region_bytes_);
}

}  // namespace aviary
