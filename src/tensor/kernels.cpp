// Fast kernels (Highway SIMD, run-time dispatch, threaded) and the switch between them and the
// scalar reference (reference.cpp).
//
// MatMul design. Every output y[t, r] is one dot product computed as: a single vector
// accumulator (N = min(16, lanes) floats) updated with acc = w_chunk * x_chunk + acc (fused
// multiply-add) for each N-wide chunk of columns in order, then a fixed horizontal sum, then a
// scalar tail for cols % N (float types only). Weight chunks are widened exactly as
// DequantizeRow widens them (same float values). Both paths below follow this order exactly,
// so an output does not depend on T, on which path ran, or on how rows were split among
// threads:
//  - T = 1 (generation, memory-bound): 4 rows at a time stream their blocks and widen them in
//    registers, each weight byte read once;
//  - T > 1 (sequence mode, compute-bound): 4 rows are widened once into a small buffer (L1)
//    and a 4-row x TT-token register tile of accumulators runs over it (TT = 4 with 32 vector
//    registers, 2 with 16), so each widened weight is reused for every token.
// Rows are spread over the thread pool in tasks of whole 4-row tiles.

// Highway re-includes this file once per target; the parts outside HWY_NAMESPACE are guarded.
#ifndef AVIARY_KERNELS_ONCE
#define AVIARY_KERNELS_ONCE
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "tensor/aligned.h"
#include "tensor/bf16_matmul.h"
#include "tensor/int8_matmul.h"
#include "tensor/kernels.h"
#include "tensor/lane_sums.h"
#include "tensor/reference.h"
#include "tensor/thread_pool.h"

// Scalable vectors (SVE, RVV) cannot be held in arrays; these kernels use fixed-size ones.
#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS (HWY_SVE | HWY_SVE2 | HWY_SVE_256 | HWY_SVE2_128 | HWY_RVV)
#endif
#endif  // AVIARY_KERNELS_ONCE

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tensor/kernels.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"

