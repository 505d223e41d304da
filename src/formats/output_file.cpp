#include "formats/output_file.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "aviary/error.h"

namespace aviary {
namespace {

bool SameFile(const std::string& a, const std::string& b) {
  struct stat sa;
  struct stat sb;
  return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev &&
         sa.st_ino == sb.st_ino;
}

// Paths that name one file once written, whether or not it exists yet.
bool SamePath(const std::string& a, const std::string& b) {
  std::error_code ea, eb;
  const auto pa = std::filesystem::weakly_canonical(a, ea);
  const auto pb = std::filesystem::weakly_canonical(b, eb);
  return !ea && !eb && pa == pb;
}

}  // namespace

void RefuseOverwritingInputs(const std::string& output, const std::vector<std::string>& inputs) {
  if (output.empty() || output == "-") return;
  for (const std::string& in : inputs) {
    if (in.empty() || in == "-") continue;
    for (const std::string& out : {output, output + ".tmp"}) {
      if (SameFile(in, out) || SamePath(in, out)) {
        throw UsageError("refusing to overwrite the input file " + in + " with " + output +
                         " (give another output name)");
      }
    }
  }
}

OutputFile::OutputFile(std::string path) : path_(std::move(path)) {
  if (is_stdout()) {
    file_ = stdout;
    return;
  }
  struct stat st {};
  if (::stat(path_.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) throw Error(path_ + ": is a directory");
    if (!S_ISREG(st.st_mode)) {
      // A device or a pipe (/dev/null, /dev/stdout, a FIFO) is written as it is: renaming a
      // file over it would replace the device instead of writing to it.
      direct_ = true;
      temp_ = path_;
      file_ = std::fopen(path_.c_str(), "wb");
      if (!file_) throw Error(path_ + ": cannot open for writing: " + std::strerror(errno));
      return;
    }
  }
  // Through a symlink, the file it points to is replaced (the link stays).
  namespace fs = std::filesystem;
  std::error_code ec;
  target_ = path_;
  for (int hops = 0; hops < 40 && fs::is_symlink(target_, ec); ++hops) {
    const fs::path link = fs::read_symlink(target_, ec);
    if (ec) break;
    target_ = (link.is_absolute() ? link : fs::path(target_).parent_path() / link).string();
  }
  temp_ = target_ + ".tmp";
  file_ = std::fopen(temp_.c_str(), "wb");
  if (!file_) throw Error(temp_ + ": cannot create: " + std::strerror(errno));
}

OutputFile::~OutputFile() {
  if (committed_ || is_stdout()) return;
  if (file_) std::fclose(file_);
  if (!direct_) std::remove(temp_.c_str());
}

void OutputFile::Fail(const std::string& what, int err) {
  if (!is_stdout()) {
    if (file_) std::fclose(file_);
    file_ = nullptr;
    if (!direct_) std::remove(temp_.c_str());
  }
  throw Error((is_stdout() ? std::string("stdout") : path_) + ": " + what +
              (err ? std::string(": ") + std::strerror(err) : ""));
}

void OutputFile::Write(const void* data, size_t n) {
  if (!file_) throw Error(path_ + ": already closed");
  errno = 0;
  if (n && std::fwrite(data, 1, n, file_) != n) Fail("write failed", errno);
}

void OutputFile::Commit() {
  if (committed_) return;
  if (!file_) throw Error(path_ + ": already closed");
  errno = 0;
  if (is_stdout()) {
    if (std::fflush(stdout) != 0 || std::ferror(stdout)) Fail("write failed", errno);
    committed_ = true;
    return;
  }
  const bool write_error = std::ferror(file_) != 0;
  const int rc = std::fclose(file_);
  file_ = nullptr;
  if (write_error || rc != 0) Fail("write failed", errno);
  if (!direct_ && std::rename(temp_.c_str(), target_.c_str()) != 0) {
    const int err = errno;
    Fail("cannot rename " + temp_ + " to it", err);
  }
  committed_ = true;
}

void WriteFileAtomically(const std::string& path, std::span<const uint8_t> bytes) {
  OutputFile out(path);
  out.Write(bytes.data(), bytes.size());
  out.Commit();
}

}  // namespace aviary
