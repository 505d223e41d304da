// The chat session: ChatRWKV's snapshots, commands and generation loops (v2/chat.py), with
// its mistakes fixed (see docs/CLI.md, "Differences from ChatRWKV").
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>

#include "aviary/chat.h"
#include "aviary/error.h"
#include "chat/commands.h"
#include "formats/output_file.h"

namespace aviary {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

bool Cancelled(const std::atomic<bool>* cancel) {
  return cancel && cancel->load(std::memory_order_relaxed);
}

std::string Num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// Length of the longest suffix of `text` that is a proper prefix of one of `stops`.
size_t HeldBack(const std::string& text, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const std::string& s : stops) {
    const size_t max_len = std::min(text.size(), s.size() - 1);
    for (size_t len = max_len; len > hold; --len) {
      if (text.compare(text.size() - len, len, s, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  return hold;
}

// ---- .chat files -------------------------------------------------------------------------
// "AVCHAT01", then little-endian: u32 format version, u64 model fingerprint, u32 n_vocab,
// f32 temperature, f32 top-p, string template name, u32 turn count, turns (u8 role, string),
// snapshot "chat", u8 has "chat_pre", [snapshot "chat_pre"], u64 FNV-1a checksum of all that.
// string = u32 length + bytes; snapshot = u64 length + state file bytes (AVSTATE1), u32 logit
// count (0 or n_vocab) + floats, i32 last token.
constexpr char kChatMagic[8] = {'A', 'V', 'C', 'H', 'A', 'T', '0', '1'};
constexpr char kStateMagic[8] = {'A', 'V', 'S', 'T', 'A', 'T', 'E', '1'};
constexpr uint32_t kChatFormatVersion = 1;

uint64_t Fnv1a(const uint8_t* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

struct Writer {
  std::vector<uint8_t> bytes;
  void Put(const void* p, size_t n) {
    bytes.insert(bytes.end(), static_cast<const uint8_t*>(p), static_cast<const uint8_t*>(p) + n);
  }
  template <typename T>
  void Pod(T v) {
    Put(&v, sizeof v);
  }
  void Str(std::string_view s) {
    Pod<uint32_t>(static_cast<uint32_t>(s.size()));
    Put(s.data(), s.size());
  }
  void Snap(const ChatSession::Snapshot& s) {
    const std::vector<uint8_t> state = s.state.Serialize();
    Pod<uint64_t>(state.size());
    Put(state.data(), state.size());
    Pod<uint32_t>(static_cast<uint32_t>(s.logits.size()));
    Put(s.logits.data(), s.logits.size() * sizeof(float));
    Pod<int32_t>(s.last_token);
  }
};

struct Reader {
  std::span<const uint8_t> bytes;
  size_t pos = 0;
  const std::string& name;
  void Need(uint64_t n) const {
    if (n > bytes.size() - pos) throw Error(name + ": conversation file is truncated");
  }
  template <typename T>
  T Pod() {
    Need(sizeof(T));
    T v;
    std::memcpy(&v, bytes.data() + pos, sizeof v);
    pos += sizeof v;
    return v;
  }
  std::string Str() {
    const uint32_t n = Pod<uint32_t>();
    Need(n);
    std::string s(reinterpret_cast<const char*>(bytes.data() + pos), n);
    pos += n;
    return s;
  }
  ChatSession::Snapshot Snap(const Model& model) {
    ChatSession::Snapshot s;
    const uint64_t n = Pod<uint64_t>();
    Need(n);
    s.state = State::Deserialize(bytes.subspan(pos, n), model, name);
    pos += n;
    const uint32_t count = Pod<uint32_t>();
    if (count != 0 && count != static_cast<uint32_t>(model.info().n_vocab)) {
      throw Error(name + ": conversation file is corrupt (logit count " + std::to_string(count) +
                  ")");
    }
    Need(uint64_t{count} * sizeof(float));
    s.logits.resize(count);
    std::memcpy(s.logits.data(), bytes.data() + pos, count * sizeof(float));
    pos += count * sizeof(float);
    s.last_token = Pod<int32_t>();
    if (s.last_token < -1 || s.last_token >= model.info().n_vocab) {
      throw Error(name + ": conversation file is corrupt (token " + std::to_string(s.last_token) +
                  ")");
    }
    return s;
  }
};

std::vector<uint8_t> ReadAll(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) throw Error(path + ": is a directory");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
  if (in.bad()) throw Error(path + ": read error");
  return bytes;
}

}  // namespace

// ---- construction ------------------------------------------------------------------------

ChatSession::ChatSession(const Model& model, const Tokenizer& tokenizer, ChatTemplate chat_template,
                         ChatOptions options)
    : model_(model),
      tokenizer_(tokenizer),
      template_(std::move(chat_template)),
      options_(std::move(options)),
      sampler_(options_.sampling) {
  const float t = options_.sampling.temperature, p = options_.sampling.top_p;
  if (!(t >= kMinChatTemperature && t <= kMaxChatTemperature)) {
    throw UsageError("temperature must be from 0.2 to 5 (got " + Num(t) + ")");
  }
  if (!(p >= 0.0f && p <= 1.0f))
    throw UsageError("top-p must be from 0.0 to 1.0 (got " + Num(p) + ")");
  if (options_.chat_len_short < 0 || options_.chat_len_long < options_.chat_len_short) {
    throw UsageError("the newline schedule needs 0 <= chat_len_short <= chat_len_long");
  }
  if (options_.max_reply_tokens < 1) throw UsageError("the reply length limit must be >= 1 token");
  if (options_.free_gen_tokens < 1)
    throw UsageError("the free generation length must be >= 1 token");
  if (!options_.system.empty() && template_.system_role.empty()) {
    throw UsageError("the " + template_.name + " template has no system prompt");
  }
  if (options_.think && template_.think.empty()) {
    throw UsageError("the " + template_.name + " template has no think mode");
  }
  const int n_vocab = model_.info().n_vocab;
  // Newline and end-of-text ids come from the tokenizer, never hard-coded.
  for (const char* s : {"\n", "\n\n"}) {
    const std::vector<int32_t> ids = tokenizer_.Encode(s);
    if (ids.size() == 1 && ids[0] >= 0 && ids[0] < n_vocab &&
        std::find(newline_tokens_.begin(), newline_tokens_.end(), ids[0]) ==
            newline_tokens_.end()) {
      newline_tokens_.push_back(ids[0]);
    }
  }
  for (const char* s :
       {"\xef\xbc\x8c", "\xef\xbc\x9a", "\xef\xbc\x9f", "\xef\xbc\x81"}) {  // ，：？！
    const std::vector<int32_t> ids = tokenizer_.Encode(s);
    if (ids.size() == 1 && ids[0] >= 0 && ids[0] < n_vocab) avoid_repeat_.push_back(ids[0]);
  }
  for (int32_t id = std::max(0, tokenizer_.vocab_size()); id < n_vocab; ++id)
    always_banned_.push_back(id);
  stops_ = template_.ReplyStops();
  // The initial prompt: system line, then intro.
  Snapshot init{model_.NewState(), {}, -1};
  std::string prompt;
  if (!options_.system.empty()) {
    const std::string sys = template_.fold_newlines
                                ? chat::FoldNewlines(chat::Trim(options_.system))
                                : chat::Trim(options_.system);
    prompt += template_.Expand(template_.system_format, sys);
  }
  prompt += template_.intro;
  FeedText(prompt, init);
  chat_init_ = init;
  chat_ = init;
  current_ = init;
}

std::string ChatSession::ReplyPrefix() const {
  std::string prefix = template_.Expand("{bot}{sep}");
  if (options_.think) prefix += template_.think;
  return prefix;
}

const ChatSession::Snapshot* ChatSession::snapshot(std::string_view name) const {
  const std::optional<Snapshot>* s = nullptr;
  if (name == "chat_init") s = &chat_init_;
  else if (name == "chat") s = &chat_;
  else if (name == "chat_pre") s = &chat_pre_;
  else if (name == "gen_0") s = &gen_0_;
  else if (name == "gen_1") s = &gen_1_;
  return s && *s ? &**s : nullptr;
}

// ---- feeding and sampling ----------------------------------------------------------------

void ChatSession::Feed(std::span<const int32_t> tokens, Snapshot& snap) {
  if (tokens.empty()) return;
  model_.Eval(tokens, snap.state, &snap.logits);
  snap.last_token = tokens.back();
}

void ChatSession::FeedText(std::string_view text, Snapshot& snap) {
  if (text.empty()) return;
  const std::vector<int32_t> ids = tokenizer_.Encode(text);
  Feed(ids, snap);
}

void ChatSession::PrepareLogits(const Snapshot& snap, float newline_bias, bool ban_end_of_text) {
  if (snap.logits.empty()) throw Error("nothing to generate from: no text has been fed yet");
  work_ = snap.logits;
  for (int32_t id : newline_tokens_) {
    work_[id] = newline_bias == kNegInf ? kNegInf : work_[id] + newline_bias;
  }
  if (ban_end_of_text) {
    if (const std::optional<int32_t> eot = tokenizer_.end_of_text();
        eot && *eot >= 0 && *eot < static_cast<int32_t>(work_.size())) {
      work_[*eot] = kNegInf;
    }
  }
  if (snap.last_token >= 0 && std::find(avoid_repeat_.begin(), avoid_repeat_.end(),
                                        snap.last_token) != avoid_repeat_.end()) {
    work_[snap.last_token] = kNegInf;
  }
  for (int32_t id : always_banned_) work_[id] = kNegInf;
}

namespace {

// ChatRWKV's newline_adj, seen from the token being sampled (index j of the reply).
float NewlineBias(int j, int len_short, int len_long) {
  if (j <= 1) return kNegInf;
  const int i = j - 1;
  if (i <= len_short) return static_cast<float>(i - len_short) / 10.0f;
  if (i <= len_long) return 0.0f;
  return std::min(3.0f, static_cast<float>(i - len_long) * 0.25f);
}

}  // namespace

ChatResult ChatSession::ChatReply(const ChatCallbacks& cb, const std::atomic<bool>* cancel) {
  sampler_.ResetPenalties();
  if (cb.begin) cb.begin(ReplyPrefix());
  std::string text;
  std::vector<int32_t> tokens;
  std::vector<size_t> token_end;  // byte offset in `text` after each token
  Utf8Stream utf8;
  size_t emitted = 0;
  ChatStop stop = ChatStop::kLength;
  size_t stop_pos = std::string::npos, stop_len = 0;
  size_t max_stop = 0;
  for (const std::string& s : stops_) max_stop = std::max(max_stop, s.size());
  auto emit = [&](size_t end) {
    if (end <= emitted) return;
    const std::string out = utf8.Push(std::string_view(text).substr(emitted, end - emitted));
    emitted = end;
    if (!out.empty() && cb.text) cb.text(out);
  };
  const auto t0 = Clock::now();
  for (int j = 0; j < options_.max_reply_tokens; ++j) {
    if (Cancelled(cancel)) {
      stop = ChatStop::kCancelled;
      break;
    }
    PrepareLogits(current_, NewlineBias(j, options_.chat_len_short, options_.chat_len_long), true);
    const int32_t token = sampler_.Sample(work_);
    Feed({&token, 1}, current_);
    const size_t before = text.size();
    text += tokenizer_.Decode({&token, 1});
    tokens.push_back(token);
    token_end.push_back(text.size());
    // The earliest stop string that the new bytes complete.
    const size_t from = before >= max_stop ? before - max_stop + 1 : 0;
    for (size_t k = 0; k < stops_.size(); ++k) {
      const size_t pos = text.find(stops_[k], from);
      if (pos != std::string::npos && pos < stop_pos) {
        stop_pos = pos;
        stop_len = stops_[k].size();
        stop = k == 0 ? ChatStop::kEndOfTurn : ChatStop::kStopString;
      }
    }
    if (stop_pos != std::string::npos) break;
    emit(text.size() - HeldBack(text, stops_));
  }
  const auto t1 = Clock::now();
  size_t clean_len = stop_pos != std::string::npos ? stop_pos : text.size();
  while (clean_len > 0 && text[clean_len - 1] == '\n') --clean_len;  // held back, never shown
  emit(clean_len);
  if (const std::string rest = utf8.Flush(); !rest.empty() && cb.text) cb.text(rest);

  // Close the turn so that the state holds exactly: message, reply, "\n\n".
  if (stop == ChatStop::kEndOfTurn && stop_pos + stop_len == text.size() && clean_len == stop_pos) {
    // The model ended the turn itself: the state already ends with "\n\n".
  } else if (stop == ChatStop::kEndOfTurn || stop == ChatStop::kStopString) {
    // The stop string is followed by more bytes, or is an invented turn: rebuild from the
    // state after the user's message with the tokens of the kept text, then "\n\n".
    Snapshot s = *chat_pre_;
    size_t k = 0;
    while (k < tokens.size() && token_end[k] <= clean_len) ++k;
    Feed({tokens.data(), k}, s);
    const size_t covered = k ? token_end[k - 1] : 0;
    FeedText(text.substr(covered, clean_len - covered) + "\n\n", s);
    current_ = std::move(s);
  } else {
    // Cut by length or cancelled: add the newlines the text does not already end with.
    const size_t trailing = text.size() - clean_len;  // newlines already fed
    if (trailing < 2) FeedText(std::string(2 - trailing, '\n'), current_);
  }
  chat_ = current_;
  ChatResult r;
  r.kind = ChatResult::Kind::kReply;
  r.text = text.substr(0, clean_len);
  r.stop = stop;
  r.tokens = static_cast<int>(tokens.size());
  r.seconds = Seconds(t0, t1);
  history_.push_back({ChatTurn::Role::kBot, r.text});
  return r;
}

ChatResult ChatSession::FreeGeneration(Mode mode, bool first_unbiased, const ChatCallbacks& cb,
                                       const std::atomic<bool>* cancel) {
  sampler_.ResetPenalties();
  if (cb.begin) cb.begin("");
  const std::optional<int32_t> eot = tokenizer_.end_of_text();
  Utf8Stream utf8;
  size_t pushed = 0, emitted = 0;  // bytes given to / released by the UTF-8 stream
  ChatStop stop = ChatStop::kLength;
  int n = 0;
  const auto t0 = Clock::now();
  for (int j = 0;; ++j) {
    // ChatRWKV's FREE_GEN_LEN: stop at the first character boundary after the length, but
    // never more than 100 tokens later.
    if (j >= options_.free_gen_tokens &&
        (pushed == emitted || j >= options_.free_gen_tokens + 100)) {
      break;
    }
    if (Cancelled(cancel)) {
      stop = ChatStop::kCancelled;
      break;
    }
    // +qa: ChatRWKV's newline_adj = -2 after each answer token.
    const float bias = mode == Mode::kFreeQa && (j > 0 || !first_unbiased) ? -2.0f : 0.0f;
    PrepareLogits(current_, bias, false);
    const int32_t token = sampler_.Sample(work_);
    if (eot && token == *eot) {  // not fed, as ChatRWKV
      stop = ChatStop::kEndOfText;
      break;
    }
    Feed({&token, 1}, current_);
    ++n;
    const std::string piece = tokenizer_.Decode({&token, 1});
    pushed += piece.size();
    const std::string out = utf8.Push(piece);
    emitted += out.size();
    if (!out.empty() && cb.text) cb.text(out);
  }
  const auto t1 = Clock::now();
  if (const std::string rest = utf8.Flush(); !rest.empty() && cb.text) cb.text(rest);
  gen_1_ = current_;
  ChatResult r;
  r.kind = ChatResult::Kind::kGeneration;
  r.stop = stop;
  r.tokens = n;
  r.seconds = Seconds(t0, t1);
  return r;
}

ChatResult ChatSession::StartFree(Mode mode, std::string prompt, const ChatCallbacks& cb,
                                  const std::atomic<bool>* cancel) {
  Snapshot s{model_.NewState(), {}, -1};
  const std::vector<int32_t> ids = tokenizer_.Encode(prompt);
  if (ids.empty()) {
    ChatResult r;
    r.kind = ChatResult::Kind::kError;
    r.text = "nothing to generate from: the prompt has no tokens";
    return r;
  }
  Feed(ids, s);
  gen_0_ = s;
  current_ = std::move(s);
  gen_is_qa_ = mode == Mode::kFreeQa;
  ChatResult r = FreeGeneration(mode, true, cb, cancel);
  r.prompt_tokens = static_cast<int>(ids.size());
  return r;
}

// ---- commands ----------------------------------------------------------------------------

namespace {

ChatResult Refuse(std::string message) {
  ChatResult r;
  r.kind = ChatResult::Kind::kError;
  r.text = std::move(message);
  return r;
}

ChatResult Status(std::string message, ChatResult::Kind kind = ChatResult::Kind::kStatus) {
  ChatResult r;
  r.kind = kind;
  r.text = std::move(message);
  return r;
}

}  // namespace

std::string ChatSession::FoldMessage(std::string_view text) const {
  const std::string t = chat::Trim(text);
  return template_.fold_newlines ? chat::FoldNewlines(t) : t;
}

ChatResult ChatSession::Say(std::string_view message, const ChatCallbacks& cb,
                            const std::atomic<bool>* cancel) {
  const std::string msg = FoldMessage(message);
  if (msg.empty()) return Refuse("please say something");
  current_ = *chat_;
  std::string prompt = template_.Expand(template_.message_format, msg);
  if (options_.think) prompt += template_.think;
  const std::vector<int32_t> ids = tokenizer_.Encode(prompt);
  Feed(ids, current_);
  chat_pre_ = current_;
  history_.push_back({ChatTurn::Role::kUser, msg});
  ChatResult r = ChatReply(cb, cancel);
  r.prompt_tokens = static_cast<int>(ids.size());
  return r;
}

ChatResult ChatSession::Retry(const ChatCallbacks& cb, const std::atomic<bool>* cancel) {
  if (!chat_pre_) return Refuse("nothing to retry: say something first");
  current_ = *chat_pre_;
  if (!history_.empty() && history_.back().role == ChatTurn::Role::kBot) history_.pop_back();
  return ChatReply(cb, cancel);
}

ChatResult ChatSession::Reset() {
  current_ = *chat_init_;
  chat_ = chat_init_;
  chat_pre_.reset();
  history_.clear();
  return Status("Chat reset.");
}

ChatResult ChatSession::Generate(std::string_view text, const ChatCallbacks& cb,
                                 const std::atomic<bool>* cancel) {
  const std::string t = chat::Trim(text);
  if (t.empty()) return Refuse("+gen needs a text to continue");
  return StartFree(Mode::kFree, template_.Expand(template_.gen_format, t), cb, cancel);
}

ChatResult ChatSession::Instruct(std::string_view text, const ChatCallbacks& cb,
                                 const std::atomic<bool>* cancel) {
  const std::string t = FoldMessage(text);
  if (t.empty()) return Refuse("+i needs an instruction");
  return StartFree(Mode::kFree, template_.Expand(template_.instruction_format, t), cb, cancel);
}

ChatResult ChatSession::Ask(std::string_view text, const ChatCallbacks& cb,
                            const std::atomic<bool>* cancel) {
  const std::string t = FoldMessage(text);
  if (t.empty()) return Refuse("+qa needs a question");
  return StartFree(Mode::kFreeQa, template_.Expand(template_.qa_format, t), cb, cancel);
}

ChatResult ChatSession::Continue(const ChatCallbacks& cb, const std::atomic<bool>* cancel) {
  if (!gen_1_) return Refuse("nothing to continue: start a free generation with +gen, +i or +qa");
  current_ = *gen_1_;
  gen_0_ = gen_1_;
  return FreeGeneration(gen_is_qa_ ? Mode::kFreeQa : Mode::kFree, false, cb, cancel);
}

ChatResult ChatSession::Regenerate(const ChatCallbacks& cb, const std::atomic<bool>* cancel) {
  if (!gen_0_) return Refuse("nothing to retry: start a free generation with +gen, +i or +qa");
  current_ = *gen_0_;
  return FreeGeneration(gen_is_qa_ ? Mode::kFreeQa : Mode::kFree, true, cb, cancel);
}

// ---- settings ----------------------------------------------------------------------------

void ChatSession::SetTemperature(float temperature) {
  if (!(temperature >= kMinChatTemperature && temperature <= kMaxChatTemperature)) {
    throw UsageError("temperature must be from 0.2 to 5 (now " + Num(this->temperature()) + ")");
  }
  SamplerOptions o = sampler_.options();
  o.temperature = temperature;
  sampler_.SetOptions(o);
}

void ChatSession::SetTopP(float top_p) {
  if (!(top_p >= 0.0f && top_p <= 1.0f)) {
    throw UsageError("top-p must be from 0.0 to 1.0 (now " + Num(this->top_p()) + ")");
  }
  SamplerOptions o = sampler_.options();
  o.top_p = top_p;
  sampler_.SetOptions(o);
}

void ChatSession::Reseed(uint64_t seed) { sampler_.Reseed(seed); }

std::string ChatSession::SettingsSummary() const {
  const SamplerOptions& o = sampler_.options();
  std::string s = "temperature " + Num(o.temperature) + ", top-p " + Num(o.top_p);
  if (o.top_k > 0) s += ", top-k " + std::to_string(o.top_k);
  s += ", presence " + Num(o.presence_penalty) + ", frequency " + Num(o.frequency_penalty) +
       ", decay " + Num(o.penalty_decay);
  return s;
}

std::string ChatSession::StateSummary() const {
  const State& s = chat_->state;
  char size[64];
  std::snprintf(size, sizeof size, "%.1f KiB (%zu bytes)", s.size_bytes() / 1024.0, s.size_bytes());
  size_t messages = 0, replies = 0;
  for (const ChatTurn& t : history_) (t.role == ChatTurn::Role::kUser ? messages : replies)++;
  return std::string("state:       ") + size + ", the same however long the conversation\n" +
         "tokens seen: " + std::to_string(s.tokens_seen()) + "\n" +
         "turns:       " + std::to_string(messages) + " messages, " + std::to_string(replies) +
         " replies\n" + "sampling:    " + SettingsSummary();
}

std::string ChatSession::Help() {
  return "Commands (one per line; anything else is a chat message):\n"
         "  -temp=X        set the temperature, 0.2 to 5; stays until changed; may prefix a "
         "message\n"
         "  -top_p=Y       set top-p, 0.0 to 1.0 (0 = always the most likely token); stays until "
         "changed\n"
         "  -seed=N        restart the random numbers from seed N (exact repeats)\n"
         "  +              retry the last reply with an alternative (the rejected one is "
         "forgotten)\n"
         "  +reset         back to the state right after the initial prompt; history cleared\n"
         "  +gen TEXT      free generation continuing TEXT from a blank state (no chat template)\n"
         "  +++            continue the last free generation from where it stopped\n"
         "  ++             retry the last free generation with an alternative output\n"
         "  +i TEXT        answer TEXT as an instruction, from a blank state\n"
         "  +qa TEXT       answer TEXT as a question, from a blank state\n"
         "  +save FILE     write the conversation (state, history, settings) to FILE\n"
         "  +load FILE     continue a conversation written by +save\n"
         "  +state         show the state's size and the tokens it has seen\n"
         "  +help          show this list\n"
         "  +exit          quit (or Ctrl-D)\n"
         "A trailing \\ continues the message on the next line; \\n in a message is a newline.\n"
         "Ctrl-C stops a reply; at the prompt it clears the line, twice in a row quits.";
}

ChatResult ChatSession::Handle(std::string_view line, const ChatCallbacks& cb,
                               const std::atomic<bool>* cancel) {
  const chat::ParsedLine p = chat::ParseLine(line, temperature(), top_p());
  if (!p.errors.empty()) {
    std::string msg;
    for (const std::string& e : p.errors) msg += (msg.empty() ? "" : "\n") + e;
    return Refuse(msg + "\nnothing was changed or sent");
  }
  if (!p.missing_argument.empty()) {
    const bool file = p.command == chat::Command::kSave || p.command == chat::Command::kLoad;
    return Refuse(p.missing_argument + " needs " + (file ? "a file name" : "a text"));
  }
  if (p.temperature) SetTemperature(*p.temperature);
  if (p.top_p) SetTopP(*p.top_p);
  if (p.seed) Reseed(*p.seed);
  if (p.had_settings && p.command != chat::Command::kEmpty && cb.note) cb.note(SettingsSummary());
  using chat::Command;
  switch (p.command) {
    case Command::kEmpty:
      if (p.had_settings) {
        std::string s = SettingsSummary();
        if (p.seed) s += ", seed " + std::to_string(*p.seed);
        return Status(s);
      }
      return Refuse("please say something");
    case Command::kChat: return Say(chat::UnescapeNewlines(p.text), cb, cancel);
    case Command::kRetry: return Retry(cb, cancel);
    case Command::kReset: return Reset();
    case Command::kGen: return Generate(chat::UnescapeNewlines(p.text), cb, cancel);
    case Command::kContinue: return Continue(cb, cancel);
    case Command::kRegenerate: return Regenerate(cb, cancel);
    case Command::kInstruct: return Instruct(chat::UnescapeNewlines(p.text), cb, cancel);
    case Command::kQa: return Ask(chat::UnescapeNewlines(p.text), cb, cancel);
    case Command::kSave:
      try {
        Save(p.text);
        return Status("saved the conversation to " + p.text);
      } catch (const Error& e) {
        return Refuse(e.what());
      }
    case Command::kLoad: try { return Status(Load(p.text));
      } catch (const Error& e) {
        return Refuse(e.what());
      }
    case Command::kState: return Status(StateSummary(), ChatResult::Kind::kOutput);
    case Command::kHelp: return Status(Help(), ChatResult::Kind::kOutput);
    case Command::kExit: return Status("", ChatResult::Kind::kExit);
  }
  return {};
}

// ---- save / load -------------------------------------------------------------------------

void ChatSession::Save(const std::string& path) const {
  Writer w;
  w.Put(kChatMagic, sizeof kChatMagic);
  w.Pod<uint32_t>(kChatFormatVersion);
  w.Pod<uint64_t>(model_.info().fingerprint);
  w.Pod<uint32_t>(static_cast<uint32_t>(model_.info().n_vocab));
  w.Pod<float>(temperature());
  w.Pod<float>(top_p());
  w.Str(template_.name);
  w.Pod<uint32_t>(static_cast<uint32_t>(history_.size()));
  for (const ChatTurn& t : history_) {
    w.Pod<uint8_t>(static_cast<uint8_t>(t.role));
    w.Str(t.text);
  }
  w.Snap(*chat_);
  w.Pod<uint8_t>(chat_pre_ ? 1 : 0);
  if (chat_pre_) w.Snap(*chat_pre_);
  w.Pod<uint64_t>(Fnv1a(w.bytes.data(), w.bytes.size()));
  std::vector<std::string> inputs = options_.protected_files;
  inputs.push_back(model_.info().path);
  RefuseOverwritingInputs(path, inputs);
  WriteFileAtomically(path, w.bytes);
}

std::string ChatSession::Load(const std::string& path) {
  const std::vector<uint8_t> bytes = ReadAll(path);
  if (bytes.size() >= 8 && std::memcmp(bytes.data(), kStateMagic, 8) == 0) {
    // A plain state: it becomes the initial state.
    Snapshot s{State::Deserialize(bytes, model_, path), {}, -1};
    chat_init_ = s;
    chat_ = s;
    current_ = std::move(s);
    chat_pre_.reset();
    history_.clear();
    return "loaded the state " + path + " as the initial state (" +
           std::to_string(current_.state.tokens_seen()) + " tokens seen)";
  }
  if (bytes.size() < 8 || std::memcmp(bytes.data(), kChatMagic, 8) != 0) {
    throw Error(path + ": not an aviary conversation file (+save) nor a state file");
  }
  if (bytes.size() < 8 + 4 + 8) throw Error(path + ": conversation file is truncated");
  uint64_t stored;
  std::memcpy(&stored, bytes.data() + bytes.size() - 8, 8);
  Reader r{std::span<const uint8_t>(bytes.data(), bytes.size() - 8), 8, path};
  const uint32_t version = r.Pod<uint32_t>();
  if (version != kChatFormatVersion) {
    throw Error(path + ": conversation file format version " + std::to_string(version) +
                " is not supported (expected " + std::to_string(kChatFormatVersion) + ")");
  }
  if (r.Pod<uint64_t>() != model_.info().fingerprint) {
    throw Error(path + ": conversation was saved with a different model than " +
                model_.info().path);
  }
  if (Fnv1a(bytes.data(), bytes.size() - 8) != stored) {
    throw Error(path + ": conversation file is corrupt (checksum mismatch)");
  }
  if (r.Pod<uint32_t>() != static_cast<uint32_t>(model_.info().n_vocab)) {
    throw Error(path + ": conversation was saved with a different model than " +
                model_.info().path);
  }
  const float temp = r.Pod<float>(), top_p_value = r.Pod<float>();
  if (!(temp >= kMinChatTemperature && temp <= kMaxChatTemperature) ||
      !(top_p_value >= 0.0f && top_p_value <= 1.0f)) {
    throw Error(path + ": conversation file is corrupt (settings out of range)");
  }
  const std::string template_name = r.Str();
  const uint32_t turns = r.Pod<uint32_t>();
  std::vector<ChatTurn> history;
  for (uint32_t i = 0; i < turns; ++i) {
    const uint8_t role = r.Pod<uint8_t>();
    if (role > 1) throw Error(path + ": conversation file is corrupt (turn role)");
    history.push_back({static_cast<ChatTurn::Role>(role), r.Str()});
  }
  Snapshot chat = r.Snap(model_);
  std::optional<Snapshot> pre;
  const uint8_t has_pre = r.Pod<uint8_t>();
  if (has_pre > 1) throw Error(path + ": conversation file is corrupt");
  if (has_pre) pre = r.Snap(model_);
  if (r.pos != r.bytes.size()) throw Error(path + ": conversation file has trailing bytes");
  // Everything checked: commit.
  SetTemperature(temp);
  SetTopP(top_p_value);
  history_ = std::move(history);
  chat_ = chat;
  current_ = std::move(chat);
  chat_pre_ = std::move(pre);
  std::string msg = "loaded " + path + ": " + std::to_string(history_.size()) + " turns, " +
                    std::to_string(current_.state.tokens_seen()) + " tokens seen; " +
                    SettingsSummary();
  if (template_name != template_.name) {
    msg += " (saved with the " + template_name + " template, now " + template_.name + ")";
  }
  return msg;
}

}  // namespace aviary
