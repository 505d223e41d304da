// Chat templates: World / RWKV-7 G series, Raven, and template files.
#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>

#include "aviary/chat.h"
#include "aviary/error.h"

namespace aviary {
namespace {

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

}  // namespace

std::string ChatTemplate::Expand(std::string_view format, std::string_view text) const {
  std::string out;
  out.reserve(format.size() + text.size() + 32);
  for (size_t i = 0; i < format.size(); ++i) {
    if (format[i] == '{') {
      const size_t close = format.find('}', i);
      if (close != std::string_view::npos) {
        const std::string_view key = format.substr(i + 1, close - i - 1);
        const std::string* value = nullptr;
        if (key == "user") value = &user;
        else if (key == "bot") value = &bot;
        else if (key == "sep") value = &separator;
        else if (key == "system") value = &system_role;
        if (value) {
          out += *value;
          i = close;
          continue;
        }
        if (key == "text") {
          out += text;
          i = close;
          continue;
        }
      }
    }
    out += format[i];
  }
  return out;
}

std::vector<std::string> ChatTemplate::ReplyStops() const {
  std::vector<std::string> stops = {"\n\n"};
  for (const std::string& s : stop) {
    std::string e = Expand(s);
    if (!e.empty() && std::find(stops.begin(), stops.end(), e) == stops.end()) {
      stops.push_back(std::move(e));
    }
  }
  return stops;
}

ChatTemplate WorldTemplate() {
  ChatTemplate t;  // the defaults are the World / G-series format
  t.name = "world";
  t.think = " <think";
  return t;
}

ChatTemplate RavenTemplate() {
  ChatTemplate t;
  t.name = "raven";
  t.user = "Bob";
  t.bot = "Alice";
  t.system_role = "";
  // ChatRWKV v2/prompt/default/English-2.py, after chat.py's clean-up ("\n" + lines + "\n\n").
  t.intro =
      "\nThe following is a coherent verbose detailed conversation between a girl named Alice and "
      "her friend Bob. Alice is very intelligent, creative and friendly. Alice is unlikely to "
      "disagree with Bob, and Alice doesn't like to ask Bob questions. Alice likes to tell Bob a "
      "lot about herself and her opinions. Alice usually gives Bob kind, helpful and informative "
      "advices.\n\n"
      "Bob: Hello Alice, how are you doing?\n\n"
      "Alice: Hi! Thanks, I'm fine. What about you?\n\n"
      "Bob: I am fine. It's nice to see you. Look, here is a store selling tea and juice.\n\n"
      "Alice: Sure. Let's go inside. I would like to have some Mocha latte, which is my "
      "favourite!\n\n"
      "Bob: What is it?\n\n"
      "Alice: Mocha latte is usually made with espresso, milk, chocolate, and frothed milk. Its "
      "flavors are frequently sweet.\n\n"
      "Bob: Sounds tasty. I'll try it next time. Would you like to chat with me for a while?\n\n"
      "Alice: Of course! I'm glad to answer your questions or give helpful advices. You know, I "
      "am confident with my expertise. So please go ahead!\n\n";
  t.instruction_format =
      "\nBelow is an instruction that describes a task. Write a response that appropriately "
      "completes the request.\n\n# Instruction:\n{text}\n\n# Response:\n";
  t.think = "";
  return t;
}

namespace {

// `"..."` with C escapes, starting at s[i] == '"'; returns the value and moves i past it.
std::string ParseQuoted(const std::string& s, size_t& i, const std::string& where) {
  std::string out;
  ++i;  // opening quote
  while (i < s.size() && s[i] != '"') {
    char c = s[i++];
    if (c == '\\') {
      if (i >= s.size()) break;
      const char e = s[i++];
      switch (e) {
        case 'n': c = '\n'; break;
        case 't': c = '\t'; break;
        case 'r': c = '\r'; break;
        case '\\': c = '\\'; break;
        case '"': c = '"'; break;
        default: throw Error(where + ": unknown escape \\" + std::string(1, e));
      }
    }
    out += c;
  }
  if (i >= s.size()) throw Error(where + ": missing closing quote");
  ++i;  // closing quote
  return out;
}

}  // namespace

ChatTemplate LoadChatTemplate(const std::string& path) {
  if (std::filesystem::is_directory(path)) throw Error(path + ": is a directory");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open template file");
  ChatTemplate t = WorldTemplate();
  t.name = std::filesystem::path(path).filename().string();
  bool stop_given = false, any_key = false;
  std::string line;
  int line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    const std::string where = path + ":" + std::to_string(line_no);
    size_t i = 0;
    while (i < line.size() && std::isspace(static_cast<unsigned char>(line[i]))) ++i;
    if (i >= line.size() || line[i] == '#') continue;
    size_t k = i;
    while (k < line.size() && (std::isalnum(static_cast<unsigned char>(line[k])) || line[k] == '_'))
      ++k;
    const std::string key = line.substr(i, k - i);
    if (key.empty()) throw Error(where + ": expected key = \"value\"");
    while (k < line.size() && (line[k] == ' ' || line[k] == '\t')) ++k;
    if (k >= line.size() || line[k] != '=') throw Error(where + ": expected '=' after " + key);
    ++k;
    while (k < line.size() && (line[k] == ' ' || line[k] == '\t')) ++k;
    std::string value;
    bool is_bool = false, bool_value = false;
    if (k < line.size() && line[k] == '"') {
      value = ParseQuoted(line, k, where);
    } else if (line.compare(k, 4, "true") == 0) {
      is_bool = bool_value = true;
      k += 4;
    } else if (line.compare(k, 5, "false") == 0) {
      is_bool = true;
      k += 5;
    } else {
      throw Error(where + ": the value of " + key + " must be a \"quoted string\"");
    }
    while (k < line.size() && std::isspace(static_cast<unsigned char>(line[k]))) ++k;
    if (k < line.size() && line[k] != '#') throw Error(where + ": unexpected text after the value");
    if (key == "fold_newlines") {
      if (!is_bool) throw Error(where + ": fold_newlines must be true or false");
      t.fold_newlines = bool_value;
      any_key = true;
      continue;
    }
    if (is_bool) throw Error(where + ": " + key + " must be a \"quoted string\"");
    if (key == "base") {
      if (any_key) throw Error(where + ": base must come before the other keys");
      const std::string name = t.name;
      if (value == "world") t = WorldTemplate();
      else if (value == "raven") t = RavenTemplate();
      else throw Error(where + ": unknown base template '" + value + "' (world or raven)");
      t.name = name;
    } else if (key == "name") t.name = value;
    else if (key == "user") t.user = value;
    else if (key == "bot") t.bot = value;
    else if (key == "separator") t.separator = value;
    else if (key == "system_role") t.system_role = value;
    else if (key == "intro") t.intro = value;
    else if (key == "system") t.system_format = value;
    else if (key == "message") t.message_format = value;
    else if (key == "instruction") t.instruction_format = value;
    else if (key == "qa") t.qa_format = value;
    else if (key == "gen") t.gen_format = value;
    else if (key == "think") t.think = value;
    else if (key == "stop") {
      if (!stop_given) t.stop.clear();
      stop_given = true;
      if (value.empty()) throw Error(where + ": an empty stop string would end every reply");
      t.stop.push_back(value);
    } else {
      throw Error(where + ": unknown key '" + key + "'");
    }
    any_key = true;
  }
  if (in.bad()) throw Error(path + ": read error");
  if (t.user.empty() || t.bot.empty()) throw Error(path + ": user and bot names must not be empty");
  for (const std::string* f :
       {&t.message_format, &t.instruction_format, &t.qa_format, &t.gen_format}) {
    if (f->find("{text}") == std::string::npos) {
      throw Error(path + ": every format (message, instruction, qa, gen) needs {text}");
    }
  }
  return t;
}

