// The server's batching engine (src/serve/engine.h): greedy replies equal decoding alone, alone
// or among 16, stop strings, the state cache, choices, the queue limit, cancellation, time
// limits and shutdown.
#include "serve/engine.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "aviary/model.h"
#include "aviary/sampler.h"
#include "aviary/tokenizer.h"
#include "test_data.h"

namespace aviary::serve {
namespace {

using testing::SharedPath;

constexpr char kModel[] = "models/tiny-rwkv-7v0-834K-FP32.bin";

struct Loaded {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;
};

Loaded Load() {
  Loaded l;
  l.model = Model::Load(SharedPath(kModel));
  l.tokenizer = TokenizerForModel(l.model->info());
  return l;
}

// What `aviary generate --temperature 0` produces: argmax after each token, one at a time.
std::vector<int32_t> GreedyAlone(const Model& model, std::span<const int32_t> prompt, int n) {
  State state = model.NewState();
  std::vector<float> logits;
  model.Eval(prompt, state, &logits);
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) {
    const int32_t t = ArgMax(logits);
    out.push_back(t);
    if (i + 1 < n) model.Eval({&t, 1}, state, &logits);
  }
  return out;
}

struct Reply {
  std::vector<std::string> text;  // per choice
  std::vector<FinishReason> finish;
  std::vector<std::string> pieces;  // choice 0's events as they came
  std::string error;
  Usage usage;
};

Reply Collect(GenerationHandle& h, int n = 1) {
  Reply r;
  r.text.resize(n);
  r.finish.resize(n, FinishReason::kStop);
  int finished = 0;
  for (int spins = 0; spins < 6000; ++spins) {
    for (GenerationEvent& e : h.Wait(std::chrono::milliseconds(50))) {
      if (e.kind == GenerationEvent::Kind::kText) {
        r.text[e.index] += e.text;
        if (e.index == 0) r.pieces.push_back(e.text);
      } else if (e.kind == GenerationEvent::Kind::kFinish) {
        r.finish[e.index] = e.finish_reason;
        ++finished;
      } else {
        r.error = e.error;
      }
    }
    if (h.done()) {
      for (GenerationEvent& e : h.Wait(std::chrono::milliseconds(0))) {
        if (e.kind == GenerationEvent::Kind::kText) r.text[e.index] += e.text;
        if (e.kind == GenerationEvent::Kind::kFinish) r.finish[e.index] = e.finish_reason, ++finished;
        if (e.kind == GenerationEvent::Kind::kError) r.error = e.error;
      }
      break;
    }
  }
  r.usage = h.usage();
  return r;
}

std::shared_ptr<GenerationHandle> SubmitOk(Engine& engine, GenerationRequest r) {
  auto s = engine.Submit(std::move(r));
  if (auto* e = std::get_if<ApiError>(&s)) {
    ADD_FAILURE() << "refused: " << e->message;
    return nullptr;
  }
  return std::get<std::shared_ptr<GenerationHandle>>(s);
}

GenerationRequest Greedy(const Tokenizer& tok, const std::string& prompt, int max_tokens) {
  GenerationRequest r;
  r.prompt = tok.Encode(prompt);
  r.sampling.temperature = 0;
  r.max_tokens = max_tokens;
  r.stop_at_end_of_text = false;
  return r;
}

TEST(ServeEngine, GreedyReplyEqualsDecodingAlone) {
  REQUIRE_SHARED(kModel);
  Loaded m = Load();
  Engine engine(*m.model, *m.tokenizer, {});
  const std::string prompt = "In the beginning";
  auto h = SubmitOk(engine, Greedy(*m.tokenizer, prompt, 40));
  ASSERT_TRUE(h);
  const Reply r = Collect(*h);
  const std::vector<int32_t> ids = m.tokenizer->Encode(prompt);
  EXPECT_EQ(r.text[0], m.tokenizer->Decode(GreedyAlone(*m.model, ids, 40)));
  EXPECT_EQ(r.finish[0], FinishReason::kLength);
  EXPECT_EQ(r.usage.prompt_tokens, static_cast<int>(ids.size()));
  EXPECT_EQ(r.usage.completion_tokens, 40);
  EXPECT_GE(h->first_token_seconds(), 0.0);
}

TEST(ServeEngine, SixteenAtOnceEachEqualsItsReplyAlone) {
  REQUIRE_SHARED(kModel);
  Loaded m = Load();
  EngineOptions o;
  o.parallel = 16;
  o.prefill_tokens_per_step = 7;  // prompts cut into slices at odd places
  Engine engine(*m.model, *m.tokenizer, o);
  std::vector<std::string> prompts;
  std::vector<std::shared_ptr<GenerationHandle>> handles;
  for (int i = 0; i < 16; ++i) {
    std::string p = "Request number " + std::to_string(i) + ":";
    for (int k = 0; k < i; ++k) p += " and more";  // lengths from 17 to 152 bytes
    prompts.push_back(p);
    handles.push_back(SubmitOk(engine, Greedy(*m.tokenizer, p, 24 + i)));
    ASSERT_TRUE(handles.back());
  }
  for (int i = 0; i < 16; ++i) {
    const Reply r = Collect(*handles[i]);
    const std::vector<int32_t> ids = m.tokenizer->Encode(prompts[i]);
    EXPECT_EQ(r.text[0], m.tokenizer->Decode(GreedyAlone(*m.model, ids, 24 + i))) << "request " << i;
  }
  const Engine::Stats s = engine.stats();
  // Sharing passes over the weights: fewer steps than the tokens generated.
  EXPECT_LT(s.steps, s.completion_tokens);
  EXPECT_GT(s.decode_rows, s.steps);
}

TEST(ServeEngine, StopStringEndsTheReplyAndIsNeverSent) {
  REQUIRE_SHARED(kModel);
  Loaded m = Load();
  Engine engine(*m.model, *m.tokenizer, {});
  const std::string prompt = "Once upon a time";
  const std::vector<int32_t> ids = m.tokenizer->Encode(prompt);
  const std::string full = m.tokenizer->Decode(GreedyAlone(*m.model, ids, 60));
  ASSERT_GE(full.size(), 30u);
  // A stop string from the middle of the greedy text: the reply is what comes before it.
  const std::string stop = full.substr(20, 3);
  const size_t at = full.find(stop);
  GenerationRequest r = Greedy(*m.tokenizer, prompt, 60);
  r.stop = {"never appears \x01", stop};
  auto h = SubmitOk(engine, r);
  ASSERT_TRUE(h);
  const Reply reply = Collect(*h);
  EXPECT_EQ(reply.text[0], full.substr(0, at));
  EXPECT_EQ(reply.finish[0], FinishReason::kStop);
  for (const std::string& piece : reply.pieces) EXPECT_EQ(piece.find(stop), std::string::npos);
}

TEST(ServeEngine, CachedPrefixIsNotFedAgainAndGivesTheSameReply) {
  REQUIRE_SHARED(kModel);
  Loaded m = Load();
  Engine engine(*m.model, *m.tokenizer, {});
  const std::string turn1 = "The first turn of a conversation.";
  auto h1 = SubmitOk(engine, Greedy(*m.tokenizer, turn1, 5));
  ASSERT_TRUE(h1);
  const Reply r1 = Collect(*h1);
  EXPECT_EQ(r1.usage.cached_tokens, 0);
  const std::string turn2 = turn1 + " And the second turn.";
  auto h2 = SubmitOk(engine, Greedy(*m.tokenizer, turn2, 30));
  ASSERT_TRUE(h2);
  const Reply r2 = Collect(*h2);
  EXPECT_EQ(r2.usage.cached_tokens, static_cast<int>(m.tokenizer->Encode(turn1).size()));
  EXPECT_EQ(r2.text[0], m.tokenizer->Decode(GreedyAlone(*m.model, m.tokenizer->Encode(turn2), 30)));
  // The same prompt again: wholly cached, same reply.
  auto h3 = SubmitOk(engine, Greedy(*m.tokenizer, turn2, 30));
  ASSERT_TRUE(h3);
  const Reply r3 = Collect(*h3);
  EXPECT_EQ(r3.usage.cached_tokens, r3.usage.prompt_tokens);
  EXPECT_EQ(r3.text[0], r2.text[0]);
  const Engine::Stats s = engine.stats();
  EXPECT_EQ(s.cache.hits, 2u);
  EXPECT_LE(s.cache.bytes, s.cache.max_bytes);
}

TEST(ServeEngine, ChoicesFollowTheirSeeds) {
  REQUIRE_SHARED(kModel);
  Loaded m = Load();
  Engine engine(*m.model, *m.tokenizer, {});
  GenerationRequest r;
  r.prompt = m.tokenizer->Encode("Sampling");
  r.sampling.temperature = 1.0f;
  r.sampling.seed = 42;
  r.n = 3;
  r.max_tokens = 30;
  r.stop_at_end_of_text = false;
  auto a = SubmitOk(engine, r);
  auto b = SubmitOk(engine, r);
  ASSERT_TRUE(a && b);
  const Reply ra = Collect(*a, 3), rb = Collect(*b, 3);
  EXPECT_EQ(ra.text, rb.text);  // same seed, same replies
  EXPECT_NE(ra.text[0], ra.text[1]);  // each choice has its own stream (seed + index)
  EXPECT_EQ(ra.usage.completion_tokens, 90);
}

TEST(ServeEngine, FullQueueIsRefusedWith429) {
  REQUIRE_SHARED(kModel);
  Loaded m = Load();
  EngineOptions o;
  o.parallel = 1;
  o.queue = 1;
  Engine engine(*m.model, *m.tokenizer, o);
  std::vector<std::shared_ptr<GenerationHandle>> held;
  int refused = 0;
  for (int i = 0; i < 4; ++i) {
    auto s = engine.Submit(Greedy(*m.tokenizer, "busy", 3000));
    if (auto* e = std::get_if<ApiError>(&s)) {
      EXPECT_EQ(e->status, 429);
      ++refused;
    } else {
      held.push_back(std::get<std::shared_ptr<GenerationHandle>>(s));
    }
  }
  EXPECT_GE(refused, 2);  // one running, at most one waiting
  for (auto& h : held) h->Cancel();
  for (auto& h : held) Collect(*h);
  EXPECT_GE(engine.stats().requests_cancelled, 1u);
}

TEST(ServeEngine, CancelledAndTimedOutRequestsEnd) {
  REQUIRE_SHARED(kModel);
  Loaded m = Load();
  Engine engine(*m.model, *m.tokenizer, {});
  auto running = SubmitOk(engine, Greedy(*m.tokenizer, "long", 4000));
  ASSERT_TRUE(running);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  running->Cancel();
  const Reply cancelled = Collect(*running);
  EXPECT_TRUE(running->done());
  EXPECT_LT(cancelled.usage.completion_tokens, 4000);

  GenerationRequest late = Greedy(*m.tokenizer, "late", 4000);
  late.deadline = Clock::now() + std::chrono::milliseconds(100);
  auto h = SubmitOk(engine, late);
  ASSERT_TRUE(h);
  const Reply r = Collect(*h);
  EXPECT_EQ(r.finish[0], FinishReason::kLength);
  EXPECT_LT(r.usage.completion_tokens, 4000);
  EXPECT_EQ(engine.stats().requests_timed_out, 1u);
}

TEST(ServeEngine, ShutdownEndsRunningRequestsWithAnError) {
  REQUIRE_SHARED(kModel);
  Loaded m = Load();
  Engine engine(*m.model, *m.tokenizer, {});
  auto h = SubmitOk(engine, Greedy(*m.tokenizer, "shutting down", 100000));
  ASSERT_TRUE(h);
  engine.Shutdown(std::chrono::milliseconds(100));
  EXPECT_TRUE(h->done());
  const Reply r = Collect(*h);
  EXPECT_NE(r.error.find("shutting down"), std::string::npos);
  auto refused = engine.Submit(Greedy(*m.tokenizer, "after", 1));
  ASSERT_TRUE(std::holds_alternative<ApiError>(refused));
  EXPECT_EQ(std::get<ApiError>(refused).status, 503);
}

TEST(ServeEngine, PromptOnlyRequestHandsBackItsState) {
  REQUIRE_SHARED(kModel);
  Loaded m = Load();
  Engine engine(*m.model, *m.tokenizer, {});
  GenerationRequest r = Greedy(*m.tokenizer, "Remember this conversation.", 0);
  r.want_state = true;
  const std::vector<int32_t> ids = r.prompt;
  auto h = SubmitOk(engine, r);
  ASSERT_TRUE(h);
  Collect(*h);
  std::optional<State> state = h->TakeState();
  ASSERT_TRUE(state);
  State expected = m.model->NewState();
  m.model->Eval(ids, expected, nullptr);
  EXPECT_EQ(*state, expected);

  // A request from that state (as a named start state) continues the conversation exactly.
  GenerationRequest next = Greedy(*m.tokenizer, " Go on.", 20);
  next.start = std::make_shared<const StartState>(StartState{*state, -1});
  auto h2 = SubmitOk(engine, next);
  ASSERT_TRUE(h2);
  const std::string joined = "Remember this conversation. Go on.";
  EXPECT_EQ(Collect(*h2).text[0],
            m.tokenizer->Decode(GreedyAlone(*m.model, m.tokenizer->Encode(joined), 20)));
}

TEST(ServeEngine, BadRequestsAreRefusedBeforeTheyRun) {
  REQUIRE_SHARED(kModel);
  Loaded m = Load();
  EngineOptions o;
  o.parallel = 4;
  Engine engine(*m.model, *m.tokenizer, o);
  GenerationRequest empty;
  auto status = [&](GenerationRequest r) {
    auto s = engine.Submit(std::move(r));
    return std::holds_alternative<ApiError>(s) ? std::get<ApiError>(s).status : 200;
  };
  EXPECT_EQ(status(empty), 400);
  GenerationRequest bad_token = Greedy(*m.tokenizer, "x", 1);
  bad_token.prompt.push_back(1 << 20);
  EXPECT_EQ(status(bad_token), 400);
  GenerationRequest too_many = Greedy(*m.tokenizer, "x", 1);
  too_many.n = 5;
  EXPECT_EQ(status(too_many), 400);
  GenerationRequest bad_top_p = Greedy(*m.tokenizer, "x", 1);
  bad_top_p.sampling.top_p = -1;
  EXPECT_EQ(status(bad_top_p), 400);
}

}  // namespace
}  // namespace aviary::serve

