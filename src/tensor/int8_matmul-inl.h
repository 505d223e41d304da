// 8-bit-activation MatMul for quantized weights with AVX-512 VNNI: the kernels, per weight type.
// See int8_matmul.h.
//
// Written with x86 intrinsics rather than Highway: the Debian Highway (1.0.3) has no int8 dot
// product op, and vpdpbusd is the whole point here. The functions carry a target attribute and
// run only after a CPUID check, so the binary still runs on any x86-64 (and the file compiles
// to the scalar reference alone elsewhere).
//
// Every weight type becomes the same thing in registers: unsigned bytes u (0..255) with an
// offset k and, for Q4_1/Q5_1, a minimum m, so that w = d_w * (u - k) + m:
//   Q8_0: u = q + 128, k = 128     Q4_0: u = q, k = 8     Q5_0: u = q, k = 16
//   Q4_1, Q5_1: u = q, k = 0, with m.
//   Q4_K, Q5_K: per 32-weight sub-block j, u = q, k = 0, d_w = d sc_j, m = -dmin m_j.
// One block's contribution to y = sum_c w_c x_c with x_c ~ d_x * q_c is then
//   d_w * d_x * (sum u_c q_c - k * sum q_c)  +  m * d_x * sum q_c,
// where the bracket is an exact int32 (vpdpbusd(u, q) starting from -k * sum q). The float
// step is taken for 16 blocks at once, one block per lane: acc += float(isum) * d_x * d_w,
// and the accumulator is summed horizontally at the end; for Q4_1/Q5_1 the same step first
// adds m * (d_x sum q) per block. Only the integer sums are computed differently by the paths:
//  - T = 1 unpacks four blocks per pair of vectors in registers (bytes 0..15 of each, then
//    16..31: 4 lanes per block) and folds the lanes of 16 blocks into one vector of block
//    sums (integer adds: exact);
//  - T > 1 unpacks 4 rows once into a buffer regrouped so that each 32-bit lane walks one
//    block (Activations::qt has x the same way): 8 vpdpbusd give 16 finished block sums, with
//    no folding, and a 4-row x 3-token tile of them runs over the buffer.
//
// Each weight type's instance is compiled in a file of its own (int8_matmul_<type>.cpp, with
// AVIARY_INT8_MATMUL_INSTANCE) and declared extern here for int8_matmul.cpp, which dispatches
// to them: the types compile in parallel, and no compile unit holds them all.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "tensor/aligned.h"
#include "tensor/dtype.h"
#include "tensor/int8_matmul.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define AVIARY_HAVE_VNNI_CODE 1
#include <immintrin.h>

#include "tensor/lane_sums.h"  // also silences GCC 12's false warnings in its AVX-512 headers
#else
#define AVIARY_HAVE_VNNI_CODE 0
#endif

namespace aviary::int8::vnni {

// Offsets per type (see above).
constexpr int Offset(DType type) {
  return type == DType::kQ8_0 ? 128 : type == DType::kQ4_0 ? 8 : type == DType::kQ5_0 ? 16 : 0;
}
constexpr bool IsK(DType type) { return type == DType::kQ4_K || type == DType::kQ5_K; }
constexpr bool HasMin(DType type) {
  return type == DType::kQ4_1 || type == DType::kQ5_1 || IsK(type);
}
// Bytes of one 32-weight block; for the K-quants, of one 256-weight super-block.
constexpr size_t BlockBytes(DType type) {
  return type == DType::kQ4_0   ? sizeof(BlockQ4_0)
         : type == DType::kQ4_1 ? sizeof(BlockQ4_1)
         : type == DType::kQ5_0 ? sizeof(BlockQ5_0)
         : type == DType::kQ5_1 ? sizeof(BlockQ5_1)
         : type == DType::kQ4_K ? sizeof(BlockQ4_K)
         : type == DType::kQ5_K ? sizeof(BlockQ5_K)
                                : sizeof(BlockQ8_0);
}
// Bytes of 16 consecutive 32-weight blocks (a group of the kernels): 2 super-blocks for K.
constexpr size_t GroupBytes(DType type) {
  return IsK(type) ? 2 * BlockBytes(type) : 16 * BlockBytes(type);
}

#if AVIARY_HAVE_VNNI_CODE
#define AVIARY_VNNI                                                                \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c"), \
                 always_inline)) inline
#define AVIARY_VNNI_FN \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))

// 16 nibble bytes of two blocks -> 64 bytes [lo(a), hi(a), lo(b), hi(b)] (element order).
AVIARY_VNNI __m512i Nibbles2(__m128i a, __m128i b) {
  const __m512i v =
      _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(a, a)), _mm256_set_m128i(b, b), 1);
  const __m512i shifted = _mm512_srlv_epi64(v, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
  return _mm512_and_si512(shifted, _mm512_set1_epi8(0x0f));
}

