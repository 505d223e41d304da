// Q4_0 .. Q8_0: ggml's reference block encoders, operation for operation: the same float
// divisions, reciprocals, products and truncations give the same bytes. Contraction into fused
// multiply-adds is off (each product is rounded), as ggml's C source specifies; the
// kFusedMultiplyAdd variant reproduces builds whose compiler contracted x * id + c.
// Q4_K, Q5_K, Q6_K: our own encoders (see below); only the block layout is ggml's.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "tensor/quantize.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

namespace aviary {
namespace {

// (int8_t)x as ggml writes it, for the finite in-range values it meets; NaN and out-of-range
// values (a corrupt tensor) are clamped instead of being undefined behaviour.
inline int8_t Trunc8(float x) {
  if (!(x > -128.0f)) return x < 0 ? -128 : 0;
  if (!(x < 128.0f)) return 127;
  return static_cast<int8_t>(x);
}

// a * b + c: rounded twice as ggml's C source says, or once (a fused multiply-add) as ggml
// builds that let the compiler contract it do.
template <bool kFused>
inline float MulAdd(float a, float b, float c) {
  if constexpr (kFused) {
    return std::fma(a, b, c);
  } else {
    const float p = a * b;
    return p + c;
  }
}

// Q4_0: d = max / -8 where max is the value of largest magnitude; q = min(15, (int8)(x/d + 8.5)).
template <bool kFused>
void Q4_0(const float* x, BlockQ4_0* y) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < kQBlock; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  y->d = F32ToF16(d);
  for (int j = 0; j < kQBlock / 2; ++j) {
    const float s0 = MulAdd<kFused>(x[j], id, 8.5f);
    const float s1 = MulAdd<kFused>(x[kQBlock / 2 + j], id, 8.5f);
    const uint8_t q0 = std::min<uint8_t>(15, static_cast<uint8_t>(Trunc8(s0)));
    const uint8_t q1 = std::min<uint8_t>(15, static_cast<uint8_t>(Trunc8(s1)));
    y->qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

// Q4_1: d = (max - min) / 15, m = min; q = min(15, (int8)((x - min)/d + 0.5)).
template <bool kFused>
void Q4_1(const float* x, BlockQ4_1* y) {
  float min = FLT_MAX, max = -FLT_MAX;
  for (int j = 0; j < kQBlock; ++j) {
    if (x[j] < min) min = x[j];
    if (x[j] > max) max = x[j];
  }
  const float d = (max - min) / ((1 << 4) - 1);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  y->d = F32ToF16(d);
  y->m = F32ToF16(min);
  for (int j = 0; j < kQBlock / 2; ++j) {
    const float s0 = MulAdd<kFused>(x[j] - min, id, 0.5f);
    const float s1 = MulAdd<kFused>(x[kQBlock / 2 + j] - min, id, 0.5f);
    const uint8_t q0 = std::min<uint8_t>(15, static_cast<uint8_t>(Trunc8(s0)));
    const uint8_t q1 = std::min<uint8_t>(15, static_cast<uint8_t>(Trunc8(s1)));
    y->qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

// Q5_0: d = max / -16; q = min(31, (int8)(x/d + 16.5)); bit 4 of element j goes to qh bit j.
template <bool kFused>
void Q5_0(const float* x, BlockQ5_0* y) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < kQBlock; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -16;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  y->d = F32ToF16(d);
  uint32_t qh = 0;
  for (int j = 0; j < kQBlock / 2; ++j) {
    const float s0 = MulAdd<kFused>(x[j], id, 16.5f);
    const float s1 = MulAdd<kFused>(x[kQBlock / 2 + j], id, 16.5f);
    const uint8_t q0 = std::min<uint8_t>(31, static_cast<uint8_t>(Trunc8(s0)));
    const uint8_t q1 = std::min<uint8_t>(31, static_cast<uint8_t>(Trunc8(s1)));
    y->qs[j] = static_cast<uint8_t>((q0 & 0x0f) | ((q1 & 0x0f) << 4));
    qh |= ((q0 & 0x10u) >> 4) << j;
    qh |= ((q1 & 0x10u) >> 4) << (j + kQBlock / 2);
  }
  std::memcpy(y->qh, &qh, sizeof qh);
}

// Q5_1: d = (max - min) / 31, m = min; q = (uint8)((x - min)/d + 0.5).
template <bool kFused>
void Q5_1(const float* x, BlockQ5_1* y) {
  float min = FLT_MAX, max = -FLT_MAX;
  for (int j = 0; j < kQBlock; ++j) {
    if (x[j] < min) min = x[j];
    if (x[j] > max) max = x[j];
  }
  const float d = (max - min) / ((1 << 5) - 1);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  y->d = F32ToF16(d);
  y->m = F32ToF16(min);
  uint32_t qh = 0;
  for (int j = 0; j < kQBlock / 2; ++j) {
    const float s0 = MulAdd<kFused>(x[j] - min, id, 0.5f);
    const float s1 = MulAdd<kFused>(x[kQBlock / 2 + j] - min, id, 0.5f);
    // ggml converts float -> uint8_t directly; for the values it meets (0 .. 31.5) that is
    // the same truncation.
    const uint8_t q0 = static_cast<uint8_t>(Trunc8(s0));
    const uint8_t q1 = static_cast<uint8_t>(Trunc8(s1));
    y->qs[j] = static_cast<uint8_t>((q0 & 0x0f) | ((q1 & 0x0f) << 4));
    qh |= ((q0 & 0x10u) >> 4) << j;
    qh |= ((q1 & 0x10u) >> 4) << (j + kQBlock / 2);
  }
  std::memcpy(y->qh, &qh, sizeof qh);
}

// Q8_0: d = amax / 127; q = roundf(x / d) (halves away from zero).
void Q8_0(const float* x, BlockQ8_0* y) {
  float amax = 0.0f;
  for (int j = 0; j < kQBlock; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / ((1 << 7) - 1);
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  y->d = F32ToF16(d);
  for (int j = 0; j < kQBlock; ++j) {
    const float x0 = x[j] * id;
    y->qs[j] = Trunc8(std::round(x0));
  }
}

// ---- K-quants: Q4_K, Q5_K, Q6_K ----
// Our own encoders, after the method of ggml's reference ones (make_qkx2_quants,
// make_qx_quants) and a little better (less RMS error, for a longer search):
// per sub-block, ggml's search over candidate level spacings, each refitted by weighted least
// squares, and the best refined by re-quantizing and refitting; then the super-block's f16
// scale(s), and each sub-block's small integer scale (and minimum) as the rounded fit or a
// neighbour, whichever leaves the least error once the levels are re-chosen for the scales as
// stored. The bytes differ from ggml's; the layout is ggml's, so any reader decodes them.

constexpr float kF16Max = 65504.0f;
constexpr int kKRefinements = 3;  // re-quantize-and-refit rounds after the candidate search

// Nearest integer to v (ties to even), clamped to [lo, hi]; NaN gives lo. Never undefined.
inline int NearestClamped(float v, int lo, int hi) {
  // Branch-free (these run in the innermost loops): max(lo, NaN) is lo by how std::max compares.
  const float clamped = std::min(std::max(static_cast<float>(lo), v), static_cast<float>(hi));
  // |clamped| < 2^22: adding 1.5 * 2^23 leaves the rounded integer in the low mantissa bits.
  const float biased = clamped + 12582912.0f;
  int32_t bits;
  std::memcpy(&bits, &biased, 4);
  return (bits & 0x007fffff) - 0x00400000;
}

// The k that brings the largest finite magnitude of x into [0.5, 1) as x * 2^k: the searches
// then run in float with neither overflow (1e30 squared) nor underflow, and as scaling by a
// power of two is exact it changes none of their choices. 0 for all-zero data.
int NormalizingExponent(const float* x, int n) {
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    if (a > amax && a <= FLT_MAX) amax = a;  // NaN and inf (garbage in any case) are skipped
  }
  if (amax == 0.0f) return 0;
  int e;
  std::frexp(amax, &e);
  return -e;
}

// A super-block scale as stored: f16 in the caller's units, clamped to the largest half rather
// than rounding to inf, and that stored value back in normalized (x * 2^k) units.
struct HalfScale {
  uint16_t bits;
  float normalized;
};
HalfScale ToHalf(float normalized, int k) {
  float real = std::ldexp(normalized, -k);
  if (std::fabs(real) > kF16Max) real = std::copysign(kF16Max, real);
  const uint16_t bits = F32ToF16(real);
  return {bits, std::ldexp(F16ToF32(bits), k)};
}

// ggml's weights for Q4_K and Q5_K (we use them for Q6_K too): the sub-block's RMS plus |x|,
// so that large values count more but small ones still count. (ggml weighs Q6_K by x^2,
// which favours the largest values at the expense of the RMS error.)
void SubBlockWeights(const float* x, int n, float* w) {
  float sxx = 0.0f;
  for (int i = 0; i < n; ++i) sxx += x[i] * x[i];
  const float rms = std::sqrt(sxx / static_cast<float>(n));
  for (int i = 0; i < n; ++i) w[i] = rms + std::fabs(x[i]);
}

// Q4_K / Q5_K sub-block: x ~ scale * q + min, integer q in [0, nmax], scale >= 0 and min <= 0
// (the format stores -min as an unsigned multiple of dmin); `error` is weighted squared error.
struct AffineFit {
  float scale = 0.0f, min = 0.0f;
  double error = std::numeric_limits<double>::infinity();
};

// Weighted squared error of x against scale * q + min, each q the nearest level.
double AffineError(const float* x, const float* w, int n, int nmax, float scale, float min) {
  const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
  double error = 0.0;
  for (int i = 0; i < n; ++i) {
    const int q = NearestClamped((x[i] - min) * inv, 0, nmax);
    const double diff = static_cast<double>(scale * static_cast<float>(q) + min) - x[i];
    error += w[i] * diff * diff;
  }
  return error;
}

// Sums of w, w x and w x^2 over a sub-block: the same for every candidate fit.
struct WeightedSums {
  double w = 0.0, wx = 0.0, wxx = 0.0;
};
WeightedSums SumWeighted(const float* x, const float* w, int n) {
  WeightedSums s;
  for (int i = 0; i < n; ++i) {
    const double wx = static_cast<double>(w[i]) * x[i];
    s.w += w[i];
    s.wx += wx;
    s.wxx += wx * x[i];
  }
  return s;
}

// The levels q = nearest((x - base) * inv), then the weighted least-squares scale and min for
// them, and the error left (computed from the sums).
AffineFit FitAffineLevels(const float* x, const float* w, int n, int nmax, float base, float inv,
                          const WeightedSums& sums) {
  const double sw = sums.w, swx = sums.wx;
  double swq = 0.0, swqq = 0.0, swqx = 0.0;
  for (int i = 0; i < n; ++i) {
    const double q = NearestClamped((x[i] - base) * inv, 0, nmax);
    const double wq = w[i] * q;
    swq += wq;
    swqq += wq * q;
    swqx += wq * x[i];
  }
  const double det = sw * swqq - swq * swq;
  if (!(det > 0.0)) return {};  // one level for all: nothing to fit
  double scale = (sw * swqx - swq * swx) / det;
  double min = (swqq * swx - swq * swqx) / det;
  if (min > 0.0) {  // a positive min cannot be stored: the best fit through the origin instead
    min = 0.0;
    scale = swqx / swqq;
  }
  if (!(scale > 0.0)) return {};
  const double error = sums.wxx - 2.0 * (scale * swqx + min * swx) + scale * scale * swqq +
                       2.0 * scale * min * swq + min * min * sw;
  return {static_cast<float>(scale), static_cast<float>(min), error};
}

// ggml's make_qkx2_quants search: level spacings (nmax + first + step * i) / range for i in
// [0, steps] from the sub-block's minimum (or 0), each refitted; plus refinement rounds.
AffineFit FitAffineSubBlock(const float* x, const float* w, int n, int nmax, float first,
                            float step, int steps) {
  float lo = 0.0f, hi = -FLT_MAX;  // lo <= 0: the min is never positive
  for (int i = 0; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  if (!(hi > lo)) return {0.0f, lo, 0.0};  // constant <= 0: the min alone is exact
  const WeightedSums sums = SumWeighted(x, w, n);
  const float range = hi - lo;
  AffineFit best{range / static_cast<float>(nmax), lo};  // levels spanning [lo, hi] exactly
  best.error = AffineError(x, w, n, nmax, best.scale, best.min);
  for (int i = 0; i <= steps; ++i) {
    const float inv = (static_cast<float>(nmax) + first + step * static_cast<float>(i)) / range;
    const AffineFit fit = FitAffineLevels(x, w, n, nmax, lo, inv, sums);
    if (fit.error < best.error) best = fit;
  }
  for (int round = 0; round < kKRefinements && best.scale > 0.0f; ++round) {
    const AffineFit fit = FitAffineLevels(x, w, n, nmax, best.min, 1.0f / best.scale, sums);
    if (!(fit.error < best.error)) break;
    best = fit;
  }
  return best;
}

// A Q4_K / Q5_K super-block before packing: levels 0..kMaxLevel of the 256 elements.
struct AffineKCode {
  uint16_t d, dmin;
  uint8_t scales[kKScaleBytes];
  uint8_t levels[kQKBlock];
};

// The 6-bit sub-block scales and mins for a given d and dmin (normalized units): for each
// sub-block the rounded fit or a neighbour, whichever leaves the least error once the levels
// are re-chosen (rounding scale and min each alone is not always best for the pair). Returns
// the total weighted error.
template <int kMaxLevel>
double ChooseSubScales(const float* x, const float* w, const AffineFit* fits, float d, float dmin,
                       int reach, uint8_t* sc, uint8_t* m) {
  constexpr int kSub = 32, kMaxScale = 63;
  double total = 0.0;
  for (int j = 0; j < kQKBlock / kSub; ++j) {
    const float* xj = x + kSub * j;
    const float* wj = w + kSub * j;
    const int sc0 = d > 0.0f ? NearestClamped(fits[j].scale / d, 0, kMaxScale) : 0;
    const int m0 = dmin > 0.0f ? NearestClamped(-fits[j].min / dmin, 0, kMaxScale) : 0;
    double best_error = std::numeric_limits<double>::infinity();
    sc[j] = static_cast<uint8_t>(sc0);
    m[j] = static_cast<uint8_t>(m0);
    for (int s = std::max(sc0 - reach, 0); s <= std::min(sc0 + reach, kMaxScale); ++s) {
      for (int mm = std::max(m0 - reach, 0); mm <= std::min(m0 + reach, kMaxScale); ++mm) {
        const double error = AffineError(xj, wj, kSub, kMaxLevel, d * s, -(dmin * mm));
        if (error < best_error) {
          best_error = error;
          sc[j] = static_cast<uint8_t>(s);
          m[j] = static_cast<uint8_t>(mm);
        }
      }
    }
    total += best_error;
  }
  return total;
}

template <int kMaxLevel>
AffineKCode EncodeAffineK(const float* src) {
  constexpr int kSub = 32, kSubs = kQKBlock / kSub, kMaxScale = 63;
  const int k = NormalizingExponent(src, kQKBlock);
  float x[kQKBlock], w[kQKBlock];
  for (int i = 0; i < kQKBlock; ++i) x[i] = std::ldexp(src[i], k);
  AffineFit fits[kSubs];
  float max_scale = 0.0f, max_offset = 0.0f;
  for (int j = 0; j < kSubs; ++j) {
    const float* xj = x + kSub * j;
    float* wj = w + kSub * j;
    SubBlockWeights(xj, kSub, wj);
    // ggml's candidate spacings: 20 around nmax - 1 .. nmax + 1 for 4 bits, 15 for 5 bits.
    fits[j] = kMaxLevel == 15 ? FitAffineSubBlock(xj, wj, kSub, kMaxLevel, -1.0f, 0.1f, 20)
                              : FitAffineSubBlock(xj, wj, kSub, kMaxLevel, -0.5f, 0.1f, 15);
    max_scale = std::max(max_scale, fits[j].scale);
    max_offset = std::max(max_offset, -fits[j].min);
  }

  // d = max_scale / 63 puts the largest sub-block scale on the top code, but that sub-block may
  // do better a step lower (then re-encoding a decoded block would not find the same d): try
  // the top code one less too, for d and for dmin.
  AffineKCode code{};
  uint8_t sc[kSubs], m[kSubs];
  HalfScale d{}, dmin{};
  double best_error = std::numeric_limits<double>::infinity();
  for (int d_top : {kMaxScale, kMaxScale - 1}) {
    for (int dmin_top : {kMaxScale, kMaxScale - 1}) {
      const HalfScale try_d = ToHalf(max_scale / static_cast<float>(d_top), k);
      const HalfScale try_dmin = ToHalf(max_offset / static_cast<float>(dmin_top), k);
      const double error =
          ChooseSubScales<kMaxLevel>(x, w, fits, try_d.normalized, try_dmin.normalized, 0, sc, m);
      if (error < best_error) {
        best_error = error;
        d = try_d;
        dmin = try_dmin;
      }
    }
  }
  ChooseSubScales<kMaxLevel>(x, w, fits, d.normalized, dmin.normalized, 1, sc, m);
  code.d = d.bits;
  code.dmin = dmin.bits;
  // The levels for the scales and mins as stored.
  for (int j = 0; j < kSubs; ++j) {
    const float scale = d.normalized * sc[j], min = -(dmin.normalized * m[j]);
    const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
    for (int i = 0; i < kSub; ++i) {
      code.levels[kSub * j + i] =
          static_cast<uint8_t>(NearestClamped((x[kSub * j + i] - min) * inv, 0, kMaxLevel));
    }
  }
  // The inverse of ScaleMinK4: 6 bits each for sub-blocks 0..3, 4 + 2 split bits for 4..7.
  for (int j = 0; j < 4; ++j) {
    code.scales[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
    code.scales[j + 4] = static_cast<uint8_t>(m[j] | ((m[j + 4] >> 4) << 6));
    code.scales[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4));
  }
  return code;
}

// The 4 low bits: byte i of qs[32 c ..] holds sub-block 2c (low nibble) and 2c + 1 (high).
void PackLowNibblesK(const uint8_t* levels, uint8_t* qs) {
  for (int c = 0; c < 4; ++c) {
    for (int i = 0; i < 32; ++i) {
      qs[32 * c + i] = static_cast<uint8_t>((levels[64 * c + i] & 0x0f) |
                                            ((levels[64 * c + 32 + i] & 0x0f) << 4));
    }
  }
}

// Q4_K and Q5_K share everything but Q5_K's fifth bits.
template <typename Block, int kMaxLevel>
void AffineK(const float* x, Block* y) {
  const AffineKCode code = EncodeAffineK<kMaxLevel>(x);
  y->d = code.d;
  y->dmin = code.dmin;
  std::memcpy(y->scales, code.scales, kKScaleBytes);
  PackLowNibblesK(code.levels, y->qs);
  if constexpr (kMaxLevel == 31) {
    // The fifth bit of element i of sub-block j is bit j of qh[i].
    for (int i = 0; i < 32; ++i) {
      uint8_t bits = 0;
      for (int j = 0; j < 8; ++j) {
        bits |= static_cast<uint8_t>(((code.levels[32 * j + i] >> 4) & 1) << j);
      }
      y->qh[i] = bits;
    }
  }
}
void Q4_K(const float* x, BlockQ4_K* y) { AffineK<BlockQ4_K, 15>(x, y); }
void Q5_K(const float* x, BlockQ5_K* y) { AffineK<BlockQ5_K, 31>(x, y); }

// Q6_K sub-block of 16: x ~ scale * q, integer q in [-32, 31] (scale of either sign).
struct ScaleFit {
  float scale = 0.0f;
  double error = std::numeric_limits<double>::infinity();
};

constexpr int kQ6Lo = -32, kQ6Hi = 31;

double ScaleError(const float* x, const float* w, int n, float scale) {
  const float inv = scale != 0.0f ? 1.0f / scale : 0.0f;
  double error = 0.0;
  for (int i = 0; i < n; ++i) {
    const int q = NearestClamped(x[i] * inv, kQ6Lo, kQ6Hi);
    const double diff = static_cast<double>(scale * static_cast<float>(q)) - x[i];
    error += w[i] * diff * diff;
  }
  return error;
}

// The levels q = nearest(x * inv), the weighted least-squares scale for them and the error left.
ScaleFit FitScaleLevels(const float* x, const float* w, int n, float inv, double swxx) {
  double swqx = 0.0, swqq = 0.0;
  for (int i = 0; i < n; ++i) {
    const double q = NearestClamped(x[i] * inv, kQ6Lo, kQ6Hi);
    swqx += w[i] * q * x[i];
    swqq += w[i] * q * q;
  }
  if (!(swqq > 0.0)) return {};
  return {static_cast<float>(swqx / swqq), swxx - swqx * swqx / swqq};
}

// ggml's make_qx_quants search: the value of largest magnitude near level -32 (the end with
// one more level), spacings (32 + 0.1 i) / max for i in [-9, 9], each refitted; plus
// refinement rounds.
ScaleFit FitScaleSubBlock(const float* x, const float* w, int n) {
  float amax = 0.0f, extreme = 0.0f;
  double swxx = 0.0;
  for (int i = 0; i < n; ++i) {
    if (std::fabs(x[i]) > amax) {
      amax = std::fabs(x[i]);
      extreme = x[i];
    }
    swxx += static_cast<double>(w[i]) * x[i] * x[i];
  }
  if (!(amax > 0.0f)) return {0.0f, 0.0};
  ScaleFit best;
  for (int i = -9; i <= 9; ++i) {
    const float inv = -(32.0f + 0.1f * static_cast<float>(i)) / extreme;
    const ScaleFit fit = FitScaleLevels(x, w, n, inv, swxx);
    if (fit.error < best.error) best = fit;
  }
  for (int round = 0; round < kKRefinements && best.scale != 0.0f; ++round) {
    const ScaleFit fit = FitScaleLevels(x, w, n, 1.0f / best.scale, swxx);
    if (!(fit.error < best.error)) break;
    best = fit;
  }
  if (!(best.error < std::numeric_limits<double>::infinity())) best = {0.0f, 0.0};
  return best;
}

void Q6_K(const float* src, BlockQ6_K* y) {
  constexpr int kSub = 16, kSubs = kQKBlock / kSub;
  const int k = NormalizingExponent(src, kQKBlock);
  float x[kQKBlock], w[kQKBlock];
  for (int i = 0; i < kQKBlock; ++i) x[i] = std::ldexp(src[i], k);
  ScaleFit fits[kSubs];
  float extreme_scale = 0.0f;
  for (int j = 0; j < kSubs; ++j) {
    SubBlockWeights(x + kSub * j, kSub, w + kSub * j);
    fits[j] = FitScaleSubBlock(x + kSub * j, w + kSub * j, kSub);
    if (std::fabs(fits[j].scale) > std::fabs(extreme_scale)) extreme_scale = fits[j].scale;
  }
  // The scale of largest magnitude maps to -128, the end of int8 with one more value.
  const HalfScale d = ToHalf(extreme_scale / -128.0f, k);
  y->d = d.bits;
  uint8_t levels[kQKBlock];
  for (int j = 0; j < kSubs; ++j) {
    const float* xj = x + kSub * j;
    const float* wj = w + kSub * j;
    const int sc0 =
        d.normalized != 0.0f ? NearestClamped(fits[j].scale / d.normalized, -128, 127) : 0;
    int best_sc = sc0;
    double best_error = std::numeric_limits<double>::infinity();
    for (int s = std::max(sc0 - 1, -128); s <= std::min(sc0 + 1, 127); ++s) {
      const double error = ScaleError(xj, wj, kSub, d.normalized * s);
      if (error < best_error) {
        best_error = error;
        best_sc = s;
      }
    }
    y->scales[j] = static_cast<int8_t>(best_sc);
    const float scale = d.normalized * best_sc;
    const float inv = scale != 0.0f ? 1.0f / scale : 0.0f;
    for (int i = 0; i < kSub; ++i) {
      levels[kSub * j + i] =
          static_cast<uint8_t>(NearestClamped(xj[i] * inv, kQ6Lo, kQ6Hi) - kQ6Lo);
    }
  }
  // Per half of 128: element l + 32 t takes a nibble of ql[64 h + l + 32 (t & 1)] (t < 2: low)
  // and bits 2t, 2t + 1 of qh[32 h + l].
  std::memset(y->ql, 0, sizeof y->ql);
  std::memset(y->qh, 0, sizeof y->qh);
  for (int e = 0; e < kQKBlock; ++e) {
    const int h = e / 128, t = (e % 128) / 32, l = e % 32;
    const int nibble_shift = t < 2 ? 0 : 4;
    y->ql[64 * h + l + 32 * (t & 1)] |= static_cast<uint8_t>((levels[e] & 0x0f) << nibble_shift);
    y->qh[32 * h + l] |= static_cast<uint8_t>((levels[e] >> 4) << (2 * t));
  }
}

template <typename Block, void (*Encode)(const float*, Block*), int kElems = kQBlock>
void EncodeBlocks(const float* src, uint8_t* dst, int64_t n) {
  for (int64_t i = 0; i < n / kElems; ++i) {
    Block b;
    Encode(src + i * kElems, &b);
    std::memcpy(dst + i * sizeof(Block), &b, sizeof(Block));  // dst carries no alignment
  }
}

}  // namespace

uint16_t F32ToBF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((u >> 16) | 64);  // quiet NaN
  return static_cast<uint16_t>((u + (0x7fff + ((u >> 16) & 1))) >> 16);
}

void QuantizeRow(DType type, const float* src, uint8_t* dst, int64_t n, QuantRounding rounding) {
  const bool fused = rounding == QuantRounding::kFusedMultiplyAdd;
  switch (type) {
    case DType::kF32: std::memcpy(dst, src, n * sizeof(float)); return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = F32ToF16(src[i]);
        std::memcpy(dst + 2 * i, &h, 2);
      }
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = F32ToBF16(src[i]);
        std::memcpy(dst + 2 * i, &h, 2);
      }
      return;
    case DType::kQ4_0:
      return fused ? EncodeBlocks<BlockQ4_0, Q4_0<true>>(src, dst, n)
                   : EncodeBlocks<BlockQ4_0, Q4_0<false>>(src, dst, n);
    case DType::kQ4_1:
      return fused ? EncodeBlocks<BlockQ4_1, Q4_1<true>>(src, dst, n)
                   : EncodeBlocks<BlockQ4_1, Q4_1<false>>(src, dst, n);
    case DType::kQ5_0:
      return fused ? EncodeBlocks<BlockQ5_0, Q5_0<true>>(src, dst, n)
                   : EncodeBlocks<BlockQ5_0, Q5_0<false>>(src, dst, n);
    case DType::kQ5_1:
      return fused ? EncodeBlocks<BlockQ5_1, Q5_1<true>>(src, dst, n)
                   : EncodeBlocks<BlockQ5_1, Q5_1<false>>(src, dst, n);
    case DType::kQ8_0: return EncodeBlocks<BlockQ8_0, Q8_0>(src, dst, n);
    // The K-quants round their own way; `rounding` (a ggml bit-exactness knob) does not apply.
    case DType::kQ4_K: return EncodeBlocks<BlockQ4_K, Q4_K, kQKBlock>(src, dst, n);
    case DType::kQ5_K: return EncodeBlocks<BlockQ5_K, Q5_K, kQKBlock>(src, dst, n);
    case DType::kQ6_K: return EncodeBlocks<BlockQ6_K, Q6_K, kQKBlock>(src, dst, n);
  }
}

}  // namespace aviary