namespace aviary::serve {
namespace {

// A chat reply is fed to the end of its turn (" reply\n\n", as the next request renders it), so
// the next turn only feeds its own message.
TEST(ServeEngine, NextChatTurnStartsAfterTheReply) {
  REQUIRE_SHARED(kModel);
  Loaded m = Load();
  Engine engine(*m.model, *m.tokenizer, {});
  const std::string turn1 = "User: Hello there\n\nAssistant:";
  GenerationRequest r = Greedy(*m.tokenizer, turn1, 10);
  r.chat = true;
  auto h = SubmitOk(engine, r);
  ASSERT_TRUE(h);
  const Reply first = Collect(*h);
  ASSERT_EQ(first.finish[0], FinishReason::kLength);
  const std::string raw = m.tokenizer->Decode(GreedyAlone(*m.model, m.tokenizer->Encode(turn1), 10));
  const std::string turn2 = turn1 + " " + first.text[0] + "\n\nUser: And then?\n\nAssistant:";
  // Sent at once: the engine finishes feeding the reply before it looks the next turn up.
  GenerationRequest r2 = Greedy(*m.tokenizer, turn2, 10);
  r2.chat = true;
  auto h2 = SubmitOk(engine, r2);
  ASSERT_TRUE(h2);
  const Reply second = Collect(*h2);
  const size_t through_reply = turn1.size() + 1 + first.text[0].size() + 2;  // bytes = tokens
  // The template's space is not part of the reply.
  EXPECT_EQ(first.text[0], raw.starts_with(' ') ? raw.substr(1) : raw);
  EXPECT_EQ(second.usage.cached_tokens, static_cast<int>(through_reply));
  // The reply is the one a fresh engine gives.
  Engine fresh(*m.model, *m.tokenizer, {});
  auto h3 = SubmitOk(fresh, r2);
  ASSERT_TRUE(h3);
  EXPECT_EQ(Collect(*h3).text[0], second.text[0]);

  // A reply cut by a stop string inside a token is not how the next turn renders it: it is fed
  // again from the prompt's state, and the next turn still starts after it.
  const std::string turn3 = "User: Something else\n\nAssistant:";
  const std::string raw3 =
      m.tokenizer->Decode(GreedyAlone(*m.model, m.tokenizer->Encode(turn3), 12));
  ASSERT_GE(raw3.size(), 8u);
  GenerationRequest r3 = Greedy(*m.tokenizer, turn3, 12);
  r3.chat = true;
  r3.stop = {raw3.substr(5, 2)};
  auto h4 = SubmitOk(engine, r3);
  ASSERT_TRUE(h4);
  const std::string cut = Collect(*h4).text[0];
  const std::string turn4 = turn3 + " " + cut + "\n\nUser: More\n\nAssistant:";
  GenerationRequest r4 = Greedy(*m.tokenizer, turn4, 4);
  r4.chat = true;
  auto h5 = SubmitOk(engine, r4);
  ASSERT_TRUE(h5);
  EXPECT_EQ(Collect(*h5).usage.cached_tokens, static_cast<int>(turn3.size() + 1 + cut.size() + 2));
}

}  // namespace
}  // namespace aviary::serve
