// Fast WKV recurrences (Highway SIMD) and the switch to the scalar reference (reference.cpp).
// v5/v6: SIMD over the value dimension j (state rows S[i][:] are contiguous), no reductions.
// v7: state rows S[i][:] run over the key dimension; each row needs two dot products (S kk and
// S r), done with vector accumulators, four rows' horizontal sums at once.
// v4: SIMD over channels with Highway's exp (max error 1 ulp).
// Heads (channels for v4) go to the thread pool in groups when the work is large enough; each
// head's arithmetic is the same however the heads are grouped.

#ifndef AVIARY_WKV_ONCE
#define AVIARY_WKV_ONCE
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "tensor/kernels.h"
#include "tensor/reference.h"
#include "tensor/thread_pool.h"
#include "tensor/wkv.h"

#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS (HWY_SVE | HWY_SVE2 | HWY_SVE_256 | HWY_SVE2_128 | HWY_RVV)
#endif
#endif  // AVIARY_WKV_ONCE

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tensor/wkv.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"

HWY_BEFORE_NAMESPACE();
namespace aviary {
namespace HWY_NAMESPACE {
namespace {

namespace hn = hwy::HWY_NAMESPACE;

// One head, one token. D has lanes dividing N.
template <class D>
HWY_INLINE void Wkv5Head(D d, int N, const float* r, const float* k, const float* v, const float* w,
                         const float* u, float* s, float* out) {
  const int L = static_cast<int>(hn::Lanes(d));
  for (int j = 0; j < N; j += L) {
    const auto vv = hn::LoadU(d, v + j);
    auto o = hn::Zero(d);
    for (int i = 0; i < N; ++i) {
      float* si = s + static_cast<int64_t>(i) * N + j;
      const auto kv = hn::Mul(hn::Set(d, k[i]), vv);
      const auto sv = hn::LoadU(d, si);
      o = hn::MulAdd(hn::Set(d, r[i]), hn::MulAdd(hn::Set(d, u[i]), kv, sv), o);
      hn::StoreU(hn::MulAdd(hn::Set(d, w[i]), sv, kv), d, si);
    }
    hn::StoreU(o, d, out + j);
  }
}

// The sums of the lanes of a, b, c, e (out[0..3]), in a fixed order: two rounds of interleaves
// add within each 128-bit block, then the blocks are added in turn. One call replaces four
// horizontal sums (which each reduce a whole vector to one lane).
template <class D, class V>
HWY_INLINE void SumsOf4(D d, V a, V b, V c, V e, float* out) {
#if HWY_TARGET == HWY_SCALAR  // one lane (Fits() keeps this target on the scalar code anyway)
  out[0] = hn::GetLane(a), out[1] = hn::GetLane(b), out[2] = hn::GetLane(c),
  out[3] = hn::GetLane(e);
  (void)d;
#else
  const hn::Repartition<uint64_t, D> du64;
  // Per block: [a0 + a2, b0 + b2, a1 + a3, b1 + b3], likewise for c, e.
  const V ab = hn::Add(hn::InterleaveLower(d, a, b), hn::InterleaveUpper(d, a, b));
  const V ce = hn::Add(hn::InterleaveLower(d, c, e), hn::InterleaveUpper(d, c, e));
  const V lo =
      hn::BitCast(d, hn::InterleaveLower(du64, hn::BitCast(du64, ab), hn::BitCast(du64, ce)));
  const V hi =
      hn::BitCast(d, hn::InterleaveUpper(du64, hn::BitCast(du64, ab), hn::BitCast(du64, ce)));
  HWY_ALIGN float blocks[hn::MaxLanes(d)];
  hn::Store(hn::Add(lo, hi), d, blocks);  // per block: [a, b, c, e]
  const hn::Full128<float> d4;
  auto sum = hn::Load(d4, blocks);
  for (size_t i = 4; i < hn::Lanes(d); i += 4) sum = hn::Add(sum, hn::Load(d4, blocks + i));
  hn::StoreU(sum, d4, out);
#endif
}

// The longest head Wkv7Head takes (a stack buffer of kk * a); longer ones run the scalar code.
constexpr int kMaxWkv7Head = 1024;

// One head, one token, four state rows at a time (their dot products reduced together).
template <class D>
HWY_INLINE void Wkv7Head(D d, int N, const float* r, const float* w, const float* k, const float* v,
                         const float* kk, const float* a, float* s, float* out) {
  const int L = static_cast<int>(hn::Lanes(d));
  HWY_ALIGN float kka[kMaxWkv7Head];
  for (int j = 0; j < N; j += L)
    hn::Store(hn::Mul(hn::LoadU(d, kk + j), hn::LoadU(d, a + j)), d, kka + j);
  for (int i = 0; i < N; i += 4) {
    float* rows[4];
    for (int q = 0; q < 4; ++q) rows[q] = s + static_cast<int64_t>(i + q) * N;
    auto acc0 = hn::Zero(d), acc1 = hn::Zero(d), acc2 = hn::Zero(d), acc3 = hn::Zero(d);
    for (int j = 0; j < N; j += L) {
      const auto kkj = hn::LoadU(d, kk + j);
      acc0 = hn::MulAdd(hn::LoadU(d, rows[0] + j), kkj, acc0);
      acc1 = hn::MulAdd(hn::LoadU(d, rows[1] + j), kkj, acc1);
      acc2 = hn::MulAdd(hn::LoadU(d, rows[2] + j), kkj, acc2);
      acc3 = hn::MulAdd(hn::LoadU(d, rows[3] + j), kkj, acc3);
    }
    float sa[4];  // S kk per row, negated below: the update adds -(S kk) (kk a)
    SumsOf4(d, acc0, acc1, acc2, acc3, sa);
    using V = decltype(hn::Zero(d));
    V o[4] = {hn::Zero(d), hn::Zero(d), hn::Zero(d), hn::Zero(d)};
    const V neg_sa[4] = {hn::Set(d, -sa[0]), hn::Set(d, -sa[1]), hn::Set(d, -sa[2]),
                         hn::Set(d, -sa[3])};
    const V vi[4] = {hn::Set(d, v[i]), hn::Set(d, v[i + 1]), hn::Set(d, v[i + 2]),
                     hn::Set(d, v[i + 3])};
    for (int j = 0; j < N; j += L) {
      const V kkaj = hn::Load(d, kka + j), kj = hn::LoadU(d, k + j);
      const V wj = hn::LoadU(d, w + j), rj = hn::LoadU(d, r + j);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const V sn = hn::MulAdd(hn::LoadU(d, rows[q] + j), wj,
                                hn::MulAdd(neg_sa[q], kkaj, hn::Mul(vi[q], kj)));
        hn::StoreU(sn, d, rows[q] + j);
        o[q] = hn::MulAdd(sn, rj, o[q]);
      }
    }
    SumsOf4(d, o[0], o[1], o[2], o[3], out + i);
  }
}

// SIMD tags tried in order: the widest (up to 16 lanes) whose lane count divides N; none fits
// when N is not a multiple of 4 or the target has no SIMD, and the scalar code runs.
template <class D>
HWY_INLINE bool Fits(D d, int N) {
  return hn::Lanes(d) >= 4 && N % static_cast<int>(hn::Lanes(d)) == 0;
}

}  // namespace

// Heads [h0, h1) for T tokens. C = H * N is the row stride.
void Wkv5Heads(int T, int C, int N, int h0, int h1, const float* r, const float* k, const float* v,
               const float* decay, bool decay_per_token, const float* first, float* S, float* out) {
  // Head by head, all tokens: the head's state stays in L1 throughout.
  for (int h = h0; h < h1; ++h) {
    for (int t = 0; t < T; ++t) {
      const int64_t o = static_cast<int64_t>(t) * C;
      const float* w = decay + (decay_per_token ? o : 0);
      const int c = h * N;
      float* s = S + static_cast<int64_t>(c) * N;
      const hn::CappedTag<float, 16> d16;
      const hn::CappedTag<float, 8> d8;
      const hn::CappedTag<float, 4> d4;
      if (Fits(d16, N)) {
        Wkv5Head(d16, N, r + o + c, k + o + c, v + o + c, w + c, first + c, s, out + o + c);
      } else if (Fits(d8, N)) {
        Wkv5Head(d8, N, r + o + c, k + o + c, v + o + c, w + c, first + c, s, out + o + c);
      } else if (Fits(d4, N)) {
        Wkv5Head(d4, N, r + o + c, k + o + c, v + o + c, w + c, first + c, s, out + o + c);
      } else {
        ref::Wkv5(1, N, r + o + c, k + o + c, v + o + c, w + c, first + c, s, out + o + c);
      }
    }
  }
}

void Wkv7Heads(int T, int C, int N, int h0, int h1, const float* r, const float* decay,
               const float* k, const float* v, const float* kk, const float* a, float* S,
               float* out) {
  // Head by head, all tokens: the head's state (16 KB at N = 64) stays in L1 throughout.
  for (int h = h0; h < h1; ++h) {
    for (int t = 0; t < T; ++t) {
      const int64_t c = static_cast<int64_t>(t) * C + h * N;
      float* s = S + static_cast<int64_t>(h) * N * N;
      const hn::CappedTag<float, 16> d16;
      const hn::CappedTag<float, 8> d8;
      const hn::CappedTag<float, 4> d4;
      if (N > kMaxWkv7Head) {  // longer than Wkv7Head's stack buffer
        ref::Wkv7(1, N, r + c, decay + c, k + c, v + c, kk + c, a + c, s, out + c);
      } else if (Fits(d16, N)) {
        Wkv7Head(d16, N, r + c, decay + c, k + c, v + c, kk + c, a + c, s, out + c);
      } else if (Fits(d8, N)) {
        Wkv7Head(d8, N, r + c, decay + c, k + c, v + c, kk + c, a + c, s, out + c);
      } else if (Fits(d4, N)) {
        Wkv7Head(d4, N, r + c, decay + c, k + c, v + c, kk + c, a + c, s, out + c);
      } else {
        ref::Wkv7(1, N, r + c, decay + c, k + c, v + c, kk + c, a + c, s, out + c);
      }
    }
  }
}

// Channels [c0, c1) of RWKV-4 for T tokens (row stride C). The tail of a range is padded into
// a whole vector, so every channel goes through the same vector code.
void Wkv4Channels(int T, int C, int c0, int c1, const float* k, const float* v, const float* first,
                  const float* decay, float* aa, float* bb, float* pp, float* out) {
  const hn::CappedTag<float, 16> d;
  constexpr size_t L = hn::MaxLanes(d);
  HWY_ALIGN float pad[10][L];
  for (int t = 0; t < T; ++t) {
    const int64_t o = static_cast<int64_t>(t) * C;
    for (int c = c0; c < c1; c += L) {
      const int n = std::min<int>(L, c1 - c);
      // Inputs: k, v, u, w, aa, bb, pp; outputs: out, aa, bb, pp (in place).
      const float* in[7] = {k + o + c, v + o + c, first + c, decay + c, aa + c, bb + c, pp + c};
      for (int i = 0; i < 7; ++i) {
        std::memset(pad[i], 0, sizeof pad[i]);
        std::memcpy(pad[i], in[i], n * sizeof(float));
      }
      const auto kv = hn::Load(d, pad[0]), vv = hn::Load(d, pad[1]), u = hn::Load(d, pad[2]);
      const auto w = hn::Load(d, pad[3]), av = hn::Load(d, pad[4]), bv = hn::Load(d, pad[5]);
      const auto pv = hn::Load(d, pad[6]);
      const auto ww = hn::Add(u, kv);
      auto p = hn::Max(pv, ww);
      auto e1 = hn::Exp(d, hn::Sub(pv, p));
      auto e2 = hn::Exp(d, hn::Sub(ww, p));
      const auto res = hn::Div(hn::MulAdd(e1, av, hn::Mul(e2, vv)), hn::MulAdd(e1, bv, e2));
      const auto ww2 = hn::Add(pv, w);
      p = hn::Max(ww2, kv);
      e1 = hn::Exp(d, hn::Sub(ww2, p));
      e2 = hn::Exp(d, hn::Sub(kv, p));
      hn::Store(res, d, pad[7]);
      hn::Store(hn::MulAdd(e1, av, hn::Mul(e2, vv)), d, pad[8]);
      hn::Store(hn::MulAdd(e1, bv, e2), d, pad[9]);
      hn::Store(p, d, pad[6]);
      std::memcpy(out + o + c, pad[7], n * sizeof(float));
      std::memcpy(aa + c, pad[8], n * sizeof(float));
      std::memcpy(bb + c, pad[9], n * sizeof(float));
      std::memcpy(pp + c, pad[6], n * sizeof(float));
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace aviary
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace aviary {

HWY_EXPORT(Wkv5Heads);
HWY_EXPORT(Wkv7Heads);
HWY_EXPORT(Wkv4Channels);

namespace {

// Below this many multiply-adds a call runs on the calling thread alone.
constexpr int64_t kMinParallelWork = 1 << 17;

// Splits `units` (heads, or channel groups) into tasks for the pool.
template <typename F>
void ForUnits(int units, int64_t work, int max_threads, F&& f) {
  int threads = max_threads > 0 ? max_threads : NumThreads();
  if (work < kMinParallelWork) threads = 1;
  if (threads <= 1 || units <= 1) return f(0, units);
  const int per_task = std::max(1, units / (2 * threads));
  const int tasks = (units + per_task - 1) / per_task;
  ParallelFor(
      tasks,
      [&](int64_t task, int) {
        const int u0 = static_cast<int>(task) * per_task;
        f(u0, std::min(units, u0 + per_task));
      },
      threads);
}

}  // namespace

namespace fast {

void Wkv4Seq(int T, int C, const float* k, const float* v, const float* first, const float* decay,
             float* aa, float* bb, float* pp, float* out, int max_threads) {
  constexpr int kGroup = 64;  // channels per unit of work (a multiple of every lane count)
  const int units = (C + kGroup - 1) / kGroup;
  const auto fn = HWY_DYNAMIC_DISPATCH(Wkv4Channels);
  ForUnits(units, static_cast<int64_t>(T) * C * 16, max_threads, [&](int u0, int u1) {
    fn(T, C, u0 * kGroup, std::min(C, u1 * kGroup), k, v, first, decay, aa, bb, pp, out);
  });
}

void Wkv5Seq(int T, int H, int N, const float* r, const float* k, const float* v,
             const float* decay, bool decay_per_token, const float* first, float* S, float* out,
             int max_threads) {
  const auto fn = HWY_DYNAMIC_DISPATCH(Wkv5Heads);
  ForUnits(H, static_cast<int64_t>(T) * H * N * N, max_threads, [&](int h0, int h1) {
    fn(T, H * N, N, h0, h1, r, k, v, decay, decay_per_token, first, S, out);
  });
}

void Wkv7Seq(int T, int H, int N, const float* r, const float* decay, const float* k,
             const float* v, const float* kk, const float* a, float* S, float* out,
             int max_threads) {
  const auto fn = HWY_DYNAMIC_DISPATCH(Wkv7Heads);
  ForUnits(H, static_cast<int64_t>(T) * H * N * N * 2, max_threads,
           [&](int h0, int h1) { fn(T, H * N, N, h0, h1, r, decay, k, v, kk, a, S, out); });
}

}  // namespace fast

namespace {
bool UseReference() { return ActiveKernels() == Kernels::kReference; }
}  // namespace

void Wkv4(int C, const float* k, const float* v, const float* first, const float* decay, float* aa,
          float* bb, float* pp, float* out) {
  Wkv4Seq(1, C, k, v, first, decay, aa, bb, pp, out);
}

void Wkv5(int H, int N, const float* r, const float* k, const float* v, const float* decay,
          const float* first, float* S, float* out) {
  Wkv5Seq(1, H, N, r, k, v, decay, false, first, S, out);
}

void Wkv7(int H, int N, const float* r, const float* decay, const float* k, const float* v,
          const float* kk, const float* a, float* S, float* out) {
  Wkv7Seq(1, H, N, r, decay, k, v, kk, a, S, out);
}

void Wkv4Seq(int T, int C, const float* k, const float* v, const float* first, const float* decay,
             float* aa, float* bb, float* pp, float* out) {
  if (!UseReference()) return fast::Wkv4Seq(T, C, k, v, first, decay, aa, bb, pp, out);
  for (int t = 0; t < T; ++t) {
    const int64_t o = static_cast<int64_t>(t) * C;
    ref::Wkv4(C, k + o, v + o, first, decay, aa, bb, pp, out + o);
  }
}

void Wkv5Seq(int T, int H, int N, const float* r, const float* k, const float* v,
             const float* decay, bool decay_per_token, const float* first, float* S, float* out) {
  if (!UseReference()) {
    return fast::Wkv5Seq(T, H, N, r, k, v, decay, decay_per_token, first, S, out);
  }
  for (int t = 0; t < T; ++t) {
    const int64_t o = static_cast<int64_t>(t) * H * N;
    ref::Wkv5(H, N, r + o, k + o, v + o, decay + (decay_per_token ? o : 0), first, S, out + o);
  }
}

void Wkv7Seq(int T, int H, int N, const float* r, const float* decay, const float* k,
             const float* v, const float* kk, const float* a, float* S, float* out) {
  if (!UseReference()) return fast::Wkv7Seq(T, H, N, r, decay, k, v, kk, a, S, out);
  for (int t = 0; t < T; ++t) {
    const int64_t o = static_cast<int64_t>(t) * H * N;
    ref::Wkv7(H, N, r + o, decay + o, k + o, v + o, kk + o, a + o, S, out + o);
  }
}

}  // namespace aviary
#endif  // HWY_ONCE
