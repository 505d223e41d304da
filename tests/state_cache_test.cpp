// The server's state cache (src/serve/state_cache.h): longest-prefix lookup, exact continuation
// from a cached state, the LRU byte budget, and concurrent use.
#include "serve/state_cache.h"

#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "aviary/model.h"
#include "aviary/runtime.h"
#include "test_data.h"

namespace aviary::serve {
namespace {

using testing::SharedPath;

constexpr char kModel[] = "models/tiny-rwkv-7v0-834K-FP32.bin";

// A stand-in state of `floats` floats, all `value`, so tests can tell entries apart.
State FakeState(size_t floats, float value) {
  State state;
  state.data().assign(floats, value);
  return state;
}

size_t FakeEntryBytes(size_t tokens, size_t floats, size_t logits) {
  return StateCache::EntryBytes(tokens, floats * sizeof(float), logits);
}

TEST(StateCache, LongestPrefixOfSequencesThatShareAndDiverge) {
  StateCache cache(1 << 20);
  const std::vector<float> logits = {0.5f, -1.0f};
  ASSERT_TRUE(cache.Insert(std::vector<int32_t>{1, 2}, FakeState(8, 12), logits));
  ASSERT_TRUE(cache.Insert(std::vector<int32_t>{1, 2, 3, 4}, FakeState(8, 1234), logits));
  ASSERT_TRUE(cache.Insert(std::vector<int32_t>{1, 2, 5}, FakeState(8, 125), logits));
  ASSERT_TRUE(cache.Insert(std::vector<int32_t>{7}, FakeState(8, 7), logits));

  struct Case {
    std::vector<int32_t> prompt;
    size_t length;  // 0: miss
    float value;
  };
  const Case cases[] = {
      {{1, 2, 3, 4, 9, 9}, 4, 1234},  // continues the longest entry
      {{1, 2, 3, 4}, 4, 1234},        // the whole prompt is cached
      {{1, 2, 3}, 2, 12},             // stops inside the longest entry
      {{1, 2, 5, 6}, 3, 125},         // the branch that diverged at the third token
      {{1, 2, 6}, 2, 12},             // diverges from both branches
      {{1, 2}, 2, 12},
      {{7, 1, 2}, 1, 7},
      {{1}, 0, 0},  // no entry is a prefix of it
      {{2, 1, 2}, 0, 0},
      {{}, 0, 0},
  };
  for (const Case& c : cases) {
    const std::optional<StateCache::Hit> hit = cache.Lookup(c.prompt);
    ASSERT_EQ(hit.has_value(), c.length > 0) << ::testing::PrintToString(c.prompt);
    if (!hit) continue;
    EXPECT_EQ(hit->length, c.length) << ::testing::PrintToString(c.prompt);
    EXPECT_EQ(hit->state, FakeState(8, c.value));
    EXPECT_EQ(hit->logits, logits);
  }
  const StateCache::Stats stats = cache.stats();
  EXPECT_EQ(stats.hits, 7u);
  EXPECT_EQ(stats.misses, 3u);
  EXPECT_EQ(stats.entries, 4u);
  EXPECT_EQ(stats.evictions, 0u);
  EXPECT_EQ(stats.bytes, FakeEntryBytes(2, 8, 2) + FakeEntryBytes(4, 8, 2) +
                             FakeEntryBytes(3, 8, 2) + FakeEntryBytes(1, 8, 2));
}

TEST(StateCache, HitIsACopyTheCallerMayAdvance) {
  StateCache cache(1 << 20);
  ASSERT_TRUE(cache.Insert(std::vector<int32_t>{3, 4}, FakeState(4, 1), std::vector<float>{2}));
  std::optional<StateCache::Hit> hit = cache.Lookup(std::vector<int32_t>{3, 4});
  ASSERT_TRUE(hit);
  hit->state.data()[0] = 99;
  hit->logits[0] = 99;
  const std::optional<StateCache::Hit> again = cache.Lookup(std::vector<int32_t>{3, 4});
  ASSERT_TRUE(again);
  EXPECT_EQ(again->state, FakeState(4, 1));
  EXPECT_EQ(again->logits, std::vector<float>{2});
}

TEST(StateCache, InsertingTheSameTokensReplacesTheEntry) {
  StateCache cache(1 << 20);
  const std::vector<int32_t> tokens = {5, 6, 7};
  ASSERT_TRUE(cache.Insert(tokens, FakeState(4, 1), std::vector<float>{1}));
  ASSERT_TRUE(cache.Insert(tokens, FakeState(4, 2), std::vector<float>{2}));
  const std::optional<StateCache::Hit> hit = cache.Lookup(tokens);
  ASSERT_TRUE(hit);
  EXPECT_EQ(hit->state, FakeState(4, 2));
  EXPECT_EQ(hit->logits, std::vector<float>{2});
  EXPECT_EQ(cache.stats().entries, 1u);
  EXPECT_EQ(cache.stats().bytes, FakeEntryBytes(3, 4, 1));
  EXPECT_EQ(cache.stats().evictions, 0u);
}

// A conversation resumed from the cache only feeds its new tokens, and must give exactly the
// logits of feeding the whole prompt from the start state.
TEST(StateCache, ContinuationFromAHitEqualsTheWholePromptBitForBit) {
  REQUIRE_SHARED(kModel);
  RuntimeOptions f32;
  f32.activations = Activations::kF32;
  LoadOptions options;
  options.runtime = std::make_shared<Runtime>(f32);
  const std::unique_ptr<Model> model = Model::Load(SharedPath(kModel), options);

  const std::vector<int32_t> turn1 = {0x22, 0x69, 0x6e, 0x20, 0x74, 0x68, 0x65};
  std::vector<int32_t> turn2 = turn1;
  for (const int32_t t : {0x0a, 0x41, 0x3a, 0x20, 0x6f, 0x6b}) turn2.push_back(t);

  StateCache cache(64 << 20);
  State state = model->NewState();
  std::vector<float> logits;
  model->Eval(turn1, state, &logits);
  ASSERT_TRUE(cache.Insert(turn1, state, logits));

  std::optional<StateCache::Hit> hit = cache.Lookup(turn2);
  ASSERT_TRUE(hit);
  ASSERT_EQ(hit->length, turn1.size());
  EXPECT_EQ(hit->logits, logits);
  std::vector<float> resumed;
  model->Eval(std::span<const int32_t>(turn2).subspan(hit->length), hit->state, &resumed);

  State fresh = model->NewState();
  std::vector<float> whole;
  model->Eval(turn2, fresh, &whole);
  EXPECT_EQ(resumed, whole);  // bit-identical
  EXPECT_EQ(hit->state, fresh);
  EXPECT_EQ(hit->state.tokens_seen(), turn2.size());

  // The exact prompt cached: its logits sample the next token without running the model.
  const std::optional<StateCache::Hit> exact = cache.Lookup(turn1);
  ASSERT_TRUE(exact);
  EXPECT_EQ(exact->length, turn1.size());
  EXPECT_EQ(exact->logits, logits);
  EXPECT_EQ(exact->state, state);
}

TEST(StateCache, EvictsTheLeastRecentlyUsedToStayWithinTheBudget) {
  const size_t entry = FakeEntryBytes(2, 100, 10);
  StateCache cache(3 * entry + entry / 2);  // room for three entries
  const std::vector<float> logits(10, 0.0f);
  ASSERT_TRUE(cache.Insert(std::vector<int32_t>{1, 1}, FakeState(100, 1), logits));
  ASSERT_TRUE(cache.Insert(std::vector<int32_t>{2, 2}, FakeState(100, 2), logits));
  ASSERT_TRUE(cache.Insert(std::vector<int32_t>{3, 3}, FakeState(100, 3), logits));
  // A hit refreshes {1, 1}: {2, 2} is now the least recently used.
  ASSERT_TRUE(cache.Lookup(std::vector<int32_t>{1, 1, 9}));
  ASSERT_TRUE(cache.Insert(std::vector<int32_t>{4, 4}, FakeState(100, 4), logits));

  StateCache::Stats stats = cache.stats();
  EXPECT_EQ(stats.entries, 3u);
  EXPECT_EQ(stats.evictions, 1u);
  EXPECT_EQ(stats.bytes, 3 * entry);
  EXPECT_LE(stats.bytes, stats.max_bytes);
  EXPECT_FALSE(cache.Lookup(std::vector<int32_t>{2, 2}));
  EXPECT_TRUE(cache.Lookup(std::vector<int32_t>{1, 1}));
  EXPECT_TRUE(cache.Lookup(std::vector<int32_t>{3, 3}));
  EXPECT_TRUE(cache.Lookup(std::vector<int32_t>{4, 4}));

  // A larger entry evicts as many of the oldest as it needs: {1, 1} then {3, 3}.
  ASSERT_TRUE(cache.Insert(std::vector<int32_t>{5, 5}, FakeState(200, 5), logits));
  stats = cache.stats();
  EXPECT_EQ(stats.entries, 2u);
  EXPECT_EQ(stats.evictions, 3u);
  EXPECT_EQ(stats.bytes, entry + FakeEntryBytes(2, 200, 10));
  EXPECT_LE(stats.bytes, stats.max_bytes);
  EXPECT_FALSE(cache.Lookup(std::vector<int32_t>{1, 1}));
  EXPECT_FALSE(cache.Lookup(std::vector<int32_t>{3, 3}));
  EXPECT_TRUE(cache.Lookup(std::vector<int32_t>{4, 4}));
  EXPECT_TRUE(cache.Lookup(std::vector<int32_t>{5, 5}));
}

TEST(StateCache, RefusesAnEntryLargerThanTheBudget) {
  const size_t entry = FakeEntryBytes(3, 100, 10);
  StateCache cache(entry);
  const std::vector<float> logits(10, 0.0f);
  ASSERT_TRUE(cache.Insert(std::vector<int32_t>{1, 2, 3}, FakeState(100, 1), logits));
  // One more float than the budget allows: refused, and the cached entry stays.
  EXPECT_FALSE(cache.Insert(std::vector<int32_t>{4, 5, 6}, FakeState(101, 2), logits));
  const StateCache::Stats stats = cache.stats();
  EXPECT_EQ(stats.entries, 1u);
  EXPECT_EQ(stats.bytes, entry);
  EXPECT_EQ(stats.evictions, 0u);
  EXPECT_TRUE(cache.Lookup(std::vector<int32_t>{1, 2, 3}));
  EXPECT_FALSE(cache.Insert(std::vector<int32_t>{}, FakeState(1, 1), logits));  // nothing to key
}

TEST(StateCache, ZeroBytesDisablesIt) {
  StateCache cache(0);
  EXPECT_FALSE(cache.Insert(std::vector<int32_t>{1}, FakeState(1, 1), std::vector<float>{1}));
  EXPECT_FALSE(cache.Lookup(std::vector<int32_t>{1}));
  const StateCache::Stats stats = cache.stats();
  EXPECT_EQ(stats.entries, 0u);
  EXPECT_EQ(stats.bytes, 0u);
  EXPECT_EQ(stats.hits, 0u);
  EXPECT_EQ(stats.misses, 1u);
}

// Many entries with long shared prefixes: each prompt still finds its own entry.
TEST(StateCache, ManyLongConversations) {
  StateCache cache(256 << 20);
  std::vector<int32_t> base(4000);
  for (size_t i = 0; i < base.size(); ++i) base[i] = static_cast<int32_t>(i % 97);
  for (int32_t c = 0; c < 200; ++c) {
    std::vector<int32_t> tokens(base.begin(), base.begin() + 1000 + 10 * c);
    tokens.push_back(1000 + c);
    ASSERT_TRUE(cache.Insert(tokens, FakeState(16, static_cast<float>(c)), std::vector<float>{}));
  }
  for (int32_t c = 0; c < 200; ++c) {
    std::vector<int32_t> prompt(base.begin(), base.begin() + 1000 + 10 * c);
    prompt.push_back(1000 + c);
    prompt.insert(prompt.end(), base.begin(), base.end());
    const std::optional<StateCache::Hit> hit = cache.Lookup(prompt);
    ASSERT_TRUE(hit);
    EXPECT_EQ(hit->length, 1001u + 10 * c);
    EXPECT_EQ(hit->state, FakeState(16, static_cast<float>(c)));
  }
  EXPECT_FALSE(cache.Lookup(base));
}

// Several threads inserting and looking up at once (run under the sanitizers in CI): the budget
// holds throughout, and every hit is the state its tokens were inserted with.
TEST(StateCache, ConcurrentInsertAndLookup) {
  constexpr int kThreads = 8, kRounds = 400, kFloats = 64;
  const size_t entry = FakeEntryBytes(4, kFloats, 4);
  StateCache cache(20 * entry);  // small enough that evictions happen all the time
  std::atomic<int> wrong{0}, over_budget{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < kRounds; ++r) {
        const int32_t key = (t * 7 + r) % 50;  // threads share keys
        const std::vector<int32_t> tokens = {key, key + 1, key + 2, key + 3};
        cache.Insert(tokens, FakeState(kFloats, static_cast<float>(key)),
                     std::vector<float>(4, static_cast<float>(key)));
        std::vector<int32_t> prompt = tokens;
        prompt.push_back(-1);
        if (const std::optional<StateCache::Hit> hit = cache.Lookup(prompt)) {
          if (hit->length != 4 || hit->state != FakeState(kFloats, static_cast<float>(key)) ||
              hit->logits != std::vector<float>(4, static_cast<float>(key))) {
            ++wrong;
          }
        }
        if (cache.stats().bytes > 20 * entry) ++over_budget;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(over_budget.load(), 0);
  const StateCache::Stats stats = cache.stats();
  EXPECT_EQ(stats.hits + stats.misses, static_cast<uint64_t>(kThreads * kRounds));
  EXPECT_GT(stats.evictions, 0u);
  EXPECT_LE(stats.entries, 20u);
  EXPECT_EQ(stats.bytes, stats.entries * entry);
}

}  // namespace
}  // namespace aviary::serve
