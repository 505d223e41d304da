#include "train/rwkv7_graph.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <tuple>

#include "aviary/error.h"
#include "models/rwkv7_stages.h"
#include "models/stages.h"
#include "tensor/kernels.h"
#include "tensor/thread_pool.h"
#include "tensor/wkv.h"
#include "tensor/dtype.h"
#include "train/import.h"
#include "train/linear.h"
#include "train/ops.h"

namespace aviary::train {
namespace {

constexpr float kLayerNormEps = 1e-5f;   // nn.LayerNorm's default
constexpr float kGroupNormEps = 64e-5f;  // RWKV-7's ln_x
constexpr int kHeadRows = 128;           // token rows per head chunk (its logits are scratch)
enum Slot { kR, kW, kK, kV, kA, kG, kSlots };
// The large matrices, in kRwkv7MatrixNames order.
enum Matrix { kMatR, kMatK, kMatV, kMatO, kMatFfnK, kMatFfnV };

float* MatrixOf(const Rwkv7Tensors::Layer& L, int m) {
  float* const all[kRwkv7LayerMatrices] = {L.receptance, L.key,     L.value,
                                           L.output,     L.ffn_key, L.ffn_value};
  return all[m];
}

// fn(m0, m1) over row ranges of the M rows, in parallel.
template <typename F>
void ForRows(int64_t M, F&& fn) {
  ParallelForRanges(M, 16, fn);
}

}  // namespace

// The scratch of one pass: (M, C) buffers and two (M, F) ones, named by their use.
struct Rwkv7Graph::Work {
  float* prev;         // (M, C) a token shift's previous rows
  float* xs[kSlots];   // (M, C) the six mixed inputs of the time mix
  float* dxs[kSlots];  // (M, C) their gradients
  float *out, *dout, *tmp, *dg, *dpre, *dwkv, *dr, *dk, *dv, *dkk, *da, *dw, *dxx, *dprev;
  float *dv_first, *dx, *dx2;
  float *f0, *f1;      // (M, F)
  float *low0, *low1;  // (M, D) D = the widest low-rank matrix
  float* bonus;        // (M, H) sum over a head of r k r_k
  float* dbonus;       // (M, H) its gradient
};

size_t Rwkv7Graph::ArenaFloats(const Rwkv7Config& c, int max_batch, int max_tokens) {
  const size_t M = static_cast<size_t>(max_batch) * max_tokens, C = c.n_embd, F = c.n_ffn;
  const size_t D = std::max({c.d_decay, c.d_aaa, c.d_mv, c.d_gate});
  const size_t H = c.n_head(), N = c.head_size;
  const size_t ckpt = static_cast<size_t>(max_batch) *
                      ((max_tokens + kWkvCheckpoint - 1) / kWkvCheckpoint + 1) * H * N * N;
  const size_t per_layer =
      18 * M * C + M * F + M * (c.d_decay + c.d_aaa + c.d_mv + c.d_gate) + ckpt;
  const size_t work = (2 * kSlots + 19) * M * C + 2 * M * F + 2 * M * D + 2 * M * H;
  const size_t head = static_cast<size_t>(kHeadRows) * c.vocab;
  // Every buffer rounded up to 16 floats (64 bytes) by Take.
  const size_t buffers = c.n_layer * 24 + 2 * kSlots + 40;
  return c.n_layer * per_layer + 4 * M * C + work + head + buffers * 16;
}

Rwkv7Graph::Rwkv7Graph(const ParamLayout& layout, int max_batch, int max_tokens)
    : layout_(layout), config_(layout.config()), max_batch_(max_batch), max_tokens_(max_tokens) {
  if (max_batch < 1 || max_tokens < 1) throw Error("training needs a batch and a window of >= 1");
  const Rwkv7Config& c = config_;
  const size_t M = static_cast<size_t>(max_batch) * max_tokens, C = c.n_embd, F = c.n_ffn;
  const size_t D = std::max({c.d_decay, c.d_aaa, c.d_mv, c.d_gate});
  const size_t H = c.n_head(), N = c.head_size;
  const size_t ckpt = static_cast<size_t>(max_batch) *
                      ((max_tokens + kWkvCheckpoint - 1) / kWkvCheckpoint + 1) * H * N * N;
  const size_t head = static_cast<size_t>(kHeadRows) * c.vocab;
  const size_t floats = ArenaFloats(c, max_batch, max_tokens);
  const double bytes = static_cast<double>(floats) * sizeof(float);
  const double memory = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  if (memory > 0 && bytes > memory) {
    char what[256];
    std::snprintf(what, sizeof what,
                  "the activations of a %d x %d batch need %.1f GiB, more than this machine's "
                  "%.1f GiB: lower --batch or --ctx-len, or train in chunks (--chunk-len)",
                  max_batch, max_tokens, bytes / (1 << 30), memory / (1 << 30));
    throw Error(what);
  }
  arena_.resize(floats);
  for (int l = 0; l < c.n_layer; ++l) {
    Rwkv7LayerActs A;
    for (float** p : {&A.x_in, &A.xx, &A.r, &A.w_sig, &A.w, &A.k_raw, &A.k, &A.v_raw, &A.v, &A.a,
                      &A.g, &A.v_mix, &A.kk, &A.wkv, &A.pre_gate, &A.x_mid, &A.xx2}) {
      *p = Take(M * C);
    }
    A.w_low = Take(M * c.d_decay);
    A.a_low = Take(M * c.d_aaa);
    A.v_low = Take(M * c.d_mv);
    A.g_low = Take(M * c.d_gate);
    A.ffn_relu = Take(M * F);
    A.wkv_ckpt = Take(ckpt);
    layers_.push_back(A);
  }
  x_emb_ = Take(M * C);
  x_out_ = Take(M * C);
  x_head_ = Take(M * C);
  v_first_ = Take(M * C);
  work_ = std::make_unique<Work>();
  Work& w = *work_;
  w.prev = Take(M * C);
  for (int s = 0; s < kSlots; ++s) {
    w.xs[s] = Take(M * C);
    w.dxs[s] = Take(M * C);
  }
  for (float** p : {&w.out, &w.dout, &w.tmp, &w.dg, &w.dpre, &w.dwkv, &w.dr, &w.dk, &w.dv, &w.dkk,
                    &w.da, &w.dw, &w.dxx, &w.dprev, &w.dv_first, &w.dx, &w.dx2}) {
    *p = Take(M * C);
  }
  w.f0 = Take(M * F);
  w.f1 = Take(M * F);
  w.low0 = Take(M * D);
  w.low1 = Take(M * D);
  w.bonus = Take(M * H);
  w.dbonus = Take(M * H);
  head_logits_ = Take(head);
}

Rwkv7Graph::Rwkv7Graph(const FrozenRwkv7& base, const ParamLayout* lora, float lora_scale,
                       int max_batch, int max_tokens)
    : Rwkv7Graph(base.small_layout, max_batch, max_tokens) {
  frozen_ = &base;
  lora_ = lora;
  lora_scale_ = lora_scale;
}

Rwkv7Graph::~Rwkv7Graph() = default;

Rwkv7Tensors Rwkv7Graph::Weights(const float* params) const {
  if (frozen_) return Rwkv7Tensors::Bind(layout_, const_cast<float*>(frozen_->small.data()));
  return Rwkv7Tensors::Bind(layout_, const_cast<float*>(params));
}

Rwkv7Tensors Rwkv7Graph::Grads(float* grads) const {
  if (frozen_) return Rwkv7Tensors::None(config_.n_layer);
  return Rwkv7Tensors::Bind(layout_, grads);
}

void Rwkv7Graph::BindLinears(const float* params, float* grads) {
  const Rwkv7Config& c = config_;
  mats_.assign(c.n_layer, {});
  head_ = TrainLinear{};
  head_.rows = c.vocab;
  head_.cols = c.n_embd;
  if (!frozen_) {
    const Rwkv7Tensors P = Weights(params);
    const Rwkv7Tensors G = grads ? Grads(grads) : Rwkv7Tensors::None(c.n_layer);
    for (int l = 0; l < c.n_layer; ++l) {
      for (int m = 0; m < kRwkv7LayerMatrices; ++m) {
        TrainLinear& L = mats_[l][m];
        std::tie(L.rows, L.cols) = Rwkv7MatrixShape(c, m);
        L.w = MatrixOf(P.layers[l], m);
        L.dw = MatrixOf(G.layers[l], m);
      }
    }
    head_.w = P.head;
    head_.dw = G.head;
    return;
  }
  head_.stored = frozen_->head;
  for (int l = 0; l < c.n_layer; ++l) {
    for (int m = 0; m < kRwkv7LayerMatrices; ++m) {
      TrainLinear& L = mats_[l][m];
      std::tie(L.rows, L.cols) = Rwkv7MatrixShape(c, m);
      L.stored = frozen_->matrices[l][m];
      if (!lora_) continue;
      const std::string name = "blocks." + std::to_string(l) + "." + kRwkv7MatrixNames[m];
      const ParamEntry* a = lora_->Find(name + ".lora_A");
      const ParamEntry* b = lora_->Find(name + ".lora_B");
      if (!a || !b) continue;
      L.rank = static_cast<int>(a->shape[0]);
      L.scale = lora_scale_;
      L.lora_a = params + a->offset;
      L.lora_b = params + b->offset;
      if (grads) {
        L.d_lora_a = grads + a->offset;
        L.d_lora_b = grads + b->offset;
      }
    }
  }
}

float* Rwkv7Graph::Take(size_t floats) {
  float* p = arena_.data() + arena_used_;
  arena_used_ += (floats + 15) / 16 * 16;
  if (arena_used_ > arena_.size()) throw Error("internal: training arena too small");
  return p;
}

size_t Rwkv7Graph::StateFloats() const {
  return static_cast<size_t>(config_.n_layer) *
         HeadLayerState::Floats(config_.n_embd, config_.head_size);
}

size_t Rwkv7Graph::ActivationBytes() const { return arena_.size() * sizeof(float); }

LossSum Rwkv7Graph::Forward(const float* params, std::span<const int32_t> inputs,
                            std::span<const int32_t> targets, int B, int T, const float* state_in,
                            float* state_out, float* logits) {
  if (B < 1 || T < 1 || B > max_batch_ || T > max_tokens_) {
    throw Error("training batch " + std::to_string(B) + " x " + std::to_string(T) +
                " is outside the prepared " + std::to_string(max_batch_) + " x " +
                std::to_string(max_tokens_));
  }
  const size_t M = static_cast<size_t>(B) * T;
  if (inputs.size() != M || targets.size() != M) throw Error("training batch: wrong token count");
  const Rwkv7Config& c = config_;
  for (std::span<const int32_t> ids : {inputs, targets}) {
    for (int32_t id : ids) {
      if (id < 0 || id >= c.vocab) {
        throw Error("token id " + std::to_string(id) + " is outside the model's vocabulary of " +
                    std::to_string(c.vocab));
      }
    }
  }
  B_ = B;
  T_ = T;
  inputs_.assign(inputs.begin(), inputs.end());
  targets_.assign(targets.begin(), targets.end());
  const size_t SF = StateFloats();
  state_in_.assign(M / T * SF, 0.0f);
  if (state_in) std::copy(state_in, state_in + B * SF, state_in_.begin());
  std::vector<float> state(state_in_);  // advanced layer by layer to the end state

  const Rwkv7Tensors P = Weights(params);
  BindLinears(params, nullptr);
  const int C = c.n_embd;
  for (size_t m = 0; m < M; ++m) {
    if (frozen_) {  // only the rows used are widened
      const Tensor& emb = *frozen_->emb;
      DequantizeRow(emb.type, emb.row(inputs[m]), x_emb_ + m * C, C);
    } else {
      std::memcpy(x_emb_ + m * C, P.emb + static_cast<size_t>(inputs[m]) * C, C * sizeof(float));
    }
  }
  LayerNormRows(x_emb_, P.layers[0].ln0_w, P.layers[0].ln0_b, M, C, kLayerNormEps, layers_[0].x_in);
  for (int l = 0; l < c.n_layer; ++l) {
    float* x_next = l + 1 < c.n_layer ? layers_[l + 1].x_in : x_out_;
    LayerForward(l, P, state.data(), x_next);
  }
  LayerNormRows(x_out_, P.ln_out_w, P.ln_out_b, M, C, kLayerNormEps, x_head_);

  LossSum loss;
  loss.tokens = static_cast<int64_t>(M);
  for (size_t m0 = 0; m0 < M; m0 += kHeadRows) {
    const int rows = static_cast<int>(std::min<size_t>(kHeadRows, M - m0));
    LinearForward(head_, x_head_ + m0 * C, rows, head_logits_, scratch_);
    if (logits) {
      std::memcpy(logits + m0 * c.vocab, head_logits_, sizeof(float) * rows * c.vocab);
    }
    loss.sum += CrossEntropyRows(head_logits_, targets_.data() + m0, rows, c.vocab, 0.0f, false,
                                 &loss.correct);
  }
  if (state_out) std::copy(state.begin(), state.end(), state_out);
  return loss;
}

// The state part `layer` of sequence b in a (B, StateFloats()) buffer.
static HeadLayerState StateOf(float* states, size_t state_floats, int b, int layer,
                              const Rwkv7Config& c) {
  return HeadLayerState::Of(states + b * state_floats, layer, c.n_embd, c.head_size);
}

void Rwkv7Graph::LayerForward(int l, const Rwkv7Tensors& P, float* state, float* x_next) {
  const Rwkv7Config& c = config_;
  const Rwkv7Tensors::Layer& L = P.layers[l];
  Rwkv7LayerActs& A = layers_[l];
  Work& w = *work_;
  const int B = B_, T = T_, C = c.n_embd, H = c.n_head(), N = c.head_size, F = c.n_ffn;
  const int64_t M = static_cast<int64_t>(B) * T;
  const bool first = l == 0;
  const size_t SF = StateFloats();

  // Time mix: x_mid = x_in + Wo ((GroupNorm(wkv7(r, w, k, v, kk, a)) + bonus) g).
  LayerNormRows(A.x_in, L.ln1_w, L.ln1_b, M, C, kLayerNormEps, A.xx);
  for (int b = 0; b < B; ++b) {
    const size_t o = static_cast<size_t>(b) * T * C;
    TokenShift(A.xx + o, T, C, StateOf(state, SF, b, l, c).att_x, w.prev + o);
  }
  ForRows(M, [&](int64_t m0, int64_t m1) {
    for (int s = 0; s < kSlots; ++s) MixAdd(A.xx, w.prev, L.x_rwkvag + s * C, C, m0, m1, w.xs[s]);
  });
  LinearForward(mats_[l][kMatR], w.xs[kR], M, A.r, scratch_);
  LinearForward(mats_[l][kMatK], w.xs[kK], M, A.k_raw, scratch_);
  LinearForward(mats_[l][kMatV], w.xs[kV], M, A.v_raw, scratch_);
  LinearForward(L.w1, c.d_decay, C, w.xs[kW], M, A.w_low);
  LinearForward(L.a1, c.d_aaa, C, w.xs[kA], M, A.a_low);
  LinearForward(L.g1, c.d_gate, C, w.xs[kG], M, A.g_low);
  TanhInPlace(A.w_low, M * c.d_decay);
  SigmoidInPlace(A.g_low, M * c.d_gate);
  LinearForward(L.w2, C, c.d_decay, A.w_low, M, A.w);
  LinearForward(L.a2, C, c.d_aaa, A.a_low, M, A.a);
  LinearForward(L.g2, C, c.d_gate, A.g_low, M, A.g);
  if (!first) {
    LinearForward(L.v1, c.d_mv, C, w.xs[kV], M, A.v_low);
    LinearForward(L.v2, C, c.d_mv, A.v_low, M, A.v_mix);
  }
  ForRows(M, [&](int64_t m0, int64_t m1) {
    // w_sig = sigmoid(w0 + w), the decay stage's own first step, kept for the backward pass.
    for (int64_t m = m0; m < m1; ++m) {
      for (int i = 0; i < C; ++i) A.w_sig[m * C + i] = L.w0[i] + A.w[m * C + i];
    }
    SigmoidInPlace(A.w_sig + m0 * C, (m1 - m0) * C);
    std::memcpy(A.k + m0 * C, A.k_raw + m0 * C, (m1 - m0) * C * sizeof(float));
    std::memcpy(A.v + m0 * C, A.v_raw + m0 * C, (m1 - m0) * C * sizeof(float));
    Rwkv7DecayAndGates(L.w0, L.a0, first ? nullptr : L.v0, C, m0, m1, A.w, A.a, A.v_mix);
    Rwkv7KeysAndValues(L.k_k, L.k_a, first, H, N, m0, m1, A.a, A.v_mix, A.k, A.v, A.kk, v_first_);
  });
  // The wkv recurrence per sequence, saving the state every kWkvCheckpoint tokens.
  const int intervals = (T + kWkvCheckpoint - 1) / kWkvCheckpoint;
  const size_t HNN = static_cast<size_t>(H) * N * N;
  auto wkv_sequence = [&](int64_t b) {
    float* S = StateOf(state, SF, static_cast<int>(b), l, c).S;
    float* ckpt = A.wkv_ckpt + b * (intervals + 1) * HNN;
    for (int p = 0; p < intervals; ++p) {
      std::memcpy(ckpt + p * HNN, S, HNN * sizeof(float));
      const int t0 = p * kWkvCheckpoint, len = std::min(T, t0 + kWkvCheckpoint) - t0;
      const size_t o = (static_cast<size_t>(b) * T + t0) * C;
      Wkv7Seq(len, H, N, A.r + o, A.w + o, A.k + o, A.v + o, A.kk + o, A.a + o, S, A.wkv + o);
    }
    std::memcpy(ckpt + intervals * HNN, S, HNN * sizeof(float));
  };
  if (B >= NumThreads()) {
    ParallelFor(B, [&](int64_t b, int) { wkv_sequence(b); });
  } else {
    for (int b = 0; b < B; ++b) wkv_sequence(b);
  }
  ForRows(M, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      GroupNorm(A.wkv + m * C, L.ln_x_w, L.ln_x_b, C, H, kGroupNormEps, A.pre_gate + m * C);
      Rwkv7Bonus(L.r_k, H, N, m, m + 1, A.r, A.k, A.v, A.pre_gate);
      for (int i = 0; i < C; ++i) w.out[m * C + i] = A.pre_gate[m * C + i] * A.g[m * C + i];
    }
  });
  LinearForward(mats_[l][kMatO], w.out, M, w.tmp, scratch_);
  ForRows(M, [&](int64_t m0, int64_t m1) {
    for (int64_t i = m0 * C; i < m1 * C; ++i) A.x_mid[i] = A.x_in[i] + w.tmp[i];
  });

  // Channel mix: x_next = x_mid + Wv relu(Wk (xx2 + (prev - xx2) x_k))^2.
  LayerNormRows(A.x_mid, L.ln2_w, L.ln2_b, M, C, kLayerNormEps, A.xx2);
  for (int b = 0; b < B; ++b) {
    const size_t o = static_cast<size_t>(b) * T * C;
    TokenShift(A.xx2 + o, T, C, StateOf(state, SF, b, l, c).ffn_x, w.prev + o);
  }
  ForRows(M,
          [&](int64_t m0, int64_t m1) { MixAdd(A.xx2, w.prev, L.ffn_x_k, C, m0, m1, w.xs[kK]); });
  LinearForward(mats_[l][kMatFfnK], w.xs[kK], M, A.ffn_relu, scratch_);
  ForRows(M, [&](int64_t m0, int64_t m1) {
    for (int64_t i = m0 * F; i < m1 * F; ++i) {
      A.ffn_relu[i] = A.ffn_relu[i] < 0.0f ? 0.0f : A.ffn_relu[i];
      w.f0[i] = A.ffn_relu[i] * A.ffn_relu[i];
    }
  });
  LinearForward(mats_[l][kMatFfnV], w.f0, M, w.tmp, scratch_);
  ForRows(M, [&](int64_t m0, int64_t m1) {
    for (int64_t i = m0 * C; i < m1 * C; ++i) x_next[i] = A.x_mid[i] + w.tmp[i];
  });
}

