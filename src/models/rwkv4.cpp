// RWKV-4 (Raven, Pile, World v4). Per layer:
//   time mix:    xk = x mk + prev (1 - mk) (same for v, r); r = sigmoid(Wr xr), k = Wk xk,
//                v = Wv xv; x += Wo (r * wkv(k, v))   -- wkv: see tensor/wkv.h
//   channel mix: xk, xr likewise; x += sigmoid(Wr xr) * Wv relu(Wk xk)^2
// State per layer: att prev x, aa, bb, pp (starts at -1e30), ffn prev x.
#include <cmath>

#include "models/model_impl.h"
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

  void Forward(std::span<const int32_t> tokens, float* state, float* logits,
               bool all_positions) const override {
    const int T = static_cast<int>(tokens.size()), n = C();
    const size_t TC = static_cast<size_t>(T) * n;
    Scratch& s = Scratch::ForThisThread();
    float* x = s.Take(TC);
    float* xx = s.Take(TC);
    float* prev = s.Take(TC);
    float* xk = s.Take(TC);
    float* xv = s.Take(TC);
    float* xr = s.Take(TC);
    float* k = s.Take(TC);
    float* v = s.Take(TC);
    float* r = s.Take(TC);
    float* out = s.Take(TC);
    Embed(tokens, x);
    for (int l = 0; l < info_.n_layer; ++l) {
      const Layer& L = layers_[l];
      float* st = state + l * StateFloatsPerLayer();
      float *att_x = st, *aa = st + n, *bb = st + 2 * n, *pp = st + 3 * n, *ffn_x = st + 4 * n;

      LayerNormRows(x, L.ln1_w, L.ln1_b, T, n, kLayerNormEps, xx);
      TokenShift(xx, T, n, att_x, prev);
      MixLerp(xx, prev, L.att_mix_k.data(), T, n, xk);
      MixLerp(xx, prev, L.att_mix_v.data(), T, n, xv);
      MixLerp(xx, prev, L.att_mix_r.data(), T, n, xr);
      const MatMulJob kvr[] = {{L.att_key, xk, k}, {L.att_value, xv, v}, {L.att_receptance, xr, r}};
      MatMulBatch(kvr, T);
      Wkv4Seq(T, n, k, v, L.time_first.data(), L.time_decay.data(), aa, bb, pp, out);
      ForTokens(T, [&](int t0, int t1) {  // in parallel for a long prompt
        const size_t b = static_cast<size_t>(t0) * n, e = static_cast<size_t>(t1) * n;
        SigmoidInPlace(r + b, e - b);
        for (size_t i = b; i < e; ++i) out[i] *= r[i];
      });
      MatMul(L.att_output, out, T, v);
      ForTokens(T, [&](int t0, int t1) {
        for (size_t i = static_cast<size_t>(t0) * n; i < static_cast<size_t>(t1) * n; ++i) {
          x[i] += v[i];
        }
      });

      LayerNormRows(x, L.ln2_w, L.ln2_b, T, n, kLayerNormEps, xx);
      TokenShift(xx, T, n, ffn_x, prev);
      MixLerp(xx, prev, L.ffn_mix_k.data(), T, n, xk);
      MixLerp(xx, prev, L.ffn_mix_r.data(), T, n, xr);
      ChannelMix(L.ffn_key, L.ffn_value, &L.ffn_receptance, xk, xr, T, x);
    }
    if (logits) Head(x, T, logits, all_positions);
  }

  std::vector<Layer> layers_;
};

}  // namespace

std::unique_ptr<Model> MakeRwkv4(WeightFile wf, ModelInfo info) {
  return std::make_unique<Rwkv4>(std::move(wf), std::move(info));
}

}  // namespace aviary
