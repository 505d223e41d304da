// The lane sums of up to 16 AVX-512 float accumulators at once: the last step of every
// matrix-kernel dot product (int8_matmul.cpp, and kernels.cpp on AVX-512 targets).
//
// A transpose-and-add tree does 16 sums in 45 shuffles and adds, against about 8 operations
// per sum one at a time; for short rows (RWKV's low-rank matrices have 32-256 columns) the
// sums are most of the work. Each output is the same tree of adds whatever the other 15
// vectors hold, so an output does not depend on its neighbours in a tile, or on being
// computed alone and padded with zeros: the one-token and sequence paths agree bit for bit.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define AVIARY_HAVE_LANE_SUMS16 1
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 warns falsely about _mm512_undefined_* inside its own AVX-512 headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Minimal features, so that callers compiled for any AVX-512 superset can inline these.
#define AVIARY_LANE_SUMS __attribute__((target("avx512f,avx512dq"), always_inline)) inline

namespace aviary::lane_sums {

AVIARY_LANE_SUMS __m512 Fold2(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}
AVIARY_LANE_SUMS __m512 Fold4(__m512 a, __m512 b) {
  const __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}
AVIARY_LANE_SUMS __m512 FoldLanes(__m512 a, __m512 b) {  // 128-bit lanes (0+1, 2+3) of a, then b
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xdd));
}

// The lane sums of v[0..16), in order, as one vector.
AVIARY_LANE_SUMS __m512 HorizontalSums16(const __m512* v) {
  __m512 c[4];  // c[i], 128-bit lane L: the sums over lane L of v[4i .. 4i+3]
  for (int i = 0; i < 4; ++i) {
    c[i] = Fold4(Fold2(v[4 * i], v[4 * i + 1]), Fold2(v[4 * i + 2], v[4 * i + 3]));
  }
  return FoldLanes(FoldLanes(c[0], c[1]), FoldLanes(c[2], c[3]));
}

// out[i] = sum of the lanes of acc[i] for i < n <= 16 (out has room for 16).
AVIARY_LANE_SUMS void FinalSums(const __m512* acc, int n, float* out) {
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = i < n ? acc[i] : _mm512_setzero_ps();
  _mm512_storeu_ps(out, HorizontalSums16(v));
}

}  // namespace aviary::lane_sums
#endif
