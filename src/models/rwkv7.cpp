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
#include "models/rwkv7_stages.h"
#include "models/stages.h"
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
    return HeadLayerState::Floats(C(), info_.head_size);
  }

  // The activations of one chunk of T tokens, reused by every layer. D = the widest low-rank
  // matrix; each low-rank buffer holds (T, D_s) for its own width D_s <= D.
  struct Acts {
    Acts(Scratch& s, size_t T, size_t C, size_t D) {
      for (float** p : {&x, &xx, &prev}) *p = s.Take(T * C);
      for (auto& p : xs) p = s.Take(T * C);
      for (float** p : {&w_low, &a_low, &g_low, &v_low}) *p = s.Take(T * D);
      for (float** p : {&r, &w, &k, &v, &a, &g, &kk, &v_first, &v_mix, &wkv, &out, &dx}) {
        *p = s.Take(T * C);
      }
    }
    float* x;              // (T, C) the residual stream
    float* xx;             // (T, C) the normed input of the time mix, then of the channel mix
    float* prev;           // (T, C) xx one token back
    float* xs[kSlots];     // (T, C) xx + (prev - xx) x_rwkvag[s] for s in r, w, k, v, a, g
    float* w_low;          // (T, Dw) tanh(xw w1)
    float* a_low;          // (T, Da) xa a1
    float* g_low;          // (T, Dg) sigmoid(xg g1)
    float* v_low;          // (T, Dv) xv v1
    float *r, *w, *k, *v;  // (T, C) receptance, decay, key, value
    float* a;              // (T, C) in-context learning rate
    float* g;              // (T, C) output gate
    float* kk;             // (T, C) normalised k k_k: the key whose old value the state removes
    float* v_first;        // (T, C) layer 0's v, mixed into the v of every later layer
    float* v_mix;          // (T, C) how much of v_first a later layer's v takes
    float* wkv;            // (T, C) wkv7 output
    float* out;            // (T, C) (GroupNorm(wkv) + bonus) g: the input of Wo
    float* dx;             // (T, C) Wo out: what the time mix adds to x
  };

  void Forward(std::span<const int32_t> tokens, std::span<const Segment> segments) const override {
    const int T = static_cast<int>(tokens.size());
    Acts acts(Scratch::ForThisThread(), T, C(), max_rank_);
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
    const bool first_layer = l == 0;
    // Time mix: x += Wo ((GroupNorm(wkv7(r, w, k, v, kk, a)) + bonus) g).
    LayerNormRows(acts.x, L.ln1_w, L.ln1_b, T, n, kLayerNormEps, acts.xx);
    TokenShiftSegments(
        segments, acts.xx, n, [&](const Segment& g) { return StateOf(g, l).att_x; }, acts.prev);
    MixInputs(L, n, T, acts);
    Projections(L, first_layer, T, acts);
    ForTokens(T, [&](int t0, int t1) {
      Rwkv7DecayAndGates(L.w0.data(), L.a0.data(), first_layer ? nullptr : L.v0.data(), n, t0, t1,
                         acts.w, acts.a, acts.v_mix);
      Rwkv7KeysAndValues(L.k_k.data(), L.k_a.data(), first_layer, H, N, t0, t1, acts.a, acts.v_mix,
                         acts.k, acts.v, acts.kk, acts.v_first);
    });
    ForSegments(segments, T, [&](const Segment& g) {
      const size_t o = static_cast<size_t>(g.t0) * n;
      Wkv7Seq(g.rows(), H, N, acts.r + o, acts.w + o, acts.k + o, acts.v + o, acts.kk + o,
              acts.a + o, StateOf(g, l).S, acts.wkv + o);
    });
    ForTokens(T, [&](int t0, int t1) {
      for (int t = t0; t < t1; ++t) {  // by token: its rows stay in L1 through the stages
        GroupNormHeads(acts.wkv, L.ln_x_w, L.ln_x_b, n, H, kGroupNormEps, t, t + 1, acts.out);
        Rwkv7Bonus(L.r_k.data(), H, N, t, t + 1, acts.r, acts.k, acts.v, acts.out);
        Gate(acts.g, n, t, t + 1, acts.out);
      }
    });
    MatMul(L.att_output, acts.out, T, acts.dx);
    AddAndNorm(acts.x, acts.dx, L.ln2_w, L.ln2_b, T, n, kLayerNormEps, acts.xx);
    // Channel mix: x += Wv relu(Wk (xx + (prev - xx) x_k))^2.
    TokenShiftSegments(
        segments, acts.xx, n, [&](const Segment& g) { return StateOf(g, l).ffn_x; }, acts.prev);
    ForTokens(T, [&](int t0, int t1) {
      MixAdd(acts.xx, acts.prev, L.ffn_x_k.data(), n, t0, t1, acts.xs[kK]);
    });
    ChannelMix(L.ffn_key, L.ffn_value, nullptr, acts.xs[kK], nullptr, T, acts.x);
  }

  // xx, prev (T, C) -> xs[s] (T, C) for the six slots, in one pass over the tokens.
  static void MixInputs(const Layer& L, int C, int T, Acts& acts) {
    ForTokens(T, [&](int t0, int t1) {
      for (int slot = 0; slot < kSlots; ++slot) {
        MixAdd(acts.xx, acts.prev, L.x_rwkvag.data() + slot * C, C, t0, t1, acts.xs[slot]);
      }
    });
  }

  // xs (T, C) -> r, k, v (T, C) = W xr, W xk, W xv, and the low-rank products before their
  // offsets: w = tanh(xw w1) w2, a = (xa a1) a2, g = sigmoid(xg g1) g2, v_mix = (xv v1) v2
  // (T, C). Two parallel loops: the first halves beside r, k, v, then the second halves.
  // Layer 0 has no v mix.
  static void Projections(const Layer& L, bool first_layer, int T, Acts& acts) {
    const int v_jobs = first_layer ? 0 : 1;
    const MatMulJob first[] = {
        {L.att_receptance, acts.xs[kR], acts.r}, {L.att_key, acts.xs[kK], acts.k},
        {L.att_value, acts.xs[kV], acts.v},      {L.w1, acts.xs[kW], acts.w_low},
        {L.a1, acts.xs[kA], acts.a_low},         {L.g1, acts.xs[kG], acts.g_low},
        {L.v1, acts.xs[kV], acts.v_low}};
    MatMulBatch(std::span(first, 6 + v_jobs), T);
    TanhInPlace(acts.w_low, static_cast<size_t>(T) * L.w1.rows());
    SigmoidInPlace(acts.g_low, static_cast<size_t>(T) * L.g1.rows());
    const MatMulJob second[] = {{L.w2, acts.w_low, acts.w},
                                {L.a2, acts.a_low, acts.a},
                                {L.g2, acts.g_low, acts.g},
                                {L.v2, acts.v_low, acts.v_mix}};
    MatMulBatch(std::span(second, 3 + v_jobs), T);
  }

  int64_t max_rank_ = 1;
  std::vector<Layer> layers_;
};

}  // namespace

std::unique_ptr<Model> MakeRwkv7(WeightFile wf, ModelInfo info) {
  return std::make_unique<Rwkv7>(std::move(wf), std::move(info));
}

}  // namespace aviary
