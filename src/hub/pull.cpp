#include "hub/pull.h"

#include <curl/curl.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <set>
#include <system_error>
#include <vector>

#include "aviary/cache.h"
#include "aviary/error.h"
#include "aviary/model.h"

namespace aviary::hub {
namespace {

// The variables that move each host (read by the CLI into HubSettings), named when it is down.
constexpr const char* kModelMirrorHint = "AVIARY_HF_ENDPOINT selects a Hugging Face mirror";
constexpr const char* kVocabularyMirrorHint =
    "AVIARY_RAW_GITHUB_ENDPOINT selects a mirror of raw.githubusercontent.com";

namespace fs = std::filesystem;

void Note(const PullOptions& options, const std::string& text) {
  if (!options.download.log || options.download.progress == ProgressStyle::kNone) return;
  std::fprintf(options.download.log, "%s\n", text.c_str());
  std::fflush(options.download.log);
}

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::optional<uint64_t> FileSize(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return std::nullopt;
  const uintmax_t size = fs::file_size(path, ec);
  if (ec) return std::nullopt;
  return size;
}

// True when `path` already holds the file (of `expected` bytes when known); removes a file of
// the wrong size so that it is downloaded again.
bool AlreadyThere(const std::string& path, uint64_t expected, const PullOptions& options) {
  const std::optional<uint64_t> size = FileSize(path);
  if (!size) return false;
  if (expected == 0 || *size == expected) return true;
  Note(options, path + " has " + std::to_string(*size) + " bytes, expected " +
                    std::to_string(expected) + ": downloading it again");
  std::error_code ec;
  fs::remove(path, ec);
  return false;
}

// The tokenizer file beside a model pulled to `model_path`: reuses one already next to the model
// or in the cache, else downloads it into the pull's root.
std::string EnsureTokenizer(const TokenizerRelease& tok, const PullOptions& options,
                            const std::string& model_path) {
  const std::string file(tok.file);
  const std::string dest = options.dir.empty() ? CachePath(tok, options.hub.cache_dir)
                                               : (fs::path(options.dir) / file).string();
  if (AlreadyThere(dest, tok.size, options)) return dest;
  const fs::path beside = fs::path(model_path).parent_path() / file;
  if (FileSize(beside.string()) == tok.size) return beside.string();
  if (options.dir.empty()) {
    auto found = FindInCache(file, options.hub.cache_dir);
    if (found && FileSize(*found) == tok.size) return *found;
  }
  DownloadOptions d = options.download;
  d.expected_size = tok.size;
  d.expected_sha256 = std::string(tok.sha256);
  d.label = file;
  d.unreachable_hint = kVocabularyMirrorHint;
  return DownloadFile(DownloadUrl(tok, options.hub), dest, d).path;
}

// Which vocabulary file a downloaded model needs; nullopt when it cannot be told.
std::optional<Vocab> DetectVocab(const std::string& path) {
  const std::string name = Lower(fs::path(path).filename().string());
  if (fs::path(name).extension() == ".gguf") return Vocab::kNone;  // carries its vocabulary
  try {
    const std::unique_ptr<Model> model = Model::Load(path);
    const ModelInfo& info = model->info();
    if (info.tokenizer_data || info.n_vocab == 256) return Vocab::kNone;
    if (info.n_vocab == 65536) return Vocab::kWorld;
    if (info.n_vocab == 50277 || info.n_vocab == 50304) return Vocab::kNeox;
    return std::nullopt;
  } catch (const Error&) {
    // Not loadable here (yet): go by the release naming.
  }
  if (name.find("world") != std::string::npos || name.rfind("rwkv7-g", 0) == 0)
    return Vocab::kWorld;
  if (name.find("pile") != std::string::npos || name.find("raven") != std::string::npos) {
    return Vocab::kNeox;
  }
  return std::nullopt;
}

std::string PercentDecode(const std::string& s) {
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && hex(s[i + 1]) >= 0 && hex(s[i + 2]) >= 0) {
      out += static_cast<char>(hex(s[i + 1]) * 16 + hex(s[i + 2]));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

bool ValidName(const std::string& s) {
  return !s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos &&
         s.find('\0') == std::string::npos;
}

std::vector<std::string> Suggestions(const std::string& target) {
  std::vector<std::string> out;
  const std::string t = Lower(target);
  for (const CatalogEntry& e : Catalog()) {
    if (out.size() < 4 && std::string(e.name).find(t) != std::string::npos)
      out.emplace_back(e.name);
  }
  return out;
}

// Pulls go to options.dir, else the cache folder: one of them must be known.
void RequireFolder(const PullOptions& options) {
  if (options.dir.empty() && options.hub.cache_dir.empty()) {
    throw UsageError("no folder to pull into: no cache folder is set and no --dir given");
  }
}

}  // namespace

std::string DestinationForUrl(const std::string& url, const std::string& dir,
                              const std::string& cache_dir) {
  std::string path;
  CURLU* u = curl_url();
  if (u && curl_url_set(u, CURLUPART_URL, url.c_str(), 0) == CURLUE_OK) {
    char* p = nullptr;
    if (curl_url_get(u, CURLUPART_PATH, &p, 0) == CURLUE_OK && p) {
      path = p;
      curl_free(p);
    }
  }
  curl_url_cleanup(u);
  std::vector<std::string> parts;
  size_t start = 0;
  while (start <= path.size()) {
    const size_t slash = path.find('/', start);
    // Split first, then decode: an encoded "%2F" must not make a folder.
    const std::string part = PercentDecode(
        path.substr(start, slash == std::string::npos ? std::string::npos : slash - start));
    if (!part.empty()) parts.push_back(part);
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  const std::string& root = cache_dir;
  if (parts.empty() || !ValidName(parts.back()) || (!path.empty() && path.back() == '/')) {
    throw UsageError("cannot tell a file name from the URL " + url);
  }
  const std::string& file = parts.back();
  if (!dir.empty()) return (fs::path(dir) / file).string();
  if (parts.size() >= 5 && parts[2] == "resolve" && ValidName(parts[0]) && ValidName(parts[1])) {
    return (fs::path(root) / parts[0] / parts[1] / file).string();
  }
  return (fs::path(root) / "downloads" / file).string();
}

PullResult PullModel(const CatalogEntry& entry, const PullOptions& options) {
  RequireFolder(options);
  PullResult result;
  const std::string dest = options.dir.empty()
                               ? CachePath(entry, options.hub.cache_dir)
                               : (fs::path(options.dir) / std::string(entry.file)).string();
  std::optional<std::string> have;
  if (AlreadyThere(dest, entry.size, options)) {
    have = dest;
  } else if (options.dir.empty()) {
    try {
      have = FindCachedModel(entry, options.hub.cache_dir);  // a copy elsewhere in the cache counts
    } catch (const Error&) {
      // wrong size: download a good copy to the usual place
    }
  }
  if (have) {
    Note(options, std::string(entry.name) + ": already downloaded");
    result.path = *have;
  } else {
    DownloadOptions d = options.download;
    d.expected_size = entry.size;
    d.expected_sha256 = std::string(entry.sha256);
    d.label = std::string(entry.name);
    d.unreachable_hint = kModelMirrorHint;
    result.path = DownloadFile(DownloadUrl(entry, options.hub), dest, d).path;
    result.downloaded = true;
  }
  if (entry.vocab != Vocab::kNone) {
    result.tokenizer_path = EnsureTokenizer(TokenizerFor(entry.vocab), options, result.path);
  }
  return result;
}

PullResult PullTokenizer(const TokenizerRelease& tokenizer, const PullOptions& options) {
  RequireFolder(options);
  PullResult result;
  const std::string dest = options.dir.empty()
                               ? CachePath(tokenizer, options.hub.cache_dir)
                               : (fs::path(options.dir) / std::string(tokenizer.file)).string();
  if (AlreadyThere(dest, tokenizer.size, options)) {
    Note(options, std::string(tokenizer.name) + ": already downloaded");
    result.path = dest;
    return result;
  }
  DownloadOptions d = options.download;
  d.expected_size = tokenizer.size;
  d.expected_sha256 = std::string(tokenizer.sha256);
  d.label = std::string(tokenizer.file);
  d.unreachable_hint = kVocabularyMirrorHint;
  result.path = DownloadFile(DownloadUrl(tokenizer, options.hub), dest, d).path;
  result.downloaded = true;
  return result;
}

PullResult PullUrl(const std::string& url, const PullOptions& options) {
  RequireFolder(options);
  const std::string scheme = Lower(url.substr(0, url.find("://")));
  if (url.find("://") == std::string::npos || (scheme != "http" && scheme != "https")) {
    throw UsageError("only http:// and https:// URLs can be pulled, not " + url);
  }
  PullResult result;
  const std::string dest = DestinationForUrl(url, options.dir, options.hub.cache_dir);
  const std::string file = fs::path(dest).filename().string();
  const CatalogEntry* entry = FindCatalogEntryByFile(file);
  if (AlreadyThere(dest, entry ? entry->size : 0, options)) {
    Note(options, dest + ": already downloaded (delete it to download again)");
    result.path = dest;
  } else {
    DownloadOptions d = options.download;
    if (entry) {
      d.expected_size = entry->size;
      d.expected_sha256 = std::string(entry->sha256);
    }
    d.label = file;
    result.path = DownloadFile(url, dest, d).path;
    result.downloaded = true;
  }
  const std::optional<Vocab> vocab =
      entry ? std::optional<Vocab>(entry->vocab) : DetectVocab(result.path);
  if (!vocab) {
    Note(options,
         "note: cannot tell which tokenizer " + file +
             " needs; if it has none inside, "
             "run aviary pull world-vocab (RWKV World) or neox-20b-tokenizer (Pile, Raven)");
  } else if (*vocab != Vocab::kNone) {
    result.tokenizer_path = EnsureTokenizer(TokenizerFor(*vocab), options, result.path);
  }
  return result;
}

PullResult Pull(const std::string& target, const PullOptions& options) {
  if (target.find("://") != std::string::npos) return PullUrl(target, options);
  if (const CatalogEntry* entry = FindCatalogEntry(target)) return PullModel(*entry, options);
  if (const TokenizerRelease* tok = FindTokenizerRelease(target))
    return PullTokenizer(*tok, options);
  std::string message = "unknown model '" + target + "'";
  const std::vector<std::string> close = Suggestions(target);
  if (!close.empty()) {
    message += " (did you mean ";
    for (size_t i = 0; i < close.size(); ++i) message += (i ? ", " : "") + close[i];
    message += "?)";
  }
  throw UsageError(message + "; aviary pull --list shows the names, or give an https:// URL");
}

std::string FormatCatalogList(const HubSettings& hub) {
  namespace fs = std::filesystem;
  // File names anywhere in the cache, in one walk.
  std::set<std::string> cached_names;
  std::error_code ec;
  const fs::path root = hub.cache_dir;
  if (!hub.cache_dir.empty() && fs::is_directory(root, ec)) {
    for (auto it = fs::recursive_directory_iterator(root, ec); !ec && it != fs::end(it);
         it.increment(ec)) {
      if (it->is_regular_file(ec)) cached_names.insert(it->path().filename().string());
    }
  }
  auto status = [&](const std::string& canonical, std::string_view file, uint64_t size) {
    if (const auto have = FileSize(canonical)) {
      return size == 0 || *have == size ? std::string("yes") : std::string("bad size");
    }
    if (cached_names.count(std::string(file))) return std::string("yes");
    if (const auto part = FileSize(canonical + ".part")) {
      if (size) return "partial " + std::to_string(*part * 100 / size) + "%";
      return "partial " + FormatBytes(*part);
    }
    return std::string("no");
  };
  char line[512];
  std::string out;
  std::snprintf(line, sizeof line, "%-18s %-24s %10s  %-5s  %-11s %s\n", "NAME", "MODEL", "SIZE",
                "VOCAB", "CACHED", "FILE");
  out += line;
  for (const CatalogEntry& e : Catalog()) {
    const std::string size = e.size ? FormatBytes(e.size) : "?";
    std::snprintf(line, sizeof line, "%-18s %-24s %10s  %-5s  %-11s %s/%s\n",
                  std::string(e.name).c_str(), std::string(e.description).c_str(), size.c_str(),
                  std::string(VocabName(e.vocab)).c_str(),
                  status(CachePath(e, hub.cache_dir), e.file, e.size).c_str(),
                  std::string(e.repo).c_str(), std::string(e.file).c_str());
    out += line;
  }
  out += "\nTokenizer files (pulled with the models that need them):\n";
  for (const TokenizerRelease& t : TokenizerReleases()) {
    std::snprintf(line, sizeof line, "%-18s %-24s %10s  %-5s  %-11s %s\n",
                  std::string(t.name).c_str(), std::string(t.file).c_str(),
                  FormatBytes(t.size).c_str(), std::string(VocabName(t.vocab)).c_str(),
                  status(CachePath(t, hub.cache_dir), t.file, t.size).c_str(),
                  DownloadUrl(t, hub).c_str());
    out += line;
  }
  out += "\ncache: " + hub.cache_dir + " (set AVIARY_CACHE_DIR to move it)\n";
  out += "models from " + hub.hf_endpoint +
         " (set AVIARY_HF_ENDPOINT for a mirror); size ? = unknown, "
         "checked against Hugging Face's X-Linked-Size\n";
  return out;
}

}  // namespace aviary::hub
