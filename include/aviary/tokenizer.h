// Text <-> token ids. Bytes now; the World trie and GPT-NeoX BPE tokenizers implement the same
// interface.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace aviary {

struct ModelInfo;

// A vocabulary as stored inside a model file (GGUF) or built from a tokenizer file.
struct TokenizerData {
  std::string kind;                 // "world" (RWKV trie), "gpt2-bpe" (GPT-NeoX), "bytes"
  std::vector<std::string> tokens;  // token id -> exact bytes
  std::vector<std::string> merges;  // BPE merges, "a b", highest priority first
  // BPE: ids matched as whole strings before BPE (Hugging Face added tokens: <|endoftext|>, ...).
  std::vector<int32_t> added_tokens;
  // BPE: Unicode normalization before pre-tokenization: "" (none) or "NFC".
  std::string normalizer;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string name() const = 0;
  virtual int32_t vocab_size() const = 0;
  // The id that ends a document (World and GPT-NeoX: 0), if the vocabulary has one.
  virtual std::optional<int32_t> end_of_text() const { return std::nullopt; }
  virtual std::vector<int32_t> Encode(std::string_view text) const = 0;
  // Exact bytes of the ids; throws aviary::Error on an id outside the vocabulary.
  virtual std::string Decode(std::span<const int32_t> ids) const = 0;
};

// Token id = byte value (0..255), for the tiny test models.
std::unique_ptr<Tokenizer> MakeByteTokenizer();

// Reads a tokenizer file: the World vocabulary (rwkv_vocab_v20230424.txt) or a Hugging Face
// tokenizer.json (GPT-NeoX 20B). Throws aviary::Error naming the file.
std::unique_ptr<Tokenizer> LoadTokenizer(const std::string& path);
// From data embedded in a model file.
std::unique_ptr<Tokenizer> MakeTokenizer(const TokenizerData& data);

// The tokenizer a model was trained with: `path` if given, else the one inside the model file,
// else chosen by vocabulary size (256: bytes; 65536: World; 50277/50304: GPT-NeoX), looking for
// the vocabulary file next to the model and then in the folder `cache_dir` (none when empty).
std::unique_ptr<Tokenizer> TokenizerForModel(const ModelInfo& info, const std::string& path = "",
                                             const std::string& cache_dir = "");

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