// Two consecutive blocks (the second absent when `half`) of a row as u bytes, in element
// order (T > 1 regroups them).
template <DType kType>
AVIARY_VNNI __m512i UnpackPair(const uint8_t* p, bool half) {
  constexpr size_t kB = BlockBytes(kType);
  const uint8_t* p1 = p + kB;
  if constexpr (kType == DType::kQ8_0) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
    const __m256i b = half ? _mm256_setzero_si256()
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p1 + 2));
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
    // q + 128 as unsigned; the absent block's zeros become 128, multiplied by q = 0.
    return _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    constexpr size_t kQs = kType == DType::kQ4_0   ? 2
                           : kType == DType::kQ4_1 ? 4
                           : kType == DType::kQ5_0 ? 6
                                                   : 8;
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kQs));
    const __m128i b =
        half ? _mm_setzero_si128() : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1 + kQs));
    __m512i u = Nibbles2(a, b);
    if constexpr (kType == DType::kQ5_0 || kType == DType::kQ5_1) {
      constexpr size_t kQh = kType == DType::kQ5_0 ? 2 : 4;
      uint32_t h0, h1 = 0;
      std::memcpy(&h0, p + kQh, 4);
      if (!half) std::memcpy(&h1, p1 + kQh, 4);
      const __mmask64 bits = static_cast<__mmask64>(h0) | (static_cast<__mmask64>(h1) << 32);
      u = _mm512_or_si512(u, _mm512_maskz_mov_epi8(bits, _mm512_set1_epi8(0x10)));
    }
    return u;
  }
}

// ---- K-quants (Q4_K, Q5_K): blocks are the 32-weight sub-blocks of 256-weight super-blocks ----

template <DType kType>
constexpr size_t QsOffset() {
  return kType == DType::kQ4_K ? offsetof(BlockQ4_K, qs) : offsetof(BlockQ5_K, qs);
}

// Q5_K: the fifth bits of sub-block j's 32 elements (bit i = element i), from qh.
AVIARY_VNNI uint32_t FifthBitsK(__m256i qh, int j) {
  return _mm256_test_epi8_mask(qh, _mm256_set1_epi8(static_cast<char>(1 << j)));
}

// Sub-blocks 2c and 2c + 1 of the super-block at p as u bytes in element order (64 bytes).
template <DType kType>
AVIARY_VNNI __m512i UnpackPairK(const uint8_t* p, int c) {
  const __m256i v =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + QsOffset<kType>() + 32 * c));
  const __m256i mask = _mm256_set1_epi8(0x0f);
  __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, mask)),
                                 _mm256_and_si256(_mm256_srli_epi16(v, 4), mask), 1);
  if constexpr (kType == DType::kQ5_K) {
    const __m256i qh =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + offsetof(BlockQ5_K, qh)));
    const __mmask64 bits = static_cast<__mmask64>(FifthBitsK(qh, 2 * c)) |
                           (static_cast<__mmask64>(FifthBitsK(qh, 2 * c + 1)) << 32);
    u = _mm512_or_si512(u, _mm512_maskz_mov_epi8(bits, _mm512_set1_epi8(0x10)));
  }
  return u;
}

// Sub-blocks 4h .. 4h + 3 of the super-block at p as the two vectors of a quad (bytes 0..15 of
// each block, then 16..31), like UnpackQuad. qs[32c ..] holds blocks 2c (low nibbles) and 2c+1
// (high), so one 64-byte load has the 4 blocks' nibbles; two permutes put them in quad order.
template <DType kType>
AVIARY_VNNI void UnpackQuadK(const uint8_t* p, int h, __m512i* lo, __m512i* hi) {
  const __m512i v = _mm512_loadu_si512(p + QsOffset<kType>() + 64 * h);
  const __m512i mask = _mm512_set1_epi8(0x0f);
  const __m512i low = _mm512_and_si512(v, mask),
                high = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
  // 128-bit lanes of v: [c0 bytes 0..15, c0 16..31, c1 0..15, c1 16..31]; blocks 4h + 0..3
  // are low(c0), high(c0), low(c1), high(c1).
  *lo = _mm512_permutex2var_epi64(low, _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), high);
  *hi = _mm512_permutex2var_epi64(low, _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15), high);
  if constexpr (kType == DType::kQ5_K) {
    const __m256i qh =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + offsetof(BlockQ5_K, qh)));
    uint64_t bits_lo = 0, bits_hi = 0;
    for (int i = 0; i < 4; ++i) {
      const uint32_t b = FifthBitsK(qh, 4 * h + i);
      bits_lo |= static_cast<uint64_t>(b & 0xffff) << (16 * i);
      bits_hi |= static_cast<uint64_t>(b >> 16) << (16 * i);
    }
    const __m512i five = _mm512_set1_epi8(0x10);
    *lo = _mm512_or_si512(*lo, _mm512_maskz_mov_epi8(bits_lo, five));
    *hi = _mm512_or_si512(*hi, _mm512_maskz_mov_epi8(bits_hi, five));
  }
}

