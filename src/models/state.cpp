// State files: "AVSTATE1" magic, then little-endian u32 format version, u32 n_layer,
// u64 model fingerprint, u64 tokens seen, u64 float count, the floats, and a u64 FNV-1a
// checksum of everything before it.
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <vector>

#include "aviary/error.h"
#include "aviary/model.h"
#include "aviary/state.h"
#include "formats/output_file.h"

namespace aviary {
namespace {

constexpr char kMagic[8] = {'A', 'V', 'S', 'T', 'A', 'T', 'E', '1'};
constexpr uint32_t kFormatVersion = 1;
constexpr size_t kHeaderBytes = sizeof kMagic + 4 + 4 + 8 + 8 + 8;

struct Checksum {
  uint64_t h = 0xcbf29ce484222325ull;
  void Add(const void* data, size_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  }
};

}  // namespace

float State::MaxAbsDiff(const State& other) const {
  if (fingerprint_ != other.fingerprint_ || data_.size() != other.data_.size()) {
    return std::numeric_limits<float>::infinity();
  }
  float m = 0.0f;
  for (size_t i = 0; i < data_.size(); ++i) {
    const float d = std::fabs(data_[i] - other.data_[i]);
    if (!(d <= m)) m = d;  // also propagates NaN
  }
  return m;
}

std::vector<uint8_t> State::Serialize() const {
  const uint64_t count = data_.size();
  std::vector<uint8_t> bytes(kHeaderBytes + count * sizeof(float) + 8);
  uint8_t* p = bytes.data();
  auto put = [&](const void* src, size_t n) {
    std::memcpy(p, src, n);
    p += n;
  };
  put(kMagic, sizeof kMagic);
  put(&kFormatVersion, 4);
  put(&n_layer_, 4);
  put(&fingerprint_, 8);
  put(&tokens_seen_, 8);
  put(&count, 8);
  put(data_.data(), count * sizeof(float));
  Checksum sum;
  sum.Add(bytes.data(), bytes.size() - 8);
  put(&sum.h, 8);
  return bytes;
}

void State::Save(const std::string& path) const { WriteFileAtomically(path, Serialize()); }

State State::Load(const std::string& path, const Model& model) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open state file");
  // A valid file has exactly this many bytes: read one more to detect trailing bytes, and
  // never more (an arbitrary file must not make us allocate its size).
  const size_t total = kHeaderBytes + model.NewState().data_.size() * sizeof(float) + 8;
  std::vector<uint8_t> bytes(total + 1);
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  bytes.resize(static_cast<size_t>(in.gcount()));
  return Deserialize(bytes, model, path);
}

State State::Deserialize(std::span<const uint8_t> bytes, const Model& model,
                         const std::string& name) {
  const State fresh = model.NewState();
  const size_t expected_floats = fresh.data_.size();
  const size_t header = kHeaderBytes;
  const size_t total = header + expected_floats * sizeof(float) + 8;
  const size_t got = bytes.size();
  if (got < sizeof kMagic || std::memcmp(bytes.data(), kMagic, sizeof kMagic) != 0) {
    throw Error(name + ": not an aviary state file");
  }
  if (got < header) throw Error(name + ": state file is truncated");
  uint32_t version, n_layer;
  uint64_t fingerprint, tokens, count;
  const uint8_t* p = bytes.data() + sizeof kMagic;
  std::memcpy(&version, p, 4);
  std::memcpy(&n_layer, p + 4, 4);
  std::memcpy(&fingerprint, p + 8, 8);
  std::memcpy(&tokens, p + 16, 8);
  std::memcpy(&count, p + 24, 8);
  if (version != kFormatVersion) {
    throw Error(name + ": state file format version " + std::to_string(version) +
                " is not supported (expected " + std::to_string(kFormatVersion) + ")");
  }
  if (fingerprint != fresh.fingerprint_ || n_layer != fresh.n_layer_ || count != expected_floats) {
    throw Error(name + ": state was saved from a different model than " + model.info().path);
  }
  if (got != total) throw Error(name + ": state file is truncated or has trailing bytes");
  Checksum sum;
  sum.Add(bytes.data(), total - 8);
  uint64_t stored;
  std::memcpy(&stored, bytes.data() + total - 8, 8);
  if (stored != sum.h) throw Error(name + ": state file is corrupt (checksum mismatch)");
  State s = fresh;
  s.tokens_seen_ = tokens;
  std::memcpy(s.data_.data(), bytes.data() + header, expected_floats * sizeof(float));
  return s;
}

}  // namespace aviary
