// Chat messages -> the text the model reads, with the same templates as `aviary chat`.
// The text is returned as segments that are tokenized one by one and concatenated (an earlier
// reply of the server as the tokens it was generated as: Engine::ReplyTokens): a message's
// tokens then never depend on the messages after it, so the tokens of turn N are a prefix of
// the tokens of turn N + 1 and the state cache finds the earlier turns.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "aviary/chat.h"
#include "aviary/tokenizer.h"
#include "serve/openai_api.h"

namespace aviary::serve {

// The conversation as segments:
//   [system line and the template's intro, when `from_start`]
//   a user message followed by an assistant message, or ending the list when `for_reply`:
//     message_format ("User: text\n\nAssistant:"); any other user message: "User: text\n\n"
//   an assistant message: " text\n\n" after a user message, else "Assistant: text\n\n"
//   a system message after the first other message: the system line
// User and system texts are trimmed and their newlines folded as in `aviary chat` ("\n\n" ends a
// turn). `from_start` is false when the conversation continues a saved state, which has
// already read the intro. With `for_reply`, a list that ends with an assistant or system
// message gets the reply prefix ("Assistant:") appended, so the model answers; without it the
// conversation is rendered as complete (a state saved for later turns). A template without a
// system role (Raven) reads a system message as a plain line.
std::vector<std::string> RenderChat(const ChatTemplate& chat_template,
                                    std::span<const ChatMessage> messages, bool from_start,
                                    bool for_reply = true);

}  // namespace aviary::serve
