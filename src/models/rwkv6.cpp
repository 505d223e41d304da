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
#include "models/stages.h"
#include "tensor/kernels.h"
#include "tensor/wkv.h"

namespace aviary {
namespace {

constexpr float kGroupNormEps = 64e-5f;
enum Slot { kW, kK, kV, kR, kG, kSlots };

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
    return HeadLayerState::Floats(C(), info_.head_size);
  }

  // The activations of one chunk of T tokens, reused by every layer. D = the token shift's
  // low-rank width per slot, Dd = the decay's.
  struct Acts {
    Acts(Scratch& s, size_t T, size_t C, size_t D, size_t Dd) {
      for (float** p : {&x, &xx, &prev, &sx, &mixed}) *p = s.Take(T * C);
      mix_low = s.Take(T * kSlots * D);
      for (auto& p : slot_low) p = s.Take(T * D);
      for (auto& p : slot_mix) p = s.Take(T * C);
      decay_low = s.Take(T * Dd);
      for (auto& p : xs) p = s.Take(T * C);
      for (float** p : {&r, &k, &v, &g, &w, &wkv, &out, &dx}) *p = s.Take(T * C);
    }
    float* x;                 // (T, C) the residual stream
    float* xx;                // (T, C) the normed input of the time mix, then of the channel mix
    float* prev;              // (T, C) xx one token back
    float* sx;                // (T, C) prev - xx
    float* mixed;             // (T, C) xx + sx maa_x: the input of the shift's low-rank product
    float* mix_low;           // (T, 5 D) tanh(mixed W1), each token's five slots side by side
    float* slot_low[kSlots];  // (T, D) one slot's columns of mix_low, contiguous for W2_s
    float* slot_mix[kSlots];  // (T, C) slot_low W2_s: the data-dependent part of each mix
    float* xs[kSlots];        // (T, C) xx + sx (maa_s + slot_mix_s) for s in w, k, v, r, g
    float* decay_low;         // (T, Dd) tanh(xw decay_w1)
    float *r, *k, *v;         // (T, C) receptance, key, value
    float* g;                 // (T, C) the output gate silu(Wg xg)
    float* w;                 // (T, C) the decay exp(-exp(decay + decay_low decay_w2))
    float* wkv;               // (T, C) wkv5 output
    float* out;               // (T, C) GroupNorm(wkv) g: the input of Wo
    float* dx;                // (T, C) Wo out: what the time mix adds to x
  };

  void Forward(std::span<const int32_t> tokens, std::span<const Segment> segments) const override {
    const int T = static_cast<int>(tokens.size());
    Acts acts(Scratch::ForThisThread(), T, C(), mix_rank_, decay_rank_);
    Embed(tokens, acts.x);
    for (int l = 0; l < info_.n_layer; ++l) RunLayer(l, segments, acts, T);
    Head(acts.x, segments);
  }

  HeadLayerState StateOf(const Segment& seg, int l) const {
    return HeadLayerState::Of(seg.state, l, C(), info_.head_size);
  }

  void RunLayer(int l, std::span<const Segment> segments, Acts& acts, int T) const {
    const Layer& L = layers_[l];
    const int n = C(), H = info_.n_head, N = info_.head_size;
    // Time mix: x += Wo (GroupNorm(wkv5(r, k, v, w, u)) g).
    LayerNormRows(acts.x, L.ln1_w, L.ln1_b, T, n, kLayerNormEps, acts.xx);
    TokenShiftSegments(
        segments, acts.xx, n, [&](const Segment& g) { return StateOf(g, l).att_x; }, acts.prev);
    MixInputs(L, n, mix_rank_, T, acts);
    Projections(L, decay_rank_, T, acts);
    ForTokens(T, [&](int t0, int t1) { DecayAndGate(L, n, t0, t1, acts); });
    ForSegments(segments, T, [&](const Segment& g) {
      const size_t o = static_cast<size_t>(g.t0) * n;
      Wkv5Seq(g.rows(), H, N, acts.r + o, acts.k + o, acts.v + o, acts.w + o,
              /*decay_per_token=*/true, L.first.data(), StateOf(g, l).S, acts.wkv + o);
    });
    ForTokens(T, [&](int t0, int t1) {
      for (int t = t0; t < t1; ++t) {  // by token: its rows stay in L1 through the stages
        GroupNormHeads(acts.wkv, L.ln_x_w, L.ln_x_b, n, H, kGroupNormEps, t, t + 1, acts.out);
        Gate(acts.g, n, t, t + 1, acts.out);
      }
    });
    MatMul(L.att_output, acts.out, T, acts.dx);
    AddAndNorm(acts.x, acts.dx, L.ln2_w, L.ln2_b, T, n, kLayerNormEps, acts.xx);
    // Channel mix: as v4's, with xk, xr = xx + (prev - xx) maa_k, maa_r.
    TokenShiftSegments(
        segments, acts.xx, n, [&](const Segment& g) { return StateOf(g, l).ffn_x; }, acts.prev);
    ForTokens(T, [&](int t0, int t1) {
      MixAdd(acts.xx, acts.prev, L.ffn_maa_k.data(), n, t0, t1, acts.xs[kK]);
      MixAdd(acts.xx, acts.prev, L.ffn_maa_r.data(), n, t0, t1, acts.xs[kR]);
    });
    ChannelMix(L.ffn_key, L.ffn_value, &L.ffn_receptance, acts.xs[kK], acts.xs[kR], T, acts.x);
  }

