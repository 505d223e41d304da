// aviary chat: command parsing, the ChatRWKV-order sampler, templates, every command's effect
// on the session's snapshots (compared state by state and logit by logit), stop rules on a
// scripted model, and the CLI driven through a pipe.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <span>
#include <tuple>

#include "aviary/chat.h"
#include "aviary/error.h"
#include "aviary/model.h"
#include "aviary/sampler.h"
#include "chat/commands.h"
#include "chat_fakes.h"
#include "test_data.h"

namespace aviary::testing {
namespace {

const char* kTiny = "models/tiny-rwkv-5v2-730K-FP32.bin";
const char* kOtherModel = "models/tiny-rwkv-4v0-660K-FP32.bin";

std::string TempPath(const std::string& name) { return ProcessTempDir() + "aviary_chat_" + name; }

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

std::string ReadText(const std::string& path) {
  const std::vector<uint8_t> b = ReadFileBytes(path);
  return std::string(b.begin(), b.end());
}

// Feeds `text` one token at a time (as generation does) to a copy of `snap`.
ChatSession::Snapshot FeedOneByOne(const Model& model, const Tokenizer& tok,
                                   ChatSession::Snapshot snap, const std::string& text) {
  for (int32_t id : tok.Encode(text)) {
    model.Eval({&id, 1}, snap.state, &snap.logits);
    snap.last_token = id;
  }
  return snap;
}

float MaxLogitDiff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  float m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

struct Collector {
  std::string prefix, text;
  std::vector<std::string> pieces, notes;
  ChatCallbacks Callbacks() {
    ChatCallbacks cb;
    cb.begin = [this](std::string_view p) { prefix = p; };
    cb.text = [this](std::string_view t) {
      pieces.emplace_back(t);
      text += t;
    };
    cb.note = [this](std::string_view n) { notes.emplace_back(n); };
    return cb;
  }
};

// ---- command parsing ---------------------------------------------------------------------

TEST(ChatCommands, ParsesEveryCommand) {
  using chat::Command;
  const std::map<std::string, Command> exact = {
      {"+", Command::kRetry},      {"++", Command::kRegenerate}, {"+++", Command::kContinue},
      {"+reset", Command::kReset}, {"+RESET", Command::kReset},  {"+state", Command::kState},
      {"+help", Command::kHelp},   {"+exit", Command::kExit},    {"  +reset  ", Command::kReset},
      {"", Command::kEmpty},       {"   ", Command::kEmpty},
  };
  for (const auto& [line, command] : exact) {
    const chat::ParsedLine p = chat::ParseLine(line, 1.2f, 0.5f);
    EXPECT_EQ(p.command, command) << "'" << line << "'";
    EXPECT_TRUE(p.text.empty()) << line;
  }
  const std::map<std::string, std::pair<Command, std::string>> with_arg = {
      {"+gen Once upon", {Command::kGen, "Once upon"}},
      {"+GEN\tx", {Command::kGen, "x"}},
      {"+i translate this", {Command::kInstruct, "translate this"}},
      {"+qa why is the sky blue?", {Command::kQa, "why is the sky blue?"}},
      {"+save /tmp/a b.chat", {Command::kSave, "/tmp/a b.chat"}},
      {"+load x.chat", {Command::kLoad, "x.chat"}},
      // Anything else is a chat message.
      {"hello there", {Command::kChat, "hello there"}},
      {"+reset now", {Command::kChat, "+reset now"}},
      {"+foo", {Command::kChat, "+foo"}},
      {"+ x", {Command::kChat, "+ x"}},
      {"++++", {Command::kChat, "++++"}},
      {"+general idea", {Command::kChat, "+general idea"}},
  };
  for (const auto& [line, want] : with_arg) {
    const chat::ParsedLine p = chat::ParseLine(line, 1.2f, 0.5f);
    EXPECT_EQ(p.command, want.first) << line;
    EXPECT_EQ(p.text, want.second) << line;
    EXPECT_TRUE(p.missing_argument.empty()) << line;
  }
  for (const char* line : {"+gen", "+i", "+qa  ", "+save", "+load"}) {
    EXPECT_FALSE(chat::ParseLine(line, 1.2f, 0.5f).missing_argument.empty()) << line;
  }
}

TEST(ChatCommands, SettingsAreRemovedCompletely) {
  chat::ParsedLine p = chat::ParseLine("-temp=1.2 -top_p=0.5 hello", 1.0f, 0.8f);
  EXPECT_EQ(p.command, chat::Command::kChat);
  EXPECT_EQ(p.text, "hello");
  EXPECT_FLOAT_EQ(*p.temperature, 1.2f);
  EXPECT_FLOAT_EQ(*p.top_p, 0.5f);
  // ChatRWKV leaves ".0" behind here; nothing is left behind.
  p = chat::ParseLine("-temp=1.0 hello", 1.2f, 0.5f);
  EXPECT_EQ(p.text, "hello");
  EXPECT_FLOAT_EQ(*p.temperature, 1.0f);
  p = chat::ParseLine("tell me -top_p=0.30 a story -temp=2", 1.2f, 0.5f);
  EXPECT_EQ(p.text, "tell me a story");
  EXPECT_FLOAT_EQ(*p.top_p, 0.3f);
  EXPECT_FLOAT_EQ(*p.temperature, 2.0f);
  p = chat::ParseLine("-temp=0.7 +gen The cat", 1.2f, 0.5f);
  EXPECT_EQ(p.command, chat::Command::kGen);
  EXPECT_EQ(p.text, "The cat");
  p = chat::ParseLine("-top_p=0 -seed=42", 1.2f, 0.5f);
  EXPECT_EQ(p.command, chat::Command::kEmpty);
  EXPECT_TRUE(p.had_settings);
  EXPECT_FLOAT_EQ(*p.top_p, 0.0f);
  EXPECT_EQ(*p.seed, 42u);
  // Bounds are inclusive.
  p = chat::ParseLine("-temp=0.2 -top_p=1", 1.2f, 0.5f);
  EXPECT_TRUE(p.errors.empty());
  p = chat::ParseLine("-temp=5 -top_p=0.0", 1.2f, 0.5f);
  EXPECT_TRUE(p.errors.empty());
  // Not settings: other dashes stay in the message.
  p = chat::ParseLine("-temperature is -temp", 1.2f, 0.5f);
  EXPECT_EQ(p.command, chat::Command::kChat);
  EXPECT_EQ(p.text, "-temperature is -temp");
  EXPECT_FALSE(p.had_settings);
}

// Settings are plain decimals: no sign (not even "-0"), no hex floats, no leading '+'.
TEST(ChatCommands, SettingsArePlainDecimals) {
  for (const char* line : {"-top_p=-0", "-top_p=-0.0", "-top_p=0x0.8p0", "-temp=0x1p0", "-temp=+1",
                           "-top_p=+0.5", "-temp=1.0f", "-top_p=0.5 -temp=-1"}) {
    const chat::ParsedLine p = chat::ParseLine(line, 1.2f, 0.5f);
    EXPECT_EQ(p.errors.size(), 1u) << line;
  }
  const chat::ParsedLine ok = chat::ParseLine("-temp=1e0 -top_p=.25", 1.2f, 0.5f);
  EXPECT_TRUE(ok.errors.empty());
  EXPECT_EQ(ok.temperature, 1.0f);
  EXPECT_EQ(ok.top_p, 0.25f);
}

TEST(ChatCommands, BadSettingsNameRangeAndValueInForce) {
  for (const char* line :
       {"-temp=9 hello", "-temp=0.1", "-temp=abc hi", "-temp=", "-temp=nan", "-temp=1.2.3",
        "-top_p=1.5", "-top_p=-0.1 x", "-top_p=", "-top_p=inf", "-seed=-1", "-seed=x1"}) {
    const chat::ParsedLine p = chat::ParseLine(line, 1.2f, 0.5f);
    ASSERT_EQ(p.errors.size(), 1u) << line;
    const std::string& e = p.errors[0];
    if (std::string(line).find("-temp") == 0) {
      EXPECT_NE(e.find("0.2 to 5"), std::string::npos) << e;
      EXPECT_NE(e.find("now 1.2"), std::string::npos) << e;
    } else if (std::string(line).find("-top_p") == 0) {
      EXPECT_NE(e.find("0.0 to 1.0"), std::string::npos) << e;
      EXPECT_NE(e.find("now 0.5"), std::string::npos) << e;
    }
  }
}

TEST(ChatCommands, FoldsNewlinesAndUnescapes) {
  EXPECT_EQ(chat::FoldNewlines("a\n\nb\r\n\r\nc\n\n\n\nd\ne"), "a\nb\nc\nd\ne");
  EXPECT_EQ(chat::UnescapeNewlines("line1\\nline2\\\\x"), "line1\nline2\\\\x");
  EXPECT_EQ(chat::Trim(" \t\nx y\n "), "x y");
}

// ---- sampler -----------------------------------------------------------------------------

std::vector<float> LogitsOfProbs(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(p > 0 ? static_cast<float>(std::log(p)) : -INFINITY);
  return l;
}

std::map<int32_t, int> Histogram(Sampler& s, const std::vector<float>& logits, int n) {
  std::map<int32_t, int> h;
  for (int i = 0; i < n; ++i) h[s.Sample(logits)]++;
  return h;
}

SamplerOptions ChatRwkvOptions(float temperature, float top_p, uint64_t seed = 1) {
  SamplerOptions o;
  o.order = SamplingOrder::kChatRwkv;
  o.temperature = temperature;
  o.top_p = top_p;
  o.seed = seed;
  return o;
}

TEST(ChatSampler, TopPZeroIsGreedy) {
  const std::vector<float> logits = LogitsOfProbs({0.2, 0.45, 0.35});
  for (uint64_t seed : {1, 2, 3}) {
    Sampler s(ChatRwkvOptions(1.5f, 0.0f, seed));
    EXPECT_EQ(Histogram(s, logits, 200), (std::map<int32_t, int>{{1, 200}}));
  }
}

TEST(ChatSampler, TopPAboveTheFinalCumulativeSumIsNotGreedy) {
  // 1000 equal tokens: the float cumulative sum may end just below 1; ChatRWKV then keeps only
  // the first token. Every token must stay possible.
  const std::vector<float> logits(1000, 0.0f);
  Sampler s(ChatRwkvOptions(1.0f, 1.0f));
  EXPECT_GT(Histogram(s, logits, 3000).size(), 900u);
  Sampler s2(ChatRwkvOptions(1.0f, 0.9999999f));
  EXPECT_GT(Histogram(s2, logits, 3000).size(), 900u);
}

TEST(ChatSampler, TopPCutsOnProbabilitiesBeforeTemperature) {
  // probs 0.5 / 0.3 / 0.2, top-p 0.7: the cut keeps tokens 0 and 1 whatever the temperature.
  const std::vector<float> logits = LogitsOfProbs({0.5, 0.3, 0.2});
  Sampler chat(ChatRwkvOptions(5.0f, 0.7f));
  const auto h = Histogram(chat, logits, 4000);
  EXPECT_EQ(h.count(2), 0u);
  EXPECT_GT(h.at(1), 1500);  // T=5 flattens 0.5 : 0.3 to 0.53 : 0.47
  // The default order applies the temperature first: the flattened distribution needs all three.
  SamplerOptions o;
  o.temperature = 5.0f;
  o.top_p = 0.7f;
  o.seed = 1;
  Sampler first(o);
  EXPECT_GT(Histogram(first, logits, 4000).count(2), 0u);
  // A top-p the first token reaches alone keeps only it.
  Sampler one(ChatRwkvOptions(1.0f, 0.5f));
  EXPECT_EQ(Histogram(one, logits, 500).size(), 1u);
}

TEST(ChatSampler, TemperatureIsAPowerOfTheKeptProbabilities) {
  const std::vector<float> logits = LogitsOfProbs({0.6, 0.4});
  Sampler s(ChatRwkvOptions(0.5f, 1.0f, 7));
  const int n = 20000;
  const auto h = Histogram(s, logits, n);
  const double want = 0.36 / (0.36 + 0.16);  // p^(1/T) renormalised
  EXPECT_NEAR(h.at(0) / static_cast<double>(n), want, 0.015);
}

TEST(ChatSampler, TopKAfterTopP) {
  const std::vector<float> logits = LogitsOfProbs({0.1, 0.4, 0.3, 0.2});
  SamplerOptions o = ChatRwkvOptions(1.0f, 1.0f);
  o.top_k = 2;
  Sampler s(o);
  const auto h = Histogram(s, logits, 2000);
  EXPECT_EQ(h.size(), 2u);
  EXPECT_TRUE(h.count(1) && h.count(2));
}

TEST(ChatSampler, PresenceAndFrequencyPenaltiesDecay) {
  SamplerOptions o = ChatRwkvOptions(1.0f, 0.0f);  // greedy: the penalties decide
  o.presence_penalty = 0.4f;
  o.frequency_penalty = 0.4f;
  o.penalty_decay = 0.5f;
  Sampler s(o);
  // Token 0 leads by 1.0: chosen, then penalised by 0.4 + 1 * 0.4 = 0.8 < 1.0: chosen again;
  // then count = 1 * 0.5 + 1 = 1.5 -> 0.4 + 0.6 = 1.0 = the lead: 0 still wins over -0.001;
  // then count 1.75 -> 1.1 > 1.0: token 1.
  const std::vector<float> logits = {1.0f, 0.0f};
  EXPECT_EQ(s.Sample(logits), 0);
  EXPECT_FLOAT_EQ(s.occurrences().at(0), 1.0f);
  EXPECT_EQ(s.Sample(logits), 0);
  EXPECT_FLOAT_EQ(s.occurrences().at(0), 1.5f);
  EXPECT_EQ(s.Sample(std::vector<float>{1.0f, -0.001f}), 0);
  EXPECT_FLOAT_EQ(s.occurrences().at(0), 1.75f);
  EXPECT_EQ(s.Sample(logits), 1);
  EXPECT_FLOAT_EQ(s.occurrences().at(0), 0.875f);
  EXPECT_FLOAT_EQ(s.occurrences().at(1), 1.0f);
  s.ResetPenalties();
  EXPECT_TRUE(s.occurrences().empty());
  EXPECT_EQ(s.Sample(logits), 0);
}

TEST(ChatSampler, BansAndAllBanned) {
  SamplerOptions o = ChatRwkvOptions(1.0f, 0.9f);
  o.banned_tokens = {1, 2};
  Sampler s(o);
  const std::vector<float> logits = {0.0f, 5.0f, 5.0f, 0.5f};
  const auto h = Histogram(s, logits, 500);
  EXPECT_EQ(h.count(1) + h.count(2), 0u);
  o.banned_tokens = {0, 1, 2, 3};
  Sampler all(o);
  EXPECT_THROW(all.Sample(logits), Error);
  EXPECT_THROW(Sampler(ChatRwkvOptions(1.0f, 1.5f)), UsageError);
  SamplerOptions bad_decay = ChatRwkvOptions(1.0f, 0.5f);
  bad_decay.penalty_decay = 0.0f;
  EXPECT_THROW(Sampler{bad_decay}, UsageError);
}

TEST(ChatSampler, SetOptionsKeepsTheRandomStream) {
  Sampler a(ChatRwkvOptions(1.0f, 1.0f, 9)), b(ChatRwkvOptions(1.0f, 1.0f, 9));
  const std::vector<float> logits(50, 0.0f);
  for (int i = 0; i < 5; ++i) ASSERT_EQ(a.Sample(logits), b.Sample(logits));
  SamplerOptions o = a.options();
  o.temperature = 2.0f;
  a.SetOptions(o);
  EXPECT_FLOAT_EQ(a.options().temperature, 2.0f);
  EXPECT_EQ(a.options().seed, 9u);
  for (int i = 0; i < 5; ++i) ASSERT_EQ(a.Sample(logits), b.Sample(logits));  // uniform: T no-op
  a.Reseed(9);
  Sampler c(ChatRwkvOptions(1.0f, 1.0f, 9));
  for (int i = 0; i < 5; ++i) ASSERT_EQ(a.Sample(logits), c.Sample(logits));
}

// The default order (used by `aviary generate`) must sample exactly as before the chat work:
// a copy of the previous implementation is the reference.
int32_t ReferenceSample(const SamplerOptions& o, std::mt19937_64& rng,
                        std::span<const float> logits) {
  if (o.temperature == 0.0f || o.top_p == 0.0f) return ArgMax(logits);
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  std::vector<std::pair<float, int32_t>> sc(logits.size());
  double total = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    const float p = std::exp((logits[i] - max_logit) / o.temperature);
    sc[i] = {p, static_cast<int32_t>(i)};
    total += p;
  }
  std::sort(sc.begin(), sc.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  size_t keep = sc.size();
  if (o.top_p < 1.0f) {
    double cum = 0;
    for (size_t i = 0; i < sc.size(); ++i) {
      cum += sc[i].first / total;
      if (cum >= o.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  if (o.top_k > 0) keep = std::min<size_t>(keep, o.top_k);
  double kept = 0;
  for (size_t i = 0; i < keep; ++i) kept += sc[i].first;
  const double u = std::uniform_real_distribution<double>(0.0, kept)(rng);
  double cum = 0;
  for (size_t i = 0; i < keep; ++i) {
    cum += sc[i].first;
    if (u < cum) return sc[i].second;
  }
  return sc[keep - 1].second;
}

TEST(ChatSampler, DefaultOrderSamplesAsBefore) {
  std::mt19937_64 gen(123);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (const auto& [t, p, k] : std::vector<std::tuple<float, float, int>>{
           {1.0f, 0.85f, 0}, {0.8f, 0.9f, 0}, {1.3f, 1.0f, 40}, {0.5f, 0.5f, 5}, {0.0f, 1.0f, 0}}) {
    SamplerOptions o;
    o.temperature = t;
    o.top_p = p;
    o.top_k = k;
    o.seed = 77;
    Sampler s(o);
    std::mt19937_64 ref_rng(77);
    for (int i = 0; i < 200; ++i) {
      std::vector<float> logits(256);
      for (float& l : logits) l = normal(gen);
      ASSERT_EQ(s.Sample(logits), ReferenceSample(o, ref_rng, logits)) << t << " " << p << " " << i;
    }
  }
}

// ---- templates ---------------------------------------------------------------------------

TEST(ChatTemplates, WorldRavenAndFiles) {
  const ChatTemplate w = WorldTemplate();
  EXPECT_EQ(w.Expand(w.message_format, "hi"), "User: hi\n\nAssistant:");
  EXPECT_EQ(w.Expand(w.system_format, "Be brief."), "System: Be brief.\n\n");
  EXPECT_EQ(w.think, " <think");
  const ChatTemplate r = RavenTemplate();
  EXPECT_EQ(r.Expand(r.message_format, "hi"), "Bob: hi\n\nAlice:");
  EXPECT_EQ(r.intro.rfind("\nThe following is a coherent verbose detailed conversation", 0), 0u);
  EXPECT_EQ(r.intro.substr(r.intro.size() - 2), "\n\n");
  EXPECT_NE(r.Expand(r.instruction_format, "x").find("# Instruction:\nx\n\n# Response:\n"),
            std::string::npos);

  const std::string path = TempPath("template.txt");
  WriteText(path,
            "# a template\nbase = \"raven\"\nuser = \"Q\"  # comment\nbot = \"A\"\n"
            "intro = \"Line one\\nLine \\\"two\\\"\\n\\n\"\nstop = \"\\n###\"\nstop = \"END\"\n"
            "fold_newlines = false\n");
  const ChatTemplate f = LoadChatTemplate(path);
  EXPECT_EQ(f.name, "aviary_chat_template.txt");
  EXPECT_EQ(f.Expand(f.message_format, "x"), "Q: x\n\nA:");
  EXPECT_EQ(f.intro, "Line one\nLine \"two\"\n\n");
  EXPECT_EQ(f.stop, (std::vector<std::string>{"\n###", "END"}));
  EXPECT_FALSE(f.fold_newlines);
  EXPECT_EQ(f.system_role, "");  // from raven
  EXPECT_EQ(ChatTemplateByName(path).user, "Q");
  for (const char* bad :
       {"user = Bob\n", "nokey = \"x\"\n", "user = \"x\n", "message = \"no text\"\n",
        "user = \"a\"\nbase = \"world\"\n", "stop = \"\"\n", "intro = \"\\q\"\n"}) {
    WriteText(path, bad);
    EXPECT_THROW(LoadChatTemplate(path), Error) << bad;
  }
  EXPECT_THROW(ChatTemplateByName("no-such-template"), UsageError);
  FakeWorldTokenizer fake;
  EXPECT_EQ(ChatTemplateForModel(ModelInfo{}, fake).name, "world");
}

// ---- the session on a real model ---------------------------------------------------------

class ChatSessionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string p = SharedPath(kTiny);
    if (ReadFileBytes(p).empty()) {
      if (InCI()) FAIL() << "missing test data in CI: " << p;
      GTEST_SKIP() << "test data not found: " << p << " (needs ../shared)";
    }
    model_ = Model::Load(p);
    tok_ = TokenizerForModel(model_->info());
  }
  ChatOptions Options(uint64_t seed = 1) {
    ChatOptions o;
    o.sampling.seed = seed;
    o.max_reply_tokens = 80;
    o.free_gen_tokens = 40;
    return o;
  }
  std::unique_ptr<ChatSession> NewSession(ChatOptions o, ChatTemplate t = WorldTemplate()) {
    return std::make_unique<ChatSession>(*model_, *tok_, std::move(t), std::move(o));
  }
  // The snapshot after feeding `text` to a blank state in one call (as the session does).
  ChatSession::Snapshot Blank(const std::string& text) {
    ChatSession::Snapshot s{model_->NewState(), {}, -1};
    const std::vector<int32_t> ids = tok_->Encode(text);
    model_->Eval(ids, s.state, &s.logits);
    s.last_token = ids.back();
    return s;
  }
  // The conversation state a reply must leave: the state after the message, the reply fed
  // token by token, then the turn separator.
  void ExpectTurnClosed(const ChatSession& s, const ChatSession::Snapshot& pre,
                        const std::string& reply) {
    const ChatSession::Snapshot want = FeedOneByOne(*model_, *tok_, pre, reply + "\n\n");
    const ChatSession::Snapshot* chat = s.snapshot("chat");
    ASSERT_NE(chat, nullptr);
    EXPECT_LE(chat->state.MaxAbsDiff(want.state), 1e-4f);
    EXPECT_LE(MaxLogitDiff(chat->logits, want.logits), 1e-3f);
    EXPECT_EQ(chat->state.tokens_seen(), want.state.tokens_seen());
  }
  std::unique_ptr<Model> model_;
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(ChatSessionTest, InitialPromptIsSystemLineThenIntro) {
  ChatOptions o = Options();
  o.system = "You are terse.\n\nVery.";
  auto s = NewSession(o);
  const ChatSession::Snapshot want = Blank("System: You are terse.\nVery.\n\n");
  EXPECT_EQ(s->snapshot("chat_init")->state, want.state);
  EXPECT_EQ(s->snapshot("chat_init")->logits, want.logits);
  auto raven = NewSession(Options(), RavenTemplate());
  EXPECT_EQ(raven->state(), Blank(RavenTemplate().intro).state);
  // No system prompt and no intro: the blank state, no logits yet.
  auto plain = NewSession(Options());
  EXPECT_EQ(plain->state(), model_->NewState());
  EXPECT_TRUE(plain->logits().empty());
  o.think = true;
  EXPECT_EQ(NewSession(o)->ReplyPrefix(), "Assistant: <think");
  EXPECT_THROW(NewSession(o, RavenTemplate()), UsageError);  // no system role, no think mode
  ChatOptions hot = Options();
  hot.sampling.temperature = 6.0f;
  EXPECT_THROW(NewSession(hot), UsageError);
}

TEST_F(ChatSessionTest, ResetRestoresTheInitialStateExactly) {
  auto s = NewSession(Options(), RavenTemplate());
  const State s0 = s->state();
  const std::vector<float> l0 = s->logits();
  ASSERT_FALSE(l0.empty());
  s->Reseed(3);
  const ChatResult first = s->Say("Hello Alice, what is your favourite drink?");
  ASSERT_EQ(first.kind, ChatResult::Kind::kReply);
  s->Say("And why?");
  EXPECT_NE(s->state(), s0);
  const ChatResult r = s->Handle("+reset");
  EXPECT_EQ(r.kind, ChatResult::Kind::kStatus);
  EXPECT_EQ(r.text, "Chat reset.");
  EXPECT_EQ(s->state(), s0);
  EXPECT_EQ(s->logits(), l0);  // bit for bit
  EXPECT_EQ(s->snapshot("chat")->state, s0);
  EXPECT_TRUE(s->history().empty());
  EXPECT_EQ(s->snapshot("chat_pre"), nullptr);
  EXPECT_EQ(s->Handle("+").kind, ChatResult::Kind::kError);  // nothing to retry after a reset
  // The same seed gives the same first reply again.
  s->Reseed(3);
  EXPECT_EQ(s->Say("Hello Alice, what is your favourite drink?").text, first.text);
}

TEST_F(ChatSessionTest, RetryResamplesFromTheStateSavedAfterTheMessage) {
  auto s = NewSession(Options());
  s->Say("Hi!");
  s->Reseed(5);
  Collector c1;
  const ChatResult r1 = s->Say("Tell me about the sea.", c1.Callbacks());
  EXPECT_EQ(c1.prefix, "Assistant:");
  EXPECT_EQ(c1.text, r1.text);
  const ChatSession::Snapshot pre = *s->snapshot("chat_pre");
  ExpectTurnClosed(*s, pre, r1.text);
  s->Reseed(5);
  const ChatResult r2 = s->Handle("+");
  EXPECT_EQ(r2.kind, ChatResult::Kind::kReply);
  EXPECT_EQ(r2.text, r1.text);  // same state, same seed: the same reply
  EXPECT_EQ(s->snapshot("chat_pre")->state, pre.state);
  EXPECT_EQ(s->snapshot("chat_pre")->logits, pre.logits);
  s->Reseed(6);
  const ChatResult r3 = s->Handle("+");
  EXPECT_NE(r3.text, r1.text);  // another seed: an alternative
  ExpectTurnClosed(*s, pre, r3.text);
  // The rejected replies never entered the conversation.
  ASSERT_EQ(s->history().size(), 4u);
  EXPECT_EQ(s->history()[2], (ChatTurn{ChatTurn::Role::kUser, "Tell me about the sea."}));
  EXPECT_EQ(s->history()[3], (ChatTurn{ChatTurn::Role::kBot, r3.text}));
}

TEST_F(ChatSessionTest, RegenerateResamplesFromTheStateBeforeTheGeneration) {
  auto s = NewSession(Options());
  EXPECT_EQ(s->Handle("++").kind, ChatResult::Kind::kError);
  EXPECT_EQ(s->Handle("+++").kind, ChatResult::Kind::kError);
  s->Reseed(11);
  Collector c;
  const ChatResult g1 = s->Handle("+gen Once upon a time", c.Callbacks());
  EXPECT_EQ(g1.kind, ChatResult::Kind::kGeneration);
  EXPECT_EQ(c.prefix, "");
  EXPECT_GE(g1.tokens, 40);
  const ChatSession::Snapshot gen0 = *s->snapshot("gen_0");
  s->Reseed(11);
  Collector c2;
  s->Handle("++", c2.Callbacks());
  EXPECT_EQ(c2.text, c.text);
  s->Reseed(12);
  Collector c3;
  s->Handle("++", c3.Callbacks());
  EXPECT_NE(c3.text, c.text);
  EXPECT_EQ(s->snapshot("gen_0")->state, gen0.state);
  // gen_1 is gen_0 plus the last generation.
  const ChatSession::Snapshot want = FeedOneByOne(*model_, *tok_, gen0, c3.text);
  EXPECT_LE(s->snapshot("gen_1")->state.MaxAbsDiff(want.state), 1e-4f);
  EXPECT_EQ(s->state(), s->snapshot("gen_1")->state);
}

TEST_F(ChatSessionTest, ContinueResumesWhereTheGenerationStopped) {
  auto s = NewSession(Options());
  Collector a, b;
  s->Handle("+gen The king", a.Callbacks());
  const ChatSession::Snapshot end1 = *s->snapshot("gen_1");
  s->Handle("+++", b.Callbacks());
  EXPECT_FALSE(b.text.empty());
  EXPECT_EQ(s->snapshot("gen_0")->state, end1.state);  // +++ starts where the last one stopped
  // Blank -> "\nThe king" -> first part -> continuation, token by token.
  const ChatSession::Snapshot want = FeedOneByOne(
      *model_, *tok_, FeedOneByOne(*model_, *tok_, Blank("\nThe king"), a.text), b.text);
  EXPECT_LE(s->snapshot("gen_1")->state.MaxAbsDiff(want.state), 1e-4f);
  EXPECT_EQ(s->snapshot("gen_1")->state.tokens_seen(), want.state.tokens_seen());
  // ++ now retries the continuation, not the first part.
  s->Handle("++");
  EXPECT_EQ(s->snapshot("gen_0")->state, end1.state);
}

TEST_F(ChatSessionTest, FreeCommandsStartFromABlankState) {
  auto s = NewSession(Options(), RavenTemplate());  // a persona intro that must not be used
  s->Say("Hello!");
  struct Case {
    const char* line;
    std::string prompt;
  };
  const Case cases[] = {
      {"+gen The river", "\nThe river"},
      {"+i List three fruits.\\n\\nNo more.",
       RavenTemplate().Expand(RavenTemplate().instruction_format, "List three fruits.\nNo more.")},
      {"+qa What is the sun?", "Bob: What is the sun?\n\nAlice:"},
  };
  for (const Case& c : cases) {
    const ChatResult r = s->Handle(c.line);
    EXPECT_EQ(r.kind, ChatResult::Kind::kGeneration) << c.line;
    const ChatSession::Snapshot want = Blank(c.prompt);
    EXPECT_EQ(s->snapshot("gen_0")->state, want.state) << c.line;
    EXPECT_EQ(s->snapshot("gen_0")->logits, want.logits) << c.line;
    EXPECT_EQ(r.prompt_tokens, static_cast<int>(tok_->Encode(c.prompt).size())) << c.line;
  }
  auto world = NewSession(Options());
  world->Handle("+i Say hi");
  EXPECT_EQ(world->snapshot("gen_0")->state, Blank("Instruction: Say hi\n\nResponse:").state);
}

TEST_F(ChatSessionTest, FreeGenerationLeavesTheConversationAlone) {
  auto s = NewSession(Options());
  const ChatResult r = s->Say("Hello.");
  const ChatSession::Snapshot chat = *s->snapshot("chat");
  s->Handle("+gen Something else entirely");
  s->Handle("+qa Why?");
  EXPECT_EQ(s->snapshot("chat")->state, chat.state);
  s->Say("And then?");
  ChatSession::Snapshot pre = chat;
  const std::vector<int32_t> ids = tok_->Encode("User: And then?\n\nAssistant:");
  model_->Eval(ids, pre.state, &pre.logits);
  EXPECT_EQ(s->snapshot("chat_pre")->state, pre.state);
  EXPECT_EQ(s->snapshot("chat_pre")->logits, pre.logits);
  ASSERT_EQ(s->history().size(), 4u);
  EXPECT_EQ(s->history()[1].text, r.text);
}

TEST_F(ChatSessionTest, SettingsPersistAndBadSettingsChangeNothing) {
  auto s = NewSession(Options());
  EXPECT_FLOAT_EQ(s->temperature(), 1.2f);
  EXPECT_FLOAT_EQ(s->top_p(), 0.5f);
  ChatResult r = s->Handle("-temp=0.7 -top_p=0.3");
  EXPECT_EQ(r.kind, ChatResult::Kind::kStatus);
  EXPECT_NE(r.text.find("temperature 0.7, top-p 0.3"), std::string::npos) << r.text;
  Collector c;
  s->Handle("hello", c.Callbacks());
  s->Handle("+gen abc");
  s->Handle("+reset");
  EXPECT_FLOAT_EQ(s->temperature(), 0.7f);
  EXPECT_FLOAT_EQ(s->top_p(), 0.3f);
  // A prefix changes the settings for this and later messages, and says so.
  Collector n;
  s->Handle("-temp=1.5 hi", n.Callbacks());
  ASSERT_EQ(n.notes.size(), 1u);
  EXPECT_NE(n.notes[0].find("temperature 1.5"), std::string::npos);
  EXPECT_FLOAT_EQ(s->temperature(), 1.5f);
  // Refused lines: a message with the range and the value in force; nothing else changes
  // (not the other setting on the line, not the conversation, not the random stream).
  const State before = s->state();
  const auto history = s->history();
  for (const char* bad : {"-temp=9 hello", "-top_p=0.2 -temp=0.05 hello", "-top_p=2",
                          "-temp=x +gen abc", "-top_p=0.1 +gen", "-seed=1 -top_p=nope +reset"}) {
    r = s->Handle(bad);
    EXPECT_EQ(r.kind, ChatResult::Kind::kError) << bad;
    EXPECT_FLOAT_EQ(s->temperature(), 1.5f) << bad;
    EXPECT_FLOAT_EQ(s->top_p(), 0.3f) << bad;
    EXPECT_EQ(s->state(), before) << bad;
    EXPECT_EQ(s->history(), history) << bad;
  }
  r = s->Handle("-temp=9 hello");
  EXPECT_NE(r.text.find("0.2 to 5 (now 1.5)"), std::string::npos) << r.text;
  r = s->Handle("-top_p=2");
  EXPECT_NE(r.text.find("0.0 to 1.0 (now 0.3)"), std::string::npos) << r.text;
  EXPECT_THROW(s->SetTemperature(0.1f), UsageError);
  EXPECT_THROW(s->SetTopP(-1.0f), UsageError);
  // -top_p=0 is greedy: the seed no longer matters, across messages.
  s->Handle("-top_p=0");
  std::vector<std::string> replies;
  for (uint64_t seed : {1, 2, 3}) {
    s->Handle("+reset");
    s->Reseed(seed);
    replies.push_back(s->Handle("Good morning").text);
    replies.push_back(s->Handle("How are you?").text);
  }
  EXPECT_EQ(replies[0], replies[2]);
  EXPECT_EQ(replies[0], replies[4]);
  EXPECT_EQ(replies[1], replies[3]);
  EXPECT_EQ(replies[1], replies[5]);
}

TEST_F(ChatSessionTest, RepliesEndAtTheTurnSeparatorAndKeepTheStateConsistent) {
  ChatOptions o = Options();
  o.max_reply_tokens = 400;
  auto s = NewSession(o);
  int ended = 0;
  for (uint64_t seed : {1, 2, 3, 4}) {
    s->Handle("+reset");
    s->Reseed(seed);
    Collector c;
    const ChatResult r = s->Say("What do you like?", c.Callbacks());
    EXPECT_EQ(c.text, r.text);
    EXPECT_EQ(r.text.find("\n\n"), std::string::npos) << r.text;
    EXPECT_EQ(r.text.find("\nUser:"), std::string::npos) << r.text;
    EXPECT_EQ(r.text.find("\nAssistant:"), std::string::npos) << r.text;
    EXPECT_EQ(r.text.substr(0, 2).find('\n'), std::string::npos);  // tokens 0 and 1: no newline
    if (r.stop == ChatStop::kEndOfTurn || r.stop == ChatStop::kStopString) ++ended;
    ExpectTurnClosed(*s, *s->snapshot("chat_pre"), r.text);
  }
  EXPECT_GE(ended, 1);  // the newline schedule ends replies
}

TEST_F(ChatSessionTest, LengthLimitAndCancelCloseTheTurn) {
  ChatOptions o = Options();
  o.max_reply_tokens = 7;
  auto s = NewSession(o);
  ChatResult r = s->Say("Tell me a long story.");
  EXPECT_EQ(r.stop, ChatStop::kLength);
  EXPECT_EQ(r.tokens, 7);
  ExpectTurnClosed(*s, *s->snapshot("chat_pre"), r.text);

  auto t = NewSession(Options());
  std::atomic<bool> cancel{false};
  Collector c;
  ChatCallbacks cb = c.Callbacks();
  int chunks = 0;
  cb.text = [&](std::string_view piece) {
    c.text += piece;
    if (++chunks == 3) cancel = true;  // Ctrl-C after the third piece
  };
  r = t->Say("Tell me a long story.", cb, &cancel);
  EXPECT_EQ(r.stop, ChatStop::kCancelled);
  EXPECT_LE(r.tokens, 10);
  EXPECT_EQ(c.text, r.text);
  ExpectTurnClosed(*t, *t->snapshot("chat_pre"), r.text);
  ASSERT_EQ(t->history().size(), 2u);
  EXPECT_EQ(t->history()[1].text, r.text);
  // The session goes on.
  cancel = false;
  EXPECT_EQ(t->Say("Go on.").kind, ChatResult::Kind::kReply);
  // Cancelling a free generation keeps what was generated; +++ goes on from there.
  cancel = true;
  r = t->Generate("Once", {}, &cancel);
  EXPECT_EQ(r.stop, ChatStop::kCancelled);
  EXPECT_EQ(r.tokens, 0);
  cancel = false;
  EXPECT_EQ(t->Continue().kind, ChatResult::Kind::kGeneration);
}

TEST_F(ChatSessionTest, SavedConversationContinuesExactly) {
  const std::string path = TempPath("lib.chat");
  auto a = NewSession(Options(21));
  a->Handle("-temp=0.9 -top_p=0.4");
  a->Say("Hello.");
  a->Say("Tell me something.");
  a->Save(path);
  a->Reseed(8);
  const ChatResult next_a = a->Say("Thanks!");

  auto b = NewSession(Options(99));  // a fresh session: settings and seed differ
  const std::string msg = b->Load(path);
  EXPECT_NE(msg.find("4 turns"), std::string::npos) << msg;
  EXPECT_FLOAT_EQ(b->temperature(), 0.9f);
  EXPECT_FLOAT_EQ(b->top_p(), 0.4f);
  EXPECT_EQ(b->history().size(), 4u);
  b->Reseed(8);
  const ChatResult next_b = b->Say("Thanks!");
  EXPECT_EQ(next_b.text, next_a.text);
  EXPECT_EQ(b->snapshot("chat_pre")->state, a->snapshot("chat_pre")->state);
  EXPECT_EQ(b->snapshot("chat_pre")->logits, a->snapshot("chat_pre")->logits);  // same logits
  EXPECT_EQ(b->snapshot("chat")->state, a->snapshot("chat")->state);
  EXPECT_EQ(b->history(), a->history());
  // `+` works after a load too (chat_pre is saved), the same as in the original session.
  a->Reseed(4);
  b->Reseed(4);
  EXPECT_EQ(b->Retry().text, a->Retry().text);
  auto c = NewSession(Options());
  c->Load(path);
  EXPECT_EQ(c->Handle("+").kind, ChatResult::Kind::kReply);
  // States and logits are fixed-size: the file grows only by the history's text.
  a->Save(path);
  const size_t size1 = ReadFileBytes(path).size();
  a->Say("One more message.");
  a->Save(path);
  const size_t size2 = ReadFileBytes(path).size();
  const auto& h = a->history();
  EXPECT_EQ(size2 - size1, 2 * 5 + h[h.size() - 2].text.size() + h.back().text.size());
}

TEST_F(ChatSessionTest, LoadRefusesOtherModelsAndBadFilesChangingNothing) {
  const std::string path = TempPath("refuse.chat");
  auto a = NewSession(Options());
  a->Say("Hello.");
  a->Save(path);
  const std::vector<uint8_t> good = ReadFileBytes(path);
  auto b = NewSession(Options());
  b->Say("Something else.");
  const State before = b->state();
  const auto history = b->history();
  auto expect_refused = [&](const std::string& file, const std::string& what) {
    try {
      b->Load(file);
      ADD_FAILURE() << "loaded " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << e.what();
    }
    EXPECT_EQ(b->state(), before) << what;
    EXPECT_EQ(b->history(), history) << what;
  };
  const std::string bad = TempPath("bad.chat");
  WriteText(bad, "not a conversation");
  expect_refused(bad, "junk");
  expect_refused(TempPath("missing.chat"), "missing");
  for (size_t cut : {size_t{10}, good.size() / 2, good.size() - 1}) {
    WriteText(bad, std::string(good.begin(), good.begin() + cut));
    expect_refused(bad, "truncated at " + std::to_string(cut));
  }
  std::string flipped(good.begin(), good.end());
  flipped[flipped.size() / 2] ^= 0x40;
  WriteText(bad, flipped);
  expect_refused(bad, "corrupt");
  // Another model.
  const std::string other_path = SharedPath(kOtherModel);
  if (!ReadFileBytes(other_path).empty()) {
    auto other = Model::Load(other_path);
    ChatSession o(*other, *tok_, WorldTemplate(), Options());
    try {
      o.Load(path);
      ADD_FAILURE() << "loaded a conversation from another model";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("different model"), std::string::npos) << e.what();
    }
  }
}

TEST_F(ChatSessionTest, PlainStateFileBecomesTheInitialState) {
  auto a = NewSession(Options());
  a->Say("Remember: the code word is blue.");
  const State saved = a->snapshot("chat")->state;
  const std::string path = TempPath("plain.state");
  saved.Save(path);
  auto b = NewSession(Options());
  b->Load(path);
  EXPECT_EQ(b->state(), saved);
  b->Say("What is the code word?");
  b->Reset();
  EXPECT_EQ(b->state(), saved);  // +reset returns to the loaded state
}

TEST_F(ChatSessionTest, StateAndHelpListEverything) {
  auto s = NewSession(Options());
  s->Say("Hi.");
  const ChatResult st = s->Handle("+state");
  EXPECT_EQ(st.kind, ChatResult::Kind::kOutput);
  EXPECT_NE(st.text.find(std::to_string(s->state().size_bytes()) + " bytes"), std::string::npos)
      << st.text;
  EXPECT_NE(st.text.find("tokens seen: " + std::to_string(s->state().tokens_seen())),
            std::string::npos);
  EXPECT_NE(st.text.find("1 messages, 1 replies"), std::string::npos) << st.text;
  const std::string help = s->Handle("+help").text;
  for (const char* cmd :
       {"-temp=X ", "-top_p=Y ", "-seed=N ", "+  ", "+reset ", "+gen TEXT ", "+++ ", "++ ",
        "+i TEXT ", "+qa TEXT ", "+save FILE ", "+load FILE ", "+state ", "+help ", "+exit "}) {
    EXPECT_NE(help.find(std::string("\n  ") + cmd), std::string::npos) << cmd;
  }
  EXPECT_EQ(s->Handle("+exit").kind, ChatResult::Kind::kExit);
  EXPECT_EQ(s->Handle("   ").kind, ChatResult::Kind::kError);
}

// ---- stop rules on a scripted model --------------------------------------------------------

ChatOptions Greedy() {
  ChatOptions o;
  o.sampling.top_p = 0.0f;
  o.max_reply_tokens = 40;
  o.free_gen_tokens = 20;
  return o;
}

bool WholeUtf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = s[i];
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xc0) != 0x80) return false;
    }
    i += n;
  }
  return true;
}