// The 8 six-bit scales and 8 minima of a super-block (ScaleMinK4 for j = 0..7) as 16 bytes
// [sc_0 .. sc_7, m_0 .. m_7], with a few word operations on the 12 packed bytes: word w holds
// bytes 4w .. 4w + 3, and j >= 4 takes its low bits from byte j + 4, its top two from byte j - 4
// (scale) or j (minimum).
AVIARY_VNNI __m128i ScalesMinsK(const uint8_t* packed) {
  uint32_t w[3];
  std::memcpy(w, packed, 12);
  constexpr uint32_t kLow6 = 0x3f3f3f3f, kLow4 = 0x0f0f0f0f, kLow2 = 0x03030303;
  const uint32_t sc03 = w[0] & kLow6, m03 = w[1] & kLow6;
  const uint32_t sc47 = (w[2] & kLow4) | (((w[0] >> 6) & kLow2) << 4);
  const uint32_t m47 = ((w[2] >> 4) & kLow4) | (((w[1] >> 6) & kLow2) << 4);
  return _mm_setr_epi32(static_cast<int>(sc03), static_cast<int>(sc47), static_cast<int>(m03),
                        static_cast<int>(m47));
}

// d_w = d sc_j and m = -(dmin m_j) of a group's 16 blocks (n present, 8 or 16; the rest 0),
// the same float operations as SubBlockScalesK.
template <DType kType>
AVIARY_VNNI void GroupScalesK(const uint8_t* p, int64_t n, __m512* d, __m512* m) {
  const uint8_t* p1 = p + BlockBytes(kType);
  const bool second = n > 8;
  const __m128i sm0 = ScalesMinsK(p + 4), sm1 = second ? ScalesMinsK(p1 + 4) : _mm_setzero_si128();
  const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(sm0, sm1)));
  const __m512 mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi64(sm0, sm1)));
  uint32_t h0, h1 = 0;  // d and dmin of each super-block as one word
  std::memcpy(&h0, p, 4);
  if (second) std::memcpy(&h1, p1, 4);
  // Halves [d0, dmin0, d1, dmin1]: lanes 0..7 take super-block 0's, 8..15 super-block 1's.
  const __m256i words =
      _mm256_castsi128_si256(_mm_setr_epi32(static_cast<int>(h0), static_cast<int>(h1), 0, 0));
  const __m512 super_d = _mm512_cvtph_ps(_mm256_permutexvar_epi16(
      _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2), words));
  const __m512 super_dmin = _mm512_cvtph_ps(_mm256_permutexvar_epi16(
      _mm256_setr_epi16(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3), words));
  *d = _mm512_mul_ps(super_d, sc);
  *m = _mm512_xor_ps(_mm512_mul_ps(super_dmin, mn), _mm512_set1_ps(-0.0f));  // exact negation
}

// The f16 scales d (and minima m) of 16 consecutive blocks (n present, the rest 0) as floats.
// Each quad's 4 values lie in a 128-byte window, picked by one two-register permute (no
// scalar stores that a vector load would then have to wait for).
template <DType kType, int kOffset>
struct GroupWordIndex {  // the permute indices of GroupScales, one table per quad
  static constexpr int kB = static_cast<int>(BlockBytes(kType));
  struct Table {
    alignas(64) uint16_t idx[4][32] = {};
    constexpr Table() {
      for (int qd = 0; qd < 4; ++qd) {
        for (int i = 0; i < 4; ++i)
          idx[qd][4 * qd + i] = static_cast<uint16_t>((i * kB + kOffset) / 2);
      }
    }
  };
  static constexpr Table kTable{};
};

// Both at once for Q4_1/Q5_1 (one set of loads): d in *d, m in *m.
template <DType kType>
AVIARY_VNNI void GroupScales(const uint8_t* p, int64_t n, __m512* d, __m512* m) {
  constexpr int kB = static_cast<int>(BlockBytes(kType));
  __m512i dw = _mm512_setzero_si512(), mw = _mm512_setzero_si512();
  for (int qd = 0; qd < 4 && 4 * qd < n; ++qd) {
    const int bytes = static_cast<int>(std::min<int64_t>(4, n - 4 * qd)) * kB;
    const __mmask64 m0 = bytes >= 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
    const __mmask64 m1 = bytes >= 128 ? ~__mmask64{0}
                         : bytes > 64 ? (__mmask64{1} << (bytes - 64)) - 1
                                      : 0;
    const uint8_t* base = p + 4 * qd * kB;
    const __m512i v0 = _mm512_maskz_loadu_epi8(m0, base),
                  v1 = _mm512_maskz_loadu_epi8(m1, base + 64);
    const __mmask32 lanes = static_cast<__mmask32>(0xfu << (4 * qd));
    dw = _mm512_mask_mov_epi16(
        dw, lanes,
        _mm512_permutex2var_epi16(v0, _mm512_load_si512(GroupWordIndex<kType, 0>::kTable.idx[qd]),
                                  v1));
    if constexpr (HasMin(kType)) {
      mw = _mm512_mask_mov_epi16(
          mw, lanes,
          _mm512_permutex2var_epi16(v0, _mm512_load_si512(GroupWordIndex<kType, 2>::kTable.idx[qd]),
                                    v1));
    }
  }
  *d = _mm512_cvtph_ps(_mm512_castsi512_si256(dw));
  *m = HasMin(kType) ? _mm512_cvtph_ps(_mm512_castsi512_si256(mw)) : _mm512_setzero_ps();
}

