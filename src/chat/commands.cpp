#include "chat/commands.h"

#include <cerrno>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstdio>

#include "aviary/chat.h"

namespace aviary::chat {
namespace {

bool IsSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

// "%g" without trailing zeros, for messages.
std::string Num(float v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));
  return buf;
}

// A plain decimal: digits with an optional point and exponent ("0.5", ".5", "1e-1"). No sign
// (the settings are never negative, and "-0" is no setting), no hex, no "inf" or "nan".
std::optional<float> ParseFloat(const std::string& s) {
  if (s.empty() || !(std::isdigit(static_cast<unsigned char>(s[0])) || s[0] == '.')) {
    return std::nullopt;
  }
  float v = 0;
  const char* end = s.data() + s.size();
  const auto [p, ec] = std::from_chars(s.data(), end, v, std::chars_format::general);
  if (ec != std::errc() || p != end || !std::isfinite(v)) return std::nullopt;
  return v;
}

std::optional<uint64_t> ParseSeed(const std::string& s) {
  if (s.empty() || s.size() > 20) return std::nullopt;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    const uint64_t next = v * 10 + static_cast<uint64_t>(c - '0');
    if (next / 10 != v) return std::nullopt;  // overflow
    v = next;
  }
  return v;
}

}  // namespace

std::string Trim(std::string_view text) {
  size_t b = 0, e = text.size();
  while (b < e && IsSpace(text[b])) ++b;
  while (e > b && IsSpace(text[e - 1])) --e;
  return std::string(text.substr(b, e - b));
}

std::string UnescapeNewlines(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '\\' && i + 1 < text.size() && text[i + 1] == 'n') {
      out += '\n';
      ++i;
    } else {
      out += text[i];
    }
  }
  return out;
}

std::string FoldNewlines(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (c == '\r' && i + 1 < text.size() && text[i + 1] == '\n') continue;  // \r\n -> \n
    if (c == '\n' && !out.empty() && out.back() == '\n') continue;
    out += c;
  }
  return out;
}

ParsedLine ParseLine(std::string_view line, float current_temperature, float current_top_p) {
  ParsedLine p;
  // Split into words, remembering where each starts and ends; settings words are dropped with
  // the whitespace that follows them (or precedes them, at the end of the line).
  std::string rest;
  size_t i = 0;
  const size_t n = line.size();
  std::vector<std::pair<size_t, size_t>> keep;  // [begin, end) spans of `line` kept
  size_t kept_from = 0;
  while (i < n) {
    while (i < n && IsSpace(line[i])) ++i;
    if (i >= n) break;
    const size_t w0 = i;
    while (i < n && !IsSpace(line[i])) ++i;
    const std::string word(line.substr(w0, i - w0));
    const bool is_temp = word.rfind("-temp=", 0) == 0;
    const bool is_top_p = word.rfind("-top_p=", 0) == 0;
    const bool is_seed = word.rfind("-seed=", 0) == 0;
    if (!is_temp && !is_top_p && !is_seed) continue;
    p.had_settings = true;
    const std::string value = word.substr(word.find('=') + 1);
    if (is_temp) {
      const std::optional<float> v = ParseFloat(value);
      if (!v || *v < kMinChatTemperature || *v > kMaxChatTemperature) {
        p.errors.push_back("-temp=" + value + ": temperature must be a number from 0.2 to 5 (now " +
                           Num(current_temperature) + ")");
      } else {
        p.temperature = *v;
      }
    } else if (is_top_p) {
      const std::optional<float> v = ParseFloat(value);
      if (!v || *v < 0.0f || *v > 1.0f) {
        p.errors.push_back("-top_p=" + value + ": top-p must be a number from 0.0 to 1.0 (now " +
                           Num(current_top_p) + ")");
      } else {
        p.top_p = *v;
      }
    } else {
      const std::optional<uint64_t> v = ParseSeed(value);
      if (!v) {
        p.errors.push_back("-seed=" + value + ": the seed must be a whole number from 0 to 2^64-1");
      } else {
        p.seed = *v;
      }
    }
    // Drop the word and the whitespace after it.
    size_t after = i;
    while (after < n && IsSpace(line[after])) ++after;
    keep.push_back({kept_from, w0});
    kept_from = after;
    i = after;
  }
  keep.push_back({kept_from, n});
  for (const auto& [b, e] : keep) rest.append(line.substr(b, e - b));
  const std::string msg = Trim(rest);
  if (msg.empty()) {
    p.command = Command::kEmpty;
    return p;
  }

  // The command word: up to the first whitespace.
  size_t word_end = 0;
  while (word_end < msg.size() && !IsSpace(msg[word_end])) ++word_end;
  const std::string word = Lower(msg.substr(0, word_end));
  const std::string arg = Trim(std::string_view(msg).substr(word_end));
  struct Exact {
    const char* word;
    Command command;
  };
  static constexpr Exact kExact[] = {
      {"+", Command::kRetry},      {"++", Command::kRegenerate}, {"+++", Command::kContinue},
      {"+reset", Command::kReset}, {"+state", Command::kState},  {"+help", Command::kHelp},
      {"+exit", Command::kExit},
  };
  if (arg.empty()) {
    for (const Exact& e : kExact) {
      if (word == e.word) {
        p.command = e.command;
        return p;
      }
    }
  }
  struct WithArg {
    const char* word;
    Command command;
  };
  static constexpr WithArg kWithArg[] = {
      {"+gen", Command::kGen},   {"+i", Command::kInstruct}, {"+qa", Command::kQa},
      {"+save", Command::kSave}, {"+load", Command::kLoad},
  };
  for (const WithArg& w : kWithArg) {
    if (word == w.word) {
      p.command = w.command;
      p.text = arg;
      if (arg.empty()) p.missing_argument = w.word;
      return p;
    }
  }
  p.command = Command::kChat;
  p.text = msg;
  return p;
}

}  // namespace aviary::chat