TEST(ChatScripted, StreamsWholeUtf8Characters) {
  FakeWorldTokenizer tok;
  const std::string reply = " caf\xc3\xa9 \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x90\xa6 ok";
  ScriptedModel model(tok.Encode(reply + "\n\n"), 'x', 257);
  ChatSession s(model, tok, WorldTemplate(), Greedy());
  Collector c;
  const ChatResult r = s.Say("hi", c.Callbacks());
  EXPECT_EQ(r.text, reply);
  EXPECT_EQ(r.stop, ChatStop::kEndOfTurn);
  EXPECT_EQ(c.text, reply);
  EXPECT_GT(c.pieces.size(), 5u);  // streamed piece by piece
  for (const std::string& p : c.pieces) EXPECT_TRUE(WholeUtf8(p)) << p;
}

TEST(ChatScripted, InventedTurnIsCutAndTheStateRebuilt) {
  FakeWorldTokenizer tok;
  ScriptedModel model(tok.Encode(" Sure.\nUser: now I talk for you"), 'x', 257);
  ChatSession s(model, tok, WorldTemplate(), Greedy());
  Collector c;
  const ChatResult r = s.Say("hi", c.Callbacks());
  EXPECT_EQ(r.stop, ChatStop::kStopString);
  EXPECT_EQ(r.text, " Sure.");
  EXPECT_EQ(c.text, " Sure.");  // "\nUser" was held back, never shown
  ChatSession::Snapshot want = *s.snapshot("chat_pre");
  const std::vector<int32_t> ids = tok.Encode(" Sure.\n\n");
  model.Eval(ids, want.state, &want.logits);
  EXPECT_EQ(s.snapshot("chat")->state.tokens_seen(), want.state.tokens_seen());
  EXPECT_EQ(s.snapshot("chat")->state, want.state);
  EXPECT_EQ(s.history().back().text, " Sure.");
}

