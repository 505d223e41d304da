// Integers read from JSON files (adapter descriptions, checkpoint options, dataset manifests).
// nlohmann's get<int>() / get<uint64_t>() on a JSON float converts with a plain C++ cast, which
// is undefined behaviour when the value is outside the target type (1e84 as an int), and on a
// wider integer it silently wraps. Readers of files take integers through JsonInteger, which
// accepts only JSON integers inside [lo, hi].
#pragma once

#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>

namespace aviary {

// The value as an integer when it is a JSON integer within [lo, hi]; nullopt otherwise.
inline std::optional<int64_t> JsonInteger(const nlohmann::json& v, int64_t lo, int64_t hi) {
  if (v.is_number_unsigned()) {
    const uint64_t x = v.get<uint64_t>();
    if (x > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    const int64_t s = static_cast<int64_t>(x);
    if (s < lo || s > hi) return std::nullopt;
    return s;
  }
  if (!v.is_number_integer()) return std::nullopt;
  const int64_t x = v.get<int64_t>();
  if (x < lo || x > hi) return std::nullopt;
  return x;
}

// A JSON integer that fits a uint64_t (fingerprints, byte counts); nullopt otherwise.
inline std::optional<uint64_t> JsonUnsigned(const nlohmann::json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() >= 0) return static_cast<uint64_t>(v.get<int64_t>());
  return std::nullopt;
}

}  // namespace aviary
