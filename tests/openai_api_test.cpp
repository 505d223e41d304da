// The OpenAI API's request parsing (every field, every kind of bad input, with the field each
// error names) and its response bodies (field names and types as OpenAI's clients read them).
#include "serve/openai_api.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "aviary/tokenizer.h"

namespace aviary::serve {
namespace {

using nlohmann::json;

const Limits kLimits;

template <class Request>
const Request& Ok(const Parsed<Request>& parsed) {
  if (const auto* e = std::get_if<ApiError>(&parsed)) {
    ADD_FAILURE() << "unexpected error: " << e->Json();
    static const Request empty;
    return empty;
  }
  return std::get<Request>(parsed);
}

template <class Request>
ApiError Err(const Parsed<Request>& parsed) {
  if (const auto* e = std::get_if<ApiError>(&parsed)) return *e;
  ADD_FAILURE() << "the request was accepted";
  return {};
}

ApiError ChatError(const std::string& body) { return Err(ParseChatRequest(body, kLimits)); }
ApiError CompletionError(const std::string& body) {
  return Err(ParseCompletionRequest(body, kLimits));
}

// A chat body with one user message and `extra` fields appended.
std::string Chat(const std::string& extra) {
  return R"({"model":"m","messages":[{"role":"user","content":"hi"}])" +
         (extra.empty() ? "" : "," + extra) + "}";
}

TEST(OpenAiRequest, MinimalChat) {
  const ChatRequest r = Ok(ParseChatRequest(Chat(""), kLimits));
  EXPECT_EQ(r.model, "m");
  ASSERT_EQ(r.messages.size(), 1u);
  EXPECT_EQ(r.messages[0].role, "user");
  EXPECT_EQ(r.messages[0].content, "hi");
  const GenerationParams& p = r.params;
  EXPECT_FALSE(p.max_tokens || p.temperature || p.top_p || p.presence_penalty ||
               p.frequency_penalty || p.seed || p.penalty_decay);
  EXPECT_EQ(p.n, 1);
  EXPECT_TRUE(p.stop.empty());
  EXPECT_FALSE(p.stream);
  EXPECT_FALSE(p.include_usage);
  EXPECT_TRUE(p.state.empty());
}

TEST(OpenAiRequest, FullChat) {
  const std::string body = R"({
    "model": "rwkv", "messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "developer", "content": "Really."},
      {"role": "user", "content": [{"type": "text", "text": "Hello, "},
                                   {"type": "text", "text": "world"}]},
      {"role": "assistant", "content": null},
      {"role": "user", "content": "\u00e9t\u00e9"}],
    "stream": true, "stream_options": {"include_usage": true},
    "max_tokens": 10, "max_completion_tokens": 20, "temperature": 0, "top_p": 0.5,
    "presence_penalty": -2, "frequency_penalty": 2, "seed": 18446744073709551615,
    "n": 3, "stop": ["\n\n", "User:"], "user": "u1", "penalty_decay": 0.996,
    "state": "conv-42", "logit_bias": {"1": 2}, "tools": [], "response_format": null})";
  const ChatRequest r = Ok(ParseChatRequest(body, kLimits));
  ASSERT_EQ(r.messages.size(), 5u);
  EXPECT_EQ(r.messages[1].role, "system");
  EXPECT_EQ(r.messages[2].content, "Hello, world");
  EXPECT_EQ(r.messages[3].role, "assistant");
  EXPECT_EQ(r.messages[3].content, "");
  EXPECT_EQ(r.messages[4].content, "\xc3\xa9t\xc3\xa9");
  const GenerationParams& p = r.params;
  EXPECT_TRUE(p.stream);
  EXPECT_TRUE(p.include_usage);
  EXPECT_EQ(p.max_tokens, 20);  // max_completion_tokens wins
  EXPECT_EQ(p.temperature, 0.0f);
  EXPECT_EQ(p.top_p, 0.5f);
  EXPECT_EQ(p.presence_penalty, -2.0f);
  EXPECT_EQ(p.frequency_penalty, 2.0f);
  EXPECT_EQ(p.seed, 18446744073709551615ull);
  EXPECT_EQ(p.n, 3);
  EXPECT_EQ(p.stop, (std::vector<std::string>{"\n\n", "User:"}));
  EXPECT_EQ(p.user, "u1");
  EXPECT_EQ(p.penalty_decay, 0.996f);
  EXPECT_EQ(p.state, "conv-42");
}

