// RWKV-7 (Goose), following BlinkDL's rwkv_v7_demo.py / rwkv_v7_numpy.py:
//   sx = prev - xx;  x_s = xx + sx x_s for s in r, w, k, v, a, g  (stacked as x_rwkvag)
//   r, k, v = W xr, W xk, W xv
//   w = exp(-e^-0.5 sigmoid(w0 + tanh(xw w1) w2))      (= exp(-exp(-softplus(-z) - 0.5)))
//   a = sigmoid(a0 + (xa a1) a2);  g = sigmoid(xg g1) g2
//   kk = normalize_per_head(k k_k);  k = k (1 + (a - 1) k_a)
//   layer 0: v_first = v;  later: v += (v_first - v) sigmoid(v0 + (xv v1) v2)
//   o = GroupNorm_H(wkv7(r, w, k, v, kk, a)) + (sum_head(r k r_k)) v;  x += Wo (o g)
//   channel mix: k = relu(Wk (xx + sx x_k))^2; x += Wv k
#include <algorithm>
#include <cmath>

#include "models/model_impl.h"
#include "tensor/kernels.h"
#include "tensor/wkv.h"

namespace aviary {
namespace {

constexpr float kGroupNormEps = 64e-5f;
enum Slot { kR, kW, kK, kV, kA, kG, kSlots };

class Rwkv7 final : public RwkvModel {
 public:
  Rwkv7(WeightFile wf, ModelInfo info) : RwkvModel(std::move(wf), std::move(info)) {
    const int n = C(), F = info_.n_ffn, H = info_.n_head, N = info_.head_size;
    const Weights& w = weights();
    auto rank = [&](const std::string& name) {
      const Tensor& t = w.Get(name);
      if (t.shape.size() != 2) w.Fail("tensor '" + name + "' must be 2-D");
      return t.shape[0];
    };
    for (int l = 0; l < info_.n_layer; ++l) {
      auto B = [&](const char* s) { return Block(l, s); };
      Layer L;
      L.ln1_w = w.Vector(B("ln1.weight"), n);
      L.ln1_b = w.Vector(B("ln1.bias"), n);
      L.ln2_w = w.Vector(B("ln2.weight"), n);
      L.ln2_b = w.Vector(B("ln2.bias"), n);
      L.x_rwkvag = w.Vector(B("att.x_rwkvag"), kSlots * static_cast<int64_t>(n));
      L.w0 = w.Vector(B("att.w0"), n);
      L.a0 = w.Vector(B("att.a0"), n);
      const int64_t Dw = rank(B("att.w1")), Da = rank(B("att.a1")), Dg = rank(B("att.g1"));
      L.w1 = w.Matrix(B("att.w1"), {Dw, n});
      L.w2 = w.Matrix(B("att.w2"), {n, Dw});
      L.a1 = w.Matrix(B("att.a1"), {Da, n});
      L.a2 = w.Matrix(B("att.a2"), {n, Da});
      L.g1 = w.Matrix(B("att.g1"), {Dg, n});
      L.g2 = w.Matrix(B("att.g2"), {n, Dg});
      if (l > 0) {
        const int64_t Dv = rank(B("att.v1"));
        L.v0 = w.Vector(B("att.v0"), n);
        L.v1 = w.Matrix(B("att.v1"), {Dv, n});
        L.v2 = w.Matrix(B("att.v2"), {n, Dv});
      }
      L.k_k = w.Vector(B("att.k_k"), n);
      L.k_a = w.Vector(B("att.k_a"), n);
      L.r_k = w.Vector(B("att.r_k"), static_cast<int64_t>(H) * N);
      L.att_key = w.Matrix(B("att.key.weight"), {n, n});
      L.att_value = w.Matrix(B("att.value.weight"), {n, n});
      L.att_receptance = w.Matrix(B("att.receptance.weight"), {n, n});
      L.att_output = w.Matrix(B("att.output.weight"), {n, n});
      L.ln_x_w = w.Vector(B("att.ln_x.weight"), n);
      L.ln_x_b = w.Vector(B("att.ln_x.bias"), n);
      L.ffn_x_k = w.Vector(B("ffn.x_k"), n);
      L.ffn_key = w.Matrix(B("ffn.key.weight"), {F, n});
      L.ffn_value = w.Matrix(B("ffn.value.weight"), {n, F});
      max_rank_ = std::max({max_rank_, Dw, Da, Dg, L.v1.rows()});
      layers_.push_back(std::move(L));
    }
  }

