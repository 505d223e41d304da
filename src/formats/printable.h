// A name read from an untrusted file, made safe to put in an error message: printable ASCII
// kept, other bytes as \xNN, cut at `limit` bytes with "..." after.
#pragma once

#include <cstdio>
#include <string>
#include <string_view>

namespace aviary {

inline std::string Printable(std::string_view s, size_t limit) {
  std::string out;
  for (unsigned char c : s.substr(0, limit)) {
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  if (s.size() > limit) out += "...";
  return out;
}

}  // namespace aviary