TEST(OpenAiRequest, NullMeansLeftOut) {
  const ChatRequest r = Ok(ParseChatRequest(
      Chat(R"("temperature":null,"stop":null,"n":null,"seed":null,"stream_options":null)"),
      kLimits));
  EXPECT_FALSE(r.params.temperature);
  EXPECT_EQ(r.params.n, 1);
}

TEST(OpenAiRequest, Completions) {
  const CompletionRequest minimal =
      Ok(ParseCompletionRequest(R"({"model":"m","prompt":"Once"})", kLimits));
  EXPECT_EQ(minimal.prompt, "Once");
  const CompletionRequest full = Ok(ParseCompletionRequest(
      R"({"model":"m","prompt":["Once upon"],"max_tokens":5,"stop":"\n","stream":true,
          "echo":false,"best_of":1,"suffix":null})",
      kLimits));
  EXPECT_EQ(full.prompt, "Once upon");
  EXPECT_EQ(full.params.max_tokens, 5);
  EXPECT_EQ(full.params.stop, std::vector<std::string>{"\n"});
  EXPECT_TRUE(full.params.stream);
}

TEST(OpenAiRequest, PromptShapes) {
  for (const char* prompt : {"[]", R"(["a","b"])", "[1,2,3]", "[[1]]", "5", "{}"}) {
    const ApiError e = CompletionError(std::string(R"({"model":"m","prompt":)") + prompt + "}");
    EXPECT_EQ(e.param, "prompt") << prompt;
    EXPECT_NE(e.message.find("not supported"), std::string::npos) << e.message;
  }
  EXPECT_EQ(CompletionError(R"({"model":"m"})").param, "prompt");
}

TEST(OpenAiRequest, FieldErrorsNameTheField) {
  struct Case {
    std::string extra, param;
  };
  const Case cases[] = {
      {R"("temperature":2.5)", "temperature"},
      {R"("temperature":-0.1)", "temperature"},
      {R"("temperature":"hot")", "temperature"},
      {R"("top_p":0)", "top_p"},
      {R"("top_p":1.01)", "top_p"},
      {R"("presence_penalty":-2.01)", "presence_penalty"},
      {R"("frequency_penalty":3)", "frequency_penalty"},
      {R"("penalty_decay":0)", "penalty_decay"},
      {R"("penalty_decay":1.5)", "penalty_decay"},
      {R"("max_tokens":0)", "max_tokens"},
      {R"("max_tokens":-1)", "max_tokens"},
      {R"("max_tokens":4097)", "max_tokens"},
      {R"("max_tokens":1.5)", "max_tokens"},
      {R"("max_tokens":99999999999999999999)", "max_tokens"},
      {R"("max_tokens":18446744073709551615)", "max_tokens"},
      {R"("max_completion_tokens":"10")", "max_completion_tokens"},
      {R"("n":0)", "n"},
      {R"("n":9)", "n"},
      {R"("seed":-1)", "seed"},
      {R"("seed":1.5)", "seed"},
      {R"("seed":1e30)", "seed"},
      {R"("stop":["a","b","c","d","e"])", "stop"},
      {R"("stop":[""])", "stop"},
      {R"("stop":"")", "stop"},
      {R"("stop":[1])", "stop"},
      {R"("stop":true)", "stop"},
      {R"("stream":"yes")", "stream"},
      {R"("stream":1)", "stream"},
      {R"("stream_options":true)", "stream_options"},
      {R"("stream_options":{"include_usage":"yes"})", "stream_options.include_usage"},
      {R"("user":5)", "user"},
      {R"("state":["x"])", "state"},
  };
  for (const Case& c : cases) {
    const ApiError e = ChatError(Chat(c.extra));
    EXPECT_EQ(e.status, 400) << c.extra;
    EXPECT_EQ(e.param, c.param) << c.extra << ": " << e.message;
    EXPECT_NE(e.message.find("'" + c.param + "'"), std::string::npos) << e.message;
    // The completions endpoint shares these fields and their checks.
    EXPECT_EQ(CompletionError(R"({"model":"m","prompt":"p",)" + c.extra + "}").param, c.param);
  }
}