HWY_BEFORE_NAMESPACE();
namespace aviary {
namespace HWY_NAMESPACE {
namespace {

namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::CappedTag<float, 16>;
using VF = hn::Vec<DF>;
constexpr size_t kLanes = hn::MaxLanes(DF());
static_assert(32 % kLanes == 0, "a quantized block must hold whole vectors");

#if HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3
constexpr int kTileTokens = 2;  // 16 vector registers
#else
constexpr int kTileTokens = 4;  // 32 vector registers (AVX-512, NEON)
#endif
constexpr int kTileRows = 4;

// Exact half -> float (the same value as F16ToF32).
HWY_INLINE float HalfToFloat(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2
  return _cvtsh_ss(h);
#else
  return F16ToF32(h);
#endif
}

// Scalar a * b + c with one rounding where the target has FMA, for the tails; used the same
// way by every path so results stay bit-identical between them.
HWY_INLINE float ScalarMulAdd(float a, float b, float c) {
#if (HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2) || HWY_ARCH_ARM_A64
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// Any-alignment load of one vector of D's lane type from raw bytes.
template <class D>
HWY_INLINE hn::Vec<D> LoadBytes(D d, const uint8_t* p) {
#if HWY_TARGET == HWY_SCALAR
  hn::TFromD<D> v;  // one lane: no byte vector of the same size exists
  std::memcpy(&v, p, sizeof v);
  return hn::Set(d, v);
#else
  const hn::Repartition<uint8_t, D> du8;
  return hn::BitCast(d, hn::LoadU(du8, p));
#endif
}

// ---- decoders: stored bytes -> float vectors of kLanes lanes ----
// A group shares its scales: a 32-weight block (a 256-weight super-block for the K-quants) for
// quantized types, one vector for floats. Scale(p) reads a group's header; Chunk(p, k, s)
// widens the k-th vector of the group.

template <DType kType>
struct Dec;

template <>
struct Dec<DType::kF32> {
  static constexpr size_t kElems = kLanes, kBytes = 4 * kLanes;
  struct S {};
  static HWY_INLINE S Scale(const uint8_t*) { return {}; }
  static HWY_INLINE VF Chunk(const uint8_t* p, int, S) { return LoadBytes(DF(), p); }
  static HWY_INLINE float Scalar(const uint8_t* row, int64_t c) {
    float f;
    std::memcpy(&f, row + 4 * c, 4);
    return f;
  }
};

template <>
struct Dec<DType::kF16> {
  static constexpr size_t kElems = kLanes, kBytes = 2 * kLanes;
  struct S {};
  static HWY_INLINE S Scale(const uint8_t*) { return {}; }
  static HWY_INLINE VF Chunk(const uint8_t* p, int, S) {
    const hn::Rebind<hwy::float16_t, DF> dh;
    return hn::PromoteTo(DF(), LoadBytes(dh, p));
  }
  static HWY_INLINE float Scalar(const uint8_t* row, int64_t c) { return HalfToFloat(row + 2 * c); }
};

template <>
struct Dec<DType::kBF16> {
  static constexpr size_t kElems = kLanes, kBytes = 2 * kLanes;
  struct S {};
  static HWY_INLINE S Scale(const uint8_t*) { return {}; }
  static HWY_INLINE VF Chunk(const uint8_t* p, int, S) {
    const hn::Rebind<uint16_t, DF> du16;
    const hn::RebindToUnsigned<DF> du32;
    return hn::BitCast(DF(), hn::ShiftLeft<16>(hn::PromoteTo(du32, LoadBytes(du16, p))));
  }
  static HWY_INLINE float Scalar(const uint8_t* row, int64_t c) {
    uint16_t h;
    std::memcpy(&h, row + 2 * c, 2);
    return BF16ToF32(h);
  }
};

// Unsigned nibbles of elements k*N .. k*N+N of a 4-bit block: low nibbles of qs[0..16) are
// elements 0..15, high nibbles elements 16..31.
HWY_INLINE hn::Vec<hn::RebindToSigned<DF>> Nibbles(const uint8_t* qs, int k) {
  const hn::Rebind<uint8_t, DF> du8;
  const hn::RebindToSigned<DF> di32;
  const size_t e = static_cast<size_t>(k) * kLanes;
  const auto v = hn::PromoteTo(di32, hn::LoadU(du8, qs + (e & 15)));
  return e < 16 ? hn::And(v, hn::Set(di32, 0x0f)) : hn::ShiftRight<4>(v);
}

// The fifth bits of elements k*N .. k*N+N (bit j of qh is element j's), as 0 or 16.
HWY_INLINE hn::Vec<hn::RebindToSigned<DF>> HighBits(uint32_t qh, int k) {
  const hn::RebindToUnsigned<DF> du32;
  const hn::RebindToSigned<DF> di32;
  const auto shifts = hn::Iota(du32, static_cast<uint32_t>(k * kLanes));
  const auto bits = hn::And(hn::Set(du32, qh) >> shifts, hn::Set(du32, 1));
  return hn::BitCast(di32, hn::ShiftLeft<4>(bits));
}

template <>
struct Dec<DType::kQ4_0> {
  static constexpr size_t kElems = 32, kBytes = sizeof(BlockQ4_0);
  struct S { float d; };
  static HWY_INLINE S Scale(const uint8_t* p) { return {HalfToFloat(p)}; }
  static HWY_INLINE VF Chunk(const uint8_t* p, int k, S s) {
    const hn::RebindToSigned<DF> di32;
    const auto q = hn::Sub(Nibbles(p + 2, k), hn::Set(di32, 8));
    return hn::Mul(hn::ConvertTo(DF(), q), hn::Set(DF(), s.d));
  }
};

template <>
struct Dec<DType::kQ4_1> {
  static constexpr size_t kElems = 32, kBytes = sizeof(BlockQ4_1);
  struct S { float d, m; };
  static HWY_INLINE S Scale(const uint8_t* p) { return {HalfToFloat(p), HalfToFloat(p + 2)}; }
  static HWY_INLINE VF Chunk(const uint8_t* p, int k, S s) {
    const VF q = hn::ConvertTo(DF(), Nibbles(p + 4, k));
    return hn::Add(hn::Mul(q, hn::Set(DF(), s.d)), hn::Set(DF(), s.m));
  }
};

template <>
struct Dec<DType::kQ5_0> {
  static constexpr size_t kElems = 32, kBytes = sizeof(BlockQ5_0);
  struct S { float d; uint32_t qh; };
  static HWY_INLINE S Scale(const uint8_t* p) {
    S s{HalfToFloat(p), 0};
    std::memcpy(&s.qh, p + 2, 4);
    return s;
  }
  static HWY_INLINE VF Chunk(const uint8_t* p, int k, S s) {
    const hn::RebindToSigned<DF> di32;
    const auto q = hn::Sub(hn::Or(Nibbles(p + 6, k), HighBits(s.qh, k)), hn::Set(di32, 16));
    return hn::Mul(hn::ConvertTo(DF(), q), hn::Set(DF(), s.d));
  }
};

template <>
struct Dec<DType::kQ5_1> {
  static constexpr size_t kElems = 32, kBytes = sizeof(BlockQ5_1);
  struct S { float d, m; uint32_t qh; };
  static HWY_INLINE S Scale(const uint8_t* p) {
    S s{HalfToFloat(p), HalfToFloat(p + 2), 0};
    std::memcpy(&s.qh, p + 4, 4);
    return s;
  }
  static HWY_INLINE VF Chunk(const uint8_t* p, int k, S s) {
    const VF q = hn::ConvertTo(DF(), hn::Or(Nibbles(p + 8, k), HighBits(s.qh, k)));
    return hn::Add(hn::Mul(q, hn::Set(DF(), s.d)), hn::Set(DF(), s.m));
  }
};

template <>
struct Dec<DType::kQ8_0> {
  static constexpr size_t kElems = 32, kBytes = sizeof(BlockQ8_0);
  struct S { float d; };
  static HWY_INLINE S Scale(const uint8_t* p) { return {HalfToFloat(p)}; }
  static HWY_INLINE VF Chunk(const uint8_t* p, int k, S s) {
    const hn::Rebind<int8_t, DF> di8;
    const hn::RebindToSigned<DF> di32;
    const auto q = hn::PromoteTo(di32, hn::LoadU(di8, reinterpret_cast<const int8_t*>(p + 2) +
                                                          k * kLanes));
    return hn::Mul(hn::ConvertTo(DF(), q), hn::Set(DF(), s.d));
  }
};

// Bytes p[0..kLanes) widened to int32 lanes.
HWY_INLINE hn::Vec<hn::RebindToSigned<DF>> WideBytes(const uint8_t* p) {
  const hn::Rebind<uint8_t, DF> du8;
  return hn::PromoteTo(hn::RebindToSigned<DF>(), hn::LoadU(du8, p));
}

// K-quants (dtype.h): a group is a whole super-block of 256; Scale() widens the sub-block
// scales once (d * sc_j, dmin * m_j as DequantizeRow computes them), and a chunk never spans
// two sub-blocks (kLanes <= 16).
template <DType kType>
struct DecK45 {
  using Block = std::conditional_t<kType == DType::kQ4_K, BlockQ4_K, BlockQ5_K>;
  static constexpr size_t kElems = kQKBlock, kBytes = sizeof(Block);
  struct S { float d[8], m[8]; };
  static HWY_INLINE S Scale(const uint8_t* p) {
    S s;
    const float d = HalfToFloat(p + offsetof(Block, d));
    const float dmin = HalfToFloat(p + offsetof(Block, dmin));
    for (int j = 0; j < 8; ++j) {
      uint8_t sc, m;
      ScaleMinK4(j, p + offsetof(Block, scales), &sc, &m);
      s.d[j] = d * sc;
      s.m[j] = dmin * m;
    }
    return s;
  }
  static HWY_INLINE VF Chunk(const uint8_t* p, int k, const S& s) {
    const hn::RebindToSigned<DF> di32;
    const int e = k * static_cast<int>(kLanes), j = e / 32, i = e % 32;
    const auto v = WideBytes(p + offsetof(Block, qs) + 32 * (j / 2) + i);
    auto q = (j & 1) ? hn::ShiftRight<4>(v) : hn::And(v, hn::Set(di32, 0x0f));
    if constexpr (kType == DType::kQ5_K) {
      const auto h = hn::And(hn::ShiftRightSame(WideBytes(p + offsetof(Block, qh) + i), j),
                             hn::Set(di32, 1));
      q = hn::Or(q, hn::ShiftLeft<4>(h));
    }
    return hn::Sub(hn::Mul(hn::ConvertTo(DF(), q), hn::Set(DF(), s.d[j])), hn::Set(DF(), s.m[j]));
  }
};
template <>
struct Dec<DType::kQ4_K> : DecK45<DType::kQ4_K> {};
template <>
struct Dec<DType::kQ5_K> : DecK45<DType::kQ5_K> {};

template <>
struct Dec<DType::kQ6_K> {
  static constexpr size_t kElems = kQKBlock, kBytes = sizeof(BlockQ6_K);
  struct S { float d[16]; };
  static HWY_INLINE S Scale(const uint8_t* p) {
    S s;
    const float d = HalfToFloat(p + offsetof(BlockQ6_K, d));
    for (int j = 0; j < 16; ++j) {
      s.d[j] = d * static_cast<float>(static_cast<int8_t>(p[offsetof(BlockQ6_K, scales) + j]));
    }
    return s;
  }
  static HWY_INLINE VF Chunk(const uint8_t* p, int k, const S& s) {
    const hn::RebindToSigned<DF> di32;
    const int e = k * static_cast<int>(kLanes), h = e / 128, part = (e % 128) / 32, l = e % 32;
    const auto lo = WideBytes(p + offsetof(BlockQ6_K, ql) + 64 * h + l + 32 * (part & 1));
    const auto nib = part < 2 ? hn::And(lo, hn::Set(di32, 0x0f)) : hn::ShiftRight<4>(lo);
    const auto top = hn::And(hn::ShiftRightSame(WideBytes(p + offsetof(BlockQ6_K, qh) + 32 * h + l),
                                                2 * part),
                             hn::Set(di32, 3));
    const auto q = hn::Sub(hn::Or(nib, hn::ShiftLeft<4>(top)), hn::Set(di32, 32));
    return hn::Mul(hn::ConvertTo(DF(), q), hn::Set(DF(), s.d[e / 16]));
  }
};

template <DType kType>
constexpr bool IsFloatType() {
  return kType == DType::kF32 || kType == DType::kF16 || kType == DType::kBF16;
}

// The scalar value of column c of a row, for the tail of float types (cols % kLanes).
template <DType kType>
HWY_INLINE float TailValue(const uint8_t* row, int64_t c) {
  if constexpr (IsFloatType<kType>()) {
    return Dec<kType>::Scalar(row, c);
  } else {
    return 0.0f;  // quantized rows have no tail (cols is a multiple of 32)
  }
}

HWY_INLINE float HorizontalSum(VF v) { return hn::GetLane(hn::SumOfLanes(DF(), v)); }

// out[i] = the lane sum of acc[i] for i < n <= 16 (out has room for 16): on AVX-512 one
// transpose-and-add tree for all of them (lane_sums.h), elsewhere one at a time. Both MatMul
// paths end every dot product here, so they stay bit-identical.
HWY_INLINE void LaneSums(const VF* acc, int n, float* out) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3 && defined(AVIARY_HAVE_LANE_SUMS16)
  static_assert(kLanes == 16, "512-bit vectors of floats");
  __m512 v[16];
  for (int i = 0; i < n; ++i) v[i] = acc[i].raw;
  lane_sums::FinalSums(v, n, out);
#else
  for (int i = 0; i < n; ++i) out[i] = HorizontalSum(acc[i]);
#endif
}

// ---- T = 1: R rows streamed and widened in registers ----

// How GemvRows reads its R rows; both orders give the same sums (one accumulator per row, in
// column order). In address order, one row after the other, for float weights (F32, F16,
// BF16) with 16 lanes: all of a 0.1B F16 model's matrices, AVX-512, one core, 14.1-14.5 ms
// side by side -> 10.9-11.7 ms. With 8 lanes (AVX2) a row's single chain of multiply-adds is
// twice as long and latency-bound: 1.17x slower than side by side (13.0-13.4 -> 15.2-15.7
// ms); quantized weights with 16 lanes (decoding dominates) changed within 3%. Side by side
// otherwise.
template <DType kType>
constexpr bool kRowsInAddressOrder =
    kLanes >= 16 && (kType == DType::kF32 || kType == DType::kF16 || kType == DType::kBF16);

template <DType kType, int R>
HWY_INLINE void GemvRows(const uint8_t* w, size_t row_bytes, int64_t cols, const float* x,
                         float* y) {
  using D = Dec<kType>;
  const DF df;
  constexpr int kChunks = static_cast<int>(D::kElems / kLanes);
  const int64_t groups = cols / static_cast<int64_t>(D::kElems);
  VF acc[R];
  if constexpr (kRowsInAddressOrder<kType>) {
    // Rows one after the other: memory is read in address order, one long stream for the
    // hardware prefetchers. Each row keeps its own accumulator; out-of-order execution
    // overlaps one row's chain with the next. The row R rows ahead is prefetched at our pace
    // (the hardware prefetchers stop at page boundaries), one prefetch per cache line.
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = w + r * row_bytes;
      const uint8_t* ahead = row + R * row_bytes;
      VF sum = hn::Zero(df);
      size_t prefetched = 0;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* p = row + g * D::kBytes;
        for (; prefetched < (g + 1) * D::kBytes; prefetched += 64) hwy::Prefetch(ahead + prefetched);
        const typename D::S s = D::Scale(p);
        for (int k = 0; k < kChunks; ++k) {
          sum = hn::MulAdd(D::Chunk(p, k, s), hn::LoadU(df, x + g * D::kElems + k * kLanes), sum);
        }
      }
      acc[r] = sum;
    }
  } else {
    // R rows side by side: R independent chains of multiply-adds (narrow vectors need them to
    // hide the latency), read as R interleaved streams, each only one row long: too short for
    // the hardware prefetcher to lock on. The next R rows are contiguous after these, so fetch
    // them at the rate these are consumed (R * kBytes per group).
    for (int r = 0; r < R; ++r) acc[r] = hn::Zero(df);
    const uint8_t* next = w + R * row_bytes;
    constexpr size_t kStep = R * D::kBytes;
    for (int64_t g = 0; g < groups; ++g) {
      for (size_t line = 0; line < kStep; line += 64) hwy::Prefetch(next + g * kStep + line);
      const uint8_t* p = w + g * D::kBytes;
      typename D::S s[R];
      for (int r = 0; r < R; ++r) s[r] = D::Scale(p + r * row_bytes);
      for (int k = 0; k < kChunks; ++k) {
        const VF xv = hn::LoadU(df, x + g * D::kElems + k * kLanes);
        for (int r = 0; r < R; ++r) acc[r] = hn::MulAdd(D::Chunk(p + r * row_bytes, k, s[r]), xv, acc[r]);
      }
    }
  }
  float sums[16];
  LaneSums(acc, R, sums);
  for (int r = 0; r < R; ++r) {
    float sum = sums[r];
    for (int64_t c = groups * static_cast<int64_t>(D::kElems); c < cols; ++c) {
      sum = ScalarMulAdd(TailValue<kType>(w + r * row_bytes, c), x[c], sum);
    }
    y[r] = sum;
  }
}

// ---- widening rows to float (T > 1 tiles, GatherRow) ----

template <DType kType>
HWY_INLINE void DecodeRow(const uint8_t* row, int64_t cols, float* out) {
  using D = Dec<kType>;
  const DF df;
  constexpr int kChunks = static_cast<int>(D::kElems / kLanes);
  const int64_t groups = cols / static_cast<int64_t>(D::kElems);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = row + g * D::kBytes;
    const typename D::S s = D::Scale(p);
    for (int k = 0; k < kChunks; ++k) {
      hn::StoreU(D::Chunk(p, k, s), df, out + g * D::kElems + k * kLanes);
    }
  }
  for (int64_t c = groups * static_cast<int64_t>(D::kElems); c < cols; ++c) {
    out[c] = TailValue<kType>(row, c);
  }
}

