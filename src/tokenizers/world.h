// Internals of the World (RWKV trie) tokenizer, for the tests and the fuzz targets.
#pragma once

#include <string>
#include <string_view>

#include "aviary/tokenizer.h"

namespace aviary {

// Parses the text of a World vocabulary (the format of rwkv_vocab_v20230424.txt: one token a
// line, "<id> <python str or bytes literal> <byte length>", ids 1, 2, 3, ... in order).
// `name` starts every error message ("name:line: problem"). tokens[0] is empty (id 0 is
// end-of-text and has no bytes).
TokenizerData ParseWorldVocab(std::string_view text, const std::string& name);

// Decodes one Python string literal ('..' / "..", stored as UTF-8) or bytes literal (b'..' /
// b"..") into bytes, as Python's eval() followed by str.encode("utf-8") would. Returns false
// and sets *error to a short description when the literal is malformed or unsupported
// (raw/triple-quoted strings, implicit concatenation, \N{...}).
bool ParsePythonLiteral(std::string_view literal, std::string* out, std::string* error);

}  // namespace aviary
