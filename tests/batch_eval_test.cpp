// Model::EvalBatch: several sequences in one pass over the weights must leave each exactly as
// Eval alone would (states and logits bit for bit), whatever the other items, their order, the
// passes an item is split over, the thread count and the activation rounding; bad input is
// refused before any state changes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "aviary/error.h"
#include "aviary/model.h"
#include "aviary/state.h"
#include "test_data.h"

namespace {

using aviary::BatchItem;
using aviary::Model;
using aviary::State;
using aviary::testing::RoundedActivations;
using aviary::testing::RuntimeGuard;
using aviary::testing::SetNumThreads;
using aviary::testing::SharedPath;
using aviary::testing::RandomTokens;

// Models are read-only after loading: load each file once per process.
const Model& Cached(const std::string& relative) {
  static std::map<std::string, std::unique_ptr<Model>> cache;
  auto& slot = cache[relative];
  if (!slot) slot = Model::Load(SharedPath(relative));
  return *slot;
}

bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  // memcmp must not see the null data() of empty vectors.
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// One sequence of a test batch: where its state starts and what it is fed.
struct Seq {
  size_t history;  // tokens fed before the batch (the state's position)
  size_t length;   // tokens fed in the batch
  bool want_logits = true;
};

struct Result {
  std::vector<State> states;
  std::vector<std::vector<float>> logits;
};

State StateAfter(const Model& model, size_t history, uint64_t seed) {
  State s = model.NewState();
  if (history > 0) model.Eval(RandomTokens(history, seed), s, nullptr);
  return s;
}

std::vector<int32_t> TokensOf(const Seq& q, size_t i) { return RandomTokens(q.length, 1000 + i); }

// Each sequence's start state: its history fed with Eval. Computed once and given to both sides
// of a comparison, which must start from the same states (and most of a test's time would
// otherwise go to feeding each history twice).
std::vector<State> StartStates(const Model& model, const std::vector<Seq>& seqs) {
  std::vector<State> states;
  for (size_t i = 0; i < seqs.size(); ++i) states.push_back(StateAfter(model, seqs[i].history, i + 1));
  return states;
}

// Each sequence fed alone with Eval, from its start state.
Result Alone(const Model& model, const std::vector<Seq>& seqs, const std::vector<State>& start) {
  Result r;
  for (size_t i = 0; i < seqs.size(); ++i) {
    r.states.push_back(start[i]);
    r.logits.emplace_back();
    model.Eval(TokensOf(seqs[i], i), r.states.back(),
               seqs[i].want_logits ? &r.logits.back() : nullptr);
  }
  return r;
}

// All sequences fed together with EvalBatch, from the same start states.
Result Together(const Model& model, const std::vector<Seq>& seqs, const std::vector<State>& start) {
  Result r;
  std::vector<std::vector<int32_t>> tokens;
  for (size_t i = 0; i < seqs.size(); ++i) {
    r.states.push_back(start[i]);
    r.logits.emplace_back();
    tokens.push_back(TokensOf(seqs[i], i));
  }
  std::vector<BatchItem> items;
  for (size_t i = 0; i < seqs.size(); ++i) {
    items.push_back({tokens[i], &r.states[i], seqs[i].want_logits ? &r.logits[i] : nullptr});
  }
  model.EvalBatch(items);
  return r;
}

void ExpectSame(const Result& alone, const Result& together) {
  ASSERT_EQ(alone.states.size(), together.states.size());
  for (size_t i = 0; i < alone.states.size(); ++i) {
    SCOPED_TRACE("item " + std::to_string(i));
    EXPECT_EQ(together.states[i], alone.states[i]);
    EXPECT_EQ(together.states[i].tokens_seen(), alone.states[i].tokens_seen());
    EXPECT_TRUE(BitEqual(together.logits[i], alone.logits[i]))
        << "logits differ (sizes " << together.logits[i].size() << ", " << alone.logits[i].size()
        << ")";
  }
}

// EvalBatch over `seqs` leaves each item as Eval alone does; returns the items alone.
Result ExpectTogetherMatchesAlone(const Model& model, const std::vector<Seq>& seqs) {
  const std::vector<State> start = StartStates(model, seqs);
  Result alone = Alone(model, seqs, start);
  ExpectSame(alone, Together(model, seqs, start));
  return alone;
}

// (model file under shared/, rounded activations: the default kAuto, or exact float ones).
using Param = std::tuple<std::string, bool>;

class BatchEvalTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    REQUIRE_SHARED(File());
    RoundedActivations::Set(std::get<1>(GetParam()));
  }
  std::string File() const { return std::get<0>(GetParam()); }
  const Model& M() const { return Cached(File()); }

  RuntimeGuard guard_;  // restores threads and activations after each test
};

