#include "aviary/cache.h"

#include <filesystem>
#include <system_error>

#include "aviary/error.h"
#include "hub/catalog.h"
#include "hub/download.h"

namespace aviary {

namespace fs = std::filesystem;

std::optional<std::string> FindInCache(const std::string& file_name, const std::string& cache_dir) {
  std::error_code ec;
  const fs::path root = cache_dir;
  if (cache_dir.empty() || !fs::is_directory(root, ec)) return std::nullopt;
  for (auto it = fs::recursive_directory_iterator(root, ec); !ec && it != fs::end(it);
       it.increment(ec)) {
    if (it->is_regular_file(ec) && it->path().filename() == file_name) return it->path().string();
  }
  return std::nullopt;
}

std::string ResolveModelArgument(const std::string& argument, const std::string& cache_dir) {
  std::error_code ec;
  if (argument.empty() || fs::exists(argument, ec)) return argument;
  if (argument.find('/') == std::string::npos) {
    if (const hub::CatalogEntry* entry = hub::FindCatalogEntry(argument)) {
      if (auto found = hub::FindCachedModel(*entry, cache_dir)) return *found;
      throw Error(argument + ": not downloaded yet: run aviary pull " + argument + " (" +
                  std::string(entry->description) + ", " +
                  (entry->size ? hub::FormatBytes(entry->size) : "size unknown") + ", into " +
                  (cache_dir.empty() ? "the cache folder" : cache_dir) + ")");
    }
    if (auto found = FindInCache(argument, cache_dir)) return *found;
  }
  return argument;
}

}  // namespace aviary
