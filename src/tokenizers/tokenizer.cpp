#include "aviary/tokenizer.h"

#include <filesystem>
#include <fstream>

#include "aviary/cache.h"
#include "aviary/error.h"
#include "aviary/model.h"
#include "tokenizers/tokenizers.h"

namespace aviary {
namespace {

class ByteTokenizer final : public Tokenizer {
 public:
  std::string name() const override { return "bytes"; }
  int32_t vocab_size() const override { return 256; }
  std::vector<int32_t> Encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    ids.reserve(text.size());
    for (unsigned char c : text) ids.push_back(c);  // unsigned: bytes >= 0x80 are 128..255
    return ids;
  }
  std::string Decode(std::span<const int32_t> ids) const override {
    std::string out;
    out.reserve(ids.size());
    for (int32_t id : ids) {
      if (id < 0 || id > 255) {
        throw Error("token id " + std::to_string(id) + " is outside the byte vocabulary (0..255)");
      }
      out.push_back(static_cast<char>(id));
    }
    return out;
  }
};

// Length of the UTF-8 sequence a lead byte announces; 0 for a byte that cannot lead one.
int Utf8Length(unsigned char c) {
  if (c < 0x80) return 1;
  if (c >= 0xc2 && c <= 0xdf) return 2;
  if (c >= 0xe0 && c <= 0xef) return 3;
  if (c >= 0xf0 && c <= 0xf4) return 4;
  return 0;
}

}  // namespace

std::unique_ptr<Tokenizer> MakeByteTokenizer() { return std::make_unique<ByteTokenizer>(); }

namespace {

// Runs `make`, naming `source` (the file the tokenizer comes from) in an error that does not.
template <typename Make>
std::unique_ptr<Tokenizer> NamingTheSource(const std::string& source, Make make) {
  try {
    return make();
  } catch (const UsageError&) {
    throw;
  } catch (const Error& e) {
    const std::string what = e.what();
    if (what.rfind(source + ":", 0) == 0) throw;
    throw Error(source + ": " + what);
  }
}

}  // namespace

std::unique_ptr<Tokenizer> LoadTokenizer(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open tokenizer file");
  if (std::filesystem::is_directory(path)) throw Error(path + ": is a directory");
  char first = 0;
  in >> first;  // skips whitespace
  return NamingTheSource(path, [&] {
    if (first == '{') return MakeBpeTokenizer(ReadTokenizerJson(path));
    return MakeWorldTokenizer(ReadWorldVocab(path));
  });
}

std::unique_ptr<Tokenizer> MakeTokenizer(const TokenizerData& data) {
  if (data.kind == "world") return MakeWorldTokenizer(data);
  if (data.kind == "gpt2-bpe") return MakeBpeTokenizer(data);
  if (data.kind == "bytes") return MakeByteTokenizer();
  throw Error("unknown tokenizer kind '" + data.kind + "'");
}

namespace {

// The vocabulary file named `file_name`: next to the model, then in the cache.
std::optional<std::string> FindVocabulary(const ModelInfo& info, const std::string& file_name,
                                          const std::string& cache_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path beside = fs::path(info.path).parent_path() / file_name;
  if (fs::is_regular_file(beside, ec)) return beside.string();
  return FindInCache(file_name, cache_dir);
}

}  // namespace

std::unique_ptr<Tokenizer> TokenizerForModel(const ModelInfo& info, const std::string& path,
                                             const std::string& cache_dir) {
  std::unique_ptr<Tokenizer> tok;
  if (!path.empty()) {
    tok = LoadTokenizer(path);
  } else if (info.tokenizer_data) {
    tok = NamingTheSource(info.path, [&] { return MakeTokenizer(*info.tokenizer_data); });
  } else if (info.n_vocab == 256) {
    tok = MakeByteTokenizer();
  } else {
    const bool world = info.n_vocab == 65536;
    const bool neox = info.n_vocab == 50277 || info.n_vocab == 50304;
    if (!world && !neox) {
      throw Error(info.path + ": no tokenizer known for a vocabulary of " +
                  std::to_string(info.n_vocab) + " tokens; give one with --tokenizer FILE");
    }
    const std::string file = world ? "rwkv_vocab_v20230424.txt" : "20B_tokenizer.json";
    const std::optional<std::string> found = FindVocabulary(info, file, cache_dir);
    if (!found) {
      throw Error(info.path + ": needs the " + std::string(world ? "World" : "GPT-NeoX") +
                  " vocabulary " + file + "; put it next to the model, in " +
                  (cache_dir.empty() ? std::string("the cache folder") : cache_dir) +
                  " (aviary pull does), or give --tokenizer FILE");
    }
    tok = LoadTokenizer(*found);
  }
  if (tok->vocab_size() > info.n_vocab) {
    throw Error(info.path + ": tokenizer " + tok->name() + " has " +
                std::to_string(tok->vocab_size()) + " tokens but the model only " +
                std::to_string(info.n_vocab));
  }
  return tok;
}

std::string DecodeTokens(const std::vector<std::string>& tokens, std::span<const int32_t> ids,
                         const char* vocabulary) {
  size_t total = 0;
  for (int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= tokens.size()) {
      throw Error("token id " + std::to_string(id) + " is outside the " + vocabulary +
                  " vocabulary (0.." + std::to_string(tokens.size() - 1) + ")");
    }
    total += tokens[id].size();
  }
  std::string out;
  out.reserve(total);
  for (int32_t id : ids) out += tokens[id];
  return out;
}

std::string Utf8Stream::Push(std::string_view bytes) {
  pending_.append(bytes);
  // Find where the last (possibly incomplete) character starts.
  size_t cut = pending_.size();
  for (size_t back = 1; back <= 4 && back <= pending_.size(); ++back) {
    const unsigned char c = pending_[pending_.size() - back];
    if ((c & 0xc0) == 0x80) continue;  // continuation byte: keep looking for the lead
    const int need = Utf8Length(c);
    if (need > static_cast<int>(back)) cut = pending_.size() - back;  // incomplete: hold it
    break;
  }
  std::string ready = pending_.substr(0, cut);
  pending_.erase(0, cut);
  return ready;
}

std::string Utf8Stream::Flush() {
  std::string rest;
  rest.swap(pending_);
  return rest;
}

}  // namespace aviary