// Mixed lengths (decoding, a short prompt, a long one, one longer than a pass), states at
// different positions, one item without logits; on one thread and on two.
TEST_P(BatchEvalTest, MixedItemsMatchEvalAlone) {
  const std::vector<Seq> seqs = {{5, 1},        {0, 3},   {77, 40}, {200, 130},
                                 {1, 1, false}, {130, 7}, {0, 1}};
  for (int threads : {1, 2}) {
    SCOPED_TRACE(std::to_string(threads) + " threads");
    SetNumThreads(threads);
    const Result alone = ExpectTogetherMatchesAlone(M(), seqs);
    EXPECT_TRUE(alone.logits[4].empty());
  }
}

// The same item first, last, alone and between others: its result never changes.
TEST_P(BatchEvalTest, PlacementDoesNotMatter) {
  const Seq probe{33, 40};
  const std::vector<std::vector<Seq>> batches = {
      {probe},
      {probe, {3, 1}, {9, 100}},
      {{3, 1}, {9, 100}, probe},  // starts in the first pass, ends in the second
      {{0, 120}, probe, {4, 2}},  // split across passes at row 8 of its own
      {{1, 1}, {2, 1}, probe, {3, 1}}};
  SetNumThreads(2);
  for (size_t b = 0; b < batches.size(); ++b) {
    SCOPED_TRACE("batch " + std::to_string(b));
    ExpectTogetherMatchesAlone(M(), batches[b]);
  }
}

// A long item spread over three passes, and many one-token items filling more than a pass.
TEST_P(BatchEvalTest, LongItemsAndManyItems) {
  SetNumThreads(2);
  ExpectTogetherMatchesAlone(M(), {{10, 300}, {0, 1}});
  std::vector<Seq> many;
  for (size_t i = 0; i < 140; ++i) many.push_back({i % 7, 1 + i % 3});
  ExpectTogetherMatchesAlone(M(), many);
}

// Eval split at a point other than a chunk boundary gives the bits of Eval in one call: what lets
// EvalBatch cut an item wherever a pass fills up.
TEST_P(BatchEvalTest, SplitEvalMatchesWhole) {
  const std::vector<int32_t> tokens = RandomTokens(50, 7);
  const std::span<const int32_t> all(tokens);
  for (int threads : {1, 2}) {
    SetNumThreads(threads);
    State whole = M().NewState(), split = M().NewState();
    std::vector<float> whole_logits, first_logits, split_logits;
    M().Eval(all, whole, &whole_logits);
    M().Eval(all.first(20), split, &first_logits);
    M().Eval(all.subspan(20), split, &split_logits);
    EXPECT_EQ(split, whole) << threads << " threads";
    EXPECT_TRUE(BitEqual(split_logits, whole_logits)) << threads << " threads";
  }
}

TEST_P(BatchEvalTest, BadInputChangesNoState) {
  const Model& model = M();
  State a = StateAfter(model, 4, 1), b = StateAfter(model, 9, 2);
  const State a0 = a, b0 = b;
  const std::vector<int32_t> good = {1, 2, 3}, one = {7};
  std::vector<float> la, lb;

  // A bad id in the last item: the first item is not fed either.
  for (const std::vector<int32_t>& bad :
       {std::vector<int32_t>{256}, std::vector<int32_t>{5, -1, 6}}) {
    const BatchItem items[] = {{good, &a, &la}, {bad, &b, &lb}};
    EXPECT_THROW(model.EvalBatch(items), aviary::Error);
    EXPECT_EQ(a, a0);
    EXPECT_EQ(b, b0);
  }
  {  // one state in two items
    const BatchItem items[] = {{good, &a, &la}, {one, &b, nullptr}, {one, &a, &lb}};
    EXPECT_THROW(model.EvalBatch(items), aviary::UsageError);
  }
  {  // one logits vector in two items
    const BatchItem items[] = {{good, &a, &la}, {one, &b, &la}};
    EXPECT_THROW(model.EvalBatch(items), aviary::UsageError);
  }
  {  // no tokens
    const BatchItem items[] = {{good, &a, &la}, {std::span<const int32_t>(), &b, &lb}};
    EXPECT_THROW(model.EvalBatch(items), aviary::UsageError);
  }
  {  // no state
    const BatchItem items[] = {{good, &a, &la}, {one, nullptr, &lb}};
    EXPECT_THROW(model.EvalBatch(items), aviary::UsageError);
  }
  {  // a state of another model, and one of no model
    const std::string other = File().find("7v0") != std::string::npos
                                  ? "models/tiny-rwkv-6v0-1m-FP32.bin"
                                  : "models/tiny-rwkv-7v0-834K-FP32.bin";
    REQUIRE_SHARED(other);
    State foreign = Cached(other).NewState(), none;
    const State foreign0 = foreign;
    for (State* s : {&foreign, &none}) {
      const BatchItem items[] = {{good, &a, &la}, {one, s, &lb}};
      EXPECT_THROW(model.EvalBatch(items), aviary::UsageError);
    }
    EXPECT_EQ(foreign, foreign0);
  }
  EXPECT_EQ(a, a0);
  EXPECT_EQ(b, b0);
  EXPECT_TRUE(la.empty());
  EXPECT_TRUE(lb.empty());

  // An empty batch does nothing.
  EXPECT_NO_THROW(model.EvalBatch({}));
}

