// Loading an RWKV model and running it, one token or a whole sequence at a time.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "aviary/runtime.h"
#include "aviary/state.h"
#include "aviary/tokenizer.h"

namespace aviary {

enum class Arch : uint32_t { kV4 = 40, kV5_1 = 51, kV5_2 = 52, kV6 = 60, kV7 = 70 };

// "v4", "v5.1", "v5.2", "v6.0", "v7.0".
std::string_view ArchName(Arch arch);

struct ModelInfo {
  std::string path;    // file it was read from
  std::string format;  // e.g. "rwkv.cpp ggmf v101"
  Arch arch = Arch::kV4;
  int n_layer = 0;
  int n_embd = 0;
  int n_head = 0;     // 1 for v4 (no heads)
  int head_size = 0;  // n_embd for v4
  int n_ffn = 0;      // channel-mix hidden width
  int n_vocab = 0;
  std::string main_type;                    // the file header's data type, e.g. "Q5_1"
  std::map<std::string, int> tensor_types;  // data type name -> tensor count
  uint64_t n_params = 0;
  uint64_t file_size = 0;
  // How the weights are held: "mmap" (mapped), "read" (read into huge pages; see Load) or
  // "memory" (LoadFromMemory).
  std::string load_mode;
  uint64_t fingerprint = 0;  // identifies these exact weights (used by saved states)
  std::shared_ptr<const TokenizerData> tokenizer_data;  // embedded in the file, if any
  std::vector<std::string> notes;                       // what the reader converted on the fly
};

// One sequence of a batch (Model::EvalBatch): its new tokens, its state (advanced in place) and,
// if non-null, where the logits of its last token go (resized to n_vocab).
struct BatchItem {
  std::span<const int32_t> tokens;  // at least one
  State* state = nullptr;
  std::vector<float>* logits = nullptr;
};

// A loaded model: its weights and the runtime it evaluates on. Eval is const and keeps no state
// between calls (the State carries it), so one model serves many conversations, one Eval at a
// time per runtime at full speed.
class Model {
 public:
  // Reads a model file, held as options.load_mode says (kAuto: memory-mapped, or for files of
  // 512 MiB and more, where the kernel offers transparent huge pages, read into them, which
  // streams faster while generating). Throws aviary::Error naming the file and the problem.
  static std::unique_ptr<Model> Load(const std::string& path, const LoadOptions& options = {});
  // Same from bytes in memory (the bytes must outlive the model; options.load_mode is unused).
  // `name` is used in errors.
  static std::unique_ptr<Model> LoadFromMemory(std::span<const uint8_t> bytes,
                                               const std::string& name,
                                               const LoadOptions& options = {});

  virtual ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelInfo& info() const { return info_; }
  // The runtime Eval runs on: the one given at load, else Runtime::Default().
  Runtime& runtime() const;

  // The state before any token: the start of every conversation.
  virtual State NewState() const = 0;

  // Feeds `tokens` in sequence mode, updating `state`. If `logits` is non-null it receives
  // n_vocab floats for the last token, or one row per token when `all_positions` is set.
  // Gives the same result as feeding the tokens one at a time. Throws on a token id outside
  // the vocabulary (state unchanged then) or on a state from another model.
  virtual void Eval(std::span<const int32_t> tokens, State& state, std::vector<float>* logits,
                    bool all_positions = false) const = 0;

  // Feeds several sequences in one pass over the weights (continuous batching: some items
  // decoding one token, others prefilling a prompt): each item ends exactly as
  // Eval(item.tokens, *item.state, item.logits) alone would leave it, bit for bit, whatever the
  // other items. Everything is checked (tokens, states, no state or logits vector twice) before
  // any state changes; throws as Eval does, naming the item. Items are fed in order, a long one
  // over several passes.
  virtual void EvalBatch(std::span<const BatchItem> items) const;

 protected:
  explicit Model(ModelInfo info) : info_(std::move(info)) {}

  // The checks of EvalBatch that need no knowledge of the state's layout: a state and at least
  // one token per item, token ids in the vocabulary, states of this model, no state or logits
  // vector in two items. Throws UsageError (Error for a token id) naming the item.
  void CheckBatch(std::span<const BatchItem> items) const;

  ModelInfo info_;
  // Null when loaded without a runtime: Eval then leaves the calling thread's current runtime
  // in place, which is Runtime::Default() unless library code installed another.
  std::shared_ptr<Runtime> runtime_;
};

}  // namespace aviary