void Rwkv7Graph::Backward(const float* params, float* grads, float loss_scale,
                          const float* d_state_out, float* d_state_in,
                          const std::function<void(size_t, size_t)>& grads_ready) {
  if (B_ == 0) throw Error("internal: Backward without a Forward");
  const Rwkv7Config& c = config_;
  const Rwkv7Tensors P = Weights(params);
  const Rwkv7Tensors G = Grads(grads);
  BindLinears(params, grads);
  Work& w = *work_;
  const int C = c.n_embd;
  const int64_t M = static_cast<int64_t>(B_) * T_;
  const size_t SF = StateFloats();
  std::vector<float> d_state(static_cast<size_t>(B_) * SF, 0.0f);
  if (d_state_out) std::copy(d_state_out, d_state_out + d_state.size(), d_state.begin());

  // Head and loss, chunk by chunk: logits recomputed, turned into their gradient in place.
  float* dx_head = w.dx2;
  for (int64_t m0 = 0; m0 < M; m0 += kHeadRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kHeadRows, M - m0));
    LinearForward(head_, x_head_ + m0 * C, rows, head_logits_, scratch_);
    CrossEntropyRows(head_logits_, targets_.data() + m0, rows, c.vocab, loss_scale, true, nullptr);
    LinearBackward(head_, x_head_ + m0 * C, head_logits_, rows, dx_head + m0 * C, false, scratch_);
  }
  std::fill(w.dx, w.dx + M * C, 0.0f);
  LayerNormRowsBackward(x_out_, P.ln_out_w, dx_head, M, C, kLayerNormEps, w.dx, G.ln_out_w,
                        G.ln_out_b);
  // Each layer's tensors are contiguous in the layout, between ln_out's and the embedding's:
  // layer l's range ends where layer l + 1's (or ln_out's) begins. Layer 0 also holds ln0,
  // final only after the embedding's LayerNorm below. (A frozen base's adapters are announced
  // once, at the end.)
  const bool by_layer = grads_ready && !frozen_;
  auto layer_begin = [&](int l) {
    return static_cast<size_t>((l < c.n_layer ? G.layers[l].ln1_w : G.ln_out_w) - grads);
  };
  if (by_layer) grads_ready(layer_begin(c.n_layer), layout_.total_floats());
  std::fill(w.dv_first, w.dv_first + M * C, 0.0f);
  for (int l = c.n_layer - 1; l >= 0; --l) {
    LayerBackward(l, P, G, d_state.data());
    if (by_layer && l > 0) grads_ready(layer_begin(l), layer_begin(l + 1));
  }

  // Layer 0's input: x0 = ln0(emb[tokens]).
  std::fill(w.dx2, w.dx2 + M * C, 0.0f);
  LayerNormRowsBackward(x_emb_, P.layers[0].ln0_w, w.dx, M, C, kLayerNormEps, w.dx2,
                        G.layers[0].ln0_w, G.layers[0].ln0_b);
  // In row order: rows of the same token add up identically.
  for (int64_t m = 0; G.emb && m < M; ++m) {
    float* row = G.emb + static_cast<size_t>(inputs_[m]) * C;
    for (int i = 0; i < C; ++i) row[i] += w.dx2[m * C + i];
  }
  if (by_layer) grads_ready(0, layer_begin(1));
  if (grads_ready && frozen_ && lora_) grads_ready(0, lora_->total_floats());
  if (d_state_in) std::copy(d_state.begin(), d_state.end(), d_state_in);
}

