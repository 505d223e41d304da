// Byte-level BPE as in Hugging Face tokenizers, for GPT-NeoX 20B (20B_tokenizer.json, the
// tokenizer of RWKV-4 "Pile" and Raven models). Encoding, as HF does it:
//   1. added tokens (<|endoftext|>, <|padding|>, the runs of 2..24 spaces) are cut out of the
//      text first, leftmost-longest, and become their ids;
//   2. the rest is normalized (NFC, with ICU);
//   3. pre-tokenized with the ByteLevel regex
//        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//      (PCRE2, UTF + UCP), where \s is spelled out as [\t-\r\x{85}\p{Z}]: Oniguruma's Unicode \s,
//      which is what HF's Rust tokenizers use (PCRE2's own \s also takes U+180E);
//   4. each piece's bytes are mapped to GPT-2's byte-level characters and merged by rank
//      (lowest rank first, leftmost first among equal ranks).
// Invalid UTF-8 (HF only takes valid strings): each maximal run of bytes that do not form
// well-formed UTF-8 sequences is cut out before normalization and pre-tokenization and
// byte-level-BPE'd on its own as one piece; the valid text on each side is tokenized as if the
// run were not there (it is a boundary for normalization and the regex). Such runs decode back
// exactly, except the 13 bytes GPT-NeoX has no token for (0xc0, 0xc1, 0xf5..0xff: bytes that
// never occur in UTF-8), which become U+FFFD (its three bytes' tokens, merged as BPE does).
// Decoding concatenates each id's exact bytes (added tokens as written).
#include "tokenizers/bpe.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <sys/stat.h>
#include <unordered_map>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <nlohmann/json.hpp>
#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>
#include <unicode/stringpiece.h>

#include "aviary/error.h"
#include "tokenizers/tokenizers.h"
#include "tokenizers/utf8.h"

namespace aviary {
namespace {

struct ByteMaps {
  std::array<uint32_t, 256> to_unicode{};
  std::array<int16_t, 512> to_byte{};  // every mapped code point is below U+0200
  ByteMaps() {
    to_byte.fill(-1);
    const auto printable = [](int b) {
      return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    };
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      to_unicode[b] = printable(b) ? static_cast<uint32_t>(b) : next++;
      to_byte[to_unicode[b]] = static_cast<int16_t>(b);
    }
  }
};

const ByteMaps& Maps() {
  static const ByteMaps maps;
  return maps;
}

// \s as Oniguruma (and so HF tokenizers) defines it for Unicode: U+0009..U+000D, U+0085, Zs, Zl,
// Zp.
#define AVIARY_WS "\\t-\\r\\x{85}\\p{Z}"
constexpr char kPattern[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" AVIARY_WS
                            "\\p{L}\\p{N}]+"
                            "|[" AVIARY_WS "]+(?![^" AVIARY_WS "])|[" AVIARY_WS "]+";
#undef AVIARY_WS

struct Pcre2CodeDeleter {
  void operator()(pcre2_code* c) const { pcre2_code_free(c); }
};
struct Pcre2MatchDataDeleter {
  void operator()(pcre2_match_data* m) const { pcre2_match_data_free(m); }
};

std::unique_ptr<pcre2_code, Pcre2CodeDeleter> CompilePattern() {
  int err = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kPattern), PCRE2_ZERO_TERMINATED,
                    PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &err, &offset, nullptr);
  if (!code) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    throw Error(std::string("cannot compile the pre-tokenizer pattern: ") +
                reinterpret_cast<const char*>(msg));
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // optional: falls back to the interpreter
  return std::unique_ptr<pcre2_code, Pcre2CodeDeleter>(code);
}

