// `aviary pull`: a catalog model, a tokenizer file or any http(s) URL into the cache folder (or a
// folder of your choice), with the tokenizer file the model needs.
#pragma once

#include <optional>
#include <string>

#include "hub/catalog.h"
#include "hub/download.h"

namespace aviary::hub {

struct PullOptions {
  HubSettings hub;           // the cache folder (required unless `dir` is given) and endpoints
  std::string dir;           // empty: hub.cache_dir, in the layout of CachePath()
  DownloadOptions download;  // timeouts, retries, progress; download.log = nullptr is quiet
};

struct PullResult {
  std::string path;            // the model (or tokenizer) file
  std::string tokenizer_path;  // the tokenizer file the model needs; empty when none is needed
  bool downloaded = false;     // false: the file was already there
};

// `target`: a catalog model name ("rwkv7-g1-0.1b"), a tokenizer name ("world-vocab") or an
// http(s) URL. Throws aviary::UsageError for an unknown name or a URL that is not http(s),
// aviary::Error when a download fails.
PullResult Pull(const std::string& target, const PullOptions& options);

PullResult PullModel(const CatalogEntry& entry, const PullOptions& options);
PullResult PullTokenizer(const TokenizerRelease& tokenizer, const PullOptions& options);
// A URL whose file name is a catalog release's gets that release's size, checksum and tokenizer;
// otherwise the tokenizer is told from the downloaded file (its vocabulary size, or a GGUF's own)
// or, failing that, from its name (World / Pile / Raven).
PullResult PullUrl(const std::string& url, const PullOptions& options);

// Where a URL's file goes: `dir`/<file> when `dir` is given; else, in the cache folder,
// <cache>/<owner>/<repo>/<file> for a Hugging Face ".../<owner>/<repo>/resolve/<revision>/.../
// <file>" URL on any host, and <cache>/downloads/<file> for other URLs. Throws
// aviary::UsageError when the URL names no file.
std::string DestinationForUrl(const std::string& url, const std::string& dir,
                              const std::string& cache_dir);

// The `aviary pull --list` table: every catalog entry and tokenizer file, its size, the
// tokenizer it needs and whether it is in the cache ("yes", "partial 45%", "no").
std::string FormatCatalogList(const HubSettings& hub);

}  // namespace aviary::hub
