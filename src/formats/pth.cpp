// Placeholder until the pth reader lands.
#include "aviary/error.h"
#include "formats/weight_file.h"

namespace aviary {

WeightFile ReadPth(std::span<const uint8_t>, const std::string& name) {
  throw Error(name + ": pth files are not supported yet");
}

}  // namespace aviary
