// Placeholder until the GPT-NeoX BPE tokenizer lands.
#include "aviary/error.h"
#include "tokenizers/tokenizers.h"

namespace aviary {

std::unique_ptr<Tokenizer> MakeBpeTokenizer(const TokenizerData&) {
  throw Error("the GPT-NeoX tokenizer is not supported yet");
}
TokenizerData ReadTokenizerJson(const std::string& path) {
  throw Error(path + ": the GPT-NeoX tokenizer is not supported yet");
}

}  // namespace aviary