// Leftmost-longest matching of the added tokens over bytes (what HF's Aho-Corasick with
// LeftmostLongest does).
class AddedMatcher {
 public:
  void Add(const std::string& bytes, int32_t id) {
    if (bytes.empty()) return;
    uint32_t u = 0;
    for (unsigned char c : bytes) {
      auto it = nodes_[u].next.find(c);
      if (it == nodes_[u].next.end()) {
        const auto v = static_cast<uint32_t>(nodes_.size());
        nodes_[u].next.emplace(c, v);
        nodes_.emplace_back();
        u = v;
      } else {
        u = it->second;
      }
    }
    nodes_[u].id = id;
    first_[static_cast<unsigned char>(bytes[0])] = true;
  }
  bool CanStart(unsigned char c) const { return first_[c]; }
  // Length and id of the longest added token at text[pos]; length 0 if none.
  std::pair<size_t, int32_t> LongestAt(std::string_view text, size_t pos) const {
    size_t best_len = 0;
    int32_t best_id = -1;
    uint32_t u = 0;
    for (size_t j = pos; j < text.size(); ++j) {
      auto it = nodes_[u].next.find(static_cast<unsigned char>(text[j]));
      if (it == nodes_[u].next.end()) break;
      u = it->second;
      if (nodes_[u].id >= 0) best_len = j + 1 - pos, best_id = nodes_[u].id;
    }
    return {best_len, best_id};
  }

 private:
  struct Node {
    int32_t id = -1;
    std::unordered_map<unsigned char, uint32_t> next;
  };
  std::vector<Node> nodes_{1};
  std::array<bool, 256> first_{};
};

constexpr char kReplacement[] = "\xef\xbf\xbd";  // U+FFFD REPLACEMENT CHARACTER

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

class BpeTokenizer final : public Tokenizer {
 public:
  explicit BpeTokenizer(const TokenizerData& data)
      : tokens_(data.tokens), regex_(CompilePattern()) {
    if (tokens_.empty()) throw Error("BPE vocabulary is empty");
    if (tokens_.size() > static_cast<size_t>(INT32_MAX)) throw Error("BPE vocabulary is too large");
    if (data.normalizer == "NFC") {
      UErrorCode status = U_ZERO_ERROR;
      nfc_ = icu::Normalizer2::getNFCInstance(status);
      if (U_FAILURE(status)) {
        throw Error(std::string("cannot load ICU's NFC normalizer: ") + u_errorName(status));
      }
    } else if (!data.normalizer.empty()) {
      throw Error("BPE normalizer '" + data.normalizer + "' is not supported (only NFC or none)");
    }
    std::vector<bool> added(tokens_.size(), false);
    for (int32_t id : data.added_tokens) {
      if (id < 0 || static_cast<size_t>(id) >= tokens_.size()) {
        throw Error("added token id " + std::to_string(id) + " is outside the vocabulary");
      }
      added[id] = true;
      added_.Add(tokens_[id], id);
    }
    // The model's vocabulary by exact bytes (added tokens may share bytes with model tokens:
    // GPT-NeoX's added "  " and the merged "ĠĠ").
    // An added token only stands in where no model token has its bytes (a merge may make a token
    // that is also an added token).
    std::unordered_map<std::string, int32_t> by_bytes;
    by_bytes.reserve(tokens_.size());
    for (int32_t id : data.added_tokens) by_bytes[tokens_[id]] = id;
    for (size_t id = 0; id < tokens_.size(); ++id) {
      if (!added[id] && !tokens_[id].empty()) by_bytes[tokens_[id]] = static_cast<int32_t>(id);
    }
    // GPT-NeoX has no token for the 13 bytes that never occur in UTF-8 (0xc0, 0xc1, 0xf5..0xff);
    // Bpe() writes U+FFFD for them, so the three bytes of U+FFFD must have tokens.
    bool missing = false;
    for (int b = 0; b < 256; ++b) {
      auto it = by_bytes.find(std::string(1, static_cast<char>(b)));
      byte_token_[b] = it == by_bytes.end() ? -1 : it->second;
      missing = missing || byte_token_[b] < 0;
    }
    for (unsigned char b : std::string_view(kReplacement)) {
      if (missing && byte_token_[b] < 0) {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02x", b);
        throw Error(std::string("BPE vocabulary has no token for the byte ") + hex);
      }
    }
    merges_.reserve(data.merges.size() * 2);
    std::string left, right;
    for (size_t rank = 0; rank < data.merges.size(); ++rank) {
      const std::string& m = data.merges[rank];
      const size_t sp = m.find(' ');
      const auto fail = [&](const std::string& problem) {
        throw Error("BPE merge " + std::to_string(rank + 1) + " ('" + m.substr(0, 80) +
                    "'): " + problem);
      };
      if (sp == std::string::npos || m.find(' ', sp + 1) != std::string::npos || sp == 0 ||
          sp + 1 == m.size()) {
        fail("expected two byte-level tokens separated by one space");
      }
      if (!ByteLevelToBytes(std::string_view(m).substr(0, sp), &left) ||
          !ByteLevelToBytes(std::string_view(m).substr(sp + 1), &right)) {
        fail("not byte-level text");
      }
      const auto a = by_bytes.find(left), b = by_bytes.find(right),
                 ab = by_bytes.find(left + right);
      if (a == by_bytes.end() || b == by_bytes.end()) fail("a token that is not in the vocabulary");
      if (ab == by_bytes.end()) fail("the merged token is not in the vocabulary");
      // A repeated pair takes its last rank, as HF's HashMap (and transformers.js's Map) do.
      merges_[PairKey(a->second, b->second)] = {static_cast<int32_t>(rank), ab->second};
    }
  }

