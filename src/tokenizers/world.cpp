// Placeholder until the World tokenizer lands.
#include "aviary/error.h"
#include "tokenizers/tokenizers.h"

namespace aviary {

std::unique_ptr<Tokenizer> MakeWorldTokenizer(const TokenizerData&) {
  throw Error("the World tokenizer is not supported yet");
}
TokenizerData ReadWorldVocab(const std::string& path) {
  throw Error(path + ": the World tokenizer is not supported yet");
}

}  // namespace aviary
