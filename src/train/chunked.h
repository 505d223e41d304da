// Training windows longer than one pass of the graph: each window runs as consecutive chunks,
// the recurrent state carried from one chunk to the next and its gradient carried back (the
// "infctx" scheme). The graph holds one chunk's activations, so memory follows the chunk
// length, not the window length; RWKV's state is all a chunk needs of the past.
//
// The backward pass goes from the last chunk to the first, recomputing each chunk's forward
// from its saved start state (the last chunk's activations are still in the graph) and handing
// the gradient with respect to its start state to the chunk before. A window of K chunks costs
// 2K - 1 forward passes and K backward passes; besides one chunk's activations it keeps the K
// start states, (K, B, StateFloats()) floats.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "train/rwkv7_graph.h"

namespace aviary::train {

class ChunkedWindows {
 public:
  // graph: prepared for at least chunk_len tokens per sequence. grad_chunks > 0 truncates the
  // backpropagation through time: chunks are taken in groups of grad_chunks and the gradient
  // stops at each group's start (it still flows forward in the state); 0: never.
  ChunkedWindows(Rwkv7Graph& graph, int chunk_len, int grad_chunks);

  // The summed loss of B windows of T tokens, inputs and targets (B, T), forward only.
  // state_in: (B, StateFloats()) the windows' start state, or null for zeros.
  LossSum Loss(const float* params, std::span<const int32_t> inputs,
               std::span<const int32_t> targets, int B, int T, const float* state_in = nullptr);

  // grads += the gradient of loss_scale x (the summed loss of the B windows) plus L2Wrap (as
  // Rwkv7Graph::Backward); returns the summed loss. d_state_in (B, StateFloats()), when not
  // null, receives the gradient with respect to state_in (from the first group of chunks
  // when truncated). grads_ready: as Rwkv7Graph::Backward's, from the first chunk's backward
  // pass (the last one, after which the gradients are final).
  LossSum Gradients(const float* params, float* grads, std::span<const int32_t> inputs,
                    std::span<const int32_t> targets, int B, int T, float loss_scale,
                    const float* state_in = nullptr, float* d_state_in = nullptr,
                    const std::function<void(size_t, size_t)>& grads_ready = {});

 private:
  // The tokens [t0, t0 + len) of B windows (B, T) as a (B, len) batch.
  void Gather(std::span<const int32_t> windows, int B, int T, int t0, int len,
              std::vector<int32_t>& out) const;

  Rwkv7Graph& graph_;
  int chunk_len_, grad_chunks_;
  std::vector<int32_t> in_, tg_;  // one chunk's tokens
  std::vector<float> states_;     // (K, B, StateFloats()) each chunk's start state
};

}  // namespace aviary::train
