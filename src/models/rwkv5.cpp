// RWKV-5 (Eagle). v5.1 as rwkv.cpp names it: per-head decay and bonus, no gate. v5.2: per-
// channel decay w = exp(-exp(time_decay)) and bonus u = time_faaaa, and a SiLU gate.
//   time mix:    xk, xv, xr (, xg) = x m + prev (1 - m); r, k, v = W xr, W xk, W xv
//                o = GroupNorm_H(wkv5(r, k, v)) (* silu(Wg xg)); x += Wo o
//   channel mix: as v4.
// State per layer: att prev x, S [H, N, N], ffn prev x. GroupNorm eps is 1e-5 for v5.
#include <cmath>

#include "models/model_impl.h"
#include "models/stages.h"
#include "tensor/kernels.h"
#include "tensor/wkv.h"

namespace aviary {
namespace {

constexpr float kGroupNormEps = 1e-5f;

class Rwkv5 final : public RwkvModel {
 public:
  Rwkv5(WeightFile wf, ModelInfo info) : RwkvModel(std::move(wf), std::move(info)) {
    const int n = C(), F = info_.n_ffn, H = info_.n_head, N = info_.head_size;
    const bool v52 = info_.arch == Arch::kV5_2;
    for (int l = 0; l < info_.n_layer; ++l) {
      auto B = [&](const char* s) { return Block(l, s); };
      const Weights& w = weights();
      Layer L;
      L.ln1_w = w.Vector(B("ln1.weight"), n);
      L.ln1_b = w.Vector(B("ln1.bias"), n);
      L.ln2_w = w.Vector(B("ln2.weight"), n);
      L.ln2_b = w.Vector(B("ln2.bias"), n);
      L.att_mix_k = w.Vector(B("att.time_mix_k"), n);
      L.att_mix_v = w.Vector(B("att.time_mix_v"), n);
      L.att_mix_r = w.Vector(B("att.time_mix_r"), n);
      if (v52) {
        L.decay = w.Vector(B("att.time_decay"), n);
        L.first = w.Vector(B("att.time_faaaa"), n);
      } else {  // one value per head, the same for all its channels
        const std::vector<float> d = w.Vector(B("att.time_decay"), H);
        const std::vector<float> u = w.Vector(B("att.time_first"), H);
        for (int h = 0; h < H; ++h) {
          L.decay.insert(L.decay.end(), N, d[h]);
          L.first.insert(L.first.end(), N, u[h]);
        }
      }
      L.att_key = w.Matrix(B("att.key.weight"), {n, n});
      L.att_value = w.Matrix(B("att.value.weight"), {n, n});
      L.att_receptance = w.Matrix(B("att.receptance.weight"), {n, n});
      L.att_output = w.Matrix(B("att.output.weight"), {n, n});
      L.has_gate = w.Has(B("att.gate.weight"));
      if (L.has_gate) {
        L.att_mix_g = w.Vector(B("att.time_mix_g"), n);
        L.att_gate = w.Matrix(B("att.gate.weight"), {n, n});
      }
      L.ln_x_w = w.Vector(B("att.ln_x.weight"), n);
      L.ln_x_b = w.Vector(B("att.ln_x.bias"), n);
      L.ffn_mix_k = w.Vector(B("ffn.time_mix_k"), n);
      L.ffn_mix_r = w.Vector(B("ffn.time_mix_r"), n);
      L.ffn_key = w.Matrix(B("ffn.key.weight"), {F, n});
      L.ffn_value = w.Matrix(B("ffn.value.weight"), {n, F});
      L.ffn_receptance = w.Matrix(B("ffn.receptance.weight"), {n, n});
      layers_.push_back(std::move(L));
    }
  }

 private:
  struct Layer {
    std::vector<float> ln1_w, ln1_b, ln2_w, ln2_b;
    std::vector<float> att_mix_k, att_mix_v, att_mix_r, att_mix_g, decay, first, ln_x_w, ln_x_b;
    Tensor att_key, att_value, att_receptance, att_output, att_gate;
    bool has_gate = false;
    std::vector<float> ffn_mix_k, ffn_mix_r;
    Tensor ffn_key, ffn_value, ffn_receptance;
  };

  size_t StateFloatsPerLayer() const override {
    return HeadLayerState::Floats(C(), info_.head_size);
  }

