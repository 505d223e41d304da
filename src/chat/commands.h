// Parsing one chat input line: settings words (-temp=X -top_p=Y -seed=N) and the command.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace aviary::chat {

enum class Command {
  kEmpty,       // nothing left (only settings, or a blank line)
  kChat,        // anything else: a chat message
  kRetry,       // +
  kReset,       // +reset
  kGen,         // +gen TEXT
  kContinue,    // +++
  kRegenerate,  // ++
  kInstruct,    // +i TEXT
  kQa,          // +qa TEXT
  kSave,        // +save FILE
  kLoad,        // +load FILE
  kState,       // +state
  kHelp,        // +help
  kExit,        // +exit
};

struct ParsedLine {
  Command command = Command::kEmpty;
  std::string text;  // message, prompt or file name (settings words removed, trimmed)
  bool had_settings = false;
  std::optional<float> temperature, top_p;
  std::optional<uint64_t> seed;
  std::vector<std::string> errors;  // malformed or out-of-range settings: refuse the whole line
  std::string missing_argument;     // "+gen" without a text: the command word
};

// Settings are whitespace-separated words anywhere in the line, removed completely with the
// whitespace around them. Then, after trimming: an exact command word (case-insensitive), a
// command word followed by whitespace and its argument, or else a chat message.
ParsedLine ParseLine(std::string_view line, float current_temperature, float current_top_p);

// ChatRWKV's input convention: the two characters `\n` in a message stand for a newline.
std::string UnescapeNewlines(std::string_view text);
// Leading and trailing whitespace removed.
std::string Trim(std::string_view text);
// "\r\n" -> "\n", runs of newlines -> one "\n" ("\n\n" separates turns).
std::string FoldNewlines(std::string_view text);

}  // namespace aviary::chat
