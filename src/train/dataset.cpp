#include "train/dataset.h"

#include <openssl/evp.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>

#include "aviary/error.h"
#include "formats/json_number.h"
#include "formats/mapped_file.h"
#include "tensor/thread_pool.h"
#include "formats/sha256.h"

namespace aviary::train {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Tokenizing works through the data in tasks of about kTaskBytes (pieces of a text file, runs
// of JSONL lines), kTasksPerBatch of them at a time in parallel, and writes each batch's ids in
// order before the next: memory stays at one batch's ids whatever the size of the data, and
// the result does not depend on the number of threads.
constexpr size_t kTaskBytes = size_t{1} << 20;
constexpr size_t kTasksPerBatch = 32;
constexpr char kManifestFormat[] = "aviary binidx cache 1";

std::string FileSha256(std::span<const uint8_t> bytes) {
  Sha256 sha;
  sha.Update(bytes.data(), bytes.size());
  return sha.HexDigest();
}

// What identifies a tokenizer for the cache: its name, its vocabulary (every id's bytes) and
// how it tokenizes a sample that exercises BPE merges, added tokens and multi-byte characters.
std::string TokenizerFingerprint(const Tokenizer& tokenizer) {
  Sha256 sha;
  sha.Update(tokenizer.name() + "\n" + std::to_string(tokenizer.vocab_size()) + "\n" +
             std::to_string(tokenizer.end_of_text().value_or(-1)) + "\n");
  for (int32_t id = 0; id < tokenizer.vocab_size(); ++id) {
    std::string bytes;
    try {
      bytes = tokenizer.Decode(std::span<const int32_t>(&id, 1));
    } catch (const Error&) {
      bytes = "(none)";
    }
    const uint64_t n = bytes.size();
    sha.Update(&n, sizeof n);
    sha.Update(bytes);
  }
  const std::vector<int32_t> ids = tokenizer.Encode(
      "The quick brown fox jumps over the lazy dog.\n\n  def f(x):\n\treturn x ** 2  # ok\r\n"
      "<|endoftext|> Ünïcödé, 中文文本, русский, 😀🎉 1234567890 ...!!! '''s");
  sha.Update(ids.data(), ids.size() * sizeof(int32_t));
  return sha.HexDigest();
}

struct InputFile {
  std::string path;  // absolute
  uint64_t bytes = 0;
  int64_t mtime_ns = 0;
};

InputFile StatInput(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw Error(path + ": cannot open: " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) throw Error(path + ": not a regular file");
  InputFile f;
  f.path = fs::absolute(path).lexically_normal().string();
  f.bytes = static_cast<uint64_t>(st.st_size);
  f.mtime_ns = int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec;
  return f;
}

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

bool IsJsonl(const std::string& path) { return EndsWith(path, ".jsonl"); }

// Whether `path` names a binidx dataset; a .bin or .idx without its other half is an error.
bool IsBinidx(const std::string& path) {
  const std::string prefix = BinidxPrefix(path);
  const bool named = prefix != path;
  std::error_code ec;
  if (BinidxExists(prefix)) return named || !fs::is_regular_file(path, ec);
  if (named) {
    throw Error(path + ": a binidx dataset needs both " + prefix + ".bin and " + prefix + ".idx");
  }
  return false;
}

// The manifest's reuse test: same tokenizer, same input files in the same order.
bool ManifestMatches(const std::string& manifest_path, const std::string& fingerprint,
                     const std::vector<InputFile>& inputs, const std::string& prefix) {
  json m;
  try {
    std::ifstream in(manifest_path);
    if (!in) return false;
    m = json::parse(in);
    if (m.value("format", "") != kManifestFormat) return false;
    if (m.at("tokenizer").get<std::string>() != fingerprint) return false;
    const json& listed = m.at("inputs");
    if (!listed.is_array() || listed.size() != inputs.size()) return false;
    for (size_t i = 0; i < inputs.size(); ++i) {
      const json& e = listed[i];
      if (e.at("path").get<std::string>() != inputs[i].path ||
          JsonUnsigned(e.at("bytes")) != inputs[i].bytes) {
        return false;
      }
      if (JsonInteger(e.at("mtime_ns"), std::numeric_limits<int64_t>::min(),
                      std::numeric_limits<int64_t>::max()) == inputs[i].mtime_ns) {
        continue;
      }
      // Touched or copied: the same content still counts.
      const MappedFile file(inputs[i].path);
      if (FileSha256(file.bytes()) != e.at("sha256").get<std::string>()) return false;
    }
  } catch (const json::exception&) {
    return false;
  } catch (const Error&) {
    return false;
  }
  try {
    const TokenDataset data(prefix);
    return JsonUnsigned(m.at("tokens")) == data.size() &&
           JsonUnsigned(m.at("documents")) == data.header().documents;
  } catch (const Error&) {
    return false;
  } catch (const json::exception&) {
    return false;
  }
}

void WriteFileAtomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    if (!out) throw Error(tmp + ": cannot write");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) throw Error(path + ": cannot write: " + ec.message());
}