TEST(ChatScripted, NewlineAndEndOfTextIdsComeFromTheTokenizer) {
  FakeWorldTokenizer tok;
  // The model wants to end the turn at once with the single "\n\n" token, then say end-of-text.
  {
    ScriptedModel model({FakeWorldTokenizer::kDoubleNewline, FakeWorldTokenizer::kDoubleNewline,
                         'o', 'k', FakeWorldTokenizer::kDoubleNewline},
                        'x', 257);
    ChatSession s(model, tok, WorldTemplate(), Greedy());
    const ChatResult r = s.Say("hi");
    // Tokens 0 and 1 cannot be a newline token (ChatRWKV bans "\n"; "\n\n" is one too here).
    EXPECT_EQ(r.stop, ChatStop::kEndOfTurn);
    ASSERT_GE(r.text.size(), 2u);
    EXPECT_NE(r.text[0], '\n');
    EXPECT_NE(r.text[1], '\n');
    EXPECT_EQ(r.text.substr(2), "ok");
    EXPECT_EQ(r.tokens, 5);
  }
  {
    ScriptedModel model({'a', 0, 'b', 0}, 0, 257);  // 0 = end-of-text
    ChatSession s(model, tok, WorldTemplate(), Greedy());
    const ChatResult chat = s.Say("hi");
    EXPECT_EQ(chat.text.find('\0'), std::string::npos);  // banned inside a chat reply
    EXPECT_EQ(chat.text.substr(0, 1), "a");
    const ChatResult gen = s.Handle("+qa x");  // qa_format ends with ':' too
    EXPECT_EQ(gen.stop, ChatStop::kEndOfText);
    EXPECT_EQ(gen.tokens, 1);  // "a", then end-of-text: not fed
    EXPECT_EQ(s.snapshot("gen_1")->last_token, 'a');
  }
}