AVIARY_VNNI __m512i Join4(const __m128i* x) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(x[1], x[0])),
                            _mm256_set_m128i(x[3], x[2]), 1);
}

// Up to four consecutive blocks of a row (n of them present) as the two vectors of a quad
// (bytes 0..15 of each block, then bytes 16..31).
template <DType kType>
AVIARY_VNNI void UnpackQuad(const uint8_t* p, int n, __m512i* lo, __m512i* hi) {
  constexpr size_t kB = BlockBytes(kType);
  if constexpr (kType == DType::kQ8_0) {
    // Two blocks per 256-bit half, then the 16-byte halves of the 4 blocks picked apart.
    __m256i whole[4];
    for (int i = 0; i < 4; ++i) {
      const uint8_t* b = p + i * kB;
      whole[i] = i < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2))
                       : _mm256_setzero_si256();
    }
    const __m512i v01 = _mm512_inserti64x4(_mm512_castsi256_si512(whole[0]), whole[1], 1);
    const __m512i v23 = _mm512_inserti64x4(_mm512_castsi256_si512(whole[2]), whole[3], 1);
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    *lo = _mm512_xor_si512(
        _mm512_permutex2var_epi64(v01, _mm512_setr_epi64(0, 1, 4, 5, 8, 9, 12, 13), v23), flip);
    *hi = _mm512_xor_si512(
        _mm512_permutex2var_epi64(v01, _mm512_setr_epi64(2, 3, 6, 7, 10, 11, 14, 15), v23), flip);
    return;
  }
  constexpr size_t kQs = kType == DType::kQ4_0   ? 2
                         : kType == DType::kQ4_1 ? 4
                         : kType == DType::kQ5_0 ? 6
                                                 : 8;
  __m128i part[4];
  uint64_t bits_lo = 0, bits_hi = 0;  // Q5: the fifth bits of elements 0..15, 16..31 per block
  for (int i = 0; i < 4; ++i) {
    part[i] = _mm_setzero_si128();
    if (i >= n) continue;
    part[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i * kB + kQs));
    if constexpr (kType == DType::kQ5_0 || kType == DType::kQ5_1) {
      uint32_t qh;
      std::memcpy(&qh, p + i * kB + (kType == DType::kQ5_0 ? 2 : 4), 4);
      bits_lo |= static_cast<uint64_t>(qh & 0xffff) << (16 * i);
      bits_hi |= static_cast<uint64_t>(qh >> 16) << (16 * i);
    }
  }
  const __m512i v = Join4(part), mask = _mm512_set1_epi8(0x0f);
  *lo = _mm512_and_si512(v, mask);
  *hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
  if constexpr (kType == DType::kQ5_0 || kType == DType::kQ5_1) {
    const __m512i five = _mm512_set1_epi8(0x10);
    *lo = _mm512_or_si512(*lo, _mm512_maskz_mov_epi8(bits_lo, five));
    *hi = _mm512_or_si512(*hi, _mm512_maskz_mov_epi8(bits_hi, five));
  }
}

// The start of a block's int32 lanes: -k / kLanes * (sum of the block's q) in each of its
// kLanes lanes, so that they add up to -k * sum q. T > 1 (kLanes = 1): the 16 blocks from
// `sums`; T = 1 (kLanes = 4): the quad of 4 blocks from `sums`, each spread over its 128-bit
// lane.
template <DType kType, int kLanes>
AVIARY_VNNI __m512i OffsetInit(const int32_t* sums) {
  constexpr int kLog2K = Offset(kType) == 128 ? 7 : Offset(kType) == 16 ? 4 : 3;
  constexpr int kShift = kLog2K - (kLanes == 4 ? 2 : 0);
  if constexpr (Offset(kType) == 0) {
    return _mm512_setzero_si512();
  } else {
    __m512i s;
    if constexpr (kLanes == 4) {
      const __m128i quad = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sums));
      s = _mm512_permutexvar_epi32(
          _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
          _mm512_castsi128_si512(quad));
    } else {
      s = _mm512_loadu_si512(sums);
    }
    return _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(s, kShift));
  }
}

