// Training data: the binidx format (round trip, the official writer's bytes, corrupt files),
// tokenizing text and JSONL (cache, errors with line numbers), training windows (RWKV-LM's
// magic-prime order, seeds, resume, the validation tail) and validation windows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "aviary/error.h"
#include "aviary/tokenizer.h"
#include "test_data.h"
#include "train/binidx.h"
#include "train/dataset.h"

namespace aviary::train {
namespace {

namespace fs = std::filesystem;
using ::aviary::testing::ProcessTempDir;
using ::aviary::testing::SharedPath;

std::string TempPath(const std::string& name) {
  const std::string path = ProcessTempDir() + name;
  fs::remove_all(path);
  return path;
}

void WriteBytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

std::string ReadText(const std::string& path) {
  const std::vector<uint8_t> b = ::aviary::testing::ReadFileBytes(path);
  return std::string(b.begin(), b.end());
}

template <typename T>
void Put(std::vector<uint8_t>& out, T v) {
  const size_t at = out.size();
  out.resize(at + sizeof v);
  std::memcpy(&out[at], &v, sizeof v);
}

// The .idx and .bin that RWKV-LM's make_data.py (MMapIndexedDataset.Index.writer, binidx.py)
// writes for `docs`, built here from the format's description: magic, version 1, the dtype
// code, the item and document-index counts, int32 sizes, int64 byte pointers, the int64
// document index [0, 1, ..., n]. One item per document.
struct OfficialFiles {
  std::vector<uint8_t> idx, bin;
};
template <typename T>
OfficialFiles OfficialBinidx(const std::vector<std::vector<int64_t>>& docs, uint8_t code) {
  OfficialFiles f;
  f.idx = {'M', 'M', 'I', 'D', 'I', 'D', 'X', 0, 0};
  Put<uint64_t>(f.idx, 1);
  Put<uint8_t>(f.idx, code);
  Put<uint64_t>(f.idx, docs.size());
  Put<uint64_t>(f.idx, docs.size() + 1);
  for (const auto& d : docs) Put<int32_t>(f.idx, static_cast<int32_t>(d.size()));
  int64_t pointer = 0;
  for (const auto& d : docs) {
    Put<int64_t>(f.idx, pointer);
    pointer += static_cast<int64_t>(d.size() * sizeof(T));
  }
  for (size_t i = 0; i <= docs.size(); ++i) Put<int64_t>(f.idx, static_cast<int64_t>(i));
  for (const auto& d : docs) {
    for (int64_t t : d) Put<T>(f.bin, static_cast<T>(t));
  }
  return f;
}

void WriteDataset(const std::string& prefix, const OfficialFiles& f) {
  WriteBytes(prefix + ".idx", f.idx);
  WriteBytes(prefix + ".bin", f.bin);
}

std::vector<int32_t> AllTokens(const TokenDataset& data, int32_t vocab = 1 << 30) {
  std::vector<int32_t> out(data.size());
  data.Get(0, out.size(), vocab, out.data());
  return out;
}

// The error a call throws (empty when it throws none).
template <typename F>
std::string ErrorOf(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// binidx

TEST(Binidx, WriterRoundTripsDocumentsAndTokens) {
  const std::string prefix = TempPath("roundtrip");
  {
    BinidxWriter w(prefix, TokenType::kUInt16);
    w.Add(std::vector<int32_t>{5, 6, 7});
    w.Add(std::vector<int32_t>{65535, 0});
    w.EndDocument();
    w.EndDocument();  // nothing in it: dropped
    w.Add(std::vector<int32_t>{1});
    EXPECT_FALSE(fs::exists(prefix + ".bin"));  // not in place before Finish
    w.Finish();
    EXPECT_EQ(w.tokens(), 6u);
    EXPECT_EQ(w.documents(), 2u);
  }
  EXPECT_FALSE(fs::exists(prefix + ".bin.tmp"));
  const TokenDataset data(prefix + ".idx");  // either file names the dataset
  EXPECT_EQ(data.prefix(), prefix);
  EXPECT_EQ(data.header().type, TokenType::kUInt16);
  EXPECT_EQ(data.header().documents, 2u);
  EXPECT_EQ(data.header().items, 2u);
  EXPECT_EQ(data.size(), 6u);
  EXPECT_EQ(AllTokens(data), (std::vector<int32_t>{5, 6, 7, 65535, 0, 1}));
  std::vector<int32_t> part(2);
  data.Get(2, 2, 65536, part.data());
  EXPECT_EQ(part, (std::vector<int32_t>{7, 65535}));
  EXPECT_NE(ErrorOf([&] { data.Get(5, 2, 65536, part.data()); }).find("roundtrip.bin"),
            std::string::npos);

  // int32 holds what uint16 cannot.
  const std::string wide = TempPath("roundtrip32");
  BinidxWriter w32(wide, TokenTypeForVocab(100000));
  EXPECT_NE(ErrorOf([&] {
              BinidxWriter w16(TempPath("narrow"), TokenType::kUInt16);
              w16.Add(std::vector<int32_t>{70000});
            }).find("does not fit uint16"),
            std::string::npos);
  w32.Add(std::vector<int32_t>{99999, 70000, 3});
  w32.Finish();
  const TokenDataset data32(wide);
  EXPECT_EQ(data32.header().type, TokenType::kInt32);
  EXPECT_EQ(AllTokens(data32), (std::vector<int32_t>{99999, 70000, 3}));
}

TEST(Binidx, UnfinishedWriterLeavesNothing) {
  const std::string prefix = TempPath("unfinished");
  {
    BinidxWriter w(prefix, TokenType::kUInt16);
    w.Add(std::vector<int32_t>{1, 2, 3});
  }
  EXPECT_FALSE(fs::exists(prefix + ".bin.tmp"));
  EXPECT_FALSE(fs::exists(prefix + ".bin"));
  EXPECT_FALSE(fs::exists(prefix + ".idx"));
}

TEST(Binidx, ReadsTheOfficialWritersFiles) {
  // make_data.py: each document's tokens then 0 (end of text), uint16.
  const std::vector<std::vector<int64_t>> docs = {{33, 44, 65529, 0}, {0}, {7, 8, 9, 10, 0}};
  const OfficialFiles official = OfficialBinidx<uint16_t>(docs, 8);
  const std::string prefix = TempPath("official");
  WriteDataset(prefix, official);
  const TokenDataset data(prefix);
  EXPECT_EQ(data.header().documents, 3u);
  EXPECT_EQ(AllTokens(data), (std::vector<int32_t>{33, 44, 65529, 0, 0, 7, 8, 9, 10, 0}));

  // Our writer, given the same documents, writes the same bytes.
  const std::string ours = TempPath("ours");
  BinidxWriter w(ours, TokenType::kUInt16);
  for (const auto& d : docs) {
    w.Add(std::vector<int32_t>(d.begin(), d.end()));
    w.EndDocument();
  }
  w.Finish();
  EXPECT_EQ(::aviary::testing::ReadFileBytes(ours + ".idx"), official.idx);
  EXPECT_EQ(::aviary::testing::ReadFileBytes(ours + ".bin"), official.bin);

  // Megatron's int32 (vocabularies from 65,500 up) and the other integer types load too.
  const std::vector<std::vector<int64_t>> wide = {{1, 100000, 0}, {5, 0}};
  WriteDataset(prefix, OfficialBinidx<int32_t>(wide, 4));
  EXPECT_EQ(AllTokens(TokenDataset(prefix)), (std::vector<int32_t>{1, 100000, 0, 5, 0}));
  WriteDataset(prefix, OfficialBinidx<int64_t>(wide, 5));
  EXPECT_EQ(AllTokens(TokenDataset(prefix)), (std::vector<int32_t>{1, 100000, 0, 5, 0}));
  const std::vector<std::vector<int64_t>> small = {{1, 2, 0}, {3, 0}};
  for (uint8_t code : {1, 2, 3}) {
    WriteDataset(prefix, code == 1   ? OfficialBinidx<uint8_t>(small, code)
                         : code == 2 ? OfficialBinidx<int8_t>(small, code)
                                     : OfficialBinidx<int16_t>(small, code));
    EXPECT_EQ(AllTokens(TokenDataset(prefix)), (std::vector<int32_t>{1, 2, 0, 3, 0}))
        << "dtype code " << int(code);
  }
}

TEST(Binidx, TokensOutsideTheVocabularyAreNamed) {
  const std::string prefix = TempPath("outside");
  WriteDataset(prefix, OfficialBinidx<int32_t>({{1, 2, -3, 4}}, 4));
  const TokenDataset data(prefix);
  std::vector<int32_t> out(4);
  EXPECT_NE(ErrorOf([&] { data.Get(0, 4, 100, out.data()); }).find("outside.bin: token 2 is -3"),
            std::string::npos);
  EXPECT_NE(ErrorOf([&] {
              data.Get(0, 2, 2, out.data());
            }).find("token 1 is 2, outside the vocabulary of 2"),
            std::string::npos);
  data.Get(0, 2, 3, out.data());
}

// Each corruption of a valid pair, and the words its error must contain.
TEST(Binidx, RejectsCorruptFilesNamingFileAndProblem) {
  const OfficialFiles good = OfficialBinidx<uint16_t>({{1, 2, 0}, {3, 4, 5, 0}}, 8);
  const std::string prefix = TempPath("corrupt");
  struct Case {
    std::string what;
    std::function<void(OfficialFiles&)> corrupt;
    std::string file, message;
  };
  auto set_u64 = [](std::vector<uint8_t>& b, size_t at, uint64_t v) { std::memcpy(&b[at], &v, 8); };
  const size_t sizes_at = 34, pointers_at = 34 + 2 * 4, docs_at = 34 + 2 * 12;
  const std::vector<Case> cases = {
      {"bad magic", [](OfficialFiles& f) { f.idx[0] = 'X'; }, ".idx", "not a binidx index"},
      {"version", [&](OfficialFiles& f) { set_u64(f.idx, 9, 2); }, ".idx", "version 2"},
      {"float dtype", [](OfficialFiles& f) { f.idx[17] = 6; }, ".idx", "float type"},
      {"unknown dtype", [](OfficialFiles& f) { f.idx[17] = 9; }, ".idx", "unknown dtype code 9"},
      {"huge item count", [&](OfficialFiles& f) { set_u64(f.idx, 18, ~uint64_t{0} / 4); }, ".idx",
       "truncated"},
      {"huge doc count", [&](OfficialFiles& f) { set_u64(f.idx, 26, 1000); }, ".idx", "truncated"},
      {"trailing bytes", [](OfficialFiles& f) { f.idx.push_back(0); }, ".idx",
       "1 bytes after the document index"},
      {"negative size",
       [&](OfficialFiles& f) {
         const int32_t v = -1;
         std::memcpy(&f.idx[sizes_at], &v, 4);
       },
       ".idx", "item 0 has negative size"},
      {"pointer out of place", [&](OfficialFiles& f) { set_u64(f.idx, pointers_at + 8, 8); },
       ".idx", "item 1 starts at byte 8"},
      {"item past the .bin", [&](OfficialFiles& f) { f.bin.resize(10); }, ".idx",
       "past the end of the .bin"},
      {".bin longer", [&](OfficialFiles& f) { f.bin.resize(16); }, ".idx",
       "the items cover 14 bytes but the .bin has 16"},
      {"doc index start", [&](OfficialFiles& f) { set_u64(f.idx, docs_at, 1); }, ".idx",
       "document index entry 0 is 1, not 0"},
      {"doc index past items", [&](OfficialFiles& f) { set_u64(f.idx, docs_at + 16, 3); }, ".idx",
       "document index entry 2 is 3"},
      {"doc index decreasing",
       [&](OfficialFiles& f) {
         set_u64(f.idx, docs_at + 8, 2);
         set_u64(f.idx, docs_at + 16, 1);
       },
       ".idx", "document index entry 2 is 1"},
      {"empty .bin", [](OfficialFiles& f) { f.bin.clear(); }, ".bin", "file is empty"},
  };
  for (const Case& c : cases) {
    OfficialFiles f = good;
    c.corrupt(f);
    WriteDataset(prefix, f);
    const std::string error = ErrorOf([&] { TokenDataset data(prefix); });
    EXPECT_NE(error.find(prefix + c.file), std::string::npos) << c.what << ": " << error;
    EXPECT_NE(error.find(c.message), std::string::npos) << c.what << ": " << error;
  }
  // Every truncation of the index.
  for (size_t n = 0; n < good.idx.size(); ++n) {
    OfficialFiles f = good;
    f.idx.resize(n);
    WriteDataset(prefix, f);
    const std::string error = ErrorOf([&] { TokenDataset data(prefix); });
    EXPECT_NE(error.find(prefix + ".idx"), std::string::npos) << n << ": " << error;
    EXPECT_FALSE(error.empty()) << n;
  }
  // Missing files.
  fs::remove(prefix + ".bin");
  EXPECT_NE(ErrorOf([&] { TokenDataset data(prefix); }).find(prefix + ".bin: cannot open"),
            std::string::npos);
  fs::remove(prefix + ".idx");
  EXPECT_NE(ErrorOf([&] { TokenDataset data(prefix); }).find("no binidx dataset"),
            std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Tokenizing

std::unique_ptr<Tokenizer> WorldTokenizer() {
  return LoadTokenizer(SharedPath("tokenizers/rwkv_vocab_v20230424.txt"));
}

TEST(Tokenize, PiecesTokenizeAsTheWhole) {
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  REQUIRE_SHARED("tokenizers/rwkv_vocab_v20230424.txt");
  REQUIRE_SHARED("tokenizers/20B_tokenizer.json");
  const std::string text = ReadText(SharedPath("data/tinyshakespeare.txt"));
  // Code and indented text, where newlines meet whitespace that tokens can join.
  const std::string code = "int main() {\n  return 0;\n}\n\n\tx = 1\n \nfoo\r\nbar\n\n\nbaz\n";
  for (const auto& tokenizer :
       {WorldTokenizer(), LoadTokenizer(SharedPath("tokenizers/20B_tokenizer.json"))}) {
    for (const std::string& sample : {text.substr(0, 200000), code + code + code}) {
      const std::vector<std::string_view> pieces = TextPieces(sample, 16);
      ASSERT_GT(pieces.size(), 5u);
      std::string joined;
      std::vector<int32_t> ids;
      for (std::string_view p : pieces) {
        joined += p;
        const std::vector<int32_t> part = tokenizer->Encode(p);
        ids.insert(ids.end(), part.begin(), part.end());
      }
      EXPECT_EQ(joined, sample);
      EXPECT_EQ(ids, tokenizer->Encode(sample)) << tokenizer->name();
    }
  }
  EXPECT_EQ(TextPieces("no newline at all", 4).size(), 1u);
  EXPECT_EQ(TextPieces("", 4).size(), 1u);
  EXPECT_EQ(TextPieces("ab\ncd\nef", 2), (std::vector<std::string_view>{"ab\n", "cd\n", "ef"}));
  EXPECT_EQ(TextPieces("ab\n cd\nef", 2), (std::vector<std::string_view>{"ab\n cd\n", "ef"}));
  EXPECT_EQ(TextPieces("ab \ncd\r\nef", 1).size(), 1u);  // no newline between visible characters
}

TEST(Tokenize, JsonlErrorsNameFileAndLine) {
  std::vector<std::string> texts;
  std::vector<uint64_t> lines;
  ForEachJsonlText(
      "{\"text\": \"a\"}\n\n  \r\n{\"meta\": 1, \"text\": \"b\\nc\"}\r\n{\"text\": \"\"}",
      "x.jsonl", [&](std::string_view t, uint64_t line, size_t) {
        texts.emplace_back(t);
        lines.push_back(line);
      });
  EXPECT_EQ(texts, (std::vector<std::string>{"a", "b\nc", ""}));
  EXPECT_EQ(lines, (std::vector<uint64_t>{1, 4, 5}));

  auto error = [](std::string_view jsonl) {
    return ErrorOf([&] { ForEachJsonlText(jsonl, "x.jsonl", [](auto, auto, auto) {}); });
  };
  EXPECT_NE(error("{\"text\": \"a\"}\n{\"text\": \"b\"\n").find("x.jsonl:2: not valid JSON"),
            std::string::npos);
  EXPECT_NE(error("{\"text\": \"a\"}\n\n{\"txt\": \"b\"}").find("x.jsonl:3: no \"text\" string"),
            std::string::npos);
  EXPECT_NE(error("{\"text\": 5}").find("x.jsonl:1: no \"text\" string"), std::string::npos);
  EXPECT_NE(error("[\"text\"]").find("x.jsonl:1: not a JSON object"), std::string::npos);
  EXPECT_NE(error("{\"text\": \"\xff\"}").find("x.jsonl:1: not valid JSON"), std::string::npos);
}

TEST(Tokenize, TextAndJsonlBecomeDocumentsEndedByEndOfText) {
  REQUIRE_SHARED("tokenizers/rwkv_vocab_v20230424.txt");
  const auto world = WorldTokenizer();
  const std::string dir = TempPath("prepare");
  fs::create_directories(dir);
  const std::string text_path = dir + "/a.txt", jsonl_path = dir + "/b.jsonl";
  WriteText(text_path, "Hello world.\nSecond line.\n");
  WriteText(jsonl_path, "{\"text\": \"First document.\"}\n\n{\"text\": \"Zweites Dokument 😀\"}\n");

  const std::string out = dir + "/out";
  const PreparedData prepared = PrepareDataset({text_path, jsonl_path}, *world, out);
  EXPECT_FALSE(prepared.reused);
  EXPECT_EQ(prepared.prefix, out + "/data/tokens");
  EXPECT_EQ(prepared.documents, 3u);
  std::vector<int32_t> expected;
  for (const std::string doc :
       {"Hello world.\nSecond line.\n", "First document.", "Zweites Dokument 😀"}) {
    const std::vector<int32_t> ids = world->Encode(doc);
    expected.insert(expected.end(), ids.begin(), ids.end());
    expected.push_back(0);
  }
  const TokenDataset data(prepared.prefix);
  EXPECT_EQ(data.header().type, TokenType::kUInt16);
  EXPECT_EQ(data.header().documents, 3u);
  EXPECT_EQ(AllTokens(data, world->vocab_size()), expected);
  EXPECT_EQ(prepared.tokens, expected.size());
}

TEST(Tokenize, ReusesTheCacheOnlyForTheSameInputsAndTokenizer) {
  REQUIRE_SHARED("tokenizers/rwkv_vocab_v20230424.txt");
  const auto world = WorldTokenizer();
  const auto bytes = MakeByteTokenizer();
  const std::string dir = TempPath("cache");
  fs::create_directories(dir);
  const std::string path = dir + "/t.txt", out = dir + "/out";
  WriteText(path, "abc abc abc\n");
  EXPECT_FALSE(PrepareDataset({path}, *bytes, out).reused);
  EXPECT_TRUE(PrepareDataset({path}, *bytes, out).reused);

  // Touched, same content: reused (by the content hash).
  fs::last_write_time(path, fs::last_write_time(path) + std::chrono::seconds(5));
  EXPECT_TRUE(PrepareDataset({path}, *bytes, out).reused);

  // Same size, other content: tokenized again.
  WriteText(path, "xyz xyz xyz\n");
  fs::last_write_time(path, fs::last_write_time(path) + std::chrono::seconds(10));
  PreparedData p = PrepareDataset({path}, *bytes, out);
  EXPECT_FALSE(p.reused);
  EXPECT_EQ(AllTokens(TokenDataset(p.prefix), 256)[0], 'x');

  // Another tokenizer: tokenized again.
  p = PrepareDataset({path}, *world, out);
  EXPECT_FALSE(p.reused);
  EXPECT_EQ(p.tokens, world->Encode("xyz xyz xyz\n").size() + 1);
  EXPECT_TRUE(PrepareDataset({path}, *world, out).reused);

  // Other inputs: tokenized again.
  EXPECT_FALSE(PrepareDataset({path, path}, *world, out).reused);

  // A damaged cache is not trusted.
  WriteText(out + "/data/tokens.idx", "garbage");
  p = PrepareDataset({path, path}, *world, out);
  EXPECT_FALSE(p.reused);
  EXPECT_EQ(TokenDataset(p.prefix).header().documents, 2u);
}

TEST(Tokenize, BinidxInputIsUsedWhereItIs) {
  const std::string prefix = TempPath("given");
  WriteDataset(prefix, OfficialBinidx<uint16_t>({{1, 2, 0}}, 8));
  const auto bytes = MakeByteTokenizer();
  for (const std::string& name : {prefix, prefix + ".bin", prefix + ".idx"}) {
    const PreparedData p = PrepareDataset({name}, *bytes, TempPath("unused"));
    EXPECT_TRUE(p.reused);
    EXPECT_EQ(p.prefix, prefix);
    EXPECT_EQ(p.tokens, 3u);
  }
  EXPECT_FALSE(fs::exists(ProcessTempDir() + "unused"));
  WriteText(ProcessTempDir() + "other.txt", "text");
  EXPECT_THROW(PrepareDataset({prefix, ProcessTempDir() + "other.txt"}, *bytes, TempPath("o")),
               UsageError);
  fs::remove(prefix + ".idx");
  EXPECT_NE(
      ErrorOf([&] { PrepareDataset({prefix + ".bin"}, *bytes, TempPath("o")); }).find("needs both"),
      std::string::npos);
}

TEST(Tokenize, MissingEmptyAndBadDataAreErrors) {
  const auto bytes = MakeByteTokenizer();
  const std::string dir = TempPath("bad");
  fs::create_directories(dir);
  const std::string out = dir + "/out";
  EXPECT_THROW(PrepareDataset({}, *bytes, out), UsageError);
  EXPECT_NE(ErrorOf([&] {
              PrepareDataset({dir + "/missing.txt"}, *bytes, out);
            }).find(dir + "/missing.txt: cannot open"),
            std::string::npos);
  WriteText(dir + "/empty.txt", "");
  EXPECT_NE(ErrorOf([&] {
              PrepareDataset({dir + "/empty.txt"}, *bytes, out);
            }).find("empty.txt: file is empty"),
            std::string::npos);
  WriteText(dir + "/blank.jsonl", "\n\n");
  EXPECT_NE(ErrorOf([&] {
              PrepareDataset({dir + "/blank.jsonl"}, *bytes, out);
            }).find("blank.jsonl: no documents"),
            std::string::npos);
  WriteText(dir + "/bad.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"ok\"}\n{\"text\" \"ok\"}\n");
  EXPECT_NE(ErrorOf([&] {
              PrepareDataset({dir + "/bad.jsonl"}, *bytes, out);
            }).find(dir + "/bad.jsonl:3: not valid JSON"),
            std::string::npos);
  EXPECT_FALSE(fs::exists(out + "/data/tokens.bin"));
  EXPECT_FALSE(fs::exists(out + "/data/tokens.bin.tmp"));
}

TEST(Tokenize, LargeInputsGiveTheSameTokensOnAnyNumberOfThreads) {
  REQUIRE_SHARED("tokenizers/rwkv_vocab_v20230424.txt");
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  const auto world = WorldTokenizer();
  const std::string dir = TempPath("threads");
  fs::create_directories(dir);
  // 3.3 MB of text (several pieces), and a JSONL of 60,000 lines (several runs of lines).
  const std::string shakespeare = ReadText(SharedPath("data/tinyshakespeare.txt"));
  WriteText(dir + "/big.txt", shakespeare + shakespeare + shakespeare);
  std::string jsonl;
  std::vector<int32_t> expected;
  for (int i = 0; i < 60000; ++i) {
    const std::string text = "Line " + std::to_string(i) + (i % 7 ? " of text" : " \u00e9");
    jsonl += "{\"text\": \"" + text + "\"}\n";
    const std::vector<int32_t> ids =
        world->Encode("Line " + std::to_string(i) + (i % 7 ? " of text" : " \u00e9"));
    expected.insert(expected.end(), ids.begin(), ids.end());
    expected.push_back(0);
  }
  WriteText(dir + "/big.jsonl", jsonl);
  ::aviary::testing::RuntimeGuard guard;
  std::vector<std::vector<uint8_t>> outputs;
  for (int threads : {1, 3}) {
    ::aviary::testing::SetNumThreads(threads);
    const std::string out = dir + "/out" + std::to_string(threads);
    const PreparedData p = PrepareDataset({dir + "/big.txt", dir + "/big.jsonl"}, *world, out);
    EXPECT_EQ(p.documents, 60001u);
    outputs.push_back(::aviary::testing::ReadFileBytes(p.prefix + ".bin"));
    const TokenDataset data(p.prefix);
    std::vector<int32_t> all = AllTokens(data, world->vocab_size());
    std::vector<int32_t> whole = world->Encode(shakespeare + shakespeare + shakespeare);
    whole.push_back(0);
    ASSERT_GE(all.size(), whole.size());
    EXPECT_TRUE(std::equal(whole.begin(), whole.end(), all.begin()));
    EXPECT_TRUE(
        std::equal(expected.begin(), expected.end(), all.begin() + whole.size(), all.end()));
  }
  EXPECT_EQ(outputs[0], outputs[1]);

  // The first bad line is the one named, wherever the runs of lines begin and end.
  const size_t line_40 = [&] {
    size_t at = 0;
    for (int i = 0; i < 39; ++i) at = jsonl.find('\n', at) + 1;
    return at;
  }();
  std::string bad = jsonl;
  bad.insert(bad.size() - 1, ",");  // line 60000
  WriteText(dir + "/bad.jsonl", bad);
  EXPECT_NE(ErrorOf([&] {
              PrepareDataset({dir + "/bad.jsonl"}, *world, dir + "/o");
            }).find("bad.jsonl:60000: not valid JSON"),
            std::string::npos);
  bad.insert(line_40, "{}\n");  // a new line 40, without text
  WriteText(dir + "/bad.jsonl", bad);
  EXPECT_NE(ErrorOf([&] {
              PrepareDataset({dir + "/bad.jsonl"}, *world, dir + "/o");
            }).find("bad.jsonl:40: no \"text\""),
            std::string::npos);
}

TEST(Tokenize, TinyShakespeareBytesKeepsEveryByte) {
  REQUIRE_SHARED("data/tinyshakespeare.txt");
  const std::string path = SharedPath("data/tinyshakespeare.txt");
  const auto bytes = MakeByteTokenizer();
  const PreparedData p = PrepareDataset({path}, *bytes, TempPath("shakespeare"));
  EXPECT_EQ(p.tokens, 1115394u);
  EXPECT_EQ(p.documents, 1u);
  const TokenDataset data(p.prefix);
  const std::vector<int32_t> tokens = AllTokens(data, 256);
  const std::string text = ReadText(path);
  ASSERT_EQ(tokens.size(), text.size());
  EXPECT_TRUE(std::equal(tokens.begin(), tokens.end(), text.begin(),
                         [](int32_t t, char c) { return t == static_cast<unsigned char>(c); }));
  // nanoGPT's split: the first int(n * 0.9) characters train.
  const DataSplit split = SplitTokens(p.tokens, 0.1);
  EXPECT_EQ(split.train.end, 1003854u);
  EXPECT_EQ(split.validation.begin, 1003854u);
  EXPECT_EQ(split.validation.end, 1115394u);
}

// ---------------------------------------------------------------------------------------------
// Windows

// A dataset of `n` tokens, token i = i % modulus.
std::string CountingDataset(const std::string& name, size_t n, int modulus) {
  const std::string prefix = TempPath(name);
  BinidxWriter w(prefix, TokenType::kUInt16);
  std::vector<int32_t> tokens(n);
  for (size_t i = 0; i < n; ++i) tokens[i] = static_cast<int32_t>(i % modulus);
  w.Add(tokens);
  w.Finish();
  return prefix;
}

TEST(Windows, MagicPrimeIsTheOfficialOne) {
  // demo-training-prepare.sh: MiniPile, 1498226207 tokens, ctx_len 512.
  EXPECT_EQ(MagicPrime(1498226207, 512), 2926181u);
  EXPECT_EQ(MagicPrime(3 * 10 + 1, 10), 2u);  // (2 + 1) * 10 < 31
  EXPECT_EQ(MagicPrime(3 * 10, 10), 0u);
  for (uint64_t tokens : {100u, 1000u, 54321u}) {
    const uint64_t p = MagicPrime(tokens, 7);
    EXPECT_EQ(p % 3, 2u);
    EXPECT_LT((p + 1) * 7, tokens);
  }
}

TEST(Windows, SeedZeroDrawsRwkvLmsSequence) {
  const std::string prefix = CountingDataset("official_order", 20000, 1000);
  const TokenDataset data(prefix);
  const int ctx = 16;
  WindowSampler sampler(data, {0, data.size()}, ctx, 0, 1000);
  const uint64_t p = sampler.magic_prime();
  EXPECT_EQ(p, MagicPrime(20000, ctx));
  // dataset.py: factor = int(p * (sqrt(5) - 1) / 2); i = ((factor * ii^3) % p) * ctx_len with
  // ii = 1 + the sample's number.
  const auto factor = static_cast<unsigned __int128>(p * ((std::sqrt(5.0) - 1) / 2));
  for (uint64_t n = 0; n < 3000; ++n) {
    const unsigned __int128 ii = 1 + n;
    const uint64_t expected = static_cast<uint64_t>(factor * ii * ii * ii % p) * ctx;
    ASSERT_EQ(sampler.WindowStart(n), expected) << n;
  }
}

TEST(Windows, EachRunOfPrimeDrawsVisitsEveryWindowOnce) {
  const std::string prefix = CountingDataset("permutation", 5000, 300);
  const TokenDataset data(prefix);
  for (uint64_t seed : {0u, 1u, 12345u}) {
    WindowSampler sampler(data, {0, data.size()}, 8, seed, 300);
    const uint64_t p = sampler.magic_prime();
    std::set<uint64_t> starts;
    for (uint64_t n = 0; n < p; ++n) starts.insert(sampler.WindowStart(n + 7 * p));
    EXPECT_EQ(starts.size(), p) << seed;
    EXPECT_EQ(*starts.rbegin(), (p - 1) * 8);
  }
}

TEST(Windows, InputsAndTargetsAreTheWindowShiftedByOne) {
  const std::string prefix = CountingDataset("shift", 4000, 4000);
  const TokenDataset data(prefix);
  const int ctx = 10, batch = 3;
  WindowSampler sampler(data, {0, data.size()}, ctx, 42, 4000);
  std::vector<int32_t> in(batch * ctx), tg(batch * ctx);
  sampler.Next(batch, in.data(), tg.data());
  for (int b = 0; b < batch; ++b) {
    const auto start = static_cast<int32_t>(sampler.WindowStart(b));
    for (int t = 0; t < ctx; ++t) {
      EXPECT_EQ(in[b * ctx + t], start + t);
      EXPECT_EQ(tg[b * ctx + t], start + t + 1);
    }
  }
  EXPECT_EQ(sampler.State(), 3u);
}

std::vector<int32_t> Draw(WindowSampler& s, int steps, int batch) {
  std::vector<int32_t> all, in(batch * s.ctx_len()), tg(batch * s.ctx_len());
  for (int i = 0; i < steps; ++i) {
    s.Next(batch, in.data(), tg.data());
    all.insert(all.end(), in.begin(), in.end());
    all.insert(all.end(), tg.begin(), tg.end());
  }
  return all;
}

TEST(Windows, ReproducibleBySeedAndResumable) {
  const std::string prefix = CountingDataset("seeds", 50000, 50000 - 1);
  const TokenDataset data(prefix);
  const TokenRange range{0, data.size()};
  WindowSampler a(data, range, 32, 7, 65536), b(data, range, 32, 7, 65536);
  WindowSampler c(data, range, 32, 8, 65536), zero(data, range, 32, 0, 65536);
  const std::vector<int32_t> first = Draw(a, 5, 4);
  EXPECT_EQ(first, Draw(b, 5, 4));
  EXPECT_NE(first, Draw(c, 5, 4));
  EXPECT_NE(first, Draw(zero, 5, 4));

  // Save after 5 steps; a fresh sampler restored to that state continues identically.
  const uint64_t saved = a.State();
  const std::vector<int32_t> uninterrupted = Draw(a, 6, 4);
  WindowSampler resumed(data, range, 32, 7, 65536);
  resumed.Restore(saved);
  EXPECT_EQ(Draw(resumed, 6, 4), uninterrupted);
  EXPECT_EQ(resumed.State(), a.State());
}

TEST(Windows, TrainingWindowsNeverTouchValidation) {
  // Training tokens are 0..99, validation tokens 200.
  const std::string prefix = TempPath("split");
  const DataSplit split = SplitTokens(10000, 0.15);
  EXPECT_EQ(split.train.end, 8500u);
  EXPECT_EQ(split.validation.begin, 8500u);
  {
    BinidxWriter w(prefix, TokenType::kUInt16);
    std::vector<int32_t> tokens(10000, 200);
    for (size_t i = 0; i < split.train.end; ++i) tokens[i] = static_cast<int32_t>(i % 100);
    w.Add(tokens);
    w.Finish();
  }
  const TokenDataset data(prefix);
  for (int ctx : {1, 7, 64, 2000}) {
    WindowSampler sampler(data, split.train, ctx, 3, 256);
    for (uint64_t n = 0; n < sampler.magic_prime(); ++n) {
      ASSERT_LE(sampler.WindowStart(n) + ctx + 1, split.train.end) << ctx << " " << n;
    }
    std::vector<int32_t> in(5 * ctx), tg(5 * ctx);
    for (int step = 0; step < 50; ++step) {
      sampler.Next(5, in.data(), tg.data());
      ASSERT_LT(*std::max_element(tg.begin(), tg.end()), 100);
    }
  }
  EXPECT_THROW(WindowSampler(data, {0, 30}, 10, 0, 256), Error);  // too few tokens
  EXPECT_THROW(WindowSampler(data, {0, 20000}, 10, 0, 256), UsageError);
  EXPECT_THROW(SplitTokens(10, 1.0), UsageError);
  EXPECT_THROW(SplitTokens(10, -0.1), UsageError);
  EXPECT_EQ(SplitTokens(10, 0).validation.size(), 0u);
}

TEST(Windows, ValidationWindowsCoverTheTailInOrder) {
  const std::string prefix = CountingDataset("validation", 1000, 1000);
  const TokenDataset data(prefix);
  const TokenRange tail{900, 1000};  // 100 tokens: 9 windows of 10 + 1
  const ValidationWindows all(data, tail, 11, 100, 1000);
  EXPECT_EQ(all.count(), 9);
  EXPECT_EQ(all.tokens(), 99u);
  std::vector<int32_t> in(4 * 11), tg(4 * 11);
  std::vector<int32_t> targets;
  for (int first = 0; first < all.count(); first += 4) {
    const int n = all.Fill(first, 4, in.data(), tg.data());
    EXPECT_EQ(n, std::min(4, all.count() - first));
    for (int b = 0; b < n; ++b) {
      EXPECT_EQ(in[b * 11], static_cast<int32_t>(900 + (first + b) * 11));
    }
    targets.insert(targets.end(), tg.begin(), tg.begin() + n * 11);
  }
  // Every target from token 901 to 999 scored once, in order.
  ASSERT_EQ(targets.size(), 99u);
  for (size_t i = 0; i < targets.size(); ++i) EXPECT_EQ(targets[i], static_cast<int32_t>(901 + i));

  // A cap spreads the windows evenly, without overlap.
  const ValidationWindows capped(data, tail, 11, 3, 1000);
  EXPECT_EQ(capped.count(), 3);
  EXPECT_EQ(capped.WindowStart(0), 900u);
  EXPECT_EQ(capped.WindowStart(1), 900u + 3 * 11);
  EXPECT_EQ(capped.WindowStart(2), 900u + 6 * 11);
  EXPECT_EQ(capped.Fill(3, 4, in.data(), tg.data()), 0);

  EXPECT_EQ(ValidationWindows(data, {1000, 1000}, 11, 100, 1000).count(), 0);
  EXPECT_NE(ErrorOf([&] {
              ValidationWindows v(data, {990, 1000}, 11, 100, 1000);
            }).find("fewer than one window"),
            std::string::npos);
}

}  // namespace
}  // namespace aviary::train
