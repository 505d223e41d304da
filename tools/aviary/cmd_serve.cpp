// aviary serve: the OpenAI-compatible HTTP server (src/serve).
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <filesystem>
#include <thread>

#include "aviary/chat.h"
#include "aviary/error.h"
#include "cli_common.h"
#include "serve/engine.h"
#include "serve/server.h"

namespace aviary::cli {
namespace {

struct ServeOptions {
  std::string model, tokenizer, template_name = "auto", model_name;
  std::string host = "127.0.0.1";
  int port = 8080;
  int parallel = 16;
  int queue = 64;
  std::string api_key;
  double state_cache_mb = 512;
  int timeout = 600;
  int max_tokens = 4096;
  int max_prompt_tokens = 32768;
  int max_n = 8;
  double max_body_mb = 1;
  int prefill_tokens = 64;
  int max_saved_states = 256;
  double grace = 10;
  std::vector<std::string> states;  // NAME=FILE
};

void RunServe(const ServeOptions& o) {
  if (o.port < 0 || o.port > 65535) throw UsageError("--port must be 0..65535");
  if (o.parallel < 1 || o.parallel > 1024) throw UsageError("--parallel must be 1..1024");
  if (o.queue < 0) throw UsageError("--queue must be >= 0");
  if (o.state_cache_mb < 0) throw UsageError("--state-cache-mb must be >= 0");
  if (o.timeout < 1) throw UsageError("--timeout must be at least 1 second");
  if (o.max_tokens < 1 || o.max_n < 1 || o.max_prompt_tokens < 1) {
    throw UsageError("--max-tokens, --max-n and --max-prompt-tokens must be at least 1");
  }
  if (o.max_body_mb <= 0) throw UsageError("--max-body-mb must be positive");
  if (o.max_saved_states < 0) throw UsageError("--max-saved-states must be >= 0");
  if (o.prefill_tokens < 1) throw UsageError("--prefill-tokens must be at least 1");
  // SIGINT and SIGTERM are taken by a thread of their own (sigwait) for a clean shutdown; they
  // are blocked before any other thread starts, so every thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // A client that disconnects mid-write must not kill the server.
  ::signal(SIGPIPE, SIG_IGN);

  const LoadedModel m = LoadModel(o.model, o.tokenizer);
  const ChatTemplate chat_template = o.template_name == "auto"
                                         ? ChatTemplateForModel(m.model->info(), *m.tokenizer)
                                         : ChatTemplateByName(o.template_name);
  serve::EngineOptions eo;
  eo.parallel = o.parallel;
  eo.queue = o.queue;
  eo.state_cache_bytes = static_cast<size_t>(o.state_cache_mb * (1 << 20));
  eo.prefill_tokens_per_step = o.prefill_tokens;
  serve::Engine engine(*m.model, *m.tokenizer, eo);

  serve::ServerOptions so;
  so.host = o.host;
  so.port = o.port;
  so.api_key = o.api_key;
  so.model_id = o.model_name.empty() ? std::filesystem::path(o.model).stem().string() : o.model_name;
  so.limits.max_tokens = o.max_tokens;
  so.limits.max_n = o.max_n;
  so.limits.max_body_bytes = static_cast<size_t>(o.max_body_mb * (1 << 20));
  so.max_prompt_tokens = o.max_prompt_tokens;
  so.max_saved_states = o.max_saved_states;
  so.default_chat_max_tokens = std::min(1024, o.max_tokens);
  so.default_completion_max_tokens = std::min(16, o.max_tokens);
  so.timeout = std::chrono::seconds(o.timeout);
  // Every streaming client holds a connection thread; room for the batch, the queue and a few
  // quick requests (health, metrics) besides.
  so.http_threads = o.parallel + o.queue + 8;
  serve::Server server(engine, *m.tokenizer, chat_template, so);
  for (const std::string& spec : o.states) {
    const size_t eq = spec.find('=');
    if (eq == std::string::npos || eq == 0) throw UsageError("--state takes NAME=FILE, not '" + spec + "'");
    server.AddState(spec.substr(0, eq), State::Load(spec.substr(eq + 1), *m.model));
  }
  const int port = server.Bind();
  std::thread stopper([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    std::fprintf(stderr, "aviary serve: %s, finishing the running requests (up to %.0f s)\n",
                 sig == SIGINT ? "interrupted" : "terminated", o.grace);
    server.Stop(std::chrono::milliseconds(static_cast<int64_t>(o.grace * 1000)));
  });
  const std::string host = o.host.find(':') != std::string::npos ? "[" + o.host + "]" : o.host;
  std::printf("aviary serve: listening on http://%s:%d\n", host.c_str(), port);
  std::fflush(stdout);
  std::fprintf(stderr, "aviary serve: model '%s' (RWKV %s, %d x %d), template %s, %d parallel%s\n",
               so.model_id.c_str(), std::string(ArchName(m.model->info().arch)).c_str(),
               m.model->info().n_layer, m.model->info().n_embd, chat_template.name.c_str(),
               o.parallel, o.api_key.empty() ? "" : ", API key required");
  server.Run();
  // Run returns after Stop; if the listener failed on its own, end the stopper too.
  pthread_kill(stopper.native_handle(), SIGTERM);
  stopper.join();
}

}  // namespace

void RegisterServe(CLI::App& app) {
  auto o = std::make_shared<ServeOptions>();
  CLI::App* cmd = app.add_subcommand(
      "serve", "OpenAI-compatible HTTP server with batched decoding, a state cache and a chat page");
  AddModelOptions(cmd, &o->model, &o->tokenizer);
  AddRuntimeOptions(cmd);
  cmd->add_option("--host", o->host, "Address to listen on (0.0.0.0: every interface)")
      ->capture_default_str();
  cmd->add_option("--port", o->port, "Port (0: any free one, printed)")->capture_default_str();
  cmd->add_option("--parallel", o->parallel, "Sequences decoded together in one batch")
      ->capture_default_str();
  cmd->add_option("--queue", o->queue, "Requests that may wait for room; more get 429")
      ->capture_default_str();
  cmd->add_option("--api-key", o->api_key,
                  "Require 'Authorization: Bearer KEY' on /v1 and /metrics (default: none; "
                  "also AVIARY_API_KEY)")
      ->envname("AVIARY_API_KEY");
  cmd->add_option("--state-cache-mb", o->state_cache_mb,
                  "Memory for cached conversation states (0: no cache)")
      ->capture_default_str();
  cmd->add_option("--template", o->template_name,
                  "Chat template: world, raven, a template file, or auto (by the tokenizer)")
      ->capture_default_str();
  cmd->add_option("--model-name", o->model_name,
                  "The model's id in the API (default: the file name without extension)");
  cmd->add_option("--state", o->states,
                  "NAME=FILE: a state file (e.g. state-tuned) that requests start from with "
                  "\"state\": \"NAME\" (repeatable)");
  cmd->add_option("--timeout", o->timeout, "Seconds a request may run; then it ends as at max_tokens")
      ->capture_default_str();
  cmd->add_option("--max-tokens", o->max_tokens, "Largest max_tokens a request may ask for")
      ->capture_default_str();
  cmd->add_option("--max-prompt-tokens", o->max_prompt_tokens, "Largest prompt, in tokens")
      ->capture_default_str();
  cmd->add_option("--max-n", o->max_n, "Most choices (n) per request")->capture_default_str();
  cmd->add_option("--max-body-mb", o->max_body_mb, "Largest request body (413 above)")
      ->capture_default_str();
  cmd->add_option("--prefill-tokens", o->prefill_tokens,
                  "Prompt tokens fed per batched step (bounds how much a new prompt delays "
                  "running streams)")
      ->capture_default_str();
  cmd->add_option("--max-saved-states", o->max_saved_states,
                  "States POST /v1/states may hold in memory")
      ->capture_default_str();
  cmd->add_option("--grace", o->grace,
                  "Seconds the running requests get to finish on SIGTERM/SIGINT")
      ->capture_default_str();
  cmd->callback([o] { RunServe(*o); });
}

}  // namespace aviary::cli
