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
// (`aviary pull --list`) or file name resolved from the cache. Returns the argument unchanged
// when nothing matches (loading then reports the missing file). Throws aviary::Error when the
// argument is a catalog name whose file is not in the cache ("<name>: not downloaded yet: run
// aviary pull <name>") or is there with the wrong size.
std::string ResolveModelArgument(const std::string& argument);

}  // namespace aviary
