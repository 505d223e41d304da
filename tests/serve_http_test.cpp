// `aviary serve` over HTTP (src/serve/server.h), in-process on a free loopback port and as the
// real command: greedy completions equal `aviary generate --temperature 0` alone and among 16
// concurrent requests, streaming, errors, API keys, saved states, metrics, disconnects and a
// clean shutdown on SIGTERM.
#include "serve/server.h"

#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "aviary/chat.h"
#include "aviary/model.h"
#include "aviary/tokenizer.h"
#include "serve/engine.h"
#include "test_data.h"

namespace aviary::serve {
namespace {

using json = nlohmann::json;
using testing::SharedPath;

constexpr char kModel[] = "models/tiny-rwkv-7v0-834K-FP32.bin";
constexpr char kModelId[] = "tiny-rwkv-7v0-834K-FP32";

// A server on a free port with its engine, running on a thread of its own.
class TestServer {
 public:
  explicit TestServer(ServerOptions options = {}, EngineOptions engine_options = {}) {
    model_ = Model::Load(SharedPath(kModel));
    tokenizer_ = TokenizerForModel(model_->info());
    engine_ = std::make_unique<Engine>(*model_, *tokenizer_, engine_options);
    options.port = 0;
    options.model_id = kModelId;
    server_ = std::make_unique<Server>(*engine_, *tokenizer_, WorldTemplate(), options);
    port_ = server_->Bind();
    thread_ = std::thread([this] { server_->Run(); });
  }
  ~TestServer() {
    server_->Stop(std::chrono::milliseconds(0));
    thread_.join();
  }
  httplib::Client Client() const {
    httplib::Client c("127.0.0.1", port_);
    c.set_read_timeout(std::chrono::seconds(60));
    return c;
  }
  int port() const { return port_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  Server& server() { return *server_; }
  const Model& model() const { return *model_; }

 private:
  std::unique_ptr<Model> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<Server> server_;
  int port_ = 0;
  std::thread thread_;
};

json Body(const httplib::Result& r) {
  if (!r) return json();
  return json::parse(r->body, nullptr, false);
}

// The text `aviary generate --temperature 0` writes for the prompt.
std::string GenerateCli(const std::string& prompt, int tokens) {
  const std::string cmd = std::string(AVIARY_CLI) + " generate --model " + SharedPath(kModel) +
                          " --temperature 0 --tokens " + std::to_string(tokens) + " --prompt '" +
                          prompt + "'";
  FILE* p = ::popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  EXPECT_EQ(::pclose(p), 0) << cmd;
  return out;
}

json CompletionBody(const std::string& prompt, int max_tokens, bool stream = false) {
  return {{"model", kModelId}, {"prompt", prompt}, {"max_tokens", max_tokens},
          {"temperature", 0}, {"stream", stream}};
}

// The data lines of a server-sent event stream.
std::vector<std::string> SseData(const std::string& body) {
  std::vector<std::string> out;
  size_t pos = 0;
  while ((pos = body.find("data: ", pos)) != std::string::npos) {
    const size_t end = body.find("\n\n", pos);
    out.push_back(body.substr(pos + 6, end - pos - 6));
    pos = end;
  }
  return out;
}

TEST(ServeHttp, GreedyCompletionEqualsGenerateAloneAndAmongSixteen) {
  REQUIRE_SHARED(kModel);
  EngineOptions eo;
  eo.parallel = 16;
  TestServer server({}, eo);
  constexpr int kTokens = 48;
  std::vector<std::string> prompts, expected;
  for (int i = 0; i < 16; ++i) {
    prompts.push_back("Story " + std::to_string(i) + (i % 2 ? " of the sea" : " about a king"));
    expected.push_back(GenerateCli(prompts.back(), kTokens));
  }
  // Alone.
  httplib::Client c = server.Client();
  const json alone = Body(c.Post("/v1/completions", CompletionBody(prompts[0], kTokens).dump(),
                                 "application/json"));
  ASSERT_TRUE(alone.is_object());
  EXPECT_EQ(alone["choices"][0]["text"], expected[0]);
  EXPECT_EQ(alone["usage"]["completion_tokens"], kTokens);
  // Sixteen at once, half of them streamed.
  std::vector<std::string> got(16);
  std::vector<std::thread> clients;
  for (int i = 0; i < 16; ++i) {
    clients.emplace_back([&, i] {
      httplib::Client ci = server.Client();
      const bool stream = i % 2 == 1;
      auto r = ci.Post("/v1/completions", CompletionBody(prompts[i], kTokens, stream).dump(),
                       "application/json");
      if (!r || r->status != 200) return;
      if (!stream) {
        got[i] = Body(r)["choices"][0]["text"];
        return;
      }
      for (const std::string& d : SseData(r->body)) {
        if (d == "[DONE]") break;
        const json chunk = json::parse(d);
        got[i] += chunk["choices"][0]["text"].get<std::string>();
      }
    });
  }
  for (auto& t : clients) t.join();
  for (int i = 0; i < 16; ++i) EXPECT_EQ(got[i], expected[i]) << "request " << i;
}

TEST(ServeHttp, StreamedChatEndsWithDoneAndMatchesTheWholeReply) {
  REQUIRE_SHARED(kModel);
  TestServer server;
  httplib::Client c = server.Client();
  json req = {{"messages", {{{"role", "system"}, {"content", "Be brief."}},
                            {{"role", "user"}, {"content", "Hello there"}}}},
              {"max_tokens", 30}, {"temperature", 0}};
  const json whole = Body(c.Post("/v1/chat/completions", req.dump(), "application/json"));
  ASSERT_TRUE(whole.is_object()) << whole;
  EXPECT_EQ(whole["object"], "chat.completion");
  EXPECT_EQ(whole["choices"][0]["message"]["role"], "assistant");
  req["stream"] = true;
  req["stream_options"] = {{"include_usage", true}};
  auto r = c.Post("/v1/chat/completions", req.dump(), "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_NE(r->get_header_value("Content-Type").find("text/event-stream"), std::string::npos);
  const std::vector<std::string> events = SseData(r->body);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  bool saw_role = false, saw_finish = false, saw_usage = false;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const json chunk = json::parse(events[i]);
    EXPECT_EQ(chunk["object"], "chat.completion.chunk");
    if (chunk.contains("usage") && !chunk["usage"].is_null()) {
      saw_usage = true;
      EXPECT_EQ(chunk["usage"]["completion_tokens"], whole["usage"]["completion_tokens"]);
      // The same conversation again: its whole prompt came from the state cache.
      EXPECT_EQ(chunk["usage"]["prompt_tokens_details"]["cached_tokens"], whole["usage"]["prompt_tokens"]);
      continue;
    }
    const json& delta = chunk["choices"][0]["delta"];
    if (delta.contains("role")) saw_role = true;
    if (delta.contains("content")) text += delta["content"].get<std::string>();
    if (!chunk["choices"][0]["finish_reason"].is_null()) {
      saw_finish = true;
      EXPECT_EQ(chunk["choices"][0]["finish_reason"], whole["choices"][0]["finish_reason"]);
    }
  }
  EXPECT_TRUE(saw_role && saw_finish && saw_usage);
  EXPECT_EQ(text, whole["choices"][0]["message"]["content"]);
}

TEST(ServeHttp, NextTurnOfAChatReadsOnlyTheNewTokens) {
  REQUIRE_SHARED(kModel);
  TestServer server;
  httplib::Client c = server.Client();
  json messages = {{{"role", "user"}, {"content", "Tell me about the sea."}}};
  int cached_before = 0;
  for (int turn = 0; turn < 4; ++turn) {
    const json req = {{"messages", messages}, {"max_tokens", 12}, {"temperature", 0}};
    const json r = Body(c.Post("/v1/chat/completions", req.dump(), "application/json"));
    ASSERT_TRUE(r.is_object());
    const int prompt = r["usage"]["prompt_tokens"], cached = r["usage"]["prompt_tokens_details"]["cached_tokens"];
    if (turn > 0) {
      // Everything up to the previous turn's prompt came from the cache.
      EXPECT_GE(cached, cached_before) << "turn " << turn;
      EXPECT_GT(cached, 0) << "turn " << turn;
    }
    EXPECT_LT(cached, prompt);
    cached_before = prompt;
    messages.push_back({{"role", "assistant"}, {"content", r["choices"][0]["message"]["content"]}});
    messages.push_back({{"role", "user"}, {"content", "And then? " + std::to_string(turn)}});
  }
}

TEST(ServeHttp, BadRequestsGetOpenAiErrors) {
  REQUIRE_SHARED(kModel);
  ServerOptions o;
  o.limits.max_body_bytes = 4096;
  TestServer server(o);
  httplib::Client c = server.Client();
  struct Case {
    std::string path, body;
    int status;
    std::string param;
  };
  const Case cases[] = {
      {"/v1/completions", "{not json", 400, ""},
      {"/v1/completions", R"({"prompt": 12})", 400, "prompt"},
      {"/v1/completions", R"({"prompt": "x", "temperature": 5})", 400, "temperature"},
      {"/v1/completions", R"({"prompt": "x", "max_tokens": -1})", 400, "max_tokens"},
      {"/v1/completions", R"({"prompt": "x", "n": 1000})", 400, "n"},
      {"/v1/completions", R"({"prompt": "x", "model": "gpt-4"})", 404, "model"},
      {"/v1/completions", R"({"prompt": ""})", 400, "prompt"},
      {"/v1/completions", R"({"prompt": "x", "state": "nobody"})", 404, "state"},
      {"/v1/chat/completions", R"({"messages": []})", 400, "messages"},
      {"/v1/chat/completions", R"({"messages": [{"role": "pirate", "content": "x"}]})", 400, ""},
      {"/v1/completions", std::string(8192, ' '), 413, ""},
      {"/v1/nothing", "{}", 404, ""},
      {"/v1/states", R"({"id": "../etc", "prompt": "x"})", 400, "id"},
  };
  for (const Case& k : cases) {
    auto r = c.Post(k.path, k.body, "application/json");
    ASSERT_TRUE(r) << k.path << " " << k.body.substr(0, 40);
    EXPECT_EQ(r->status, k.status) << k.body.substr(0, 60) << " -> " << r->body;
    const json e = Body(r);
    ASSERT_TRUE(e.contains("error")) << r->body;
    EXPECT_TRUE(e["error"]["message"].is_string());
    if (!k.param.empty()) {
      EXPECT_EQ(e["error"]["param"], k.param) << k.body.substr(0, 60);
    }
  }
  // The server still answers.
  EXPECT_EQ(c.Get("/health")->status, 200);
}

TEST(ServeHttp, ApiKeyIsRequiredWhereSet) {
  REQUIRE_SHARED(kModel);
  ServerOptions o;
  o.api_key = "sk-test-123";
  TestServer server(o);
  httplib::Client c = server.Client();
  const std::string body = CompletionBody("key", 4).dump();
  auto none = c.Post("/v1/completions", body, "application/json");
  ASSERT_TRUE(none);
  EXPECT_EQ(none->status, 401);
  EXPECT_EQ(Body(none)["error"]["code"], "invalid_api_key");
  auto wrong = c.Post("/v1/completions", {{"Authorization", "Bearer sk-test-124"}}, body, "application/json");
  EXPECT_EQ(wrong->status, 401);
  auto right = c.Post("/v1/completions", {{"Authorization", "Bearer sk-test-123"}}, body, "application/json");
  EXPECT_EQ(right->status, 200);
  EXPECT_EQ(c.Get("/v1/models")->status, 401);
  EXPECT_EQ(c.Get("/metrics")->status, 401);
  EXPECT_EQ(c.Get("/health")->status, 200);  // load balancers probe without a key
  EXPECT_EQ(c.Get("/")->status, 200);        // the page asks for the key itself
}

TEST(ServeHttp, ModelsHealthPageAndMetrics) {
  REQUIRE_SHARED(kModel);
  TestServer server;
  httplib::Client c = server.Client();
  const json models = Body(c.Get("/v1/models"));
  EXPECT_EQ(models["data"][0]["id"], kModelId);
  auto page = c.Get("/");
  ASSERT_TRUE(page);
  EXPECT_NE(page->body.find("<html"), std::string::npos);
  EXPECT_FALSE(page->get_header_value("X-Aviary-Instance").empty());
  c.Post("/v1/completions", CompletionBody("metrics", 5).dump(), "application/json");
  c.Post("/v1/completions", "{", "application/json");
  // A request is counted once its response has gone out, which can be just after the client
  // has read it.
  std::string metrics;
  for (int i = 0; i < 50; ++i) {
    metrics = c.Get("/metrics")->body;
    if (metrics.find("status=\"400\"} 1") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (const char* name :
       {"aviary_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1",
        "aviary_requests_total{endpoint=\"/v1/completions\",status=\"400\"} 1",
        "aviary_completion_tokens_total 5", "aviary_state_cache_bytes", "aviary_queue_length 0",
        "aviary_batch_size", "aviary_generation_tokens_per_second"}) {
    EXPECT_NE(metrics.find(name), std::string::npos) << name << "\n" << metrics;
  }
}

TEST(ServeHttp, SavedStateContinuesTheConversation) {
  REQUIRE_SHARED(kModel);
  TestServer server;
  httplib::Client c = server.Client();
  auto saved = c.Post("/v1/states", R"({"id": "story", "prompt": "The ship sailed"})", "application/json");
  ASSERT_TRUE(saved);
  ASSERT_EQ(saved->status, 200) << saved->body;
  EXPECT_EQ(Body(saved)["tokens"], 15);
  json from_state = CompletionBody(" into the night", 20);
  from_state["state"] = "story";
  const json a = Body(c.Post("/v1/completions", from_state.dump(), "application/json"));
  const json b = Body(c.Post("/v1/completions", CompletionBody("The ship sailed into the night", 20).dump(),
                             "application/json"));
  EXPECT_EQ(a["choices"][0]["text"], b["choices"][0]["text"]);
  const json list = Body(c.Get("/v1/states"));
  EXPECT_EQ(list["data"][0]["id"], "story");
  // The state downloads as a file `aviary chat --load-state` reads.
  auto file = c.Get("/v1/states/story");
  ASSERT_TRUE(file);
  const std::vector<uint8_t> bytes(file->body.begin(), file->body.end());
  const State s = State::Deserialize(bytes, server.model(), "download");
  EXPECT_EQ(s.tokens_seen(), 15u);
  EXPECT_EQ(c.Delete("/v1/states/story")->status, 200);
  EXPECT_EQ(c.Delete("/v1/states/story")->status, 404);
}

// A whole reply that takes more than a second goes out as a chunked body led by newlines
// (keep-alive probes); clients parse it as the same JSON.
TEST(ServeHttp, SlowWholeReplyArrivesIntact) {
  REQUIRE_SHARED(kModel);
  TestServer server;
  httplib::Client c = server.Client();
  json body = CompletionBody("slow", 4000);
  body["n"] = 2;
  const auto start = std::chrono::steady_clock::now();
  auto r = c.Post("/v1/completions", body.dump(), "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  const json j = Body(r);
  ASSERT_TRUE(j.is_object()) << r->body.substr(0, 200);
  EXPECT_EQ(j["usage"]["completion_tokens"], 8000);
  EXPECT_EQ(j["choices"][1]["finish_reason"], "length");
  if (std::chrono::steady_clock::now() - start > std::chrono::seconds(2)) {
    EXPECT_EQ(r->body.front(), '\n');  // it took the slow path
  }
}

TEST(ServeHttp, ClientThatLeavesCancelsItsStream) {
  REQUIRE_SHARED(kModel);
  TestServer server;
  {
    httplib::Client c = server.Client();
    int chunks = 0;
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.body = CompletionBody("endless", 4000, /*stream=*/true).dump();
    req.set_header("Content-Type", "application/json");
    req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) { return ++chunks < 5; };
    c.send(req);  // the receiver's false closes the connection
  }
  httplib::Client c = server.Client();
  std::string metrics;
  for (int i = 0; i < 100; ++i) {
    metrics = c.Get("/metrics")->body;
    if (metrics.find("aviary_requests_cancelled_total 1") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_NE(metrics.find("aviary_requests_cancelled_total 1"), std::string::npos) << metrics;
}

// The real command: prints where it listens, serves, and on SIGTERM ends a running stream
// with [DONE] and exits 0.
TEST(ServeHttp, CommandServesAndStopsCleanlyOnSigterm) {
  REQUIRE_SHARED(kModel);
  int out[2];
  ASSERT_EQ(::pipe(out), 0);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(out[1], STDOUT_FILENO);
    ::close(out[0]);
    const std::string model = SharedPath(kModel);
    ::execl(AVIARY_CLI, AVIARY_CLI, "serve", "--model", model.c_str(), "--port", "0", "--grace",
            "0", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(out[1]);
  FILE* f = ::fdopen(out[0], "r");
  char line[256] = {};
  ASSERT_NE(std::fgets(line, sizeof line, f), nullptr);
  int port = 0;
  ASSERT_EQ(std::sscanf(line, "aviary serve: listening on http://127.0.0.1:%d", &port), 1) << line;
  httplib::Client c("127.0.0.1", port);
  c.set_read_timeout(std::chrono::seconds(60));
  EXPECT_EQ(c.Get("/health")->status, 200);
  std::string streamed;
  std::thread stream([&] {
    httplib::Client s("127.0.0.1", port);
    s.set_read_timeout(std::chrono::seconds(60));
    json body = CompletionBody("until stopped", 4000, true);
    body["n"] = 8;  // long enough to be running when the signal comes
    auto r = s.Post("/v1/completions", body.dump(), "application/json");
    if (r) streamed = r->body;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ::kill(pid, SIGTERM);
  stream.join();
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  std::fclose(f);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  EXPECT_NE(streamed.find("shutting down"), std::string::npos);
  EXPECT_NE(streamed.find("data: [DONE]"), std::string::npos);
}

}  // namespace
}  // namespace aviary::serve