// acc += [m * (d_x sum q)] + float(isum) * d_x * d_w for 16 blocks: the float steps, shared
// by both paths so they round identically. The bracket is for Q4_1/Q5_1 only.
template <DType kType>
AVIARY_VNNI __m512 Accumulate(__m512 acc, __m512i isum, __m512 dx, __m512 dw, __m512 m, __m512 ds) {
  if constexpr (HasMin(kType)) acc = _mm512_fmadd_ps(m, ds, acc);
  return _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(isum), dx), dw, acc);
}

// 4 vectors of quad lanes (vector q: blocks 4q .. 4q+3, 4 lanes each) -> one vector of the
// 16 block sums in block order. Integer adds only.
AVIARY_VNNI __m512i Fold2(__m512i a, __m512i b) {  // integer versions of lane_sums.h's folds
  return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
}
AVIARY_VNNI __m512i Fold4(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}
AVIARY_VNNI __m512i FoldQuads(const __m512i* v) {
  // 128-bit lane L: [S(v0, L), S(v1, L), S(v2, L), S(v3, L)] = blocks L, 4+L, 8+L, 12+L.
  const __m512i s = Fold4(Fold2(v[0], v[1]), Fold2(v[2], v[3]));
  return _mm512_permutexvar_epi32(
      _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), s);
}

using lane_sums::FinalSums;  // every output's last float steps (lane_sums.h)

// Lane j of step k of a 16-block group = bytes 4k..4k+3 of block j (see Activations::qt):
// a 16 x 8 transpose of 32-bit words in three rounds of two-source permutes. Input vector p
// holds blocks 2p and 2p+1 (words k and 8 + k are dword k of each).
AVIARY_VNNI void RegroupGroup(const __m512i* v, uint8_t* out) {
  // Round 1: for 4 values of k, blocks 2p, 2p+1 of inputs p, p+1 -> [b0 b1 b2 b3] per k.
  const __m512i lo1 = _mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27);
  const __m512i hi1 = _mm512_add_epi32(lo1, _mm512_set1_epi32(4));
  __m512i a[8];
  for (int i = 0; i < 4; ++i) {
    a[2 * i] = _mm512_permutex2var_epi32(v[2 * i], lo1, v[2 * i + 1]);      // k = 0..3
    a[2 * i + 1] = _mm512_permutex2var_epi32(v[2 * i], hi1, v[2 * i + 1]);  // k = 4..7
  }
  // Round 2: 4 blocks of two such vectors per k -> 8 blocks for 2 values of k.
  const __m512i lo2 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i hi2 = _mm512_add_epi32(lo2, _mm512_set1_epi32(8));
  __m512i b[8];  // b[4 * half + 2 * j + s]: blocks 8 * half .. +7, k = 4 * j + 2 * s + (0, 1)
  for (int half = 0; half < 2; ++half) {
    for (int j = 0; j < 2; ++j) {
      const __m512i x = a[4 * half + j], y = a[4 * half + 2 + j];
      b[4 * half + 2 * j] = _mm512_permutex2var_epi32(x, lo2, y);
      b[4 * half + 2 * j + 1] = _mm512_permutex2var_epi32(x, hi2, y);
    }
  }
  // Round 3: blocks 0..7 and 8..15 of one k side by side.
  for (int j = 0; j < 2; ++j) {
    for (int s = 0; s < 2; ++s) {
      const __m512i x = b[2 * j + s], y = b[4 + 2 * j + s];
      const int k = 4 * j + 2 * s;
      _mm512_storeu_si512(out + k * 64, _mm512_shuffle_i64x2(x, y, 0x44));        // x.lo, y.lo
      _mm512_storeu_si512(out + (k + 1) * 64, _mm512_shuffle_i64x2(x, y, 0xee));  // x.hi, y.hi
    }
  }
}

AVIARY_VNNI void Regroup(const uint8_t* natural, uint8_t* grouped, int64_t groups) {
  for (int64_t g = 0; g < groups; ++g) {
    __m512i v[8];
    for (int p = 0; p < 8; ++p) v[p] = _mm512_loadu_si512(natural + g * 512 + p * 64);
    RegroupGroup(v, grouped + g * 512);
  }
}

// ---- T = 1: R rows unpacked in registers ----

// GCC must be told to unroll the loops of a group so that their arrays stay in registers.
// clang keeps them in registers on its own, and the pragma would multiply the instrumented
// code its sanitized build (the slow part of CI) has to compile.
#if defined(__clang__)
#define AVIARY_UNROLL4
#else
#define AVIARY_UNROLL4 _Pragma("GCC unroll 4")
#endif