TEST(OpenAiRequest, LimitsComeFromTheServer) {
  Limits limits;
  limits.max_n = 2;
  limits.max_tokens = 100;
  limits.max_stop = 1;
  EXPECT_EQ(Err(ParseChatRequest(Chat(R"("n":3)"), limits)).param, "n");
  EXPECT_EQ(Err(ParseChatRequest(Chat(R"("max_tokens":101)"), limits)).param, "max_tokens");
  EXPECT_EQ(Err(ParseChatRequest(Chat(R"("stop":["a","b"])"), limits)).param, "stop");
  EXPECT_EQ(Ok(ParseChatRequest(Chat(R"("n":2,"max_tokens":100,"stop":["a"])"), limits)).params.n,
            2);
}

TEST(OpenAiRequest, MessageErrors) {
  struct Case {
    std::string messages, param;
  };
  const Case cases[] = {
      {"", "messages"},
      {R"("messages":{})", "messages"},
      {R"("messages":[])", "messages"},
      {R"("messages":["hi"])", "messages[0]"},
      {R"("messages":[{"content":"hi"}])", "messages[0].role"},
      {R"("messages":[{"role":"tool","content":"x"}])", "messages[0].role"},
      {R"("messages":[{"role":7,"content":"x"}])", "messages[0].role"},
      {R"("messages":[{"role":"user","content":"a"},{"role":"user"}])", "messages[1].content"},
      {R"("messages":[{"role":"user","content":5}])", "messages[0].content"},
      {R"("messages":[{"role":"user","content":[5]}])", "messages[0].content[0]"},
      {R"("messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}])",
       "messages[0].content[0].type"},
      {R"("messages":[{"role":"user","content":[{"text":"a"}]}])", "messages[0].content[0].type"},
      {R"("messages":[{"role":"user","content":[{"type":"text"}]}])",
       "messages[0].content[0].text"},
  };
  for (const Case& c : cases) {
    const std::string body = R"({"model":"m")" + (c.messages.empty() ? "" : "," + c.messages) + "}";
    const ApiError e = ChatError(body);
    EXPECT_EQ(e.param, c.param) << body << ": " << e.message;
  }
}

TEST(OpenAiRequest, ModelMayBeLeftOutButNotEmptyOrMistyped) {
  EXPECT_EQ(Ok(ParseChatRequest(R"({"messages":[{"role":"user","content":"hi"}]})", kLimits)).model,
            "");
  EXPECT_EQ(ChatError(R"({"model":"","messages":[{"role":"user","content":"hi"}]})").param,
            "model");
  EXPECT_EQ(CompletionError(R"({"model":3,"prompt":"p"})").param, "model");
}

TEST(OpenAiRequest, BadBodies) {
  for (const std::string& body : std::vector<std::string>{
           "", "{", "not json", "[]", "\"text\"", "null", "42", R"({"model":"m",})",
           "{\"model\":\"\xff\"}", R"({"model":"m","prompt":"p","max_tokens":1e999})",
           std::string("{\"model\":\"m\0\"}", 13)}) {
    const ApiError e = CompletionError(body);
    EXPECT_EQ(e.status, 400) << body;
    EXPECT_EQ(e.param, "") << body;
    // The error is valid JSON even though the body was not.
    EXPECT_TRUE(json::accept(e.Json())) << e.Json();
  }
}

TEST(OpenAiRequest, BodyTooLarge) {
  Limits limits;
  limits.max_body_bytes = 64;
  const std::string body = Chat(R"("user":")" + std::string(100, 'x') + "\"");
  const ApiError e = Err(ParseChatRequest(body, limits));
  EXPECT_EQ(e.status, 413);
  EXPECT_NE(e.message.find("the limit is 64"), std::string::npos) << e.message;
  // Checked on the size alone: a huge body that is not even JSON gets the same answer.
  EXPECT_EQ(Err(ParseChatRequest(std::string(65, '['), limits)).status, 413);
}

