// Placeholder: aviary convert and quantize land with the issue that adds them.
#include "cli_common.h"

namespace aviary::cli {

void RegisterConvert(CLI::App&) {}

}  // namespace aviary::cli
