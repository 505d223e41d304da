// The World tokenizer of RWKV (Eagle, Finch, Goose "World" models): a vocabulary of byte strings
// and greedy longest-match encoding over bytes, exactly as TRIE_TOKENIZER in BlinkDL's
// rwkv_tokenizer.py: from each position take the longest token that matches the bytes there
// (the highest id when two ids have the same bytes), then go on after it. Any byte sequence
// encodes (every single byte is a token) and decodes back to the same bytes. Id 0 is
// end-of-text; it has no bytes and decodes to nothing, as in the official code.
#include "tokenizers/world.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>
#include <sys/stat.h>

#include "aviary/error.h"
#include "tokenizers/tokenizers.h"
#include "tokenizers/utf8.h"

namespace aviary {
namespace {

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Reads exactly `digits` hex digits at body[*i]; advances *i.
bool ReadHex(std::string_view body, size_t* i, int digits, uint32_t* value) {
  if (*i + digits > body.size()) return false;
  uint32_t v = 0;
  for (int k = 0; k < digits; ++k) {
    const int h = HexValue(body[*i + k]);
    if (h < 0) return false;
    v = v * 16 + static_cast<uint32_t>(h);
  }
  *i += digits;
  *value = v;
  return true;
}

// A trie over bytes as a double array: the child of node `s` for byte `c` is node
// t = base[s] + c when check[t] == s. One addition and one cache line per byte.
class ByteTrie {
 public:
  static constexpr int32_t kNone = -1;

  // `tokens[id]` are the byte strings; empty ones are skipped. A later id replaces an earlier
  // one with the same bytes (the official token2idx dict does the same).
  explicit ByteTrie(const std::vector<std::string>& tokens) {
    struct BuildNode {
      int32_t token = -1;
      std::vector<std::pair<uint8_t, uint32_t>> children;  // sorted by byte after the build
    };
    std::vector<BuildNode> build(1);
    for (size_t id = 0; id < tokens.size(); ++id) {
      if (tokens[id].empty()) continue;
      uint32_t u = 0;
      for (unsigned char c : tokens[id]) {
        auto& ch = build[u].children;
        auto it = std::find_if(ch.begin(), ch.end(), [c](const auto& e) { return e.first == c; });
        if (it == ch.end()) {
          const auto v = static_cast<uint32_t>(build.size());
          build[u].children.emplace_back(c, v);
          build.emplace_back();
          u = v;
        } else {
          u = it->second;
        }
      }
      build[u].token = static_cast<int32_t>(id);
    }
    // Place the nodes breadth-first; each node's children go at the first base where all their
    // slots are free.
    Grow(256 + 1);
    std::vector<int32_t> position(build.size(), -1);
    position[0] = 0;
    slots_[0].check = 0;  // the root owns slot 0
    std::vector<uint32_t> queue{0};
    int32_t first_free = 1;
    for (size_t q = 0; q < queue.size(); ++q) {
      const uint32_t u = queue[q];
      const int32_t s = position[u];
      slots_[s].token = build[u].token;
      auto& ch = build[u].children;
      if (ch.empty()) continue;
      std::sort(ch.begin(), ch.end());
      while (first_free < static_cast<int32_t>(slots_.size()) &&
             slots_[first_free].check != kNone) {
        ++first_free;
      }
      int32_t b = std::max<int32_t>(1, first_free - ch.front().first);
      for (;; ++b) {
        Grow(static_cast<size_t>(b) + 256);
        bool fits = true;
        for (const auto& [c, v] : ch) {
          if (slots_[b + c].check != kNone) {
            fits = false;
            break;
          }
        }
        if (fits) break;
      }
      slots_[s].base = b;
      for (const auto& [c, v] : ch) {
        slots_[b + c].check = s;
        position[v] = b + c;
        queue.push_back(v);
      }
    }
  }

  // The child of node `s` for byte `c`, or kNone.
  int32_t Child(int32_t s, unsigned char c) const {
    const int32_t t = slots_[s].base + c;
    return slots_[t].check == s ? t : kNone;
  }
  int32_t Token(int32_t s) const { return slots_[s].token; }

 private:
  void Grow(size_t size) {
    if (size > slots_.size()) slots_.resize(std::max(size, slots_.size() * 3 / 2));
  }

