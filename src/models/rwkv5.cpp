// RWKV-5 (Eagle). v5.1 as rwkv.cpp names it: per-head decay and bonus, no gate. v5.2: per-
// channel decay w = exp(-exp(time_decay)) and bonus u = time_faaaa, and a SiLU gate.
//   time mix:    xk, xv, xr (, xg) = x m + prev (1 - m); r, k, v = W xr, W xk, W xv
//                o = GroupNorm_H(wkv5(r, k, v)) (* silu(Wg xg)); x += Wo o
//   channel mix: as v4.
// State per layer: att prev x, S [H, N, N], ffn prev x. GroupNorm eps is 1e-5 for v5.
#include <cmath>

#include "models/model_impl.h"
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
    return 2 * static_cast<size_t>(C()) + static_cast<size_t>(C()) * info_.head_size;
  }

  void Forward(std::span<const int32_t> tokens, float* state, float* logits,
               bool all_positions) const override {
    const int T = static_cast<int>(tokens.size()), n = C();
    const int H = info_.n_head, N = info_.head_size;
    const size_t TC = static_cast<size_t>(T) * n;
    Scratch& s = Scratch::ForThisThread();
    float* x = s.Take(TC);
    float* xx = s.Take(TC);
    float* prev = s.Take(TC);
    float* xk = s.Take(TC);
    float* xv = s.Take(TC);
    float* xr = s.Take(TC);
    float* xg = s.Take(TC);
    float* k = s.Take(TC);
    float* v = s.Take(TC);
    float* r = s.Take(TC);
    float* g = s.Take(TC);
    float* wkv = s.Take(TC);
    float* out = s.Take(TC);
    Embed(tokens, x);
    for (int l = 0; l < info_.n_layer; ++l) {
      const Layer& L = layers_[l];
      float* st = state + l * StateFloatsPerLayer();
      float *att_x = st, *S = st + n, *ffn_x = st + n + static_cast<size_t>(n) * N;

      LayerNormRows(x, L.ln1_w, L.ln1_b, T, n, kLayerNormEps, xx);
      TokenShift(xx, T, n, att_x, prev);
      MixLerp(xx, prev, L.att_mix_k.data(), T, n, xk);
      MixLerp(xx, prev, L.att_mix_v.data(), T, n, xv);
      MixLerp(xx, prev, L.att_mix_r.data(), T, n, xr);
      if (L.has_gate) MixLerp(xx, prev, L.att_mix_g.data(), T, n, xg);
      const MatMulJob kvrg[] = {{L.att_key, xk, k},
                                {L.att_value, xv, v},
                                {L.att_receptance, xr, r},
                                {L.att_gate, xg, g}};  // v5.2 only
      MatMulBatch(std::span(kvrg, L.has_gate ? 4 : 3), T);
      Wkv5Seq(T, H, N, r, k, v, L.decay.data(), /*decay_per_token=*/false, L.first.data(), S,
              wkv);
      ForTokens(T, [&](int t0, int t1) {  // in parallel for a long prompt
        for (int t = t0; t < t1; ++t) {
          const size_t o = static_cast<size_t>(t) * n;
          GroupNorm(wkv + o, L.ln_x_w.data(), L.ln_x_b.data(), n, H, kGroupNormEps, out + o);
          if (L.has_gate) {
            SiluInPlace(g + o, n);
            for (int c = 0; c < n; ++c) out[o + c] *= g[o + c];
          }
        }
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

std::unique_ptr<Model> MakeRwkv5(WeightFile wf, ModelInfo info) {
  return std::make_unique<Rwkv5>(std::move(wf), std::move(info));
}

}  // namespace aviary
