// ggml's reference block encoders, operation for operation: the same float divisions,
// reciprocals, products and truncations give the same bytes. Contraction into fused
// multiply-adds is off (each product is rounded), as ggml's C source specifies; the
// kFusedMultiplyAdd variant reproduces builds whose compiler contracted x * id + c.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "tensor/quantize.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

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

template <typename Block, void (*Encode)(const float*, Block*)>
void EncodeBlocks(const float* src, uint8_t* dst, int64_t n) {
  for (int64_t i = 0; i < n / kQBlock; ++i) {
    Block b;
    Encode(src + i * kQBlock, &b);
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
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      return;
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
  }
}

}  // namespace aviary
