// The trainable parameters of an RWKV-7 model: one flat float buffer holding every tensor, and
// the table that names each tensor's place in it. Gradients and both Adam moments use the same
// layout, so the optimiser, gradient clipping and summing gradients across processes are loops
// over one array; a tensor can be frozen by its entry alone.
//
// Names are BlinkDL's (the names RWKV-LM's model.py gives and its .pth files hold). Shapes are
// the ones aviary's kernels want, which differ from the .pth in two ways the exporter undoes:
//   - the low-rank matrices w1, a1, v1, g1 (.pth (C, D)) and w2, a2, v2, g2 (.pth (D, C)) are
//     stored transposed, [out, in] like every nn.Linear weight, so that every product in the
//     model is y = x W^T over rows of tokens (MatMul) with the same two backward products;
//   - the (1, 1, C) vectors are stored as (C).
// Within a layer, x_r x_w x_k x_v x_a x_g are adjacent in that order: together they are the
// (6, C) array the inference code calls x_rwkvag.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace aviary::train {

// The sizes of an RWKV-7 model. The low-rank widths follow RWKV-LM's model.py:
// max(32, round(k sqrt(C) / 32) * 32) with k = 2.5 (decay, a), 1.7 (v), 5 (gate).
struct Rwkv7Config {
  int n_layer = 0;
  int n_embd = 0;      // C
  int head_size = 64;  // N; H = C / N heads
  int vocab = 0;       // V
  int n_ffn = 0;       // F, 4 C in every official RWKV-7
  int d_decay = 0, d_aaa = 0, d_mv = 0, d_gate = 0;

  int n_head() const { return n_embd / head_size; }
  // The official sizes for L layers of width C (head size 64, or C when C < 64).
  static Rwkv7Config Official(int n_layer, int n_embd, int vocab);
  // Throws aviary::Error naming the first size that cannot be trained (zero, negative, not a
  // multiple of the head size, absurdly large).
  void Validate() const;
};

// How AdamW treats a tensor (RWKV-LM's configure_optimizers groups).
enum class ParamGroup {
  kNoDecay,   // learning rate x1, no weight decay: vectors, norms, low-rank matrices, emb
  kDoubleLr,  // att.w0: learning rate x2, no weight decay
  kDecay,     // 2-D ".weight" matrices: weight decay when it is enabled
};

struct ParamEntry {
  std::string name;                // "blocks.3.att.key.weight"
  std::vector<int64_t> shape;      // aviary's layout (see above)
  std::vector<int64_t> pth_shape;  // the shape in a BlinkDL .pth
  bool transposed_in_pth = false;  // stored [out, in] here, [in, out] in the .pth
  size_t offset = 0;               // in floats, into the flat buffer
  size_t size = 0;                 // floats
  ParamGroup group = ParamGroup::kNoDecay;
  bool trainable = true;  // false: frozen (its gradient is not computed into, Adam skips it)
};

// The large matrices of an RWKV-7 layer, in this order everywhere (the graph's products, LoRA
// targets, a frozen base's tensors): names as BlinkDL's modules (and BlinkDL/RWKV-PEFT's
// --lora targets) spell them, each "blocks.N.<name>.weight" [out, in].
inline constexpr int kRwkv7LayerMatrices = 6;
inline constexpr const char* kRwkv7MatrixNames[kRwkv7LayerMatrices] = {
    "att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"};
// Whether `name` is one of kRwkv7MatrixNames (a LoRA target).
inline bool IsRwkv7MatrixName(std::string_view name) {
  for (const char* m : kRwkv7MatrixNames) {
    if (name == m) return true;
  }
  return false;
}
// Matrix m's [out, in] shape in a model of config c.
std::pair<int64_t, int64_t> Rwkv7MatrixShape(const Rwkv7Config& c, int m);

