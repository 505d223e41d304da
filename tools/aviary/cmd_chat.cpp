// aviary chat: the RWKV community's chat (ChatRWKV's commands) in a terminal, or scripted
// through stdin. The logic lives in the library (aviary/chat.h); this file is the front end:
// line editing (libedit), Ctrl-C, streaming output, exit codes.
//
// Ctrl-C: during a reply it stops the reply (the partial reply is kept and its turn closed);
// at the prompt it clears the line, and a second Ctrl-C on an empty line quits. Ctrl-D or
// +exit quits. When stdin is not a terminal (plain mode), replies go to stdout one per input
// line, status lines and speeds to stderr; the exit code is 1 if any line was refused, 130
// after Ctrl-C.
#include <histedit.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <clocale>
#include <climits>
#include <cstdio>
#include <cstring>
#include <cwchar>
#include <iostream>
#include <random>

#include "aviary/chat.h"
#include "aviary/error.h"
#include "cli_common.h"

namespace aviary::cli {
namespace {

std::atomic<bool> g_interrupt{false};
volatile sig_atomic_t g_resized = 0;

extern "C" void OnSigint(int) { g_interrupt.store(true); }
extern "C" void OnSigwinch(int) { g_resized = 1; }

// While reading input, `restart` is false: a blocked read returns EINTR so that Ctrl-C (and a
// window resize) is seen at once. While a reply streams it is true, so that writes to the
// terminal are never cut short; the generation loop polls the flag between tokens.
void InstallSignalHandlers(bool restart) {
  struct sigaction sa {};
  sa.sa_handler = OnSigint;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = restart ? SA_RESTART : 0;
  sigaction(SIGINT, &sa, nullptr);
  struct sigaction sw {};
  sw.sa_handler = OnSigwinch;
  sigemptyset(&sw.sa_mask);
  sw.sa_flags = restart ? SA_RESTART : 0;
  sigaction(SIGWINCH, &sw, nullptr);
}

struct ChatCliOptions {
  std::string model, tokenizer, template_name = "auto", system, load_state;
  bool think = false;
  float temperature = DefaultChatSampling().temperature;
  float top_p = DefaultChatSampling().top_p;
  int top_k = 0;
  float presence = DefaultChatSampling().presence_penalty;
  float frequency = DefaultChatSampling().frequency_penalty;
  float decay = DefaultChatSampling().penalty_decay;
  std::vector<int32_t> ban;
  int max_tokens = 999;
  int gen_tokens = 256;
  uint64_t seed = 0;
  bool seed_given = false;
};

// ---- libedit -----------------------------------------------------------------------------

class LineEditor {
 public:
  enum class Status { kLine, kEof, kInterrupted };

  explicit LineEditor(FILE* out) {
    el_ = el_init("aviary", stdin, out, stderr);
    hist_ = history_init();
    HistEvent ev;
    history(hist_, &ev, H_SETSIZE, 1000);
    history(hist_, &ev, H_SETUNIQUE, 1);
    el_set(el_, EL_EDITOR, "emacs");
    el_set(el_, EL_HIST, history, hist_);
    el_set(el_, EL_CLIENTDATA, this);
    el_set(el_, EL_PROMPT, &LineEditor::PromptFn);
    el_set(el_, EL_GETCFN, &LineEditor::GetCharFn);
    el_source(el_, nullptr);  // ~/.editrc
  }
  ~LineEditor() {
    history_end(hist_);
    el_end(el_);
  }
  LineEditor(const LineEditor&) = delete;
  LineEditor& operator=(const LineEditor&) = delete;

  // One line without its newline. kInterrupted: Ctrl-C (`line` holds what was typed).
  Status Read(const std::string& prompt, std::string* line) {
    prompt_ = prompt;
    interrupted_ = false;
    int count = 0;
    const char* s = el_gets(el_, &count);
    line->assign(s && count > 0 ? s : "");
    while (!line->empty() && (line->back() == '\n' || line->back() == '\r')) line->pop_back();
    if (interrupted_) return Status::kInterrupted;
    if (!s || count <= 0) return Status::kEof;
    return Status::kLine;
  }

  void AddHistory(const std::string& entry) {
    HistEvent ev;
    history(hist_, &ev, H_ENTER, entry.c_str());
  }

