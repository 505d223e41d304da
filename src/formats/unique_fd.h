// A POSIX file descriptor closed when it goes out of scope, for code that needs what streams
// do not give (fsync, O_DIRECTORY, pread): downloads and training checkpoints.
#pragma once

#include <unistd.h>

#include <utility>

namespace aviary {

class UniqueFd {
 public:
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  int get() const { return fd_; }
  // Gives up ownership (to close it and check the result).
  int Release() { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

}  // namespace aviary