// ---- T > 1: R rows (widened, in `wbuf`, stride `ws`) x TT tokens of accumulators ----

template <int R, int TT>
HWY_INLINE void GemmTile(const float* wbuf, size_t ws, int64_t cols, const float* x, float* y,
                         int64_t rows) {
  const DF df;
  const int64_t vec_cols = cols / static_cast<int64_t>(kLanes) * static_cast<int64_t>(kLanes);
  VF acc[R][TT];
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < TT; ++t) acc[r][t] = hn::Zero(df);
  }
  for (int64_t c = 0; c < vec_cols; c += kLanes) {
    VF wv[R];
    for (int r = 0; r < R; ++r) wv[r] = hn::LoadU(df, wbuf + r * ws + c);
    for (int t = 0; t < TT; ++t) {
      const VF xv = hn::LoadU(df, x + t * cols + c);
      for (int r = 0; r < R; ++r) acc[r][t] = hn::MulAdd(wv[r], xv, acc[r][t]);
    }
  }
  static_assert(R * TT <= 16, "one LaneSums for the tile");
  float sums[16];
  LaneSums(&acc[0][0], R * TT, sums);
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < TT; ++t) {
      float sum = sums[r * TT + t];
      for (int64_t c = vec_cols; c < cols; ++c) {
        sum = ScalarMulAdd(wbuf[r * ws + c], x[t * cols + c], sum);
      }
      y[t * rows + r] = sum;
    }
  }
}

