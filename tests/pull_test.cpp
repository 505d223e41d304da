// aviary pull: downloads against a misbehaving HTTP server on 127.0.0.1 (pull_http_server.h),
// the catalog and cache layout, --model resolution of catalog names, and the CLI. Every URL in
// this file is on loopback; the fixture points the Hugging Face and GitHub endpoints at a closed
// loopback port so that nothing can leave the machine even by mistake.
#include <fcntl.h>
#include <strings.h>
#include <sys/file.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <random>
#include <regex>

#include "aviary/cache.h"
#include "aviary/error.h"
#include "hub/catalog.h"
#include "hub/download.h"
#include "hub/pull.h"
#include "pull_http_server.h"
#include "test_data.h"

// Resources are written with designated initializers; the fields left out keep their defaults.
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"

namespace aviary::testing {
namespace {

namespace fs = std::filesystem;
using hub::DownloadFile;
using hub::DownloadOptions;
using hub::Sha256Hex;
using Server = PullHttpServer;

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng() & 0xff);
  return s;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void WriteAll(const std::string& path, const std::string& bytes) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << bytes;
}

// A file of `size` bytes that takes no disk space.
void WriteSparse(const std::string& path, uint64_t size) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary).close();
  fs::resize_file(path, size);
}

std::string Quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// A loopback port that nothing listens on (connections are refused at once).
int ClosedPort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::optional<std::string>& value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value) {
      ::setenv(name, value->c_str(), 1);
    } else {
      ::unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (old_) {
      ::setenv(name_.c_str(), old_->c_str(), 1);
    } else {
      ::unsetenv(name_.c_str());
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::optional<std::string> old_;
};

std::string LinkedEtag(const std::string& body) { return "\"" + Sha256Hex(body) + "\""; }

class PullTest : public ::testing::Test {
 protected:
  PullTest()
      : dir_(::testing::TempDir() + "aviary_pull_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name()),
        cache_env_("AVIARY_CACHE_DIR", dir_ + "/cache"),
        hf_env_("AVIARY_HF_ENDPOINT", "http://127.0.0.1:" + std::to_string(ClosedPort())),
        gh_env_("AVIARY_RAW_GITHUB_ENDPOINT", "http://127.0.0.1:" + std::to_string(ClosedPort())),
        stall_env_("AVIARY_STALL_TIMEOUT", std::nullopt),
        no_proxy_("no_proxy", "127.0.0.1,localhost"),
        no_proxy_upper_("NO_PROXY", "127.0.0.1,localhost") {
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  ~PullTest() override { fs::remove_all(dir_); }

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  std::string Cache() const { return dir_ + "/cache"; }
  // What the CLI reads from the environment the fixture sets (its endpoints point nowhere).
  HubSettings Hub() const {
    HubSettings hub;
    hub.cache_dir = Cache();
    if (const char* hf = std::getenv("AVIARY_HF_ENDPOINT")) hub.hf_endpoint = hf;
    if (const char* gh = std::getenv("AVIARY_RAW_GITHUB_ENDPOINT")) hub.raw_github_endpoint = gh;
    return hub;
  }

  static DownloadOptions Quiet() {
    DownloadOptions o;
    o.log = nullptr;
    o.progress = hub::ProgressStyle::kNone;
    o.retry_delay_ms = 0;
    o.connect_timeout_s = 5;
    o.stall_timeout_s = 5;
    o.retries = 0;
    return o;
  }

  // The CLI with stderr sent to a file (read back with Stderr()).
  CommandResult Cli(const std::string& args) {
    return RunCommand(Quote(CliPath()) + " " + args + " 2>" + Quote(Path("stderr.txt")));
  }
  std::string Stderr() const { return ReadAll(Path("stderr.txt")); }

  std::string dir_;
  ScopedEnv cache_env_, hf_env_, gh_env_, stall_env_, no_proxy_, no_proxy_upper_;
};

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// ---------------------------------------------------------------------------------------------
// Checksums

TEST(PullSha256, KnownVectors) {
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string path = ::testing::TempDir() + "aviary_pull_sha_" + std::to_string(::getpid());
  const std::string big = RandomBytes(3 << 20, 7);
  WriteAll(path, big);
  EXPECT_EQ(hub::Sha256File(path), Sha256Hex(big));
  fs::remove(path);
  EXPECT_THROW(hub::Sha256File(path), Error);
}

// ---------------------------------------------------------------------------------------------
// DownloadFile against the test server

TEST_F(PullTest, PlainDownloadIsExactVerifiedAndLeavesNoPart) {
  Server server;
  const std::string body = RandomBytes(1 << 20, 1);
  server.Add("/f.bin", {.body = body,
                        .headers = {{"X-Linked-Size", std::to_string(body.size())},
                                    {"X-Linked-ETag", LinkedEtag(body)}}});
  const auto r = DownloadFile(server.Url("/f.bin"), Path("out/f.bin"), Quiet());
  EXPECT_EQ(r.path, Path("out/f.bin"));
  EXPECT_EQ(ReadAll(Path("out/f.bin")), body);
  EXPECT_EQ(r.size, body.size());
  EXPECT_EQ(r.sha256, Sha256Hex(body));
  EXPECT_EQ(r.verified_against, "X-Linked-ETag");
  EXPECT_EQ(r.requests, 1);
  EXPECT_FALSE(r.resumed);
  EXPECT_FALSE(fs::exists(Path("out/f.bin.part")));
  ASSERT_EQ(server.requests().size(), 1u);
  EXPECT_EQ(server.requests()[0].range, "");
}

TEST_F(PullTest, ResumesAfterDroppedConnections) {
  Server server;
  const std::string body = RandomBytes(2'000'000, 2);
  server.Add("/f.bin", {.body = body,
                        .headers = {{"X-Linked-ETag", LinkedEtag(body)}},
                        .drop_after = 700'000,
                        .drop_times = 2});
  DownloadOptions o = Quiet();
  o.retries = 3;
  const auto r = DownloadFile(server.Url("/f.bin"), Path("f.bin"), o);
  EXPECT_EQ(ReadAll(Path("f.bin")), body);  // byte-exact after two resumes
  EXPECT_EQ(r.verified_against, "X-Linked-ETag");
  EXPECT_EQ(r.requests, 3);
  const auto reqs = server.requests();
  ASSERT_EQ(reqs.size(), 3u);
  EXPECT_EQ(reqs[0].range, "");
  EXPECT_EQ(reqs[1].range, "bytes=700000-");
  EXPECT_EQ(reqs[2].range, "bytes=1400000-");
  EXPECT_FALSE(fs::exists(Path("f.bin.part")));
}

TEST_F(PullTest, DropWithoutRetriesKeepsThePartAndTheNextRunResumes) {
  Server server;
  const std::string body = RandomBytes(1'500'000, 3);
  server.Add("/f.bin", {.body = body,
                        .headers = {{"X-Linked-Size", std::to_string(body.size())},
                                    {"X-Linked-ETag", LinkedEtag(body)}},
                        .drop_after = 600'000,
                        .drop_times = 1});
  try {
    DownloadFile(server.Url("/f.bin"), Path("f.bin"), Quiet());
    FAIL() << "expected a dropped connection";
  } catch (const Error& e) {
    EXPECT_TRUE(Contains(e.what(), "connection lost")) << e.what();
    EXPECT_TRUE(Contains(e.what(), "run again to resume")) << e.what();
  }
  EXPECT_FALSE(fs::exists(Path("f.bin")));
  EXPECT_EQ(fs::file_size(Path("f.bin.part")), 600'000u);

  const auto r = DownloadFile(server.Url("/f.bin"), Path("f.bin"), Quiet());
  EXPECT_TRUE(r.resumed);
  EXPECT_EQ(ReadAll(Path("f.bin")), body);
  EXPECT_EQ(r.verified_against, "X-Linked-ETag");  // the hash covers the bytes of both runs
  ASSERT_EQ(server.requests().size(), 2u);
  EXPECT_EQ(server.requests()[1].range, "bytes=600000-");
}

TEST_F(PullTest, ServerIgnoringRangeRestartsFromZero) {
  Server server;
  const std::string body = RandomBytes(900'000, 4);
  server.Add(
      "/f.bin",
      {.body = body, .headers = {{"X-Linked-ETag", LinkedEtag(body)}}, .honour_range = false});
  WriteAll(Path("f.bin.part"), RandomBytes(300'000, 99));  // would corrupt the file if kept
  const auto r = DownloadFile(server.Url("/f.bin"), Path("f.bin"), Quiet());
  EXPECT_EQ(ReadAll(Path("f.bin")), body);
  EXPECT_EQ(r.requests, 1);
  ASSERT_EQ(server.requests().size(), 1u);
  EXPECT_EQ(server.requests()[0].range, "bytes=300000-");
}

TEST_F(PullTest, WrongContentRangeStartRestartsFromZero) {
  Server server;
  const std::string body = RandomBytes(900'000, 5);
  server.Add(
      "/f.bin",
      {.body = body, .headers = {{"X-Linked-ETag", LinkedEtag(body)}}, .range_start_lie = 100});
  WriteAll(Path("f.bin.part"), body.substr(0, 300'000));
  const auto r = DownloadFile(server.Url("/f.bin"), Path("f.bin"), Quiet());
  EXPECT_EQ(ReadAll(Path("f.bin")), body);
  const auto reqs = server.requests();
  ASSERT_EQ(reqs.size(), 2u);
  EXPECT_EQ(reqs[0].range, "bytes=300000-");  // answered "bytes 100-..." -> not used
  EXPECT_EQ(reqs[1].range, "");               // from the start
  EXPECT_EQ(r.requests, 2);
}

TEST_F(PullTest, WholePartFileIsOnlyVerified) {
  Server server;
  const std::string body = RandomBytes(100'000, 6);
  server.Add("/f.bin", {.body = body});
  WriteAll(Path("f.bin.part"), body);
  DownloadOptions o = Quiet();
  o.expected_size = body.size();
  o.expected_sha256 = Sha256Hex(body);
  const auto r = DownloadFile(server.Url("/f.bin"), Path("f.bin"), o);
  EXPECT_EQ(r.requests, 0);
  EXPECT_EQ(r.verified_against, "catalog");
  EXPECT_EQ(ReadAll(Path("f.bin")), body);
  // Without a known size the server's 416 tells that the part is whole.
  WriteAll(Path("g.bin.part"), body);
  const auto r2 = DownloadFile(server.Url("/f.bin"), Path("g.bin"), Quiet());
  EXPECT_EQ(ReadAll(Path("g.bin")), body);
  EXPECT_EQ(r2.requests, 1);
}

TEST_F(PullTest, WrongLinkedSizeIsASizeMismatchAndLeavesNothing) {
  Server server;
  const std::string body = RandomBytes(500'000, 7);
  server.Add("/f.bin",
             {.body = body, .headers = {{"X-Linked-Size", std::to_string(body.size() + 10)}}});
  try {
    DownloadFile(server.Url("/f.bin"), Path("f.bin"), Quiet());
    FAIL() << "expected a size mismatch";
  } catch (const Error& e) {
    EXPECT_TRUE(Contains(e.what(), "size mismatch")) << e.what();
    EXPECT_TRUE(Contains(e.what(), "X-Linked-Size says 500010")) << e.what();
    EXPECT_TRUE(Contains(e.what(), "Content-Length says 500000")) << e.what();
  }
  EXPECT_FALSE(fs::exists(Path("f.bin")));
  EXPECT_FALSE(fs::exists(Path("f.bin.part")));
}

TEST_F(PullTest, WrongContentLengthIsASizeMismatchWhenTheSizeIsKnown) {
  Server server;
  const std::string body = RandomBytes(500'000, 8);
  server.Add("/short.bin", {.body = body, .content_length = body.size() - 1000});
  DownloadOptions o = Quiet();
  o.expected_size = body.size();  // as the catalog knows it
  EXPECT_THROW(
      {
        try {
          DownloadFile(server.Url("/short.bin"), Path("f.bin"), o);
        } catch (const Error& e) {
          EXPECT_TRUE(Contains(e.what(), "size mismatch")) << e.what();
          throw;
        }
      },
      Error);
  EXPECT_FALSE(fs::exists(Path("f.bin")));
  EXPECT_FALSE(fs::exists(Path("f.bin.part")));
}

TEST_F(PullTest, WrongLinkedEtagIsAChecksumMismatchAndDeletesThePart) {
  Server server;
  const std::string body = RandomBytes(700'000, 9);
  server.Add("/f.bin", {.body = body, .headers = {{"X-Linked-ETag", LinkedEtag("other bytes")}}});
  try {
    DownloadFile(server.Url("/f.bin"), Path("f.bin"), Quiet());
    FAIL() << "expected a checksum mismatch";
  } catch (const Error& e) {
    EXPECT_TRUE(Contains(e.what(), "checksum mismatch")) << e.what();
    EXPECT_TRUE(Contains(e.what(), Sha256Hex("other bytes"))) << e.what();
  }
  EXPECT_FALSE(fs::exists(Path("f.bin")));
  EXPECT_FALSE(fs::exists(Path("f.bin.part")));
}

TEST_F(PullTest, CatalogChecksumIsCheckedAndAConflictStopsBeforeDownloading) {
  Server server;
  const std::string body = RandomBytes(400'000, 10);
  server.Add("/plain.bin", {.body = body});
  server.Add("/linked.bin", {.body = body, .headers = {{"X-Linked-ETag", LinkedEtag("changed")}}});
  DownloadOptions o = Quiet();
  o.expected_sha256 = Sha256Hex("not this");
  EXPECT_THROW(DownloadFile(server.Url("/plain.bin"), Path("a.bin"), o), Error);
  EXPECT_FALSE(fs::exists(Path("a.bin")));
  EXPECT_FALSE(fs::exists(Path("a.bin.part")));

  o.expected_sha256 = Sha256Hex(body);
  EXPECT_EQ(DownloadFile(server.Url("/plain.bin"), Path("a.bin"), o).verified_against, "catalog");

  try {
    DownloadFile(server.Url("/linked.bin"), Path("b.bin"), o);
    FAIL() << "expected the catalog and the server to disagree";
  } catch (const Error& e) {
    EXPECT_TRUE(Contains(e.what(), "X-Linked-ETag")) << e.what();
    EXPECT_TRUE(Contains(e.what(), "not downloading")) << e.what();
  }
  EXPECT_FALSE(fs::exists(Path("b.bin.part")));
}

TEST_F(PullTest, HttpErrorsAreNamed) {
  Server server;
  server.Add("/boom", {.status = 500});
  server.Add("/secret", {.status = 403});
  try {
    DownloadFile(server.Url("/missing.bin"), Path("m.bin"), Quiet());
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "not found: " + server.Url("/missing.bin"));
  }
  DownloadOptions o = Quiet();
  o.retries = 1;
  try {
    DownloadFile(server.Url("/boom"), Path("b.bin"), o);
    FAIL();
  } catch (const Error& e) {
    EXPECT_TRUE(Contains(e.what(), "HTTP 500")) << e.what();
  }
  try {
    DownloadFile(server.Url("/secret"), Path("s.bin"), o);
    FAIL();
  } catch (const Error& e) {
    EXPECT_TRUE(Contains(e.what(), "HTTP 403")) << e.what();
  }
  int boom = 0, secret = 0;
  for (const auto& r : server.requests()) boom += r.path == "/boom", secret += r.path == "/secret";
  EXPECT_EQ(boom, 2);    // 5xx is retried
  EXPECT_EQ(secret, 1);  // 403 is not
}

TEST_F(PullTest, FollowsRedirectsAndReadsLinkedHeadersFromThem) {
  Server server;
  const std::string body = RandomBytes(600'000, 11);
  // Like Hugging Face: the resolve URL answers 302 with X-Linked-*, the CDN serves the bytes.
  server.Add("/org/repo/resolve/main/m.pth",
             {.redirect_to = "/cdn/m.pth",
              .headers = {{"X-Linked-Size", std::to_string(body.size())},
                          {"X-Linked-Etag", LinkedEtag(body)}}});
  server.Add("/cdn/m.pth", {.body = body});
  server.Add("/org/repo/resolve/main/bad.pth",
             {.redirect_to = "/cdn/m.pth", .headers = {{"X-Linked-Etag", LinkedEtag("nope")}}});
  const auto r = DownloadFile(server.Url("/org/repo/resolve/main/m.pth"), Path("m.pth"), Quiet());
  EXPECT_EQ(ReadAll(Path("m.pth")), body);
  EXPECT_EQ(r.verified_against, "X-Linked-ETag");
  EXPECT_THROW(DownloadFile(server.Url("/org/repo/resolve/main/bad.pth"), Path("bad.pth"), Quiet()),
               Error);
  EXPECT_FALSE(fs::exists(Path("bad.pth")));
}

TEST_F(PullTest, StalledTransferAbortsWithinTheTimeout) {
  Server server;
  const std::string body = RandomBytes(500'000, 12);
  server.Add("/stall-mid.bin", {.body = body, .stall_after = 100'000});
  server.Add("/stall-start.bin", {.body = body, .stall_after = 0});
  DownloadOptions o = Quiet();
  o.stall_timeout_s = 1;
  for (const char* path : {"/stall-mid.bin", "/stall-start.bin"}) {
    const auto t0 = std::chrono::steady_clock::now();
    try {
      DownloadFile(server.Url(path), Path("s.bin"), o);
      FAIL() << path;
    } catch (const Error& e) {
      EXPECT_TRUE(Contains(e.what(), "stalled")) << e.what();
    }
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_LT(secs, 5.0) << path;
    EXPECT_GE(secs, 0.9) << path;
  }
  EXPECT_EQ(fs::file_size(Path("s.bin.part")), 100'000u);  // kept for resuming
}

TEST_F(PullTest, UnreachableHostIsNamedWithOfflineAdvice) {
  const std::string url = "http://127.0.0.1:" + std::to_string(ClosedPort()) + "/a/b.bin";
  try {
    DownloadFile(url, Path("b.bin"), Quiet());
    FAIL();
  } catch (const Error& e) {
    EXPECT_TRUE(Contains(e.what(), "cannot reach 127.0.0.1")) << e.what();
    EXPECT_TRUE(Contains(e.what(), "--model")) << e.what();
  }
}

// Models come from the Hugging Face endpoint, vocabularies from the raw GitHub one: a failure
// names the variable that moves the host that failed, and only that one.
TEST_F(PullTest, UnreachableHostNamesItsVariable) {
  const std::string closed = "http://127.0.0.1:" + std::to_string(ClosedPort());
  hub::PullOptions p;
  p.hub.cache_dir = Cache();
  p.hub.hf_endpoint = closed;
  p.hub.raw_github_endpoint = closed;
  p.download = Quiet();
  const hub::CatalogEntry entry{"test-tiny", "Test", "test-org/tiny",   "tiny.pth",
                                10,          "",     hub::Vocab::kWorld};
  try {
    hub::PullModel(entry, p);
    FAIL();
  } catch (const Error& e) {
    EXPECT_TRUE(Contains(e.what(), "cannot reach 127.0.0.1")) << e.what();
    EXPECT_TRUE(Contains(e.what(), "AVIARY_HF_ENDPOINT")) << e.what();
    EXPECT_FALSE(Contains(e.what(), "AVIARY_RAW_GITHUB_ENDPOINT")) << e.what();
  }
  try {
    hub::PullTokenizer(hub::TokenizerFor(hub::Vocab::kWorld), p);
    FAIL();
  } catch (const Error& e) {
    EXPECT_TRUE(Contains(e.what(), "cannot reach 127.0.0.1")) << e.what();
    EXPECT_TRUE(Contains(e.what(), "AVIARY_RAW_GITHUB_ENDPOINT")) << e.what();
    EXPECT_FALSE(Contains(e.what(), "AVIARY_HF_ENDPOINT")) << e.what();
  }
}

TEST_F(PullTest, DiskFullIsReported) {
  Server server;
  const uint64_t huge = 1ull << 56;  // 64 PiB: no disk has that free
  server.Add(
      "/huge.bin",
      {.body = "x", .headers = {{"X-Linked-Size", std::to_string(huge)}}, .content_length = huge});
  try {
    DownloadFile(server.Url("/huge.bin"), Path("h.bin"), Quiet());
    FAIL();
  } catch (const Error& e) {
    EXPECT_TRUE(Contains(e.what(), "disk full")) << e.what();
  }
  // A write that fails with ENOSPC: the .part is /dev/full.
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  const std::string body = RandomBytes(200'000, 13);
  server.Add("/f.bin", {.body = body});
  fs::create_symlink("/dev/full", Path("full.bin.part"));
  try {
    DownloadFile(server.Url("/f.bin"), Path("full.bin"), Quiet());
    FAIL();
  } catch (const Error& e) {
    EXPECT_TRUE(Contains(e.what(), "disk full")) << e.what();
  }
  EXPECT_FALSE(fs::exists(Path("full.bin")));
}

TEST_F(PullTest, SecondConcurrentDownloadOfTheSameFileIsRefused) {
  Server server;
  server.Add("/f.bin", {.body = "abc"});
  fs::create_directories(dir_);
  const int fd = ::open(Path("f.bin.part").c_str(), O_RDWR | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
  try {
    DownloadFile(server.Url("/f.bin"), Path("f.bin"), Quiet());
    FAIL();
  } catch (const Error& e) {
    EXPECT_TRUE(Contains(e.what(), "another aviary pull")) << e.what();
  }
  ::close(fd);
  EXPECT_EQ(DownloadFile(server.Url("/f.bin"), Path("f.bin"), Quiet()).size, 3u);
}

TEST_F(PullTest, ProgressLinesAndBar) {
  Server server;
  const std::string body = RandomBytes(1 << 20, 14);
  server.Add("/f.bin", {.body = body, .headers = {{"X-Linked-Size", std::to_string(body.size())}}});
  for (const auto style : {hub::ProgressStyle::kLines, hub::ProgressStyle::kBar}) {
    std::FILE* log = std::tmpfile();
    ASSERT_NE(log, nullptr);
    DownloadOptions o = Quiet();
    o.log = log;
    o.progress = style;
    o.label = "thing";
    fs::remove(Path("f.bin"));
    DownloadFile(server.Url("/f.bin"), Path("f.bin"), o);
    std::rewind(log);
    std::string text;
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, log)) > 0) text.append(buf, n);
    std::fclose(log);
    if (style == hub::ProgressStyle::kLines) {
      // One line per 10% (the exact percent depends on how the bytes arrive).
      const std::regex line("thing: +[0-9]+% \\([0-9.]+ [KM]iB of 1.0 MiB\\)\n");
      EXPECT_EQ(std::distance(std::sregex_iterator(text.begin(), text.end(), line),
                              std::sregex_iterator()),
                10)
          << text;
      EXPECT_TRUE(std::regex_search(text, std::regex("\nthing:  5[0-9]% "))) << text;
      EXPECT_TRUE(Contains(text, "thing: 100% (1.0 MiB of 1.0 MiB)\n")) << text;
      EXPECT_FALSE(Contains(text, "\r")) << text;
    } else {
      EXPECT_TRUE(Contains(text, "\rthing 100.0% [========================]")) << text;
      EXPECT_TRUE(Contains(text, "ETA")) << text;
    }
    EXPECT_TRUE(Contains(text, "thing: done, 1.0 MiB")) << text;
  }
}

// ---------------------------------------------------------------------------------------------
// Catalog, cache layout, --model resolution

TEST_F(PullTest, CatalogIsWellFormed) {
  std::set<std::string> names, files;
  for (const hub::CatalogEntry& e : hub::Catalog()) {
    EXPECT_TRUE(names.insert(std::string(e.name)).second) << e.name;
    EXPECT_TRUE(files.insert(std::string(e.file)).second) << e.file;
    EXPECT_EQ(e.repo.substr(0, 8), "BlinkDL/") << e.name;
    EXPECT_TRUE(e.file.ends_with(".pth")) << e.name;
    EXPECT_NE(e.vocab, hub::Vocab::kNone) << e.name;  // .pth files carry no vocabulary
    EXPECT_TRUE(e.sha256.empty() ||
                std::regex_match(std::string(e.sha256), std::regex("[0-9a-f]{64}")))
        << e.name;
    EXPECT_EQ(hub::FindCatalogEntry(e.name), &e);
    EXPECT_EQ(hub::FindCatalogEntryByFile(e.file), &e);
  }
  for (const char* name :
       {"rwkv7-g1-0.1b", "rwkv7-g1-0.4b", "rwkv7-g1-1.5b", "rwkv7-g1-2.9b", "rwkv7-world-0.1b",
        "rwkv6-world-1.6b", "rwkv6-world-3b", "rwkv6-world-7b", "rwkv5-world-0.4b",
        "rwkv4-world-0.1b", "rwkv4-raven-1.5b", "rwkv4-pile-169m"}) {
    EXPECT_NE(hub::FindCatalogEntry(name), nullptr) << name;
  }
  for (const hub::TokenizerRelease& t : hub::TokenizerReleases()) {
    EXPECT_EQ(&hub::TokenizerFor(t.vocab), &t);
    EXPECT_EQ(hub::FindTokenizerRelease(t.name), &t);
  }
  EXPECT_EQ(hub::TokenizerFor(hub::Vocab::kWorld).file, "rwkv_vocab_v20230424.txt");
  EXPECT_EQ(hub::TokenizerFor(hub::Vocab::kNeox).file, "20B_tokenizer.json");
}

TEST_F(PullTest, DownloadUrlsAndCacheLayout) {
  {
    const HubSettings defaults;
    EXPECT_EQ(
        hub::DownloadUrl(*hub::FindCatalogEntry("rwkv7-g1-0.1b"), defaults),
        "https://huggingface.co/BlinkDL/rwkv7-g1/resolve/main/rwkv7-g1-0.1b-20250307-ctx4096.pth");
    EXPECT_EQ(hub::DownloadUrl(*hub::FindCatalogEntry("rwkv4-raven-1.5b"), defaults),
              "https://huggingface.co/BlinkDL/rwkv-4-raven/resolve/main/"
              "RWKV-4-Raven-1B5-v12-Eng98%25-Other2%25-20230520-ctx4096.pth");
    EXPECT_EQ(hub::DownloadUrl(hub::TokenizerFor(hub::Vocab::kWorld), defaults),
              "https://raw.githubusercontent.com/BlinkDL/ChatRWKV/"
              "02058ba0624a77c20f0913f83550835eb03a8db4/tokenizer/rwkv_vocab_v20230424.txt");
  }
  {
    HubSettings mirror;
    mirror.hf_endpoint = "http://mirror.example//";
    EXPECT_EQ(
        hub::DownloadUrl(*hub::FindCatalogEntry("rwkv7-g1-0.1b"), mirror),
        "http://mirror.example/BlinkDL/rwkv7-g1/resolve/main/rwkv7-g1-0.1b-20250307-ctx4096.pth");
  }
  EXPECT_EQ(hub::CachePath(*hub::FindCatalogEntry("rwkv7-g1-0.1b"), Cache()),
            Cache() + "/BlinkDL/rwkv7-g1/rwkv7-g1-0.1b-20250307-ctx4096.pth");
  EXPECT_EQ(hub::CachePath(hub::TokenizerFor(hub::Vocab::kNeox), Cache()),
            Cache() + "/tokenizers/20B_tokenizer.json");
  EXPECT_EQ(hub::DestinationForUrl(
                "https://huggingface.co/o/r/resolve/main/sub/x%20y.pth?download=true", "", Cache()),
            Cache() + "/o/r/x y.pth");
  EXPECT_EQ(hub::DestinationForUrl("http://127.0.0.1:1/files/model.bin", "", Cache()),
            Cache() + "/downloads/model.bin");
  EXPECT_EQ(hub::DestinationForUrl("http://127.0.0.1:1/o/r/resolve/main/m.bin", Path("d"), Cache()),
            Path("d/m.bin"));
  EXPECT_THROW(hub::DestinationForUrl("http://127.0.0.1:1/", "", Cache()), UsageError);
  EXPECT_THROW(hub::DestinationForUrl("http://127.0.0.1:1/a/..", "", Cache()), UsageError);
  EXPECT_THROW(hub::DestinationForUrl("http://127.0.0.1:1/a%2Fb", "", Cache()), UsageError);
}

TEST_F(PullTest, ResolveModelArgumentFindsCachedCatalogNames) {
  const hub::CatalogEntry& e = *hub::FindCatalogEntry("rwkv7-g1-0.1b");
  // Not downloaded: a clear error naming the command that fixes it.
  try {
    ResolveModelArgument("rwkv7-g1-0.1b", Cache());
    FAIL();
  } catch (const Error& err) {
    EXPECT_TRUE(
        Contains(err.what(), "rwkv7-g1-0.1b: not downloaded yet: run aviary pull rwkv7-g1-0.1b"))
        << err.what();
  }
  // Other names keep the old contract: returned unchanged.
  EXPECT_EQ(ResolveModelArgument("no-such-model", Cache()), "no-such-model");
  // Downloaded: the cached file (sparse, the real size).
  WriteSparse(hub::CachePath(e, Cache()), e.size);
  EXPECT_EQ(ResolveModelArgument("rwkv7-g1-0.1b", Cache()), hub::CachePath(e, Cache()));
  EXPECT_EQ(ResolveModelArgument(std::string(e.file), Cache()),
            hub::CachePath(e, Cache()));  // by file name too
  // A truncated copy is refused with the fix.
  fs::resize_file(hub::CachePath(e, Cache()), 1000);
  try {
    ResolveModelArgument("rwkv7-g1-0.1b", Cache());
    FAIL();
  } catch (const Error& err) {
    EXPECT_TRUE(Contains(err.what(), "has 1000 bytes")) << err.what();
  }
  // A copy elsewhere in the cache counts.
  fs::remove(hub::CachePath(e, Cache()));
  WriteSparse(Cache() + "/elsewhere/" + std::string(e.file), e.size);
  EXPECT_EQ(ResolveModelArgument("rwkv7-g1-0.1b", Cache()),
            Cache() + "/elsewhere/" + std::string(e.file));
}

// A catalog entry served by the test server, with the real World vocabulary from ../shared (its
// size and checksum are the catalog's).
TEST_F(PullTest, PullModelFetchesTheModelAndItsTokenizerIntoTheCache) {
  REQUIRE_SHARED("tokenizers/rwkv_vocab_v20230424.txt");
  const std::string vocab = ReadAll(SharedPath("tokenizers/rwkv_vocab_v20230424.txt"));
  Server server;
  const std::string body = RandomBytes(800'000, 15);
  const std::string sha = Sha256Hex(body);
  server.Add("/test-org/tiny/resolve/main/tiny%25model.pth",
             {.redirect_to = "/cdn/tiny",
              .headers = {{"X-Linked-Size", std::to_string(body.size())},
                          {"X-Linked-Etag", "\"" + sha + "\""}}});
  server.Add("/cdn/tiny", {.body = body});
  server.Add("/" + std::string(hub::TokenizerFor(hub::Vocab::kWorld).path), {.body = vocab});
  ScopedEnv hf("AVIARY_HF_ENDPOINT", server.base());
  ScopedEnv gh("AVIARY_RAW_GITHUB_ENDPOINT", server.base() + "/");
  const hub::CatalogEntry entry{"test-tiny", "Test", "test-org/tiny",   "tiny%model.pth",
                                body.size(), sha,    hub::Vocab::kWorld};
  hub::PullOptions p;
  p.hub = Hub();
  p.download = Quiet();
  const hub::PullResult r = hub::PullModel(entry, p);
  EXPECT_TRUE(r.downloaded);
  EXPECT_EQ(r.path, Cache() + "/test-org/tiny/tiny%model.pth");
  EXPECT_EQ(r.tokenizer_path, Cache() + "/tokenizers/rwkv_vocab_v20230424.txt");
  EXPECT_EQ(ReadAll(r.path), body);
  EXPECT_EQ(ReadAll(r.tokenizer_path), vocab);
  EXPECT_EQ(FindInCache("rwkv_vocab_v20230424.txt", Cache()),
            r.tokenizer_path);  // where TokenizerForModel looks
  const size_t requests = server.requests().size();
  EXPECT_EQ(requests, 3u);
  // Again: nothing to do.
  const hub::PullResult again = hub::PullModel(entry, p);
  EXPECT_FALSE(again.downloaded);
  EXPECT_EQ(again.path, r.path);
  EXPECT_EQ(server.requests().size(), requests);
  // With --dir the tokenizer goes beside the model.
  p.dir = Path("here");
  const hub::PullResult there = hub::PullModel(entry, p);
  EXPECT_EQ(there.path, Path("here/tiny%model.pth"));
  EXPECT_EQ(there.tokenizer_path, Path("here/rwkv_vocab_v20230424.txt"));
  EXPECT_EQ(ReadAll(there.tokenizer_path), vocab);
}

// ---------------------------------------------------------------------------------------------
// The CLI

TEST_F(PullTest, CliListShowsTheCatalogAndWhatIsCached) {
  const hub::CatalogEntry& small = *hub::FindCatalogEntry("rwkv7-g1-0.1b");
  const hub::CatalogEntry& half = *hub::FindCatalogEntry("rwkv7-g1-0.4b");
  WriteSparse(hub::CachePath(small, Cache()), small.size);
  WriteSparse(hub::CachePath(half, Cache()) + ".part", half.size / 2 + 1000);
  const CommandResult r = Cli("pull --list");
  ASSERT_EQ(r.exit_code, 0) << r.output << Stderr();
  EXPECT_TRUE(std::regex_search(r.output, std::regex("^NAME +MODEL +SIZE +VOCAB +CACHED +FILE\n")))
      << r.output;
  for (const hub::CatalogEntry& e : hub::Catalog()) {
    EXPECT_TRUE(Contains(r.output, "\n" + std::string(e.name) + " ")) << e.name;
    EXPECT_TRUE(Contains(r.output, std::string(e.repo) + "/" + std::string(e.file) + "\n"))
        << e.name;
  }
  EXPECT_TRUE(std::regex_search(
      r.output, std::regex("\nrwkv7-g1-0.1b +RWKV-7 G1 0.1B +364.5 MiB +world +yes ")))
      << r.output;
  EXPECT_TRUE(std::regex_search(
      r.output, std::regex("\nrwkv7-g1-0.4b +RWKV-7 G1 0.4B +860.0 MiB +world +partial 50% ")))
      << r.output;
  EXPECT_TRUE(std::regex_search(r.output, std::regex("\nrwkv7-g1-1.5b .* no +BlinkDL/")))
      << r.output;
  EXPECT_TRUE(std::regex_search(
      r.output, std::regex("\nworld-vocab +rwkv_vocab_v20230424.txt +1.0 MiB +world +no ")))
      << r.output;
  EXPECT_TRUE(Contains(r.output, "cache: " + Cache())) << r.output;
}

TEST_F(PullTest, CliPullsAUrlAndPrintsOnlyThePath) {
  Server server;
  const std::string body = RandomBytes(1 << 20, 16);
  server.Add("/org/repo/resolve/main/thing.bin",
             {.redirect_to = "/cdn/thing",
              .headers = {{"X-Linked-Size", std::to_string(body.size())},
                          {"X-Linked-Etag", LinkedEtag(body)}}});
  server.Add("/cdn/thing", {.body = body, .drop_after = 300'000, .drop_times = 1});
  const CommandResult r =
      Cli("pull " + server.Url("/org/repo/resolve/main/thing.bin") + " --retries 2");
  const std::string expected = Cache() + "/org/repo/thing.bin";
  ASSERT_EQ(r.exit_code, 0) << Stderr();
  EXPECT_EQ(r.output, expected + "\n");
  EXPECT_EQ(ReadAll(expected), body);
  const std::string err = Stderr();
  EXPECT_TRUE(Contains(err, "thing.bin: connection lost")) << err;  // then resumed
  EXPECT_TRUE(Contains(err, "thing.bin: 100% (1.0 MiB of 1.0 MiB)")) << err;
  EXPECT_TRUE(Contains(err, "thing.bin: done, 1.0 MiB")) << err;
  EXPECT_TRUE(Contains(err, "cannot tell which tokenizer")) << err;
  // Already there: the same path, no new request.
  const size_t requests = server.requests().size();
  const CommandResult again = Cli("pull --quiet " + server.Url("/org/repo/resolve/main/thing.bin"));
  EXPECT_EQ(again.exit_code, 0);
  EXPECT_EQ(again.output, expected + "\n");
  EXPECT_EQ(Stderr(), "");
  EXPECT_EQ(server.requests().size(), requests);
  // --dir
  const CommandResult dir =
      Cli("pull -q --dir " + Quote(Path("d")) + " " + server.Url("/cdn/thing"));
  EXPECT_EQ(dir.exit_code, 0) << Stderr();
  EXPECT_EQ(dir.output, Path("d/thing") + "\n");
}

TEST_F(PullTest, CliPullsATinyModelThatOtherCommandsFindByName) {
  const char* kModel = "models/tiny-rwkv-5v2-730K-FP32.bin";
  REQUIRE_SHARED(kModel);
  Server server;
  const std::string body = ReadAll(SharedPath(kModel));
  server.Add("/files/tiny-rwkv-5v2-730K-FP32.bin", {.body = body});
  const CommandResult r = Cli("pull -q " + server.Url("/files/tiny-rwkv-5v2-730K-FP32.bin"));
  ASSERT_EQ(r.exit_code, 0) << Stderr();
  EXPECT_EQ(r.output, Cache() + "/downloads/tiny-rwkv-5v2-730K-FP32.bin\n");
  // Other commands find it by its file name.
  const CommandResult info = Cli("info --model tiny-rwkv-5v2-730K-FP32.bin");
  EXPECT_EQ(info.exit_code, 0) << Stderr();
  EXPECT_TRUE(Contains(info.output,
                       "file:         " + Cache() + "/downloads/tiny-rwkv-5v2-730K-FP32.bin\n"))
      << info.output;
  EXPECT_TRUE(Contains(info.output, "RWKV v5.2")) << info.output;
}

TEST_F(PullTest, CliPullsTheWorldVocabularyByName) {
  REQUIRE_SHARED("tokenizers/rwkv_vocab_v20230424.txt");
  Server server;
  const std::string vocab = ReadAll(SharedPath("tokenizers/rwkv_vocab_v20230424.txt"));
  server.Add("/" + std::string(hub::TokenizerFor(hub::Vocab::kWorld).path), {.body = vocab});
  ScopedEnv gh("AVIARY_RAW_GITHUB_ENDPOINT", server.base());
  const CommandResult r = Cli("pull world-vocab");
  ASSERT_EQ(r.exit_code, 0) << Stderr();
  EXPECT_EQ(r.output, Cache() + "/tokenizers/rwkv_vocab_v20230424.txt\n");
  EXPECT_EQ(ReadAll(Cache() + "/tokenizers/rwkv_vocab_v20230424.txt"), vocab);
  // The same bytes with one changed fail the catalog checksum.
  std::string bad = vocab;
  bad[1000] ^= 1;
  server.Add("/" + std::string(hub::TokenizerFor(hub::Vocab::kWorld).path), {.body = bad});
  fs::remove(Cache() + "/tokenizers/rwkv_vocab_v20230424.txt");
  const CommandResult r2 = Cli("pull world-vocab");
  EXPECT_EQ(r2.exit_code, 1);
  EXPECT_TRUE(Contains(Stderr(), "aviary: checksum mismatch: ")) << Stderr();
  EXPECT_FALSE(fs::exists(Cache() + "/tokenizers/rwkv_vocab_v20230424.txt"));
}

TEST_F(PullTest, CliDownloadErrorsExitOne) {
  Server server;
  const std::string body = RandomBytes(300'000, 17);
  server.Add("/etag.bin", {.body = body, .headers = {{"X-Linked-Etag", LinkedEtag("x")}}});

  // Download failures: exit 1, "aviary: <reason>" as the last line.
  const std::string missing = server.Url("/missing.bin");
  CommandResult r = Cli("pull " + missing);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(Stderr(), "aviary: not found: " + missing + "\n");

  r = Cli("pull " + server.Url("/etag.bin"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(Contains(Stderr(), "aviary: checksum mismatch: ")) << Stderr();

  r = Cli("pull http://127.0.0.1:" + std::to_string(ClosedPort()) + "/a/b.bin");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(Contains(Stderr(), "aviary: cannot reach 127.0.0.1")) << Stderr();

  // A catalog name that is not downloaded, given to another command.
  r = Cli("info --model rwkv7-g1-0.1b");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(Contains(Stderr(),
                       "aviary: rwkv7-g1-0.1b: not downloaded yet: run aviary pull rwkv7-g1-0.1b"))
      << Stderr();
}

TEST_F(PullTest, CliStallTimeoutFromOptionAndEnvironment) {
  Server server;
  server.Add("/stall.bin", {.body = RandomBytes(300'000, 18), .stall_after = 1000});
  const auto t0 = std::chrono::steady_clock::now();
  CommandResult r = Cli("pull " + server.Url("/stall.bin") + " --stall-timeout 1 --retries 0");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_TRUE(Contains(Stderr(), "aviary: stalled: ")) << Stderr();
  EXPECT_LT(secs, 6.0);
  {
    ScopedEnv stall("AVIARY_STALL_TIMEOUT", "1");
    r = Cli("pull -q " + server.Url("/stall.bin") + " --retries 0");
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_TRUE(Contains(Stderr(), "for 1 s")) << Stderr();
  }
}

TEST_F(PullTest, CliUsageErrorsExitTwo) {
  CommandResult r;
  for (const char* args :
       {"pull", "pull no-such-model", "pull ftp://127.0.0.1/x.bin", "pull --list rwkv7-g1-0.1b",
        "pull x --retries -1", "pull x --stall-timeout 0", "pull rwkv7-g1"}) {
    r = Cli(args);
    const std::string err = Stderr();
    EXPECT_EQ(r.exit_code, 2) << args << "\n" << err;
    EXPECT_EQ(err.rfind("aviary: ", 0), 0u) << args << "\n" << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << args << "\n" << err;
  }
  EXPECT_TRUE(Contains(Stderr(), "did you mean rwkv7-g1-0.1b")) << Stderr();  // the last one
  {
    ScopedEnv stall("AVIARY_STALL_TIMEOUT", "soon");
    r = Cli("pull http://127.0.0.1:1/x.bin");
    EXPECT_EQ(r.exit_code, 2) << Stderr();
  }
  EXPECT_EQ(Cli("pull --help").exit_code, 0);
}

}  // namespace
}  // namespace aviary::testing
