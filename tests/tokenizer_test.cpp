// The World and GPT-NeoX tokenizers: ids equal to the official implementations' on the corpus
// in tests/data (see tests/data/README.md), exact round trips for any bytes, the vocabulary
// readers' errors, Utf8Stream, the tokenize/detokenize commands and the tokenizer choice.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>

#include "aviary/error.h"
#include "aviary/model.h"
#include "aviary/tokenizer.h"
#include "test_data.h"
#include "tokenizers/bpe.h"
#include "tokenizers/tokenizers.h"
#include "tokenizers/utf8.h"
#include "tokenizers/world.h"

namespace aviary::testing {
namespace {

namespace fs = std::filesystem;

const char* kWorldVocab = "tokenizers/rwkv_vocab_v20230424.txt";
const char* kNeoxJson = "tokenizers/20B_tokenizer.json";
const char* kTinyModel = "models/tiny-rwkv-5v2-730K-FP32.bin";

fs::path DataDir() { return fs::path(__FILE__).parent_path() / "data"; }

std::string ReadBytes(const fs::path& path) {
  const std::vector<uint8_t> b = ReadFileBytes(path.string());
  return std::string(b.begin(), b.end());
}

void WriteBytes(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

// A fresh folder of this test's own (ctest runs tests in parallel).
fs::path TestDir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const fs::path dir = fs::path(::testing::TempDir()) /
                       (std::string("aviary_tok_") + info->test_suite_name() + "_" + info->name());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// Corpus file name -> bytes.
std::map<std::string, std::string> Corpus() {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::directory_iterator(DataDir() / "tokenizer_corpus")) {
    files[e.path().filename().string()] = ReadBytes(e.path());
  }
  return files;
}

// tokenizer_expected_*.txt: "<file>\t<ids>" lines; '#' starts a comment line.
std::map<std::string, std::vector<int32_t>> Expected(const std::string& file) {
  std::map<std::string, std::vector<int32_t>> expected;
  std::ifstream in(DataDir() / file);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    const size_t tab = line.find('\t');
    std::istringstream ids(line.substr(tab + 1));
    std::vector<int32_t>& v = expected[line.substr(0, tab)];
    for (int32_t id; ids >> id;) v.push_back(id);
  }
  return expected;
}

const Tokenizer& World() {
  static const std::unique_ptr<Tokenizer> t = LoadTokenizer(SharedPath(kWorldVocab));
  return *t;
}

const Tokenizer& Neox() {
  static const std::unique_ptr<Tokenizer> t = LoadTokenizer(SharedPath(kNeoxJson));
  return *t;
}

std::string Decode(const Tokenizer& t, const std::vector<int32_t>& ids) { return t.Decode(ids); }

// What GPT-NeoX gives back for `bytes`: valid UTF-8 runs in NFC, and in the invalid runs the
// same bytes except the 13 it has no token for (0xc0, 0xc1, 0xf5..0xff, which never occur in
// UTF-8): each becomes U+FFFD.
std::string NeoxBack(std::string_view bytes) {
  std::string out;
  while (!bytes.empty()) {
    const size_t valid = utf8::ValidPrefix(bytes);
    out += NormalizeNfc(bytes.substr(0, valid));
    bytes.remove_prefix(valid);
    const size_t invalid = utf8::InvalidPrefix(bytes);
    for (unsigned char c : bytes.substr(0, invalid)) {
      if (c == 0xc0 || c == 0xc1 || c >= 0xf5) {
        out += "\xef\xbf\xbd";
      } else {
        out.push_back(static_cast<char>(c));
      }
    }
    bytes.remove_prefix(invalid);
  }
  return out;
}

// Index of the first difference, for a readable failure.
::testing::AssertionResult SameIds(const std::vector<int32_t>& got,
                                   const std::vector<int32_t>& want) {
  if (got == want) return ::testing::AssertionSuccess();
  size_t i = 0;
  while (i < got.size() && i < want.size() && got[i] == want[i]) ++i;
  auto show = [&](const std::vector<int32_t>& v) {
    std::string s;
    for (size_t k = i; k < v.size() && k < i + 8; ++k) s += std::to_string(v[k]) + " ";
    return s;
  };
  return ::testing::AssertionFailure()
         << got.size() << " ids, expected " << want.size() << "; first difference at " << i
         << ": got [" << show(got) << "] expected [" << show(want) << "]";
}

void ExpectMatchesReference(const Tokenizer& t, const std::string& expected_file,
                            size_t min_cases) {
  const auto corpus = Corpus();
  const auto expected = Expected(expected_file);
  ASSERT_GE(expected.size(), min_cases);
  for (const auto& [name, ids] : expected) {
    ASSERT_TRUE(corpus.count(name)) << "corpus file missing: " << name;
    EXPECT_TRUE(SameIds(t.Encode(corpus.at(name)), ids)) << name;
  }
}

// ---------------------------------------------------------------------------------------------
// Ids equal the official implementations'.

TEST(WorldTokenizer, MatchesOfficialOnCorpus) {
  REQUIRE_SHARED(kWorldVocab);
  ExpectMatchesReference(World(), "tokenizer_expected_world.txt", 24);  // every corpus file
  EXPECT_EQ(Expected("tokenizer_expected_world.txt").size(), Corpus().size());
}

TEST(NeoxTokenizer, MatchesReferenceOnCorpus) {
  REQUIRE_SHARED(kNeoxJson);
  ExpectMatchesReference(Neox(), "tokenizer_expected_neox.txt", 20);  // the valid UTF-8 ones
}

TEST(WorldTokenizer, Basics) {
  REQUIRE_SHARED(kWorldVocab);
  const Tokenizer& t = World();
  EXPECT_EQ(t.name(), "world");
  EXPECT_EQ(t.vocab_size(), 65530);  // ids 0..65529 (the model's 65536 rows include padding)
  EXPECT_EQ(t.end_of_text(), 0);
  EXPECT_EQ(t.Encode(""), std::vector<int32_t>{});
  EXPECT_EQ(t.Encode("\n\n"), std::vector<int32_t>{261});
  EXPECT_EQ(t.Decode(std::vector<int32_t>{0}), "");  // end-of-text has no bytes
  EXPECT_EQ(Decode(t, {0, 33, 0, 34}), " !");
  // The World tokenizer knows no special strings: "<|endoftext|>" is text.
  EXPECT_EQ(t.Decode(t.Encode("<|endoftext|>")), "<|endoftext|>");
  EXPECT_NE(t.Encode("<|endoftext|>"), std::vector<int32_t>{0});
  EXPECT_THROW(Decode(t, {65530}), Error);
  EXPECT_THROW(Decode(t, {-1}), Error);
  EXPECT_THROW(Decode(t, {1, 2, 1 << 30}), Error);
}

TEST(NeoxTokenizer, Basics) {
  REQUIRE_SHARED(kNeoxJson);
  const Tokenizer& t = Neox();
  EXPECT_EQ(t.name(), "gpt-neox");
  EXPECT_EQ(t.vocab_size(), 50277);
  EXPECT_EQ(t.end_of_text(), 0);
  EXPECT_EQ(t.Encode(""), std::vector<int32_t>{});
  EXPECT_EQ(t.Encode("<|endoftext|>"), std::vector<int32_t>{0});
  EXPECT_EQ(t.Encode("Hello world"), (std::vector<int32_t>{12092, 1533}));
  EXPECT_EQ(t.Encode("a   b"), (std::vector<int32_t>{66, 50275, 67}));  // added token "   "
  EXPECT_EQ(Decode(t, {0}), "<|endoftext|>");
  EXPECT_EQ(Decode(t, {50276}), "  ");
  EXPECT_EQ(Decode(t, {12092, 1533}), "Hello world");
  EXPECT_THROW(Decode(t, {50277}), Error);
  EXPECT_THROW(Decode(t, {-5}), Error);
}

// NFC: decomposed input encodes as the precomposed text does.
TEST(NeoxTokenizer, NormalizesToNfc) {
  REQUIRE_SHARED(kNeoxJson);
  const Tokenizer& t = Neox();
  EXPECT_EQ(t.Encode("cafe\xcc\x81"), t.Encode("caf\xc3\xa9"));               // e + U+0301 -> é
  EXPECT_EQ(t.Encode("\xe2\x84\xab"), t.Encode("\xc3\x85"));                  // Angstrom sign -> Å
  EXPECT_EQ(t.Encode("\xe1\x84\x80\xe1\x85\xa1"), t.Encode("\xea\xb0\x80"));  // jamo -> 가
  // So such text does not round-trip byte for byte: it comes back normalized.
  EXPECT_EQ(t.Decode(t.Encode("cafe\xcc\x81")), "caf\xc3\xa9");
}

// \s is Oniguruma's Unicode \s (HF tokenizers): U+0085 is whitespace, U+FEFF and U+180E are not.
// (transformers.js uses JavaScript's \s, which has U+FEFF and not U+0085; see
// tests/data/README.md.)
TEST(NeoxTokenizer, WhitespaceIsOnigurumas) {
  REQUIRE_SHARED(kNeoxJson);
  const Tokenizer& t = Neox();
  const auto concat = [](std::vector<int32_t> a, const std::vector<int32_t>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  // BOM is not whitespace: " \ufeff\ufeff" is one " ?[^\s\p{L}\p{N}]+" piece before "x".
  EXPECT_EQ(t.Encode(" \xef\xbb\xbf\xef\xbb\xbfx"),
            concat(t.Encode(" \xef\xbb\xbf\xef\xbb\xbf"), t.Encode("x")));
  // NEL is whitespace: "\u0085 " then " x"... "\s+(?!\S)" leaves the last one for " x".
  EXPECT_EQ(t.Encode("a\xc2\x85 x"),
            concat(concat(t.Encode("a"), t.Encode("\xc2\x85")), t.Encode(" x")));
  // U+180E (PCRE2's own \s has it) is not whitespace: "x\u180e" stays one symbol piece after "x".
  EXPECT_EQ(t.Encode("x \xe1\xa0\x8e!"), concat(t.Encode("x"), t.Encode(" \xe1\xa0\x8e!")));
}

// ---------------------------------------------------------------------------------------------
// Round trips and decoding.

// `back` is what decoding should give for the input bytes (World: the same bytes).
void ExpectRoundTrips(const Tokenizer& t, bool neox) {
  const auto back = [neox](const std::string& s) { return neox ? NeoxBack(s) : s; };
  for (const auto& [name, bytes] : Corpus()) {
    EXPECT_EQ(t.Decode(t.Encode(bytes)), back(bytes)) << name;
    if (name.find("nfc") != std::string::npos) {  // GPT-NeoX gives it back normalized
      EXPECT_NE(back(bytes) == bytes, neox) << name;
    }
  }
  std::mt19937 rng(12345);
  const std::string pieces[] = {"a",    " ",    "  ",       "\n",  "\r\n", "\t",
                                "中",   "😀",    "'s",       "1",   "é",    "<|endoftext|>",
                                "\xff", "\x80", "\xe4\xb8", "\x00"};
  for (int trial = 0; trial < 3000; ++trial) {
    std::string s;
    const int len = static_cast<int>(rng() % 48);
    for (int k = 0; k < len; ++k) {
      switch (trial % 3) {
        case 0: s.push_back(static_cast<char>(rng() & 0xff)); break;  // any bytes
        case 1: s += pieces[rng() % std::size(pieces)]; break;        // text-like
        default:
          s.push_back(static_cast<char>(rng() % 2 ? 0x80 | (rng() & 0x3f)  // UTF-8-ish
                                                  : 0xc0 | (rng() & 0x3f)));
      }
    }
    const std::vector<int32_t> ids = t.Encode(s);
    ASSERT_EQ(t.Decode(ids), back(s)) << "trial " << trial;
  }
}

TEST(WorldTokenizer, RoundTripsAnyBytes) {
  REQUIRE_SHARED(kWorldVocab);
  ExpectRoundTrips(World(), false);
}

// Any bytes round-trip, invalid UTF-8 included, but for the 13 bytes GPT-NeoX has no token for
// (they come back as U+FFFD) and for text that is not NFC (it comes back normalized).
TEST(NeoxTokenizer, RoundTripsAnyBytes) {
  REQUIRE_SHARED(kNeoxJson);
  ExpectRoundTrips(Neox(), true);
}

TEST(NeoxTokenizer, InvalidUtf8IsPiecesOfItsOwn) {
  REQUIRE_SHARED(kNeoxJson);
  const Tokenizer& t = Neox();
  const std::string bad = ReadBytes(DataDir() / "tokenizer_corpus" / "16-invalid-utf8.bin");
  ASSERT_FALSE(bad.empty());
  EXPECT_EQ(t.Decode(t.Encode(bad)), NeoxBack(bad));
  // "abc\x80def": the invalid byte is a piece of its own between the valid text's pieces.
  std::vector<int32_t> want = t.Encode("abc");
  want.push_back(t.Encode("\x80")[0]);
  for (int32_t id : t.Encode("def")) want.push_back(id);
  EXPECT_EQ(t.Encode("abc\x80"
                     "def"),
            want);
  EXPECT_EQ(t.Encode("\x80").size(), 1u);
  EXPECT_EQ(t.Decode(t.Encode("\xe4\xb8")), "\xe4\xb8");  // half of 中
  // A byte without a token is U+FFFD.
  EXPECT_EQ(t.Encode("\xff"), t.Encode("\xef\xbf\xbd"));
  EXPECT_EQ(t.Decode(t.Encode("a\xc0\xf5z")), "a\xef\xbf\xbd\xef\xbf\xbdz");
  // Deterministic: the same bytes give the same ids.
  EXPECT_EQ(t.Encode(bad), t.Encode(bad));
}

void ExpectPiecewiseDecode(const Tokenizer& t) {
  for (const auto& [name, bytes] : Corpus()) {
    const std::vector<int32_t> ids = t.Encode(bytes);
    std::string one_by_one;
    for (int32_t id : ids) one_by_one += t.Decode(std::span<const int32_t>(&id, 1));
    EXPECT_EQ(one_by_one, t.Decode(ids)) << name;
  }
  // Every id of the vocabulary, one by one and all at once.
  std::vector<int32_t> all(static_cast<size_t>(t.vocab_size()));
  for (int32_t i = 0; i < t.vocab_size(); ++i) all[i] = i;
  std::string one_by_one;
  for (int32_t id : all) one_by_one += t.Decode(std::span<const int32_t>(&id, 1));
  EXPECT_EQ(one_by_one, t.Decode(all));
}

TEST(WorldTokenizer, DecodeOneByOneEqualsWhole) {
  REQUIRE_SHARED(kWorldVocab);
  ExpectPiecewiseDecode(World());
}

TEST(NeoxTokenizer, DecodeOneByOneEqualsWhole) {
  REQUIRE_SHARED(kNeoxJson);
  ExpectPiecewiseDecode(Neox());
}

// Streaming decode never prints half a character, and prints everything in the end.
void ExpectStreamsWholeCharacters(const Tokenizer& t, bool expect_split_tokens) {
  const std::string texts[] = {
      ReadBytes(DataDir() / "tokenizer_corpus" / "02-chinese.txt"),
      ReadBytes(DataDir() / "tokenizer_corpus" / "05-emoji.txt"),
      ReadBytes(DataDir() / "tokenizer_corpus" / "03-japanese.txt"),
      "\xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f\x91\xa9\xe2\x80\x8d\xf0\x9f\x91\xa7 中文 🇯🇵"};
  for (const std::string& text : texts) {
    ASSERT_FALSE(text.empty());
    Utf8Stream stream;
    std::string out;
    int split_tokens = 0;
    for (int32_t id : t.Encode(text)) {
      const std::string piece = t.Decode(std::span<const int32_t>(&id, 1));
      if (!utf8::IsValid(piece)) ++split_tokens;
      const std::string ready = stream.Push(piece);
      EXPECT_TRUE(utf8::IsValid(ready)) << "partial character emitted";
      out += ready;
    }
    out += stream.Flush();
    EXPECT_EQ(out, text);
    if (expect_split_tokens) {
      EXPECT_GT(split_tokens, 0) << "no token split a character: weak test";
    }
  }
}

TEST(WorldTokenizer, Utf8StreamNeverSplitsCharacters) {
  REQUIRE_SHARED(kWorldVocab);
  ExpectStreamsWholeCharacters(World(), false);
}

TEST(NeoxTokenizer, Utf8StreamNeverSplitsCharacters) {
  REQUIRE_SHARED(kNeoxJson);
  ExpectStreamsWholeCharacters(Neox(), true);
}

// ---------------------------------------------------------------------------------------------
// The World vocabulary file.

TEST(WorldVocab, ParsesPythonLiterals) {
  struct Case {
    const char* literal;
    std::string bytes;
  };
  const Case cases[] = {
      {"'abc'", "abc"},
      {"\"it's\"", "it's"},
      {"'\\''", "'"},
      {"'\\\\'", "\\"},
      {"'\\n\\t\\r\\x00'", std::string("\n\t\r\0", 4)},
      {"'\\x80'", "\xc2\x80"},  // a str's \x80 is U+0080: two UTF-8 bytes
      {"b'\\x80'", "\x80"},     // a bytes' \x80 is the byte
      {"b'\\xe4\\xb8\\xad'", "\xe4\xb8\xad"},
      {"'\\u4e2d'", "\xe4\xb8\xad"},
      {"'\\U0001F600'", "\xf0\x9f\x98\x80"},
      {"'中'", "\xe4\xb8\xad"},
      {"'\\101\\0'", std::string("A\0", 2)},
      {"'\\d'", "\\d"},           // unknown escapes stay as written (Python does the same)
      {"b'\\u0041'", "\\u0041"},  // no \u in bytes
      {"' '", " "},
  };
  for (const Case& c : cases) {
    std::string out, error;
    ASSERT_TRUE(ParsePythonLiteral(c.literal, &out, &error)) << c.literal << ": " << error;
    EXPECT_EQ(out, c.bytes) << c.literal;
  }
  for (const char* bad : {"abc", "'abc", "abc'", "'a'b'", "'\\x4'", "'\\xzz'", "'\\u12'",
                          "'\\ud800'", "'\\U00110000'", "b'\xc3\xa9'", "'\\N{DASH}'", "'a\\'", "''",
                          "'", "b", "'''a'''", "b'\\400'"}) {
    std::string out, error;
    EXPECT_FALSE(ParsePythonLiteral(bad, &out, &error) && !out.empty()) << bad;
  }
}

TEST(WorldVocab, ParsesSmallVocabulary) {
  std::string text;
  for (int b = 0; b < 256; ++b) {
    char line[32];
    std::snprintf(line, sizeof line, "%d b'\\x%02x' 1\n", b + 1, b);
    text += line;
  }
  text += "257 'ab' 2\n258 'abc' 3\n259 '中' 3\r\n";  // CRLF line endings are fine
  const TokenizerData data = ParseWorldVocab(text, "mini.txt");
  ASSERT_EQ(data.tokens.size(), 260u);
  EXPECT_EQ(data.kind, "world");
  EXPECT_EQ(data.tokens[0], "");
  EXPECT_EQ(data.tokens[98], "a");
  EXPECT_EQ(data.tokens[259], "中");
  const std::unique_ptr<Tokenizer> t = MakeTokenizer(data);
  EXPECT_EQ(t->Encode("abcab abd"), (std::vector<int32_t>{258, 257, 33, 257, 101}));
  EXPECT_EQ(t->Encode("中中"), (std::vector<int32_t>{259, 259}));
}

// Each malformed file: aviary::Error that names the file (and the line).
TEST(WorldVocab, MalformedFilesNameFileAndLine) {
  const fs::path dir = TestDir();
  struct Case {
    const char* name;
    std::string text;
    const char* where;  // expected after the path
    const char* what;   // expected in the message
  };
  const Case cases[] = {
      {"bad-literal", "1 'a' 1\n2 'b 1\n", ":2:", "literal"},
      {"bad-escape", "1 '\\xg0' 1\n", ":1:", "hex"},
      {"wrong-length", "1 'a' 1\n2 'bc' 3\n", ":2:", "2 bytes but the line says 3"},
      {"duplicate-id", "1 'a' 1\n2 'b' 1\n2 'c' 1\n", ":3:", "duplicate id 2"},
      {"out-of-order", "1 'a' 1\n3 'b' 1\n", ":2:", "out of order"},
      {"starts-at-0", "0 'a' 1\n", ":1:", "out of order"},
      {"not-utf8", "1 'a' 1\n2 '\xff\xfe' 2\n", ":2:", "UTF-8"},
      {"junk",
       "\x7f"
       "ELF\x02\x01\x01\x00\x00\x00",
       ":1:", ""},
      {"missing-fields", "1 'a'\n", ":1:", "expected"},
      {"bad-id", "x 'a' 1\n", ":1:", "bad token id"},
      {"bad-length", "1 'a' one\n", ":1:", "bad byte length"},
      {"blank-line", "1 'a' 1\n\n2 'b' 1\n", ":2:", "empty line"},
      {"empty-token", "1 '' 0\n", ":1:", "empty token"},
      {"empty", "", "", "empty"},
  };
  for (const Case& c : cases) {
    const fs::path path = dir / (std::string(c.name) + ".txt");
    WriteBytes(path, c.text);
    try {
      (void)ReadWorldVocab(path.string());
      ADD_FAILURE() << c.name << ": no error";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.rfind(path.string() + c.where, 0), 0u) << c.name << ": " << msg;
      EXPECT_NE(msg.find(c.what), std::string::npos) << c.name << ": " << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << "one line: " << msg;
    }
    // The same through LoadTokenizer (it sniffs the format).
    EXPECT_THROW((void)LoadTokenizer(path.string()), Error) << c.name;
  }
  // A well-formed file that lacks single-byte tokens cannot encode every input.
  WriteBytes(dir / "no-bytes.txt", "1 'a' 1\n2 'b' 1\n");
  EXPECT_THROW((void)LoadTokenizer((dir / "no-bytes.txt").string()), Error);
  EXPECT_THROW((void)ReadWorldVocab((dir / "missing.txt").string()), Error);
  EXPECT_THROW((void)ReadWorldVocab(dir.string()), Error);  // a directory
}

// ---------------------------------------------------------------------------------------------
// tokenizer.json.

TEST(TokenizerJson, ReadsGptNeox) {
  REQUIRE_SHARED(kNeoxJson);
  const TokenizerData data = ReadTokenizerJson(SharedPath(kNeoxJson));
  EXPECT_EQ(data.kind, "gpt2-bpe");
  EXPECT_EQ(data.normalizer, "NFC");
  EXPECT_EQ(data.tokens.size(), 50277u);
  EXPECT_EQ(data.merges.size(), 50009u);
  EXPECT_EQ(data.merges[0], "\xc4\xa0 \xc4\xa0");  // "Ġ Ġ"
  EXPECT_EQ(data.added_tokens.size(), 25u);
  EXPECT_EQ(data.tokens[0], "<|endoftext|>");
  EXPECT_EQ(data.tokens[50276], "  ");
  EXPECT_EQ(data.tokens[209], " ");  // "Ġ" is the space byte
}

TEST(TokenizerJson, ByteLevelMapping) {
  EXPECT_EQ(BytesToByteLevel(" hello\n"), "\xc4\xa0hello\xc4\x8a");  // "Ġhello Ċ"
  std::string bytes;
  for (int b = 0; b < 256; ++b) bytes.push_back(static_cast<char>(b));
  std::string back;
  ASSERT_TRUE(ByteLevelToBytes(BytesToByteLevel(bytes), &back));
  EXPECT_EQ(back, bytes);
  EXPECT_FALSE(ByteLevelToBytes("\xe4\xb8\xad", &back));  // 中 is not a byte-level character
}

std::string MiniJson(const std::string& model, const std::string& extra = "") {
  return R"({"version":"1.0","added_tokens":[{"id":0,"content":"<|endoftext|>","special":true}],)"
         R"("normalizer":{"type":"NFC"},"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false},)"
         R"("decoder":{"type":"ByteLevel"},"model":)" +
         model + extra + "}";
}