// The text of one JSONL line: nullopt for a blank line; throws aviary::Error
// "NAME:LINE: ..." for a line that is not an object with a "text" string.
std::optional<std::string> JsonlLineText(std::string_view line, const std::string& name,
                                         uint64_t line_number) {
  if (line.find_first_not_of(" \t\r") == std::string_view::npos) return std::nullopt;
  auto where = [&] { return name + ":" + std::to_string(line_number) + ": "; };
  json doc;
  try {
    doc = json::parse(line);
  } catch (const json::exception& e) {
    std::string why = e.what();  // "[json.exception.parse_error.101] parse error at ..."
    if (const size_t bracket = why.find("] ");
        why.starts_with("[json") && bracket != std::string::npos) {
      why = why.substr(bracket + 2);
    }
    throw Error(where() + "not valid JSON: " + why);
  }
  if (!doc.is_object()) throw Error(where() + "not a JSON object");
  const auto text = doc.find("text");
  if (text == doc.end() || !text->is_string()) {
    throw Error(where() + "no \"text\" string in the object");
  }
  return std::move(text->get_ref<std::string&>());
}

// Runs task(i) for i in [0, n) on the current runtime's threads and rethrows the exception of
// the first task (in order) that threw, so errors are the ones a serial run would give.
template <typename F>
void RunTasks(size_t n, F&& task) {
  std::vector<std::exception_ptr> errors(n);
  ParallelFor(static_cast<int64_t>(n), [&](int64_t i, int) {
    try {
      task(static_cast<size_t>(i));
    } catch (...) {
      errors[i] = std::current_exception();
    }
  });
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

void EndDocument(const Tokenizer& tokenizer, BinidxWriter& writer) {
  if (const auto eot = tokenizer.end_of_text()) writer.Add(std::span<const int32_t>(&*eot, 1));
  writer.EndDocument();
}

// A plain text file: one document, its pieces tokenized in parallel.
void TokenizeText(std::string_view text, const Tokenizer& tokenizer, BinidxWriter& writer,
                  const std::function<void(size_t done)>& progress) {
  const std::vector<std::string_view> pieces = TextPieces(text, kTaskBytes);
  for (size_t first = 0; first < pieces.size(); first += kTasksPerBatch) {
    const size_t n = std::min(kTasksPerBatch, pieces.size() - first);
    std::vector<std::vector<int32_t>> ids(n);
    RunTasks(n, [&](size_t i) { ids[i] = tokenizer.Encode(pieces[first + i]); });
    for (const auto& part : ids) writer.Add(part);
    const std::string_view last = pieces[first + n - 1];
    progress(last.data() + last.size() - text.data());
  }
  EndDocument(tokenizer, writer);
}

// A JSONL file: runs of lines parsed and tokenized in parallel, documents written in order.
void TokenizeJsonl(std::string_view bytes, const std::string& name, const Tokenizer& tokenizer,
                   BinidxWriter& writer, const std::function<void(size_t done)>& progress) {
  struct Task {
    size_t begin = 0, end = 0;  // whole lines
    uint64_t first_line = 0;
    std::vector<std::vector<int32_t>> documents;
  };
  size_t at = 0;
  uint64_t line = 1;
  while (at < bytes.size()) {
    std::vector<Task> tasks;
    while (tasks.size() < kTasksPerBatch && at < bytes.size()) {
      Task t;
      t.begin = at;
      t.first_line = line;
      const size_t newline = bytes.find('\n', std::min(bytes.size(), at + kTaskBytes) - 1);
      t.end = newline == std::string_view::npos ? bytes.size() : newline + 1;
      line += std::count(bytes.begin() + t.begin, bytes.begin() + t.end, '\n');
      at = t.end;
      tasks.push_back(std::move(t));
    }
    RunTasks(tasks.size(), [&](size_t i) {
      Task& t = tasks[i];
      uint64_t number = t.first_line;
      for (size_t begin = t.begin; begin < t.end; ++number) {
        size_t end = bytes.find('\n', begin);
        if (end == std::string_view::npos || end > t.end) end = t.end;
        const std::optional<std::string> text =
            JsonlLineText(bytes.substr(begin, end - begin), name, number);
        begin = end + 1;
        if (!text) continue;
        std::vector<int32_t>& ids = t.documents.emplace_back();
        for (std::string_view piece : TextPieces(*text, kTaskBytes)) {
          const std::vector<int32_t> part = tokenizer.Encode(piece);
          ids.insert(ids.end(), part.begin(), part.end());
        }
      }
    });
    for (const Task& t : tasks) {
      for (const auto& ids : t.documents) {
        writer.Add(ids);
        EndDocument(tokenizer, writer);
      }
    }
    progress(at);
  }
}

// Deterministic 64-bit mixing (SplitMix64), for deriving the sampler's order from a seed.
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint64_t MulMod(uint64_t a, uint64_t b, uint64_t m) {
  return static_cast<uint64_t>(static_cast<unsigned __int128>(a) * b % m);
}

bool IsPrime(uint64_t n) {
  if (n < 2) return false;
  if (n < 4) return true;
  if (n % 2 == 0 || n % 3 == 0) return false;
  for (uint64_t i = 5; i <= n / i; i += 6) {
    if (n % i == 0 || n % (i + 2) == 0) return false;
  }
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Tokenizing

std::vector<std::string_view> TextPieces(std::string_view text, size_t target_bytes) {
  std::vector<std::string_view> pieces;
  size_t begin = 0;
  while (text.size() - begin > target_bytes) {
    size_t cut = std::string_view::npos;
    for (size_t nl = text.find('\n', begin + std::max<size_t>(target_bytes, 1) - 1);
         nl != std::string_view::npos && nl + 1 < text.size(); nl = text.find('\n', nl + 1)) {
      auto visible = [](char c) { return c >= 0x21 && c <= 0x7e; };  // ASCII, not a space
      if (nl > 0 && visible(text[nl - 1]) && visible(text[nl + 1])) {
        cut = nl + 1;
        break;
      }
    }
    if (cut == std::string_view::npos) break;
    pieces.push_back(text.substr(begin, cut - begin));
    begin = cut;
  }
  if (begin < text.size() || pieces.empty()) pieces.push_back(text.substr(begin));
  return pieces;
}

void ForEachJsonlText(std::string_view bytes, const std::string& name, const JsonlTextFn& fn) {
  uint64_t line_number = 0;
  size_t begin = 0;
  while (begin < bytes.size()) {
    size_t end = bytes.find('\n', begin);
    if (end == std::string_view::npos) end = bytes.size();
    const std::optional<std::string> text =
        JsonlLineText(bytes.substr(begin, end - begin), name, ++line_number);
    begin = std::min(end + 1, bytes.size());
    if (text) fn(*text, line_number, begin);
  }
}

PreparedData PrepareDataset(const std::vector<std::string>& inputs, const Tokenizer& tokenizer,
                            const std::string& out_dir, const TokenizeProgress& progress) {
  if (inputs.empty()) throw UsageError("no training data given");
  for (const std::string& path : inputs) {
    if (!IsBinidx(path)) continue;
    if (inputs.size() != 1) {
      throw UsageError(path + ": a binidx dataset is used alone, not with other data files");
    }
    const TokenDataset data(path);
    return {data.prefix(), true, data.size(), data.header().documents};
  }

  std::vector<InputFile> files;
  uint64_t total_bytes = 0;
  for (const std::string& path : inputs) {
    files.push_back(StatInput(path));
    if (files.back().bytes == 0) throw Error(path + ": file is empty");
    total_bytes += files.back().bytes;
  }
  const fs::path dir = fs::path(out_dir) / "data";
  const std::string prefix = (dir / "tokens").string();
  const std::string manifest_path = (dir / "manifest.json").string();
  const std::string fingerprint = TokenizerFingerprint(tokenizer);
  if (ManifestMatches(manifest_path, fingerprint, files, prefix)) {
    const TokenDataset data(prefix);
    return {prefix, true, data.size(), data.header().documents};
  }

  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw Error(dir.string() + ": cannot create: " + ec.message());
  fs::remove(manifest_path, ec);  // the dataset below no longer matches it
  if (ec) throw Error(manifest_path + ": cannot remove: " + ec.message());

  BinidxWriter writer(prefix, TokenTypeForVocab(tokenizer.vocab_size()));
  json listed = json::array();
  uint64_t done_bytes = 0;
  for (size_t i = 0; i < files.size(); ++i) {
    const std::string& path = inputs[i];
    const MappedFile file(path);
    if (file.bytes().size() != files[i].bytes) throw Error(path + ": changed while being read");
    const std::string_view bytes(reinterpret_cast<const char*>(file.bytes().data()),
                                 file.bytes().size());
    const uint64_t documents_before = writer.documents();
    auto file_progress = [&](size_t done) {
      if (progress) progress(done_bytes + done, total_bytes);
    };
    if (IsJsonl(path)) {
      TokenizeJsonl(bytes, path, tokenizer, writer, file_progress);
      if (writer.documents() == documents_before) {
        throw Error(path + ": no documents (every line is blank or its text empty)");
      }
    } else {
      TokenizeText(bytes, tokenizer, writer, file_progress);
    }
    done_bytes += files[i].bytes;
    if (progress) progress(done_bytes, total_bytes);
    listed.push_back({{"path", files[i].path},
                      {"bytes", files[i].bytes},
                      {"mtime_ns", files[i].mtime_ns},
                      {"sha256", FileSha256(file.bytes())}});
  }
  if (writer.tokens() == 0) throw Error(inputs.front() + ": the data holds no tokens");
  writer.Finish();
  json manifest;
  manifest["format"] = kManifestFormat;
  manifest["tokenizer"] = fingerprint;
  manifest["tokenizer_name"] = tokenizer.name();
  manifest["inputs"] = listed;
  manifest["tokens"] = writer.tokens();
  manifest["documents"] = writer.documents();
  WriteFileAtomically(manifest_path, manifest.dump(2) + "\n");
  return {prefix, false, writer.tokens(), writer.documents()};
}

// ---------------------------------------------------------------------------------------------
// Windows

DataSplit SplitTokens(uint64_t tokens, double val_fraction) {
  if (!(val_fraction >= 0 && val_fraction < 1)) {
    throw UsageError("validation fraction " + std::to_string(val_fraction) + " is outside [0, 1)");
  }
  const uint64_t train = std::min<uint64_t>(
      tokens, static_cast<uint64_t>(std::floor(static_cast<double>(tokens) * (1 - val_fraction))));
  return {{0, train}, {train, tokens}};
}

uint64_t MagicPrime(uint64_t tokens, int ctx_len) {
  if (ctx_len < 1 || tokens < 1) return 0;
  // (p + 1) * ctx_len < tokens  <=>  p <= (tokens - 1) / ctx_len - 1.
  const uint64_t limit = (tokens - 1) / static_cast<uint64_t>(ctx_len);
  if (limit < 3) return 0;
  for (uint64_t p = limit - 1; p >= 2; --p) {
    if (p % 3 == 2 && IsPrime(p)) return p;
  }
  return 0;
}

WindowSampler::WindowSampler(const TokenDataset& data, TokenRange range, int ctx_len, uint64_t seed,
                             int32_t vocab_size)
    : data_(data), range_(range), ctx_len_(ctx_len), vocab_size_(vocab_size) {
  if (ctx_len < 1) throw UsageError("context length " + std::to_string(ctx_len) + " is below 1");
  if (range.begin > range.end || range.end > data.size()) {
    throw UsageError(data.prefix() + ": training range " + std::to_string(range.begin) + ".." +
                     std::to_string(range.end) + " is outside its " + std::to_string(data.size()) +
                     " tokens");
  }
  prime_ = MagicPrime(range.size(), ctx_len);
  if (prime_ == 0) {
    throw Error(data.prefix() + ": the training part has " + std::to_string(range.size()) +
                " tokens, too few for windows of " + std::to_string(ctx_len + 1) +
                " (needs at least " + std::to_string(3 * uint64_t(ctx_len) + 1) + ")");
  }
  if (seed == 0) {
    factor_ = static_cast<uint64_t>(static_cast<double>(prime_) * ((std::sqrt(5.0) - 1) / 2));
    start_ = 0;
  } else {
    factor_ = 1 + Mix(seed) % (prime_ - 1);  // any factor in 1..p-1 keeps it a permutation
    start_ = Mix(seed ^ 0x5851f42d4c957f2dULL) % prime_;
  }
}

uint64_t WindowSampler::WindowStart(uint64_t n) const {
  const uint64_t ii = (n % prime_ + 1 + start_) % prime_;
  const uint64_t cube = MulMod(MulMod(ii, ii, prime_), ii, prime_);
  return range_.begin + MulMod(factor_, cube, prime_) * static_cast<uint64_t>(ctx_len_);
}

void WindowSampler::Next(int batch, int32_t* inputs, int32_t* targets) {
  for (int b = 0; b < batch; ++b) {
    const uint64_t start = WindowStart(drawn_);
    const size_t at = static_cast<size_t>(b) * ctx_len_;
    data_.Get(start, ctx_len_, vocab_size_, inputs + at);
    data_.Get(start + 1, ctx_len_, vocab_size_, targets + at);
    ++drawn_;
  }
}

ValidationWindows::ValidationWindows(const TokenDataset& data, TokenRange range, int ctx_len,
                                     int max_windows, int32_t vocab_size)
    : data_(data), range_(range), ctx_len_(ctx_len), vocab_size_(vocab_size) {
  if (ctx_len < 1) throw UsageError("context length " + std::to_string(ctx_len) + " is below 1");
  if (max_windows < 0) throw UsageError("negative number of validation windows");
  if (range.begin > range.end || range.end > data.size()) {
    throw UsageError(data.prefix() + ": validation range " + std::to_string(range.begin) + ".." +
                     std::to_string(range.end) + " is outside its " + std::to_string(data.size()) +
                     " tokens");
  }
  if (range.size() == 0) return;
  slots_ = (range.size() - 1) / static_cast<uint64_t>(ctx_len);
  if (slots_ == 0) {
    throw Error(data.prefix() + ": the validation part has " + std::to_string(range.size()) +
                " tokens, fewer than one window of " + std::to_string(ctx_len + 1));
  }
  count_ = static_cast<int>(std::min<uint64_t>(slots_, static_cast<uint64_t>(max_windows)));
}

uint64_t ValidationWindows::WindowStart(int index) const {
  const uint64_t slot = static_cast<uint64_t>(static_cast<unsigned __int128>(index) * slots_ /
                                              static_cast<uint64_t>(count_));
  return range_.begin + slot * static_cast<uint64_t>(ctx_len_);
}

int ValidationWindows::Fill(int first, int batch, int32_t* inputs, int32_t* targets) const {
  const int n = std::max(0, std::min(batch, count_ - first));
  for (int b = 0; b < n; ++b) {
    const uint64_t start = WindowStart(first + b);
    const size_t at = static_cast<size_t>(b) * ctx_len_;
    data_.Get(start, ctx_len_, vocab_size_, inputs + at);
    data_.Get(start + 1, ctx_len_, vocab_size_, targets + at);
  }
  return n;
}

}  // namespace aviary::train
