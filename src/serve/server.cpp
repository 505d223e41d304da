#include "serve/server.h"

#include <httplib.h>
#include <openssl/crypto.h>
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "aviary/error.h"
#include "formats/sha256.h"
#include "serve/chat_prompt.h"

namespace aviary::serve {
namespace {

using json = nlohmann::json;

int64_t UnixSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string RandomId(const char* prefix) {
  static std::mutex mutex;
  static std::mt19937_64 rng(std::random_device{}());
  std::lock_guard lock(mutex);
  static constexpr char kChars[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  std::string id = prefix;
  for (int i = 0; i < 24; ++i) id += kChars[rng() % (sizeof(kChars) - 1)];
  return id;
}

// Constant-time comparison of a presented key with the server's: both are hashed first, so
// neither the content nor the length of the real key shows in the time taken.
bool KeysMatch(std::string_view presented, std::string_view expected) {
  Sha256 a, b;
  a.Update(presented);
  b.Update(expected);
  const std::string da = a.HexDigest(), db = b.HexDigest();
  return CRYPTO_memcmp(da.data(), db.data(), da.size()) == 0;
}

void SendError(httplib::Response& res, const ApiError& error) {
  res.status = error.status;
  res.set_content(error.Json(), "application/json");
}

ApiError NotFound(std::string message, std::string param, std::string code) {
  return ApiError{404, std::move(message), "invalid_request_error", std::move(param),
                  std::move(code)};
}

// The endpoint label of a path in the metrics (a fixed set, whatever clients request).
std::string EndpointLabel(const std::string& path) {
  for (const char* known : {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                            "/metrics", "/v1/states"}) {
    if (path == known) return known;
  }
  if (path.starts_with("/v1/states/")) return "/v1/states/{id}";
  if (path == "/") return "/";
  return "other";
}

}  // namespace

struct Server::Impl {
  Impl(Engine& e, const Tokenizer& t, ChatTemplate ct, ServerOptions o)
      : engine(e), tokenizer(t), chat_template(std::move(ct)), options(std::move(o)),
        chat_stops(chat_template.ReplyStops()) {}

  Engine& engine;
  const Tokenizer& tokenizer;
  const ChatTemplate chat_template;
  const ServerOptions options;
  const std::vector<std::string> chat_stops;
  httplib::Server http;
  std::atomic<bool> stopping{false};
  std::once_flag stop_once;

  // Saved and named start states.
  std::mutex states_mutex;
  std::map<std::string, std::shared_ptr<const StartState>> states;
  int32_t next_tag = -1;

  // Requests answered, by endpoint and status.
  std::mutex metrics_mutex;
  std::map<std::pair<std::string, int>, uint64_t> requests;
  std::atomic<int> open_streams{0};

  void Routes();
  bool Authorized(const httplib::Request& req, httplib::Response& res);
  void Generate(const httplib::Request& req, httplib::Response& res, bool chat);
  void SaveState(const httplib::Request& req, httplib::Response& res);
  std::string Metrics();
  std::shared_ptr<const StartState> FindState(const std::string& id);

