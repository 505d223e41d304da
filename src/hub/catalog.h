// The models `aviary pull NAME` knows by name: official RWKV releases on Hugging Face, and the
// two tokenizer files the .pth releases need beside them.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "aviary/cache.h"

namespace aviary::hub {

// The vocabulary file a model needs next to it (none: the file carries its own, or bytes).
enum class Vocab { kNone, kWorld, kNeox };

struct CatalogEntry {
  std::string_view name;         // friendly name: "rwkv7-g1-0.1b"
  std::string_view description;  // "RWKV-7 G1 0.1B"
  std::string_view repo;         // Hugging Face repository: "BlinkDL/rwkv7-g1"
  std::string_view file;         // file in the repository (main branch)
  uint64_t size = 0;             // bytes; 0 = unknown (then X-Linked-Size decides)
  std::string_view sha256;       // lowercase hex; empty = unknown (then X-Linked-ETag decides)
  Vocab vocab = Vocab::kNone;    // tokenizer file it needs
  std::string_view format = "pth";
};

// A tokenizer file, served from a pinned commit of BlinkDL/ChatRWKV on GitHub.
struct TokenizerRelease {
  std::string_view name;  // "world-vocab"
  std::string_view description;
  Vocab vocab;
  std::string_view file;  // "rwkv_vocab_v20230424.txt": the name TokenizerForModel looks for
  std::string_view path;  // under the raw GitHub endpoint: "BlinkDL/ChatRWKV/<commit>/..."
  uint64_t size;
  std::string_view sha256;
};

std::span<const CatalogEntry> Catalog();
std::span<const TokenizerRelease> TokenizerReleases();

// The model entry with this friendly name, or nullptr.
const CatalogEntry* FindCatalogEntry(std::string_view name);
// The model entry whose release file is named `file` (e.g. from a URL), or nullptr.
const CatalogEntry* FindCatalogEntryByFile(std::string_view file);
// The tokenizer release with this friendly name, or nullptr.
const TokenizerRelease* FindTokenizerRelease(std::string_view name);
const TokenizerRelease& TokenizerFor(Vocab vocab);  // vocab != kNone
std::string_view VocabName(Vocab vocab);            // "world", "neox", "-"

// <hub.hf_endpoint>/<repo>/resolve/main/<file, percent-encoded>, and
// <hub.raw_github_endpoint>/<path> (trailing slashes of the endpoints ignored).
std::string DownloadUrl(const CatalogEntry& entry, const HubSettings& hub);
std::string DownloadUrl(const TokenizerRelease& tokenizer, const HubSettings& hub);

// Where pulls put files in the cache: <cache>/<repo>/<file> for models (e.g.
// ~/.cache/aviary/BlinkDL/rwkv7-g1/rwkv7-g1-0.1b-20250307-ctx4096.pth) and
// <cache>/tokenizers/<file> for tokenizer files.
std::string CachePath(const CatalogEntry& entry, const std::string& cache_dir);
std::string CachePath(const TokenizerRelease& tokenizer, const std::string& cache_dir);

// The downloaded file of a catalog model: its cache path, else a file of the same name anywhere
// in the cache. nullopt when it is not there. Throws aviary::Error when the file found has the
// wrong size (an interrupted copy, or another release under the same name).
std::optional<std::string> FindCachedModel(const CatalogEntry& entry, const std::string& cache_dir);

// Percent-encodes a URL path segment (RFC 3986 unreserved characters stay; '%' -> "%25").
std::string EncodePathSegment(std::string_view segment);

}  // namespace aviary::hub
