// Placeholder: aviary tokenize and detokenize land with the issue that adds them.
#include "cli_common.h"

namespace aviary::cli {

void RegisterTokenize(CLI::App&) {}

}  // namespace aviary::cli
