// HTTP(S) downloads that survive bad networks: resumable, verified, atomic.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace aviary::hub {

enum class ProgressStyle {
  kAuto,   // a redrawn bar when the log stream is a terminal, else kLines
  kBar,    // "\r 45.2% [=====>    ] 1.2 GiB / 2.7 GiB  11.3 MiB/s  ETA 2m13s"
  kLines,  // one line per 10% (per 64 MiB when the size is unknown), for logs and pipes
  kNone,
};

struct DownloadOptions {
  uint64_t expected_size = 0;   // bytes, from a catalog; 0 = unknown
  std::string expected_sha256;  // lowercase hex, from a catalog; empty = unknown
  std::string label;            // what progress lines call the file; default its name
  long connect_timeout_s = 30;
  // A transfer that moves fewer than stall_min_bytes_per_s for stall_timeout_s seconds (including
  // a server that never answers) is aborted, then resumed if retries are left.
  long stall_timeout_s = 60;
  long stall_min_bytes_per_s = 1024;
  int retries = 5;            // further attempts after a dropped or stalled transfer
  int retry_delay_ms = 1000;  // before the first retry; doubles each time, at most 30 s
  ProgressStyle progress = ProgressStyle::kAuto;
  // Added to the error when the host cannot be reached: how to point at a mirror of it.
  std::string unreachable_hint;
  std::FILE* log = stderr;  // progress and notes; nullptr = silent
};

struct DownloadResult {
  std::string path;
  uint64_t size = 0;
  std::string sha256;            // of the whole file, lowercase hex
  std::string verified_against;  // "catalog", "X-Linked-ETag", or empty when nothing to check
  int requests = 0;              // HTTP requests made (1 when nothing went wrong)
  bool resumed = false;          // continued bytes already on disk
};

// Downloads `url` (http or https; redirects followed) to `path`. Bytes go to `path + ".part"`
// (locked against a second concurrent download), which a later call resumes with a Range request
// (the server must answer 206 with a Content-Range starting where the file ends; a server that
// ignores the range makes the download start again from byte 0). The size is checked against
// every source that knows it (options.expected_size, Hugging Face's X-Linked-Size, Content-Length,
// the Content-Range total) and the SHA-256 against options.expected_sha256, else X-Linked-ETag
// when it holds one; then the file is renamed to `path`. An existing `path` is replaced.
// Throws aviary::Error: "not found: URL" (404), "HTTP <code> ...", size or checksum mismatch (the
// .part is deleted), an unreachable host (named, with offline alternatives), a stalled transfer
// once retries are spent, disk full (the .part is kept for resuming).
DownloadResult DownloadFile(const std::string& url, const std::string& path,
                            const DownloadOptions& options);

std::string Sha256Hex(std::string_view bytes);
// SHA-256 of a file's contents; throws aviary::Error naming the file.
std::string Sha256File(const std::string& path);

// "45s", "12m05s", "1h02m"; "--" for a negative, unknown or over 99 h time.
std::string FormatDuration(double seconds);
// "512 B", "1.5 KiB", "364.5 MiB", "2.75 GiB".
std::string FormatBytes(uint64_t bytes);

}  // namespace aviary::hub