TEST(ChatScripted, ModelIdsBeyondTheTokenizerAreNeverSampled) {
  FakeWorldTokenizer tok;  // 257 tokens; the model has 300, like padded GPT-NeoX heads
  ScriptedModel model({299, 299, 299}, 299, 300);
  ChatSession s(model, tok, WorldTemplate(), Greedy());
  const ChatResult r = s.Say("hi");
  EXPECT_EQ(r.kind, ChatResult::Kind::kReply);  // no decode error
}

// ---- the CLI through a pipe --------------------------------------------------------------

class ChatCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = SharedPath(kTiny);
    if (ReadFileBytes(model_).empty()) {
      if (InCI()) FAIL() << "missing test data in CI: " << model_;
      GTEST_SKIP() << "test data not found: " << model_ << " (needs ../shared)";
    }
  }
  struct Run {
    int code;
    std::string out, err;
  };
  // Runs `aviary chat` with `script` on stdin.
  Run Chat(const std::string& script, const std::string& args = "--seed 1") {
    static int n = 0;
    const std::string in = TempPath("script" + std::to_string(++n) + ".txt");
    const std::string err = TempPath("stderr" + std::to_string(n) + ".txt");
    WriteText(in, script);
    const CommandResult r = RunCommand("'" + CliPath() + "' chat --model '" + model_ +
                                       "' --max-tokens 60 --gen-tokens 30 " + args + " < '" + in +
                                       "' 2> '" + err + "'");
    return {r.exit_code, r.output, ReadText(err)};
  }
  // The chat replies in stdout (each printed as "Assistant:" + reply + "\n").
  static std::vector<std::string> Replies(const std::string& out) {
    std::vector<std::string> replies;
    const std::string marker = "Assistant:";
    size_t pos = out.find(marker);
    while (pos != std::string::npos) {
      size_t next = out.find("\n" + marker, pos + 1);
      const size_t end = next == std::string::npos ? out.size() : next + 1;
      replies.push_back(out.substr(pos + marker.size(), end - pos - marker.size() - 1));
      pos = next == std::string::npos ? next : next + 1;
    }
    return replies;
  }
  std::string model_;
};