ChatTemplate ChatTemplateByName(const std::string& name_or_path) {
  if (name_or_path == "world") return WorldTemplate();
  if (name_or_path == "raven") return RavenTemplate();
  std::error_code ec;
  if (!std::filesystem::exists(name_or_path, ec)) {
    throw UsageError("unknown template '" + name_or_path +
                     "': give world, raven, or a template file");
  }
  return LoadChatTemplate(name_or_path);
}

ChatTemplate ChatTemplateForModel(const ModelInfo& info, const Tokenizer& tokenizer) {
  const std::string name = Lower(tokenizer.name());
  if (name.find("world") != std::string::npos) return WorldTemplate();
  if (name.find("neox") != std::string::npos || name.find("gpt") != std::string::npos ||
      name.find("bpe") != std::string::npos || name.find("20b") != std::string::npos) {
    return RavenTemplate();
  }
  (void)info;
  return WorldTemplate();
}

SamplerOptions DefaultChatSampling() {
  SamplerOptions o;
  o.temperature = 1.2f;
  o.top_p = 0.5f;
  o.top_k = 0;
  o.presence_penalty = 0.4f;
  o.frequency_penalty = 0.4f;
  o.penalty_decay = 0.996f;
  o.order = SamplingOrder::kChatRwkv;
  return o;
}

std::string_view ChatStopName(ChatStop stop) {
  switch (stop) {
    case ChatStop::kNone: return "none";
    case ChatStop::kEndOfTurn: return "end of turn";
    case ChatStop::kStopString: return "stop string";
    case ChatStop::kEndOfText: return "end of text";
    case ChatStop::kLength: return "length limit";
    case ChatStop::kCancelled: return "cancelled";
  }
  return "?";
}

}  // namespace aviary
