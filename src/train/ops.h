// The backward passes of the stages training shares with inference, each named after its
// forward (tensor/kernels.h, models/stages.h, models/rwkv7_stages.h), llm.c style: what the
// forward computed, then how its gradient flows. Buffers are row-major (M, C) over M = B T
// token rows; "+=" marks outputs that accumulate, because in RWKV one activation feeds several
// stages (the residual stream, the mixed inputs, v_first).
//
// Gradients of parameters are sums over the rows. They are summed column by column in row
// order (SumOverRows), so a result never depends on the thread count.
#pragma once

#include <cstddef>
#include <cstdint>

#include "tensor/thread_pool.h"

namespace aviary::train {

// out[c] += sum over rows m of term(m, c), for c < C; columns are split over the threads, rows
// are summed in order. Nothing when out is null (a frozen parameter).
template <typename F>
void SumOverRows(int64_t M, int64_t C, float* out, F&& term) {
  if (!out) return;
  constexpr int64_t kColumns = 64;
  ParallelForRanges(C, kColumns, [&](int64_t c0, int64_t c1) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = c0; c < c1; ++c) out[c] += term(m, c);
    }
  });
}

// Forward: y = LayerNorm(x) w + b per row (the kernels' LayerNorm).
void LayerNormRows(const float* x, const float* w, const float* b, int64_t M, int C, float eps,
                   float* y);
// Backward: dx += the gradient through the norm of dy; dw += sum dy xhat; db += sum dy.
void LayerNormRowsBackward(const float* x, const float* w, const float* dy, int64_t M, int C,
                           float eps, float* dx, float* dw, float* db);

// Forward (GroupNorm, v5-v7's ln_x): each row's H groups of C / H normalised on their own.
// Backward: dx = the gradient through the norm of dy (overwritten); dw, db += as above.
void GroupNormRowsBackward(const float* x, const float* w, const float* dy, int64_t M, int C, int H,
                           float eps, float* dx, float* dw, float* db);

// Forward (TokenShift): prev[b, t] = xx[b, t - 1], and the state's last row for t = 0; the
// state's last row becomes xx[b, T - 1].
// Backward: dxx[b, t - 1] += dprev[b, t]; d_last_in[b] = dprev[b, 0] (when not null);
// dxx[b, T - 1] += d_last_out[b] (when not null). d_last_in/out[b] point into the states.
void TokenShiftBackward(const float* dprev, int B, int T, int C, float* dxx,
                        float* const* d_last_in, const float* const* d_last_out);

// Forward (MixAdd, v6/v7): out = xx + (prev - xx) m.
// Backward: dxx += dout (1 - m); dprev += dout m; dm += sum dout (prev - xx).
void MixAddBackward(const float* xx, const float* prev, const float* m, const float* dout,
                    int64_t M, int C, float* dxx, float* dprev, float* dm);

// Forward (Wkv7Seq, tensor/wkv.h) per sequence and head, state S [value i][key j]:
//   sa = S a;  S = S diag(w) + sa b^T + v k^T;  y = S r,  with a = -kk, b = kk (in-context rate).
// Backward over one sequence of T tokens (C = H N per row), given the states saved every
// `every` tokens by the forward (ckpt: (T / every + 1, H, N, N), the first the start state):
// dr, dw, dk, dv, dkk, da are written (overwritten); dS: (H, N, N) holds the gradient with
// respect to the end state on entry and the one with respect to the start state on return.
// Heads run in parallel; SIMD unless the runtime asks for the reference kernels
// (wkv7_backward.cpp).
void Wkv7Backward(int T, int H, int N, const float* r, const float* w, const float* k,
                  const float* v, const float* kk, const float* a, const float* dy,
                  const float* ckpt, int every, float* dS, float* dr, float* dw, float* dk,
                  float* dv, float* dkk, float* da);

// Forward: the head's logits (rows, V) for `rows` token rows, then per row the cross-entropy
// -log softmax(logits)[target]. Backward in the same pass (the logits are not kept: a World
// vocabulary's logits for a batch would be gigabytes): dlogits = scale (softmax - onehot) plus
// RWKV-LM's L2Wrap, scale 1e-4 max(logits) at the argmax, which keeps the logits from
// drifting upward. Returns the summed loss; `correct` counts argmax == target.
double CrossEntropyRows(float* logits, const int32_t* targets, int64_t rows, int V, float scale,
                        bool backward, int64_t* correct);

}  // namespace aviary::train
