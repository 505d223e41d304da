// A tiny HTTP/1.1 server on 127.0.0.1 for the download tests, in a thread of the test process.
// It misbehaves on request: drops connections, stalls, lies about sizes and checksums, ignores
// or garbles Range requests, redirects, answers 404/500. One connection at a time, every
// response "Connection: close". It never listens beyond loopback and stops by itself: at
// destruction, or when its lifetime runs out, whichever comes first.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace aviary::testing {

class PullHttpServer {
 public:
  struct Resource {
    std::string body;
    int status = 200;         // 404, 500... (body then is an error page)
    std::string redirect_to;  // non-empty: answer 302 with this Location
    std::vector<std::pair<std::string, std::string>> headers;  // e.g. X-Linked-Size
    bool honour_range = true;                // false: answer 200 with the whole body
    std::optional<size_t> range_start_lie;   // answer a Range request from this byte instead
    std::optional<size_t> content_length;    // send this Content-Length (and that many bytes)
    size_t drop_after = std::string::npos;   // close the connection after this many body bytes...
    int drop_times = 0;                      // ...on this many requests
    size_t stall_after = std::string::npos;  // send this many body bytes, then nothing
  };

  struct Request {
    std::string path;
    std::string range;  // the Range header's value, "" if none
  };

  explicit PullHttpServer(std::chrono::seconds lifetime = std::chrono::seconds(60))
      : deadline_(std::chrono::steady_clock::now() + lifetime) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listen_fd_ < 0) throw std::runtime_error("socket failed");
    int one = 1;
    ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);  // 127.0.0.1 only
    addr.sin_port = 0;
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(listen_fd_, 16) != 0) {
      ::close(listen_fd_);
      throw std::runtime_error("bind/listen on 127.0.0.1 failed");
    }
    socklen_t len = sizeof addr;
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { Serve(); });
  }

  ~PullHttpServer() {
    stop_ = true;
    thread_.join();
    ::close(listen_fd_);
  }

  PullHttpServer(const PullHttpServer&) = delete;
  PullHttpServer& operator=(const PullHttpServer&) = delete;

  void Add(const std::string& path, Resource resource) {
    std::lock_guard<std::mutex> lock(mu_);
    resources_[path] = std::move(resource);
  }

  int port() const { return port_; }
  std::string base() const { return "http://127.0.0.1:" + std::to_string(port_); }
  std::string Url(const std::string& path) const { return base() + path; }

  std::vector<Request> requests() const {
    std::lock_guard<std::mutex> lock(mu_);
    return requests_;
  }

 private:
  bool Expired() const { return stop_ || std::chrono::steady_clock::now() > deadline_; }

  void Serve() {
    while (!Expired()) {
      pollfd p{listen_fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      Handle(fd);
      ::close(fd);
    }
  }

  // Reads the request head (bounded in size and time).
  bool ReadHead(int fd, std::string* head) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    char buf[4096];
    while (head->find("\r\n\r\n") == std::string::npos) {
      if (Expired() || std::chrono::steady_clock::now() > until || head->size() > 65536)
        return false;
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0) return false;
      head->append(buf, static_cast<size_t>(n));
    }
    return true;
  }

  bool Send(int fd, const char* data, size_t n) {
    while (n > 0) {
      if (Expired()) return false;
      pollfd p{fd, POLLOUT, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      const ssize_t w = ::send(fd, data, n, MSG_NOSIGNAL);
      if (w <= 0) return false;
      data += w;
      n -= static_cast<size_t>(w);
    }
    return true;
  }

  // Holds the connection open without sending, until the client gives up or the server stops.
  void Stall(int fd) {
    char buf[256];
    while (!Expired()) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 50) > 0 && ::recv(fd, buf, sizeof buf, 0) <= 0) return;  // client closed
    }
  }

  void Handle(int fd) {
    std::string head;
    if (!ReadHead(fd, &head)) return;
    Request req;
    const size_t sp1 = head.find(' ');
    const size_t sp2 = head.find(' ', sp1 + 1);
    if (sp1 == std::string::npos || sp2 == std::string::npos) return;
    req.path = head.substr(sp1 + 1, sp2 - sp1 - 1);
    for (size_t pos = head.find("\r\n"); pos != std::string::npos && pos + 2 < head.size();) {
      const size_t end = head.find("\r\n", pos + 2);
      const std::string line = head.substr(pos + 2, end - pos - 2);
      if (line.size() > 6 && strncasecmp(line.c_str(), "range:", 6) == 0) {
        req.range = line.substr(line.find_first_not_of(' ', 6));
      }
      pos = end;
    }
    Resource r;
    bool found = false;
    int request_index = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      requests_.push_back(req);
      auto it = resources_.find(req.path);
      if (it != resources_.end()) {
        found = true;
        r = it->second;
        request_index = served_[req.path]++;
      }
    }
    std::string extra;
    for (const auto& [name, value] : r.headers) extra += name + ": " + value + "\r\n";
    if (!found || r.status != 200) {
      const int status = found ? r.status : 404;
      const std::string body = "error " + std::to_string(status) + "\n";
      const std::string resp = "HTTP/1.1 " + std::to_string(status) +
                               " Error\r\nContent-Length: " + std::to_string(body.size()) +
                               "\r\nConnection: close\r\n" + extra + "\r\n" + body;
      Send(fd, resp.data(), resp.size());
      return;
    }
    if (!r.redirect_to.empty()) {
      const std::string resp = "HTTP/1.1 302 Found\r\nLocation: " + r.redirect_to +
                               "\r\nContent-Length: 0\r\nConnection: close\r\n" + extra + "\r\n";
      Send(fd, resp.data(), resp.size());
      return;
    }
    const size_t total = r.body.size();
    size_t start = 0;
    std::string status_line = "HTTP/1.1 200 OK";
    std::string range_header;
    if (!req.range.empty() && r.honour_range && req.range.rfind("bytes=", 0) == 0) {
      const size_t asked = std::stoull(req.range.substr(6));
      if (asked >= total) {
        const std::string resp = "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */" +
                                 std::to_string(total) +
                                 "\r\nContent-Length: 0\r\nConnection: close\r\n" + extra + "\r\n";
        Send(fd, resp.data(), resp.size());
        return;
      }
      start = r.range_start_lie ? *r.range_start_lie : asked;
      status_line = "HTTP/1.1 206 Partial Content";
      range_header = "Content-Range: bytes " + std::to_string(start) + "-" +
                     std::to_string(total - 1) + "/" + std::to_string(total) + "\r\n";
    }
    size_t length = r.content_length ? *r.content_length : total - start;
    const std::string resp_head = status_line + "\r\nContent-Length: " + std::to_string(length) +
                                  "\r\nContent-Type: application/octet-stream\r\n" + range_header +
                                  extra + "Connection: close\r\n\r\n";
    if (!Send(fd, resp_head.data(), resp_head.size())) return;
    size_t send_n = std::min(length, total - start);
    if (request_index < r.drop_times) send_n = std::min(send_n, r.drop_after);
    const bool stall = r.stall_after != std::string::npos;
    if (stall) send_n = std::min(send_n, r.stall_after);
    if (!Send(fd, r.body.data() + start, send_n)) return;
    if (stall) Stall(fd);
    // Dropping: just close with bytes still owed.
  }

  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  const std::chrono::steady_clock::time_point deadline_;
  mutable std::mutex mu_;
  std::map<std::string, Resource> resources_;
  std::map<std::string, int> served_;
  std::vector<Request> requests_;
  std::thread thread_;
};

}  // namespace aviary::testing
