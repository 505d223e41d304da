// Chat with an RWKV model: the RWKV community's chat commands (ChatRWKV's v2/chat.py and the
// RWKV wiki FAQ), prompt templates, named snapshots behind retry/continue, and ChatRWKV's
// generation rules. Everything here is testable without a terminal: the caller passes each
// input line to ChatSession::Handle and receives the reply through callbacks.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "aviary/model.h"
#include "aviary/sampler.h"
#include "aviary/state.h"
#include "aviary/tokenizer.h"

namespace aviary {

// How a conversation is written for the model. In every *_format, {user}, {bot}, {sep},
// {system} and {text} are replaced by the names below and the text.
struct ChatTemplate {
  std::string name = "world";
  std::string user = "User";
  std::string bot = "Assistant";
  std::string separator = ":";
  std::string system_role = "System";  // "" = the template has no system prompt
  std::string intro;                   // fed once at the start, after the system line
  std::string system_format = "{system}{sep} {text}\n\n";
  // A chat message; the reply follows it and ends with "\n\n" (the turn separator).
  std::string message_format = "{user}{sep} {text}\n\n{bot}{sep}";
  std::string instruction_format = "Instruction: {text}\n\nResponse:";  // +i
  std::string qa_format = "{user}{sep} {text}\n\n{bot}{sep}";           // +qa
  std::string gen_format = "\n{text}";                                  // +gen (as ChatRWKV)
  std::string think;  // appended after the reply prefix in think mode ("" = no think mode)
  // Besides "\n\n", a reply ends at any of these (never printed nor kept): the model starting
  // an invented turn.
  std::vector<std::string> stop = {"\n{user}{sep}", "\n{bot}{sep}"};
  bool fold_newlines = true;  // runs of newlines in a user message become one "\n"

