// Where downloaded models and vocabularies live.
#pragma once

#include <optional>
#include <string>

namespace aviary {

// Where pulled files live and where pulls fetch them from. The library reads no environment:
// the aviary CLI fills this from AVIARY_CACHE_DIR (else XDG_CACHE_HOME/aviary, else
// HOME/.cache/aviary), AVIARY_HF_ENDPOINT and AVIARY_RAW_GITHUB_ENDPOINT.
struct HubSettings {
  std::string cache_dir;  // empty: no cache folder (nothing is found in it)
  std::string hf_endpoint = "https://huggingface.co";  // models; a trailing '/' is ignored
  std::string raw_github_endpoint = "https://raw.githubusercontent.com";  // tokenizer files
};

// The path of `file_name` if it is in the folder `cache_dir` (searched recursively, first
// match); nullopt when cache_dir is empty or not a folder.
std::optional<std::string> FindInCache(const std::string& file_name, const std::string& cache_dir);

// The model file a --model argument names: the path itself when it exists, else a catalog name
// (`aviary pull --list`) or file name resolved from the cache. Returns the argument unchanged
// when nothing matches (loading then reports the missing file). Throws aviary::Error when the
// argument is a catalog name whose file is not in the cache ("<name>: not downloaded yet: run
// aviary pull <name>") or is there with the wrong size.
std::string ResolveModelArgument(const std::string& argument, const std::string& cache_dir);

}  // namespace aviary