template <int R>
HWY_INLINE void GemmRows(const float* wbuf, size_t ws, int64_t cols, const float* x, int T,
                         float* y, int64_t rows) {
  int t = 0;
  for (; t + kTileTokens <= T; t += kTileTokens) {
    GemmTile<R, kTileTokens>(wbuf, ws, cols, x + t * cols, y + t * rows, rows);
  }
  switch (T - t) {
    case 3: GemmTile<R, 3>(wbuf, ws, cols, x + t * cols, y + t * rows, rows); break;
    case 2: GemmTile<R, 2>(wbuf, ws, cols, x + t * cols, y + t * rows, rows); break;
    case 1: GemmTile<R, 1>(wbuf, ws, cols, x + t * cols, y + t * rows, rows); break;
    default: break;
  }
}

template <DType kType>
void MatMulRowsT(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols, int64_t r0,
                 int64_t r1, const float* x, int T, float* y) {
  if (T == 1) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) GemvRows<kType, 4>(w + r * row_bytes, row_bytes, cols, x, y + r);
    switch (r1 - r) {
      case 3: GemvRows<kType, 3>(w + r * row_bytes, row_bytes, cols, x, y + r); break;
      case 2: GemvRows<kType, 2>(w + r * row_bytes, row_bytes, cols, x, y + r); break;
      case 1: GemvRows<kType, 1>(w + r * row_bytes, row_bytes, cols, x, y + r); break;
      default: break;
    }
    return;
  }
  // Per-thread buffer of kTileRows widened rows; grows to the widest matrix once.
  thread_local AlignedVector<float> buf;
  const size_t ws = static_cast<size_t>(cols + 16) & ~size_t{15};
  if (buf.size() < kTileRows * ws) buf.resize(kTileRows * ws);
  for (int64_t r = r0; r < r1; r += kTileRows) {
    const int n = static_cast<int>(std::min<int64_t>(kTileRows, r1 - r));
    for (int i = 0; i < n; ++i) DecodeRow<kType>(w + (r + i) * row_bytes, cols, buf.data() + i * ws);
    float* yr = y + r;
    switch (n) {
      case 4: GemmRows<4>(buf.data(), ws, cols, x, T, yr, rows); break;
      case 3: GemmRows<3>(buf.data(), ws, cols, x, T, yr, rows); break;
      case 2: GemmRows<2>(buf.data(), ws, cols, x, T, yr, rows); break;
      default: GemmRows<1>(buf.data(), ws, cols, x, T, yr, rows); break;
    }
  }
}

}  // namespace