 private:
  static LineEditor* Self(EditLine* el) {
    void* p = nullptr;
    el_get(el, EL_CLIENTDATA, &p);
    return static_cast<LineEditor*>(p);
  }
  static char* PromptFn(EditLine* el) { return Self(el)->prompt_.data(); }

  // Reads one character; on Ctrl-C (EINTR with the flag set) it ends the line with a newline
  // so that libedit restores the terminal, and Read reports the interruption.
  static int GetCharFn(EditLine* el, wchar_t* wc) {
    LineEditor* self = Self(el);
    char buf[MB_LEN_MAX];
    size_t n = 0;
    for (;;) {
      if (g_interrupt.load()) {
        self->interrupted_ = true;
        *wc = L'\n';
        return 1;
      }
      char c;
      const ssize_t r = ::read(STDIN_FILENO, &c, 1);
      if (r == 0) return 0;
      if (r < 0) {
        if (errno == EINTR) {
          if (g_resized) {
            g_resized = 0;
            el_resize(el);
          }
          continue;
        }
        return -1;
      }
      buf[n++] = c;
      std::mbstate_t st{};
      wchar_t w = 0;
      const size_t k = std::mbrtowc(&w, buf, n, &st);
      if (k == static_cast<size_t>(-2) && n < sizeof buf) continue;  // incomplete character
      if (k == static_cast<size_t>(-1) || k == static_cast<size_t>(-2)) {
        *wc = static_cast<unsigned char>(buf[0]);  // not valid here: pass the byte on
        return 1;
      }
      *wc = w;
      return 1;
    }
  }

