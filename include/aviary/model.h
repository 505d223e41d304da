// Loading an RWKV model and running it, one token or a whole sequence at a time.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "aviary/state.h"
#include "aviary/tokenizer.h"

namespace aviary {

enum class Arch : uint32_t { kV4 = 40, kV5_1 = 51, kV5_2 = 52, kV6 = 60, kV7 = 70 };

// "v4", "v5.1", "v5.2", "v6.0", "v7.0".
std::string_view ArchName(Arch arch);

struct ModelInfo {
  std::string path;         // file it was read from
  std::string format;       // e.g. "rwkv.cpp ggmf v101"
  Arch arch = Arch::kV4;
  int n_layer = 0;
  int n_embd = 0;
  int n_head = 0;           // 1 for v4 (no heads)
  int head_size = 0;        // n_embd for v4
  int n_ffn = 0;            // channel-mix hidden width
  int n_vocab = 0;
  std::string main_type;    // the file header's data type, e.g. "Q5_1"
  std::map<std::string, int> tensor_types;  // data type name -> tensor count
  uint64_t n_params = 0;
  uint64_t file_size = 0;
  // How the weights are held: "mmap" (mapped), "read" (read into huge pages; AVIARY_LOAD
  // chooses, see Load) or "memory" (LoadFromMemory).
  std::string load_mode;
  uint64_t fingerprint = 0;  // identifies these exact weights (used by saved states)
  std::shared_ptr<const TokenizerData> tokenizer_data;  // embedded in the file, if any
  std::vector<std::string> notes;  // what the reader converted on the fly
};

class Model {
 public:
  // Reads a model file: memory-mapped, or for files of 512 MiB and more, where the kernel offers
  // transparent huge pages, read into them (faster generation; AVIARY_LOAD=mmap|read|auto
  // overrides). Throws aviary::Error naming the file and the problem.
  static std::unique_ptr<Model> Load(const std::string& path);
  // Same from bytes in memory (the bytes must outlive the model). `name` is used in errors.
  static std::unique_ptr<Model> LoadFromMemory(std::span<const uint8_t> bytes, const std::string& name);

  virtual ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelInfo& info() const { return info_; }

  // The state before any token: the start of every conversation.
  State NewState() const;

  // Feeds `tokens` in sequence mode, updating `state`. If `logits` is non-null it receives
  // n_vocab floats for the last token, or one row per token when `all_positions` is set.
  // Gives the same result as feeding the tokens one at a time. Throws on a token id outside
  // the vocabulary (state unchanged then) or on a state from another model.
  void Eval(std::span<const int32_t> tokens, State& state, std::vector<float>* logits,
            bool all_positions = false) const;

 protected:
  explicit Model(ModelInfo info) : info_(std::move(info)) {}

  // Per-version forward over tokens[0..T) with T <= kMaxChunk. `logits` is nullptr or has
  // room for `T` rows (all_positions) or one row (last token only).
  virtual void Forward(std::span<const int32_t> tokens, float* state, float* logits,
                       bool all_positions) const = 0;
  // Floats of recurrent state per layer, and its initial value (zero except v4's pp = -1e30).
  virtual size_t StateFloatsPerLayer() const = 0;
  virtual void InitLayerState(float* layer_state) const;

 public:
  // Sequence mode processes at most kMaxChunk tokens per forward pass; longer inputs are fed in
  // chunks (same result, bounded scratch memory). Longer chunks hand work to the threads half
  // as often: 128 tokens instead of 64 read 1.10-1.25x faster prompts at 0.1B and 0.4B and
  // 1.02-1.07x at 1.5B (+16 MiB of scratch there); 256 was no faster.
  static constexpr int kMaxChunk = 128;

 protected:
  ModelInfo info_;
};

}  // namespace aviary
