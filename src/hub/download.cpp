#include "hub/download.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "aviary/error.h"
#include "hub/catalog.h"
#include "formats/sha256.h"
#include "formats/unique_fd.h"

namespace aviary::hub {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------------------------
// Small helpers

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() &&
         (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '\n')) {
    s.remove_suffix(1);
  }
  return s;
}

std::optional<uint64_t> ParseU64(std::string_view s) {
  s = Trim(s);
  if (s.empty() || s.size() > 19) return std::nullopt;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  return v;
}

bool IsSha256Hex(std::string_view s) {
  return s.size() == 64 && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

// Hugging Face's X-Linked-ETag: "<sha256>" for LFS files, possibly weak (W/"...").
std::string ParseLinkedEtag(std::string_view value) {
  value = Trim(value);
  if (value.substr(0, 2) == "W/" || value.substr(0, 2) == "w/") value.remove_prefix(2);
  if (value.size() >= 2 && value.front() == '"' && value.back() == '"') {
    value = value.substr(1, value.size() - 2);
  }
  std::string hex = Lower(value);
  return IsSha256Hex(hex) ? hex : std::string();
}

std::string HostOf(const std::string& url) {
  std::string host = url;
  CURLU* u = curl_url();
  if (u && curl_url_set(u, CURLUPART_URL, url.c_str(), 0) == CURLUE_OK) {
    char* h = nullptr;
    if (curl_url_get(u, CURLUPART_HOST, &h, 0) == CURLUE_OK && h) {
      host = h;
      curl_free(h);
    }
  }
  curl_url_cleanup(u);
  return host;
}

void EnsureCurlInitialised() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
      throw Error("cannot initialise libcurl");
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Progress on the log stream

class Progress {
 public:
  Progress(std::FILE* out, ProgressStyle style, std::string label)
      : out_(out), label_(std::move(label)) {
    if (!out_ || style == ProgressStyle::kNone) {
      style_ = ProgressStyle::kNone;
    } else if (style == ProgressStyle::kAuto) {
      style_ = ::isatty(::fileno(out_)) ? ProgressStyle::kBar : ProgressStyle::kLines;
    } else {
      style_ = style;
    }
  }

  // A request starts receiving body bytes at `offset` of `total` (0 = unknown).
  void Begin(uint64_t offset, uint64_t total) {
    const auto now = Clock::now();
    if (!started_) {
      started_ = true;
      session_start_ = now;
      first_offset_ = offset;
      // Lines already passed (a resumed download) are not printed again.
      next_line_ = total ? std::max<uint64_t>(1, (offset * 10 / total + 1) * total / 10)
                         : (offset / kLineBytes + 1) * kLineBytes;
    }
    total_ = total;
    offset_ = offset;
    received_base_ = received_;
    attempt_offset_ = offset;
    Draw(now, true);
  }

  void Update(uint64_t offset) {
    received_ = received_base_ + (offset - attempt_offset_);
    offset_ = offset;
    Draw(Clock::now(), false);
  }

  void Tick() { Draw(Clock::now(), false); }

  // Ends a bar line before a note or an error is printed under it.
  void Break() {
    if (bar_drawn_) std::fputc('\n', out_), std::fflush(out_);
    bar_drawn_ = false;
  }

  void Note(const std::string& text) {
    if (style_ == ProgressStyle::kNone) return;
    Break();
    std::fprintf(out_, "%s\n", text.c_str());
    std::fflush(out_);
  }

  void Done(uint64_t size, const std::string& verified_against) {
    if (style_ == ProgressStyle::kNone) return;
    offset_ = size;
    if (style_ == ProgressStyle::kBar) Draw(Clock::now(), true);
    Break();
    const double secs = started_ ? Seconds(Clock::now()) : 0;
    std::string line = label_ + ": done, " + FormatBytes(size);
    if (secs > 0.05 && received_ > 0) {
      line += " in " + FormatDuration(secs) + " (" +
              FormatBytes(static_cast<uint64_t>(received_ / secs)) + "/s)";
    }
    if (first_offset_ > 0) line += ", resumed at " + FormatBytes(first_offset_);
    if (!verified_against.empty()) line += "; SHA-256 matches the " + verified_against;
    std::fprintf(out_, "%s\n", line.c_str());
    std::fflush(out_);
  }

 private:
  static constexpr uint64_t kLineBytes = 64ull << 20;

  double Seconds(Clock::time_point now) const {
    return std::chrono::duration<double>(now - session_start_).count();
  }

  void Draw(Clock::time_point now, bool force) {
    if (style_ == ProgressStyle::kNone || !started_) return;
    if (style_ == ProgressStyle::kLines) {
      if (offset_ < next_line_ || (total_ && offset_ > total_)) return;
      while (next_line_ <= offset_) {
        next_line_ = total_ ? next_line_ + total_ / 10 : next_line_ + kLineBytes;
        if (total_ && total_ / 10 == 0) next_line_ = total_ + 1;
      }
      if (total_) {
        std::fprintf(out_, "%s: %3d%% (%s of %s)\n", label_.c_str(),
                     static_cast<int>(offset_ * 100 / total_), FormatBytes(offset_).c_str(),
                     FormatBytes(total_).c_str());
      } else {
        std::fprintf(out_, "%s: %s\n", label_.c_str(), FormatBytes(offset_).c_str());
      }
      std::fflush(out_);
      return;
    }
    if (!force && now - last_draw_ < std::chrono::milliseconds(150)) return;
    last_draw_ = now;
    const double secs = Seconds(now);
    const double rate = secs > 0.2 ? static_cast<double>(received_) / secs : 0;
    std::string name = label_.size() > 28 ? label_.substr(0, 25) + "..." : label_;
    char buf[256];
    if (total_) {
      const double frac = std::min(1.0, static_cast<double>(offset_) / static_cast<double>(total_));
      constexpr int kWidth = 24;
      const int fill = static_cast<int>(frac * kWidth);
      std::string bar(kWidth, ' ');
      for (int i = 0; i < fill; ++i) bar[i] = '=';
      if (fill < kWidth) bar[fill] = '>';
      const double eta =
          rate > 0 ? static_cast<double>(total_ - std::min(offset_, total_)) / rate : -1;
      std::snprintf(buf, sizeof buf, "\r%s %5.1f%% [%s] %s / %s  %s/s  ETA %s   ", name.c_str(),
                    frac * 100, bar.c_str(), FormatBytes(offset_).c_str(),
                    FormatBytes(total_).c_str(), FormatBytes(static_cast<uint64_t>(rate)).c_str(),
                    FormatDuration(eta).c_str());
    } else {
      std::snprintf(buf, sizeof buf, "\r%s %s  %s/s   ", name.c_str(), FormatBytes(offset_).c_str(),
                    FormatBytes(static_cast<uint64_t>(rate)).c_str());
    }
    std::fputs(buf, out_);
    std::fflush(out_);
    bar_drawn_ = true;
  }

  std::FILE* out_;
  ProgressStyle style_ = ProgressStyle::kNone;
  std::string label_;
  bool started_ = false;
  bool bar_drawn_ = false;
  Clock::time_point session_start_, last_draw_;
  uint64_t total_ = 0, offset_ = 0, first_offset_ = 0, attempt_offset_ = 0;
  uint64_t received_ = 0, received_base_ = 0;  // bytes received over the network, all requests
  uint64_t next_line_ = 0;
};

// ---------------------------------------------------------------------------------------------
// One download: the .part file, the running hash and what the server said.

enum class Failure {
  kNone,
  kRetry,    // dropped or stalled: resume if retries are left
  kRestart,  // the server answered a resume request with other bytes: start from 0
  kFatal,    // give up; delete_part says whether the bytes on disk are bad
};

struct Transfer {
  const std::string* url = nullptr;
  const std::string* part_path = nullptr;
  const DownloadOptions* options = nullptr;
  Progress* progress = nullptr;
  CURL* handle = nullptr;
  Clock::time_point last_activity;  // last header or body bytes from the server
  int fd = -1;
  Sha256 sha;
  uint64_t offset = 0;          // bytes in the .part file, all of them hashed
  uint64_t request_offset = 0;  // where this request asked the server to start
  uint64_t total = 0;           // expected final size, 0 = unknown

  // The current response (reset on every status line: redirects, retries).
  long status = 0;
  std::optional<uint64_t> content_length;
  std::optional<uint64_t> range_start, range_total;
  bool accepting = false;     // body bytes go to the file
  bool complete_416 = false;  // the .part already holds the whole file

  // From any response of the redirect chain (Hugging Face sends them on the 302).
  std::optional<uint64_t> linked_size;
  std::string linked_sha256;

  Failure failure = Failure::kNone;
  bool delete_part = false;
  std::string message;

  void Fail(Failure f, std::string msg, bool del = false) {
    failure = f;
    message = std::move(msg);
    delete_part = del;
  }

  void ResetHashFromZero() {
    if (!sha.Reset()) Fail(Failure::kFatal, "SHA-256 is not available from OpenSSL");
    offset = 0;
    if (::ftruncate(fd, 0) != 0 && errno != EINVAL) {
      Fail(Failure::kFatal, *part_path + ": cannot truncate: " + std::strerror(errno));
    }
  }

  bool HeadersDone();
  size_t Write(const char* data, size_t n);
};

std::string SizeSources(const std::vector<std::pair<std::string, uint64_t>>& sources) {
  std::string s;
  for (const auto& [what, value] : sources) {
    if (!s.empty()) s += ", ";
    s += what + " " + std::to_string(value);
  }
  return s;
}

bool Transfer::HeadersDone() {
  if (status == 416) {
    // Our range starts at or after the end: if the server's size is ours, the .part is whole.
    if (range_total && *range_total == request_offset && request_offset > 0) {
      complete_416 = true;
    } else {
      Fail(Failure::kRestart, "the server cannot resume at byte " + std::to_string(request_offset));
    }
    return false;
  }
  if (status != 200 && status != 206) return false;  // reported after curl returns

  if (status == 206) {
    if (!range_start || *range_start != request_offset) {
      Fail(Failure::kRestart,
           "asked to resume at byte " + std::to_string(request_offset) +
               ", the server answered from " +
               (range_start ? "byte " + std::to_string(*range_start) : "an unknown byte"));
      return false;
    }
  } else if (request_offset > 0) {
    // The server ignored the Range header: take the whole file from this response.
    progress->Note(options->label +
                   ": the server does not resume downloads; starting again from 0");
    ResetHashFromZero();
    if (failure != Failure::kNone) return false;
  }

  // Every source that knows the size must agree.
  std::vector<std::pair<std::string, uint64_t>> sizes;
  if (options->expected_size) sizes.emplace_back("the catalog says", options->expected_size);
  if (linked_size) sizes.emplace_back("X-Linked-Size says", *linked_size);
  if (status == 206 && range_total) sizes.emplace_back("Content-Range says", *range_total);
  if (status == 206 && range_start && content_length) {
    sizes.emplace_back("Content-Length says", *range_start + *content_length);
  }
  if (status == 200 && content_length) sizes.emplace_back("Content-Length says", *content_length);
  for (const auto& s : sizes) {
    if (s.second != sizes.front().second) {
      Fail(Failure::kFatal, "size mismatch: " + *url + ": " + SizeSources(sizes), true);
      return false;
    }
  }
  total = sizes.empty() ? 0 : sizes.front().second;

  if (!options->expected_sha256.empty() && !linked_sha256.empty() &&
      options->expected_sha256 != linked_sha256) {
    Fail(Failure::kFatal,
         "checksum mismatch: " + *url + ": the server's X-Linked-ETag is sha256 " + linked_sha256 +
             " but the catalog expects " + options->expected_sha256 +
             " (the file on the server changed; not downloading it)",
         true);
    return false;
  }

  if (total > offset) {
    struct statvfs vfs {};
    const std::string dir = fs::path(*part_path).parent_path().string();
    if (::statvfs(dir.empty() ? "." : dir.c_str(), &vfs) == 0) {
      const uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
      if (free_bytes < total - offset) {
        Fail(Failure::kFatal, "disk full: " + *part_path + " needs " + FormatBytes(total - offset) +
                                  " more, " + dir + " has " + FormatBytes(free_bytes) + " free");
        return false;
      }
    }
  }
  accepting = true;
  progress->Begin(offset, total);
  return true;
}

size_t Transfer::Write(const char* data, size_t n) {
  if (!accepting) return n;  // the body of a redirect or an error page
  if (total && offset + n > total) {
    Fail(Failure::kFatal,
         "size mismatch: " + *url + ": the server sent more than the expected " +
             std::to_string(total) + " bytes",
         true);
    return 0;
  }
  size_t done = 0;
  while (done < n) {
    const ssize_t w = ::pwrite(fd, data + done, n - done, static_cast<off_t>(offset + done));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      const int err = w < 0 ? errno : ENOSPC;
      if (err == ENOSPC || err == EDQUOT) {
        Fail(Failure::kFatal, "disk full: cannot write " + *part_path + " (" +
                                  FormatBytes(offset + done) +
                                  " written; free some space and run "
                                  "again to resume)");
      } else {
        Fail(Failure::kFatal, *part_path + ": write error: " + std::strerror(err));
      }
      sha.Update(data, done);
      offset += done;
      return 0;
    }
    done += static_cast<size_t>(w);
  }
  sha.Update(data, n);
  offset += n;
  last_activity = Clock::now();
  progress->Update(offset);
  return n;
}

