// A training run's checkpoint: the parameters, both Adam moments and what a resume needs to
// continue bit for bit (step, data sampler and RNG states, the run's options), in one folder:
//
//   meta.json                 the index: format and version, config, step, states, options,
//                             and the name, size and CRC-32 of each data file
//   params-<tag>.f32          the flat parameter buffer (ParamLayout order), float32 LE
//   adam_m-<tag>.f32          Adam's first moment, same layout
//   adam_v-<tag>.f32          Adam's second moment, same layout
//
// Saving writes the data files under new names (never over a file a meta.json may name),
// fsyncs them, then replaces meta.json atomically (meta.json.tmp, fsync, rename, fsync of the
// folder) and only then removes the previous files. A save killed at any point leaves the
// previous checkpoint whole and loadable; the next save removes what it left behind.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "tensor/aligned.h"
#include "train/params.h"

namespace aviary::train {

inline constexpr int kCheckpointVersion = 1;

// What the trainer keeps besides the three buffers. The states are opaque here.
struct CheckpointMeta {
  int64_t step = 0;           // optimiser steps done
  std::string rng_state;      // e.g. a serialised std::mt19937_64
  std::string sampler_state;  // e.g. the data sampler's position and its RNG
  // The run's options: a resume compares them with its own (CheckSameRun).
  nlohmann::json options = nlohmann::json::object();
  // Anything else the trainer wants back (tokens seen, best validation loss, ...).
  nlohmann::json extra = nlohmann::json::object();
};

struct Checkpoint {
  ParamLayout layout;
  CheckpointMeta meta;
  AlignedVector<float> params, adam_m, adam_v;  // layout.total_floats() each
};

// Writes the checkpoint into the folder `dir` (created if missing), replacing the one there as
// described above. Throws aviary::Error naming the file on a failed write; the previous
// checkpoint is then still the one in `dir`.
void SaveCheckpoint(const std::string& dir, const ParamLayout& layout, const float* params,
                    const float* adam_m, const float* adam_v, const CheckpointMeta& meta);

// Whether `dir` holds a checkpoint index (meta.json); says nothing about its validity.
bool HasCheckpoint(const std::string& dir);

// Reads and checks everything: the index (format, version, types, config, the layout it was
// written for), each data file's size and CRC-32. With `expected`, the checkpoint must be for
// that layout (sizes compared one by one). Throws aviary::Error, one line naming the file and
// the problem.
Checkpoint LoadCheckpoint(const std::string& dir, const ParamLayout* expected = nullptr);

// Throws aviary::UsageError naming `dir` and the first option that differs between the
// checkpoint's options and the current run's (a key missing on one side differs).
void CheckSameRun(const nlohmann::json& saved, const nlohmann::json& current,
                  const std::string& dir);

// ---- the index alone (what LoadCheckpoint parses first; fuzzed by fuzz/fuzz_checkpoint_meta) ----

struct CheckpointDataFile {
  std::string name;  // a plain file name inside the folder
  uint64_t bytes = 0;
  uint32_t crc32 = 0;
};

struct CheckpointIndex {
  ParamLayout layout;  // ParamLayout::Rwkv7 of the stored config
  CheckpointMeta meta;
  CheckpointDataFile params, adam_m, adam_v;
};

// Parses and validates meta.json's text; `name` starts every error message.
CheckpointIndex ParseCheckpointIndex(std::string_view text, const std::string& name);

}  // namespace aviary::train