// One group of 16 blocks for R rows: acc[r] += the group's float step. kFull: all 16 blocks
// present (every group but a row's last), so the quad loop has no block-count checks and
// unrolls with the row loop; GCC then keeps acc in registers instead of a stack copy.
template <DType kType, int R, bool kFull>
AVIARY_VNNI void GemvGroup(const uint8_t* w, size_t row_bytes, const Activations& a, int64_t g,
                           __m512* acc) {
  constexpr size_t kB = BlockBytes(kType);
  constexpr size_t kGB = GroupBytes(kType);
  const int8_t* xq = a.q_at(0);
  const int32_t* sums = a.sums_at(0);
  // x and the offsets of this group's 4 quads serve all R rows. x goes to quad order like
  // the weights (UnpackQuad): bytes 0..15 of 4 blocks, then 16..31.
  __m512i x[8], init[4];
  AVIARY_UNROLL4
  for (int qd = 0; qd < 4; ++qd) {
    const int8_t* blocks = xq + g * 512 + qd * 128;
    const __m512i a01 = _mm512_loadu_si512(blocks), a23 = _mm512_loadu_si512(blocks + 64);
    x[2 * qd] = _mm512_shuffle_i64x2(a01, a23, 0x88);      // 128-bit lanes 0, 2 of each
    x[2 * qd + 1] = _mm512_shuffle_i64x2(a01, a23, 0xdd);  // lanes 1, 3
    init[qd] = OffsetInit<kType, 4>(sums + 16 * g + 4 * qd);
  }
  const __m512 dx = _mm512_loadu_ps(a.d_at(0) + 16 * g), ds = _mm512_loadu_ps(a.ds_at(0) + 16 * g);
  const int64_t present = kFull ? 16 : std::min<int64_t>(16, a.blocks - 16 * g);
  AVIARY_UNROLL4
  for (int r = 0; r < R; ++r) {
    const uint8_t* blocks = w + r * row_bytes + g * kGB;
    __m512i isum[4];
    AVIARY_UNROLL4
    for (int qd = 0; qd < 4; ++qd) {
      __m512i lo, hi;
      const int n = kFull ? 4 : static_cast<int>(std::clamp<int64_t>(present - 4 * qd, 0, 4));
      if constexpr (IsK(kType)) {  // whole super-blocks: n is 4 or 0
        if (n > 0) {
          UnpackQuadK<kType>(blocks + (qd / 2) * kB, qd % 2, &lo, &hi);
        } else {
          lo = hi = _mm512_setzero_si512();
        }
      } else {
        UnpackQuad<kType>(blocks + 4 * qd * kB, n, &lo, &hi);
      }
      isum[qd] =
          _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(init[qd], lo, x[2 * qd]), hi, x[2 * qd + 1]);
    }
    __m512 dw, m;
    if constexpr (IsK(kType)) {
      GroupScalesK<kType>(blocks, present, &dw, &m);
    } else {
      GroupScales<kType>(blocks, present, &dw, &m);
    }
    acc[r] = Accumulate<kType>(acc[r], FoldQuads(isum), dx, dw, m, ds);
  }
}

template <DType kType, int R>
AVIARY_VNNI void GemvRows(const uint8_t* w, size_t row_bytes, const Activations& a, float* y) {
  const int64_t groups = a.padded_blocks / 16;
  const int64_t full = a.blocks / 16;  // groups with all 16 blocks present
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  // The R rows are read side by side (R short streams; prefetch the next R rows at our pace),
  // unlike the bfloat16 kernel (and the float one for float weights on AVX-512), which reads
  // rows one after the other: here each group's x layout (8 shuffled vectors and 4 offsets)
  // serves R rows, and reading the rows one after the other would have to rebuild it per row.
  const uint8_t* next = w + R * row_bytes;
  constexpr size_t kGB = GroupBytes(kType);
  for (int64_t g = 0; g < groups; ++g) {
    for (size_t line = 0; line < R * kGB; line += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(next + g * R * kGB + line), _MM_HINT_T0);
    }
    if (g < full) {
      GemvGroup<kType, R, true>(w, row_bytes, a, g, acc);
    } else {
      GemvGroup<kType, R, false>(w, row_bytes, a, g, acc);
    }
  }
  float out[16];
  FinalSums(acc, R, out);
  for (int r = 0; r < R; ++r) y[r] = out[r];
}

// ---- T > 1: up to 4 rows unpacked once into `buf`, R rows x TT tokens of sums ----

// Rows unpacked per pass. 4 rows x 3 tokens: the 12 integer sums, the 12 float accumulators,
// 3 activation vectors and 1 weight vector fill 28 of the 32 registers, so nothing goes
// through memory between groups. A taller tile (8 x 3) would serve each activation load to
// more vpdpbusd but no longer fit: its float accumulators would go through L1 every group.
constexpr int kPassRows = 4;

struct RowBuffer {
  AlignedVector<uint8_t> natural;  // one row, element order
  AlignedVector<uint8_t> u;    // [kPassRows][padded_blocks * 32], regrouped like Activations::qt
  AlignedVector<float> d, m;   // [kPassRows][padded_blocks]
  AlignedVector<float> carry;  // [T][kPassRows][16]: accumulators between column spans
};