size_t OnHeader(char* data, size_t size, size_t nitems, void* user) {
  auto* t = static_cast<Transfer*>(user);
  const size_t len = size * nitems;
  const std::string_view line = Trim(std::string_view(data, len));
  t->last_activity = Clock::now();
  if (line.substr(0, 5) == "HTTP/") {
    t->status = 0;
    t->content_length.reset();
    t->range_start.reset();
    t->range_total.reset();
    t->accepting = false;
    const size_t sp = line.find(' ');
    if (sp != std::string_view::npos) {
      if (auto code = ParseU64(line.substr(sp + 1, 3))) t->status = static_cast<long>(*code);
    }
    return len;
  }
  if (line.empty()) {
    if (t->status >= 300 && t->status < 400) return len;  // curl follows the Location
    return t->HeadersDone() ? len : 0;
  }
  const size_t colon = line.find(':');
  if (colon == std::string_view::npos) return len;
  const std::string name = Lower(Trim(line.substr(0, colon)));
  const std::string_view value = Trim(line.substr(colon + 1));
  if (name == "content-length") {
    t->content_length = ParseU64(value);
  } else if (name == "content-range") {
    // "bytes 100-199/1000" or "bytes */1000"
    std::string_view v = value;
    if (v.substr(0, 6) == "bytes ") v.remove_prefix(6);
    const size_t slash = v.find('/');
    if (slash != std::string_view::npos) {
      t->range_total = ParseU64(v.substr(slash + 1));
      const std::string_view span = v.substr(0, slash);
      const size_t dash = span.find('-');
      if (dash != std::string_view::npos) t->range_start = ParseU64(span.substr(0, dash));
    }
  } else if (name == "x-linked-size") {
    t->linked_size = ParseU64(value);
  } else if (name == "x-linked-etag") {
    t->linked_sha256 = ParseLinkedEtag(value);
  }
  return len;
}

