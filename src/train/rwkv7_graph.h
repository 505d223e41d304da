// One training step's computation for RWKV-7: the forward pass over B sequences of T tokens,
// keeping what the backward pass needs, then the backward pass into parameter gradients.
//
// The forward pass is the inference code's: the same kernels (LayerNorm, MatMul, Wkv7Seq, the
// activations) and RWKV-7's shared row stages (models/rwkv7_stages.h), so a trained model's
// logits in `aviary` are the ones training computed. The backward of each stage sits next to
// its forward in ops.h.
//
// State: each sequence carries RWKV's recurrent state in the inference layout (per layer: the
// time mix's last normed input (C), the wkv state (H, N, N), the channel mix's last normed
// input (C); models/stages.h HeadLayerState), so a long sequence can be trained as consecutive
// chunks: Forward takes the state the previous chunk ended in and gives the one it ends in;
// Backward takes the gradient of the loss with respect to the end state and gives the one
// with respect to the start state.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "tensor/aligned.h"
#include "train/linear.h"
#include "train/params.h"

namespace aviary::train {

struct FrozenRwkv7;

// The loss of one forward pass: cross-entropy summed over its tokens (the mean is sum /
// tokens) and the number of tokens whose prediction was right (argmax == target).
struct LossSum {
  double sum = 0;
  int64_t tokens = 0;
  int64_t correct = 0;
};

// What one layer's forward pass keeps for its backward pass, (M, ...) with M = B T rows in
// sequence-major order. Everything else the backward needs (the normed inputs' statistics,
// the token-shifted rows, the mixed inputs, the channel mix's squared activation) it
// recomputes from these, which costs O(M C) against the O(M C^2) of the products.
struct Rwkv7LayerActs {
  float* x_in;      // (M, C) the layer's input (the residual stream)
  float* xx;        // (M, C) ln1(x_in), the time mix's input
  float* r;         // (M, C) receptance
  float* w_sig;     // (M, C) sigmoid(w0 + tanh(xw w1) w2)
  float* w;         // (M, C) decay exp(-e^-0.5 w_sig)
  float* k_raw;     // (M, C) key before the in-context rate: Wk xk
  float* k;         // (M, C) k_raw (1 + (a - 1) k_a), the key the state takes in
  float* v_raw;     // (M, C) Wv xv, before the mix with v_first
  float* v;         // (M, C) the value the state takes in
  float* a;         // (M, C) in-context learning rate
  float* g;         // (M, C) output gate
  float* v_mix;     // (M, C) how much of v_first v takes (layers after 0)
  float* kk;        // (M, C) normalised k k_k
  float* wkv;       // (M, C) the wkv recurrence's output
  float* pre_gate;  // (M, C) GroupNorm(wkv) + bonus
  float* w_low;     // (M, Dd) tanh(xw w1)
  float* a_low;     // (M, Da) xa a1
  float* v_low;     // (M, Dv) xv v1
  float* g_low;     // (M, Dg) sigmoid(xg g1)
  float* x_mid;     // (M, C) x_in + the time mix's output
  float* xx2;       // (M, C) ln2(x_mid), the channel mix's input
  float* ffn_relu;  // (M, F) relu(Wk xk) of the channel mix
  float* wkv_ckpt;  // (B, T / kWkvCheckpoint + 1, H, N, N) the wkv state every kWkvCheckpoint
                    // tokens: the backward pass recomputes the states in between
};

class Rwkv7Graph {
 public:
  // Tokens between saved wkv states: a state is H N^2 floats, too many to keep for every token
  // (a 12 x 768 model at 512 tokens would keep 300 MB per sequence); the backward pass
  // recomputes at most this many states at a time.
  static constexpr int kWkvCheckpoint = 16;

  // Room for up to B sequences of T tokens. Full training: Forward's `params` and Backward's
  // `grads` are `layout`'s flat buffers, every tensor trained.
  Rwkv7Graph(const ParamLayout& layout, int max_batch, int max_tokens);
  // A frozen base (LoRA, state tuning): the weights are `base`'s, nothing of it is trained.
  // With `lora` (ParamLayout::Rwkv7Lora) the adapters it holds add scale B A to their matrices,
  // and Forward's `params` / Backward's `grads` are its flat buffers; without, they are unused
  // (may be null) and only the start state's gradient (d_state_in) comes out. `base` and `lora`
  // must outlive the graph.
  Rwkv7Graph(const FrozenRwkv7& base, const ParamLayout* lora, float lora_scale, int max_batch,
             int max_tokens);
  ~Rwkv7Graph();
  Rwkv7Graph(const Rwkv7Graph&) = delete;
  Rwkv7Graph& operator=(const Rwkv7Graph&) = delete;

