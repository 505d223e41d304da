// Where downloaded models and vocabularies live.
#pragma once

#include <optional>
#include <string>

namespace aviary {

// $AVIARY_CACHE_DIR, else $XDG_CACHE_HOME/aviary, else $HOME/.cache/aviary. Not created here.
std::string CacheDir();

// The path of `file_name` if it is in the cache folder (searched recursively, first match).
std::optional<std::string> FindInCache(const std::string& file_name);

// The model file a --model argument names: the path itself when it exists, else a catalog name
// or file name resolved from the cache. Returns the argument unchanged when nothing matches
// (loading then reports the missing file).
std::string ResolveModelArgument(const std::string& argument);

}  // namespace aviary