size_t OnWrite(char* data, size_t size, size_t nmemb, void* user) {
  return static_cast<Transfer*>(user)->Write(data, size * nmemb);
}

// Redraws the bar, and aborts a connected transfer that received nothing for stall_timeout_s.
// (libcurl's own low-speed check, also set, averages over a few seconds, so after a burst it
// notices a dead connection only several seconds late; it still catches slow trickles.)
int OnProgress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  auto* t = static_cast<Transfer*>(user);
  t->progress->Tick();
  const auto now = Clock::now();
  curl_off_t connected_us = 0;
  curl_easy_getinfo(t->handle, CURLINFO_CONNECT_TIME_T, &connected_us);
  if (connected_us <= 0) {  // still connecting: the connect timeout applies
    t->last_activity = now;
    return 0;
  }
  const long limit = std::max(1L, t->options->stall_timeout_s);
  if (now - t->last_activity >= std::chrono::seconds(limit)) {
    t->Fail(Failure::kRetry, "stalled: nothing received for " + std::to_string(limit) + " s from " +
                                 HostOf(*t->url));
    return 1;  // abort this request
  }
  return 0;
}

std::string StatusText(long status) {
  switch (status) {
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 410: return "Gone";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "";
  }
}

// Runs one request; the outcome is left in t.failure / t.status.
CURLcode Perform(const std::string& url, Transfer& t, char* errbuf) {
  std::unique_ptr<CURL, void (*)(CURL*)> curl(curl_easy_init(), curl_easy_cleanup);
  if (!curl) throw Error("cannot initialise libcurl");
  CURL* h = curl.get();
  const DownloadOptions& o = *t.options;
  curl_easy_setopt(h, CURLOPT_URL, url.c_str());
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(h, CURLOPT_MAXREDIRS, 10L);
  curl_easy_setopt(h, CURLOPT_USERAGENT, "aviary/0.1.0 (+libcurl)");
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
  curl_easy_setopt(h, CURLOPT_BUFFERSIZE, 256L * 1024);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, std::max(1L, o.connect_timeout_s));
  curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, std::max(1L, o.stall_min_bytes_per_s));
  curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, std::max(1L, o.stall_timeout_s));
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
  curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, OnHeader);
  curl_easy_setopt(h, CURLOPT_HEADERDATA, &t);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, OnWrite);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &t);
  curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
  curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, OnProgress);
  curl_easy_setopt(h, CURLOPT_XFERINFODATA, &t);
  t.handle = h;
  t.last_activity = Clock::now();
  const std::string range = std::to_string(t.request_offset) + "-";
  if (t.request_offset > 0) curl_easy_setopt(h, CURLOPT_RANGE, range.c_str());
  errbuf[0] = '\0';
  return curl_easy_perform(h);
}

}  // namespace