TEST(TokenizerJson, MalformedFilesNameFile) {
  const fs::path dir = TestDir();
  const std::string vocab = R"("vocab":{"a":1,"b":2,"ab":3})";
  struct Case {
    const char* name;
    std::string text;
    const char* what;
  };
  const Case cases[] = {
      {"not-json", "{ nope", "not valid JSON"},
      {"empty-object", "{}", "model"},
      {"no-model", R"({"added_tokens":[]})", "model"},
      {"no-merges", MiniJson("{\"type\":\"BPE\"," + vocab + "}"), "merges"},
      {"no-vocab", MiniJson(R"({"type":"BPE","merges":[]})"), "vocab"},
      {"wordpiece", MiniJson("{\"type\":\"WordPiece\"," + vocab + "}"), "not supported"},
      {"unknown-merge", MiniJson("{\"type\":\"BPE\"," + vocab + R"(,"merges":["a c"]})"),
       "merge 1"},
      {"bad-merge", MiniJson("{\"type\":\"BPE\"," + vocab + R"(,"merges":["abc"]})"), "merge 1"},
      {"bad-id", MiniJson(R"({"type":"BPE","vocab":{"a":-1},"merges":[]})"), "bad id"},
      {"nfkc",
       R"({"normalizer":{"type":"NFKC"},"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false},)"
       R"("model":{"type":"BPE","vocab":{},"merges":[]}})",
       "normalizer"},
      {"metaspace",
       R"({"normalizer":null,"pre_tokenizer":{"type":"Metaspace"},)"
       R"("model":{"type":"BPE","vocab":{},"merges":[]}})",
       "pre-tokenizer"},
      // Found by fuzz_vocab_file: a number where ByteLevel wants a boolean.
      {"prefix-space-number",
       R"({"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":1},)"
       R"("model":{"type":"BPE","vocab":{},"merges":[]}})",
       "add_prefix_space"},
      {"use-regex-string",
       R"({"pre_tokenizer":{"type":"ByteLevel","use_regex":"yes"},)"
       R"("model":{"type":"BPE","vocab":{},"merges":[]}})",
       "use_regex"},
  };
  for (const Case& c : cases) {
    const fs::path path = dir / (std::string(c.name) + ".json");
    WriteBytes(path, c.text);
    try {
      (void)LoadTokenizer(path.string());
      ADD_FAILURE() << c.name << ": no error";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.rfind(path.string() + ": ", 0), 0u) << c.name << ": " << msg;
      EXPECT_NE(msg.find(c.what), std::string::npos) << c.name << ": " << msg;
    }
  }
}

