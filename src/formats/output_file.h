// Writing files safely: never over one of the command's inputs, never half a file.
#pragma once

#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <vector>

namespace aviary {

// Throws UsageError when `output` would overwrite one of `inputs`: the same path, the same
// file reached through a symlink or a hard link, or the temporary OutputFile writes first
// (`output`.tmp). Empty names and "-" (stdin/stdout) in either are skipped.
void RefuseOverwritingInputs(const std::string& output, const std::vector<std::string>& inputs);

// A file written as `path`.tmp beside its target (same directory, so the rename cannot cross
// file systems) and renamed over `path` by Commit: a failed or interrupted write never leaves
// half a file, and a file already at `path` stays whole until the new one is complete.
// Destroyed without Commit, it removes the temporary. The path "-" means stdout, and a
// device or pipe (/dev/null, a FIFO) is written in place; Commit reports a failed write.
class OutputFile {
 public:
  explicit OutputFile(std::string path);
  ~OutputFile();
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;

  const std::string& path() const { return path_; }
  bool is_stdout() const { return path_ == "-"; }
  // Where a writer that takes a file name writes (it may reopen and truncate it); not for "-".
  const std::string& temp_path() const { return temp_; }

  // Appends bytes; throws Error naming the file when the write fails.
  void Write(const void* data, size_t n);
  // Completes the file: closes (or flushes stdout) and renames it into place; throws Error
  // naming the file on failure, and then nothing is left at the temporary path.
  void Commit();

 private:
  [[noreturn]] void Fail(const std::string& what, int err);

  std::string path_, target_, temp_;
  FILE* file_ = nullptr;
  bool direct_ = false;  // a device or pipe, written in place
  bool committed_ = false;
};

// Writes `bytes` to `path` through an OutputFile.
void WriteFileAtomically(const std::string& path, std::span<const uint8_t> bytes);

}  // namespace aviary
