// The server's generation engine: continuous batching over one model. Every request becomes one
// sequence per choice; at each step the engine feeds the next token of every decoding sequence
// and a slice of the waiting prompts in one Model::EvalBatch (one pass over the weights serves
// them all), then samples each sequence's next token. Requests join and leave between steps,
// prompts are fed in slices so they never stall the running streams, and the state cache lets a
// conversation's next turn start where the last one ended. No HTTP here: the server submits
// tokenized requests and reads each one's events from its handle.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <variant>
#include <vector>

#include "aviary/model.h"
#include "aviary/sampler.h"
#include "aviary/state.h"
#include "aviary/tokenizer.h"
#include "serve/openai_api.h"
#include "serve/state_cache.h"

namespace aviary::serve {

using Clock = std::chrono::steady_clock;

// A named start state (a state-tuned file, or a conversation saved through /v1/states).
struct StartState {
  State state;
  // Keys of the state cache begin with this (negative) pseudo-token, so the prefixes of
  // different start states never meet; 0 for the model's own start state (no pseudo-token).
  int32_t cache_tag = 0;
};

struct GenerationRequest {
  std::vector<int32_t> prompt;               // the tokens after the start state; at least one
  std::shared_ptr<const StartState> start;   // null: the model's start state
  SamplerOptions sampling;                   // choice i samples with seed + i
  int n = 1;                                 // choices
  int max_tokens = 16;                       // per choice; 0 = only feed the prompt
  std::vector<std::string> stop;             // the reply ends before the first of these
  bool stop_at_end_of_text = true;           // the tokenizer's end-of-text token ends a reply
  // Chat: the first space of a reply belongs to the template ("Assistant: text"), and a
  // finished reply is fed to the end of its turn so the next turn's request finds it cached.
  bool chat = false;
  Clock::time_point deadline = Clock::time_point::max();  // then it ends as if at max_tokens
  bool want_state = false;  // keep the state after the prompt (POST /v1/states)
};

// What a handle reports, in order: text pieces of each choice (never half a UTF-8 character,
// never part of a stop string), then one finish per choice.
struct GenerationEvent {
  enum class Kind { kText, kFinish, kError };
  Kind kind = Kind::kText;
  int index = 0;  // the choice
  std::string text;
  FinishReason finish_reason = FinishReason::kStop;  // kFinish
  std::string error;                                 // kError (ends the whole request)
};

// One submitted request, shared by the engine (which writes) and the server (which reads).
class GenerationHandle {
 public:
  // Moves out the events that arrived, waiting up to `timeout` for the first one. Empty when
  // none came in time.
  std::vector<GenerationEvent> Wait(std::chrono::milliseconds timeout);
  // Asks the engine to drop the request (the client went away); it does so before its next step.
  void Cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }
  // True once every choice has finished (or the request failed or was cancelled).
  bool done() const;

  Usage usage() const;
  // Seconds from submission to the first generated token (the time to first token).
  double first_token_seconds() const;
  // The state after the prompt, when the request asked for it (after done()).
  std::optional<State> TakeState();

 private:
  friend class Engine;
  void Push(GenerationEvent event);
  void Finish();

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<GenerationEvent> events_;
  bool done_ = false;
  std::atomic<bool> cancelled_{false};
  Usage usage_;
  Clock::time_point submitted_ = Clock::now();
  double first_token_seconds_ = -1;
  std::optional<State> state_;
};

struct EngineOptions {
  int parallel = 16;          // sequences (choices) decoded together at most
  int queue = 64;             // requests waiting for room; a request beyond is refused (429)
  size_t state_cache_bytes = size_t{256} << 20;
  // Prompt tokens fed per step across all waiting prompts. A step's time grows with its rows,
  // so this bounds how much a new prompt delays the tokens of the running streams.
  int prefill_tokens_per_step = 64;
};