TEST(TokenizerJson, SmallBpeEncodes) {
  // Byte tokens for a, b, space plus merges: "a b" (rank 0) then "Ġ ab" (rank 1).
  std::string vocab = "{";
  for (int b = 0; b < 256; ++b) {
    std::string key = BytesToByteLevel(std::string(1, static_cast<char>(b)));
    if (key == "\"" || key == "\\")
      key = "\\" + key;  // the only characters JSON needs escaped here
    vocab += (b ? ",\"" : "\"") + key + "\":" + std::to_string(b + 1);
  }
  vocab += R"(,"ab":257,"Ġab":258})";
  const std::string text =
      MiniJson("{\"type\":\"BPE\",\"vocab\":" + vocab + R"(,"merges":["a b","Ġ ab"]})");
  const TokenizerData data = ParseTokenizerJson(text, "mini.json");
  const std::unique_ptr<Tokenizer> t = MakeTokenizer(data);
  EXPECT_EQ(t->Encode("ab ab<|endoftext|>a"), (std::vector<int32_t>{257, 258, 0, 98}));
  EXPECT_EQ(t->Decode(t->Encode("ab ab<|endoftext|>a")), "ab ab<|endoftext|>a");
}

// ---------------------------------------------------------------------------------------------
// The tokenizer a model gets.