  std::string name() const override { return "gpt-neox"; }
  int32_t vocab_size() const override { return static_cast<int32_t>(tokens_.size()); }
  std::optional<int32_t> end_of_text() const override { return 0; }

  std::vector<int32_t> Encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size() / 4 + 1);
    std::unique_ptr<pcre2_match_data, Pcre2MatchDataDeleter> md(
        pcre2_match_data_create_from_pattern(regex_.get(), nullptr));
    if (!md) throw std::bad_alloc();
    Work work{md.get(), {}, {}, {}};
    size_t start = 0, i = 0;
    while (i < text.size()) {
      if (!added_.CanStart(static_cast<unsigned char>(text[i]))) {
        ++i;
        continue;
      }
      const auto [len, id] = added_.LongestAt(text, i);
      if (len == 0) {
        ++i;
        continue;
      }
      EncodeSection(text.substr(start, i - start), work, &ids);
      ids.push_back(id);
      i += len;
      start = i;
    }
    EncodeSection(text.substr(start), work, &ids);
    return ids;
  }

  std::string Decode(std::span<const int32_t> ids) const override {
    return DecodeTokens(tokens_, ids, "GPT-NeoX");
  }

 private:
  struct Symbol {
    int32_t id;
    int32_t prev, next;  // -1: none
  };
  struct Candidate {
    int32_t rank;
    int32_t pos;  // index of the left symbol (its first byte in the piece)
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  // Scratch space reused across the pieces of one Encode call.
  struct Work {
    pcre2_match_data* md;
    std::string normalized;
    std::vector<Symbol> symbols;
    std::vector<Candidate> heap;
  };

  // Text between added tokens: valid UTF-8 runs are normalized and pre-tokenized, invalid
  // runs are one piece each.
  void EncodeSection(std::string_view section, Work& w, std::vector<int32_t>* ids) const {
    size_t p = 0;
    while (p < section.size()) {
      const size_t valid = utf8::ValidPrefix(section.substr(p));
      if (valid > 0) {
        EncodeValid(section.substr(p, valid), w, ids);
        p += valid;
      }
      const size_t invalid = utf8::InvalidPrefix(section.substr(p));
      if (invalid > 0) {
        Bpe(section.substr(p, invalid), w, ids);
        p += invalid;
      }
    }
  }

  void EncodeValid(std::string_view run, Work& w, std::vector<int32_t>* ids) const {
    std::string_view text = run;
    if (nfc_ && NeedsNfc(run)) {
      w.normalized.clear();
      UErrorCode status = U_ZERO_ERROR;
      icu::StringByteSink<std::string> sink(&w.normalized, static_cast<int32_t>(run.size()));
      nfc_->normalizeUTF8(0, icu::StringPiece(run.data(), static_cast<int32_t>(run.size())), sink,
                          nullptr, status);
      if (U_FAILURE(status))
        throw Error(std::string("NFC normalization failed: ") + u_errorName(status));
      text = w.normalized;
    }
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t offset = 0;
    while (offset < text.size()) {
      const int rc = pcre2_match(regex_.get(), subject, text.size(), offset, PCRE2_NO_UTF_CHECK,
                                 w.md, nullptr);
      if (rc < 0) {
        // Cannot happen (the alternatives cover every character); keep the rest as one piece.
        Bpe(text.substr(offset), w, ids);
        return;
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(w.md);
      const size_t s = ov[0], e = ov[1];
      if (s > offset) Bpe(text.substr(offset, s - offset), w, ids);  // cannot happen either
      if (e <= s) {  // an empty match cannot happen; step over one character
        const size_t n = std::max<size_t>(1, utf8::SequenceLength(text.substr(s)));
        Bpe(text.substr(s, n), w, ids);
        offset = s + n;
        continue;
      }
      Bpe(text.substr(s, e - s), w, ids);
      offset = e;
    }
  }

  // NFC leaves text below U+0300 as it is (such characters are starters that never compose
  // with a following one below U+0300), so only text with a lead byte >= 0xcc needs ICU.
  bool NeedsNfc(std::string_view run) const {
    bool high = false;
    for (unsigned char c : run) {
      if (c >= 0xcc) {
        high = true;
        break;
      }
    }
    if (!high) return false;
    UErrorCode status = U_ZERO_ERROR;
    const bool normalized = nfc_->isNormalizedUTF8(
        icu::StringPiece(run.data(), static_cast<int32_t>(run.size())), status);
    return U_FAILURE(status) || !normalized;
  }

  const std::pair<int32_t, int32_t>* FindMerge(int32_t a, int32_t b) const {
    auto it = merges_.find(PairKey(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  }

  void PushCandidate(Work& w, int32_t pos) const {
    const int32_t next = w.symbols[pos].next;
    if (next < 0) return;
    if (const auto* m = FindMerge(w.symbols[pos].id, w.symbols[next].id)) {
      w.heap.push_back({m->first, pos});
      std::push_heap(w.heap.begin(), w.heap.end(), std::greater<Candidate>());
    }
  }

  // Byte-level BPE of one piece: start from the bytes' tokens, apply the lowest-ranked merge
  // (leftmost on ties) until none applies.
  void Bpe(std::string_view piece, Work& w, std::vector<int32_t>* ids) const {
    if (piece.size() == 1 && byte_token_[static_cast<unsigned char>(piece[0])] >= 0) {
      ids->push_back(byte_token_[static_cast<unsigned char>(piece[0])]);
      return;
    }
    auto& sym = w.symbols;
    sym.clear();
    const auto add = [&sym](int32_t id) {
      const auto k = static_cast<int32_t>(sym.size());
      if (k > 0) sym[k - 1].next = k;
      sym.push_back({id, k - 1, -1});
    };
    for (unsigned char c : piece) {
      if (byte_token_[c] >= 0) {
        add(byte_token_[c]);
      } else {  // a byte without a token (only in invalid UTF-8): U+FFFD instead
        for (unsigned char r : std::string_view(kReplacement)) add(byte_token_[r]);
      }
    }
    w.heap.clear();
    for (size_t k = 0; k + 1 < sym.size(); ++k) PushCandidate(w, static_cast<int32_t>(k));
    while (!w.heap.empty()) {
      std::pop_heap(w.heap.begin(), w.heap.end(), std::greater<Candidate>());
      const Candidate c = w.heap.back();
      w.heap.pop_back();
      Symbol& left = sym[c.pos];
      if (left.id < 0 || left.next < 0) continue;  // merged away, or nothing to its right
      const auto* m = FindMerge(left.id, sym[left.next].id);
      if (!m || m->first != c.rank) continue;  // stale: the pair changed since it was queued
      const int32_t right = left.next;
      left.id = m->second;
      left.next = sym[right].next;
      if (left.next >= 0) sym[left.next].prev = c.pos;
      sym[right].id = -1;
      if (left.prev >= 0) PushCandidate(w, left.prev);
      PushCandidate(w, c.pos);
    }
    for (int32_t k = 0; k >= 0; k = sym[k].next) ids->push_back(sym[k].id);
  }

  std::vector<std::string> tokens_;
  std::unique_ptr<pcre2_code, Pcre2CodeDeleter> regex_;
  const icu::Normalizer2* nfc_ = nullptr;
  AddedMatcher added_;
  std::array<int32_t, 256> byte_token_{};
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // pair -> (rank, merged id)
};

using nlohmann::json;

std::string TypeOf(const json& j) {
  if (j.is_object() && j.contains("type") && j["type"].is_string())
    return j["type"].get<std::string>();
  return j.is_null() ? "null" : "?";
}

}  // namespace

uint32_t ByteToUnicode(unsigned char b) { return Maps().to_unicode[b]; }

int UnicodeToByte(uint32_t cp) { return cp < 512 ? Maps().to_byte[cp] : -1; }

bool ByteLevelToBytes(std::string_view s, std::string* out) {
  out->clear();
  size_t i = 0;
  while (i < s.size()) {
    const size_t n = utf8::SequenceLength(s.substr(i));
    if (n == 0) return false;
    const int b = UnicodeToByte(utf8::Decode(s.substr(i), n));
    if (b < 0) return false;
    out->push_back(static_cast<char>(b));
    i += n;
  }
  return true;
}

std::string BytesToByteLevel(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) utf8::Append(ByteToUnicode(c), &out);
  return out;
}

std::string NormalizeNfc(std::string_view utf8) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(status);
  std::string out;
  if (U_SUCCESS(status)) {
    icu::StringByteSink<std::string> sink(&out, static_cast<int32_t>(utf8.size()));
    nfc->normalizeUTF8(0, icu::StringPiece(utf8.data(), static_cast<int32_t>(utf8.size())), sink,
                       nullptr, status);
  }
  if (U_FAILURE(status))
    throw Error(std::string("NFC normalization failed: ") + u_errorName(status));
  return out;
}

