// aviary tokenize: text -> token ids; aviary detokenize: token ids -> the exact bytes.
// The tokenizer is a model's (--model, chosen as for generate; --tokenizer overrides it) or a
// tokenizer file on its own (--tokenizer: rwkv_vocab_*.txt or a tokenizer.json).
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <iterator>
#include <limits>

#include "aviary/error.h"
#include "cli_common.h"

namespace aviary::cli {
namespace {

struct TokenizerChoice {
  std::string model, tokenizer;
};

void AddTokenizerOptions(CLI::App* cmd, TokenizerChoice* o) {
  cmd->add_option("--model", o->model,
                  "Use this model's tokenizer (a file, or a name pulled into the cache)");
  cmd->add_option("--tokenizer", o->tokenizer,
                  "Tokenizer file (World rwkv_vocab_*.txt or a tokenizer.json); with --model it "
                  "overrides the model's");
}

std::unique_ptr<Tokenizer> ChooseTokenizer(const TokenizerChoice& o) {
  if (!o.model.empty()) return std::move(LoadModel(o.model, o.tokenizer).tokenizer);
  if (!o.tokenizer.empty()) return LoadTokenizer(o.tokenizer);
  throw UsageError("give --model FILE or --tokenizer FILE");
}

void Write(const std::string& bytes) {
  if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), stdout) != bytes.size()) {
    throw Error("cannot write to stdout");
  }
}

struct TokenizeOptions {
  TokenizerChoice tok;
  std::string text, file;
  CLI::Option* text_opt = nullptr;
  CLI::Option* file_opt = nullptr;
  bool json = false;
};

void RunTokenize(const TokenizeOptions& o) {
  const bool has_text = o.text_opt->count() > 0, has_file = o.file_opt->count() > 0;
  if (has_text == has_file) throw UsageError("give exactly one of --text TEXT and --file FILE");
  const std::unique_ptr<Tokenizer> tokenizer = ChooseTokenizer(o.tok);
  const std::vector<int32_t> ids = tokenizer->Encode(has_text ? o.text : ReadFile(o.file));
  std::string out = o.json ? "[" : "";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) out += o.json ? "," : " ";
    out += std::to_string(ids[i]);
  }
  out += o.json ? "]\n" : "\n";
  Write(out);
}

struct DetokenizeOptions {
  TokenizerChoice tok;
  std::vector<std::string> ids;
};

// Splits `text` into ids: whitespace, commas and square brackets separate them (so both the
// plain and the --json output of tokenize read back). A word that is not a number throws
// `make_error`'s error.
template <typename MakeError>
std::vector<int32_t> ParseIds(const std::string& text, MakeError make_error) {
  std::vector<int32_t> ids;
  // A comma stands between two ids: "1,,2", "[,1]" and "1," are missing one.
  bool after_id = false, after_comma = false;
  size_t i = 0;
  while (i < text.size()) {
    const char c = text[i];
    if (c == ',' || c == '[' || c == ']') {
      if (after_comma || (c == ',' && !after_id))
        throw make_error("a comma without an id before it");
      after_comma = c == ',';
      after_id = false;
      ++i;
      continue;
    }
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      ++i;
      continue;
    }
    after_id = true;
    after_comma = false;
    size_t j = i;
    while (j < text.size() && !std::strchr(" \t\n\r,[]", text[j])) ++j;
    const std::string word = text.substr(i, j - i);
    i = j;
    size_t k = word[0] == '-' ? 1 : 0;
    const bool numeric =
        k < word.size() && word.find_first_not_of("0123456789", k) == std::string::npos;
    if (!numeric) throw make_error("'" + word.substr(0, 40) + "' is not a token id");
    // Ids beyond int32 are outside every vocabulary: report them as such, not as overflow.
    const long long v = word.size() > 12
                            ? (word[0] == '-' ? -1 : std::numeric_limits<long long>::max())
                            : std::stoll(word);
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
      throw Error("token id " + word.substr(0, 40) + " is outside the vocabulary");
    }
    ids.push_back(static_cast<int32_t>(v));
  }
  if (after_comma) throw make_error("a comma without an id after it");
  return ids;
}

void RunDetokenize(const DetokenizeOptions& o) {
  std::vector<int32_t> ids;
  if (o.ids.empty()) {  // read the ids from stdin
    const std::string input((std::istreambuf_iterator<char>(std::cin)),
                            std::istreambuf_iterator<char>());
    ids = ParseIds(input, [](const std::string& m) { return Error("stdin: " + m); });
  } else {
    std::string args;  // "1, 2" as two arguments reads as "1, 2"
    for (const std::string& arg : o.ids) args += arg + " ";
    ids = ParseIds(args, [](const std::string& m) { return UsageError(m); });
  }
  const std::unique_ptr<Tokenizer> tokenizer = ChooseTokenizer(o.tok);
  Write(tokenizer->Decode(ids));  // throws on an id outside the vocabulary before writing
  std::fflush(stdout);
}

}  // namespace

void RegisterTokenize(CLI::App& app) {
  auto t = std::make_shared<TokenizeOptions>();
  CLI::App* tok = app.add_subcommand("tokenize", "Print the token ids of a text");
  AddTokenizerOptions(tok, &t->tok);
  t->text_opt = tok->add_option("--text", t->text, "The text (raw bytes, as given)");
  t->file_opt =
      tok->add_option("--file", t->file, "Read the text from a file (raw bytes; - for stdin)");
  tok->add_flag("--json", t->json, "Print a JSON array instead of ids separated by spaces");
  tok->callback([t] { RunTokenize(*t); });

  auto d = std::make_shared<DetokenizeOptions>();
  CLI::App* detok = app.add_subcommand(
      "detokenize", "Write the exact bytes of token ids to stdout (ids from stdin if none given)");
  AddTokenizerOptions(detok, &d->tok);
  // The ids are taken as the words left over: CLI11 reads a positional "[1,2,,3]" as a list
  // and drops its empty place, which ParseIds must see.
  // "ids" takes no word itself (validate_positionals skips it): it documents the words and
  // keeps "--" working; the words are read back as the remaining arguments.
  detok->allow_extras();
  detok->validate_positionals();
  detok->add_option("ids", "Token ids (spaces, commas or a JSON array); none: read stdin")
      ->check(CLI::Validator([](std::string&) { return std::string("taken as remaining"); }, ""));
  detok->callback([d, detok] {
    d->ids.clear();
    bool after_marker = false;  // after "--" every word is an id
    for (const std::string& word : detok->remaining()) {
      if (!after_marker && word == "--") {
        after_marker = true;
        continue;
      }
      if (!after_marker && word.size() > 1 && word[0] == '-' &&
          !std::isdigit(static_cast<unsigned char>(word[1]))) {
        throw UsageError("detokenize: unknown option " + word);
      }
      d->ids.push_back(word);
    }
    RunDetokenize(*d);
  });
}

}  // namespace aviary::cli