TEST(OpenAiRequest, DeepNestingIsRefusedBeforeParsing) {
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  const ApiError e = Err(ParseChatRequest(Chat("\"x\":" + deep), kLimits));
  EXPECT_EQ(e.status, 400);
  EXPECT_NE(e.message.find("deeper than 32"), std::string::npos) << e.message;
  // Nesting within the limit in an unknown field is fine.
  const std::string shallow = std::string(20, '[') + std::string(20, ']');
  EXPECT_EQ(Ok(ParseChatRequest(Chat("\"x\":" + shallow), kLimits)).model, "m");
}

TEST(OpenAiResponse, ErrorShape) {
  const json e = json::parse(InvalidRequest("'n' must be in [1, 8]; got 9", "n").Json());
  ASSERT_TRUE(e.contains("error"));
  const json& inner = e["error"];
  EXPECT_EQ(inner["message"], "'n' must be in [1, 8]; got 9");
  EXPECT_EQ(inner["type"], "invalid_request_error");
  EXPECT_EQ(inner["param"], "n");
  EXPECT_TRUE(inner["code"].is_null());
  EXPECT_EQ(inner.size(), 4u);
  EXPECT_TRUE(json::parse(InvalidRequest("bad").Json())["error"]["param"].is_null());
}

const ResponseMeta kMeta{"chatcmpl-1", 1700000000, "rwkv"};

StreamDelta Delta(int index, bool first, std::string text,
                  std::optional<FinishReason> finish_reason = std::nullopt) {
  StreamDelta d;
  d.index = index;
  d.first = first;
  d.text = std::move(text);
  d.finish_reason = finish_reason;
  return d;
}

void ExpectEnvelope(const json& j, const char* object) {
  EXPECT_EQ(j["id"], kMeta.id);
  EXPECT_EQ(j["object"], object);
  EXPECT_TRUE(j["created"].is_number_integer());
  EXPECT_EQ(j["created"], kMeta.created);
  EXPECT_EQ(j["model"], "rwkv");
}

TEST(OpenAiResponse, ChatCompletion) {
  const Choice choices[] = {{"Hi!", FinishReason::kStop}, {"Hel", FinishReason::kLength}};
  const json j = json::parse(ChatCompletionJson(kMeta, choices, Usage{7, 3}));
  ExpectEnvelope(j, "chat.completion");
  ASSERT_EQ(j["choices"].size(), 2u);
  const json& c0 = j["choices"][0];
  EXPECT_EQ(c0["index"], 0);
  EXPECT_EQ(c0["message"], json({{"role", "assistant"}, {"content", "Hi!"}}));
  EXPECT_TRUE(c0["logprobs"].is_null());
  EXPECT_EQ(c0["finish_reason"], "stop");
  EXPECT_EQ(j["choices"][1]["index"], 1);
  EXPECT_EQ(j["choices"][1]["finish_reason"], "length");
  EXPECT_EQ(j["usage"],
            json({{"prompt_tokens", 7},
                  {"completion_tokens", 3},
                  {"total_tokens", 10},
                  {"prompt_tokens_details", {{"cached_tokens", 0}}}}));
}

TEST(OpenAiResponse, Completion) {
  const Choice choices[] = {{" there", FinishReason::kLength}};
  const json j = json::parse(CompletionJson(kMeta, choices, Usage{2, 16}));
  ExpectEnvelope(j, "text_completion");
  ASSERT_EQ(j["choices"].size(), 1u);
  EXPECT_EQ(
      j["choices"][0],
      json({{"index", 0}, {"text", " there"}, {"logprobs", nullptr}, {"finish_reason", "length"}}));
  EXPECT_EQ(j["usage"]["total_tokens"], 18);
}

TEST(OpenAiResponse, ChatChunks) {
  const json first = json::parse(ChatChunkJson(kMeta, Delta(0, true, "")));
  ExpectEnvelope(first, "chat.completion.chunk");
  ASSERT_EQ(first["choices"].size(), 1u);
  EXPECT_EQ(first["choices"][0]["delta"], json({{"role", "assistant"}, {"content", ""}}));
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());

  const json middle = json::parse(ChatChunkJson(kMeta, Delta(2, false, "lo")));
  EXPECT_EQ(middle["choices"][0]["index"], 2);
  EXPECT_EQ(middle["choices"][0]["delta"], json({{"content", "lo"}}));

  const json last = json::parse(ChatChunkJson(kMeta, Delta(0, false, "", FinishReason::kStop)));
  EXPECT_TRUE(last["choices"][0]["delta"].is_object());
  EXPECT_TRUE(last["choices"][0]["delta"].empty());
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");

  const json usage = json::parse(ChatUsageChunkJson(kMeta, Usage{1, 2}));
  ExpectEnvelope(usage, "chat.completion.chunk");
  EXPECT_TRUE(usage["choices"].is_array() && usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["total_tokens"], 3);
}