  EditLine* el_ = nullptr;
  History* hist_ = nullptr;
  std::string prompt_;
  bool interrupted_ = false;
};

// ---- output ------------------------------------------------------------------------------

struct Output {
  FILE* replies;  // chat replies and generations
  FILE* status;   // banner, speeds, status lines
  bool dim;       // ANSI dim for the speed line (terminal)
};

ChatCallbacks MakeCallbacks(const Output& out) {
  ChatCallbacks cb;
  cb.begin = [out](std::string_view prefix) {
    std::fwrite(prefix.data(), 1, prefix.size(), out.replies);
    std::fflush(out.replies);
  };
  cb.text = [out](std::string_view text) {
    std::fwrite(text.data(), 1, text.size(), out.replies);
    std::fflush(out.replies);
  };
  cb.note = [out](std::string_view note) {
    std::fprintf(out.status, "(%.*s)\n", static_cast<int>(note.size()), note.data());
    std::fflush(out.status);
  };
  return cb;
}

// Shows a result; returns false for +exit.
bool Show(const ChatResult& r, const Output& out, bool* refused) {
  switch (r.kind) {
    case ChatResult::Kind::kReply:
    case ChatResult::Kind::kGeneration: {
      std::fputc('\n', out.replies);
      std::fflush(out.replies);
      const double tps = r.seconds > 0 ? r.tokens / r.seconds : 0.0;
      std::string why;
      if (r.stop == ChatStop::kCancelled) why = ", stopped";
      else if (r.stop == ChatStop::kLength) why = ", length limit";
      else if (r.stop == ChatStop::kEndOfText) why = ", end of text";
      std::fprintf(out.status, "%s(%d tokens, %.1f tokens/s%s)%s\n", out.dim ? "\x1b[2m" : "",
                   r.tokens, tps, why.c_str(), out.dim ? "\x1b[0m" : "");
      if (out.dim) std::fputc('\n', out.status);
      std::fflush(out.status);
      return true;
    }
    case ChatResult::Kind::kStatus:
      std::fprintf(out.status, "%s\n", r.text.c_str());
      std::fflush(out.status);
      return true;
    case ChatResult::Kind::kOutput:
      std::fprintf(out.replies, "%s\n", r.text.c_str());
      std::fflush(out.replies);
      return true;
    case ChatResult::Kind::kError:
      std::fflush(out.replies);
      std::fprintf(stderr, "%s\n", r.text.c_str());
      std::fflush(stderr);
      *refused = true;
      return true;
    case ChatResult::Kind::kExit: return false;
    case ChatResult::Kind::kNone: return true;
  }
  return true;
}

void PrintBanner(const ChatSession& s, const LoadedModel& m, uint64_t seed, FILE* f) {
  const ModelInfo& i = m.model->info();
  const ChatTemplate& t = s.chat_template();
  std::fprintf(f, "aviary chat: RWKV %s, %d layers x %d, %s\n",
               std::string(ArchName(i.arch)).c_str(), i.n_layer, i.n_embd, i.main_type.c_str());
  std::fprintf(f, "model:     %s\n", i.path.c_str());
  std::fprintf(f, "tokenizer: %s (%d tokens)\n", m.tokenizer->name().c_str(),
               m.tokenizer->vocab_size());
  std::fprintf(f, "template:  %s (%s / %s%s%s)\n", t.name.c_str(), t.Expand("{user}{sep}").c_str(),
               s.ReplyPrefix().c_str(), s.options().system.empty() ? "" : ", with a system prompt",
               s.options().think ? ", think mode" : "");
  std::fprintf(f, "sampling:  %s, seed %llu\n", s.SettingsSummary().c_str(),
               static_cast<unsigned long long>(seed));
  std::fprintf(f, "Type +help for the commands; Ctrl-D or +exit quits.\n\n");
  std::fflush(f);
}

// ---- loops -------------------------------------------------------------------------------

int TerminalLoop(ChatSession& session) {
  const bool out_tty = ::isatty(STDOUT_FILENO);
  LineEditor editor(out_tty ? stdout : stderr);
  const Output out{stdout, stdout, out_tty};
  const ChatCallbacks cb = MakeCallbacks(out);
  const std::string prompt = session.chat_template().Expand("{user}{sep} ");
  bool last_was_interrupt = false, refused = false;
  for (;;) {
    g_interrupt.store(false);
    InstallSignalHandlers(false);
    std::string input, line;
    LineEditor::Status st = editor.Read(prompt, &line);
    // A trailing backslash continues the message on the next line.
    while (st == LineEditor::Status::kLine && !line.empty() && line.back() == '\\') {
      line.pop_back();
      input += line + "\n";
      st = editor.Read("... ", &line);
    }
    if (st == LineEditor::Status::kEof) {
      std::fputc('\n', stdout);
      break;
    }
    if (st == LineEditor::Status::kInterrupted) {
      g_interrupt.store(false);
      if (input.empty() && line.empty() && last_was_interrupt) break;
      last_was_interrupt = input.empty() && line.empty();
      std::fprintf(stdout, "(Ctrl-C again or Ctrl-D to quit)\n");
      continue;
    }
    last_was_interrupt = false;
    input += line;
    if (input.find_first_not_of(" \t\r\n") == std::string::npos) continue;
    editor.AddHistory(input);
    InstallSignalHandlers(true);
    const ChatResult r = session.Handle(input, cb, &g_interrupt);
    if (!Show(r, out, &refused)) break;
    CheckStdout();
  }
  return 0;
}

int PlainLoop(ChatSession& session) {
  const Output out{stdout, stderr, false};
  const ChatCallbacks cb = MakeCallbacks(out);
  bool refused = false;
  std::string line;
  while (!g_interrupt.load() && std::getline(std::cin, line)) {
    std::string input;
    for (;;) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty() || line.back() != '\\') break;
      line.pop_back();
      input += line + "\n";
      if (!std::getline(std::cin, line)) {
        line.clear();
        break;
      }
    }
    input += line;
    if (input.find_first_not_of(" \t\r\n") == std::string::npos) continue;
    InstallSignalHandlers(true);
    const ChatResult r = session.Handle(input, cb, &g_interrupt);
    InstallSignalHandlers(false);
    if (!Show(r, out, &refused)) break;
    CheckStdout();  // the replies go nowhere: stop reading input
  }
  std::fflush(stdout);
  if (g_interrupt.load()) return 130;
  return refused ? 1 : 0;
}