DownloadResult DownloadFile(const std::string& url, const std::string& path,
                            const DownloadOptions& options_in) {
  EnsureCurlInitialised();
  DownloadOptions options = options_in;
  options.expected_sha256 = Lower(options.expected_sha256);
  if (!options.expected_sha256.empty() && !IsSha256Hex(options.expected_sha256)) {
    throw UsageError("expected SHA-256 '" + options_in.expected_sha256 + "' is not 64 hex digits");
  }
  if (options.label.empty()) options.label = fs::path(path).filename().string();
  const std::string part = path + ".part";
  const fs::path dir = fs::path(path).parent_path();
  std::error_code ec;
  if (!dir.empty()) {
    fs::create_directories(dir, ec);
    if (ec) throw Error(dir.string() + ": cannot create folder: " + ec.message());
  }

  UniqueFd fd(::open(part.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (fd.get() < 0) throw Error(part + ": cannot open for writing: " + std::strerror(errno));
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    throw Error(part + ": another aviary pull is downloading this file");
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw Error(part + ": " + std::strerror(errno));
  const bool regular = S_ISREG(st.st_mode);

  Progress progress(options.log, options.progress, options.label);
  Transfer t;
  t.url = &url;
  t.part_path = &part;
  t.options = &options;
  t.progress = &progress;
  t.fd = fd.get();

  auto delete_part = [&] { ::unlink(part.c_str()); };

  // Bytes already there from an interrupted download: hash them, then resume after them.
  DownloadResult result;
  uint64_t existing = regular ? static_cast<uint64_t>(st.st_size) : 0;
  if (options.expected_size && existing > options.expected_size) {
    progress.Note(options.label + ": " + part + " is larger than the file; starting again");
    if (::ftruncate(fd.get(), 0) != 0)
      throw Error(part + ": cannot truncate: " + std::strerror(errno));
    existing = 0;
  }
  if (existing > 0) {
    progress.Note(options.label + ": resuming after " + FormatBytes(existing) + " already in " +
                  part);
    std::vector<char> buf(1 << 20);
    uint64_t pos = 0;
    while (pos < existing) {
      const ssize_t r =
          ::pread(fd.get(), buf.data(), std::min<uint64_t>(buf.size(), existing - pos),
                  static_cast<off_t>(pos));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) throw Error(part + ": read error: " + std::strerror(r < 0 ? errno : EIO));
      t.sha.Update(buf.data(), static_cast<size_t>(r));
      pos += static_cast<uint64_t>(r);
    }
    t.offset = existing;
    result.resumed = true;
  }

  const bool already_whole = options.expected_size && t.offset == options.expected_size;
  int retries_left = options.retries;
  int restarts_left = 2;
  int delay_ms = std::max(0, options.retry_delay_ms);
  char errbuf[CURL_ERROR_SIZE];
  while (!already_whole) {
    t.request_offset = t.offset;
    t.failure = Failure::kNone;
    t.message.clear();
    t.status = 0;
    t.accepting = false;
    t.complete_416 = false;
    ++result.requests;
    const CURLcode rc = Perform(url, t, errbuf);
    if (t.complete_416) break;
    if (t.failure == Failure::kNone && rc == CURLE_OK && (t.status == 200 || t.status == 206))
      break;

    Failure failure = t.failure;
    std::string why = t.message;
    if (failure == Failure::kNone) {
      const std::string detail = errbuf[0] ? errbuf : curl_easy_strerror(rc);
      const long s = t.status;
      if (rc == CURLE_OK || (rc == CURLE_WRITE_ERROR && s >= 300)) {
        if (s == 404 || s == 410) {
          failure = Failure::kFatal;
          why = "not found: " + url;
        } else if (s == 429 || s >= 500) {
          failure = Failure::kRetry;
          why = "HTTP " + std::to_string(s) + " " + StatusText(s) + " from " + url;
        } else {
          failure = Failure::kFatal;
          why = "HTTP " + std::to_string(s) + (StatusText(s).empty() ? "" : " " + StatusText(s)) +
                ": " + url +
                (s == 401 || s == 403 ? " (private or gated? aviary sends no token)" : "");
        }
      } else if (rc == CURLE_COULDNT_RESOLVE_HOST || rc == CURLE_COULDNT_CONNECT ||
                 rc == CURLE_COULDNT_RESOLVE_PROXY ||
                 (rc == CURLE_OPERATION_TIMEDOUT && t.status == 0 && t.offset == t.request_offset &&
                  (std::strstr(detail.c_str(), "onnect") ||
                   std::strstr(detail.c_str(), "esolv")))) {
        failure = Failure::kFatal;
        why = "cannot reach " + HostOf(url) + " (" + detail +
              "): no network? Offline, copy the "
              "file from a machine that has it and pass its path to --model" +
              (options.unreachable_hint.empty() ? "" : "; " + options.unreachable_hint);
      } else if (rc == CURLE_OPERATION_TIMEDOUT) {
        failure = Failure::kRetry;
        why = "stalled: less than " + std::to_string(options.stall_min_bytes_per_s) +
              " bytes/s for " + std::to_string(options.stall_timeout_s) + " s from " + HostOf(url) +
              " (" + detail + ")";
      } else if (rc == CURLE_PARTIAL_FILE || rc == CURLE_RECV_ERROR || rc == CURLE_SEND_ERROR ||
                 rc == CURLE_GOT_NOTHING || rc == CURLE_HTTP2 || rc == CURLE_HTTP2_STREAM ||
                 rc == CURLE_SSL_CONNECT_ERROR) {
        failure = Failure::kRetry;
        why = "connection lost (" + detail + ")";
      } else {
        failure = Failure::kFatal;
        why = "download failed: " + url + ": " + detail;
      }
    }

    if (failure == Failure::kRestart && restarts_left-- > 0) {
      progress.Note(options.label + ": " + why + "; starting again from byte 0");
      t.ResetHashFromZero();
      if (t.failure == Failure::kFatal) throw Error(t.message);
      continue;
    }
    if (failure == Failure::kRetry && retries_left > 0) {
      --retries_left;
      const int attempt = options.retries - retries_left;
      progress.Note(options.label + ": " + why + " at " + FormatBytes(t.offset) + "; retrying in " +
                    FormatDuration(delay_ms / 1000.0) + " (" + std::to_string(attempt) + " of " +
                    std::to_string(options.retries) + ")");
      std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
      delay_ms = std::min(delay_ms * 2, 30000);
      continue;
    }
    progress.Break();
    if (t.delete_part || (regular && t.offset == 0)) delete_part();  // bad, or nothing to resume
    if (failure == Failure::kRetry && options.retries > 0) {
      why +=
          " (gave up after " + std::to_string(options.retries) + " retries; run again to resume)";
    } else if (failure == Failure::kRetry) {
      why += " (run again to resume)";
    } else if (failure == Failure::kRestart) {
      why = "download failed: " + url + ": " + why;
    }
    throw Error(why);
  }

  // Whole: check it, then move it into place.
  const uint64_t expected = options.expected_size ? options.expected_size
                            : t.linked_size       ? *t.linked_size
                                                  : t.total;
  if (expected && t.offset != expected) {
    progress.Break();
    delete_part();
    throw Error("size mismatch: " + url + ": received " + std::to_string(t.offset) +
                " bytes, expected " + std::to_string(expected) + " (deleted the download)");
  }
  result.size = t.offset;
  result.sha256 = t.sha.HexDigest();
  std::string want = options.expected_sha256;
  result.verified_against = want.empty() ? "" : "catalog";
  if (want.empty() && !t.linked_sha256.empty()) {
    want = t.linked_sha256;
    result.verified_against = "X-Linked-ETag";
  }
  if (!want.empty() && result.sha256 != want) {
    progress.Break();
    delete_part();
    throw Error("checksum mismatch: " + url + ": SHA-256 " + result.sha256 + ", expected " + want +
                " (from the " + result.verified_against + "); deleted the download, run again");
  }
  if (regular && ::fsync(fd.get()) != 0) {
    throw Error(part + ": cannot flush to disk: " + std::strerror(errno));
  }
  if (std::rename(part.c_str(), path.c_str()) != 0) {
    throw Error(path + ": cannot move the download into place: " + std::strerror(errno));
  }
  if (const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  progress.Done(result.size, result.verified_against);
  result.path = path;
  return result;
}

std::string Sha256Hex(std::string_view bytes) {
  Sha256 sha;
  sha.Update(bytes.data(), bytes.size());
  return sha.HexDigest();
}

std::string Sha256File(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) throw Error(path + ": cannot open: " + std::strerror(errno));
  Sha256 sha;
  std::vector<char> buf(1 << 20);
  while (true) {
    const ssize_t r = ::read(fd.get(), buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw Error(path + ": read error: " + std::strerror(errno));
    if (r == 0) break;
    sha.Update(buf.data(), static_cast<size_t>(r));
  }
  return sha.HexDigest();
}

std::string FormatDuration(double seconds) {
  if (!(seconds >= 0) || seconds > 99 * 3600) return "--";
  const long s = std::lround(seconds);
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, s / 60 % 60);
  } else if (s >= 60) {
    std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%lds", s);
  }
  return buf;
}

std::string FormatBytes(uint64_t bytes) {
  char buf[32];
  if (bytes < 1024) {
    std::snprintf(buf, sizeof buf, "%" PRIu64 " B", bytes);
  } else if (bytes < (1ull << 20)) {
    std::snprintf(buf, sizeof buf, "%.1f KiB", bytes / 1024.0);
  } else if (bytes < (1ull << 30)) {
    std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / 1048576.0);
  } else {
    std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / 1073741824.0);
  }
  return buf;
}

}  // namespace aviary::hub