TEST(OpenAiResponse, CompletionChunks) {
  const json chunk = json::parse(CompletionChunkJson(kMeta, Delta(1, false, "ab")));
  ExpectEnvelope(chunk, "text_completion");
  EXPECT_EQ(
      chunk["choices"][0],
      json({{"index", 1}, {"text", "ab"}, {"logprobs", nullptr}, {"finish_reason", nullptr}}));
  const json last =
      json::parse(CompletionChunkJson(kMeta, Delta(0, false, "", FinishReason::kLength)));
  EXPECT_EQ(last["choices"][0]["text"], "");
  EXPECT_EQ(last["choices"][0]["finish_reason"], "length");
  const json usage = json::parse(CompletionUsageChunkJson(kMeta, Usage{4, 5}));
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["completion_tokens"], 5);
}

TEST(OpenAiResponse, SseFraming) {
  const std::string chunk = ChatChunkJson(kMeta, Delta(0, false, "line one\nline two"));
  // One event per chunk: the JSON is on one line (the newline in the text is escaped).
  EXPECT_EQ(chunk.find('\n'), std::string::npos);
  EXPECT_EQ(SseEvent(chunk), "data: " + chunk + "\n\n");
  EXPECT_EQ(SseDone(), "data: [DONE]\n\n");
}

TEST(OpenAiResponse, Models) {
  const std::vector<std::string> ids = {"rwkv7-g1", "other"};
  const json j = json::parse(ModelsJson(ids, 1700000000));
  EXPECT_EQ(j["object"], "list");
  ASSERT_EQ(j["data"].size(), 2u);
  EXPECT_EQ(j["data"][0], json({{"id", "rwkv7-g1"},
                                {"object", "model"},
                                {"created", 1700000000},
                                {"owned_by", "aviary"}}));
  EXPECT_EQ(j["data"][1]["id"], "other");
  EXPECT_TRUE(json::parse(ModelsJson({}, 0))["data"].empty());
}

TEST(OpenAiResponse, InvalidUtf8BecomesReplacementCharacters) {
  // A lone continuation byte, a truncated 3-byte character, and a byte never valid in UTF-8.
  const Choice choices[] = {
      {"a\x80"
       "b\xe2\x82"
       "c\xff",
       FinishReason::kStop}};
  const std::string text = ChatCompletionJson(kMeta, choices, Usage{});
  ASSERT_TRUE(json::accept(text)) << text;
  const std::string content = json::parse(text)["choices"][0]["message"]["content"];
  const std::string fffd = "\xef\xbf\xbd";
  EXPECT_EQ(content, "a" + fffd + "b" + fffd + "c" + fffd);
  // Valid text, including 4-byte characters, passes unchanged.
  const std::string emoji = "\xf0\x9f\x90\xa6 bird";
  EXPECT_EQ(json::parse(CompletionChunkJson(kMeta, Delta(0, false, emoji)))["choices"][0]["text"],
            emoji);
}

TEST(OpenAiResponse, StreamedCharacterSplitOverTokens) {
  // "€" (e2 82 ac) emitted as two tokens: held back by Utf8Stream, it arrives whole in one
  // chunk rather than as replacement characters in two.
  Utf8Stream stream;
  std::string received;
  for (const char* token : {"1 \xe2\x82", "\xac!"}) {
    const json chunk = json::parse(ChatChunkJson(kMeta, Delta(0, false, stream.Push(token))));
    if (chunk["choices"][0]["delta"].contains("content")) {
      received += chunk["choices"][0]["delta"]["content"].get<std::string>();
    }
  }
  EXPECT_EQ(received, "1 \xe2\x82\xac!");
}

}  // namespace
}  // namespace aviary::serve
