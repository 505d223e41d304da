// RWKV-4 (Raven, Pile, World v4). Per layer:
//   time mix:    xk = x mk + prev (1 - mk) (same for v, r); r = sigmoid(Wr xr), k = Wk xk,
//                v = Wv xv; x += Wo (r * wkv(k, v))   -- wkv: see tensor/wkv.h
//   channel mix: xk, xr likewise; x += sigmoid(Wr xr) * Wv relu(Wk xk)^2
// State per layer: att prev x, aa, bb, pp (starts at -1e30), ffn prev x.
#include <cmath>

#include "models/model_impl.h"
#include "models/stages.h"
#include "tensor/kernels.h"
#include "tensor/wkv.h"

namespace aviary {
namespace {

class Rwkv4 final : public RwkvModel {
 public:
  Rwkv4(WeightFile wf, ModelInfo info) : RwkvModel(std::move(wf), std::move(info)) {
    const int n = C(), F = info_.n_ffn;
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
      L.time_first = w.Vector(B("att.time_first"), n);
      L.time_decay = w.Vector(B("att.time_decay"), n);
      L.att_key = w.Matrix(B("att.key.weight"), {n, n});
      L.att_value = w.Matrix(B("att.value.weight"), {n, n});
      L.att_receptance = w.Matrix(B("att.receptance.weight"), {n, n});
      L.att_output = w.Matrix(B("att.output.weight"), {n, n});
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
    std::vector<float> att_mix_k, att_mix_v, att_mix_r, time_first, time_decay;
    Tensor att_key, att_value, att_receptance, att_output;
    std::vector<float> ffn_mix_k, ffn_mix_r;
    Tensor ffn_key, ffn_value, ffn_receptance;
  };

  size_t StateFloatsPerLayer() const override { return 5 * static_cast<size_t>(C()); }
  void InitLayerState(float* s) const override {
    RwkvModel::InitLayerState(s);
    std::fill_n(s + 3 * C(), C(), -1e30f);  // pp: log of the (empty) denominator
  }

  // One layer's part of the state, each (C).
  struct LayerState {
    float* att_x;    // the time mix's normed input at the last token
    float *aa, *bb;  // wkv4's numerator and denominator, scaled by e^-pp
    float* pp;       // wkv4's running exponent
    float* ffn_x;    // the channel mix's normed input at the last token
  };
  LayerState StateOfLayer(float* state, int layer) const {
    float* st = state + layer * StateFloatsPerLayer();
    const int n = C();
    return {st, st + n, st + 2 * n, st + 3 * n, st + 4 * n};
  }

  // The activations of one chunk of T tokens, reused by every layer.
  struct Acts {
    Acts(Scratch& s, size_t T, size_t C) {
      for (float** p : {&x, &xx, &prev, &xk, &xv, &xr, &k, &v, &r, &out, &dx}) {
        *p = s.Take(T * C);
      }
    }
    float* x;             // (T, C) the residual stream
    float* xx;            // (T, C) the normed input of the time mix, then of the channel mix
    float* prev;          // (T, C) xx one token back
    float *xk, *xv, *xr;  // (T, C) xx m + prev (1 - m), one m per input
    float *k, *v, *r;     // (T, C) key, value, receptance
    float* out;           // (T, C) wkv4(k, v), then times sigmoid(r): the input of Wo
    float* dx;            // (T, C) Wo out: what the time mix adds to x
  };

  void Forward(std::span<const int32_t> tokens, std::span<const Segment> segments) const override {
    const int T = static_cast<int>(tokens.size());
    Acts acts(Scratch::ForThisThread(), T, C());
    Embed(tokens, acts.x);
    for (int l = 0; l < info_.n_layer; ++l) RunLayer(l, segments, acts, T);
    Head(acts.x, segments);
  }

  void RunLayer(int l, std::span<const Segment> segments, Acts& acts, int T) const {
    const Layer& L = layers_[l];
    const int n = C();
    // Time mix: x += Wo (sigmoid(r) wkv4(k, v)).
    LayerNormRows(acts.x, L.ln1_w, L.ln1_b, T, n, kLayerNormEps, acts.xx);
    TokenShiftSegments(
        segments, acts.xx, n, [&](const Segment& g) { return StateOfLayer(g.state, l).att_x; },
        acts.prev);
    ForTokens(T, [&](int t0, int t1) {
      MixLerp(acts.xx, acts.prev, L.att_mix_k.data(), n, t0, t1, acts.xk);
      MixLerp(acts.xx, acts.prev, L.att_mix_v.data(), n, t0, t1, acts.xv);
      MixLerp(acts.xx, acts.prev, L.att_mix_r.data(), n, t0, t1, acts.xr);
    });
    const MatMulJob kvr[] = {{L.att_key, acts.xk, acts.k},
                             {L.att_value, acts.xv, acts.v},
                             {L.att_receptance, acts.xr, acts.r}};
    MatMulBatch(kvr, T);
    ForSegments(segments, T, [&](const Segment& g) {
      const size_t o = static_cast<size_t>(g.t0) * n;
      const LayerState s = StateOfLayer(g.state, l);
      Wkv4Seq(g.rows(), n, acts.k + o, acts.v + o, L.time_first.data(), L.time_decay.data(), s.aa,
              s.bb, s.pp, acts.out + o);
    });
    ForTokens(T, [&](int t0, int t1) {
      const size_t b = static_cast<size_t>(t0) * n, e = static_cast<size_t>(t1) * n;
      SigmoidInPlace(acts.r + b, e - b);
      Gate(acts.r, n, t0, t1, acts.out);
    });
    MatMul(L.att_output, acts.out, T, acts.dx);
    AddAndNorm(acts.x, acts.dx, L.ln2_w, L.ln2_b, T, n, kLayerNormEps, acts.xx);
    // Channel mix: x += sigmoid(Wr xr) (Wv relu(Wk xk)^2).
    TokenShiftSegments(
        segments, acts.xx, n, [&](const Segment& g) { return StateOfLayer(g.state, l).ffn_x; },
        acts.prev);
    ForTokens(T, [&](int t0, int t1) {
      MixLerp(acts.xx, acts.prev, L.ffn_mix_k.data(), n, t0, t1, acts.xk);
      MixLerp(acts.xx, acts.prev, L.ffn_mix_r.data(), n, t0, t1, acts.xr);
    });
    ChannelMix(L.ffn_key, L.ffn_value, &L.ffn_receptance, acts.xk, acts.xr, T, acts.x);
  }

  std::vector<Layer> layers_;
};

}  // namespace

std::unique_ptr<Model> MakeRwkv4(WeightFile wf, ModelInfo info) {
  return std::make_unique<Rwkv4>(std::move(wf), std::move(info));
}

}  // namespace aviary
