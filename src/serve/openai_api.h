// The OpenAI HTTP API's JSON, without HTTP or a model: request bodies of
// POST /v1/chat/completions and POST /v1/completions parsed and checked into plain structs, and
// the response bodies (whole, streamed chunks, SSE framing, the model list, errors) built from
// plain values. The parsers never throw: a body is either a request or an ApiError ready to send.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace aviary::serve {

// What a request may ask for; the server sets these from its flags.
struct Limits {
  size_t max_body_bytes = 1 << 20;  // checked before parsing
  int max_n = 8;                    // choices per request
  int max_tokens = 4096;            // the largest max_tokens accepted
  int max_stop = 4;                 // stop strings (OpenAI allows 4)
  int max_json_depth = 32;          // nlohmann recurses per level: hostile nesting is refused
};

// An error in OpenAI's shape. `param` names the offending field ("messages[1].content"), or is
// empty (sent as null) when no single field is at fault.
struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;
  std::string code;  // empty: null

  // {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
  std::string Json() const;
};

ApiError InvalidRequest(std::string message, std::string param = "");

struct ChatMessage {
  std::string role;     // "system", "user" or "assistant" ("developer" is read as "system")
  std::string content;  // the text parts of an array content, concatenated
};

// The sampling and stopping fields common to both endpoints. Optional fields left out (or sent
// as null) are empty, so the server applies its own defaults.
struct GenerationParams {
  std::optional<int> max_tokens;     // max_completion_tokens wins over max_tokens when both are set
  std::optional<float> temperature;  // [0, 2]; 0 means greedy
  std::optional<float> top_p;        // (0, 1]
  std::optional<float> presence_penalty;   // [-2, 2]
  std::optional<float> frequency_penalty;  // [-2, 2]
  std::optional<uint64_t> seed;
  int n = 1;                      // [1, Limits::max_n]
  std::vector<std::string> stop;  // up to Limits::max_stop, none empty
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage: a final chunk with the usage
  std::string user;
  // RWKV extras (not in OpenAI's API; clients pass them as extra body fields).
  std::optional<float> penalty_decay;  // (0, 1]: the penalties' decay per sampled token
  std::string state;                   // the id of a state saved through /v1/states to start from
};

struct ChatRequest {
  std::string model;                  // empty: the server's model
  std::vector<ChatMessage> messages;  // at least one
  GenerationParams params;
  bool think = false;  // RWKV extra: start the reply in think mode (World/G1: "Assistant: <think")
};

struct CompletionRequest {
  std::string model;
  std::string prompt;  // a string, or an array holding one string
  GenerationParams params;
};

// POST /v1/states: feed a conversation and keep its state under `id` (1 to 64 letters, digits,
// '-', '_', '.'). The conversation is a chat request's "messages" or a completion request's
// "prompt", read as those endpoints read them ("state" continues another saved state).
struct StateRequest {
  std::string id;
  std::variant<ChatRequest, CompletionRequest> conversation;
};

template <class Request>
using Parsed = std::variant<Request, ApiError>;

// Fields the API does not know are ignored (clients send many); a known field of the wrong type
// or out of range is an error naming it. A body over the size limit is a 413.
Parsed<ChatRequest> ParseChatRequest(std::string_view body, const Limits& limits);
Parsed<CompletionRequest> ParseCompletionRequest(std::string_view body, const Limits& limits);
Parsed<StateRequest> ParseStateRequest(std::string_view body, const Limits& limits);
// A saved state's name: 1 to 64 letters, digits, '-', '_' or '.' (safe in a URL path and a log).
bool IsValidStateId(std::string_view id);

// ---- Responses. Text may hold any bytes a model emitted: bytes that are not valid UTF-8 are
// sent as U+FFFD. A stream should hold back incomplete characters between chunks (Utf8Stream,
// aviary/tokenizer.h), or a character split over two tokens arrives as two U+FFFD.

enum class FinishReason { kStop, kLength };

struct Usage {
  int prompt_tokens = 0;
  int completion_tokens = 0;
  // Prompt tokens whose state came from the state cache instead of being fed again (sent as
  // usage.prompt_tokens_details.cached_tokens, as OpenAI reports its prompt cache).
  int cached_tokens = 0;
};

struct ResponseMeta {
  std::string id;       // "chatcmpl-..." or "cmpl-..."
  int64_t created = 0;  // Unix seconds
  std::string model;
};

struct Choice {
  std::string text;
  FinishReason finish_reason = FinishReason::kStop;
};

// chat.completion: choices[i] = {index, message: {role: "assistant", content}, finish_reason}.
std::string ChatCompletionJson(const ResponseMeta& meta, std::span<const Choice> choices,
                               const Usage& usage);
// text_completion: choices[i] = {index, text, logprobs: null, finish_reason}.
std::string CompletionJson(const ResponseMeta& meta, std::span<const Choice> choices,
                           const Usage& usage);

// One streamed step of choice `index`.
struct StreamDelta {
  int index = 0;
  bool first = false;  // chat: the first chunk of a choice carries role "assistant"
  std::string text;
  std::optional<FinishReason> finish_reason;  // set on a choice's last chunk
};

// chat.completion.chunk: delta {role?, content?}; a last chunk without text has delta {}.
std::string ChatChunkJson(const ResponseMeta& meta, const StreamDelta& delta);
// text_completion (streamed): choices[0] = {index, text, logprobs: null, finish_reason}.
std::string CompletionChunkJson(const ResponseMeta& meta, const StreamDelta& delta);
// The chunk sent after the last one when stream_options.include_usage: choices [] and usage.
std::string ChatUsageChunkJson(const ResponseMeta& meta, const Usage& usage);
std::string CompletionUsageChunkJson(const ResponseMeta& meta, const Usage& usage);

// Server-sent events: "data: <json>\n\n", and "data: [DONE]\n\n" to end a stream.
std::string SseEvent(std::string_view json);
std::string SseDone();

// GET /v1/models: {"object": "list", "data": [{id, object: "model", created, owned_by}]}.
std::string ModelsJson(std::span<const std::string> model_ids, int64_t created);

}  // namespace aviary::serve
