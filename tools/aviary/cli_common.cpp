#include "cli_common.h"

#include <fstream>
#include <iterator>
#include <sys/stat.h>

#include "aviary/error.h"

namespace aviary::cli {

LoadedModel LoadModel(const std::string& path) {
  LoadedModel m;
  m.model = Model::Load(path);
  m.tokenizer = TokenizerForModel(m.model->info());
  return m;
}

std::string ReadFile(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    throw Error(path + ": is a directory");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw Error(path + ": read error");
  return bytes;
}

std::vector<int32_t> PromptTokens(const Tokenizer& tokenizer, const std::string& prompt,
                                  const std::string& prompt_file) {
  if (!prompt.empty() && !prompt_file.empty()) {
    throw UsageError("give either --prompt or --prompt-file, not both");
  }
  const std::string text = prompt_file.empty() ? prompt : ReadFile(prompt_file);
  if (text.empty()) throw UsageError("the prompt is empty (give --prompt TEXT or --prompt-file FILE)");
  return tokenizer.Encode(text);
}

void AddPromptOptions(CLI::App* cmd, std::string* prompt, std::string* prompt_file) {
  cmd->add_option("--prompt", *prompt, "Prompt text (raw bytes: UTF-8, tabs, newlines as given)");
  cmd->add_option("--prompt-file", *prompt_file, "Read the prompt from a file instead");
}

}  // namespace aviary::cli