class Engine {
 public:
  // The model and tokenizer must outlive the engine. Starts the engine's thread.
  Engine(const Model& model, const Tokenizer& tokenizer, EngineOptions options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues a request: a handle, or a 429 (queue full), 503 (shutting down) or 400 (n above
  // --parallel, a token outside the vocabulary) error ready to send.
  std::variant<std::shared_ptr<GenerationHandle>, ApiError> Submit(GenerationRequest request);

  // Stops taking requests (Submit answers 503), lets the running ones finish for up to
  // `grace`, then cancels the rest with an error event and stops the thread.
  void Shutdown(std::chrono::milliseconds grace);

  struct Stats {
    uint64_t steps = 0;            // EvalBatch calls
    uint64_t batch_rows = 0;       // tokens fed by them (decode + prompt)
    uint64_t decode_rows = 0;      // of which generated tokens fed back
    uint64_t prompt_tokens = 0;    // prompt tokens of finished and running requests
    uint64_t cached_tokens = 0;    // of which came from the state cache
    uint64_t completion_tokens = 0;
    uint64_t requests_cancelled = 0;
    uint64_t requests_timed_out = 0;
    size_t queued = 0;             // waiting for room
    size_t active_sequences = 0;   // decoding or prefilling now
    size_t last_batch_sequences = 0;  // sequences in the last step
    double tokens_per_second = 0;  // generated over the last kRateWindow
    StateCache::Stats cache;
  };
  Stats stats() const;

  const Model& model() const { return model_; }

  // The tokens a recent chat reply was generated as, by the segment that sends it back
  // (" reply\n\n", chat_prompt.h), so that the next turn feeds the model exactly what it wrote
  // and finds the reply's state in the cache; nullopt when unknown (then the text is tokenized).
  std::optional<std::vector<int32_t>> ReplyTokens(const std::string& segment) const;

 private:
  struct Sequence;
  struct Job;

  void Loop();
  bool AdmitLocked();
  void Step();
  void StartFromCache(Job& job);
  void StartDecoding(Job& job, const std::vector<float>& logits);
  void Accept(Job& job, Sequence& seq, int32_t token);
  void Emit(Job& job, Sequence& seq, bool final);
  // Ends a decoding sequence; `flush` sends the text held back (for a stop string or an
  // incomplete character), which a stop string's cut does not.
  void FinishSequence(Job& job, Sequence& seq, FinishReason reason, bool flush);
  // Chat: makes a finished sequence feed the rest of its reply as the next turn will send it.
  void PrepareClosing(const Job& job, Sequence& seq);
  void Retire();
  void Fail(Job& job, const std::string& message);
  std::vector<int32_t> CacheKey(const Job& job, std::span<const int32_t> tokens) const;

  const Model& model_;
  const Tokenizer& tokenizer_;
  const EngineOptions options_;
  const State model_start_;
  std::vector<int32_t> banned_;  // ids the tokenizer cannot decode
  StateCache cache_;

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::unique_ptr<Job>> queue_;
  bool accepting_ = true;
  bool stop_ = false;
  Clock::time_point cancel_at_ = Clock::time_point::max();

  std::vector<std::unique_ptr<Job>> active_;  // the engine thread's alone
  Stats stats_;                               // under mutex_
  // (time, tokens generated) per step over the last kRateWindow: Stats::tokens_per_second.
  static constexpr std::chrono::seconds kRateWindow{5};
  std::deque<std::pair<Clock::time_point, uint64_t>> rate_window_;

  // Recent replies' tokens (ReplyTokens), the oldest dropped first.
  static constexpr size_t kRememberedReplies = 4096;
  mutable std::mutex replies_mutex_;
  std::unordered_map<std::string, std::vector<int32_t>> replies_;
  std::deque<std::string> reply_order_;
  void RememberReply(std::string segment, std::vector<int32_t> tokens);
  std::thread thread_;
};

}  // namespace aviary::serve
