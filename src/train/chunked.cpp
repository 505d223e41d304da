#include "train/chunked.h"

#include <algorithm>

#include "aviary/error.h"

namespace aviary::train {

ChunkedWindows::ChunkedWindows(Rwkv7Graph& graph, int chunk_len, int grad_chunks)
    : graph_(graph), chunk_len_(chunk_len), grad_chunks_(grad_chunks) {
  if (chunk_len < 1) throw Error("internal: chunks of " + std::to_string(chunk_len) + " tokens");
  if (grad_chunks < 0) throw Error("internal: negative gradient chunk count");
}

void ChunkedWindows::Gather(std::span<const int32_t> windows, int B, int T, int t0, int len,
                            std::vector<int32_t>& out) const {
  out.resize(static_cast<size_t>(B) * len);
  for (int b = 0; b < B; ++b) {
    std::copy_n(windows.begin() + static_cast<size_t>(b) * T + t0, len,
                out.begin() + static_cast<size_t>(b) * len);
  }
}

static void Add(LossSum& total, const LossSum& l) {
  total.sum += l.sum;
  total.tokens += l.tokens;
  total.correct += l.correct;
}

LossSum ChunkedWindows::Loss(const float* params, std::span<const int32_t> inputs,
                             std::span<const int32_t> targets, int B, int T,
                             const float* state_in) {
  if (T <= chunk_len_) return graph_.Forward(params, inputs, targets, B, T, state_in, nullptr);
  if (inputs.size() != static_cast<size_t>(B) * T || targets.size() != inputs.size()) {
    throw Error("training batch: wrong token count");
  }
  const size_t SF = static_cast<size_t>(B) * graph_.StateFloats();
  std::vector<float> state(SF, 0.0f);
  if (state_in) std::copy(state_in, state_in + SF, state.begin());
  LossSum total;
  for (int t0 = 0; t0 < T; t0 += chunk_len_) {
    const int len = std::min(chunk_len_, T - t0);
    Gather(inputs, B, T, t0, len, in_);
    Gather(targets, B, T, t0, len, tg_);
    Add(total, graph_.Forward(params, in_, tg_, B, len, state.data(), state.data()));
  }
  return total;
}

LossSum ChunkedWindows::Gradients(const float* params, float* grads,
                                  std::span<const int32_t> inputs,
                                  std::span<const int32_t> targets, int B, int T,
                                  float loss_scale, const float* state_in, float* d_state_in,
                                  const std::function<void(size_t, size_t)>& grads_ready) {
  if (T <= chunk_len_) {
    const LossSum loss = graph_.Forward(params, inputs, targets, B, T, state_in, nullptr);
    graph_.Backward(params, grads, loss_scale, nullptr, d_state_in, grads_ready);
    return loss;
  }
  if (inputs.size() != static_cast<size_t>(B) * T || targets.size() != inputs.size()) {
    throw Error("training batch: wrong token count");
  }
  const int K = (T + chunk_len_ - 1) / chunk_len_;
  const size_t SF = static_cast<size_t>(B) * graph_.StateFloats();
  states_.assign(static_cast<size_t>(K) * SF, 0.0f);
  if (state_in) std::copy(state_in, state_in + SF, states_.begin());
  LossSum total;
  for (int k = 0; k < K; ++k) {
    const int t0 = k * chunk_len_, len = std::min(chunk_len_, T - t0);
    Gather(inputs, B, T, t0, len, in_);
    Gather(targets, B, T, t0, len, tg_);
    float* next = k + 1 < K ? states_.data() + (k + 1) * SF : nullptr;
    Add(total, graph_.Forward(params, in_, tg_, B, len, states_.data() + k * SF, next));
  }
  std::vector<float> d_end(SF, 0.0f), d_start(SF, 0.0f);
  bool carried = false;  // d_end holds the gradient from the chunk after
  for (int k = K - 1; k >= 0; --k) {
    if (k + 1 < K) {  // this chunk's activations, again (the last chunk's are in the graph)
      const int t0 = k * chunk_len_, len = std::min(chunk_len_, T - t0);
      Gather(inputs, B, T, t0, len, in_);
      Gather(targets, B, T, t0, len, tg_);
      graph_.Forward(params, in_, tg_, B, len, states_.data() + k * SF, nullptr);
    }
    // Chunk 0's gradient goes to the windows' start state (the first group's own start).
    const bool group_start = grad_chunks_ > 0 && k > 0 && k % grad_chunks_ == 0;
    const bool pass_back = k > 0 ? !group_start : d_state_in != nullptr;
    graph_.Backward(params, grads, loss_scale, carried ? d_end.data() : nullptr,
                    pass_back ? d_start.data() : nullptr,
                    k == 0 ? grads_ready : std::function<void(size_t, size_t)>());
    if (k == 0 && d_state_in) std::copy(d_start.begin(), d_start.end(), d_state_in);
    d_end.swap(d_start);
    carried = pass_back;
  }
  return total;
}

}  // namespace aviary::train