// The table of entries for one model, in the flat buffer's order.
class ParamLayout {
 public:
  // Every tensor of the model (full training).
  static ParamLayout Rwkv7(const Rwkv7Config& config);
  // Every tensor except the large matrices (emb, head and the six per layer): the part of a
  // frozen base that is widened to float (LoRA and state tuning keep the rest as stored).
  static ParamLayout Rwkv7Small(const Rwkv7Config& config);
  // LoRA adapters for the matrices named in `targets` (kRwkv7MatrixNames) in every layer, as
  // BlinkDL/RWKV-PEFT names them: "blocks.N.att.key.lora_A" (rank, in) and "...lora_B" (out,
  // rank); the product is W x + scale B A x.
  static ParamLayout Rwkv7Lora(const Rwkv7Config& config, int rank,
                               const std::vector<std::string>& targets);
  // The initial wkv state of every layer, as RWKV-PEFT's state tuning names it:
  // "blocks.N.att.time_state" (H, N, N), each head's matrix indexed as the inference state's.
  static ParamLayout Rwkv7State(const Rwkv7Config& config);

  const Rwkv7Config& config() const { return config_; }
  // What the layout holds: "full" (Rwkv7), "small" (Rwkv7Small), "lora" (Rwkv7Lora, with its
  // rank and targets) or "state" (Rwkv7State); a checkpoint records it to rebuild the layout.
  const std::string& tune() const { return tune_; }
  int lora_rank() const { return lora_rank_; }
  const std::vector<std::string>& lora_targets() const { return lora_targets_; }
  const std::vector<ParamEntry>& entries() const { return entries_; }
  std::vector<ParamEntry>& entries() { return entries_; }
  size_t total_floats() const { return total_; }
  // nullptr when there is no such tensor.
  const ParamEntry* Find(const std::string& name) const;
  // Throws aviary::Error when there is no such tensor.
  const ParamEntry& Get(const std::string& name) const;

 private:
  Rwkv7Config config_;
  std::string tune_ = "full";
  int lora_rank_ = 0;
  std::vector<std::string> lora_targets_;
  std::vector<ParamEntry> entries_;
  size_t total_ = 0;
};

// Pointers into one flat buffer (parameters, or gradients, or a moment) by role, for the
// forward and backward passes. Shapes in aviary's layout; D* = the low-rank widths. A tensor
// the layout does not hold (the large matrices of Rwkv7Small) is null.
struct Rwkv7Tensors {
  struct Layer {
    float *ln1_w, *ln1_b, *ln2_w, *ln2_b;  // (C)
    float* ln0_w = nullptr;                // (C), layer 0 only
    float* ln0_b = nullptr;
    float* x_rwkvag;      // (6, C) x_r x_w x_k x_v x_a x_g
    float *w0, *a0, *v0;  // (C)
    float *w1, *w2;       // (Dd, C), (C, Dd)
    float *a1, *a2;       // (Da, C), (C, Da)
    float *v1, *v2;       // (Dv, C), (C, Dv); unused in layer 0 (present in every .pth)
    float *g1, *g2;       // (Dg, C), (C, Dg)
    float *k_k, *k_a;     // (C)
    float* r_k;           // (H, N)
    float *receptance, *key, *value, *output;  // (C, C)
    float *ln_x_w, *ln_x_b;                    // (C)
    float* ffn_x_k;                            // (C)
    float* ffn_key;                            // (F, C)
    float* ffn_value;                          // (C, F)
  };
  float* emb;  // (V, C)
  std::vector<Layer> layers;
  float *ln_out_w, *ln_out_b;  // (C)
  float* head;                 // (V, C)

  static Rwkv7Tensors Bind(const ParamLayout& layout, float* base);
  // Every pointer null, for `n_layer` layers: the gradients of a frozen model (not computed).
  static Rwkv7Tensors None(int n_layer);
};

// State tuning's parameters (a Rwkv7State layout: entry l is layer l's wkv state) and one
// sequence's state in the inference layout (models/stages.h HeadLayerState: per layer the time
// mix's last input, the wkv state, the channel mix's last input). The token-shift parts are not
// tuned: TunedStateToSequence leaves them as they are.
void TunedStateToSequence(const ParamLayout& layout, const float* params, float* sequence_state);
// grads (the layout's buffer) += the wkv parts of one sequence's state gradient.
void AddSequenceStateGradient(const ParamLayout& layout, const float* d_sequence_state,
                              float* grads);

}  // namespace aviary::train