  // `format` with the placeholders replaced.
  std::string Expand(std::string_view format, std::string_view text = {}) const;
  // Everything that ends a reply: "\n\n" (the end of the turn), then `stop` expanded (the
  // model starting an invented turn), without repeats.
  std::vector<std::string> ReplyStops() const;
};

// World and RWKV-7 G series: "User: ...\n\nAssistant: ...", optional "System: ...", think mode
// "Assistant: <think".
ChatTemplate WorldTemplate();
// Raven (RWKV-4 Pile/Raven): Bob / Alice with ChatRWKV's English intro and Alpaca-style +i.
ChatTemplate RavenTemplate();
// A template file: `key = "value"` lines (C escapes \n \t \\ \"), # comments; keys are the
// fields above (message, instruction, qa, gen, system for the *_format fields), `stop` may
// repeat, `base = "world"|"raven"` (first) picks the defaults. Throws aviary::Error.
ChatTemplate LoadChatTemplate(const std::string& path);
// "world", "raven", or a file path.
ChatTemplate ChatTemplateByName(const std::string& name_or_path);
// The template for a model: raven for GPT-NeoX tokenizers (Raven / Pile models), else world.
ChatTemplate ChatTemplateForModel(const ModelInfo& info, const Tokenizer& tokenizer);

// ChatRWKV v2/chat.py's settings.
SamplerOptions DefaultChatSampling();  // temperature 1.2, top-p 0.5, presence 0.4,
                                       // frequency 0.4, decay 0.996, ChatRWKV's order

struct ChatOptions {
  SamplerOptions sampling = DefaultChatSampling();
  std::string system;  // system prompt, "" = none
  bool think = false;  // append the template's think prefix to every reply prefix
  // The "\n" schedule: reply token j (from 0) gets a newline logit bias of -inf for j <= 1,
  // (j - 1 - short) / 10 up to j = short + 1, 0 up to j = long + 1, then
  // min(3, (j - 1 - long) / 4), as ChatRWKV's CHAT_LEN_SHORT / CHAT_LEN_LONG.
  int chat_len_short = 40;
  int chat_len_long = 150;
  int max_reply_tokens = 999;  // a reply is cut here (then closed with "\n\n")
  int free_gen_tokens = 256;   // +gen/+i/+qa/+++/++ stop at the first character boundary after this
  // Files +save refuses to write over (e.g. the tokenizer's); the model's file always is.
  std::vector<std::string> protected_files;
};

// Settings ranges of the -temp= / -top_p= commands.
inline constexpr float kMinChatTemperature = 0.2f, kMaxChatTemperature = 5.0f;

struct ChatTurn {
  enum class Role : uint8_t { kUser = 0, kBot = 1 };
  Role role;
  std::string text;
  bool operator==(const ChatTurn&) const = default;
};

enum class ChatStop {
  kNone,
  kEndOfTurn,   // "\n\n"
  kStopString,  // the model started an invented turn ("\nUser:")
  kEndOfText,   // the tokenizer's end-of-text token (free generation)
  kLength,      // max_reply_tokens / free_gen_tokens
  kCancelled,   // the cancel flag was set
};
std::string_view ChatStopName(ChatStop stop);

struct ChatResult {
  enum class Kind {
    kNone,        // nothing to show
    kReply,       // a chat reply (text = the reply as kept in the history)
    kGeneration,  // free generation (+gen, +i, +qa, +++, ++)
    kStatus,      // a short status line: "Chat reset.", settings changed, file saved
    kOutput,      // output asked for: +help, +state
    kError,       // refused: bad setting, nothing to retry, unreadable file...
    kExit,        // +exit
  };
  Kind kind = Kind::kNone;
  std::string text;
  ChatStop stop = ChatStop::kNone;
  int prompt_tokens = 0;  // tokens fed before generating
  int tokens = 0;         // tokens generated
  double seconds = 0;     // time spent generating them
};

struct ChatCallbacks {
  // Called once before a reply or generation streams: the reply prefix ("Assistant:", with the
  // think suffix in think mode) or "" for free generation.
  std::function<void(std::string_view prefix)> begin;
  // Streamed text, never half a UTF-8 character, never part of a stop string.
  std::function<void(std::string_view text)> text;
  // Side notes while handling a line (settings changed by a -temp= prefix).
  std::function<void(std::string_view note)> note;
};

// One conversation with a model. Holds references to the model and the tokenizer (they must
// outlive it); not thread-safe.
class ChatSession {
 public:
  // Feeds the system line and the intro (the initial prompt). Throws UsageError on bad options
  // (a system prompt with a template that has none, sampling options out of range).
  ChatSession(const Model& model, const Tokenizer& tokenizer, ChatTemplate chat_template,
              ChatOptions options = {});

  // One input line (commands, settings, or a chat message); see Help(). The cancel flag is
  // checked between tokens: when it becomes true the reply stops, and the state stays
  // consistent (a chat reply is kept as far as it got and its turn is closed).
  ChatResult Handle(std::string_view line, const ChatCallbacks& callbacks = {},
                    const std::atomic<bool>* cancel = nullptr);

  // The commands behind Handle.
  ChatResult Say(std::string_view message, const ChatCallbacks& cb = {},
                 const std::atomic<bool>* cancel = nullptr);  // a chat message
  ChatResult Retry(const ChatCallbacks& cb = {}, const std::atomic<bool>* cancel = nullptr);  // +
  ChatResult Reset();  // +reset
  ChatResult Generate(std::string_view text, const ChatCallbacks& cb = {},
                      const std::atomic<bool>* cancel = nullptr);  // +gen
  ChatResult Instruct(std::string_view text, const ChatCallbacks& cb = {},
                      const std::atomic<bool>* cancel = nullptr);  // +i
  ChatResult Ask(std::string_view text, const ChatCallbacks& cb = {},
                 const std::atomic<bool>* cancel = nullptr);  // +qa
  ChatResult Continue(const ChatCallbacks& cb = {},
                      const std::atomic<bool>* cancel = nullptr);  // +++
  ChatResult Regenerate(const ChatCallbacks& cb = {},
                        const std::atomic<bool>* cancel = nullptr);  // ++

