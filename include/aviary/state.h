// The recurrent state of a model: a fixed-size value that can be cloned, compared and saved.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace aviary {

class Model;
class RwkvModel;

class State {
 public:
  State() = default;

  // Identity of the model the state belongs to.
  uint64_t model_fingerprint() const { return fingerprint_; }
  // Tokens fed since the state was created.
  uint64_t tokens_seen() const { return tokens_seen_; }
  size_t size_bytes() const { return data_.size() * sizeof(float); }

  const std::vector<float>& data() const { return data_; }
  std::vector<float>& data() { return data_; }

  bool operator==(const State& other) const = default;
  // Largest |a - b| over all elements; infinity when shapes or models differ.
  float MaxAbsDiff(const State& other) const;

  // Writes a versioned file holding the model's identity. Throws aviary::Error on I/O failure.
  void Save(const std::string& path) const;
  // The bytes Save writes; Deserialize reads them back.
  std::vector<uint8_t> Serialize() const;
  // Reads a file written by Save; refuses a state saved from another model.
  static State Load(const std::string& path, const Model& model);
  // Same from the bytes of such a file; `name` starts every error message. Validates every
  // field before use (safe on arbitrary bytes).
  static State Deserialize(std::span<const uint8_t> bytes, const Model& model,
                           const std::string& name);

 private:
  friend class RwkvModel;  // the models (src/models) create and advance states
  uint64_t fingerprint_ = 0;
  uint64_t tokens_seen_ = 0;
  uint32_t n_layer_ = 0;
  std::vector<float> data_;
};

}  // namespace aviary
