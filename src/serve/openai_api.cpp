#include "serve/openai_api.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <exception>
#include <nlohmann/json.hpp>
#include <utility>

#include "formats/json_depth.h"

namespace aviary::serve {
namespace {

using nlohmann::json;
// Responses keep the field order of OpenAI's documentation, for people reading them with curl.
using ojson = nlohmann::ordered_json;

std::string FormatNumber(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

// Reads the fields of one JSON object in turn, keeping the first problem: the caller checks
// `error` once after all its reads. A field sent as null counts as left out, since some clients
// send every optional field.
class FieldReader {
 public:
  FieldReader(const json& object, std::string prefix)
      : object_(object), prefix_(std::move(prefix)) {}

  std::optional<ApiError> error;

  const json* Find(const char* name) const {
    const auto it = object_.find(name);
    return it == object_.end() || it->is_null() ? nullptr : &*it;
  }
  std::string Param(const char* name) const { return prefix_ + name; }

  void Fail(const char* name, const std::string& what) {
    if (!error) error = InvalidRequest("'" + Param(name) + "' " + what, Param(name));
  }

  void String(const char* name, std::string& out, bool required = false) {
    const json* v = Find(name);
    if (error) return;
    if (v == nullptr) {
      if (required) Fail(name, "is required");
    } else if (!v->is_string()) {
      Fail(name, "must be a string");
    } else {
      out = v->get<std::string>();
      if (required && out.empty()) Fail(name, "must not be empty");
    }
  }

  void Bool(const char* name, bool& out) {
    const json* v = Find(name);
    if (error || v == nullptr) return;
    if (!v->is_boolean()) return Fail(name, "must be a boolean");
    out = v->get<bool>();
  }

  // A number in [lo, hi], or (lo, hi] when `lo_open`.
  void Float(const char* name, double lo, bool lo_open, double hi, std::optional<float>& out) {
    const json* v = Find(name);
    if (error || v == nullptr) return;
    if (!v->is_number()) return Fail(name, "must be a number");
    const double x = v->get<double>();
    const bool above_lo = lo_open ? x > lo : x >= lo;
    if (!above_lo || !(x <= hi)) {
      return Fail(name, "must be in " + std::string(lo_open ? "(" : "[") + FormatNumber(lo) + ", " +
                            FormatNumber(hi) + "]; got " + FormatNumber(x));
    }
    out = static_cast<float>(x);
  }

  // An integer in [lo, hi]; JSON numbers beyond int64 are read without wrapping.
  void Int(const char* name, int lo, int hi, std::optional<int>& out) {
    const json* v = Find(name);
    if (error || v == nullptr) return;
    if (!v->is_number_integer()) return Fail(name, "must be an integer");
    bool in_range;
    if (v->is_number_unsigned()) {
      const uint64_t x = v->get<uint64_t>();
      in_range = x <= static_cast<uint64_t>(hi) && (lo <= 0 || x >= static_cast<uint64_t>(lo));
    } else {
      const int64_t x = v->get<int64_t>();
      in_range = x >= lo && x <= hi;
    }
    if (!in_range) {
      return Fail(name, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                            "]; got " + v->dump());
    }
    out = v->get<int>();
  }

  void Uint64(const char* name, std::optional<uint64_t>& out) {
    const json* v = Find(name);
    if (error || v == nullptr) return;
    if (!v->is_number_unsigned()) return Fail(name, "must be a non-negative integer");
    out = v->get<uint64_t>();
  }

  // A string or an array of up to `max` strings, none empty.
  void StopStrings(const char* name, int max, std::vector<std::string>& out) {
    const json* v = Find(name);
    if (error || v == nullptr) return;
    if (v->is_string()) {
      out = {v->get<std::string>()};
    } else if (v->is_array()) {
      if (v->size() > static_cast<size_t>(max)) {
        return Fail(name, "holds " + std::to_string(v->size()) + " strings; at most " +
                              std::to_string(max) + " are allowed");
      }
      for (const json& s : *v) {
        if (!s.is_string()) return Fail(name, "must be a string or an array of strings");
        out.push_back(s.get<std::string>());
      }
    } else {
      return Fail(name, "must be a string or an array of strings");
    }
    for (const std::string& s : out) {
      if (s.empty()) return Fail(name, "must not hold an empty string");
    }
  }

 private:
  const json& object_;
  std::string prefix_;
};

void ReadGenerationParams(FieldReader& r, const Limits& limits, GenerationParams& p) {
  r.Int("max_tokens", 1, limits.max_tokens, p.max_tokens);
  std::optional<int> max_completion_tokens;
  r.Int("max_completion_tokens", 1, limits.max_tokens, max_completion_tokens);
  if (max_completion_tokens) p.max_tokens = max_completion_tokens;
  r.Float("temperature", 0, false, 2, p.temperature);
  r.Float("top_p", 0, true, 1, p.top_p);
  r.Float("presence_penalty", -2, false, 2, p.presence_penalty);
  r.Float("frequency_penalty", -2, false, 2, p.frequency_penalty);
  r.Uint64("seed", p.seed);
  std::optional<int> n;
  r.Int("n", 1, limits.max_n, n);
  if (n) p.n = *n;
  r.StopStrings("stop", limits.max_stop, p.stop);
  r.Bool("stream", p.stream);
  if (const json* options = r.Find("stream_options"); options != nullptr && !r.error) {
    if (!options->is_object()) return r.Fail("stream_options", "must be an object");
    FieldReader nested(*options, "stream_options.");
    nested.Bool("include_usage", p.include_usage);
    if (nested.error) r.error = nested.error;
  }
  r.String("user", p.user);
  r.Float("penalty_decay", 0, true, 1, p.penalty_decay);
  r.String("state", p.state);
}

// The body as a JSON object, or the error to send. The size and nesting are checked on the text,
// before nlohmann builds (recursively) anything from it.
std::variant<json, ApiError> ParseBody(std::string_view body, const Limits& limits) {
  if (body.size() > limits.max_body_bytes) {
    ApiError e = InvalidRequest("the request body is " + std::to_string(body.size()) +
                                " bytes; the limit is " + std::to_string(limits.max_body_bytes));
    e.status = 413;
    return e;
  }
  if (JsonDepth(body) > limits.max_json_depth) {
    return InvalidRequest("the request body nests JSON deeper than " +
                          std::to_string(limits.max_json_depth) + " levels");
  }
  json root;
  try {
    root = json::parse(body);
  } catch (const json::parse_error& e) {
    // e.what() quotes the input, which may not be UTF-8: only the position is kept.
    return InvalidRequest("the request body is not valid JSON (error at byte " +
                          std::to_string(e.byte) + ")");
  } catch (const json::exception&) {  // a number too large for a double
    return InvalidRequest("the request body is not valid JSON (a number out of range)");
  }
  if (!root.is_object()) return InvalidRequest("the request body must be a JSON object");
  return root;
}

// A message's content: a string, or OpenAI's array of parts of which only "text" parts are
// supported (a text model has nothing to do with an image).
std::optional<ApiError> ReadContent(const json& content, const std::string& param,
                                    std::string& out) {
  if (content.is_string()) {
    out = content.get<std::string>();
    return std::nullopt;
  }
  if (!content.is_array()) {
    return InvalidRequest("'" + param + "' must be a string or an array of content parts", param);
  }
  for (size_t j = 0; j < content.size(); ++j) {
    const json& part = content[j];
    const std::string part_param = param + "[" + std::to_string(j) + "]";
    if (!part.is_object()) {
      return InvalidRequest("'" + part_param + "' must be an object", part_param);
    }
    FieldReader r(part, part_param + ".");
    std::string type, text;
    r.String("type", type, /*required=*/true);
    if (!r.error && type != "text") {
      r.Fail("type", "is '" + type + "'; only 'text' parts are supported");
    }
    const json* t = r.Find("text");
    if (!r.error && (t == nullptr || !t->is_string())) r.Fail("text", "must be a string");
    if (r.error) return r.error;
    out += t->get<std::string>();
  }
  return std::nullopt;
}

std::optional<ApiError> ReadMessages(FieldReader& root, std::vector<ChatMessage>& out) {
  const json* messages = root.Find("messages");
  if (messages == nullptr) return InvalidRequest("'messages' is required", "messages");
  if (!messages->is_array()) return InvalidRequest("'messages' must be an array", "messages");
  if (messages->empty()) {
    return InvalidRequest("'messages' must hold at least one message", "messages");
  }
  for (size_t i = 0; i < messages->size(); ++i) {
    const json& m = (*messages)[i];
    const std::string param = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) return InvalidRequest("'" + param + "' must be an object", param);
    FieldReader r(m, param + ".");
    ChatMessage message;
    r.String("role", message.role, /*required=*/true);
    if (r.error) return r.error;
    if (message.role == "developer") message.role = "system";  // OpenAI's newer name for it
    if (message.role != "system" && message.role != "user" && message.role != "assistant") {
      return InvalidRequest("'" + param + ".role' is '" + message.role +
                                "'; the roles are system, user and assistant",
                            param + ".role");
    }
    const json* content = r.Find("content");
    if (content == nullptr) {
      // OpenAI lets an assistant message that only called tools have no content.
      if (message.role != "assistant") {
        return InvalidRequest("'" + param + ".content' is required", param + ".content");
      }
    } else if (auto e = ReadContent(*content, param + ".content", message.content)) {
      return e;
    }
    out.push_back(std::move(message));
  }
  return std::nullopt;
}

// The prompt as one string: OpenAI also takes several prompts (one completion each) or token
// ids; those are refused by name rather than half-supported.
std::optional<ApiError> ReadPrompt(FieldReader& root, std::string& out) {
  const json* prompt = root.Find("prompt");
  if (prompt == nullptr) return InvalidRequest("'prompt' is required", "prompt");
  if (prompt->is_string()) {
    out = prompt->get<std::string>();
    return std::nullopt;
  }
  if (prompt->is_array() && prompt->size() == 1 && (*prompt)[0].is_string()) {
    out = (*prompt)[0].get<std::string>();
    return std::nullopt;
  }
  return InvalidRequest(
      "'prompt' must be a string or an array of one string (several prompts and token ids are "
      "not supported)",
      "prompt");
}

template <class Request, class ReadInput>
Parsed<Request> ParseRequest(std::string_view body, const Limits& limits, ReadInput read_input) {
  try {
    std::variant<json, ApiError> parsed = ParseBody(body, limits);
    if (auto* e = std::get_if<ApiError>(&parsed)) return std::move(*e);
    const json& root = std::get<json>(parsed);
    Request request;
    FieldReader r(root, "");
    // Optional: a server holds one model, so a request without one means that one.
    r.String("model", request.model, /*required=*/false);
    if (r.error) return *r.error;
    if (request.model.empty() && root.contains("model") && root["model"].is_string()) {
      return InvalidRequest("'model' must not be empty", "model");
    }
    if (auto e = read_input(r, request)) return *e;
    ReadGenerationParams(r, limits, request.params);
    if (r.error) return *r.error;
    return request;
  } catch (const std::exception& e) {
    // The reads check each type before taking a value, so this is out of memory at worst; the
    // promise is still an ApiError and never an exception.
    ApiError error = InvalidRequest(std::string("the request could not be read: ") + e.what());
    error.status = 500;
    error.type = "server_error";
    return error;
  }
}

std::string Dump(const ojson& j) {
  // A model can emit bytes that are not UTF-8; JSON cannot carry them, so each becomes U+FFFD.
  return j.dump(-1, ' ', false, ojson::error_handler_t::replace);
}

const char* FinishReasonName(FinishReason reason) {
  return reason == FinishReason::kLength ? "length" : "stop";
}

ojson UsageJson(const Usage& usage) {
  return {{"prompt_tokens", usage.prompt_tokens},
          {"completion_tokens", usage.completion_tokens},
          {"total_tokens", usage.prompt_tokens + usage.completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", usage.cached_tokens}}}};
}

ojson Envelope(const ResponseMeta& meta, const char* object) {
  return {{"id", meta.id}, {"object", object}, {"created", meta.created}, {"model", meta.model}};
}

ojson OptionalFinish(const std::optional<FinishReason>& reason) {
  return reason ? ojson(FinishReasonName(*reason)) : ojson(nullptr);
}

}  // namespace

std::string ApiError::Json() const {
  const ojson body = {{"error",
                       {{"message", message},
                        {"type", type},
                        {"param", param.empty() ? ojson(nullptr) : ojson(param)},
                        {"code", code.empty() ? ojson(nullptr) : ojson(code)}}}};
  return Dump(body);
}

ApiError InvalidRequest(std::string message, std::string param) {
  ApiError e;
  e.message = std::move(message);
  e.param = std::move(param);
  return e;
}

Parsed<ChatRequest> ParseChatRequest(std::string_view body, const Limits& limits) {
  return ParseRequest<ChatRequest>(body, limits, [](FieldReader& r, ChatRequest& request) {
    r.Bool("think", request.think);
    if (r.error) return r.error;
    return ReadMessages(r, request.messages);
  });
}

bool IsValidStateId(std::string_view id) {
  return !id.empty() && id.size() <= 64 && std::all_of(id.begin(), id.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
  });
}

Parsed<StateRequest> ParseStateRequest(std::string_view body, const Limits& limits) {
  try {
    std::variant<json, ApiError> parsed = ParseBody(body, limits);
    if (auto* e = std::get_if<ApiError>(&parsed)) return std::move(*e);
    const json& root = std::get<json>(parsed);
    StateRequest request;
    FieldReader r(root, "");
    r.String("id", request.id, /*required=*/true);
    if (r.error) return *r.error;
    if (!IsValidStateId(request.id)) return InvalidRequest("'id' must be 1 to 64 letters, digits, '-', '_' or '.'", "id");
    const bool chat = root.contains("messages");
    if (!chat && !root.contains("prompt")) {
      return InvalidRequest("give the conversation as 'messages' or as 'prompt'", "messages");
    }
    if (chat) {
      Parsed<ChatRequest> c = ParseChatRequest(body, limits);
      if (auto* e = std::get_if<ApiError>(&c)) return std::move(*e);
      request.conversation = std::move(std::get<ChatRequest>(c));
    } else {
      Parsed<CompletionRequest> c = ParseCompletionRequest(body, limits);
      if (auto* e = std::get_if<ApiError>(&c)) return std::move(*e);
      request.conversation = std::move(std::get<CompletionRequest>(c));
    }
    return request;
  } catch (const std::exception& e) {
    return ApiError{500, std::string("cannot read the request: ") + e.what(), "server_error", "", ""};
  }
}

Parsed<CompletionRequest> ParseCompletionRequest(std::string_view body, const Limits& limits) {
  return ParseRequest<CompletionRequest>(
      body, limits,
      [](FieldReader& r, CompletionRequest& request) { return ReadPrompt(r, request.prompt); });
}

std::string ChatCompletionJson(const ResponseMeta& meta, std::span<const Choice> choices,
                               const Usage& usage) {
  ojson j = Envelope(meta, "chat.completion");
  ojson& list = j["choices"] = ojson::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    list.push_back({{"index", i},
                    {"message", {{"role", "assistant"}, {"content", choices[i].text}}},
                    {"logprobs", nullptr},
                    {"finish_reason", FinishReasonName(choices[i].finish_reason)}});
  }
  j["usage"] = UsageJson(usage);
  return Dump(j);
}

std::string CompletionJson(const ResponseMeta& meta, std::span<const Choice> choices,
                           const Usage& usage) {
  ojson j = Envelope(meta, "text_completion");
  ojson& list = j["choices"] = ojson::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    list.push_back({{"index", i},
                    {"text", choices[i].text},
                    {"logprobs", nullptr},
                    {"finish_reason", FinishReasonName(choices[i].finish_reason)}});
  }
  j["usage"] = UsageJson(usage);
  return Dump(j);
}

