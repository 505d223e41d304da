// Internal constructors of the tokenizers behind include/aviary/tokenizer.h.
#pragma once

#include <memory>
#include <string>

#include "aviary/tokenizer.h"

namespace aviary {

std::unique_ptr<Tokenizer> MakeWorldTokenizer(const TokenizerData& data);  // world.cpp
std::unique_ptr<Tokenizer> MakeBpeTokenizer(const TokenizerData& data);    // bpe.cpp
// rwkv_vocab_v20230424.txt: lines "<id> <python literal> <byte length>".
TokenizerData ReadWorldVocab(const std::string& path);                     // world.cpp
// Hugging Face tokenizer.json with a byte-level BPE model.
TokenizerData ReadTokenizerJson(const std::string& path);                  // bpe.cpp

}  // namespace aviary