  // The rendered conversation's tokens, each earlier reply of this server as the tokens it was
  // generated as (Engine::ReplyTokens), every other segment tokenized.
  std::vector<int32_t> ChatTokens(std::span<const std::string> segments) const {
    std::vector<int32_t> tokens;
    for (const std::string& segment : segments) {
      std::optional<std::vector<int32_t>> reply = engine.ReplyTokens(segment);
      const std::vector<int32_t> ids = reply ? std::move(*reply) : tokenizer.Encode(segment);
      tokens.insert(tokens.end(), ids.begin(), ids.end());
    }
    return tokens;
  }
};

std::shared_ptr<const StartState> Server::Impl::FindState(const std::string& id) {
  std::lock_guard lock(states_mutex);
  auto it = states.find(id);
  return it == states.end() ? nullptr : it->second;
}

bool Server::Impl::Authorized(const httplib::Request& req, httplib::Response& res) {
  if (options.api_key.empty()) return true;
  const std::string header = req.get_header_value("Authorization");
  constexpr std::string_view kBearer = "Bearer ";
  const bool ok = header.size() > kBearer.size() && header.starts_with(kBearer) &&
                  KeysMatch(std::string_view(header).substr(kBearer.size()), options.api_key);
  if (!ok) {
    res.set_header("WWW-Authenticate", "Bearer");
    SendError(res, ApiError{401,
                            header.empty() ? "no API key given: send the header "
                                             "'Authorization: Bearer KEY'"
                                           : "incorrect API key",
                            "invalid_request_error", "", "invalid_api_key"});
  }
  return ok;
}

// The generation parameters both endpoints share -> the engine's request.
static GenerationRequest EngineRequest(const GenerationParams& p, int default_max_tokens,
                                       std::chrono::seconds timeout) {
  GenerationRequest r;
  r.sampling.temperature = p.temperature.value_or(1.0f);
  r.sampling.top_p = p.top_p.value_or(1.0f);
  r.sampling.presence_penalty = p.presence_penalty.value_or(0.0f);
  r.sampling.frequency_penalty = p.frequency_penalty.value_or(0.0f);
  r.sampling.penalty_decay = p.penalty_decay.value_or(1.0f);
  r.sampling.seed = p.seed ? *p.seed : std::random_device{}();
  r.n = p.n;
  r.max_tokens = p.max_tokens.value_or(default_max_tokens);
  r.stop = p.stop;
  r.deadline = Clock::now() + timeout;
  return r;
}

void Server::Impl::Generate(const httplib::Request& req, httplib::Response& res, bool chat) {
  // Parse, render and tokenize.
  GenerationParams params;
  std::string model;
  std::vector<int32_t> prompt;
  std::shared_ptr<const StartState> start;
  auto find_start = [&](const std::string& id) -> bool {
    if (id.empty()) return true;
    start = FindState(id);
    if (!start) SendError(res, NotFound("no saved state named '" + id + "'", "state", "state_not_found"));
    return start != nullptr;
  };
  try {
    if (chat) {
      Parsed<ChatRequest> parsed = ParseChatRequest(req.body, options.limits);
      if (auto* e = std::get_if<ApiError>(&parsed)) return SendError(res, *e);
      ChatRequest& r = std::get<ChatRequest>(parsed);
      model = r.model, params = std::move(r.params);
      if (!find_start(params.state)) return;
      std::vector<std::string> segments =
          RenderChat(chat_template, r.messages, /*from_start=*/start == nullptr);
      if (r.think) {
        if (chat_template.think.empty()) {
          return SendError(res, InvalidRequest("the " + chat_template.name + " template has no think mode", "think"));
        }
        segments.back() += chat_template.think;  // the last segment ends with the reply prefix
      }
      prompt = ChatTokens(segments);
    } else {
      Parsed<CompletionRequest> parsed = ParseCompletionRequest(req.body, options.limits);
      if (auto* e = std::get_if<ApiError>(&parsed)) return SendError(res, *e);
      CompletionRequest& r = std::get<CompletionRequest>(parsed);
      model = r.model, params = std::move(r.params);
      if (!find_start(params.state)) return;
      prompt = tokenizer.Encode(r.prompt);
    }
  } catch (const std::exception& e) {
    return SendError(res, InvalidRequest(std::string("cannot tokenize the prompt: ") + e.what()));
  }
  if (!model.empty() && model != options.model_id) {
    return SendError(res, NotFound("the model '" + model + "' does not exist; this server has '" +
                                       options.model_id + "'",
                                   "model", "model_not_found"));
  }
  if (prompt.empty()) return SendError(res, InvalidRequest("the prompt is empty", chat ? "messages" : "prompt"));
  if (static_cast<int>(prompt.size()) > options.max_prompt_tokens) {
    return SendError(res, ApiError{400,
                                   "the prompt has " + std::to_string(prompt.size()) +
                                       " tokens; this server takes at most " +
                                       std::to_string(options.max_prompt_tokens),
                                   "invalid_request_error", chat ? "messages" : "prompt",
                                   "context_length_exceeded"});
  }
  GenerationRequest request = EngineRequest(
      params, chat ? options.default_chat_max_tokens : options.default_completion_max_tokens,
      options.timeout);
  request.prompt = std::move(prompt);
  request.start = start;
  request.chat = chat;
  if (chat) request.stop.insert(request.stop.end(), chat_stops.begin(), chat_stops.end());
  auto submitted = engine.Submit(std::move(request));
  if (auto* e = std::get_if<ApiError>(&submitted)) return SendError(res, *e);
  std::shared_ptr<GenerationHandle> handle = std::get<std::shared_ptr<GenerationHandle>>(submitted);

  ResponseMeta meta{RandomId(chat ? "chatcmpl-" : "cmpl-"), UnixSeconds(), options.model_id};
  const int n = params.n;
  if (params.stream) {
    res.set_header("Cache-Control", "no-cache");
    res.set_header("X-Accel-Buffering", "no");  // nginx: pass events on at once
    const bool include_usage = params.include_usage;
    ++open_streams;
    res.set_chunked_content_provider(
        "text/event-stream",
        [handle, meta, chat, n, include_usage](size_t, httplib::DataSink& sink) {
          auto write = [&](const std::string& s) {
            if (sink.write(s.data(), s.size())) return true;
            handle->Cancel();  // the client went away
            return false;
          };
          auto chunk = [&](const StreamDelta& d) {
            return write(SseEvent(chat ? ChatChunkJson(meta, d) : CompletionChunkJson(meta, d)));
          };
          if (chat) {  // OpenAI's first chunk of each choice carries the role
            for (int i = 0; i < n; ++i) {
              if (!chunk({i, true, "", std::nullopt})) return false;
            }
          }
          for (;;) {
            std::vector<GenerationEvent> events = handle->Wait(std::chrono::seconds(1));
            if (events.empty() && !handle->done()) {
              // A comment line: keeps proxies from timing out and finds a closed connection.
              if (!write(": keep-alive\n\n")) return false;
              continue;
            }
            for (GenerationEvent& e : events) {
              bool ok = true;
              if (e.kind == GenerationEvent::Kind::kText) {
                ok = chunk({e.index, false, std::move(e.text), std::nullopt});
              } else if (e.kind == GenerationEvent::Kind::kFinish) {
                ok = chunk({e.index, false, "", e.finish_reason});
              } else {
                ok = write(SseEvent(ApiError{500, e.error, "server_error", "", ""}.Json()));
              }
              if (!ok) return false;
            }
            if (handle->done() && events.empty()) break;
          }
          if (include_usage) {
            const Usage u = handle->usage();
            if (!write(SseEvent(chat ? ChatUsageChunkJson(meta, u) : CompletionUsageChunkJson(meta, u)))) {
              return false;
            }
          }
          write(SseDone());
          sink.done();
          return true;
        },
        [this](bool) { --open_streams; });
    return;
  }

  // Whole reply. The client is waiting without reading, so a closed connection only shows
  // when the server writes: after a second, the reply goes out as a chunked body led by
  // newlines (JSON allows leading whitespace) written every second until it is complete.
  // Shared with the content provider, which runs after this function has returned.
  struct Whole {
    std::vector<Choice> choices;
    std::string error;
    void Collect(std::vector<GenerationEvent>& events) {
      for (GenerationEvent& e : events) {
        if (e.kind == GenerationEvent::Kind::kText) choices[e.index].text += e.text;
        if (e.kind == GenerationEvent::Kind::kFinish) choices[e.index].finish_reason = e.finish_reason;
        if (e.kind == GenerationEvent::Kind::kError) error = e.error;
      }
    }
    std::string Body(const ResponseMeta& meta, bool chat, const Usage& u) const {
      if (!error.empty()) return ApiError{500, error, "server_error", "", ""}.Json();
      return chat ? ChatCompletionJson(meta, choices, u) : CompletionJson(meta, choices, u);
    }
  };
  auto whole = std::make_shared<Whole>();
  whole->choices.resize(n);
  const Clock::time_point wait_until = Clock::now() + std::chrono::seconds(1);
  while (!handle->done() && Clock::now() < wait_until) {
    std::vector<GenerationEvent> events = handle->Wait(std::chrono::milliseconds(100));
    whole->Collect(events);
  }
  if (handle->done()) {
    std::vector<GenerationEvent> rest = handle->Wait(std::chrono::milliseconds(0));
    whole->Collect(rest);
    res.status = whole->error.empty() ? 200 : 500;
    res.set_content(whole->Body(meta, chat, handle->usage()), "application/json");
    return;
  }
  ++open_streams;
  res.set_chunked_content_provider(
      "application/json",
      [handle, whole, meta, chat](size_t, httplib::DataSink& sink) {
        // The handler has waited a second already: probe at once, then every second.
        Clock::time_point probed = Clock::now() - std::chrono::seconds(1);
        for (;;) {
          if (Clock::now() - probed >= std::chrono::seconds(1)) {
            probed = Clock::now();
            if (!sink.write("\n", 1)) {
              handle->Cancel();
              return false;
            }
          }
          std::vector<GenerationEvent> events = handle->Wait(std::chrono::seconds(1));
          whole->Collect(events);
          if (handle->done() && events.empty()) break;
        }
        const std::string b = whole->Body(meta, chat, handle->usage());
        sink.write(b.data(), b.size());
        sink.done();
        return true;
      },
      [this](bool) { --open_streams; });
}

void Server::Impl::SaveState(const httplib::Request& req, httplib::Response& res) {
  Parsed<StateRequest> parsed = ParseStateRequest(req.body, options.limits);
  if (auto* e = std::get_if<ApiError>(&parsed)) return SendError(res, *e);
  StateRequest& r = std::get<StateRequest>(parsed);
  const std::string id = r.id;
  // The conversation to feed, rendered as complete (no reply prefix): later requests add turns.
  std::vector<int32_t> prompt;
  std::string start_id;
  try {
    if (auto* chat = std::get_if<ChatRequest>(&r.conversation)) {
      start_id = chat->params.state;
      const std::vector<std::string> segments =
          RenderChat(chat_template, chat->messages, start_id.empty(), /*for_reply=*/false);
      prompt = ChatTokens(segments);
    } else {
      const CompletionRequest& completion = std::get<CompletionRequest>(r.conversation);
      start_id = completion.params.state;
      prompt = tokenizer.Encode(completion.prompt);
    }
  } catch (const std::exception& e) {
    return SendError(res, InvalidRequest(std::string("cannot tokenize the conversation: ") + e.what()));
  }
  if (prompt.empty()) return SendError(res, InvalidRequest("the conversation is empty", "messages"));
  if (static_cast<int>(prompt.size()) > options.max_prompt_tokens) {
    return SendError(res, InvalidRequest("the conversation has " + std::to_string(prompt.size()) +
                                             " tokens; this server takes at most " +
                                             std::to_string(options.max_prompt_tokens),
                                         "messages"));
  }
  std::shared_ptr<const StartState> start;
  if (!start_id.empty() && !(start = FindState(start_id))) {
    return SendError(res, NotFound("no saved state named '" + start_id + "'", "state", "state_not_found"));
  }
  {
    std::lock_guard lock(states_mutex);
    if (!states.count(id) && static_cast<int>(states.size()) >= options.max_saved_states) {
      return SendError(res, InvalidRequest("the server holds its limit of " +
                                               std::to_string(options.max_saved_states) +
                                               " saved states; delete some first",
                                           "id"));
    }
  }
  GenerationRequest request;
  request.prompt = std::move(prompt);
  request.start = start;
  request.max_tokens = 0;
  request.want_state = true;
  request.deadline = Clock::now() + options.timeout;
  const size_t tokens = request.prompt.size();
  auto submitted = engine.Submit(std::move(request));
  if (auto* e = std::get_if<ApiError>(&submitted)) return SendError(res, *e);
  std::shared_ptr<GenerationHandle> handle = std::get<std::shared_ptr<GenerationHandle>>(submitted);
  while (!handle->done()) handle->Wait(std::chrono::milliseconds(200));
  std::optional<State> state = handle->TakeState();
  if (!state) return SendError(res, ApiError{500, "the conversation could not be fed", "server_error", "", ""});
  const size_t bytes = state->size_bytes();
  {
    std::lock_guard lock(states_mutex);
    states[id] = std::make_shared<const StartState>(StartState{std::move(*state), next_tag--});
  }
  res.set_content(json{{"id", id}, {"object", "state"}, {"tokens", tokens}, {"bytes", bytes},
                       {"created", UnixSeconds()}}.dump(),
                  "application/json");
}

std::string Server::Impl::Metrics() {
  const Engine::Stats s = engine.stats();
  std::ostringstream out;
  auto metric = [&](const char* name, const char* type, const char* help, auto value) {
    out << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n'
        << name << ' ' << value << '\n';
  };
  out << "# HELP aviary_requests_total HTTP requests answered, by endpoint and status.\n"
         "# TYPE aviary_requests_total counter\n";
  {
    std::lock_guard lock(metrics_mutex);
    for (const auto& [key, count] : requests) {
      out << "aviary_requests_total{endpoint=\"" << key.first << "\",status=\"" << key.second
          << "\"} " << count << '\n';
    }
  }
  metric("aviary_prompt_tokens_total", "counter", "Prompt tokens of generation requests.", s.prompt_tokens);
  metric("aviary_prompt_tokens_cached_total", "counter",
         "Prompt tokens whose state came from the state cache.", s.cached_tokens);
  metric("aviary_completion_tokens_total", "counter", "Tokens generated.", s.completion_tokens);
  metric("aviary_generation_tokens_per_second", "gauge",
         "Tokens generated per second over the last 5 seconds.", s.tokens_per_second);
  metric("aviary_requests_cancelled_total", "counter",
         "Requests dropped because the client went away.", s.requests_cancelled);
  metric("aviary_requests_timed_out_total", "counter", "Requests ended by the time limit.",
         s.requests_timed_out);
  metric("aviary_state_cache_hits_total", "counter", "Prompts that found a cached prefix.", s.cache.hits);
  metric("aviary_state_cache_misses_total", "counter", "Prompts that found none.", s.cache.misses);
  metric("aviary_state_cache_evictions_total", "counter", "Entries dropped to stay within the budget.",
         s.cache.evictions);
  metric("aviary_state_cache_entries", "gauge", "States in the cache.", s.cache.entries);
  metric("aviary_state_cache_bytes", "gauge", "Memory the cached states take.", s.cache.bytes);
  metric("aviary_state_cache_max_bytes", "gauge", "The cache's budget (--state-cache-mb).",
         s.cache.max_bytes);
  metric("aviary_queue_length", "gauge", "Requests waiting for room in the batch.", s.queued);
  metric("aviary_active_sequences", "gauge", "Sequences being fed or decoded.", s.active_sequences);
  metric("aviary_batch_size", "gauge", "Sequences in the last batched step.", s.last_batch_sequences);
  metric("aviary_batch_steps_total", "counter", "Batched steps (passes over the weights).", s.steps);
  metric("aviary_batch_rows_total", "counter", "Tokens fed by the batched steps.", s.batch_rows);
  metric("aviary_open_streams", "gauge", "Responses being streamed.", open_streams.load());
  {
    std::lock_guard lock(states_mutex);
    metric("aviary_saved_states", "gauge", "States saved through /v1/states or --state.",
           states.size());
  }
  return out.str();
}

void Server::Impl::Routes() {
  const std::string instance = std::to_string(::getpid());
  http.set_pre_routing_handler([this, instance](const httplib::Request& req, httplib::Response& res) {
    res.set_header("X-Aviary-Instance", instance);
    if (stopping.load() && req.path != "/health") {
      SendError(res, ApiError{503, "the server is shutting down", "server_error", "", "shutting_down"});
      return httplib::Server::HandlerResponse::Handled;
    }
    const bool open = req.path == "/" || req.path == "/health" || req.path == "/favicon.ico";
    if (!open && !Authorized(req, res)) return httplib::Server::HandlerResponse::Handled;
    return httplib::Server::HandlerResponse::Unhandled;
  });
  http.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
    std::lock_guard lock(metrics_mutex);
    ++requests[{EndpointLabel(req.path), res.status}];
  });
  http.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    if (res.status == 404) {
      SendError(res, NotFound("no route " + req.method + " " + req.path, "", "unknown_url"));
    } else if (res.status == 413) {
      SendError(res, ApiError{413, "the body is larger than the server's limit",
                              "invalid_request_error", "", "request_too_large"});
    } else if (res.status >= 400) {
      SendError(res, ApiError{res.status, "the request could not be served", "invalid_request_error", "", ""});
    }
  });
  http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "internal error";
    try {
      if (ep) std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    SendError(res, ApiError{500, what, "server_error", "", ""});
  });

  http.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(std::string(ChatPageHtml()), "text/html; charset=utf-8");
  });
  http.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(stopping ? R"({"status":"stopping"})" : R"({"status":"ok"})", "application/json");
    if (stopping) res.status = 503;
  });
  http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(Metrics(), "text/plain; version=0.0.4");
  });
  http.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    const std::string ids[] = {options.model_id};
    res.set_content(ModelsJson(ids, UnixSeconds()), "application/json");
  });
  http.Get(R"(/v1/models/([^/]+))", [this](const httplib::Request& req, httplib::Response& res) {
    if (req.matches[1] != options.model_id) {
      return SendError(res, NotFound("the model '" + req.matches[1].str() + "' does not exist", "model",
                                     "model_not_found"));
    }
    res.set_content(json{{"id", options.model_id}, {"object", "model"}, {"created", UnixSeconds()},
                         {"owned_by", "aviary"}}.dump(),
                    "application/json");
  });
  http.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
    Generate(req, res, /*chat=*/true);
  });
  http.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
    Generate(req, res, /*chat=*/false);
  });
  http.Post("/v1/states", [this](const httplib::Request& req, httplib::Response& res) {
    SaveState(req, res);
  });
  http.Get("/v1/states", [this](const httplib::Request&, httplib::Response& res) {
    json data = json::array();
    std::lock_guard lock(states_mutex);
    for (const auto& [id, s] : states) {
      data.push_back({{"id", id}, {"object", "state"}, {"tokens", s->state.tokens_seen()},
                      {"bytes", s->state.size_bytes()}});
    }
    res.set_content(json{{"object", "list"}, {"data", data}}.dump(), "application/json");
  });
  // A saved state as a file (aviary's state format): `aviary chat --load-state` reads it.
  http.Get(R"(/v1/states/([^/]+))", [this](const httplib::Request& req, httplib::Response& res) {
    std::shared_ptr<const StartState> s = FindState(req.matches[1]);
    if (!s) return SendError(res, NotFound("no saved state named '" + req.matches[1].str() + "'", "id", "state_not_found"));
    const std::vector<uint8_t> bytes = s->state.Serialize();
    res.set_content(std::string(bytes.begin(), bytes.end()), "application/octet-stream");
  });
  http.Delete(R"(/v1/states/([^/]+))", [this](const httplib::Request& req, httplib::Response& res) {
    const std::string id = req.matches[1];
    std::lock_guard lock(states_mutex);
    if (!states.erase(id)) return SendError(res, NotFound("no saved state named '" + id + "'", "id", "state_not_found"));
    res.set_content(json{{"id", id}, {"object", "state"}, {"deleted", true}}.dump(), "application/json");
  });
}