// Greedy decoding of 16 conversations together (prompts prefilled together, then one token each
// per step) picks the same tokens and ends in the same states as each decoded alone.
TEST_P(BatchEvalTest, GreedyDecodingTogetherMatchesAlone) {
  constexpr size_t kSeqs = 16, kSteps = 20;
  SetNumThreads(2);
  const Model& model = M();
  auto argmax = [](const std::vector<float>& l) {
    return static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
  };
  std::vector<std::vector<int32_t>> prompts;
  for (size_t i = 0; i < kSeqs; ++i) prompts.push_back(RandomTokens(1 + (i * 13) % 37, 50 + i));

  std::vector<std::vector<int32_t>> alone_out(kSeqs);
  std::vector<State> alone_states;
  for (size_t i = 0; i < kSeqs; ++i) {
    State s = model.NewState();
    std::vector<float> logits;
    model.Eval(prompts[i], s, &logits);
    for (size_t step = 0; step < kSteps; ++step) {
      const int32_t next = argmax(logits);
      alone_out[i].push_back(next);
      model.Eval(std::span(&next, 1), s, &logits);
    }
    alone_states.push_back(std::move(s));
  }

  std::vector<State> states(kSeqs, model.NewState());
  std::vector<std::vector<float>> logits(kSeqs);
  std::vector<std::vector<int32_t>> out(kSeqs);
  std::vector<BatchItem> items(kSeqs);
  for (size_t i = 0; i < kSeqs; ++i) items[i] = {prompts[i], &states[i], &logits[i]};
  model.EvalBatch(items);
  std::vector<int32_t> next(kSeqs);
  for (size_t step = 0; step < kSteps; ++step) {
    for (size_t i = 0; i < kSeqs; ++i) {
      next[i] = argmax(logits[i]);
      out[i].push_back(next[i]);
      items[i].tokens = std::span(&next[i], 1);
    }
    model.EvalBatch(items);
  }
  for (size_t i = 0; i < kSeqs; ++i) {
    SCOPED_TRACE("sequence " + std::to_string(i));
    EXPECT_EQ(out[i], alone_out[i]);
    EXPECT_EQ(states[i], alone_states[i]);
    EXPECT_EQ(states[i].tokens_seen(), prompts[i].size() + kSteps);
  }
}

std::vector<std::string> Models() {
  std::vector<std::string> files;
  for (const char* tiny : {"4v0-660K", "5v1-730K", "5v2-730K", "6v0-1m", "7v0-834K"}) {
    for (const char* type : {"FP32", "FP16", "Q5_1"}) {
      files.push_back(std::string("models/tiny-rwkv-") + tiny + "-" + type + ".bin");
    }
  }
  files.push_back("models/quantized/tiny-rwkv-7v0-834K-Q8_0.bin");
  files.push_back("models/stress/stress-rwkv-7v0-FP16.bin");
  files.push_back("models/stress/stress-rwkv-5v2-FP32.bin");
  return files;
}

std::string ParamName(const ::testing::TestParamInfo<Param>& info) {
  std::string name = std::get<0>(info.param);
  name = name.substr(name.rfind('/') + 1);
  name.resize(name.size() - 4);  // ".bin"
  for (char& c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return name + (std::get<1>(info.param) ? "_rounded" : "_f32");
}

INSTANTIATE_TEST_SUITE_P(Models, BatchEvalTest,
                         ::testing::Combine(::testing::ValuesIn(Models()), ::testing::Bool()),
                         ParamName);

}  // namespace