  // A node without children keeps base 0: its "children" land on slots 0..255, whose check
  // is never that node (slot 0 is the root's; the others belong to the root's children).
  struct Slot {
    int32_t base = 0;
    int32_t check = kNone;  // the parent node, kNone: a free slot
    int32_t token = -1;     // the token id ending here, -1: none
  };
  std::vector<Slot> slots_;
};

class WorldTokenizer final : public Tokenizer {
 public:
  explicit WorldTokenizer(std::vector<std::string> tokens)
      : tokens_(std::move(tokens)), trie_(tokens_) {
    for (int c = 0; c < 256; ++c) {
      const int32_t u = trie_.Child(0, static_cast<unsigned char>(c));
      if (u == ByteTrie::kNone || trie_.Token(u) < 0) {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02x", c);
        throw Error(std::string("World vocabulary has no token for the single byte ") + hex +
                    " (every byte needs one)");
      }
    }
  }

  std::string name() const override { return "world"; }
  int32_t vocab_size() const override { return static_cast<int32_t>(tokens_.size()); }
  std::optional<int32_t> end_of_text() const override { return 0; }

  std::vector<int32_t> Encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size() / 3 + 1);
    const auto* s = reinterpret_cast<const unsigned char*>(text.data());
    const size_t n = text.size();
    size_t i = 0;
    while (i < n) {
      // Every single byte is a token (checked at construction), so the match is never empty.
      int32_t u = trie_.Child(0, s[i]);
      int32_t best = trie_.Token(u);
      size_t j = i + 1, best_end = j;
      while (j < n) {
        u = trie_.Child(u, s[j]);
        if (u == ByteTrie::kNone) break;
        ++j;
        const int32_t t = trie_.Token(u);
        if (t >= 0) best = t, best_end = j;
      }
      ids.push_back(best);
      i = best_end;
    }
    return ids;
  }

  std::string Decode(std::span<const int32_t> ids) const override {
    return DecodeTokens(tokens_, ids, "World");
  }

 private:
  std::vector<std::string> tokens_;
  ByteTrie trie_;
};

bool AllDigits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

}  // namespace

bool ParsePythonLiteral(std::string_view literal, std::string* out, std::string* error) {
  out->clear();
  bool is_bytes = false;
  std::string_view s = literal;
  if (!s.empty() && (s[0] == 'b' || s[0] == 'B')) {
    is_bytes = true;
    s.remove_prefix(1);
  }
  if (s.empty() || (s[0] != '\'' && s[0] != '"')) {
    *error = "expected a quoted string ('...', \"...\") or bytes (b'...')";
    return false;
  }
  const char quote = s[0];
  if (s.size() < 2 || s.back() != quote) {
    *error = "the literal does not end with its quote";
    return false;
  }
  if (s.size() >= 6 && s[1] == quote && s[2] == quote) {
    *error = "triple-quoted literals are not supported";
    return false;
  }
  const std::string_view body = s.substr(1, s.size() - 2);
  size_t i = 0;
  while (i < body.size()) {
    const char c = body[i];
    if (c == quote) {
      *error = "unescaped quote inside the literal";
      return false;
    }
    if (c != '\\') {
      if (is_bytes && static_cast<unsigned char>(c) >= 0x80) {
        *error = "bytes literals can only contain ASCII characters";
        return false;
      }
      out->push_back(c);
      ++i;
      continue;
    }
    if (i + 1 >= body.size()) {
      *error = "the literal ends with a backslash";
      return false;
    }
    const char e = body[i + 1];
    i += 2;
    uint32_t v = 0;
    switch (e) {
      case '\\': out->push_back('\\'); break;
      case '\'': out->push_back('\''); break;
      case '"': out->push_back('"'); break;
      case 'a': out->push_back('\a'); break;
      case 'b': out->push_back('\b'); break;
      case 'f': out->push_back('\f'); break;
      case 'n': out->push_back('\n'); break;
      case 'r': out->push_back('\r'); break;
      case 't': out->push_back('\t'); break;
      case 'v': out->push_back('\v'); break;
      case '0':
      case '1':
      case '2':
      case '3':
      case '4':
      case '5':
      case '6':
      case '7': {
        v = static_cast<uint32_t>(e - '0');
        for (int k = 0; k < 2 && i < body.size() && body[i] >= '0' && body[i] <= '7'; ++k, ++i) {
          v = v * 8 + static_cast<uint32_t>(body[i] - '0');
        }
        if (is_bytes) {
          if (v > 0xff) {
            *error = "octal escape above \\377 in a bytes literal";
            return false;
          }
          out->push_back(static_cast<char>(v));
        } else {
          utf8::Append(v, out);
        }
        break;
      }
      case 'x':
        if (!ReadHex(body, &i, 2, &v)) {
          *error = "\\x must be followed by two hex digits";
          return false;
        }
        // In a str literal \xhh is the code point U+00hh (two UTF-8 bytes from 0x80 on).
        if (is_bytes) {
          out->push_back(static_cast<char>(v));
        } else {
          utf8::Append(v, out);
        }
        break;
      case 'u':
      case 'U':
      case 'N':
        if (is_bytes) {  // not escapes in bytes literals: kept as written
          out->push_back('\\');
          out->push_back(e);
          break;
        }
        if (e == 'N') {
          *error = "\\N{...} escapes are not supported";
          return false;
        }
        if (!ReadHex(body, &i, e == 'u' ? 4 : 8, &v)) {
          *error = std::string("\\") + e + " must be followed by " + (e == 'u' ? "4" : "8") +
                   " hex digits";
          return false;
        }
        if (v > 0x10ffff) {
          *error = "code point above U+10FFFF";
          return false;
        }
        if (v >= 0xd800 && v <= 0xdfff) {
          *error = "a surrogate code point has no UTF-8 form";
          return false;
        }
        utf8::Append(v, out);
        break;
      default:  // Python keeps an unknown escape as written
        out->push_back('\\');
        out->push_back(e);
        break;
    }
  }
  return true;
}