ModelInfo InfoWithVocab(const fs::path& dir, int n_vocab) {
  ModelInfo info;
  info.path = (dir / "model.bin").string();
  info.n_vocab = n_vocab;
  return info;
}

TEST(TokenizerForModel, ChoosesByVocabularySize) {
  const fs::path dir = TestDir();
  const std::string cache = (dir / "empty-cache").string();
  EXPECT_EQ(TokenizerForModel(InfoWithVocab(dir, 256), "", cache)->name(), "bytes");
  EXPECT_THROW((void)TokenizerForModel(InfoWithVocab(dir, 1234), "", cache), Error);
  EXPECT_THROW((void)TokenizerForModel(InfoWithVocab(dir, 65536), "", cache), Error);  // none near
  REQUIRE_SHARED(kWorldVocab);
  REQUIRE_SHARED(kNeoxJson);
  // An explicit file wins (there is no vocabulary near yet); one larger than the model's
  // vocabulary is refused.
  EXPECT_EQ(TokenizerForModel(InfoWithVocab(dir, 65536), SharedPath(kWorldVocab))->name(), "world");
  EXPECT_THROW((void)TokenizerForModel(InfoWithVocab(dir, 256), SharedPath(kWorldVocab)), Error);
  fs::create_symlink(SharedPath(kWorldVocab), dir / "rwkv_vocab_v20230424.txt");
  fs::create_symlink(SharedPath(kNeoxJson), dir / "20B_tokenizer.json");
  EXPECT_EQ(TokenizerForModel(InfoWithVocab(dir, 65536))->name(), "world");
  EXPECT_EQ(TokenizerForModel(InfoWithVocab(dir, 50304))->name(), "gpt-neox");
}