void Rwkv7Graph::LayerBackward(int l, const Rwkv7Tensors& P, const Rwkv7Tensors& G,
                               float* d_state) {
  const Rwkv7Config& c = config_;
  const Rwkv7Tensors::Layer& L = P.layers[l];
  const Rwkv7Tensors::Layer& GL = G.layers[l];
  const Rwkv7LayerActs& A = layers_[l];
  Work& w = *work_;
  const int B = B_, T = T_, C = c.n_embd, H = c.n_head(), N = c.head_size, F = c.n_ffn;
  const int64_t M = static_cast<int64_t>(B) * T;
  const bool first = l == 0;
  const size_t SF = StateFloats();
  std::vector<float*> d_att_x(B), d_ffn_x(B), d_S(B);
  std::vector<const float*> d_att_x_c(B), d_ffn_x_c(B);
  for (int b = 0; b < B; ++b) {
    const HeadLayerState s = StateOf(d_state, SF, b, l, c);
    d_att_x_c[b] = d_att_x[b] = s.att_x;
    d_ffn_x_c[b] = d_ffn_x[b] = s.ffn_x;
    d_S[b] = s.S;
  }
  // The token-shifted rows, from the saved normed rows and the start state.
  auto shifted = [&](const float* xx, bool ffn, float* prev) {
    for (int b = 0; b < B; ++b) {
      const size_t o = static_cast<size_t>(b) * T * C;
      const HeadLayerState s = StateOf(state_in_.data(), SF, b, l, c);
      std::memcpy(prev + o, ffn ? s.ffn_x : s.att_x, C * sizeof(float));
      std::memcpy(prev + o + C, xx + o, static_cast<size_t>(T - 1) * C * sizeof(float));
    }
  };

  // ---- channel mix: x_out = x_mid + Wv h, h = relu(Wk xk)^2, xk = xx2 + (prev - xx2) x_k
  shifted(A.xx2, true, w.prev);
  float* xk = w.xs[kK];
  ForRows(M, [&](int64_t m0, int64_t m1) {
    MixAdd(A.xx2, w.prev, L.ffn_x_k, C, m0, m1, xk);
    for (int64_t i = m0 * F; i < m1 * F; ++i) w.f0[i] = A.ffn_relu[i] * A.ffn_relu[i];
  });
  LinearBackward(mats_[l][kMatFfnV], w.f0, w.dx, M, w.f1, false, scratch_);  // f1 = dh
  ForRows(M, [&](int64_t m0, int64_t m1) {
    for (int64_t i = m0 * F; i < m1 * F; ++i) w.f1[i] *= 2.0f * A.ffn_relu[i];
  });
  float* dxk = w.dxs[kK];
  LinearBackward(mats_[l][kMatFfnK], xk, w.f1, M, dxk, false, scratch_);
  std::fill(w.dxx, w.dxx + M * C, 0.0f);
  std::fill(w.dprev, w.dprev + M * C, 0.0f);
  MixAddBackward(A.xx2, w.prev, L.ffn_x_k, dxk, M, C, w.dxx, w.dprev, GL.ffn_x_k);
  TokenShiftBackward(w.dprev, B, T, C, w.dxx, d_ffn_x.data(), d_ffn_x_c.data());
  // dx is now d x_mid: the residual's gradient plus ln2's.
  LayerNormRowsBackward(A.x_mid, L.ln2_w, w.dxx, M, C, kLayerNormEps, w.dx, GL.ln2_w, GL.ln2_b);

  // ---- time mix: x_mid = x_in + Wo out, out = pre_gate g
  ForRows(M, [&](int64_t m0, int64_t m1) {
    for (int64_t i = m0 * C; i < m1 * C; ++i) w.out[i] = A.pre_gate[i] * A.g[i];
  });
  LinearBackward(mats_[l][kMatO], w.out, w.dx, M, w.dout, false, scratch_);
  // pre_gate = GroupNorm(wkv) + bonus, bonus = (sum over the head of r k r_k) v.
  ForRows(M, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int h = 0; h < H; ++h) {
        const int64_t o = m * C + h * N;
        float s = 0.0f, ds = 0.0f;
        for (int j = 0; j < N; ++j) {
          const int64_t i = o + j;
          w.dg[i] = w.dout[i] * A.pre_gate[i];
          w.dpre[i] = w.dout[i] * A.g[i];
          s += A.r[i] * A.k[i] * L.r_k[h * N + j];
          ds += w.dpre[i] * A.v[i];
        }
        w.bonus[m * H + h] = s;
        w.dbonus[m * H + h] = ds;
      }
    }
  });
  SumOverRows(M, C, GL.r_k, [&](int64_t m, int64_t i) {
    return w.dbonus[m * H + i / N] * A.r[m * C + i] * A.k[m * C + i];
  });
  GroupNormRowsBackward(A.wkv, L.ln_x_w, w.dpre, M, C, H, kGroupNormEps, w.dwkv, GL.ln_x_w,
                        GL.ln_x_b);

  // The wkv recurrence, per sequence: its state's gradient flows from the end to the start.
  const int intervals = (T + Rwkv7Graph::kWkvCheckpoint - 1) / Rwkv7Graph::kWkvCheckpoint;
  const size_t HNN = static_cast<size_t>(H) * N * N;
  auto wkv_sequence = [&](int64_t b) {
    const size_t o = static_cast<size_t>(b) * T * C;
    Wkv7Backward(T, H, N, A.r + o, A.w + o, A.k + o, A.v + o, A.kk + o, A.a + o, w.dwkv + o,
                 A.wkv_ckpt + b * (intervals + 1) * HNN, kWkvCheckpoint, d_S[b], w.dr + o, w.dw + o,
                 w.dk + o, w.dv + o, w.dkk + o, w.da + o);
  };
  if (B >= NumThreads()) {
    ParallelFor(B, [&](int64_t b, int) { wkv_sequence(b); });
  } else {
    for (int b = 0; b < B; ++b) wkv_sequence(b);
  }

  // Row stages back to the projections' outputs: r, w, k_raw, v_raw, a, g, v_mix.
  // dxs[kR] is free until the receptance's backward, the last use of dv_mix before it.
  float *dk_raw = w.tmp, *dv_mix = w.dxs[kR];
  ForRows(M, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int h = 0; h < H; ++h) {
        const int64_t o = m * C + h * N;
        const float s = w.bonus[m * H + h], ds = w.dbonus[m * H + h];
        // kk = u / max(|u|, 1e-12), u = k_raw k_k: du = (dkk - kk (kk . dkk)) / |u|.
        float norm = 0.0f, dot = 0.0f;
        for (int j = 0; j < N; ++j) {
          const float u = A.k_raw[o + j] * L.k_k[h * N + j];
          norm += u * u;
          dot += A.kk[o + j] * w.dkk[o + j];
        }
        norm = std::sqrt(norm);
        const bool clamped = norm < 1e-12f;
        const float inv = 1.0f / std::max(norm, 1e-12f);
        for (int j = 0; j < N; ++j) {
          const int64_t i = o + j;
          const int c = h * N + j;
          w.dr[i] += ds * A.k[i] * L.r_k[c];
          const float dk = w.dk[i] + ds * A.r[i] * L.r_k[c];  // d k (the modified key)
          w.dv[i] += w.dpre[i] * s;
          const float du = clamped ? w.dkk[i] * inv : (w.dkk[i] - A.kk[i] * dot) * inv;
          // k = k_raw (1 + (a - 1) k_a)
          dk_raw[i] = dk * (1.0f + (A.a[i] - 1.0f) * L.k_a[c]) + du * L.k_k[c];
          w.da[i] += dk * A.k_raw[i] * L.k_a[c];
          w.dk[i] = dk;  // kept for the k_a and k_k sums below
          w.dkk[i] = du;
        }
      }
      for (int64_t i = m * C; i < (m + 1) * C; ++i) {
        // v = v_raw + (v_first - v_raw) v_mix after layer 0; v = v_raw = v_first in layer 0.
        if (first) {
          w.dv[i] += w.dv_first[i];
        } else {
          dv_mix[i] = w.dv[i] * (v_first_[i] - A.v_raw[i]);
          w.dv_first[i] += w.dv[i] * A.v_mix[i];
          w.dv[i] *= 1.0f - A.v_mix[i];
          dv_mix[i] *= A.v_mix[i] * (1.0f - A.v_mix[i]);  // through sigmoid(v0 + z)
        }
        w.da[i] *= A.a[i] * (1.0f - A.a[i]);  // a = sigmoid(a0 + z)
        // w = exp(-e^-0.5 w_sig), w_sig = sigmoid(w0 + z)
        const float ws = A.w_sig[i];
        w.dw[i] *= A.w[i] * -std::exp(-0.5f) * ws * (1.0f - ws);
      }
    }
  });
  SumOverRows(M, C, GL.k_a, [&](int64_t m, int64_t i) {
    return w.dk[m * C + i] * A.k_raw[m * C + i] * (A.a[m * C + i] - 1.0f);
  });
  SumOverRows(M, C, GL.k_k,
              [&](int64_t m, int64_t i) { return w.dkk[m * C + i] * A.k_raw[m * C + i]; });
  SumOverRows(M, C, GL.a0, [&](int64_t m, int64_t i) { return w.da[m * C + i]; });
  SumOverRows(M, C, GL.w0, [&](int64_t m, int64_t i) { return w.dw[m * C + i]; });
  if (!first) SumOverRows(M, C, GL.v0, [&](int64_t m, int64_t i) { return dv_mix[m * C + i]; });

  // The low-rank paths, then r, k, v, back to the six mixed inputs.
  shifted(A.xx, false, w.prev);
  ForRows(M, [&](int64_t m0, int64_t m1) {
    for (int s = 0; s < kSlots; ++s) MixAdd(A.xx, w.prev, L.x_rwkvag + s * C, C, m0, m1, w.xs[s]);
  });
  // w = w0 + tanh(xw w1) w2
  LinearBackward(L.w2, C, c.d_decay, A.w_low, w.dw, M, w.low0, false, GL.w2);
  ForRows(M, [&](int64_t m0, int64_t m1) {
    for (int64_t i = m0 * c.d_decay; i < m1 * c.d_decay; ++i) {
      w.low0[i] *= 1.0f - A.w_low[i] * A.w_low[i];
    }
  });
  LinearBackward(L.w1, c.d_decay, C, w.xs[kW], w.low0, M, w.dxs[kW], false, GL.w1);
  // a = a0 + (xa a1) a2
  LinearBackward(L.a2, C, c.d_aaa, A.a_low, w.da, M, w.low0, false, GL.a2);
  LinearBackward(L.a1, c.d_aaa, C, w.xs[kA], w.low0, M, w.dxs[kA], false, GL.a1);
  // g = sigmoid(xg g1) g2
  LinearBackward(L.g2, C, c.d_gate, A.g_low, w.dg, M, w.low0, false, GL.g2);
  ForRows(M, [&](int64_t m0, int64_t m1) {
    for (int64_t i = m0 * c.d_gate; i < m1 * c.d_gate; ++i) {
      w.low0[i] *= A.g_low[i] * (1.0f - A.g_low[i]);
    }
  });
  LinearBackward(L.g1, c.d_gate, C, w.xs[kG], w.low0, M, w.dxs[kG], false, GL.g1);
  // v_raw = Wv xv and, after layer 0, v_mix = v0 + (xv v1) v2
  LinearBackward(mats_[l][kMatV], w.xs[kV], w.dv, M, w.dxs[kV], false, scratch_);
  if (!first) {
    LinearBackward(L.v2, C, c.d_mv, A.v_low, dv_mix, M, w.low0, false, GL.v2);
    LinearBackward(L.v1, c.d_mv, C, w.xs[kV], w.low0, M, w.dxs[kV], true, GL.v1);
  }
  LinearBackward(mats_[l][kMatK], w.xs[kK], dk_raw, M, w.dxs[kK], false, scratch_);
  LinearBackward(mats_[l][kMatR], w.xs[kR], w.dr, M, w.dxs[kR], false, scratch_);

  std::fill(w.dxx, w.dxx + M * C, 0.0f);
  std::fill(w.dprev, w.dprev + M * C, 0.0f);
  for (int s = 0; s < kSlots; ++s) {
    MixAddBackward(A.xx, w.prev, L.x_rwkvag + s * C, w.dxs[s], M, C, w.dxx, w.dprev,
                   GL.x_rwkvag ? GL.x_rwkvag + s * C : nullptr);
  }
  TokenShiftBackward(w.dprev, B, T, C, w.dxx, d_att_x.data(), d_att_x_c.data());
  // dx becomes d x_in: the residual's gradient plus ln1's.
  LayerNormRowsBackward(A.x_in, L.ln1_w, w.dxx, M, C, kLayerNormEps, w.dx, GL.ln1_w, GL.ln1_b);
}

}  // namespace aviary::train
