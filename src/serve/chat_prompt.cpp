#include "serve/chat_prompt.h"

#include <algorithm>

#include "chat/commands.h"

namespace aviary::serve {
namespace {

std::string Clean(const ChatTemplate& t, const std::string& text) {
  const std::string trimmed = chat::Trim(text);
  return t.fold_newlines ? chat::FoldNewlines(trimmed) : trimmed;
}

std::string SystemLine(const ChatTemplate& t, const std::string& text) {
  const std::string clean = Clean(t, text);
  if (clean.empty()) return "";
  // A template without a system role (Raven) reads the instruction as a line of its own.
  if (t.system_role.empty()) return clean + "\n\n";
  return t.Expand(t.system_format, clean);
}

}  // namespace

std::vector<std::string> RenderChat(const ChatTemplate& t, std::span<const ChatMessage> messages,
                                    bool from_start, bool for_reply) {
  std::vector<std::string> segments;
  size_t i = 0;
  if (from_start) {
    // Leading system messages become the system line, before the intro, as in `aviary chat`.
    std::string start;
    for (; i < messages.size() && messages[i].role == "system"; ++i) {
      start += SystemLine(t, messages[i].content);
    }
    start += t.intro;
    if (!start.empty()) segments.push_back(std::move(start));
  }
  for (; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    const bool last = i + 1 == messages.size();
    const bool before_assistant = !last && messages[i + 1].role == "assistant";
    if (m.role == "system") {
      std::string line = SystemLine(t, m.content);
      if (!line.empty()) segments.push_back(std::move(line));
    } else if (m.role == "user") {
      const std::string text = Clean(t, m.content);
      if ((last && for_reply) || before_assistant) {
        segments.push_back(t.Expand(t.message_format, text));
      } else {
        segments.push_back(t.Expand("{user}{sep} {text}\n\n", text));
      }
    } else {  // assistant
      const bool after_user = i > 0 && messages[i - 1].role == "user";
      // The reply prefix ("Assistant:") was part of the user message's segment; the reply
      // itself starts with the space the model writes after it.
      std::string reply = after_user ? std::string() : t.Expand("{bot}{sep}");
      reply += " " + m.content + "\n\n";
      segments.push_back(std::move(reply));
      if (last && for_reply) segments.push_back(t.Expand("{bot}{sep}"));
    }
  }
  if (for_reply && !messages.empty() && messages.back().role == "system") {
    segments.push_back(t.Expand("{bot}{sep}"));
  }
  return segments;
}

}  // namespace aviary::serve