int RunChat(const ChatCliOptions& o) {
  SamplerOptions so = DefaultChatSampling();
  so.temperature = o.temperature;
  so.top_p = o.top_p;
  so.top_k = o.top_k;
  so.presence_penalty = o.presence;
  so.frequency_penalty = o.frequency;
  so.penalty_decay = o.decay;
  so.banned_tokens = o.ban;
  so.seed = o.seed_given ? o.seed : std::random_device{}();
  // Validate before the model loads.
  if (!(o.temperature >= kMinChatTemperature && o.temperature <= kMaxChatTemperature)) {
    throw UsageError("--temperature must be from 0.2 to 5");
  }
  if (!(o.top_p >= 0.0f && o.top_p <= 1.0f)) throw UsageError("--top-p must be from 0.0 to 1.0");
  if (o.max_tokens < 1) throw UsageError("--max-tokens must be >= 1");
  if (o.gen_tokens < 1) throw UsageError("--gen-tokens must be >= 1");
  Sampler check(so);
  (void)check;
  std::setlocale(LC_CTYPE, "");
  const LoadedModel m = LoadModel(o.model, o.tokenizer);
  for (int32_t id : o.ban) {
    if (id >= m.model->info().n_vocab) {
      throw UsageError("--ban " + std::to_string(id) + ": outside the vocabulary (0.." +
                       std::to_string(m.model->info().n_vocab - 1) + ")");
    }
  }
  ChatTemplate t = o.template_name == "auto" ? ChatTemplateForModel(m.model->info(), *m.tokenizer)
                                             : ChatTemplateByName(o.template_name);
  ChatOptions co;
  co.sampling = so;
  co.system = o.system;
  co.think = o.think;
  co.max_reply_tokens = o.max_tokens;
  co.free_gen_tokens = o.gen_tokens;
  co.protected_files = {o.tokenizer};
  ChatSession session(*m.model, *m.tokenizer, std::move(t), co);
  std::string loaded;
  if (!o.load_state.empty()) loaded = session.Load(o.load_state);
  const bool terminal = ::isatty(STDIN_FILENO);
  FILE* banner = terminal ? stdout : stderr;
  PrintBanner(session, m, so.seed, banner);
  if (!loaded.empty()) std::fprintf(banner, "%s\n\n", loaded.c_str());
  std::fflush(banner);
  InstallSignalHandlers(false);
  return terminal ? TerminalLoop(session) : PlainLoop(session);
}

}  // namespace

void RegisterChat(CLI::App& app) {
  auto o = std::make_shared<ChatCliOptions>();
  CLI::App* cmd = app.add_subcommand(
      "chat", "Chat with a model (ChatRWKV's commands: +help); scriptable through stdin");
  AddModelOptions(cmd, &o->model, &o->tokenizer);
  AddRuntimeOptions(cmd);
  cmd->add_option("--template", o->template_name,
                  "world (User/Assistant: World, RWKV-7 G), raven (Bob/Alice), or a template file; "
                  "default: chosen from the tokenizer")
      ->capture_default_str();
  cmd->add_option("--system", o->system, "System prompt (templates with a System: role)");
  cmd->add_flag("--think", o->think, "Think mode: every reply starts with \"Assistant: <think\"");
  cmd->add_option("--load-state", o->load_state,
                  "Start from a conversation saved with +save, or from a state file");
  cmd->add_option("--temperature", o->temperature, "Temperature, 0.2 to 5 (-temp=X in the chat)")
      ->capture_default_str();
  cmd->add_option("--top-p", o->top_p,
                  "Top-p, 0 to 1; 0 = most likely token (-top_p=Y in the chat)")
      ->capture_default_str();
  cmd->add_option("--top-k", o->top_k, "Keep only the k most likely tokens (0 = off)")
      ->capture_default_str();
  cmd->add_option("--presence-penalty", o->presence, "Presence penalty")->capture_default_str();
  cmd->add_option("--frequency-penalty", o->frequency, "Frequency penalty")->capture_default_str();
  cmd->add_option("--penalty-decay", o->decay, "Penalty decay per generated token, in (0, 1]")
      ->capture_default_str();
  cmd->add_option("--ban", o->ban, "Token id never to generate (repeatable)");
  cmd->add_option("--max-tokens", o->max_tokens, "Longest chat reply, in tokens")
      ->capture_default_str();
  cmd->add_option("--gen-tokens", o->gen_tokens,
                  "Length of a free generation (+gen, +i, +qa, +++, ++)")
      ->capture_default_str();
  cmd->add_option_function<uint64_t>(
         "--seed", [o](uint64_t s) { o->seed = s, o->seed_given = true; },
         "Random seed for an exact repeat (default: random)")
      ->check(SeedValidator());
  cmd->callback([o] {
    const int code = RunChat(*o);
    if (code != 0) {
      std::fflush(stdout);
      std::exit(code);
    }
  });
}

}  // namespace aviary::cli
