#include "serve/engine.h"

#include <algorithm>

#include "aviary/error.h"

namespace aviary::serve {

// ---- GenerationHandle ----

std::vector<GenerationEvent> GenerationHandle::Wait(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  cv_.wait_for(lock, timeout, [&] { return !events_.empty() || done_; });
  std::vector<GenerationEvent> out(std::make_move_iterator(events_.begin()),
                                   std::make_move_iterator(events_.end()));
  events_.clear();
  return out;
}

bool GenerationHandle::done() const {
  std::lock_guard lock(mutex_);
  return done_;
}

Usage GenerationHandle::usage() const {
  std::lock_guard lock(mutex_);
  return usage_;
}

double GenerationHandle::first_token_seconds() const {
  std::lock_guard lock(mutex_);
  return first_token_seconds_;
}

std::optional<State> GenerationHandle::TakeState() {
  std::lock_guard lock(mutex_);
  return std::exchange(state_, std::nullopt);
}

void GenerationHandle::Push(GenerationEvent event) {
  {
    std::lock_guard lock(mutex_);
    events_.push_back(std::move(event));
  }
  cv_.notify_all();
}

void GenerationHandle::Finish() {
  {
    std::lock_guard lock(mutex_);
    done_ = true;
  }
  cv_.notify_all();
}

// ---- Engine ----

struct Engine::Sequence {
  enum class Phase { kDecoding, kClosing, kDone };
  Sequence(int i, State s, const SamplerOptions& o) : index(i), state(std::move(s)), sampler(o) {}
  int index = 0;
  State state;
  Sampler sampler;
  std::vector<float> logits;
  int32_t next_token = -1;  // sampled, to be fed at the next step
  std::vector<int32_t> generated;
  std::string text;  // everything decoded so far
  size_t sent = 0;   // bytes of `text` already reported (or skipped)
  bool start_checked = false;
  size_t reply_end = std::string::npos;  // where a stop string cut `text`
  // Chat, after the reply: the tokens still to feed so that the state is the one the next turn
  // starts from, and that turn's tokens for the reply (the cache key's tail).
  std::vector<int32_t> closing, reply_tokens;
  size_t closing_fed = 0, closing_step = 0;  // of `closing`: fed, and in this step
  Phase phase = Phase::kDecoding;
};

struct Engine::Job {
  GenerationRequest request;
  std::shared_ptr<GenerationHandle> handle;
  std::vector<int32_t> key;  // the prompt's cache key
  State state;               // while the prompt is fed
  size_t fed = 0;            // prompt tokens already in `state`
  size_t cached = 0;         // of which came from the cache
  std::vector<float> logits;
  bool started = false;  // looked up in the cache (StartFromCache)
  bool prefilling = true;
  bool failed = false;
  std::vector<Sequence> sequences;
  int finished = 0;
  size_t longest_stop = 0;
  Clock::time_point submitted;
};

Engine::Engine(const Model& model, const Tokenizer& tokenizer, EngineOptions options)
    : model_(model),
      tokenizer_(tokenizer),
      options_(options),
      model_start_(model.NewState()),
      cache_(options.state_cache_bytes) {
  if (options_.parallel < 1) throw UsageError("--parallel must be at least 1");
  if (options_.queue < 0) throw UsageError("--queue must be at least 0");
  if (options_.prefill_tokens_per_step < 1) {
    throw UsageError("the prompt tokens per step must be at least 1");
  }
  for (int32_t id = std::max(0, tokenizer.vocab_size()); id < model.info().n_vocab; ++id) {
    banned_.push_back(id);
  }
  thread_ = std::thread([this] { Loop(); });
}

Engine::~Engine() { Shutdown(std::chrono::milliseconds(0)); }

std::variant<std::shared_ptr<GenerationHandle>, ApiError> Engine::Submit(GenerationRequest r) {
  if (r.prompt.empty()) return InvalidRequest("the prompt is empty", "prompt");
  const int32_t n_vocab = model_.info().n_vocab;
  for (int32_t t : r.prompt) {
    if (t < 0 || t >= n_vocab) {
      return InvalidRequest("token id " + std::to_string(t) + " is outside the vocabulary",
                            "prompt");
    }
  }
  if (r.n < 1 || r.n > options_.parallel) {
    return InvalidRequest("n must be between 1 and " + std::to_string(options_.parallel) +
                              " (the server's --parallel)",
                          "n");
  }
  if (r.max_tokens < 0) return InvalidRequest("max_tokens must be >= 0", "max_tokens");
  r.sampling.banned_tokens = banned_;
  try {
    Sampler check(r.sampling);
  } catch (const std::exception& e) {
    return InvalidRequest(e.what());
  }
  auto job = std::make_unique<Job>();
  job->handle = std::make_shared<GenerationHandle>();
  job->submitted = Clock::now();
  for (const std::string& s : r.stop) job->longest_stop = std::max(job->longest_stop, s.size());
  job->request = std::move(r);
  std::shared_ptr<GenerationHandle> handle = job->handle;
  {
    std::lock_guard lock(mutex_);
    if (!accepting_) {
      return ApiError{503, "the server is shutting down", "server_error", "", "shutting_down"};
    }
    // Requests that the next step admits do not wait: the queue limit counts the others.
    const size_t free_slots =
        static_cast<size_t>(options_.parallel) - std::min<size_t>(stats_.active_sequences, options_.parallel);
    if (queue_.size() >= static_cast<size_t>(options_.queue) + free_slots) {
      return ApiError{429,
                      "the server is busy: " + std::to_string(queue_.size()) +
                          " requests are waiting; retry later",
                      "rate_limit_error", "", "rate_limit_exceeded"};
    }
    queue_.push_back(std::move(job));
    stats_.queued = queue_.size();
  }
  wake_.notify_one();
  return handle;
}

void Engine::Shutdown(std::chrono::milliseconds grace) {
  {
    std::lock_guard lock(mutex_);
    accepting_ = false;
    cancel_at_ = std::min(cancel_at_, Clock::now() + grace);
  }
  wake_.notify_one();
  if (thread_.joinable()) thread_.join();
}

Engine::Stats Engine::stats() const {
  std::lock_guard lock(mutex_);
  Stats s = stats_;
  s.cache = cache_.stats();
  // Generated tokens per second over the whole window, so a lone step does not read as a burst.
  const Clock::time_point now = Clock::now();
  uint64_t tokens = 0;
  for (const auto& [t, n] : rate_window_) {
    if (now - t <= kRateWindow) tokens += n;
  }
  s.tokens_per_second = tokens / std::chrono::duration<double>(kRateWindow).count();
  return s;
}

std::vector<int32_t> Engine::CacheKey(const Job& job, std::span<const int32_t> tokens) const {
  std::vector<int32_t> key;
  key.reserve(tokens.size() + 1);
  if (job.request.start && job.request.start->cache_tag != 0) {
    key.push_back(job.request.start->cache_tag);
  }
  key.insert(key.end(), tokens.begin(), tokens.end());
  return key;
}

void Engine::Loop() {
  for (;;) {
    std::vector<std::unique_ptr<Job>> admitted;
    {
      std::unique_lock lock(mutex_);
      if (active_.empty() && queue_.empty()) {
        if (!accepting_) break;
        wake_.wait(lock, [&] { return !queue_.empty() || !accepting_; });
        continue;
      }
      if (Clock::now() >= cancel_at_) {
        // Shutting down and the grace period is over: every request ends now.
        for (auto& job : queue_) active_.push_back(std::move(job));
        queue_.clear();
        lock.unlock();
        for (auto& job : active_) Fail(*job, "the server is shutting down");
        active_.clear();
        std::lock_guard relock(mutex_);
        stats_.queued = 0;
        stats_.active_sequences = 0;
        continue;
      }
      // Admit requests while their choices fit beside the running sequences.
      size_t running = 0;
      for (const auto& job : active_) {
        running += job->prefilling ? job->request.n : job->request.n - job->finished;
      }
      while (!queue_.empty()) {
        Job& next = *queue_.front();
        if (!next.handle->cancelled() &&
            running + next.request.n > static_cast<size_t>(options_.parallel)) {
          break;
        }
        if (!next.handle->cancelled()) running += next.request.n;
        admitted.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      stats_.queued = queue_.size();
      stats_.active_sequences = running;
    }
    for (auto& job : admitted) {
      if (job->handle->cancelled()) {
        job->handle->Finish();
        std::lock_guard lock(mutex_);
        ++stats_.requests_cancelled;
        continue;
      }
      job->key = CacheKey(*job, job->request.prompt);
      active_.push_back(std::move(job));
    }
    Step();
    Retire();
  }
}

void Engine::StartFromCache(Job& job) {
  // Start from the longest cached prefix of the prompt.
  const GenerationRequest& r = job.request;
  const size_t tag = job.key.size() - r.prompt.size();
  job.state = r.start ? r.start->state : model_start_;
  if (std::optional<StateCache::Hit> hit = cache_.Lookup(job.key)) {
    job.state = std::move(hit->state);
    job.fed = job.cached = hit->length - tag;
    if (job.fed == r.prompt.size()) job.logits = std::move(hit->logits);
  }
  job.started = true;
  {
    std::lock_guard lock(mutex_);
    stats_.prompt_tokens += r.prompt.size();
    stats_.cached_tokens += job.cached;
  }
  if (job.fed == r.prompt.size()) StartDecoding(job, job.logits);
}

void Engine::Step() {
  const Clock::time_point now = Clock::now();
  for (auto& job : active_) {
    if (job->failed || (!job->prefilling && job->finished == job->request.n)) continue;
    if (job->handle->cancelled()) {
      job->failed = true;  // nobody reads it any more
      job->handle->Finish();
      std::lock_guard lock(mutex_);
      ++stats_.requests_cancelled;
    } else if (now >= job->request.deadline) {
      {
        std::lock_guard lock(mutex_);
        ++stats_.requests_timed_out;
      }
      if (job->prefilling) {
        // Still reading the prompt: every choice ends empty.
        for (int i = 0; i < job->request.n; ++i) {
          job->handle->Push({GenerationEvent::Kind::kFinish, i, "", FinishReason::kLength, ""});
        }
        job->failed = true;  // retired without a reply
        job->handle->Finish();
        continue;
      }
      for (Sequence& seq : job->sequences) {
        FinishSequence(*job, seq, FinishReason::kLength, /*flush=*/true);
      }
    }
  }

  // One row per decoding sequence; then, up to the step's budget of prompt tokens (the whole
  // pass when no stream is waiting on it), the rest of finished chat replies and then prompts.
  std::vector<BatchItem> items;
  std::vector<std::pair<Job*, Sequence*>> decoding;
  std::vector<std::pair<Job*, Sequence*>> closing;
  for (auto& job : active_) {
    if (job->failed) continue;
    for (Sequence& seq : job->sequences) {
      if (seq.phase == Sequence::Phase::kDecoding) {
        items.push_back({std::span<const int32_t>(&seq.next_token, 1), &seq.state, &seq.logits});
        decoding.emplace_back(job.get(), &seq);
      } else if (seq.phase == Sequence::Phase::kClosing) {
        closing.emplace_back(job.get(), &seq);
      }
    }
  }
  constexpr size_t kIdlePrefillTokens = 512;
  size_t budget = decoding.empty()
                      ? std::max<size_t>(options_.prefill_tokens_per_step, kIdlePrefillTokens)
                      : options_.prefill_tokens_per_step;
  for (auto& [job, seq] : closing) {
    seq->closing_step = std::min(seq->closing.size() - seq->closing_fed, budget);
    if (seq->closing_step == 0) continue;
    const bool last = seq->closing_fed + seq->closing_step == seq->closing.size();
    items.push_back({std::span<const int32_t>(seq->closing).subspan(seq->closing_fed, seq->closing_step),
                     &seq->state, last ? &seq->logits : nullptr});
    budget -= seq->closing_step;
  }
  std::vector<std::pair<Job*, size_t>> prefilling;
  for (auto& job : active_) {
    if (job->failed || !job->prefilling || budget == 0) continue;
    if (!job->started) {
      // A reply still being fed may be this conversation's previous turn: look the prompt up
      // in the cache once it is there.
      if (!closing.empty()) continue;
      StartFromCache(*job);
      if (!job->prefilling) continue;  // wholly cached: decoding from the next step
    }
    const std::span<const int32_t> prompt = job->request.prompt;
    const size_t n = std::min(budget, prompt.size() - job->fed);
    const bool last = job->fed + n == prompt.size();
    items.push_back({prompt.subspan(job->fed, n), &job->state, last ? &job->logits : nullptr});
    prefilling.emplace_back(job.get(), n);
    budget -= n;
  }
  if (items.empty()) return;

  try {
    model_.EvalBatch(items);
  } catch (const std::exception& e) {
    // Submit checked every token, so this is a fault of the model itself: end the requests
    // of this step rather than the server.
    for (auto& [job, seq] : decoding) Fail(*job, e.what());
    for (auto& [job, n] : prefilling) Fail(*job, e.what());
    for (auto& [job, seq] : closing) seq->phase = Sequence::Phase::kDone;  // not cached
    return;
  }
  uint64_t generated = 0;
  for (auto& [job, n] : prefilling) {
    job->fed += n;
    if (job->fed < job->request.prompt.size()) continue;
    cache_.Insert(job->key, job->state, job->logits);
    StartDecoding(*job, job->logits);
    generated += job->request.max_tokens > 0 ? job->request.n : 0;
  }
  for (auto& [job, seq] : closing) {
    if (job->failed || seq->closing_step == 0) continue;
    seq->closing_fed += seq->closing_step;
    if (seq->closing_fed == seq->closing.size()) {
      // The reply has been fed to its end: the next turn of this conversation starts here.
      std::vector<int32_t> key = job->key;
      key.insert(key.end(), seq->reply_tokens.begin(), seq->reply_tokens.end());
      cache_.Insert(key, seq->state, seq->logits);
      seq->phase = Sequence::Phase::kDone;
    }
  }
  for (auto& [job, seq] : decoding) {
    if (job->failed) continue;
    Accept(*job, *seq, seq->sampler.Sample(seq->logits));
    ++generated;
  }
  std::lock_guard lock(mutex_);
  ++stats_.steps;
  for (const BatchItem& item : items) stats_.batch_rows += item.tokens.size();
  stats_.decode_rows += decoding.size();
  stats_.last_batch_sequences = items.size();
  rate_window_.emplace_back(now, generated);
  while (!rate_window_.empty() && now - rate_window_.front().first > kRateWindow) {
    rate_window_.pop_front();
  }
}

void Engine::StartDecoding(Job& job, const std::vector<float>& logits) {
  job.prefilling = false;
  const GenerationRequest& r = job.request;
  if (r.want_state) {
    std::lock_guard lock(job.handle->mutex_);
    job.handle->state_ = job.state;
  }
  {
    std::lock_guard lock(job.handle->mutex_);
    job.handle->usage_.prompt_tokens = static_cast<int>(r.prompt.size());
    job.handle->usage_.cached_tokens = static_cast<int>(job.cached);
    job.handle->first_token_seconds_ =
        std::chrono::duration<double>(Clock::now() - job.submitted).count();
  }
  if (r.max_tokens == 0) {
    for (int i = 0; i < r.n; ++i) {
      job.handle->Push({GenerationEvent::Kind::kFinish, i, "", FinishReason::kLength, ""});
    }
    job.finished = r.n;
    job.handle->Finish();
    return;
  }
  job.sequences.clear();
  job.sequences.reserve(r.n);
  for (int i = 0; i < r.n; ++i) {
    SamplerOptions so = r.sampling;
    so.seed += static_cast<uint64_t>(i);
    job.sequences.emplace_back(i, i + 1 < r.n ? job.state : std::move(job.state), so);
  }
  for (Sequence& seq : job.sequences) Accept(job, seq, seq.sampler.Sample(logits));
}

void Engine::Accept(Job& job, Sequence& seq, int32_t token) {
  seq.generated.push_back(token);
  {
    std::lock_guard lock(job.handle->mutex_);
    ++job.handle->usage_.completion_tokens;
  }
  {
    // Counted before the reply can finish, so the metrics never lag a reply a client holds.
    std::lock_guard lock(mutex_);
    ++stats_.completion_tokens;
  }
  if (job.request.stop_at_end_of_text && token == tokenizer_.end_of_text()) {
    FinishSequence(job, seq, FinishReason::kStop, /*flush=*/true);
    return;
  }
  seq.text += tokenizer_.Decode({&token, 1});
  Emit(job, seq, /*final=*/false);
  if (seq.phase != Sequence::Phase::kDecoding) return;  // a stop string ended it
  if (static_cast<int>(seq.generated.size()) >= job.request.max_tokens) {
    FinishSequence(job, seq, FinishReason::kLength, /*flush=*/true);
  } else {
    seq.next_token = token;
  }
}

namespace {

// Bytes at the end of text[from, end) that start a UTF-8 character not complete yet.
size_t IncompleteTail(const std::string& text, size_t from, size_t end) {
  for (size_t back = 1; back <= 3 && back <= end - from; ++back) {
    const auto c = static_cast<unsigned char>(text[end - back]);
    if ((c & 0xC0) == 0x80) continue;  // a continuation byte: keep looking for the lead
    const size_t length = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    return length > back ? back : 0;
  }
  return 0;
}

}  // namespace

void Engine::Emit(Job& job, Sequence& seq, bool final) {
  if (job.request.chat && !seq.start_checked) {
    if (seq.text.empty()) return;
    seq.start_checked = true;
    if (seq.text[0] == ' ') seq.sent = 1;
  }
  auto send = [&](size_t end) {
    if (end > seq.sent) {
      job.handle->Push({GenerationEvent::Kind::kText, seq.index,
                        seq.text.substr(seq.sent, end - seq.sent), FinishReason::kStop, ""});
    }
    seq.sent = std::max(seq.sent, end);
  };
  // A stop string starts at or after `sent`: nothing that could begin one is ever sent.
  size_t stop_at = std::string::npos;
  for (const std::string& s : job.request.stop) stop_at = std::min(stop_at, seq.text.find(s, seq.sent));
  if (stop_at != std::string::npos) {
    send(stop_at);
    seq.reply_end = stop_at;
    FinishSequence(job, seq, FinishReason::kStop, /*flush=*/false);
    return;
  }
  if (final) {
    send(seq.text.size());
    return;
  }
  // Hold back the longest tail that could be the start of a stop string, and an incomplete
  // UTF-8 character.
  size_t end = seq.text.size();
  const size_t unsent = end - seq.sent;
  for (size_t k = std::min(job.longest_stop - (job.longest_stop > 0), unsent); k > 0; --k) {
    const std::string_view tail(seq.text.data() + end - k, k);
    const bool starts_stop = std::any_of(job.request.stop.begin(), job.request.stop.end(),
                                         [&](const std::string& s) { return s.starts_with(tail); });
    if (starts_stop) {
      end -= k;
      break;
    }
  }
  end -= IncompleteTail(seq.text, seq.sent, end);
  send(end);
}

void Engine::FinishSequence(Job& job, Sequence& seq, FinishReason reason, bool flush) {
  if (seq.phase != Sequence::Phase::kDecoding) return;
  seq.phase = Sequence::Phase::kDone;
  if (flush) Emit(job, seq, /*final=*/true);  // what was held back is reply text after all
  job.handle->Push({GenerationEvent::Kind::kFinish, seq.index, "", reason, ""});
  if (job.request.chat && cache_.stats().max_bytes > 0) PrepareClosing(job, seq);
  if (++job.finished == job.request.n) job.handle->Finish();
}

void Engine::PrepareClosing(const Job& job, Sequence& seq) {
  // The next turn sends this reply back as an assistant message, rendered " reply\n\n"
  // (chat_prompt.h); the server feeds that segment as the tokens remembered here. When the
  // tokens generated spell the reply (and its "\n\n", or it gets added), they are those tokens:
  // feeding the last one (and the "\n\n") gives the state the next turn starts from. A reply
  // cut inside a token by a stop string is tokenized from its text and fed again from the
  // prompt's state, which the cache holds.
  const size_t end = std::min(seq.reply_end, seq.text.size());
  const size_t start = seq.text.starts_with(' ') ? 1 : 0;
  if (end < start) return;
  std::string segment = " " + seq.text.substr(start, end - start) + "\n\n";
  const std::vector<int32_t>& g = seq.generated;
  const std::string_view spelled(seq.text.data() + start, seq.text.size() - start);
  std::vector<int32_t> reply;
  if (!g.empty() && g.back() != tokenizer_.end_of_text() &&
      spelled == std::string_view(segment).substr(1)) {
    reply = g;  // ended with "\n\n" exactly
    seq.closing = {g.back()};
  } else if (!g.empty() && g.back() != tokenizer_.end_of_text() &&
             spelled == std::string_view(segment).substr(1, segment.size() - 3)) {
    const std::vector<int32_t> turn_end = tokenizer_.Encode("\n\n");
    reply = g;
    reply.insert(reply.end(), turn_end.begin(), turn_end.end());
    seq.closing = {g.back()};
    seq.closing.insert(seq.closing.end(), turn_end.begin(), turn_end.end());
  } else {
    std::optional<StateCache::Hit> prompt = cache_.Lookup(job.key, /*count=*/false);
    if (!prompt || prompt->length != job.key.size()) return;
    reply = tokenizer_.Encode(segment);
    seq.state = std::move(prompt->state);
    seq.closing = reply;
  }
  RememberReply(std::move(segment), reply);
  seq.reply_tokens = std::move(reply);
  seq.phase = Sequence::Phase::kClosing;  // fed, then cached (Step)
}

void Engine::RememberReply(std::string segment, std::vector<int32_t> tokens) {
  std::lock_guard lock(replies_mutex_);
  auto [it, inserted] = replies_.insert_or_assign(segment, std::move(tokens));
  if (!inserted) return;
  reply_order_.push_back(std::move(segment));
  if (reply_order_.size() > kRememberedReplies) {
    replies_.erase(reply_order_.front());
    reply_order_.pop_front();
  }
}

std::optional<std::vector<int32_t>> Engine::ReplyTokens(const std::string& segment) const {
  std::lock_guard lock(replies_mutex_);
  auto it = replies_.find(segment);
  if (it == replies_.end()) return std::nullopt;
  return it->second;
}

void Engine::Fail(Job& job, const std::string& message) {
  if (job.failed) return;
  job.failed = true;
  if (job.handle->done()) return;  // its reply is complete (only its cache entry is lost)
  job.handle->Push({GenerationEvent::Kind::kError, 0, "", FinishReason::kStop, message});
  job.handle->Finish();
}

void Engine::Retire() {
  std::erase_if(active_, [](const std::unique_ptr<Job>& job) {
    if (job->failed) return true;
    if (job->prefilling) return false;
    return std::all_of(job->sequences.begin(), job->sequences.end(),
                       [](const Sequence& s) { return s.phase == Sequence::Phase::kDone; }) &&
           job->finished == job->request.n;
  });
  size_t running = 0;
  for (const auto& job : active_) {
    if (job->prefilling) {
      running += job->request.n;
      continue;
    }
    for (const Sequence& s : job->sequences) running += s.phase != Sequence::Phase::kDone;
  }
  std::lock_guard lock(mutex_);
  stats_.active_sequences = running;
}

}  // namespace aviary::serve
