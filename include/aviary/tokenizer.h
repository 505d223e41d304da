// Text <-> token ids. Bytes now; the World trie and GPT-NeoX BPE tokenizers implement the same
// interface.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace aviary {

struct ModelInfo;

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string name() const = 0;
  virtual int32_t vocab_size() const = 0;
  virtual std::vector<int32_t> Encode(std::string_view text) const = 0;
  // Exact bytes of the ids; throws aviary::Error on an id outside the vocabulary.
  virtual std::string Decode(std::span<const int32_t> ids) const = 0;
};

// Token id = byte value (0..255), for the tiny test models.
std::unique_ptr<Tokenizer> MakeByteTokenizer();

// The tokenizer a model was trained with, chosen from its vocabulary size.
std::unique_ptr<Tokenizer> TokenizerForModel(const ModelInfo& info);

// Holds back the bytes of an incomplete UTF-8 character so that streamed text never prints
// half a character. Invalid bytes pass through unchanged.
class Utf8Stream {
 public:
  // Returns the bytes that are safe to print now.
  std::string Push(std::string_view bytes);
  // Returns whatever is held back (at the end of the stream).
  std::string Flush();

 private:
  std::string pending_;
};

}  // namespace aviary
