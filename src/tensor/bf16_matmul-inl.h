// The sequence tiles of the bfloat16 MatMul (bf16_matmul.cpp): R rounded rows x TT tokens of
// vdpbf16ps accumulators. They do not depend on the weight type; their many row x token shapes
// are most of the file's code, so GemmRows<R> is compiled in files of its own
// (bf16_matmul_tile*.cpp, with AVIARY_BF16_TILE_INSTANCE) and declared extern here for
// bf16_matmul.cpp: the shapes compile in parallel.
#pragma once

#include <algorithm>
#include <cstdint>

#include "tensor/bf16_matmul.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define AVIARY_HAVE_BF16_CODE 1
#include <immintrin.h>

#include "tensor/lane_sums.h"  // also silences GCC 12's false warnings in its AVX-512 headers
#else
#define AVIARY_HAVE_BF16_CODE 0
#endif

#if AVIARY_HAVE_BF16_CODE
#define AVIARY_BF16_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c"
#define AVIARY_BF16 __attribute__((target(AVIARY_BF16_TARGET), always_inline)) inline
#define AVIARY_BF16_FN __attribute__((target(AVIARY_BF16_TARGET)))

namespace aviary::bf16::tiles {

constexpr int kChunk = 32;  // columns per vdpbf16ps

using lane_sums::FinalSums;

// Columns [c0, c1) for tokens t0 .. t0 + TT. The accumulators start at zero on the first span
// and from `carry` ([R][TT][16]) on the others, and go back to `carry` or, after the last
// span, through the lane sums into y: a float stored and reloaded is the same float, so the
// spans change no result.
template <int R, int TT>
AVIARY_BF16 void GemmTile(const uint16_t* wbuf, int64_t ws, const Activations& a, int t0,
                          int64_t c0, int64_t c1, float* carry, float* y, int64_t rows) {
  __m512 acc[R][TT];
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < TT; ++t) {
      acc[r][t] = c0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(carry + (r * TT + t) * 16);
    }
  }
  const uint16_t* x = a.at(t0);
  const int64_t xs = a.padded_cols;
#pragma GCC unroll 2
  for (int64_t c = c0; c < c1; c += kChunk) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_load_si512(wbuf + r * ws + c);
    for (int t = 0; t < TT; ++t) {
      const __m512bh xv = (__m512bh)_mm512_load_si512(x + t * xs + c);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
    }
  }
  if (c1 < a.padded_cols) {
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < TT; ++t) _mm512_store_ps(carry + (r * TT + t) * 16, acc[r][t]);
    }
    return;
  }
  float sums[32];
  FinalSums(&acc[0][0], std::min(16, R * TT), sums);
  if (R * TT > 16) FinalSums(&acc[0][0] + 16, R * TT - 16, sums + 16);
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < TT; ++t) y[(t0 + t) * rows + r] = sums[r * TT + t];
  }
}

constexpr int kTileTokens = 4;
// Columns per span on long rows (see GemmRows); rows of at most this many columns are one span.
constexpr int64_t kSpanCols = 2048;

// All tokens over R rounded rows. Long rows are walked in spans of kSpanCols columns, every
// token per span, so that a chunk's activations for one span stay in L2 (64 tokens x 2048
// columns x 2 bytes = 256 KB; a whole 8192-column chunk is 1 MB).
template <int R>
AVIARY_BF16_FN void GemmRows(const uint16_t* wbuf, int64_t ws, const Activations& a, float* carry,
                             float* y, int64_t rows) {
  const int64_t n = a.padded_cols, span = n > kSpanCols ? kSpanCols : n;
  for (int64_t c0 = 0; c0 < n; c0 += span) {
    const int64_t c1 = std::min(n, c0 + span);
    int t = 0;
    for (; t + kTileTokens <= a.T; t += kTileTokens) {
      GemmTile<R, kTileTokens>(wbuf, ws, a, t, c0, c1, carry + t * R * 16, y, rows);
    }
    float* c = carry + t * R * 16;
    switch (a.T - t) {
      case 3: GemmTile<R, 3>(wbuf, ws, a, t, c0, c1, c, y, rows); break;
      case 2: GemmTile<R, 2>(wbuf, ws, a, t, c0, c1, c, y, rows); break;
      case 1: GemmTile<R, 1>(wbuf, ws, a, t, c0, c1, c, y, rows); break;
      default: break;
    }
  }
}

// AVIARY_BF16_TILE_INSTANCE(, R) in bf16_matmul_tile*.cpp compiles the R-row tiles there; here
// they are declared extern for bf16_matmul.cpp, which only calls them.
#define AVIARY_BF16_TILE_INSTANCE(EXTERN, R)                                                     \
  EXTERN template void GemmRows<R>(const uint16_t*, int64_t, const Activations&, float*, float*, \
                                   int64_t)
AVIARY_BF16_TILE_INSTANCE(extern, 1);
AVIARY_BF16_TILE_INSTANCE(extern, 2);
AVIARY_BF16_TILE_INSTANCE(extern, 3);
AVIARY_BF16_TILE_INSTANCE(extern, 4);
AVIARY_BF16_TILE_INSTANCE(extern, 5);
AVIARY_BF16_TILE_INSTANCE(extern, 6);

}  // namespace aviary::bf16::tiles
#endif  // AVIARY_HAVE_BF16_CODE