TokenizerData ParseWorldVocab(std::string_view text, const std::string& name) {
  if (text.empty()) throw Error(name + ": empty vocabulary file");
  TokenizerData data;
  data.kind = "world";
  data.tokens.emplace_back();  // id 0: end-of-text, no bytes
  size_t pos = 0;
  int line_no = 0;
  std::string bytes, error;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    const auto fail = [&](const std::string& problem) {
      throw Error(name + ":" + std::to_string(line_no) + ": " + problem);
    };
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.find('\r') != std::string_view::npos) fail("stray carriage return in the line");
    if (!utf8::IsValid(line)) fail("not UTF-8 text");
    if (line.empty()) fail("empty line (expected '<id> <literal> <byte length>')");
    const size_t sp1 = line.find(' ');
    const size_t sp2 = line.rfind(' ');
    if (sp1 == std::string_view::npos || sp2 == sp1) {
      fail("expected '<id> <literal> <byte length>'");
    }
    const std::string_view id_text = line.substr(0, sp1);
    const std::string_view len_text = line.substr(sp2 + 1);
    if (!AllDigits(id_text) || id_text.size() > 9) {
      fail("bad token id '" + std::string(id_text.substr(0, 20)) + "'");
    }
    if (!AllDigits(len_text) || len_text.size() > 9) {
      fail("bad byte length '" + std::string(len_text.substr(0, 20)) + "'");
    }
    const long id = std::stol(std::string(id_text));
    const long declared = std::stol(std::string(len_text));
    const long expected = static_cast<long>(data.tokens.size());
    if (id == expected - 1 && id > 0) fail("duplicate id " + std::to_string(id));
    if (id != expected) {
      fail("id " + std::to_string(id) + " out of order (expected " + std::to_string(expected) +
           "; ids must be 1, 2, 3, ...)");
    }
    std::string_view literal = line.substr(sp1 + 1, sp2 - sp1 - 1);
    while (!literal.empty() && (literal.front() == ' ' || literal.front() == '\t')) {
      literal.remove_prefix(1);
    }
    while (!literal.empty() && (literal.back() == ' ' || literal.back() == '\t')) {
      literal.remove_suffix(1);
    }
    if (!ParsePythonLiteral(literal, &bytes, &error)) fail("bad literal: " + error);
    if (bytes.empty()) fail("empty token");
    if (static_cast<long>(bytes.size()) != declared) {
      fail("token is " + std::to_string(bytes.size()) + " bytes but the line says " +
           std::to_string(declared));
    }
    data.tokens.push_back(bytes);
  }
  return data;
}

TokenizerData ReadWorldVocab(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) throw Error(path + ": is a directory");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open the vocabulary file");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw Error(path + ": read error");
  return ParseWorldVocab(text, path);
}

std::unique_ptr<Tokenizer> MakeWorldTokenizer(const TokenizerData& data) {
  if (data.tokens.empty()) throw Error("World vocabulary is empty");
  if (data.tokens.size() > static_cast<size_t>(INT32_MAX))
    throw Error("World vocabulary is too large");
  return std::make_unique<WorldTokenizer>(data.tokens);
}

}  // namespace aviary
