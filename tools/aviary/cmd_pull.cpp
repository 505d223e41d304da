// Placeholder: aviary pull land with the issue that adds them.
#include "cli_common.h"

namespace aviary::cli {

void RegisterPull(CLI::App&) {}

}  // namespace aviary::cli
