// Internals of the byte-level BPE tokenizer (GPT-NeoX 20B), for the tests and the fuzz targets.
#pragma once

#include <string>
#include <string_view>

#include "aviary/tokenizer.h"

namespace aviary {

// Parses the text of a Hugging Face tokenizer.json with a byte-level BPE model; `name` starts
// every error message. The result has kind "gpt2-bpe"; tokens[id] are exact bytes (byte-level
// vocabulary strings mapped back to bytes, added tokens as written), merges stay in byte-level
// form ("Ġ t"), added_tokens lists the ids of the added tokens.
TokenizerData ParseTokenizerJson(std::string_view text, const std::string& name);

// GPT-2's byte <-> unicode mapping used by byte-level BPE: printable Latin-1 bytes map to
// themselves, the other 68 bytes to U+0100.. in order (space -> U+0120 'Ġ').
uint32_t ByteToUnicode(unsigned char b);
// The byte a code point stands for, or -1 if it is not in the mapping.
int UnicodeToByte(uint32_t cp);
// "Ġt" -> " t"; false if a character is not in the mapping or `s` is not UTF-8.
bool ByteLevelToBytes(std::string_view s, std::string* out);
// " t" -> "Ġt".
std::string BytesToByteLevel(std::string_view bytes);
// Unicode NFC (ICU) of valid UTF-8 text.
std::string NormalizeNfc(std::string_view utf8);

}  // namespace aviary