  // The activations of one chunk of T tokens, reused by every layer.
  struct Acts {
    Acts(Scratch& s, size_t T, size_t C) {
      for (float** p : {&x, &xx, &prev, &xk, &xv, &xr, &xg, &k, &v, &r, &g, &wkv, &out, &dx}) {
        *p = s.Take(T * C);
      }
    }
    float* x;             // (T, C) the residual stream
    float* xx;            // (T, C) the normed input of the time mix, then of the channel mix
    float* prev;          // (T, C) xx one token back
    float *xk, *xv, *xr;  // (T, C) xx m + prev (1 - m), one m per input
    float* xg;            // (T, C) likewise, v5.2 only
    float *k, *v, *r;     // (T, C) key, value, receptance
    float* g;             // (T, C) the output gate Wg xg, then silu of it (v5.2 only)
    float* wkv;           // (T, C) wkv5 output
    float* out;           // (T, C) GroupNorm(wkv) (* g): the input of Wo
    float* dx;            // (T, C) Wo out: what the time mix adds to x
  };

  void Forward(std::span<const int32_t> tokens, std::span<const Segment> segments) const override {
    const int T = static_cast<int>(tokens.size());
    Acts acts(Scratch::ForThisThread(), T, C());
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
    // Time mix: x += Wo (GroupNorm(wkv5(r, k, v)) (* silu(g))).
    LayerNormRows(acts.x, L.ln1_w, L.ln1_b, T, n, kLayerNormEps, acts.xx);
    TokenShiftSegments(
        segments, acts.xx, n, [&](const Segment& g) { return StateOf(g, l).att_x; }, acts.prev);
    ForTokens(T, [&](int t0, int t1) {
      MixLerp(acts.xx, acts.prev, L.att_mix_k.data(), n, t0, t1, acts.xk);
      MixLerp(acts.xx, acts.prev, L.att_mix_v.data(), n, t0, t1, acts.xv);
      MixLerp(acts.xx, acts.prev, L.att_mix_r.data(), n, t0, t1, acts.xr);
      if (L.has_gate) MixLerp(acts.xx, acts.prev, L.att_mix_g.data(), n, t0, t1, acts.xg);
    });
    const MatMulJob kvrg[] = {{L.att_key, acts.xk, acts.k},
                              {L.att_value, acts.xv, acts.v},
                              {L.att_receptance, acts.xr, acts.r},
                              {L.att_gate, acts.xg, acts.g}};  // v5.2 only
    MatMulBatch(std::span(kvrg, L.has_gate ? 4 : 3), T);
    ForSegments(segments, T, [&](const Segment& g) {
      const size_t o = static_cast<size_t>(g.t0) * n;
      Wkv5Seq(g.rows(), H, N, acts.r + o, acts.k + o, acts.v + o, L.decay.data(),
              /*decay_per_token=*/false, L.first.data(), StateOf(g, l).S, acts.wkv + o);
    });
    ForTokens(T, [&](int t0, int t1) {
      for (int t = t0; t < t1; ++t) {  // by token: its rows stay in L1 through the stages
        GroupNormHeads(acts.wkv, L.ln_x_w, L.ln_x_b, n, H, kGroupNormEps, t, t + 1, acts.out);
        if (L.has_gate) {
          SiluInPlace(acts.g + static_cast<size_t>(t) * n, n);
          Gate(acts.g, n, t, t + 1, acts.out);
        }
      }
    });
    MatMul(L.att_output, acts.out, T, acts.dx);
    AddAndNorm(acts.x, acts.dx, L.ln2_w, L.ln2_b, T, n, kLayerNormEps, acts.xx);
    // Channel mix: as v4's.
    TokenShiftSegments(
        segments, acts.xx, n, [&](const Segment& g) { return StateOf(g, l).ffn_x; }, acts.prev);
    ForTokens(T, [&](int t0, int t1) {
      MixLerp(acts.xx, acts.prev, L.ffn_mix_k.data(), n, t0, t1, acts.xk);
      MixLerp(acts.xx, acts.prev, L.ffn_mix_r.data(), n, t0, t1, acts.xr);
    });
    ChannelMix(L.ffn_key, L.ffn_value, &L.ffn_receptance, acts.xk, acts.xr, T, acts.x);
  }

  std::vector<Layer> layers_;
};

}  // namespace

std::unique_ptr<Model> MakeRwkv5(WeightFile wf, ModelInfo info) {
  return std::make_unique<Rwkv5>(std::move(wf), std::move(info));
}

}  // namespace aviary