TEST_F(ChatCliTest, ScriptPrintsEachReplyInOrder) {
  const Run r = Chat("hello\nhow are you?\n\n+state\n");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(Replies(r.out).size(), 2u) << r.out;
  EXPECT_EQ(r.out.rfind("Assistant:", 0), 0u) << r.out;  // nothing before the first reply
  EXPECT_NE(r.out.find("tokens seen:"), std::string::npos);
  // The banner and speeds go to stderr.
  EXPECT_NE(r.err.find("model:"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("template:  world (User: / Assistant:)"), std::string::npos) << r.err;
  EXPECT_NE(
      r.err.find("temperature 1.2, top-p 0.5, presence 0.4, frequency 0.4, decay 0.996, seed 1"),
      std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("tokens/s"), std::string::npos) << r.err;
  // The same seed repeats exactly; another one does not.
  EXPECT_EQ(Chat("hello\nhow are you?\n").out, Chat("hello\nhow are you?\n").out);
  EXPECT_NE(Chat("hello\n", "--seed 2").out, Chat("hello\n", "--seed 3").out);
  // A trailing backslash continues the message: one message, one reply.
  const Run multi = Chat("first line \\\nsecond line\n");
  EXPECT_EQ(Replies(multi.out).size(), 1u) << multi.out;
}

TEST_F(ChatCliTest, ResetRestoresTheInitialStateExactly) {
  const std::string a = TempPath("reset_a.chat"), b = TempPath("reset_b.chat");
  const Run r = Chat("+save " + a + "\nhello\nand more\n+reset\n+save " + b + "\n",
                     "--seed 1 --template raven");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("Chat reset."), std::string::npos);
  const std::vector<uint8_t> fa = ReadFileBytes(a), fb = ReadFileBytes(b);
  ASSERT_FALSE(fa.empty());
  EXPECT_EQ(fa, fb);  // same state, same logits, empty history, same settings
}

