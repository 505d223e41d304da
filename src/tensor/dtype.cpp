#include "tensor/dtype.h"

#include <cmath>
#include <cstring>

namespace aviary {

const DTypeTraits& Traits(DType type) {
  // GGUF file types 14 and 16 are llama.cpp's "_S" mixes: aviary writes one type for all the
  // matrices, which is what they name.
  static const DTypeTraits kTraits[] = {
      // name   block elems  block bytes          ggml gguf_ft rwkv.cpp
      {"F32", 1, 4, 0, 0, 0},
      {"F16", 1, 2, 1, 1, 1},
      {"BF16", 1, 2, 30, 32, -1},
      {"Q4_0", kQBlock, sizeof(BlockQ4_0), 2, 2, 2},
      {"Q4_1", kQBlock, sizeof(BlockQ4_1), 3, 3, 3},
      {"Q5_0", kQBlock, sizeof(BlockQ5_0), 6, 8, 7},
      {"Q5_1", kQBlock, sizeof(BlockQ5_1), 7, 9, 8},
      {"Q8_0", kQBlock, sizeof(BlockQ8_0), 8, 7, 9},
      {"Q4_K", kQKBlock, sizeof(BlockQ4_K), 12, 14, -1},
      {"Q5_K", kQKBlock, sizeof(BlockQ5_K), 13, 16, -1},
      {"Q6_K", kQKBlock, sizeof(BlockQ6_K), 14, 18, -1},
  };
  static_assert(sizeof(kTraits) / sizeof(kTraits[0]) == kNumDTypes);
  return kTraits[static_cast<int>(type)];
}

float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t F32ToF16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t abs = x & 0x7fffffff;
  if (abs >= 0x7f800000) return sign | 0x7c00 | (abs > 0x7f800000 ? 0x200 : 0);  // inf / nan
  if (abs >= 0x477ff000) return sign | 0x7c00;        // rounds past the largest half: inf
  if (abs < 0x38800000) {                             // subnormal half (or zero)
    const float scaled = std::fabs(f) * 16777216.0f;  // 2^24: units of the smallest subnormal
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  // Normal: round the 13 dropped mantissa bits to nearest even.
  uint32_t h = (abs >> 13) - ((127 - 15) << 10);
  const uint32_t rest = abs & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;
  return sign | static_cast<uint16_t>(h);
}

namespace {

void DequantQ4_0(const BlockQ4_0* b, float* y) {
  const float d = F16ToF32(b->d);
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>((b->qs[j] & 0x0f) - 8) * d;
    y[j + 16] = static_cast<float>((b->qs[j] >> 4) - 8) * d;
  }
}

void DequantQ4_1(const BlockQ4_1* b, float* y) {
  const float d = F16ToF32(b->d), m = F16ToF32(b->m);
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>(b->qs[j] & 0x0f) * d + m;
    y[j + 16] = static_cast<float>(b->qs[j] >> 4) * d + m;
  }
}

// Q5: the fifth bit of element j is bit j of qh (elements 0..31).
void DequantQ5_0(const BlockQ5_0* b, float* y) {
  const float d = F16ToF32(b->d);
  uint32_t qh;
  std::memcpy(&qh, b->qh, 4);
  for (int j = 0; j < 16; ++j) {
    const int hi0 = ((qh >> j) & 1) << 4;
    const int hi1 = ((qh >> (j + 16)) & 1) << 4;
    y[j] = static_cast<float>(((b->qs[j] & 0x0f) | hi0) - 16) * d;
    y[j + 16] = static_cast<float>(((b->qs[j] >> 4) | hi1) - 16) * d;
  }
}

void DequantQ5_1(const BlockQ5_1* b, float* y) {
  const float d = F16ToF32(b->d), m = F16ToF32(b->m);
  uint32_t qh;
  std::memcpy(&qh, b->qh, 4);
  for (int j = 0; j < 16; ++j) {
    const int hi0 = ((qh >> j) & 1) << 4;
    const int hi1 = ((qh >> (j + 16)) & 1) << 4;
    y[j] = static_cast<float>((b->qs[j] & 0x0f) | hi0) * d + m;
    y[j + 16] = static_cast<float>((b->qs[j] >> 4) | hi1) * d + m;
  }
}

