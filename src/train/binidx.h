// RWKV-LM's training data format (Megatron's "mmap" indexed dataset): a token stream in
// PREFIX.bin and its index in PREFIX.idx.
//
// PREFIX.idx, all little-endian:
//   "MMIDIDX\0\0"            9 bytes of magic
//   version                  uint64, 1
//   dtype code               uint8: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16
//                            (6 and 7 are floats, which no token file uses)
//   item count N             uint64
//   document index count D   uint64
//   sizes                    N x int32: tokens per item
//   pointers                 N x int64: byte offset of each item in PREFIX.bin
//   document index           D x int64: the first item of each document, then N at the end
// PREFIX.bin: the items' tokens back to back, each token one value of the dtype.
//
// RWKV-LM's make_data.py writes one item per document (the document's tokens and then token 0,
// end of text) in uint16; Megatron's preprocess_data.py uses uint16 for vocabularies under
// 65,500 tokens and int32 above. The official trainer reads the .bin as one stream of tokens,
// windows crossing document ends; so does TokenDataset.
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace aviary {
class MappedFile;
}

namespace aviary::train {

enum class TokenType : uint8_t {
  kUInt8 = 1,
  kInt8 = 2,
  kInt16 = 3,
  kInt32 = 4,
  kInt64 = 5,
  kUInt16 = 8,
};
int TokenTypeBytes(TokenType type);
const char* TokenTypeName(TokenType type);  // "uint16", ...
// uint16 when every id of the vocabulary fits (make_data.py's choice for the World vocabulary,
// Megatron's for GPT-NeoX), else int32.
TokenType TokenTypeForVocab(int64_t vocab_size);

// What a valid .idx says, checked against the size of its .bin.
struct BinidxHeader {
  TokenType type = TokenType::kUInt16;
  uint64_t items = 0;
  uint64_t documents = 0;  // the document index's entries less the closing one
  uint64_t tokens = 0;     // in the .bin
};
constexpr size_t kBinidxHeaderBytes = 34;

// Parses and validates an .idx file's bytes: magic, version, dtype, that the arrays fill the
// file exactly, items with non-negative sizes stored back to back from byte 0 and ending exactly
// at the end of a .bin of `bin_bytes`, a document index starting at 0 and never decreasing or
// pointing past the items. Throws aviary::Error "<name>: <problem>".
BinidxHeader ParseBinidxIndex(std::span<const uint8_t> idx, uint64_t bin_bytes,
                              const std::string& name);

// PREFIX for a dataset named by its prefix or by either of its two files.
std::string BinidxPrefix(const std::string& path);
// Whether PREFIX.bin and PREFIX.idx both exist.
bool BinidxExists(const std::string& prefix);

// A binidx dataset, memory-mapped and validated, read as one stream of tokens.
class TokenDataset {
 public:
  // `path`: the prefix or either file. Throws aviary::Error naming the file at fault: missing,
  // malformed (ParseBinidxIndex) or without tokens.
  explicit TokenDataset(const std::string& path);
  ~TokenDataset();
  TokenDataset(const TokenDataset&) = delete;
  TokenDataset& operator=(const TokenDataset&) = delete;

  const std::string& prefix() const { return prefix_; }
  const BinidxHeader& header() const { return header_; }
  uint64_t size() const { return header_.tokens; }

  // Copies tokens [offset, offset + count) to `out`. Throws aviary::Error naming the .bin and
  // the token's position when a token is negative or not below `vocab_size`, and when the range
  // does not lie inside the stream.
  void Get(uint64_t offset, size_t count, int32_t vocab_size, int32_t* out) const;

 private:
  std::string prefix_;
  std::unique_ptr<MappedFile> bin_;
  BinidxHeader header_;
};

// Writes PREFIX.bin and PREFIX.idx, the tokens streamed to disk as they come. Both files carry
// a ".tmp" suffix until Finish() renames them, so an interrupted run never leaves a dataset
// that looks complete; the destructor removes the temporary files of an unfinished writer.
class BinidxWriter {
 public:
  BinidxWriter(const std::string& prefix, TokenType type);
  ~BinidxWriter();
  BinidxWriter(const BinidxWriter&) = delete;
  BinidxWriter& operator=(const BinidxWriter&) = delete;

  // Appends to the current document. Throws aviary::Error on a token the type cannot hold.
  void Add(std::span<const int32_t> tokens);
  // Closes the current document (one item, or several past 2^31 - 1 tokens, since an item's
  // size is an int32). A document without tokens is dropped.
  void EndDocument();
  // Closes an open document, writes the index and renames both files into place.
  void Finish();

  uint64_t tokens() const { return tokens_; }
  uint64_t documents() const { return doc_index_.size() - 1; }

 private:
  void CloseItem();

  std::string prefix_;
  TokenType type_;
  std::FILE* bin_ = nullptr;
  bool finished_ = false;
  uint64_t tokens_ = 0;
  uint64_t item_tokens_ = 0;  // in the item being written
  std::vector<int32_t> sizes_;
  std::vector<uint64_t> doc_index_ = {0};
  std::vector<uint8_t> buffer_;
};

}  // namespace aviary::train
