// RWKV-6 (Finch): data-dependent token shift and decay.
//   sx = prev - xx;  m = tanh((xx + sx maa_x) W1) -> 5 slots of D;  m_s = W2_s m_s
//   xw, xk, xv, xr, xg = xx + sx (maa_* + m_*)           (slot order w, k, v, r, g)
//   r, k, v = W xr, W xk, W xv;  g = silu(Wg xg)
//   w = exp(-exp(time_decay + tanh(xw Wd1) Wd2));  u = time_faaaa
//   x += Wo (GroupNorm_H(wkv5(r, k, v, w, u)) * g)          (GroupNorm eps 64e-5)
//   channel mix: xk = xx + sx maa_k, xr = xx + sx maa_r; as v4 after that.
#include <algorithm>
#include <cmath>

#include "models/model_impl.h"
#include "tensor/kernels.h"
#include "tensor/wkv.h"

namespace aviary {
namespace {

constexpr float kGroupNormEps = 64e-5f;
constexpr int kSlots = 5;  // w, k, v, r, g

class Rwkv6 final : public RwkvModel {
 public:
  Rwkv6(WeightFile wf, ModelInfo info) : RwkvModel(std::move(wf), std::move(info)) {
    const int n = C(), F = info_.n_ffn;
    const Weights& w = weights();
    const Tensor& w1 = w.Get(Block(0, "att.time_maa_w1"));
    if (w1.shape.size() != 2 || w1.shape[0] % kSlots != 0) {
      w.Fail("tensor '" + w1.name + "' must be [5*D, C]");
    }
    mix_rank_ = static_cast<int>(w1.shape[0] / kSlots);
    decay_rank_ = static_cast<int>(w.Get(Block(0, "att.time_decay_w1")).shape[0]);
    const int D = mix_rank_, Dd = decay_rank_;
    for (int l = 0; l < info_.n_layer; ++l) {
      auto B = [&](const char* s) { return Block(l, s); };
      Layer L;
      L.ln1_w = w.Vector(B("ln1.weight"), n);
      L.ln1_b = w.Vector(B("ln1.bias"), n);
      L.ln2_w = w.Vector(B("ln2.weight"), n);
      L.ln2_b = w.Vector(B("ln2.bias"), n);
      L.maa_x = w.Vector(B("att.time_maa_x"), n);
      const char* slot_names[kSlots] = {"att.time_maa_w", "att.time_maa_k", "att.time_maa_v",
                                        "att.time_maa_r", "att.time_maa_g"};
      for (int i = 0; i < kSlots; ++i) L.maa[i] = w.Vector(B(slot_names[i]), n);
      L.maa_w1 = w.Matrix(B("att.time_maa_w1"), {kSlots * D, n});
      L.maa_w2 = w.Matrix(B("att.time_maa_w2"), {kSlots, n, D});
      L.decay = w.Vector(B("att.time_decay"), n);
      L.decay_w1 = w.Matrix(B("att.time_decay_w1"), {Dd, n});
      L.decay_w2 = w.Matrix(B("att.time_decay_w2"), {n, Dd});
      L.first = w.Vector(B("att.time_faaaa"), n);
      L.att_key = w.Matrix(B("att.key.weight"), {n, n});
      L.att_value = w.Matrix(B("att.value.weight"), {n, n});
      L.att_receptance = w.Matrix(B("att.receptance.weight"), {n, n});
      L.att_output = w.Matrix(B("att.output.weight"), {n, n});
      L.att_gate = w.Matrix(B("att.gate.weight"), {n, n});
      L.ln_x_w = w.Vector(B("att.ln_x.weight"), n);
      L.ln_x_b = w.Vector(B("att.ln_x.bias"), n);
      L.ffn_maa_k = w.Vector(B("ffn.time_maa_k"), n);
      L.ffn_maa_r = w.Vector(B("ffn.time_maa_r"), n);
      L.ffn_key = w.Matrix(B("ffn.key.weight"), {F, n});
      L.ffn_value = w.Matrix(B("ffn.value.weight"), {n, F});
      L.ffn_receptance = w.Matrix(B("ffn.receptance.weight"), {n, n});
      layers_.push_back(std::move(L));
    }
  }