Server::Server(Engine& engine, const Tokenizer& tokenizer, ChatTemplate chat_template,
               ServerOptions options)
    : impl_(std::make_unique<Impl>(engine, tokenizer, std::move(chat_template), std::move(options))) {
  Impl& s = *impl_;
  const int threads = std::max(4, s.options.http_threads);
  s.http.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  s.http.set_payload_max_length(s.options.limits.max_body_bytes);
  // Replies are many small writes (an event per token); with Nagle's algorithm a write waits for
  // the peer's delayed ACK, which stalls every reply on a reused connection.
  s.http.set_tcp_nodelay(true);
  s.http.set_read_timeout(std::chrono::seconds(30));
  s.http.set_write_timeout(std::chrono::seconds(30));
  s.Routes();
}

Server::~Server() = default;

void Server::AddState(const std::string& name, State state) {
  if (!IsValidStateId(name)) throw UsageError("a state name must be 1 to 64 letters, digits, '-', '_' or '.': '" + name + "'");
  std::lock_guard lock(impl_->states_mutex);
  impl_->states[name] = std::make_shared<const StartState>(StartState{std::move(state), impl_->next_tag--});
}

int Server::Bind() {
  const std::string& host = impl_->options.host;
  int port = impl_->options.port;
  if (port == 0) {
    port = impl_->http.bind_to_any_port(host);
  } else if (!impl_->http.bind_to_port(host, port)) {
    port = -1;
  }
  if (port < 0) {
    throw Error("cannot listen on " + host + ":" + std::to_string(impl_->options.port) +
                " (address in use, or not an address of this machine)");
  }
  return port;
}

void Server::Run() { impl_->http.listen_after_bind(); }

void Server::Stop(std::chrono::milliseconds grace) {
  std::call_once(impl_->stop_once, [&] {
    impl_->stopping = true;
    impl_->engine.Shutdown(grace);  // every handle is finished when it returns
    // Let the streams write their last events before the listener closes.
    const Clock::time_point until = Clock::now() + std::chrono::seconds(2);
    while (impl_->open_streams.load() > 0 && Clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    impl_->http.stop();
  });
}

}  // namespace aviary::serve
