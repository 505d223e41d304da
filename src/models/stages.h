// Stages shared by the RWKV versions' layers. A layer's forward pass is a short list of stages
// over the activations of one chunk of T tokens (each version's Acts struct); a backward pass
// can sit beside each stage. Buffers are row-major; shapes are given as (rows, columns) with
// C = n_embd, F = n_ffn, H heads of N = C / H channels.
//
// Two kinds of stage: a chunk stage runs its own parallel loop (ForTokens, MatMul, MatMulBatch);
// a row stage takes a token range [t0, t1) and is called inside a ForTokens loop, so that the
// stages that read the same rows run in one pass while those rows are in cache. No stage's
// result depends on how the tokens are split.
#pragma once

#include <cstddef>
#include <vector>

#include "models/model_impl.h"
#include "tensor/tensor.h"

namespace aviary {

// One layer's part of the recurrent state in the versions with heads (v5-v7): the last normed
// input of each token shift and the wkv state, 2 C + C N floats.
struct HeadLayerState {
  float* att_x;  // (C) the time mix's normed input at the last token
  float* S;      // (H, N, N) the wkv state, each head's matrix indexed as its WKV (wkv.h) says
  float* ffn_x;  // (C) the channel mix's normed input at the last token

  static size_t Floats(int C, int N) {
    return 2 * static_cast<size_t>(C) + static_cast<size_t>(C) * N;
  }
  // Layer `layer`'s part of the whole state.
  static HeadLayerState Of(float* state, int layer, int C, int N) {
    float* st = state + layer * Floats(C, N);
    return {st, st + C, st + C + static_cast<size_t>(C) * N};
  }
};

// x (T, C) -> y (T, C): LayerNorm with weight w (C) and bias b (C) of every row.
void LayerNormRows(const float* x, const std::vector<float>& w, const std::vector<float>& b, int T,
                   int C, float eps, float* y);

// x (T, C) += dx (T, C), then xx (T, C) = LayerNorm(x): the residual add of a time mix and the
// channel mix's norm in one pass.
void AddAndNorm(float* x, const float* dx, const std::vector<float>& w, const std::vector<float>& b,
                int T, int C, float eps, float* xx);

// xx (T, C), last (C) -> prev (T, C): the input before each token, `last` for t = 0, then
// xx[t-1]; `last` becomes xx[T-1] (the layer state the next chunk starts from).
void TokenShift(const float* xx, int T, int C, float* last, float* prev);

// TokenShift of each segment of a pass (RwkvModel::Segment: rows [t0, t1) of one sequence)
// from and into its own state: last_of(segment) gives that sequence's `last` (C).
template <typename Segments, typename LastOf>
void TokenShiftSegments(const Segments& segments, const float* xx, int C, LastOf&& last_of,
                        float* prev) {
  for (const auto& g : segments) {
    const size_t o = static_cast<size_t>(g.t0) * C;
    TokenShift(xx + o, g.rows(), C, last_of(g), prev + o);
  }
}

// Row stages, token mixes: xx, prev (T, C), m (C) -> out (T, C).
//   MixLerp (v4, v5):  out = xx m + prev (1 - m)
//   MixAdd (v6, v7):   out = xx + (prev - xx) m
void MixLerp(const float* xx, const float* prev, const float* m, int C, int t0, int t1, float* out);
void MixAdd(const float* xx, const float* prev, const float* m, int C, int t0, int t1, float* out);

// Row stage: wkv (T, C) -> out (T, C), GroupNorm of each row over its H heads with weight w (C)
// and bias b (C) (v5-v7's ln_x).
void GroupNormHeads(const float* wkv, const std::vector<float>& w, const std::vector<float>& b,
                    int C, int H, float eps, int t0, int t1, float* out);

// Row stage: out (T, C) *= g (T, C).
void Gate(const float* g, int C, int t0, int t1, float* out);

// Channel mix (FFN): xk, xr (T, C), key (F, C), value (C, F), receptance (C, C) ->
// x (T, C) += sigmoid(Wr xr) * (Wv relu(Wk xk)^2), without the receptance gate when
// `receptance` is null (v7, which passes no xr).
void ChannelMix(const Tensor& key, const Tensor& value, const Tensor* receptance, const float* xk,
                const float* xr, int T, float* x);

}  // namespace aviary