 private:
  struct Layer {
    std::vector<float> ln1_w, ln1_b, ln2_w, ln2_b;
    std::vector<float> maa_x, maa[kSlots], decay, first, ln_x_w, ln_x_b;
    Tensor maa_w1, maa_w2, decay_w1, decay_w2;
    Tensor att_key, att_value, att_receptance, att_output, att_gate;
    std::vector<float> ffn_maa_k, ffn_maa_r;
    Tensor ffn_key, ffn_value, ffn_receptance;
  };

  size_t StateFloatsPerLayer() const override {
    return 2 * static_cast<size_t>(C()) + static_cast<size_t>(C()) * info_.head_size;
  }

  void Forward(std::span<const int32_t> tokens, float* state, float* logits,
               bool all_positions) const override {
    const int T = static_cast<int>(tokens.size()), n = C();
    const int H = info_.n_head, N = info_.head_size, D = mix_rank_, Dd = decay_rank_;
    const size_t TC = static_cast<size_t>(T) * n;
    Scratch& s = Scratch::ForThisThread();
    float* x = s.Take(TC);
    float* xx = s.Take(TC);
    float* prev = s.Take(TC);
    float* sx = s.Take(TC);
    float* mixed = s.Take(TC);
    float* low = s.Take(static_cast<size_t>(T) * kSlots * D);
    float* slot_in[kSlots];  // each slot's rows of `low`, contiguous for its MatMul
    for (auto& p : slot_in) p = s.Take(static_cast<size_t>(T) * D);
    float* slot_out[kSlots];
    for (auto& p : slot_out) p = s.Take(TC);
    float* decay_low = s.Take(static_cast<size_t>(T) * Dd);
    float* xs[kSlots];
    for (auto& p : xs) p = s.Take(TC);
    float* r = s.Take(TC);
    float* k = s.Take(TC);
    float* v = s.Take(TC);
    float* g = s.Take(TC);
    float* w = s.Take(TC);
    float* wkv = s.Take(TC);
    float* out = s.Take(TC);
    Embed(tokens, x);
    for (int l = 0; l < info_.n_layer; ++l) {
      const Layer& L = layers_[l];
      float* st = state + l * StateFloatsPerLayer();
      float *att_x = st, *S = st + n, *ffn_x = st + n + static_cast<size_t>(n) * N;

      // Per-token work runs in token ranges (ForTokens: in parallel for a long prompt).
      auto row = [n](float* p, int t) { return p + static_cast<size_t>(t) * n; };
      LayerNormRows(x, L.ln1_w, L.ln1_b, T, n, kLayerNormEps, xx);
      TokenShift(xx, T, n, att_x, prev);
      ForTokens(T, [&](int t0, int t1) {
        for (int t = t0; t < t1; ++t) {
          for (int c = 0; c < n; ++c) {
            const size_t i = static_cast<size_t>(t) * n + c;
            sx[i] = prev[i] - xx[i];
            mixed[i] = xx[i] + sx[i] * L.maa_x[c];
          }
        }
      });
      MatMul(L.maa_w1, mixed, T, low);
      TanhInPlace(low, static_cast<size_t>(T) * kSlots * D);
      for (int slot = 0; slot < kSlots; ++slot) {
        for (int t = 0; t < T; ++t) {
          std::copy_n(low + (static_cast<size_t>(t) * kSlots + slot) * D, D, slot_in[slot] + t * D);
        }
      }
      const Tensor maa_w2[kSlots] = {L.maa_w2.Slice(0), L.maa_w2.Slice(1), L.maa_w2.Slice(2),
                                     L.maa_w2.Slice(3), L.maa_w2.Slice(4)};
      const MatMulJob slot_jobs[kSlots] = {{maa_w2[0], slot_in[0], slot_out[0]},
                                           {maa_w2[1], slot_in[1], slot_out[1]},
                                           {maa_w2[2], slot_in[2], slot_out[2]},
                                           {maa_w2[3], slot_in[3], slot_out[3]},
                                           {maa_w2[4], slot_in[4], slot_out[4]}};
      MatMulBatch(slot_jobs, T);
      ForTokens(T, [&](int t0, int t1) {
        for (int slot = 0; slot < kSlots; ++slot) {
          for (int t = t0; t < t1; ++t) {
            for (int c = 0; c < n; ++c) {
              const size_t i = static_cast<size_t>(t) * n + c;
              xs[slot][i] = xx[i] + sx[i] * (L.maa[slot][c] + slot_out[slot][i]);
            }
          }
        }
      });
      const float *xw = xs[0], *xk = xs[1], *xv = xs[2], *xr = xs[3], *xg = xs[4];
      const MatMulJob rkvgw[] = {{L.att_receptance, xr, r},
                                 {L.att_key, xk, k},
                                 {L.att_value, xv, v},
                                 {L.att_gate, xg, g},
                                 {L.decay_w1, xw, decay_low}};
      MatMulBatch(rkvgw, T);
      TanhInPlace(decay_low, static_cast<size_t>(T) * Dd);
      MatMul(L.decay_w2, decay_low, T, w);
      ForTokens(T, [&](int t0, int t1) {
        const size_t b = static_cast<size_t>(t0) * n, e = static_cast<size_t>(t1) * n;
        SiluInPlace(g + b, e - b);
        for (int t = t0; t < t1; ++t) {  // w = exp(-exp(w + decay))
          for (int c = 0; c < n; ++c) w[static_cast<size_t>(t) * n + c] += L.decay[c];
        }
        ExpInPlace(w + b, e - b);
        for (size_t i = b; i < e; ++i) w[i] = -w[i];
        ExpInPlace(w + b, e - b);
      });
      Wkv5Seq(T, H, N, r, k, v, w, /*decay_per_token=*/true, L.first.data(), S, wkv);
      ForTokens(T, [&](int t0, int t1) {
        for (int t = t0; t < t1; ++t) {
          const size_t o = static_cast<size_t>(t) * n;
          GroupNorm(wkv + o, L.ln_x_w.data(), L.ln_x_b.data(), n, H, kGroupNormEps, out + o);
          for (int c = 0; c < n; ++c) out[o + c] *= g[o + c];
        }
      });
      MatMul(L.att_output, out, T, v);
      ForTokens(T, [&](int t0, int t1) {
        for (size_t i = static_cast<size_t>(t0) * n; i < static_cast<size_t>(t1) * n; ++i) {
          x[i] += v[i];
        }
        LayerNormRows(row(x, t0), L.ln2_w, L.ln2_b, t1 - t0, n, kLayerNormEps, row(xx, t0));
      });
      TokenShift(xx, T, n, ffn_x, prev);
      ForTokens(T, [&](int t0, int t1) {
        MixAdd(row(xx, t0), row(prev, t0), L.ffn_maa_k.data(), t1 - t0, n, row(xs[1], t0));
        MixAdd(row(xx, t0), row(prev, t0), L.ffn_maa_r.data(), t1 - t0, n, row(xs[3], t0));
      });
      ChannelMix(L.ffn_key, L.ffn_value, &L.ffn_receptance, xs[1], xs[3], T, x);
    }
    if (logits) Head(x, T, logits, all_positions);
  }

  int mix_rank_ = 0, decay_rank_ = 0;
  std::vector<Layer> layers_;
};

}  // namespace

std::unique_ptr<Model> MakeRwkv6(WeightFile wf, ModelInfo info) {
  return std::make_unique<Rwkv6>(std::move(wf), std::move(info));
}

}  // namespace aviary