TEST_F(ChatCliTest, RetryAndRegenerateResampleTheSameSavedState) {
  Run r = Chat("hello\n-seed=5 what now?\n-seed=5 +\n-seed=6 +\n");
  ASSERT_EQ(r.code, 0) << r.err;
  std::vector<std::string> replies = Replies(r.out);
  ASSERT_EQ(replies.size(), 4u) << r.out;
  EXPECT_EQ(replies[2], replies[1]);  // same seed: identical
  EXPECT_NE(replies[3], replies[1]);  // different seed: different text
  // ++ likewise: with the seed of a +gen it reproduces that generation, another seed differs.
  const Run g1 = Chat("-seed=5 +gen The old man\n");
  const Run g2 = Chat("-seed=9 +gen The old man\n-seed=5 ++\n");
  const Run g3 = Chat("-seed=9 +gen The old man\n-seed=6 ++\n");
  ASSERT_GT(g1.out.size(), 20u);
  ASSERT_GT(g2.out.size(), g1.out.size());
  EXPECT_EQ(g2.out.substr(g2.out.size() - g1.out.size()), g1.out);
  EXPECT_NE(g3.out.substr(g3.out.size() - g1.out.size()), g1.out);
  // +++ continues (and refuses when there is nothing to continue).
  const Run c = Chat("+++\n+gen The old man\n+++\n");
  EXPECT_NE(c.err.find("nothing to continue"), std::string::npos) << c.err;
  EXPECT_EQ(c.code, 1);
  EXPECT_GE(std::count(c.out.begin(), c.out.end(), '\n'), 2);
}