template <DType kType>
AVIARY_VNNI void UnpackRow(const uint8_t* row, const Activations& a, RowBuffer* buf, int i) {
  constexpr size_t kB = BlockBytes(kType);
  const int64_t nbp = a.padded_blocks, pairs = (a.blocks + 1) / 2;
  for (int64_t p = 0; p < nbp / 2; ++p) {
    __m512i u = _mm512_setzero_si512();
    if (p < pairs) {
      if constexpr (IsK(kType)) {  // 4 pairs per super-block (blocks is a multiple of 8)
        u = UnpackPairK<kType>(row + (p / 4) * kB, static_cast<int>(p % 4));
      } else {
        u = UnpackPair<kType>(row + 2 * p * kB, 2 * p + 1 >= a.blocks);
      }
    }
    _mm512_storeu_si512(buf->natural.data() + p * 64, u);
  }
  for (int64_t g = 0; g < nbp / 16; ++g) {
    __m512 d, m;
    const int64_t present = std::min<int64_t>(16, a.blocks - 16 * g);
    if constexpr (IsK(kType)) {
      GroupScalesK<kType>(row + g * GroupBytes(kType), present, &d, &m);
    } else {
      GroupScales<kType>(row + 16 * g * kB, present, &d, &m);
    }
    _mm512_storeu_ps(buf->d.data() + i * nbp + 16 * g, d);
    _mm512_storeu_ps(buf->m.data() + i * nbp + 16 * g, m);
  }
  Regroup(buf->natural.data(), buf->u.data() + i * nbp * 32, nbp / 16);
}

// Groups per column span of the T > 1 tiles on long rows. A tile walks its 4 rows and 3
// tokens over all groups before the next tile starts; at 16 groups (8192 columns) the 32 KB
// of rows and 24 KB of tokens overflow a 48 KB L1. Rows longer than kSpanGroups are walked a
// span at a time instead (8 groups, 4096 columns: 16 KB of rows and 12 KB of tokens, which
// stay in L1 while every token passes), the accumulators parked in `carry` between spans.
// Shorter spans would park and reload the accumulators more often for no gain in locality.
constexpr int64_t kSpanGroups = 8;

// The kPassRows rows of `buf` times tokens t0 .. t0 + TT over groups [g0, g1). The float
// accumulators start at zero (`first`) or in `carry` and end in `carry`, or (`last`) as
// y[t, row0 + r] for the `valid` rows. Each accumulator sees the same steps in the same
// order however the row is cut into spans.
template <DType kType, int TT>
AVIARY_VNNI void GemmTile(const RowBuffer& buf, const Activations& a, int t0, int64_t g0,
                          int64_t g1, bool first, bool last, __m512* carry, int valid, int64_t rows,
                          int64_t row0, float* y) {
  constexpr int R = kPassRows;
  const int64_t nbp = a.padded_blocks;
  const uint8_t* u0 = buf.u.data();
  const float* d0 = buf.d.data();
  const float* m0 = buf.m.data();
  __m512 acc[R][TT];
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < TT; ++t) acc[r][t] = first ? _mm512_setzero_ps() : carry[t * R + r];
  }
  for (int64_t g = g0; g < g1; ++g) {
    __m512i isum[R][TT];
    for (int t = 0; t < TT; ++t) {
      const __m512i init = OffsetInit<kType, 1>(a.sums_at(t0 + t) + 16 * g);
      for (int r = 0; r < R; ++r) isum[r][t] = init;
    }
#pragma GCC unroll 8  // GCC otherwise keeps a k loop and copies the 24 sums through memory
    for (int k = 0; k < 8; ++k) {
      __m512i xv[TT];
      for (int t = 0; t < TT; ++t) xv[t] = _mm512_loadu_si512(a.qt_at(t0 + t) + g * 512 + k * 64);
      for (int r = 0; r < R; ++r) {
        const __m512i u = _mm512_loadu_si512(u0 + r * nbp * 32 + g * 512 + k * 64);
        for (int t = 0; t < TT; ++t) isum[r][t] = _mm512_dpbusd_epi32(isum[r][t], u, xv[t]);
      }
    }
    for (int t = 0; t < TT; ++t) {
      const __m512 dx = _mm512_loadu_ps(a.d_at(t0 + t) + 16 * g);
      const __m512 ds =
          HasMin(kType) ? _mm512_loadu_ps(a.ds_at(t0 + t) + 16 * g) : _mm512_setzero_ps();
      for (int r = 0; r < R; ++r) {
        const __m512 m =
            HasMin(kType) ? _mm512_loadu_ps(m0 + r * nbp + 16 * g) : _mm512_setzero_ps();
        acc[r][t] = Accumulate<kType>(acc[r][t], isum[r][t], dx,
                                      _mm512_loadu_ps(d0 + r * nbp + 16 * g), m, ds);
      }
    }
  }
  if (!last) {
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < TT; ++t) carry[t * R + r] = acc[r][t];
    }
    return;
  }
  // Final sums, 16 outputs per fold (token-major: t * R + r).
  __m512 all[R * TT];
  for (int t = 0; t < TT; ++t) {
    for (int r = 0; r < R; ++r) all[t * R + r] = acc[r][t];
  }
  for (int i = 0; i < R * TT; i += 16) {
    float out[16];
    FinalSums(all + i, std::min(16, R * TT - i), out);
    if (valid == R) {  // full passes (all but a range's last): stores without the row check
      for (int j = i; j < std::min(i + 16, R * TT); ++j)
        y[(t0 + j / R) * rows + row0 + j % R] = out[j - i];
    } else {
      for (int j = i; j < std::min(i + 16, R * TT); ++j) {
        if (j % R < valid) y[(t0 + j / R) * rows + row0 + j % R] = out[j - i];
      }
    }
  }
}