// Rows [r0, r1) of y = W x for all T tokens.
void MatMulRows(DType type, const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols,
                int64_t r0, int64_t r1, const float* x, int T, float* y) {
  switch (type) {
    case DType::kF32: return MatMulRowsT<DType::kF32>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kF16: return MatMulRowsT<DType::kF16>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kBF16: return MatMulRowsT<DType::kBF16>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kQ4_0: return MatMulRowsT<DType::kQ4_0>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kQ4_1: return MatMulRowsT<DType::kQ4_1>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kQ5_0: return MatMulRowsT<DType::kQ5_0>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kQ5_1: return MatMulRowsT<DType::kQ5_1>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kQ8_0: return MatMulRowsT<DType::kQ8_0>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kQ4_K: return MatMulRowsT<DType::kQ4_K>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kQ5_K: return MatMulRowsT<DType::kQ5_K>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kQ6_K: return MatMulRowsT<DType::kQ6_K>(w, row_bytes, rows, cols, r0, r1, x, T, y);
  }
}

void DecodeRowAny(DType type, const uint8_t* src, float* dst, int64_t n) {
  switch (type) {
    case DType::kF32: return DecodeRow<DType::kF32>(src, n, dst);
    case DType::kF16: return DecodeRow<DType::kF16>(src, n, dst);
    case DType::kBF16: return DecodeRow<DType::kBF16>(src, n, dst);
    case DType::kQ4_0: return DecodeRow<DType::kQ4_0>(src, n, dst);
    case DType::kQ4_1: return DecodeRow<DType::kQ4_1>(src, n, dst);
    case DType::kQ5_0: return DecodeRow<DType::kQ5_0>(src, n, dst);
    case DType::kQ5_1: return DecodeRow<DType::kQ5_1>(src, n, dst);
    case DType::kQ8_0: return DecodeRow<DType::kQ8_0>(src, n, dst);
    case DType::kQ4_K: return DecodeRow<DType::kQ4_K>(src, n, dst);
    case DType::kQ5_K: return DecodeRow<DType::kQ5_K>(src, n, dst);
    case DType::kQ6_K: return DecodeRow<DType::kQ6_K>(src, n, dst);
  }
}