  // +save: the conversation (state and logits after the last reply and after the last user
  // message, history, temperature, top-p) in a versioned file tied to this model.
  void Save(const std::string& path) const;
  // +load / --load-state: a file written by Save (the conversation continues exactly where it
  // was), or a plain state file (aviary's AVSTATE1), which becomes the initial state (the
  // intro is not fed; +reset returns to it). Refuses a file from another model; nothing
  // changes on error. Returns a one-line description of what was loaded.
  std::string Load(const std::string& path);

  // Settings (ranges as -temp= / -top_p=); throw UsageError naming the range and the value in
  // force, changing nothing.
  void SetTemperature(float temperature);
  void SetTopP(float top_p);
  void Reseed(uint64_t seed);
  float temperature() const { return sampler_.options().temperature; }
  float top_p() const { return sampler_.options().top_p; }

  // +state: state size, tokens seen, turns, settings.
  std::string StateSummary() const;
  // +help: every command, one line each.
  static std::string Help();
  std::string SettingsSummary() const;

  // Introspection (tests, front ends).
  struct Snapshot {
    State state;
    std::vector<float> logits;  // after the last token fed; empty before any token
    int32_t last_token = -1;
  };
  // ChatRWKV's names: "chat_init" (after the initial prompt), "chat" (the conversation, after
  // the last reply), "chat_pre" (right after the last user message), "gen_0" (where the last
  // free generation started), "gen_1" (where it stopped). nullptr when not set.
  const Snapshot* snapshot(std::string_view name) const;
  // The model state and logits after the last command (ChatRWKV's model_state / out).
  const State& state() const { return current_.state; }
  const std::vector<float>& logits() const { return current_.logits; }
  const std::vector<ChatTurn>& history() const { return history_; }
  const ChatTemplate& chat_template() const { return template_; }
  const ChatOptions& options() const { return options_; }
  const Model& model() const { return model_; }
  const Tokenizer& tokenizer() const { return tokenizer_; }
  // The reply prefix shown before a chat reply ("Assistant:").
  std::string ReplyPrefix() const;

 private:
  enum class Mode { kChat, kFree, kFreeQa };
  void Feed(std::span<const int32_t> tokens, Snapshot& snap);
  void FeedText(std::string_view text, Snapshot& snap);
  ChatResult ChatReply(const ChatCallbacks& cb, const std::atomic<bool>* cancel);
  ChatResult FreeGeneration(Mode mode, bool first_unbiased, const ChatCallbacks& cb,
                            const std::atomic<bool>* cancel);
  ChatResult StartFree(Mode mode, std::string prompt, const ChatCallbacks& cb,
                       const std::atomic<bool>* cancel);
  void PrepareLogits(const Snapshot& snap, float newline_bias, bool ban_end_of_text);
  std::string FoldMessage(std::string_view text) const;

  const Model& model_;
  const Tokenizer& tokenizer_;
  ChatTemplate template_;
  ChatOptions options_;
  Sampler sampler_;
  std::vector<int32_t> newline_tokens_;  // "\n" and "\n\n" when each is one token
  std::vector<int32_t> avoid_repeat_;   // ChatRWKV's AVOID_REPEAT: ，：？！ when one token each
  std::vector<int32_t> always_banned_;  // ids the model has but the tokenizer cannot decode
  std::vector<std::string> stops_;      // expanded template stops
  std::vector<float> work_;             // logits being prepared for sampling

  Snapshot current_;
  std::optional<Snapshot> chat_init_, chat_, chat_pre_, gen_0_, gen_1_;
  bool gen_is_qa_ = false;
  std::vector<ChatTurn> history_;
};

}  // namespace aviary