// ---------------------------------------------------------------------------------------------
// aviary tokenize / detokenize.

std::string Quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string Cli(const std::string& args) { return Quote(CliPath()) + " " + args; }

std::string Ids(const std::vector<int32_t>& ids, const char* sep) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? sep : "") + std::to_string(ids[i]);
  return s;
}

TEST(TokenizeCommand, PrintsIds) {
  REQUIRE_SHARED(kWorldVocab);
  REQUIRE_SHARED(kNeoxJson);
  const std::string world = Quote(SharedPath(kWorldVocab)), neox = Quote(SharedPath(kNeoxJson));
  const std::string text = "Hello, 世界! It's 2024.\n";
  CommandResult r = RunCommand(Cli("tokenize --tokenizer " + world + " --text " + Quote(text)));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output, Ids(World().Encode(text), " ") + "\n");
  r = RunCommand(Cli("tokenize --tokenizer " + neox + " --text " + Quote(text) + " --json"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output, "[" + Ids(Neox().Encode(text), ",") + "]\n");
  r = RunCommand(Cli("tokenize --tokenizer " + world + " --text ''"));
  EXPECT_EQ(r.output, "\n");
  r = RunCommand(Cli("tokenize --tokenizer " + world + " --text '' --json"));
  EXPECT_EQ(r.output, "[]\n");
  // --file reads raw bytes, invalid UTF-8 included.
  const std::string bin = (DataDir() / "tokenizer_corpus" / "16-invalid-utf8.bin").string();
  r = RunCommand(Cli("tokenize --tokenizer " + world + " --file " + Quote(bin)));
  ASSERT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.output, Ids(World().Encode(ReadBytes(bin)), " ") + "\n");
}