// ---- norms ----

// Float statistics in vector lanes, two passes (mean, then squared deviations).
void LayerNormF(const float* x, const float* weight, const float* bias, int n, float eps,
                float* y) {
  const DF df;
  const int vec_n = n / static_cast<int>(kLanes) * static_cast<int>(kLanes);
  VF acc = hn::Zero(df);
  for (int i = 0; i < vec_n; i += kLanes) acc = hn::Add(acc, hn::LoadU(df, x + i));
  float sum = HorizontalSum(acc);
  for (int i = vec_n; i < n; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(n);
  const VF vm = hn::Set(df, mean);
  acc = hn::Zero(df);
  for (int i = 0; i < vec_n; i += kLanes) {
    const VF d = hn::Sub(hn::LoadU(df, x + i), vm);
    acc = hn::MulAdd(d, d, acc);
  }
  float ss = HorizontalSum(acc);
  for (int i = vec_n; i < n; ++i) ss += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  const VF vinv = hn::Set(df, inv);
  for (int i = 0; i < vec_n; i += kLanes) {
    const VF nx = hn::Mul(hn::Sub(hn::LoadU(df, x + i), vm), vinv);
    hn::StoreU(hn::MulAdd(nx, hn::LoadU(df, weight + i), hn::LoadU(df, bias + i)), df, y + i);
  }
  for (int i = vec_n; i < n; ++i) y[i] = (x[i] - mean) * inv * weight[i] + bias[i];
}

// ---- element-wise activations ----
// The tail is padded into a full vector so every element goes through the same vector code.

template <class F>
HWY_INLINE void Map(float* x, size_t n, F f) {
  const DF df;
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) hn::StoreU(f(df, hn::LoadU(df, x + i)), df, x + i);
  if (i < n) {
    HWY_ALIGN float tail[kLanes] = {};
    std::memcpy(tail, x + i, (n - i) * sizeof(float));
    hn::Store(f(df, hn::Load(df, tail)), df, tail);
    std::memcpy(x + i, tail, (n - i) * sizeof(float));
  }
}

HWY_INLINE VF SigmoidV(DF df, VF v) {
  // With e = e^-|v| (never overflows): 1 / (1 + e) for v >= 0, e / (1 + e) for v < 0.
  const VF e = hn::Exp(df, hn::Neg(hn::Abs(v)));
  const VF inv = hn::Div(hn::Set(df, 1.0f), hn::Add(hn::Set(df, 1.0f), e));
  return hn::IfThenElse(hn::Lt(v, hn::Zero(df)), hn::Mul(e, inv), inv);
}

// Functors rather than lambdas: every compiler then applies the target attributes.
struct TanhOp {
  HWY_INLINE VF operator()(DF df, VF v) const { return hn::Tanh(df, v); }
};
struct SigmoidOp {
  HWY_INLINE VF operator()(DF df, VF v) const { return SigmoidV(df, v); }
};
struct SiluOp {
  HWY_INLINE VF operator()(DF df, VF v) const { return hn::Mul(v, SigmoidV(df, v)); }
};
struct SquaredReluOp {  // branch-free: the signs of FFN keys are a coin toss
  HWY_INLINE VF operator()(DF df, VF v) const {
    const VF r = hn::IfThenZeroElse(hn::Lt(v, hn::Zero(df)), v);  // NaN stays NaN
    return hn::Mul(r, r);
  }
};
struct ExpOp {
  HWY_INLINE VF operator()(DF df, VF v) const {
    const float kMaxLog = 88.7228394f;  // ln(FLT_MAX)
    const VF e = hn::Exp(df, hn::Min(v, hn::Set(df, kMaxLog)));
    return hn::IfThenElse(hn::Gt(v, hn::Set(df, kMaxLog)), hn::Inf(df), e);
  }
};