TEST_F(ChatCliTest, FreeGenerationStartsFromABlankState) {
  for (const char* cmd : {"+gen The sky", "+i Name a colour.", "+qa What is rain?"}) {
    const Run after_chat = Chat(std::string("hello there\nsecond message\n-seed=4 ") + cmd + "\n");
    const Run fresh = Chat(std::string("-seed=4 ") + cmd + "\n");
    ASSERT_EQ(fresh.code, 0) << fresh.err;
    ASSERT_FALSE(fresh.out.empty());
    EXPECT_EQ(after_chat.out.substr(after_chat.out.size() - fresh.out.size()), fresh.out) << cmd;
  }
}

TEST_F(ChatCliTest, SettingsPersistAndBadOnesAreRefused) {
  // Greedy (-top_p=0) stays in force across messages and a reset: seeds no longer matter.
  const std::string script = "-top_p=0\nhello\n+reset\nhello\n";
  const Run a = Chat(script, "--seed 1"), b = Chat(script, "--seed 2");
  ASSERT_EQ(a.code, 0) << a.err;
  const std::vector<std::string> ra = Replies(a.out), rb = Replies(b.out);
  ASSERT_EQ(ra.size(), 2u);
  EXPECT_EQ(ra[0], ra[1]);
  EXPECT_EQ(ra, rb);
  EXPECT_NE(a.err.find("temperature 1.2, top-p 0,"), std::string::npos) << a.err;
  // Refused: a message with the range and the value in force; no reply, nothing changed.
  const Run bad = Chat("-temp=0.8\n-temp=9 hello\n-top_p=0.3 -top_p=1.5 hello\n+state\n");
  EXPECT_EQ(bad.code, 1);
  EXPECT_TRUE(Replies(bad.out).empty()) << bad.out;
  EXPECT_NE(bad.err.find("-temp=9: temperature must be a number from 0.2 to 5 (now 0.8)"),
            std::string::npos)
      << bad.err;
  EXPECT_NE(bad.err.find("-top_p=1.5: top-p must be a number from 0.0 to 1.0 (now 0.5)"),
            std::string::npos)
      << bad.err;
  EXPECT_NE(bad.out.find("sampling:    temperature 0.8, top-p 0.5,"), std::string::npos) << bad.out;
  EXPECT_NE(bad.out.find("tokens seen: 0\n"), std::string::npos) << bad.out;
}

