#include "aviary/cache.h"

#include <cstdlib>
#include <filesystem>
#include <system_error>

#include "aviary/error.h"
#include "hub/catalog.h"
#include "hub/download.h"

namespace aviary {

namespace fs = std::filesystem;

std::string CacheDir() {
  if (const char* dir = std::getenv("AVIARY_CACHE_DIR"); dir && *dir) return dir;
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg) {
    return std::string(xdg) + "/aviary";
  }
  const char* home = std::getenv("HOME");
  return std::string(home && *home ? home : ".") + "/.cache/aviary";
}

std::optional<std::string> FindInCache(const std::string& file_name) {
  std::error_code ec;
  const fs::path root = CacheDir();
  if (!fs::is_directory(root, ec)) return std::nullopt;
  for (auto it = fs::recursive_directory_iterator(root, ec); !ec && it != fs::end(it);
       it.increment(ec)) {
    if (it->is_regular_file(ec) && it->path().filename() == file_name) return it->path().string();
  }
  return std::nullopt;
}

std::string ResolveModelArgument(const std::string& argument) {
  std::error_code ec;
  if (argument.empty() || fs::exists(argument, ec)) return argument;
  if (argument.find('/') == std::string::npos) {
    if (const hub::CatalogEntry* entry = hub::FindCatalogEntry(argument)) {
      if (auto found = hub::FindCachedModel(*entry)) return *found;
      throw Error(argument + ": not downloaded yet: run aviary pull " + argument + " (" +
                  std::string(entry->description) + ", " +
                  (entry->size ? hub::FormatBytes(entry->size) : "size unknown") +
                  ", into " + CacheDir() + ")");
    }
    if (auto found = FindInCache(argument)) return *found;
  }
  return argument;
}

}  // namespace aviary
