// The float-path MatMul of kernels.cpp, per Highway target: decoders from each weight type to
// float vectors, the one-token rows (GemvRows), the widening of rows (DecodeRow) and the
// sequence tiles (GemmTile).
//
// MatMul design. Every output y[t, r] is one dot product computed as: a single vector
// accumulator (N = min(16, lanes) floats) updated with acc = w_chunk * x_chunk + acc (fused
// multiply-add) for each N-wide chunk of columns in order, then a fixed horizontal sum, then a
// scalar tail for cols % N (float types only). Weight chunks are widened exactly as
// DequantizeRow widens them (same float values). Both paths here follow this order exactly,
// so an output does not depend on T, on which path ran, or on how rows were split among
// threads:
//  - T = 1 (generation, memory-bound): 4 rows at a time stream their blocks and widen them in
//    registers, each weight byte read once;
//  - T > 1 (sequence mode, compute-bound): 4 rows are widened once into a small buffer (L1)
//    and a 4-row x TT-token register tile of accumulators runs over it (TT = 4 with 32 vector
//    registers, 2 with 16), so each widened weight is reused for every token.
// Rows are spread over the thread pool in tasks of whole 4-row tiles.
//
// Each weight type's instances are compiled in a file of their own (matmul_<type>.cpp, with
// AVIARY_MATMUL_INSTANCES), the tiles, shared by every type, in matmul_tile.cpp; the other
// files see them as extern templates. So the types compile in parallel, and no compile unit
// holds them all. Every file that includes this one must be compiled with -ffp-contract=off
// (CMakeLists.txt): multiply-adds are fused only where the code says so.
//
// Included once per target after hwy/foreach_target.h, hence the toggle guard in place of
// #pragma once.

// The parts outside HWY_NAMESPACE, once per file.
#ifndef AVIARY_MATMUL_INL_ONCE
#define AVIARY_MATMUL_INL_ONCE
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "tensor/aligned.h"
#include "tensor/dtype.h"
#include "tensor/lane_sums.h"
#endif  // AVIARY_MATMUL_INL_ONCE

#if defined(AVIARY_MATMUL_INL_H_TARGET) == defined(HWY_TARGET_TOGGLE)
#ifdef AVIARY_MATMUL_INL_H_TARGET
#undef AVIARY_MATMUL_INL_H_TARGET
#else
#define AVIARY_MATMUL_INL_H_TARGET
#endif

#include "hwy/cache_control.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace aviary {
namespace HWY_NAMESPACE {
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
  struct S {
    float d;
  };
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
  struct S {
    float d, m;
  };
  static HWY_INLINE S Scale(const uint8_t* p) { return {HalfToFloat(p), HalfToFloat(p + 2)}; }
  static HWY_INLINE VF Chunk(const uint8_t* p, int k, S s) {
    const VF q = hn::ConvertTo(DF(), Nibbles(p + 4, k));
    return hn::Add(hn::Mul(q, hn::Set(DF(), s.d)), hn::Set(DF(), s.m));
  }
};

template <>
struct Dec<DType::kQ5_0> {
  static constexpr size_t kElems = 32, kBytes = sizeof(BlockQ5_0);
  struct S {
    float d;
    uint32_t qh;
  };
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
  struct S {
    float d, m;
    uint32_t qh;
  };
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
  struct S {
    float d;
  };
  static HWY_INLINE S Scale(const uint8_t* p) { return {HalfToFloat(p)}; }
  static HWY_INLINE VF Chunk(const uint8_t* p, int k, S s) {
    const hn::Rebind<int8_t, DF> di8;
    const hn::RebindToSigned<DF> di32;
    const auto q =
        hn::PromoteTo(di32, hn::LoadU(di8, reinterpret_cast<const int8_t*>(p + 2) + k * kLanes));
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
  struct S {
    float d[8], m[8];
  };
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
      const auto h =
          hn::And(hn::ShiftRightSame(WideBytes(p + offsetof(Block, qh) + i), j), hn::Set(di32, 1));
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
  struct S {
    float d[16];
  };
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
    const auto top =
        hn::And(hn::ShiftRightSame(WideBytes(p + offsetof(BlockQ6_K, qh) + 32 * h + l), 2 * part),
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
// BF16) with 16 lanes: one long stream for the hardware prefetchers, and a float row is cheap
// enough to widen that memory bounds it. With 8 lanes (AVX2) a row's single chain of
// multiply-adds is twice as long and bound by the FMA latency, which R independent chains
// side by side hide; quantized weights spend their time decoding, not waiting on memory.
// Side by side otherwise.
template <DType kType>
constexpr bool kRowsInAddressOrder = kLanes >= 16 &&
                                     (kType == DType::kF32 || kType == DType::kF16 ||
                                      kType == DType::kBF16);

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
        for (; prefetched < (g + 1) * D::kBytes; prefetched += 64)
          hwy::Prefetch(ahead + prefetched);
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
        for (int r = 0; r < R; ++r)
          acc[r] = hn::MulAdd(D::Chunk(p + r * row_bytes, k, s[r]), xv, acc[r]);
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

// All T tokens times the n <= kTileRows widened rows in `wbuf` (GemmRows<n>). The same code
// for every weight type, so it is compiled once, in matmul_tile.cpp.
void GemmWidenedRows(int n, const float* wbuf, size_t ws, int64_t cols, const float* x, int T,
                     float* y, int64_t rows);

// ---- the entry points of one weight type ----

// Rows [r0, r1) of y = W x for all T tokens (kernels.cpp's MatMulRows for one type).
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
    for (int i = 0; i < n; ++i)
      DecodeRow<kType>(w + (r + i) * row_bytes, cols, buf.data() + i * ws);
    GemmWidenedRows(n, buf.data(), ws, cols, x, T, y + r, rows);
  }
}

// A row widened to float on its own (GatherRow, DequantizeRow).
template <DType kType>
void DecodeRowT(const uint8_t* row, int64_t cols, float* out) {
  DecodeRow<kType>(row, cols, out);
}

// AVIARY_MATMUL_INSTANCES(, kType) in matmul_<type>.cpp compiles a type's entry points there;
// here they are declared extern for every other file, which then only calls them.
#ifndef AVIARY_MATMUL_INSTANCES
#define AVIARY_MATMUL_INSTANCES(EXTERN, kType)                                               \
  EXTERN template void MatMulRowsT<kType>(const uint8_t*, size_t, int64_t, int64_t, int64_t, \
                                          int64_t, const float*, int, float*);               \
  EXTERN template void DecodeRowT<kType>(const uint8_t*, int64_t, float*)
#endif
AVIARY_MATMUL_INSTANCES(extern, DType::kF32);
AVIARY_MATMUL_INSTANCES(extern, DType::kF16);
AVIARY_MATMUL_INSTANCES(extern, DType::kBF16);
AVIARY_MATMUL_INSTANCES(extern, DType::kQ4_0);
AVIARY_MATMUL_INSTANCES(extern, DType::kQ4_1);
AVIARY_MATMUL_INSTANCES(extern, DType::kQ5_0);
AVIARY_MATMUL_INSTANCES(extern, DType::kQ5_1);
AVIARY_MATMUL_INSTANCES(extern, DType::kQ8_0);
AVIARY_MATMUL_INSTANCES(extern, DType::kQ4_K);
AVIARY_MATMUL_INSTANCES(extern, DType::kQ5_K);
AVIARY_MATMUL_INSTANCES(extern, DType::kQ6_K);

}  // namespace HWY_NAMESPACE
}  // namespace aviary
HWY_AFTER_NAMESPACE();

#endif  // AVIARY_MATMUL_INL_H_TARGET