void DequantQ8_0(const BlockQ8_0* b, float* y) {
  const float d = F16ToF32(b->d);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(b->qs[j]) * d;
}

// Q4_K and Q5_K (Q4_K has no qh): sub-block j is x = d * sc_j * q - dmin * m_j.
template <typename Block>
void DequantQ45_K(const Block* b, float* y) {
  const float d = F16ToF32(b->d), dmin = F16ToF32(b->dmin);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    ScaleMinK4(j, b->scales, &sc, &m);
    const float dj = d * sc, mj = dmin * m;
    const uint8_t* qs = b->qs + 32 * (j / 2);
    for (int i = 0; i < 32; ++i) {
      int q = (j & 1) ? qs[i] >> 4 : qs[i] & 0x0f;
      if constexpr (sizeof(Block) == sizeof(BlockQ5_K)) q |= ((b->qh[i] >> j) & 1) << 4;
      y[32 * j + i] = dj * static_cast<float>(q) - mj;
    }
  }
}
void DequantQ4_K(const BlockQ4_K* b, float* y) { DequantQ45_K(b, y); }
void DequantQ5_K(const BlockQ5_K* b, float* y) { DequantQ45_K(b, y); }

void DequantQ6_K(const BlockQ6_K* b, float* y) {
  const float d = F16ToF32(b->d);
  for (int h = 0; h < 2; ++h) {
    for (int k = 0; k < 4; ++k) {
      for (int l = 0; l < 32; ++l) {
        const uint8_t lo = b->ql[64 * h + l + 32 * (k & 1)];
        const int q =
            ((k < 2 ? lo & 0x0f : lo >> 4) | (((b->qh[32 * h + l] >> (2 * k)) & 3) << 4)) - 32;
        const int e = 128 * h + 32 * k + l;
        y[e] = d * static_cast<float>(b->scales[e / 16]) * static_cast<float>(q);
      }
    }
  }
}

template <typename Block, void (*Dequant)(const Block*, float*)>
void DequantBlocks(const uint8_t* src, float* dst, int64_t n) {
  constexpr int kElems = sizeof(Block) >= sizeof(BlockQ4_K) ? kQKBlock : kQBlock;
  for (int64_t i = 0; i < n / kElems; ++i) {
    Block b;  // copied: file data carries no alignment guarantee
    std::memcpy(&b, src + i * sizeof(Block), sizeof(Block));
    Dequant(&b, dst + i * kElems);
  }
}

}  // namespace

void DequantizeRow(DType type, const uint8_t* src, float* dst, int64_t n) {
  switch (type) {
    case DType::kF32: std::memcpy(dst, src, n * sizeof(float)); return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = F16ToF32(h);
      }
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = BF16ToF32(h);
      }
      return;
    case DType::kQ4_0: return DequantBlocks<BlockQ4_0, DequantQ4_0>(src, dst, n);
    case DType::kQ4_1: return DequantBlocks<BlockQ4_1, DequantQ4_1>(src, dst, n);
    case DType::kQ5_0: return DequantBlocks<BlockQ5_0, DequantQ5_0>(src, dst, n);
    case DType::kQ5_1: return DequantBlocks<BlockQ5_1, DequantQ5_1>(src, dst, n);
    case DType::kQ8_0: return DequantBlocks<BlockQ8_0, DequantQ8_0>(src, dst, n);
    case DType::kQ4_K: return DequantBlocks<BlockQ4_K, DequantQ4_K>(src, dst, n);
    case DType::kQ5_K: return DequantBlocks<BlockQ5_K, DequantQ5_K>(src, dst, n);
    case DType::kQ6_K: return DequantBlocks<BlockQ6_K, DequantQ6_K>(src, dst, n);
  }
}

}  // namespace aviary