  // Floats of recurrent state per sequence.
  size_t StateFloats() const;
  // Bytes of activations kept between Forward and Backward (the memory report).
  size_t ActivationBytes() const;
  // The floats of that arena for B sequences of T tokens, without allocating it (aviary
  // estimate): what the constructor allocates.
  static size_t ArenaFloats(const Rwkv7Config& config, int max_batch, int max_tokens);

  // inputs, targets: (B, T) token ids. state_in: (B, StateFloats()) or null for zeros;
  // state_out: (B, StateFloats()) or null. logits: (B, T, V) or null. Returns the summed loss
  // and keeps what Backward needs. Ids outside the vocabulary throw aviary::Error.
  LossSum Forward(const float* params, std::span<const int32_t> inputs,
                  std::span<const int32_t> targets, int B, int T, const float* state_in,
                  float* state_out, float* logits = nullptr);

  // The gradient of loss_scale x (summed loss of the last Forward) plus RWKV-LM's L2Wrap term
  // (1e-4 x loss_scale x the largest logit, at that logit) is added to `grads` (the layout's
  // flat buffer). d_state_out: (B, StateFloats()) or null for zeros; d_state_in: (B,
  // StateFloats()) or null when not wanted. loss_scale is 1 / (tokens of the whole batch) for a
  // mean loss.
  // grads_ready (when given) is called with [begin, end) float ranges of `grads` as this pass
  // finishes adding to them (the head's first, then layer by layer down to the embedding; the
  // ranges cover the buffer once; a frozen base's LoRA adapters in one range at the end), so a
  // data-parallel run can start summing them over processes while the rest of the backward
  // pass computes.
  void Backward(const float* params, float* grads, float loss_scale, const float* d_state_out,
                float* d_state_in,
                const std::function<void(size_t begin, size_t end)>& grads_ready = {});

 private:
  struct Work;  // the scratch of one pass (rwkv7_graph.cpp)

  float* Take(size_t floats);
  // The small tensors' weights and gradients of a pass (gradients all null for a frozen base).
  Rwkv7Tensors Weights(const float* params) const;
  Rwkv7Tensors Grads(float* grads) const;
  // Sets mats_ and head_ for a pass over `params` (and `grads`, null in a forward pass).
  void BindLinears(const float* params, float* grads);
  // Layer l's forward from layers_[l].x_in into x_next, advancing `state` (B, StateFloats()).
  void LayerForward(int l, const Rwkv7Tensors& P, float* state, float* x_next);
  // Layer l's backward: the work buffer dx holds the gradient with respect to the layer's output
  // on entry and with respect to its input on return; d_state (B, StateFloats()) likewise for
  // the layer's part of the state.
  void LayerBackward(int l, const Rwkv7Tensors& P, const Rwkv7Tensors& G, float* d_state);

  const ParamLayout& layout_;  // full training: every tensor; frozen: the base's small ones
  const FrozenRwkv7* frozen_ = nullptr;
  const ParamLayout* lora_ = nullptr;
  float lora_scale_ = 0;
  Rwkv7Config config_;
  int max_batch_, max_tokens_;
  int B_ = 0, T_ = 0;
  std::vector<int32_t> inputs_, targets_;
  std::vector<float> state_in_;  // the Forward's start state (B, StateFloats())
  AlignedVector<float> arena_;
  size_t arena_used_ = 0;
  std::vector<Rwkv7LayerActs> layers_;
  float* x_emb_ = nullptr;        // (M, C) emb rows, the input of ln0
  float* x_out_ = nullptr;        // (M, C) the last layer's output, the input of ln_out
  float* x_head_ = nullptr;       // (M, C) ln_out(x_out), the input of the head
  float* v_first_ = nullptr;      // (M, C) layer 0's v
  float* head_logits_ = nullptr;  // (kHeadRows, V) one chunk of the head's logits
  std::unique_ptr<Work> work_;
  // The large products of the current pass: layer l's kRwkv7MatrixNames, and the head.
  std::vector<std::array<TrainLinear, kRwkv7LayerMatrices>> mats_;
  TrainLinear head_;
  LinearScratch scratch_;
};

}  // namespace aviary::train
