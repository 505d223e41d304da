// Internal constructors of the tokenizers behind include/aviary/tokenizer.h.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "aviary/tokenizer.h"

namespace aviary {

std::unique_ptr<Tokenizer> MakeWorldTokenizer(const TokenizerData& data);  // world.cpp
std::unique_ptr<Tokenizer> MakeBpeTokenizer(const TokenizerData& data);    // bpe.cpp
// rwkv_vocab_v20230424.txt: lines "<id> <python literal> <byte length>".
TokenizerData ReadWorldVocab(const std::string& path);  // world.cpp
// Hugging Face tokenizer.json with a byte-level BPE model.
TokenizerData ReadTokenizerJson(const std::string& path);  // bpe.cpp

// The concatenated bytes of `ids` in a table of tokens; an id outside it throws aviary::Error
// naming `vocabulary` ("World", "GPT-NeoX").                                 // tokenizer.cpp
std::string DecodeTokens(const std::vector<std::string>& tokens, std::span<const int32_t> ids,
                         const char* vocabulary);

}  // namespace aviary