  // The data-dependent token shift: xx, prev (T, C) -> xs[s] (T, C) = xx + sx (maa_s + m_s)
  // with sx = prev - xx and m = tanh((xx + sx maa_x) W1) W2, W1 (5 D, C), W2 (5, C, D).
  static void MixInputs(const Layer& L, int C, int D, int T, Acts& acts) {
    const float *xx = acts.xx, *prev = acts.prev;
    float *sx = acts.sx, *mixed = acts.mixed;
    ForTokens(T, [&](int t0, int t1) {
      for (int t = t0; t < t1; ++t) {
        for (int c = 0; c < C; ++c) {
          const size_t i = static_cast<size_t>(t) * C + c;
          sx[i] = prev[i] - xx[i];
          mixed[i] = xx[i] + sx[i] * L.maa_x[c];
        }
      }
    });
    MatMul(L.maa_w1, mixed, T, acts.mix_low);
    TanhInPlace(acts.mix_low, static_cast<size_t>(T) * kSlots * D);
    for (int slot = 0; slot < kSlots; ++slot) {
      for (int t = 0; t < T; ++t) {
        std::copy_n(acts.mix_low + (static_cast<size_t>(t) * kSlots + slot) * D, D,
                    acts.slot_low[slot] + t * D);
      }
    }
    const Tensor maa_w2[kSlots] = {L.maa_w2.Slice(0), L.maa_w2.Slice(1), L.maa_w2.Slice(2),
                                   L.maa_w2.Slice(3), L.maa_w2.Slice(4)};
    const MatMulJob slot_jobs[kSlots] = {{maa_w2[0], acts.slot_low[0], acts.slot_mix[0]},
                                         {maa_w2[1], acts.slot_low[1], acts.slot_mix[1]},
                                         {maa_w2[2], acts.slot_low[2], acts.slot_mix[2]},
                                         {maa_w2[3], acts.slot_low[3], acts.slot_mix[3]},
                                         {maa_w2[4], acts.slot_low[4], acts.slot_mix[4]}};
    MatMulBatch(slot_jobs, T);
    ForTokens(T, [&](int t0, int t1) {
      for (int slot = 0; slot < kSlots; ++slot) {
        for (int t = t0; t < t1; ++t) {
          for (int c = 0; c < C; ++c) {
            const size_t i = static_cast<size_t>(t) * C + c;
            acts.xs[slot][i] = xx[i] + sx[i] * (L.maa[slot][c] + acts.slot_mix[slot][i]);
          }
        }
      }
    });
  }

  // xs (T, C) -> r, k, v, g (T, C) = W xr, W xk, W xv, Wg xg, and w (T, C) = tanh(xw Wd1) Wd2
  // before its offset: the decay's first half runs beside the four large products.
  static void Projections(const Layer& L, int Dd, int T, Acts& acts) {
    const MatMulJob rkvgw[] = {{L.att_receptance, acts.xs[kR], acts.r},
                               {L.att_key, acts.xs[kK], acts.k},
                               {L.att_value, acts.xs[kV], acts.v},
                               {L.att_gate, acts.xs[kG], acts.g},
                               {L.decay_w1, acts.xs[kW], acts.decay_low}};
    MatMulBatch(rkvgw, T);
    TanhInPlace(acts.decay_low, static_cast<size_t>(T) * Dd);
    MatMul(L.decay_w2, acts.decay_low, T, acts.w);
  }

  // Row stage: g = silu(g), w = exp(-exp(decay + w)) (T, C).
  static void DecayAndGate(const Layer& L, int C, int t0, int t1, Acts& acts) {
    float *g = acts.g, *w = acts.w;
    const size_t b = static_cast<size_t>(t0) * C, e = static_cast<size_t>(t1) * C;
    SiluInPlace(g + b, e - b);
    for (int t = t0; t < t1; ++t) {
      for (int c = 0; c < C; ++c) w[static_cast<size_t>(t) * C + c] += L.decay[c];
    }
    ExpInPlace(w + b, e - b);
    for (size_t i = b; i < e; ++i) w[i] = -w[i];
    ExpInPlace(w + b, e - b);
  }

  int mix_rank_ = 0, decay_rank_ = 0;
  std::vector<Layer> layers_;
};

}  // namespace

std::unique_ptr<Model> MakeRwkv6(WeightFile wf, ModelInfo info) {
  return std::make_unique<Rwkv6>(std::move(wf), std::move(info));
}

}  // namespace aviary