TEST(TokenizeCommand, ModelGivesItsTokenizer) {
  REQUIRE_SHARED(kTinyModel);
  const CommandResult r =
      RunCommand(Cli("tokenize --model " + Quote(SharedPath(kTinyModel)) + " --text 'hi!'"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output, "104 105 33\n");  // tiny models use the byte tokenizer
  const CommandResult d =
      RunCommand(Cli("detokenize --model " + Quote(SharedPath(kTinyModel)) + " 104 105 33"));
  EXPECT_EQ(d.output, "hi!");
}

TEST(TokenizeCommand, RoundTripThroughPipe) {
  REQUIRE_SHARED(kWorldVocab);
  REQUIRE_SHARED(kNeoxJson);
  const fs::path dir = TestDir();
  for (const char* vocab : {kWorldVocab, kNeoxJson}) {
    const std::string v = Quote(SharedPath(vocab));
    int k = 0;
    for (const char* name :
         {"05-emoji.txt", "08-whitespace.txt", "16-invalid-utf8.bin", "17-random-bytes.bin"}) {
      const std::string in = (DataDir() / "tokenizer_corpus" / name).string();
      const std::string out = (dir / (std::string(name) + ".out")).string();
      // What should come back: the same bytes (GPT-NeoX: NFC, and U+FFFD for the bytes it has
      // no token for).
      std::string want = in;
      if (vocab == kNeoxJson) {
        want = (dir / (std::string(name) + ".want")).string();
        WriteBytes(want, NeoxBack(ReadBytes(in)));
      }
      // Ids as arguments (plain output through xargs) or on stdin (JSON), in turn.
      const std::string pipe =
          k++ % 2 == 0 ? Cli("tokenize --tokenizer " + v + " --file " + Quote(in)) + " | xargs " +
                             Cli("detokenize --tokenizer " + v)
                       : Cli("tokenize --tokenizer " + v + " --file " + Quote(in) + " --json") +
                             " | " + Cli("detokenize --tokenizer " + v);
      const CommandResult r = RunCommand(pipe + " > " + Quote(out) + " && cmp " + Quote(want) +
                                         " " + Quote(out) + " && echo same");
      EXPECT_EQ(r.output, "same\n") << vocab << " " << name << ": " << pipe;
    }
  }
}

// A vocabulary aviary cannot use is refused naming its file: a World vocabulary cut short
// (no token for most single bytes), a tokenizer.json without a byte's token.
TEST(TokenizeCommand, UnusableVocabulariesNameTheirFile) {
  REQUIRE_SHARED(kWorldVocab);
  REQUIRE_SHARED(kNeoxJson);
  auto read_all = [](const std::string& path) {
    const std::vector<uint8_t> bytes = ReadFileBytes(path);
    return std::string(bytes.begin(), bytes.end());
  };
  const std::string world = read_all(SharedPath(kWorldVocab));
  size_t cut = 0;
  for (int line = 0; line < 100; ++line) cut = world.find('\n', cut) + 1;
  const std::string short_vocab =
      ::testing::TempDir() + "aviary_short_vocab_" + std::to_string(::getpid()) + ".txt";
  std::ofstream(short_vocab, std::ios::binary) << world.substr(0, cut);
  std::string json = read_all(SharedPath(kNeoxJson));
  const size_t at = json.find("\"a\":");  // the single byte 'a'
  ASSERT_NE(at, std::string::npos);
  json.replace(at, 4, "\"a-not-a\":");
  const std::string bad_json =
      ::testing::TempDir() + "aviary_gap_tokenizer_" + std::to_string(::getpid()) + ".json";
  std::ofstream(bad_json, std::ios::binary) << json;
  for (const std::string& file : {short_vocab, bad_json}) {
    try {
      LoadTokenizer(file);
      ADD_FAILURE() << file << " loaded";
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).rfind(file + ": ", 0), 0u) << e.what();
    }
    const CommandResult r =
        RunCommand(Cli("tokenize --tokenizer " + Quote(file) + " --text hi") + " 2>&1");
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_EQ(r.output.rfind("aviary: " + file + ": ", 0), 0u) << r.output;
    // convert embeds a vocabulary: it refuses it before writing anything.
    REQUIRE_SHARED(kTinyModel);
    const std::string out =
        ::testing::TempDir() + "aviary_vocab_" + std::to_string(::getpid()) + ".gguf";
    const CommandResult c = RunCommand(Cli("convert " + Quote(SharedPath(kTinyModel)) + " " +
                                           Quote(out) + " --tokenizer " + Quote(file)) +
                                       " 2>&1");
    EXPECT_EQ(c.exit_code, 1) << c.output;
    EXPECT_NE(c.output.find("aviary: " + file + ": "), std::string::npos) << c.output;
    EXPECT_FALSE(std::filesystem::exists(out));
  }
  std::remove(short_vocab.c_str());
  std::remove(bad_json.c_str());
}