// y[t, row0 .. row0 + valid) for all tokens from the rows in `buf`, span by span.
template <DType kType>
AVIARY_VNNI void GemmRows(const RowBuffer& buf, const Activations& a, __m512* carry, int valid,
                          int64_t rows, int64_t row0, float* y) {
  constexpr int kTT = 3;
  const int64_t groups = a.padded_blocks / 16;
  for (int64_t g0 = 0; g0 < groups; g0 += kSpanGroups) {
    const int64_t g1 = std::min(groups, g0 + kSpanGroups);
    const bool first = g0 == 0, last = g1 == groups;
    int t = 0;
    for (; t + kTT <= a.T; t += kTT) {
      GemmTile<kType, kTT>(buf, a, t, g0, g1, first, last, carry + t * kPassRows, valid, rows, row0,
                           y);
    }
    switch (a.T - t) {
      case 2:
        GemmTile<kType, 2>(buf, a, t, g0, g1, first, last, carry + t * kPassRows, valid, rows, row0,
                           y);
        break;
      case 1:
        GemmTile<kType, 1>(buf, a, t, g0, g1, first, last, carry + t * kPassRows, valid, rows, row0,
                           y);
        break;
      default: break;
    }
  }
}

template <DType kType>
AVIARY_VNNI_FN void MatMulRowsT(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t r0,
                                int64_t r1, const Activations& a, float* y) {
  if (a.T == 1) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) GemvRows<kType, 4>(w + r * row_bytes, row_bytes, a, y + r);
    for (; r < r1; ++r) GemvRows<kType, 1>(w + r * row_bytes, row_bytes, a, y + r);
    return;
  }
  // Per-thread buffer of kPassRows unpacked rows; grows to the widest matrix once. A last
  // pass of fewer rows still computes kPassRows (the others hold earlier rows or zeros) and
  // stores only its own: one tile shape instead of four, which also keeps the sanitized
  // build's compile of these instances small (each tile shape is a large unrolled body).
  thread_local RowBuffer buf;
  const size_t nbp = static_cast<size_t>(a.padded_blocks);
  if (buf.u.size() < kPassRows * nbp * 32) {
    buf.natural.resize(nbp * 32);
    buf.u.resize(kPassRows * nbp * 32);
    buf.d.resize(kPassRows * nbp);
    buf.m.resize(kPassRows * nbp);
  }
  if (buf.carry.size() < static_cast<size_t>(a.T) * kPassRows * 16) {
    buf.carry.resize(static_cast<size_t>(a.T) * kPassRows * 16);
  }
  __m512* carry = reinterpret_cast<__m512*>(buf.carry.data());
  for (int64_t r = r0; r < r1; r += kPassRows) {
    const int n = static_cast<int>(std::min<int64_t>(kPassRows, r1 - r));
    for (int i = 0; i < n; ++i) UnpackRow<kType>(w + (r + i) * row_bytes, a, &buf, i);
    GemmRows<kType>(buf, a, carry, n, rows, r, y);
  }
}

// AVIARY_INT8_MATMUL_INSTANCE(, kType) in int8_matmul_<type>.cpp compiles a type's kernel
// there; here it is declared extern for every other file, which then only calls it.
#define AVIARY_INT8_MATMUL_INSTANCE(EXTERN, kType)                                           \
  EXTERN template void MatMulRowsT<kType>(const uint8_t*, size_t, int64_t, int64_t, int64_t, \
                                          const Activations&, float*)
AVIARY_INT8_MATMUL_INSTANCE(extern, DType::kQ4_0);
AVIARY_INT8_MATMUL_INSTANCE(extern, DType::kQ4_1);
AVIARY_INT8_MATMUL_INSTANCE(extern, DType::kQ5_0);
AVIARY_INT8_MATMUL_INSTANCE(extern, DType::kQ5_1);
AVIARY_INT8_MATMUL_INSTANCE(extern, DType::kQ8_0);
AVIARY_INT8_MATMUL_INSTANCE(extern, DType::kQ4_K);
AVIARY_INT8_MATMUL_INSTANCE(extern, DType::kQ5_K);
#endif  // AVIARY_HAVE_VNNI_CODE

}  // namespace aviary::int8::vnni
