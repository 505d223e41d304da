// Placeholder until the safetensors reader lands.
#include "aviary/error.h"
#include "formats/weight_file.h"

namespace aviary {

WeightFile ReadSafetensors(std::span<const uint8_t>, const std::string& name) {
  throw Error(name + ": safetensors files are not supported yet");
}

}  // namespace aviary
