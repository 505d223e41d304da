// A guard for JSON read from files (safetensors headers, training checkpoints' index):
// nlohmann-json parses and destroys nested values recursively, so hostile input nested
// thousands deep could overflow the stack. Checked on the text before parsing.
#pragma once

#include <algorithm>
#include <string_view>

namespace aviary {

// The deepest nesting of brackets outside strings in `text`.
inline int JsonDepth(std::string_view text) {
  int depth = 0, max_depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      max_depth = std::max(max_depth, ++depth);
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return max_depth;
}

}  // namespace aviary