void TanhF(float* x, size_t n) { Map(x, n, TanhOp()); }
void SigmoidF(float* x, size_t n) { Map(x, n, SigmoidOp()); }
void SiluF(float* x, size_t n) { Map(x, n, SiluOp()); }
void ExpF(float* x, size_t n) { Map(x, n, ExpOp()); }
void SquaredReluF(float* x, size_t n) { Map(x, n, SquaredReluOp()); }

const char* TargetNameF() { return hwy::TargetName(HWY_TARGET); }

}  // namespace HWY_NAMESPACE
}  // namespace aviary
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace aviary {

HWY_EXPORT(MatMulRows);
HWY_EXPORT(DecodeRowAny);
HWY_EXPORT(LayerNormF);
HWY_EXPORT(TanhF);
HWY_EXPORT(SigmoidF);
HWY_EXPORT(SiluF);
HWY_EXPORT(ExpF);
HWY_EXPORT(SquaredReluF);
HWY_EXPORT(TargetNameF);

namespace {

inline bool Reference() { return CurrentRuntime().options().kernels == Kernels::kReference; }

// Work below which a product runs on the calling thread alone: waking workers costs a few
// microseconds, the low-rank matrices (e.g. 64 x 1024) take about as long.
constexpr int64_t kMinParallelMacs = 1 << 17;

}  // namespace

Kernels ActiveKernels() { return CurrentRuntime().options().kernels; }
const char* KernelTarget() { return KernelTargetOf(ActiveKernels()); }
const char* KernelTargetOf(Kernels kernels) {
  return kernels == Kernels::kReference ? "scalar" : HWY_DYNAMIC_DISPATCH(TargetNameF)();
}

const char* Runtime::kernel_target() const { return KernelTargetOf(options_.kernels); }
bool Runtime::int8_activations() const {
  return options_.kernels == Kernels::kFast && options_.activations != Activations::kF32 &&
         int8::CpuSupported();
}
bool Runtime::bf16_activations() const {
  return options_.kernels == Kernels::kFast && options_.activations == Activations::kAuto &&
         bf16::CpuSupported();
}

namespace fast {

void MatMul(const Tensor& w, const float* x, int T, float* y, int max_threads) {
  const MatMulJob job{w, x, y};
  MatMulBatch(&job, 1, T, max_threads);
}

void MatMulBatch(const MatMulJob* jobs, int n_jobs, int T, int max_threads) {
  const auto kernel = HWY_DYNAMIC_DISPATCH(MatMulRows);
  // How each product is cut into tasks of whole 4-row tiles. Quantized weights take 8-bit
  // activations and integer dot products where the CPU has them, F16/BF16 weights bfloat16
  // ones; each x is rounded once here, before the rows are split, so every thread sees the
  // same numbers.
  enum class Path : uint8_t { kFloat, kInt8, kBf16 };
  struct Plan {
    Path path;
    int64_t tiles_per_task, first_task;
  };
  // One rounded x per product, kept for reuse (no allocation once they have grown).
  thread_local std::vector<int8::Activations> caller_acts;
  thread_local std::vector<bf16::Activations> caller_bf16;
  thread_local std::vector<Plan> plans;
  if (caller_acts.size() < static_cast<size_t>(n_jobs)) caller_acts.resize(n_jobs);
  if (caller_bf16.size() < static_cast<size_t>(n_jobs)) caller_bf16.resize(n_jobs);
  plans.resize(n_jobs);
  const int8::Activations* acts = caller_acts.data();  // what the workers' lambda reads
  const bf16::Activations* acts_bf16 = caller_bf16.data();
  int64_t macs = 0;
  for (int j = 0; j < n_jobs; ++j) macs += jobs[j].w.rows() * jobs[j].w.cols() * T;
  int threads = max_threads > 0 ? max_threads : NumThreads();
  if (macs < kMinParallelMacs) threads = 1;
  int64_t tasks = 0;
  for (int j = 0; j < n_jobs; ++j) {
    const Tensor& w = jobs[j].w;
    Plan& p = plans[j];
    p.path = int8::SupportsType(w.type) && int8::Enabled()   ? Path::kInt8
             : bf16::SupportsType(w.type) && bf16::Enabled() ? Path::kBf16
                                                             : Path::kFloat;
    if (p.path == Path::kInt8) int8::Quantize(jobs[j].x, T, w.cols(), &caller_acts[j]);
    if (p.path == Path::kBf16) bf16::RoundActivations(jobs[j].x, T, w.cols(), &caller_bf16[j]);
    // About 8 tasks per thread and product (dynamic hand-out evens out a busy core), each of at
    // least 16 rows so it streams a useful amount of memory; a product too small to be worth
    // splitting (a low-rank matrix) is one task, run beside the others.
    const int64_t tiles = (w.rows() + 3) / 4;
    int64_t per_task = tiles;
    if (threads > 1 && w.rows() * w.cols() * T >= kMinParallelMacs) {
      per_task = std::max<int64_t>(4, tiles / (8 * threads));
    }
    p.tiles_per_task = std::max<int64_t>(1, std::min(per_task, tiles));
    p.first_task = tasks;
    tasks += (tiles + p.tiles_per_task - 1) / p.tiles_per_task;
  }
  const Plan* plan = plans.data();  // the caller's plans, read by the workers
  auto run = [&](int64_t task, int) {
    int j = n_jobs - 1;
    while (plan[j].first_task > task) --j;  // a handful of products: a scan is enough
    const Tensor& w = jobs[j].w;
    const int64_t rows = w.rows();
    const int64_t r0 = (task - plan[j].first_task) * plan[j].tiles_per_task * 4;
    const int64_t r1 = std::min(rows, r0 + plan[j].tiles_per_task * 4);
    switch (plan[j].path) {
      case Path::kInt8:
        int8::MatMulRows(w.type, w.data, w.row_bytes(), rows, w.cols(), r0, r1, acts[j], jobs[j].y);
        break;
      case Path::kBf16:
        bf16::MatMulRows(w.type, w.data, w.row_bytes(), rows, w.cols(), r0, r1, acts_bf16[j],
                         jobs[j].y);
        break;
      case Path::kFloat:
        kernel(w.type, w.data, w.row_bytes(), rows, w.cols(), r0, r1, jobs[j].x, T, jobs[j].y);
        break;
    }
  };
  if (threads == 1 || tasks == 1) {
    for (int64_t t = 0; t < tasks; ++t) run(t, 0);
  } else {
    ParallelFor(tasks, run, threads);
  }
}

void DequantizeRow(DType type, const uint8_t* src, float* dst, int64_t n) {
  HWY_DYNAMIC_DISPATCH(DecodeRowAny)(type, src, dst, n);
}

void LayerNorm(const float* x, const float* weight, const float* bias, int n, float eps,
               float* y) {
  HWY_DYNAMIC_DISPATCH(LayerNormF)(x, weight, bias, n, eps, y);
}

void GroupNorm(const float* x, const float* weight, const float* bias, int n, int groups,
               float eps, float* y) {
  const int g = n / groups;
  const auto norm = HWY_DYNAMIC_DISPATCH(LayerNormF);
  for (int h = 0; h < groups; ++h) norm(x + h * g, weight + h * g, bias + h * g, g, eps, y + h * g);
}

void Tanh(float* x, size_t n) { HWY_DYNAMIC_DISPATCH(TanhF)(x, n); }
void Sigmoid(float* x, size_t n) { HWY_DYNAMIC_DISPATCH(SigmoidF)(x, n); }
void Exp(float* x, size_t n) { HWY_DYNAMIC_DISPATCH(ExpF)(x, n); }
void Silu(float* x, size_t n) { HWY_DYNAMIC_DISPATCH(SiluF)(x, n); }
void SquaredRelu(float* x, size_t n) { HWY_DYNAMIC_DISPATCH(SquaredReluF)(x, n); }

}  // namespace fast

// ---- the dispatching entry points ----

void MatMul(const Tensor& w, const float* x, int T, float* y) {
  if (Reference()) return ref::MatMul(w, x, T, y);
  fast::MatMul(w, x, T, y);
}

void MatMulBatch(std::span<const MatMulJob> jobs, int T) {
  if (Reference()) {
    for (const MatMulJob& j : jobs) ref::MatMul(j.w, j.x, T, j.y);
    return;
  }
  fast::MatMulBatch(jobs.data(), static_cast<int>(jobs.size()), T);
}

void GatherRow(const Tensor& table, int64_t row, float* y) {
  if (Reference()) return aviary::DequantizeRow(table.type, table.row(row), y, table.cols());
  fast::DequantizeRow(table.type, table.row(row), y, table.cols());
}

void LayerNorm(const float* x, const float* weight, const float* bias, int n, float eps,
               float* y) {
  if (Reference()) return ref::LayerNorm(x, weight, bias, n, eps, y);
  fast::LayerNorm(x, weight, bias, n, eps, y);
}

void GroupNorm(const float* x, const float* weight, const float* bias, int n, int groups,
               float eps, float* y) {
  if (Reference()) return ref::GroupNorm(x, weight, bias, n, groups, eps, y);
  fast::GroupNorm(x, weight, bias, n, groups, eps, y);
}

void TanhInPlace(float* x, size_t n) { Reference() ? ref::Tanh(x, n) : fast::Tanh(x, n); }
void SigmoidInPlace(float* x, size_t n) {
  Reference() ? ref::Sigmoid(x, n) : fast::Sigmoid(x, n);
}
void ExpInPlace(float* x, size_t n) { Reference() ? ref::Exp(x, n) : fast::Exp(x, n); }
void SiluInPlace(float* x, size_t n) { Reference() ? ref::Silu(x, n) : fast::Silu(x, n); }
void SquaredReluInPlace(float* x, size_t n) {
  Reference() ? ref::SquaredRelu(x, n) : fast::SquaredRelu(x, n);
}

}  // namespace aviary
#endif  // HWY_ONCE
