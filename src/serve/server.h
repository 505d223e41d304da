// `aviary serve`: the OpenAI-compatible HTTP server over one model (cpp-httplib from Debian).
// Requests are parsed and checked (openai_api.h), chat messages rendered with the chat
// templates (chat_prompt.h), tokenized, and handed to the batching engine (engine.h); replies
// go back whole or as server-sent events. Also: the chat page, Prometheus metrics, saved
// states (/v1/states), Bearer keys, and a clean shutdown.
#pragma once

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "aviary/chat.h"
#include "aviary/model.h"
#include "aviary/tokenizer.h"
#include "serve/engine.h"
#include "serve/openai_api.h"

namespace httplib {
class Server;
}

namespace aviary::serve {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;  // 0: any free port (Bind returns it)
  std::string api_key;   // empty: no key needed
  std::string model_id;  // the name clients pass as "model"
  Limits limits;
  int max_prompt_tokens = 32768;      // per request, after rendering
  int default_chat_max_tokens = 1024; // when a chat request gives none (replies end at "\n\n")
  int default_completion_max_tokens = 16;  // OpenAI's default for /v1/completions
  std::chrono::seconds timeout{600};  // per request; then it ends as if at max_tokens
  int max_saved_states = 256;         // /v1/states entries
  int http_threads = 64;              // connections served at once
};

class Server {
 public:
  // The engine, tokenizer and model must outlive the server.
  Server(Engine& engine, const Tokenizer& tokenizer, ChatTemplate chat_template,
         ServerOptions options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // A start state requests can name ("state": name), e.g. a state-tuned file.
  void AddState(const std::string& name, State state);

  // Binds the socket; returns the port (the chosen one for port 0). Throws aviary::Error.
  int Bind();
  // Serves until Stop; returns when the listener has closed.
  void Run();
  // Stops taking requests (503), lets running ones finish for up to `grace`, cancels the rest
  // (their streams end with an error event and [DONE]), then closes the listener. Safe to call
  // from any thread, once or more.
  void Stop(std::chrono::milliseconds grace);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The chat page (src/serve/web/chat.html, embedded at build time).
std::string_view ChatPageHtml();

}  // namespace aviary::serve