// A comma stands between two ids: an empty place is an error, not a skipped id.
TEST(TokenizeCommand, CommasStandBetweenIds) {
  REQUIRE_SHARED(kWorldVocab);
  const std::string world = Quote(SharedPath(kWorldVocab));
  for (const char* ids : {"'[1,2,,3]'", "'[,1]'", "'1,'", "'[1,2,]'", ", 5"}) {
    const CommandResult r =
        RunCommand(Cli("detokenize --tokenizer " + world + " -- " + ids) + " 2>&1");
    EXPECT_EQ(r.exit_code, 2) << ids << "\n" << r.output;
    EXPECT_NE(r.output.find("a comma without an id"), std::string::npos) << ids << "\n" << r.output;
  }
  const CommandResult s =
      RunCommand("echo '[66,,67]' | " + Cli("detokenize --tokenizer " + world) + " 2>&1");
  EXPECT_EQ(s.exit_code, 1) << s.output;
  EXPECT_NE(s.output.find("stdin: a comma without an id"), std::string::npos) << s.output;
  for (const char* ids : {"'[66,67]'", "'66, 67'", "66, 67", "'[66, 67]'", "66 67"}) {
    const CommandResult ok = RunCommand(Cli("detokenize --tokenizer " + world + " " + ids));
    EXPECT_EQ(ok.exit_code, 0) << ids;
    EXPECT_EQ(ok.output, "AB") << ids;
  }
}

