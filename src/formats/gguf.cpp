// Placeholder until the gguf reader lands.
#include "aviary/error.h"
#include "formats/weight_file.h"

namespace aviary {

WeightFile ReadGguf(std::span<const uint8_t>, const std::string& name) {
  throw Error(name + ": gguf files are not supported yet");
}

}  // namespace aviary