std::string ChatChunkJson(const ResponseMeta& meta, const StreamDelta& delta) {
  ojson j = Envelope(meta, "chat.completion.chunk");
  ojson d = ojson::object();
  if (delta.first) d["role"] = "assistant";
  if (delta.first || !delta.text.empty()) d["content"] = delta.text;
  j["choices"] = ojson::array({{{"index", delta.index},
                                {"delta", std::move(d)},
                                {"logprobs", nullptr},
                                {"finish_reason", OptionalFinish(delta.finish_reason)}}});
  return Dump(j);
}

std::string CompletionChunkJson(const ResponseMeta& meta, const StreamDelta& delta) {
  ojson j = Envelope(meta, "text_completion");
  j["choices"] = ojson::array({{{"index", delta.index},
                                {"text", delta.text},
                                {"logprobs", nullptr},
                                {"finish_reason", OptionalFinish(delta.finish_reason)}}});
  return Dump(j);
}

std::string ChatUsageChunkJson(const ResponseMeta& meta, const Usage& usage) {
  ojson j = Envelope(meta, "chat.completion.chunk");
  j["choices"] = ojson::array();
  j["usage"] = UsageJson(usage);
  return Dump(j);
}

std::string CompletionUsageChunkJson(const ResponseMeta& meta, const Usage& usage) {
  ojson j = Envelope(meta, "text_completion");
  j["choices"] = ojson::array();
  j["usage"] = UsageJson(usage);
  return Dump(j);
}

std::string SseEvent(std::string_view json_text) {
  std::string event = "data: ";
  event.append(json_text);
  event += "\n\n";
  return event;
}

std::string SseDone() { return "data: [DONE]\n\n"; }

std::string ModelsJson(std::span<const std::string> model_ids, int64_t created) {
  ojson data = ojson::array();
  for (const std::string& id : model_ids) {
    data.push_back({{"id", id}, {"object", "model"}, {"created", created}, {"owned_by", "aviary"}});
  }
  return Dump({{"object", "list"}, {"data", std::move(data)}});
}

}  // namespace aviary::serve