TEST(TokenizeCommand, Errors) {
  REQUIRE_SHARED(kWorldVocab);
  const std::string world = Quote(SharedPath(kWorldVocab));
  struct Case {
    std::string args;
    int exit_code;
    const char* what;
  };
  const Case cases[] = {
      {"detokenize --tokenizer " + world + " 1 2 65530", 1, "65530"},
      {"detokenize --tokenizer " + world + " 99999999999999999999", 1, "outside"},
      {"detokenize --tokenizer " + world + " -- -1", 1, "-1"},
      {"detokenize --tokenizer " + world + " 12 abc", 2, "'abc' is not a token id"},
      {"detokenize --tokenizer " + world + " 1.5", 2, "not a token id"},
      {"detokenize 1 2", 2, "--model"},
      {"tokenize --text hi", 2, "--model"},
      {"tokenize --tokenizer " + world, 2, "--text"},
      {"tokenize --tokenizer " + world + " --text a --file b", 2, "--text"},
      {"tokenize --tokenizer /nonexistent/vocab.txt --text a", 1, "/nonexistent/vocab.txt"},
      {"tokenize --tokenizer " + world + " --file /nonexistent/in.txt", 1, "/nonexistent/in.txt"},
  };
  for (const Case& c : cases) {
    const CommandResult r = RunCommand(Cli(c.args) + " 2>&1");
    EXPECT_EQ(r.exit_code, c.exit_code) << c.args << "\n" << r.output;
    EXPECT_EQ(r.output.rfind("aviary: ", 0), 0u) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.what), std::string::npos) << c.args << "\n" << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << c.args << "\n" << r.output;
  }
  // Nothing is written before an unknown id is found.
  const CommandResult r =
      RunCommand(Cli("detokenize --tokenizer " + world + " 50 51 70000 2>/dev/null"));
  EXPECT_EQ(r.output, "");
  // Non-numeric input on stdin is bad input.
  const CommandResult s =
      RunCommand("echo '1 2 x' | " + Cli("detokenize --tokenizer " + world) + " 2>&1");
  EXPECT_EQ(s.exit_code, 1) << s.output;
  EXPECT_NE(s.output.find("stdin"), std::string::npos) << s.output;
}

}  // namespace
}  // namespace aviary::testing