TEST_F(ChatCliTest, SavedConversationContinuesExactlyInANewProcess) {
  const std::string s1 = TempPath("cont.chat"), a = TempPath("cont_a.chat"),
                    b = TempPath("cont_b.chat"), c = TempPath("cont_c.chat");
  const Run first = Chat("hello\n+save " + s1 + "\n-seed=7 tell me more\n+save " + a + "\n");
  ASSERT_EQ(first.code, 0) << first.err;
  const Run second = Chat("-seed=7 tell me more\n+save " + b + "\n", "--seed 3 --load-state " + s1);
  ASSERT_EQ(second.code, 0) << second.err;
  EXPECT_NE(second.err.find("loaded " + s1 + ": 2 turns"), std::string::npos) << second.err;
  const Run third = Chat("+load " + s1 + "\n-seed=7 tell me more\n+save " + c + "\n", "--seed 4");
  ASSERT_EQ(third.code, 0) << third.err;
  EXPECT_EQ(Replies(first.out).back(), Replies(second.out).back());
  EXPECT_EQ(Replies(first.out).back(), Replies(third.out).back());
  // State, logits (after the reply and after the message), history and settings: bit for bit.
  EXPECT_EQ(ReadFileBytes(a), ReadFileBytes(b));
  EXPECT_EQ(ReadFileBytes(a), ReadFileBytes(c));
}

TEST_F(ChatCliTest, RefusesAConversationFromAnotherModel) {
  REQUIRE_SHARED(kOtherModel);
  const std::string s1 = TempPath("other.chat");
  ASSERT_EQ(Chat("hello\n+save " + s1 + "\n").code, 0);
  const CommandResult r =
      RunCommand("'" + CliPath() + "' chat --model '" + SharedPath(kOtherModel) +
                 "' --load-state '" + s1 + "' < /dev/null 2>&1");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("aviary: " + s1 + ": conversation was saved with a different model"),
            std::string::npos)
      << r.output;
  const CommandResult in_session =
      RunCommand("echo '+load " + s1 + "' | '" + CliPath() + "' chat --model '" +
                 SharedPath(kOtherModel) + "' 2>&1");
  EXPECT_EQ(in_session.exit_code, 1);
  EXPECT_NE(in_session.output.find("different model"), std::string::npos) << in_session.output;
}

TEST_F(ChatCliTest, UsageErrors) {
  for (const char* args : {"--temperature 9", "--top-p 2", "--max-tokens 0", "--template nope",
                           "--ban 999", "--raven", "--template raven --system hi"}) {
    const Run r = Chat("hello\n", args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.err;
    EXPECT_EQ(r.err.rfind("aviary: ", 0), 0u) << r.err;
  }
  const Run missing = Chat("hello\n", "--load-state /nonexistent.chat");
  EXPECT_EQ(missing.code, 1) << missing.err;
  const Run help = Chat("", "--help");
  EXPECT_EQ(help.code, 0);
  EXPECT_NE(help.out.find("--load-state"), std::string::npos);
  const Run ex = Chat("+exit\nhello\n");
  EXPECT_EQ(ex.code, 0);
  EXPECT_TRUE(Replies(ex.out).empty());
}

}  // namespace
}  // namespace aviary::testing