namespace {

TokenizerData ParseTokenizerJsonUnchecked(std::string_view text, const std::string& name) {
  const auto fail = [&](const std::string& problem) -> void { throw Error(name + ": " + problem); };
  json j;
  try {
    j = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    throw Error(name + ": not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object()) fail("not a tokenizer.json (expected a JSON object)");
  if (!j.contains("model") || !j["model"].is_object())
    fail("no \"model\" object (not a tokenizer.json?)");
  const json& model = j["model"];
  if (model.contains("type") && model["type"] != "BPE") {
    fail("model type " + model["type"].dump() + " is not supported (only byte-level BPE)");
  }
  if (!model.contains("vocab") || !model["vocab"].is_object())
    fail("the model has no \"vocab\" object");
  if (!model.contains("merges") || !model["merges"].is_array())
    fail("the model has no \"merges\" list");
  for (const char* key : {"dropout", "continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(key) && !model[key].is_null() && model[key] != "") {
      fail(std::string("BPE option \"") + key + "\" is not supported");
    }
  }
  for (const char* key : {"byte_fallback", "ignore_merges"}) {
    if (model.contains(key) && model[key] != false)
      fail(std::string("BPE option \"") + key + "\" is not supported");
  }

  TokenizerData data;
  data.kind = "gpt2-bpe";
  const json normalizer = j.value("normalizer", json());
  if (TypeOf(normalizer) == "NFC") {
    data.normalizer = "NFC";
  } else if (!normalizer.is_null()) {
    fail("normalizer " + TypeOf(normalizer) + " is not supported (only NFC or none)");
  }
  const json pre = j.value("pre_tokenizer", json());
  if (TypeOf(pre) != "ByteLevel") {
    fail("pre-tokenizer " + TypeOf(pre) + " is not supported (only ByteLevel)");
  }
  for (const char* key : {"add_prefix_space", "use_regex", "trim_offsets"}) {
    if (pre.contains(key) && !pre[key].is_boolean()) {
      fail(std::string("ByteLevel \"") + key + "\" is " + pre[key].dump().substr(0, 40) +
           ", not true or false");
    }
  }
  if (pre.value("add_prefix_space", true) != false)
    fail("ByteLevel add_prefix_space is not supported");
  if (pre.value("use_regex", true) != true) fail("ByteLevel use_regex=false is not supported");
  const json decoder = j.value("decoder", json());
  if (!decoder.is_null() && TypeOf(decoder) != "ByteLevel") {
    fail("decoder " + TypeOf(decoder) + " is not supported (only ByteLevel)");
  }

  constexpr int64_t kMaxId = 1 << 21;  // 2M ids: far above any real vocabulary
  const auto check_id = [&](const json& v, const std::string& what) -> int32_t {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= kMaxId) {
      fail(what + ": bad id " + v.dump());
    }
    return static_cast<int32_t>(v.get<int64_t>());
  };
  std::vector<std::pair<int32_t, std::string>> entries;  // id -> bytes
  std::vector<bool> is_added;
  entries.reserve(model["vocab"].size());
  std::unordered_map<std::string, int32_t> vocab;  // byte-level string -> id
  vocab.reserve(model["vocab"].size());
  std::string bytes;
  for (const auto& [key, value] : model["vocab"].items()) {
    const int32_t id = check_id(value, "vocab entry " + json(key).dump());
    // As HF's ByteLevel decoder: a string that is not byte-level text stands for its own UTF-8.
    if (!ByteLevelToBytes(key, &bytes)) bytes = key;
    entries.emplace_back(id, bytes);
    vocab.emplace(key, id);
  }
  std::vector<std::pair<int32_t, std::string>> added;
  if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
    if (!j["added_tokens"].is_array()) fail("\"added_tokens\" is not a list");
    for (const json& t : j["added_tokens"]) {
      if (!t.is_object() || !t.contains("content") || !t["content"].is_string() ||
          !t.contains("id")) {
        fail("an added token without \"id\" and \"content\"");
      }
      const std::string content = t["content"].get<std::string>();
      const int32_t id = check_id(t["id"], "added token " + json(content).dump());
      if (content.empty()) fail("added token " + std::to_string(id) + " is empty");
      for (const char* key : {"lstrip", "rstrip", "single_word"}) {
        if (t.value(key, false) != false) {
          fail("added token " + json(content).dump() + ": \"" + key + "\" is not supported");
        }
      }
      added.emplace_back(id, content);
    }
  }
  int32_t max_id = -1;
  for (const auto& e : entries) max_id = std::max(max_id, e.first);
  for (const auto& e : added) max_id = std::max(max_id, e.first);
  if (max_id < 0) fail("the vocabulary is empty");
  data.tokens.assign(static_cast<size_t>(max_id) + 1, std::string());
  std::vector<bool> used(data.tokens.size(), false);
  for (const auto& [id, b] : entries) {
    if (used[id]) fail("vocab id " + std::to_string(id) + " is used twice");
    used[id] = true;
    data.tokens[id] = b;
  }
  std::vector<bool> added_seen(data.tokens.size(), false);
  for (const auto& [id, content] : added) {
    if (added_seen[id]) fail("added token id " + std::to_string(id) + " is used twice");
    added_seen[id] = true;
    data.tokens[id] = content;  // an added token decodes to its content as written
    data.added_tokens.push_back(id);
  }

  data.merges.reserve(model["merges"].size());
  size_t index = 0;
  for (const json& m : model["merges"]) {
    ++index;
    std::string a, b;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
        fail("merge " + std::to_string(index) + " " + m.dump() +
             " is not two tokens separated by one space");
      }
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      fail("merge " + std::to_string(index) + " " + m.dump().substr(0, 80) + " is malformed");
    }
    if (a.empty() || b.empty() || a.find(' ') != std::string::npos ||
        b.find(' ') != std::string::npos) {
      fail("merge " + std::to_string(index) + " " + m.dump().substr(0, 80) + " is malformed");
    }
    if (!vocab.count(a) || !vocab.count(b) || !vocab.count(a + b)) {
      fail("merge " + std::to_string(index) + " " + m.dump().substr(0, 80) +
           " uses or makes a token that is not in the vocabulary");
    }
    data.merges.push_back(a + " " + b);
  }
  return data;
}

}  // namespace

TokenizerData ParseTokenizerJson(std::string_view text, const std::string& name) {
  // The checks above name each problem they expect; any other mistyped field that nlohmann's
  // accessors trip over still becomes an error naming the file, never an escaped exception.
  try {
    return ParseTokenizerJsonUnchecked(text, name);
  } catch (const json::exception& e) {
    throw Error(name + ": malformed tokenizer.json (" + e.what() + ")");
  }
}

TokenizerData ReadTokenizerJson(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) throw Error(path + ": is a directory");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open the tokenizer file");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw Error(path + ": read error");
  return ParseTokenizerJson(text, path);
}

std::unique_ptr<Tokenizer> MakeBpeTokenizer(const TokenizerData& data) {
  return std::make_unique<BpeTokenizer>(data);
}

}  // namespace aviary
