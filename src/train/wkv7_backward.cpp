// The backward pass of the RWKV-7 wkv recurrence (declared in ops.h), per head: Highway SIMD
// over the key dimension j (state rows S[i][:] are contiguous), and the scalar loops of the same
// arithmetic as the reference (Kernels::kReference, and heads whose size no vector divides).
//
// Per token, with S the state before it and S1 after (sa = S a, a = -kk, b = kk * rate):
//   y = S1 r                         dr = S1^T dy;  dS1 += dy r^T
//   S1 = S diag(w) + sa b^T + v k^T  dw = colsum(dS1 * S); db = dS1^T sa; dk = dS1^T v;
//                                    dv = dS1 k; dsa = dS1 b
//   sa = S a                         da = S^T dsa;  dS = dS1 diag(w) + dsa a^T
// Each state row i is read once per token by one pass that does everything but the last line,
// and a second that does the last: dsa_i needs the whole row of dS1 first.

#ifndef AVIARY_WKV7_BACKWARD_ONCE
#define AVIARY_WKV7_BACKWARD_ONCE
#include <algorithm>
#include <cstring>
#include <vector>

#include "tensor/kernels.h"
#include "tensor/simd_targets.h"
#include "tensor/thread_pool.h"
#include "train/ops.h"

namespace aviary::train {

// The arguments of one head's backward pass over one sequence. Rows have C = H N floats;
// pointers are to the sequence's first row, or to the head's N x N blocks.
struct Wkv7HeadArgs {
  int T, C, N, h, every;
  const float *r, *w, *k, *v, *kk, *a, *dy;
  const float* ckpt;  // (intervals + 1, H, N, N)
  float* dS;          // (N, N) this head's
  float *dr, *dw, *dk, *dv, *dkk, *da;
};

}  // namespace aviary::train
#endif  // AVIARY_WKV7_BACKWARD_ONCE

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "train/wkv7_backward.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace aviary::train {
namespace HWY_NAMESPACE {
namespace {

namespace hn = hwy::HWY_NAMESPACE;

// The widest head the stack buffers hold; longer heads take the scalar code.
constexpr int kMaxHead = 256;

template <class D>
void BackwardHead(D d, const Wkv7HeadArgs& p) {
  using V = hn::Vec<D>;
  const int N = p.N, C = p.C, L = static_cast<int>(hn::Lanes(d));
  const size_t NN = static_cast<size_t>(N) * N;
  const int H = C / N;
  thread_local std::vector<float> states, sas;
  states.resize((p.every + 1) * NN);
  sas.resize(static_cast<size_t>(p.every) * N);
  HWY_ALIGN float av[kMaxHead], bv[kMaxHead], dr[kMaxHead], dw[kMaxHead], db[kMaxHead],
      dk[kMaxHead], da[kMaxHead];
  auto load_ab = [&](size_t o) {
    for (int j = 0; j < N; j += L) {
      const V kk = hn::LoadU(d, p.kk + o + j);
      hn::Store(hn::Neg(kk), d, av + j);
      hn::Store(hn::Mul(kk, hn::LoadU(d, p.a + o + j)), d, bv + j);
    }
  };
  const int intervals = (p.T + p.every - 1) / p.every;
  for (int q = intervals - 1; q >= 0; --q) {
    const int t0 = q * p.every, t1 = std::min(p.T, t0 + p.every);
    std::memcpy(states.data(), p.ckpt + (static_cast<size_t>(q) * H + p.h) * NN,
                NN * sizeof(float));
    for (int t = t0; t < t1; ++t) {  // the states of the interval, again
      const size_t o = static_cast<size_t>(t) * C + static_cast<size_t>(p.h) * N;
      load_ab(o);
      const float* S = states.data() + (t - t0) * NN;
      float* S1 = states.data() + (t - t0 + 1) * NN;
      float* sa = sas.data() + static_cast<size_t>(t - t0) * N;
      for (int i = 0; i < N; ++i) {
        V acc = hn::Zero(d);
        for (int j = 0; j < N; j += L)
          acc = hn::MulAdd(hn::LoadU(d, S + i * N + j), hn::Load(d, av + j), acc);
        sa[i] = hn::GetLane(hn::SumOfLanes(d, acc));
        const V s = hn::Set(d, sa[i]), vi = hn::Set(d, p.v[o + i]);
        for (int j = 0; j < N; j += L) {
          V x = hn::Mul(hn::LoadU(d, S + i * N + j), hn::LoadU(d, p.w + o + j));
          x = hn::MulAdd(s, hn::Load(d, bv + j), x);
          x = hn::MulAdd(vi, hn::LoadU(d, p.k + o + j), x);
          hn::StoreU(x, d, S1 + i * N + j);
        }
      }
    }
    for (int t = t1 - 1; t >= t0; --t) {
      const size_t o = static_cast<size_t>(t) * C + static_cast<size_t>(p.h) * N;
      load_ab(o);
      const float* S = states.data() + (t - t0) * NN;
      const float* S1 = states.data() + (t - t0 + 1) * NN;
      const float* sa = sas.data() + static_cast<size_t>(t - t0) * N;
      for (int j = 0; j < N; j += L) {
        for (float* acc : {dr, dw, db, dk, da}) hn::Store(hn::Zero(d), d, acc + j);
      }
      for (int i = 0; i < N; ++i) {
        float* dSi = p.dS + i * N;
        const float* Si = S + i * N;
        const float* S1i = S1 + i * N;
        const V dyi = hn::Set(d, p.dy[o + i]), sai = hn::Set(d, sa[i]), vi = hn::Set(d, p.v[o + i]);
        V acc_dv = hn::Zero(d), acc_dsa = hn::Zero(d);
        for (int j = 0; j < N; j += L) {
          const V dS = hn::MulAdd(dyi, hn::LoadU(d, p.r + o + j), hn::LoadU(d, dSi + j));
          hn::StoreU(dS, d, dSi + j);
          hn::Store(hn::MulAdd(dyi, hn::LoadU(d, S1i + j), hn::Load(d, dr + j)), d, dr + j);
          hn::Store(hn::MulAdd(dS, hn::LoadU(d, Si + j), hn::Load(d, dw + j)), d, dw + j);
          hn::Store(hn::MulAdd(dS, sai, hn::Load(d, db + j)), d, db + j);
          hn::Store(hn::MulAdd(dS, vi, hn::Load(d, dk + j)), d, dk + j);
          acc_dv = hn::MulAdd(dS, hn::LoadU(d, p.k + o + j), acc_dv);
          acc_dsa = hn::MulAdd(dS, hn::Load(d, bv + j), acc_dsa);
        }
        p.dv[o + i] = hn::GetLane(hn::SumOfLanes(d, acc_dv));
        const V dsa = hn::Set(d, hn::GetLane(hn::SumOfLanes(d, acc_dsa)));
        for (int j = 0; j < N; j += L) {
          hn::Store(hn::MulAdd(dsa, hn::LoadU(d, Si + j), hn::Load(d, da + j)), d, da + j);
          const V dS = hn::Mul(hn::LoadU(d, dSi + j), hn::LoadU(d, p.w + o + j));
          hn::StoreU(hn::MulAdd(dsa, hn::Load(d, av + j), dS), d, dSi + j);
        }
      }
      for (int j = 0; j < N; j += L) {  // a = -kk, b = kk rate: dkk = -da + db rate; drate = db kk
        const V dbj = hn::Load(d, db + j);
        hn::StoreU(hn::Load(d, dr + j), d, p.dr + o + j);
        hn::StoreU(hn::Load(d, dw + j), d, p.dw + o + j);
        hn::StoreU(hn::Load(d, dk + j), d, p.dk + o + j);
        hn::StoreU(hn::MulAdd(dbj, hn::LoadU(d, p.a + o + j), hn::Neg(hn::Load(d, da + j))), d,
                   p.dkk + o + j);
        hn::StoreU(hn::Mul(dbj, hn::LoadU(d, p.kk + o + j)), d, p.da + o + j);
      }
    }
  }
}

}  // namespace

// True when the head ran here; false leaves it to the scalar code.
bool Wkv7BackwardHeadSimd(const Wkv7HeadArgs& p) {
  if (p.N > kMaxHead) return false;
  const hn::CappedTag<float, 16> d16;
  const hn::CappedTag<float, 8> d8;
  const hn::CappedTag<float, 4> d4;
  if (p.N % hn::Lanes(d16) == 0) {
    BackwardHead(d16, p);
  } else if (p.N % hn::Lanes(d8) == 0) {
    BackwardHead(d8, p);
  } else if (p.N % hn::Lanes(d4) == 0) {
    BackwardHead(d4, p);
  } else {
    return false;
  }
  return true;
}

}  // namespace HWY_NAMESPACE
}  // namespace aviary::train
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace aviary::train {

HWY_EXPORT(Wkv7BackwardHeadSimd);

namespace {

// The same arithmetic in plain loops (Kernels::kReference, and heads no vector divides).
void BackwardHeadScalar(const Wkv7HeadArgs& p) {
  const int N = p.N, C = p.C, H = C / N;
  const size_t NN = static_cast<size_t>(N) * N;
  std::vector<float> states((p.every + 1) * NN), sas(static_cast<size_t>(p.every) * N);
  std::vector<float> av(N), bv(N), db(N), da(N);
  const int intervals = (p.T + p.every - 1) / p.every;
  for (int q = intervals - 1; q >= 0; --q) {
    const int t0 = q * p.every, t1 = std::min(p.T, t0 + p.every);
    std::memcpy(states.data(), p.ckpt + (static_cast<size_t>(q) * H + p.h) * NN,
                NN * sizeof(float));
    auto load_ab = [&](size_t o) {
      for (int j = 0; j < N; ++j) {
        av[j] = -p.kk[o + j];
        bv[j] = p.kk[o + j] * p.a[o + j];
      }
    };
    for (int t = t0; t < t1; ++t) {
      const size_t o = static_cast<size_t>(t) * C + static_cast<size_t>(p.h) * N;
      load_ab(o);
      const float* S = states.data() + (t - t0) * NN;
      float* S1 = states.data() + (t - t0 + 1) * NN;
      float* sa = sas.data() + static_cast<size_t>(t - t0) * N;
      for (int i = 0; i < N; ++i) {
        float s = 0.0f;
        for (int j = 0; j < N; ++j) s += S[i * N + j] * av[j];
        sa[i] = s;
        for (int j = 0; j < N; ++j) {
          S1[i * N + j] = S[i * N + j] * p.w[o + j] + s * bv[j] + p.v[o + i] * p.k[o + j];
        }
      }
    }
    for (int t = t1 - 1; t >= t0; --t) {
      const size_t o = static_cast<size_t>(t) * C + static_cast<size_t>(p.h) * N;
      load_ab(o);
      const float* S = states.data() + (t - t0) * NN;
      const float* S1 = states.data() + (t - t0 + 1) * NN;
      const float* sa = sas.data() + static_cast<size_t>(t - t0) * N;
      float *dr = p.dr + o, *dw = p.dw + o, *dk = p.dk + o;
      for (int j = 0; j < N; ++j) dr[j] = dw[j] = dk[j] = db[j] = da[j] = 0.0f;
      for (int i = 0; i < N; ++i) {
        float* dSi = p.dS + i * N;
        const float dyi = p.dy[o + i], vi = p.v[o + i];
        float dv = 0.0f, dsa = 0.0f;
        for (int j = 0; j < N; ++j) {
          dSi[j] += dyi * p.r[o + j];
          dr[j] += dyi * S1[i * N + j];
          dw[j] += dSi[j] * S[i * N + j];
          db[j] += dSi[j] * sa[i];
          dk[j] += dSi[j] * vi;
          dv += dSi[j] * p.k[o + j];
          dsa += dSi[j] * bv[j];
        }
        p.dv[o + i] = dv;
        for (int j = 0; j < N; ++j) {
          da[j] += dsa * S[i * N + j];
          dSi[j] = dSi[j] * p.w[o + j] + dsa * av[j];
        }
      }
      for (int j = 0; j < N; ++j) {
        p.dkk[o + j] = -da[j] + db[j] * p.a[o + j];
        p.da[o + j] = db[j] * p.kk[o + j];
      }
    }
  }
}

}  // namespace

void Wkv7Backward(int T, int H, int N, const float* r, const float* w, const float* k,
                  const float* v, const float* kk, const float* a, const float* dy,
                  const float* ckpt, int every, float* dS, float* dr, float* dw, float* dk,
                  float* dv, float* dkk, float* da) {
  const bool simd = ActiveKernels() != Kernels::kReference;
  ParallelFor(H, [&](int64_t h, int) {
    const Wkv7HeadArgs p{T,     H * N,
                         N,     static_cast<int>(h),
                         every, r,
                         w,     k,
                         v,     kk,
                         a,     dy,
                         ckpt,  dS + h * static_cast<size_t>(N) * N,
                         dr,    dw,
                         dk,    dv,
                         dkk,   da};
    if (!simd || !HWY_DYNAMIC_DISPATCH(Wkv7BackwardHeadSimd)(p)) BackwardHeadScalar(p);
  });
}

}  // namespace aviary::train
#endif  // HWY_ONCE