 private:
  struct Layer {
    std::vector<float> ln1_w, ln1_b, ln2_w, ln2_b;
    std::vector<float> x_rwkvag, w0, a0, v0, k_k, k_a, r_k, ln_x_w, ln_x_b;
    Tensor w1, w2, a1, a2, g1, g2, v1, v2;
    Tensor att_key, att_value, att_receptance, att_output;
    std::vector<float> ffn_x_k;
    Tensor ffn_key, ffn_value;
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
    float* xs[kSlots];
    for (auto& p : xs) p = s.Take(TC);
    const size_t low_size = static_cast<size_t>(T) * max_rank_;
    float* low_w = s.Take(low_size);
    float* low_a = s.Take(low_size);
    float* low_g = s.Take(low_size);
    float* low_v = s.Take(low_size);
    float* r = s.Take(TC);
    float* w = s.Take(TC);
    float* k = s.Take(TC);
    float* v = s.Take(TC);
    float* a = s.Take(TC);
    float* g = s.Take(TC);
    float* kk = s.Take(TC);
    float* v_first = s.Take(TC);
    float* vmix = s.Take(TC);
    float* wkv = s.Take(TC);
    float* out = s.Take(TC);
    const float decay_scale = std::exp(-0.5f);
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
        for (int slot = 0; slot < kSlots; ++slot) {
          MixAdd(row(xx, t0), row(prev, t0), L.x_rwkvag.data() + slot * n, t1 - t0, n,
                 row(xs[slot], t0));
        }
      });
      // Two parallel loops: every product of the mixed inputs (the low-rank first halves run
      // beside r, k, v), then the low-rank second halves. Layer 0 has no v mix.
      const int v_jobs = l > 0 ? 1 : 0;
      const MatMulJob first[] = {{L.att_receptance, xs[kR], r}, {L.att_key, xs[kK], k},
                                 {L.att_value, xs[kV], v},       {L.w1, xs[kW], low_w},
                                 {L.a1, xs[kA], low_a},          {L.g1, xs[kG], low_g},
                                 {L.v1, xs[kV], low_v}};
      MatMulBatch(std::span(first, 6 + v_jobs), T);
      TanhInPlace(low_w, static_cast<size_t>(T) * L.w1.rows());
      SigmoidInPlace(low_g, static_cast<size_t>(T) * L.g1.rows());
      const MatMulJob second[] = {
          {L.w2, low_w, w}, {L.a2, low_a, a}, {L.g2, low_g, g}, {L.v2, low_v, vmix}};
      MatMulBatch(std::span(second, 3 + v_jobs), T);
      ForTokens(T, [&](int t0, int t1) {
        const size_t b = static_cast<size_t>(t0) * n, e = static_cast<size_t>(t1) * n;
        // w = exp(-e^-0.5 sigmoid(w0 + w)), a = sigmoid(a0 + a), the v mix
        // sigmoid(v0 + vmix): the transcendental parts in whole-range (SIMD) passes.
        for (int t = t0; t < t1; ++t) {
          for (int c = 0; c < n; ++c) {
            const size_t i = static_cast<size_t>(t) * n + c;
            w[i] = L.w0[c] + w[i];
            a[i] = L.a0[c] + a[i];
            if (l > 0) vmix[i] = L.v0[c] + vmix[i];
          }
        }
        SigmoidInPlace(w + b, e - b);
        for (size_t i = b; i < e; ++i) w[i] = -decay_scale * w[i];
        ExpInPlace(w + b, e - b);
        SigmoidInPlace(a + b, e - b);
        if (l > 0) SigmoidInPlace(vmix + b, e - b);
        for (int t = t0; t < t1; ++t) {
          for (int c = 0; c < n; ++c) {
            const size_t i = static_cast<size_t>(t) * n + c;
            kk[i] = k[i] * L.k_k[c];
            k[i] = k[i] * (1.0f + (a[i] - 1.0f) * L.k_a[c]);
            if (l == 0) {
              v_first[i] = v[i];
            } else {
              v[i] += (v_first[i] - v[i]) * vmix[i];
            }
          }
          for (int h = 0; h < H; ++h) {  // kk /= max(|kk|, 1e-12) per head
            float* kh = row(kk, t) + h * N;
            float norm = 0.0f;
            for (int j = 0; j < N; ++j) norm += kh[j] * kh[j];
            const float inv = 1.0f / std::max(std::sqrt(norm), 1e-12f);
            for (int j = 0; j < N; ++j) kh[j] *= inv;
          }
        }
      });
      Wkv7Seq(T, H, N, r, w, k, v, kk, a, S, wkv);
      ForTokens(T, [&](int t0, int t1) {
        for (int t = t0; t < t1; ++t) {
          const size_t o = static_cast<size_t>(t) * n;
          GroupNorm(wkv + o, L.ln_x_w.data(), L.ln_x_b.data(), n, H, kGroupNormEps, out + o);
          for (int h = 0; h < H; ++h) {  // the r.k bonus, added after the norm
            float bonus = 0.0f;
            for (int j = 0; j < N; ++j) {
              const size_t i = o + h * N + j;
              bonus += r[i] * k[i] * L.r_k[h * N + j];
            }
            for (int j = 0; j < N; ++j) out[o + h * N + j] += bonus * v[o + h * N + j];
          }
          for (int c = 0; c < n; ++c) out[o + c] *= g[o + c];
        }
      });
      MatMul(L.att_output, out, T, r);
      ForTokens(T, [&](int t0, int t1) {
        for (size_t i = static_cast<size_t>(t0) * n; i < static_cast<size_t>(t1) * n; ++i) {
          x[i] += r[i];
        }
        LayerNormRows(row(x, t0), L.ln2_w, L.ln2_b, t1 - t0, n, kLayerNormEps, row(xx, t0));
      });
      TokenShift(xx, T, n, ffn_x, prev);
      MixAdd(xx, prev, L.ffn_x_k.data(), T, n, xs[kK]);
      ChannelMix(L.ffn_key, L.ffn_value, nullptr, xs[kK], nullptr, T, x);
    }
    if (logits) Head(x, T, logits, all_positions);
  }

  int64_t max_rank_ = 1;
  std::vector<Layer> layers_;
};

}  // namespace

std::unique_ptr<Model> MakeRwkv7(WeightFile wf, ModelInfo info) {
  return std::make_unique<Rwkv7>(std::move(wf), std::move(info));
}

}  // namespace aviary
