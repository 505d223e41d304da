// Unit tests of the numeric building blocks (half floats, block dequantisation, MatMul, norms,
// WKV recurrences) against independent double-precision references written here, plus the
// byte tokenizer, the UTF-8 stream and the sampler.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include "aviary/error.h"
#include "aviary/model.h"
#include "aviary/sampler.h"
#include "aviary/tokenizer.h"
#include "tensor/dtype.h"
#include "tensor/int8_matmul.h"
#include "tensor/kernels.h"
#include "tensor/tensor.h"
#include "tensor/wkv.h"
#include "tensor_fixtures.h"
#include "test_data.h"

namespace {

using aviary::DType;
using aviary::testing::MakeTensor;

// ---- independent references ----

// IEEE half -> double, from the definition.
double HalfToDouble(uint16_t h) {
  const int sign = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double v;
  if (e == 0) {
    v = std::ldexp(static_cast<double>(m), -24);
  } else if (e == 31) {
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else {
    v = std::ldexp(static_cast<double>(1024 + m), e - 25);
  }
  return sign ? -v : v;
}

// bfloat16 -> double, from the definition (1 sign, 8 exponent, 7 mantissa bits).
double Bf16ToDouble(uint16_t h) {
  const int sign = h >> 15, e = (h >> 7) & 0xff, m = h & 0x7f;
  double v;
  if (e == 0) {
    v = std::ldexp(static_cast<double>(m), -126 - 7);
  } else if (e == 255) {
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else {
    v = std::ldexp(static_cast<double>(128 + m), e - 127 - 7);
  }
  return sign ? -v : v;
}

bool IsHalfNaN(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0; }

uint32_t FloatBits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// A random half with magnitude in [lo, hi) and random sign.
uint16_t RandomHalf(std::mt19937& rng, float lo, float hi, bool allow_negative = true) {
  std::uniform_real_distribution<float> mag(lo, hi);
  float f = mag(rng);
  if (allow_negative && (rng() & 1)) f = -f;
  return aviary::F32ToF16(f);
}

// ---- F16 / BF16 ----

TEST(HalfFloat, KnownValues) {
  using aviary::F16ToF32;
  using aviary::F32ToF16;
  EXPECT_EQ(F16ToF32(0x3c00), 1.0f);
  EXPECT_EQ(F16ToF32(0xc000), -2.0f);
  EXPECT_EQ(F16ToF32(0x7bff), 65504.0f);
  EXPECT_EQ(F16ToF32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(F16ToF32(0x03ff), std::ldexp(1023.0f, -24));  // largest subnormal
  EXPECT_EQ(F16ToF32(0x0400), std::ldexp(1.0f, -14));     // smallest normal
  EXPECT_EQ(F16ToF32(0x3555), 0.333251953125f);
  EXPECT_EQ(F16ToF32(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(F16ToF32(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_EQ(FloatBits(F16ToF32(0x0000)), 0x00000000u);
  EXPECT_EQ(FloatBits(F16ToF32(0x8000)), 0x80000000u);  // -0 keeps its sign
  EXPECT_TRUE(std::isnan(F16ToF32(0x7e00)));
  EXPECT_TRUE(std::isnan(F16ToF32(0x7c01)));
  EXPECT_TRUE(std::isnan(F16ToF32(0xfe00)));

  EXPECT_EQ(F32ToF16(1.0f), 0x3c00);
  EXPECT_EQ(F32ToF16(-2.0f), 0xc000);
  EXPECT_EQ(F32ToF16(65504.0f), 0x7bff);
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -14)), 0x0400);
  EXPECT_EQ(F32ToF16(0.0f), 0x0000);
  EXPECT_EQ(F32ToF16(-0.0f), 0x8000);
  EXPECT_EQ(F32ToF16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(F32ToF16(-std::numeric_limits<float>::infinity()), 0xfc00);
  EXPECT_EQ(F32ToF16(1e6f), 0x7c00);  // overflow -> inf
  EXPECT_EQ(F32ToF16(-1e6f), 0xfc00);
  EXPECT_EQ(F32ToF16(1e-10f), 0x0000);  // underflow -> 0
  EXPECT_EQ(F32ToF16(-1e-10f), 0x8000);
  EXPECT_EQ(F32ToF16(std::numeric_limits<float>::denorm_min()), 0x0000);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(IsHalfNaN(F32ToF16(nan)));
  EXPECT_TRUE(IsHalfNaN(F32ToF16(-nan)));
  EXPECT_TRUE(std::isnan(aviary::F16ToF32(F32ToF16(nan))));
  EXPECT_TRUE(IsHalfNaN(F32ToF16(std::numeric_limits<float>::signaling_NaN())));

  EXPECT_EQ(aviary::BF16ToF32(0x3f80), 1.0f);
  EXPECT_EQ(aviary::BF16ToF32(0xc040), -3.0f);
  EXPECT_EQ(aviary::BF16ToF32(0x7f80), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(aviary::BF16ToF32(0x7fc0)));
}

TEST(HalfFloat, AllHalvesDecodeExactlyAndRoundTrip) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    const float f = aviary::F16ToF32(h);
    if (IsHalfNaN(h)) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << h;
      EXPECT_TRUE(IsHalfNaN(aviary::F32ToF16(f))) << std::hex << h;  // NaN stays NaN
      continue;
    }
    const double want = HalfToDouble(h);
    ASSERT_EQ(f, static_cast<float>(want)) << "half 0x" << std::hex << h;
    ASSERT_EQ(std::signbit(f), std::signbit(want)) << "half 0x" << std::hex << h;
    ASSERT_EQ(aviary::F32ToF16(f), h) << "round trip of half 0x" << std::hex << h;
  }
}

TEST(HalfFloat, RoundsToNearestEven) {
  using aviary::F32ToF16;
  // 1 + 2^-11 lies halfway between 0x3c00 and 0x3c01: ties go to the even mantissa.
  EXPECT_EQ(F32ToF16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  EXPECT_EQ(F32ToF16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_EQ(F32ToF16(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)), 0x3c01);
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -25)), 0x0000);      // halfway 0 / smallest subnormal
  EXPECT_EQ(F32ToF16(3 * std::ldexp(1.0f, -25)), 0x0002);  // halfway 1 / 2 units
  EXPECT_EQ(F32ToF16(std::ldexp(1023.5f, -24)), 0x0400);   // subnormal -> normal boundary
  EXPECT_EQ(F32ToF16(65519.0f), 0x7bff);
  EXPECT_EQ(F32ToF16(65520.0f), 0x7c00);  // halfway 65504 / 65536 rounds to even: inf

  // Exhaustively: every midpoint between adjacent finite halves (both signs), and the floats
  // just either side of it.
  for (uint16_t h = 0; h < 0x7bff; ++h) {
    const float a = aviary::F16ToF32(h), b = aviary::F16ToF32(static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((static_cast<double>(a) + b) / 2);  // exact in float
    ASSERT_EQ(static_cast<double>(mid), (static_cast<double>(a) + b) / 2);
    const uint16_t even = (h & 1) ? static_cast<uint16_t>(h + 1) : h;
    for (int s = 0; s < 2; ++s) {
      const float sign = s ? -1.0f : 1.0f;
      const uint16_t sbit = s ? 0x8000 : 0;
      ASSERT_EQ(F32ToF16(sign * mid), even | sbit) << "midpoint above 0x" << std::hex << h;
      ASSERT_EQ(F32ToF16(sign * std::nextafter(mid, 0.0f)), h | sbit) << std::hex << h;
      ASSERT_EQ(F32ToF16(sign * std::nextafter(mid, 1e9f)), (h + 1) | sbit) << std::hex << h;
    }
  }
}

// ---- DequantizeRow ----

// Stored bytes of `blocks` blocks of a type, with random content that a quantizer could write.
std::vector<uint8_t> RandomBlocks(DType type, int blocks, std::mt19937& rng) {
  std::vector<uint8_t> bytes(aviary::StorageBytes(type, static_cast<uint64_t>(blocks) * 32));
  auto fill = [&](uint8_t* p, size_t n) {
    for (size_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(rng());
  };
  for (int b = 0; b < blocks; ++b) {
    uint8_t* p = bytes.data() + b * aviary::Traits(type).block_bytes;
    const uint16_t d = RandomHalf(rng, 0.001f, 0.1f);
    const uint16_t m = RandomHalf(rng, 0.0f, 1.0f);
    switch (type) {
      case DType::kQ4_0: {
        aviary::BlockQ4_0 q;
        q.d = d;
        fill(q.qs, 16);
        std::memcpy(p, &q, sizeof q);
        break;
      }
      case DType::kQ4_1: {
        aviary::BlockQ4_1 q;
        q.d = d;
        q.m = m;
        fill(q.qs, 16);
        std::memcpy(p, &q, sizeof q);
        break;
      }
      case DType::kQ5_0: {
        aviary::BlockQ5_0 q;
        q.d = d;
        fill(q.qh, 4);
        fill(q.qs, 16);
        std::memcpy(p, &q, sizeof q);
        break;
      }
      case DType::kQ5_1: {
        aviary::BlockQ5_1 q;
        q.d = d;
        q.m = m;
        fill(q.qh, 4);
        fill(q.qs, 16);
        std::memcpy(p, &q, sizeof q);
        break;
      }
      case DType::kQ8_0: {
        aviary::BlockQ8_0 q;
        q.d = d;
        for (auto& v : q.qs) v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
        std::memcpy(p, &q, sizeof q);
        break;
      }
      default: ADD_FAILURE() << "not a quantized type";
    }
  }
  return bytes;
}

// The value of element i of a block at `p`, straight from ggml's layout description.
double ReferenceElement(DType type, const uint8_t* p, int i) {
  auto u16 = [&](int at) { return static_cast<uint16_t>(p[at] | (p[at + 1] << 8)); };
  auto nibble = [](const uint8_t* qs, int i) { return i < 16 ? qs[i] & 0x0f : qs[i - 16] >> 4; };
  auto fifth = [](const uint8_t* qh, int i) {
    const uint32_t h = qh[0] | (qh[1] << 8) | (qh[2] << 16) | (static_cast<uint32_t>(qh[3]) << 24);
    return static_cast<int>((h >> i) & 1);
  };
  const double d = HalfToDouble(u16(0));
  switch (type) {
    case DType::kQ4_0: return (nibble(p + 2, i) - 8) * d;
    case DType::kQ4_1: return nibble(p + 4, i) * d + HalfToDouble(u16(2));
    case DType::kQ5_0: return ((nibble(p + 6, i) | (fifth(p + 2, i) << 4)) - 16) * d;
    case DType::kQ5_1:
      return (nibble(p + 8, i) | (fifth(p + 4, i) << 4)) * d + HalfToDouble(u16(2));
    case DType::kQ8_0: return static_cast<int8_t>(p[2 + i]) * d;
    default: ADD_FAILURE(); return 0;
  }
}

const DType kQuantTypes[] = {DType::kQ4_0, DType::kQ4_1, DType::kQ5_0, DType::kQ5_1, DType::kQ8_0};
const DType kAllTypes[] = {DType::kF32,  DType::kF16,  DType::kBF16, DType::kQ4_0,
                           DType::kQ4_1, DType::kQ5_0, DType::kQ5_1, DType::kQ8_0};

TEST(Dequantize, TraitsMatchGgml) {
  EXPECT_EQ(aviary::DTypeName(DType::kQ5_1), "Q5_1");
  EXPECT_FALSE(aviary::IsQuantized(DType::kF16));
  EXPECT_TRUE(aviary::IsQuantized(DType::kQ8_0));
  EXPECT_EQ(aviary::StorageBytes(DType::kF32, 64), 256u);
  EXPECT_EQ(aviary::StorageBytes(DType::kBF16, 64), 128u);
  EXPECT_EQ(aviary::StorageBytes(DType::kQ4_0, 64), 36u);
  EXPECT_EQ(aviary::StorageBytes(DType::kQ4_1, 64), 40u);
  EXPECT_EQ(aviary::StorageBytes(DType::kQ5_0, 64), 44u);
  EXPECT_EQ(aviary::StorageBytes(DType::kQ5_1, 64), 48u);
  EXPECT_EQ(aviary::StorageBytes(DType::kQ8_0, 64), 68u);
}

TEST(Dequantize, HandBuiltBlocks) {
  // Q4_0, d = 0.5: element j < 16 is the low nibble of qs[j], element j + 16 the high one.
  aviary::BlockQ4_0 q4{};
  q4.d = 0x3800;  // 0.5
  for (int j = 0; j < 16; ++j) q4.qs[j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  float y[32];
  aviary::DequantizeRow(DType::kQ4_0, reinterpret_cast<const uint8_t*>(&q4), y, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], (j - 8) * 0.5f) << j;
    EXPECT_EQ(y[j + 16], (15 - j - 8) * 0.5f) << j;
  }
  // Q5_0: qh = 0x80000001 sets the fifth bit of elements 0 and 31 only.
  aviary::BlockQ5_0 q5{};
  q5.d = 0x3c00;  // 1
  const uint32_t qh = 0x80000001u;
  std::memcpy(q5.qh, &qh, 4);
  for (int j = 0; j < 16; ++j) q5.qs[j] = 0x33;  // nibble 3 everywhere
  aviary::DequantizeRow(DType::kQ5_0, reinterpret_cast<const uint8_t*>(&q5), y, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], (j == 0 || j == 31) ? 3.0f : -13.0f) << j;
  // Q8_0 with d = -2.
  aviary::BlockQ8_0 q8{};
  q8.d = 0xc000;
  for (int j = 0; j < 32; ++j) q8.qs[j] = static_cast<int8_t>(j * 8 - 128);
  aviary::DequantizeRow(DType::kQ8_0, reinterpret_cast<const uint8_t*>(&q8), y, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], -2.0f * (j * 8 - 128)) << j;
  // Q4_1 / Q5_1: q * d + m.
  aviary::BlockQ4_1 q41{};
  q41.d = 0x3400;                                 // 0.25
  q41.m = 0xbc00;                                 // -1
  for (int j = 0; j < 16; ++j) q41.qs[j] = 0xf0;  // low 0, high 15
  aviary::DequantizeRow(DType::kQ4_1, reinterpret_cast<const uint8_t*>(&q41), y, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], -1.0f);
    EXPECT_EQ(y[j + 16], 15 * 0.25f - 1.0f);
  }
  aviary::BlockQ5_1 q51{};
  q51.d = 0x3c00;                     // 1
  q51.m = 0x4000;                     // 2
  const uint32_t qh51 = 0xffff0000u;  // fifth bit on for elements 16..31
  std::memcpy(q51.qh, &qh51, 4);
  for (int j = 0; j < 16; ++j) q51.qs[j] = 0xff;
  aviary::DequantizeRow(DType::kQ5_1, reinterpret_cast<const uint8_t*>(&q51), y, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], 15.0f + 2.0f);
    EXPECT_EQ(y[j + 16], 31.0f + 2.0f);
  }
}

TEST(Dequantize, RandomBlocksMatchReference) {
  std::mt19937 rng(1234);
  constexpr int kBlocks = 7;
  for (DType type : kQuantTypes) {
    SCOPED_TRACE(std::string(aviary::DTypeName(type)));
    const std::vector<uint8_t> bytes = RandomBlocks(type, kBlocks, rng);
    // At an odd address too: file data carries no alignment guarantee.
    for (int offset : {0, 1}) {
      std::vector<uint8_t> buf(bytes.size() + offset);
      std::memcpy(buf.data() + offset, bytes.data(), bytes.size());
      for (auto* dequantize : {&aviary::DequantizeRow, &aviary::fast::DequantizeRow}) {
        SCOPED_TRACE(dequantize == &aviary::DequantizeRow ? "DequantizeRow"
                                                          : "fast::DequantizeRow");
        std::vector<float> y(kBlocks * 32);
        dequantize(type, buf.data() + offset, y.data(), kBlocks * 32);
        const int block_bytes = aviary::Traits(type).block_bytes;
        for (int b = 0; b < kBlocks; ++b) {
          for (int i = 0; i < 32; ++i) {
            const double want = ReferenceElement(type, bytes.data() + b * block_bytes, i);
            ASSERT_EQ(y[b * 32 + i], static_cast<float>(want))
                << "block " << b << " element " << i << " offset " << offset;
          }
        }
      }
    }
  }
}

// Element e of the K-quant super-block at p, from a reading of ggml's layout independent of
// dtype.h's decoders (the float operations in the order ggml's dequantizers use).
float ReferenceElementK(DType type, const uint8_t* p, int e) {
  auto u16 = [&](int at) { return static_cast<uint16_t>(p[at] | (p[at + 1] << 8)); };
  if (type == DType::kQ6_K) {  // ql[128] qh[64] scales[16] d
    const int half = e / 128, l = e % 32, part = (e % 128) / 32;
    const uint8_t ql = p[64 * half + l + (part % 2) * 32];
    const int low = part < 2 ? ql & 15 : ql >> 4;
    const int top = (p[128 + 32 * half + l] >> (2 * part)) & 3;
    const float d = static_cast<float>(HalfToDouble(u16(208)));
    const float sc = static_cast<float>(static_cast<int8_t>(p[192 + e / 16]));
    return d * sc * static_cast<float>((low | (top << 4)) - 32);
  }
  // Q4_K: d dmin scales[12] qs[128]; Q5_K: d dmin scales[12] qh[32] qs[128].
  const int j = e / 32, i = e % 32;
  const uint8_t* sc = p + 4;
  int scale, min;
  if (j < 4) {
    scale = sc[j] & 63;
    min = sc[j + 4] & 63;
  } else {
    scale = (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4);
    min = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
  }
  const uint8_t* qs = p + (type == DType::kQ4_K ? 16 : 48);
  int q = (j % 2 == 0) ? qs[32 * (j / 2) + i] & 15 : qs[32 * (j / 2) + i] >> 4;
  if (type == DType::kQ5_K) q += ((p[16 + i] >> j) & 1) * 16;
  const float d = static_cast<float>(HalfToDouble(u16(0)));
  const float dmin = static_cast<float>(HalfToDouble(u16(2)));
  return d * static_cast<float>(scale) * static_cast<float>(q) - dmin * static_cast<float>(min);
}

TEST(Dequantize, KQuantsMatchTheLayout) {
  std::mt19937 rng(77);
  EXPECT_EQ(aviary::StorageBytes(DType::kQ4_K, 512), 288u);
  EXPECT_EQ(aviary::StorageBytes(DType::kQ5_K, 256), 176u);
  EXPECT_EQ(aviary::StorageBytes(DType::kQ6_K, 768), 630u);
  EXPECT_EQ(aviary::DTypeName(DType::kQ6_K), "Q6_K");
  for (DType type : {DType::kQ4_K, DType::kQ5_K, DType::kQ6_K}) {
    SCOPED_TRACE(std::string(aviary::DTypeName(type)));
    constexpr int kSuper = 3;
    const int block_bytes = aviary::Traits(type).block_bytes;
    std::vector<uint8_t> bytes(static_cast<size_t>(kSuper) * block_bytes + 1);
    for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    for (int s = 0; s < kSuper; ++s) {                  // finite super-block scales of either sign
      uint8_t* p = bytes.data() + 1 + s * block_bytes;  // an odd address
      const uint16_t d = RandomHalf(rng, 0.001f, 0.1f), dmin = RandomHalf(rng, 0.001f, 0.1f);
      if (type == DType::kQ6_K) {
        std::memcpy(p + 208, &d, 2);
      } else {
        std::memcpy(p, &d, 2);
        std::memcpy(p + 2, &dmin, 2);
      }
    }
    for (auto* dequantize : {&aviary::DequantizeRow, &aviary::fast::DequantizeRow}) {
      std::vector<float> y(kSuper * 256);
      dequantize(type, bytes.data() + 1, y.data(), kSuper * 256);
      for (int s = 0; s < kSuper; ++s) {
        for (int e = 0; e < 256; ++e) {
          ASSERT_EQ(y[s * 256 + e], ReferenceElementK(type, bytes.data() + 1 + s * block_bytes, e))
              << "super-block " << s << " element " << e;
        }
      }
    }
  }
}

TEST(Dequantize, PlainFloatTypes) {
  std::mt19937 rng(99);
  constexpr int n = 37;
  std::vector<float> f32(n);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (auto& v : f32) v = normal(rng);
  std::vector<uint16_t> f16(n), bf16(n);
  for (int i = 0; i < n; ++i) {
    f16[i] = static_cast<uint16_t>(rng());
    bf16[i] = static_cast<uint16_t>(rng());
  }
  f16[0] = 0x7c00;   // inf
  bf16[0] = 0x0001;  // subnormal
  for (auto* dequantize : {&aviary::DequantizeRow, &aviary::fast::DequantizeRow}) {
    for (int offset : {0, 1}) {
      SCOPED_TRACE(
          "offset " + std::to_string(offset) +
          (dequantize == &aviary::DequantizeRow ? " DequantizeRow" : " fast::DequantizeRow"));
      std::vector<uint8_t> buf(4 * n + offset);
      std::vector<float> y(n);

      std::memcpy(buf.data() + offset, f32.data(), 4 * n);
      dequantize(DType::kF32, buf.data() + offset, y.data(), n);
      EXPECT_TRUE(BitEqual(y, f32));

      std::memcpy(buf.data() + offset, f16.data(), 2 * n);
      dequantize(DType::kF16, buf.data() + offset, y.data(), n);
      for (int i = 0; i < n; ++i) {
        if (IsHalfNaN(f16[i])) {
          EXPECT_TRUE(std::isnan(y[i]));
        } else {
          EXPECT_EQ(y[i], static_cast<float>(HalfToDouble(f16[i]))) << i;
        }
      }

      std::memcpy(buf.data() + offset, bf16.data(), 2 * n);
      dequantize(DType::kBF16, buf.data() + offset, y.data(), n);
      for (int i = 0; i < n; ++i) {
        const double want = Bf16ToDouble(bf16[i]);
        if (std::isnan(want)) {
          EXPECT_TRUE(std::isnan(y[i]));
        } else {
          EXPECT_EQ(y[i], static_cast<float>(want)) << i;
        }
      }
    }
  }
}

// ---- kernels that exist in two implementations (fast SIMD and scalar reference) ----

// Runs a test once with each implementation selected (kernels.h), restoring the choice after.
// Float activations throughout: these are the exact-arithmetic definitions (the 8-bit and
// bfloat16 paths have their own tests, int8_matmul_test and bf16_matmul_test).
class KernelsTest : public ::testing::TestWithParam<aviary::Kernels> {
 protected:
  void SetUp() override {
    saved_ = aviary::ActiveKernels();
    aviary::testing::SetKernels(GetParam());
  }
  void TearDown() override { aviary::testing::SetKernels(saved_); }

 private:
  aviary::Kernels saved_ = aviary::Kernels::kFast;
  aviary::testing::RoundedActivations float_activations_{false};  // restored after the test
};

// ---- MatMul ----

// Stored bytes of a random rows x cols matrix of `type`.
std::vector<uint8_t> RandomMatrix(DType type, int rows, int cols, std::mt19937& rng) {
  if (aviary::IsQuantized(type)) return RandomBlocks(type, rows * cols / 32, rng);
  std::normal_distribution<float> normal(0.0f, 0.5f);
  std::vector<uint8_t> bytes(aviary::StorageBytes(type, static_cast<uint64_t>(rows) * cols));
  for (int i = 0; i < rows * cols; ++i) {
    const float f = normal(rng);
    if (type == DType::kF32) {
      std::memcpy(bytes.data() + 4 * i, &f, 4);
    } else {
      const uint16_t h =
          type == DType::kF16 ? aviary::F32ToF16(f) : static_cast<uint16_t>(FloatBits(f) >> 16);
      std::memcpy(bytes.data() + 2 * i, &h, 2);
    }
  }
  return bytes;
}

// Row r of the widened weights wf [rows, cols] times token t of x, in double; *mag gets the sum
// of the products' magnitudes (the scale the tolerances are relative to).
double DoubleDot(const std::vector<float>& wf, const std::vector<float>& x, int cols, int r, int t,
                 double* mag) {
  double sum = 0;
  *mag = 0;
  for (int c = 0; c < cols; ++c) {
    const double p = static_cast<double>(wf[r * cols + c]) * x[t * cols + c];
    sum += p;
    *mag += std::fabs(p);
  }
  return sum;
}

TEST_P(KernelsTest, MatMulMatchesDoubleReferenceAndIsRowOrderIndependent) {
  std::mt19937 rng(42);
  struct Shape {
    int rows, cols;
    bool any_cols;
  };
  const Shape shapes[] = {
      {1, 32, false}, {3, 64, false}, {7, 96, false}, {33, 160, false}, {5, 33, true}};
  double worst = 0;
  for (DType type : kAllTypes) {
    for (const Shape& shape : shapes) {
      if (shape.any_cols && aviary::IsQuantized(type)) continue;  // blocks of 32 only
      const int rows = shape.rows, cols = shape.cols;
      const std::vector<uint8_t> bytes = RandomMatrix(type, rows, cols, rng);
      const aviary::Tensor w = MakeTensor(type, rows, cols, bytes.data());
      ASSERT_EQ(w.nbytes, bytes.size());
      // Reference weights: each row dequantized (DequantizeRow is checked above).
      std::vector<float> wf(static_cast<size_t>(rows) * cols);
      for (int r = 0; r < rows; ++r) aviary::DequantizeRow(type, w.row(r), &wf[r * cols], cols);

      for (int T : {1, 2, 5, 64}) {
        SCOPED_TRACE(std::string(aviary::DTypeName(type)) + " " + std::to_string(rows) + "x" +
                     std::to_string(cols) + " T=" + std::to_string(T));
        std::normal_distribution<float> normal(0.0f, 1.0f);
        std::vector<float> x(static_cast<size_t>(T) * cols);
        for (auto& v : x) v = normal(rng);
        std::vector<float> y(static_cast<size_t>(T) * rows);
        aviary::MatMul(w, x.data(), T, y.data());

        for (int t = 0; t < T; ++t) {
          for (int r = 0; r < rows; ++r) {
            double mag;
            const double ref = DoubleDot(wf, x, cols, r, t, &mag);
            const double err = std::fabs(y[t * rows + r] - ref);
            ASSERT_LE(err, 1e-5 * mag + 1e-7) << "t " << t << " r " << r << " ref " << ref;
            worst = std::max(worst, err / (mag + 1e-30));
          }
        }

        // T tokens at once == T calls of one token, bit for bit.
        std::vector<float> single(static_cast<size_t>(T) * rows);
        for (int t = 0; t < T; ++t) {
          aviary::MatMul(w, x.data() + t * cols, 1, single.data() + t * rows);
        }
        EXPECT_TRUE(BitEqual(y, single));

        if (type == DType::kF32) {  // weights at an odd address
          std::vector<uint8_t> buf(bytes.size() + 1);
          std::memcpy(buf.data() + 1, bytes.data(), bytes.size());
          const aviary::Tensor wu = MakeTensor(type, rows, cols, buf.data() + 1);
          std::vector<float> yu(y.size());
          aviary::MatMul(wu, x.data(), T, yu.data());
          EXPECT_TRUE(BitEqual(y, yu));
        }
      }
    }
  }
  RecordProperty("worst_relative_error", std::to_string(worst));
}

TEST_P(KernelsTest, KQuantMatMulMatchesDoubleReference) {
  std::mt19937 rng(5);
  for (DType type : {DType::kQ4_K, DType::kQ5_K, DType::kQ6_K}) {
    for (int cols : {256, 768}) {
      const int rows = 9;
      const std::vector<uint8_t> bytes = aviary::testing::RandomMatrix(type, rows, cols, rng);
      const aviary::Tensor w = MakeTensor(type, rows, cols, bytes.data());
      std::vector<float> wf(static_cast<size_t>(rows) * cols);
      for (int r = 0; r < rows; ++r) aviary::DequantizeRow(type, w.row(r), &wf[r * cols], cols);
      for (int T : {1, 3, 7}) {
        SCOPED_TRACE(std::string(aviary::DTypeName(type)) + " cols " + std::to_string(cols) +
                     " T=" + std::to_string(T));
        std::normal_distribution<float> normal(0.0f, 1.0f);
        std::vector<float> x(static_cast<size_t>(T) * cols);
        for (auto& v : x) v = normal(rng);
        std::vector<float> y(static_cast<size_t>(T) * rows), single(y.size());
        aviary::MatMul(w, x.data(), T, y.data());
        for (int t = 0; t < T; ++t)
          aviary::MatMul(w, x.data() + t * cols, 1, single.data() + t * rows);
        EXPECT_TRUE(BitEqual(y, single));
        // 8-bit activations (the fast default for Q4_K/Q5_K on VNNI CPUs) are checked against
        // their own bound in int8_matmul_test; here a loose one (|dx| <= max|x| / 254).
        const bool int8 = GetParam() == aviary::Kernels::kFast && aviary::int8::Enabled() &&
                          aviary::int8::SupportsType(type);
        const double tolerance = int8 ? 2e-2 : 1e-5;
        for (int t = 0; t < T; ++t) {
          for (int r = 0; r < rows; ++r) {
            double mag;
            const double ref = DoubleDot(wf, x, cols, r, t, &mag);
            ASSERT_LE(std::fabs(y[t * rows + r] - ref), tolerance * mag + 1e-7)
                << "t " << t << " r " << r;
          }
        }
      }
    }
    const std::vector<uint8_t> bytes = aviary::testing::RandomMatrix(type, 3, 512, rng);
    const aviary::Tensor t = MakeTensor(type, 3, 512, bytes.data());
    std::vector<float> got(512), want(512);
    aviary::GatherRow(t, 2, got.data());
    aviary::DequantizeRow(type, bytes.data() + 2 * aviary::StorageBytes(type, 512), want.data(),
                          512);
    EXPECT_TRUE(BitEqual(got, want));
  }
}

TEST_P(KernelsTest, GatherRowWidensOneRow) {
  std::mt19937 rng(3);
  for (DType type : kAllTypes) {
    SCOPED_TRACE(std::string(aviary::DTypeName(type)));
    const std::vector<uint8_t> bytes = RandomMatrix(type, 4, 64, rng);
    const aviary::Tensor t = MakeTensor(type, 4, 64, bytes.data());
    std::vector<float> got(64), want(64);
    aviary::GatherRow(t, 2, got.data());
    aviary::DequantizeRow(type, bytes.data() + 2 * aviary::StorageBytes(type, 64), want.data(), 64);
    EXPECT_TRUE(BitEqual(got, want));
  }
}

// ---- LayerNorm / GroupNorm ----

std::vector<double> ReferenceNorm(const std::vector<float>& x, const std::vector<float>& w,
                                  const std::vector<float>& b, int begin, int n, double eps) {
  double mean = 0, var = 0;
  for (int i = begin; i < begin + n; ++i) mean += x[i];
  mean /= n;
  for (int i = begin; i < begin + n; ++i) var += (x[i] - mean) * (x[i] - mean);
  var /= n;
  std::vector<double> y(n);
  for (int i = 0; i < n; ++i) {
    y[i] = (x[begin + i] - mean) / std::sqrt(var + eps) * w[begin + i] + b[begin + i];
  }
  return y;
}

TEST_P(KernelsTest, LayerNormMatchesDouble) {
  std::mt19937 rng(5);
  for (int n : {1, 7, 33, 64, 128, 1024}) {
    for (float offset : {0.0f, 10.0f, -300.0f}) {
      SCOPED_TRACE("n " + std::to_string(n) + " offset " + std::to_string(offset));
      std::normal_distribution<float> normal(0.0f, 2.0f);
      std::vector<float> x(n), w(n), b(n), y(n);
      for (int i = 0; i < n; ++i) {
        x[i] = offset + normal(rng);
        w[i] = normal(rng);
        b[i] = normal(rng);
      }
      aviary::LayerNorm(x.data(), w.data(), b.data(), n, 1e-5f, y.data());
      const std::vector<double> want = ReferenceNorm(x, w, b, 0, n, 1e-5);
      // fp32 loses about eps * |mean| / std when it subtracts the mean.
      double mean = 0, var = 0;
      for (float v : x) mean += v;
      mean /= n;
      for (float v : x) var += (v - mean) * (v - mean);
      const double shift = std::fabs(mean) / std::sqrt(var / n + 1e-5);
      for (int i = 0; i < n; ++i) {
        EXPECT_NEAR(y[i], want[i], 2e-5 * (1 + std::fabs(want[i]) + std::fabs(w[i]) * shift)) << i;
      }
    }
  }
  // A constant row has zero variance: the output is the bias.
  std::vector<float> x(16, 3.25f), w(16, 2.0f), b(16), y(16);
  for (int i = 0; i < 16; ++i) b[i] = 0.5f * i;
  aviary::LayerNorm(x.data(), w.data(), b.data(), 16, 1e-5f, y.data());
  for (int i = 0; i < 16; ++i) EXPECT_EQ(y[i], b[i]);
}

TEST_P(KernelsTest, GroupNormNormalisesEachGroup) {
  std::mt19937 rng(6);
  const int n = 64;
  for (int groups : {1, 2, 4, 8, 64}) {
    for (float eps : {1e-5f, 64e-5f}) {
      SCOPED_TRACE("groups " + std::to_string(groups) + " eps " + std::to_string(eps));
      std::normal_distribution<float> normal(0.0f, 1.0f);
      std::vector<float> x(n), w(n), b(n), y(n);
      for (int i = 0; i < n; ++i) {
        x[i] = normal(rng) * (1 + i / 8) + (i / 16) * 5.0f;  // groups differ in scale and mean
        w[i] = normal(rng);
        b[i] = normal(rng);
      }
      aviary::GroupNorm(x.data(), w.data(), b.data(), n, groups, eps, y.data());
      const int g = n / groups;
      for (int h = 0; h < groups; ++h) {
        const std::vector<double> want = ReferenceNorm(x, w, b, h * g, g, eps);
        for (int i = 0; i < g; ++i) {
          EXPECT_NEAR(y[h * g + i], want[i], 2e-5 * (1 + std::fabs(want[i])))
              << "group " << h << " i " << i;
        }
      }
    }
  }
}

// ---- WKV recurrences ----

std::vector<float> Uniform(std::mt19937& rng, size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

TEST_P(KernelsTest, Wkv4MatchesDirectSums) {
  // Reference without the running exponent: A = sum e^(k_i + w (t-1-i)) v_i, B likewise.
  std::mt19937 rng(7);
  const int C = 8, steps = 6;
  const std::vector<float> u = Uniform(rng, C, -1.0f, 1.0f);
  std::vector<float> decay = Uniform(rng, C, -2.0f, 1.0f);
  for (auto& w : decay) w = -std::exp(w);  // prepared w = -exp(time_decay)
  std::vector<float> aa(C, 0.0f), bb(C, 0.0f), pp(C, -1e30f), out(C);
  std::vector<double> A(C, 0.0), B(C, 0.0);
  for (int step = 0; step < steps; ++step) {
    // Step 3 has huge keys: e^k overflows float, the stable form must not.
    const float klo = step == 3 ? 60.0f : -3.0f, khi = step == 3 ? 100.0f : 3.0f;
    const std::vector<float> k = Uniform(rng, C, klo, khi);
    const std::vector<float> v = Uniform(rng, C, -2.0f, 2.0f);
    aviary::Wkv4(C, k.data(), v.data(), u.data(), decay.data(), aa.data(), bb.data(), pp.data(),
                 out.data());
    for (int c = 0; c < C; ++c) {
      const double euk = std::exp(static_cast<double>(u[c]) + k[c]);
      const double want = (A[c] + euk * v[c]) / (B[c] + euk);
      EXPECT_NEAR(out[c], want, 1e-5 * (1 + std::fabs(want))) << "step " << step << " c " << c;
      A[c] = std::exp(static_cast<double>(decay[c])) * A[c] +
             std::exp(static_cast<double>(k[c])) * v[c];
      B[c] = std::exp(static_cast<double>(decay[c])) * B[c] + std::exp(static_cast<double>(k[c]));
      // The state holds A and B scaled by e^-pp. After the huge keys pp ~ 100, and float
      // rounding of pp + w (~ulp(100) = 8e-6) shows up as a relative error of that size.
      const double scale = std::exp(static_cast<double>(pp[c]));
      const double tol = 1e-6 * (4 + std::fabs(pp[c]));
      EXPECT_NEAR(aa[c] * scale, A[c], tol * B[c]) << "step " << step << " c " << c;
      EXPECT_NEAR(bb[c] * scale, B[c], tol * B[c]) << "step " << step << " c " << c;
      EXPECT_TRUE(std::isfinite(aa[c]) && std::isfinite(bb[c]) && std::isfinite(pp[c]));
    }
  }
}

TEST_P(KernelsTest, Wkv5MatchesFormula) {
  std::mt19937 rng(8);
  const int H = 2, N = 4, C = H * N, steps = 5;
  const std::vector<float> decay = Uniform(rng, C, 0.3f, 0.99f);
  const std::vector<float> first = Uniform(rng, C, -1.0f, 1.0f);
  std::vector<float> S = Uniform(rng, static_cast<size_t>(H) * N * N, -1.0f, 1.0f), out(C);
  std::vector<double> Sd(S.begin(), S.end());
  for (int step = 0; step < steps; ++step) {
    const std::vector<float> r = Uniform(rng, C, -1.0f, 1.0f);
    const std::vector<float> k = Uniform(rng, C, -1.0f, 1.0f);
    const std::vector<float> v = Uniform(rng, C, -1.0f, 1.0f);
    aviary::Wkv5(H, N, r.data(), k.data(), v.data(), decay.data(), first.data(), S.data(),
                 out.data());
    for (int h = 0; h < H; ++h) {
      const int o = h * N;
      double* s = Sd.data() + h * N * N;  // s[i * N + j]: key i, value j
      for (int j = 0; j < N; ++j) {
        double want = 0;
        for (int i = 0; i < N; ++i) {
          want += static_cast<double>(r[o + i]) *
                  (static_cast<double>(first[o + i]) * k[o + i] * v[o + j] + s[i * N + j]);
        }
        EXPECT_NEAR(out[o + j], want, 1e-5) << "step " << step << " head " << h << " j " << j;
      }
      for (int i = 0; i < N; ++i) {
        for (int j = 0; j < N; ++j) {
          s[i * N + j] = decay[o + i] * s[i * N + j] + static_cast<double>(k[o + i]) * v[o + j];
        }
      }
    }
    for (size_t i = 0; i < S.size(); ++i) EXPECT_NEAR(S[i], Sd[i], 1e-5) << "step " << step;
  }
}

TEST_P(KernelsTest, Wkv7MatchesFormula) {
  std::mt19937 rng(9);
  const int H = 2, N = 4, C = H * N, steps = 6;
  std::vector<float> S = Uniform(rng, static_cast<size_t>(H) * N * N, -1.0f, 1.0f), out(C);
  std::vector<double> Sd(S.begin(), S.end());
  for (int step = 0; step < steps; ++step) {
    const std::vector<float> r = Uniform(rng, C, -1.0f, 1.0f);
    const std::vector<float> w = Uniform(rng, C, 0.5f, 0.999f);
    const std::vector<float> k = Uniform(rng, C, -1.0f, 1.0f);
    const std::vector<float> v = Uniform(rng, C, -1.0f, 1.0f);
    const std::vector<float> a = Uniform(rng, C, 0.0f, 1.0f);
    std::vector<float> kk = Uniform(rng, C, -1.0f, 1.0f);
    for (int h = 0; h < H; ++h) {  // kk is unit length per head in the model
      double norm = 0;
      for (int j = 0; j < N; ++j) norm += kk[h * N + j] * kk[h * N + j];
      for (int j = 0; j < N; ++j)
        kk[h * N + j] = static_cast<float>(kk[h * N + j] / std::sqrt(norm));
    }
    aviary::Wkv7(H, N, r.data(), w.data(), k.data(), v.data(), kk.data(), a.data(), S.data(),
                 out.data());
    // S = S diag(w) + (S (-kk)) (kk a)^T + v k^T with S·(-kk) taken before the decay;
    // out = S r. S[h] is [N value, N key]: s[i * N + j], value i, key j.
    for (int h = 0; h < H; ++h) {
      const int o = h * N;
      double* s = Sd.data() + h * N * N;
      std::vector<double> sa(N, 0.0);
      for (int i = 0; i < N; ++i) {
        for (int j = 0; j < N; ++j) sa[i] -= s[i * N + j] * kk[o + j];
      }
      for (int i = 0; i < N; ++i) {
        double want = 0;
        for (int j = 0; j < N; ++j) {
          s[i * N + j] = s[i * N + j] * w[o + j] + sa[i] * kk[o + j] * a[o + j] +
                         static_cast<double>(v[o + i]) * k[o + j];
          want += s[i * N + j] * r[o + j];
        }
        EXPECT_NEAR(out[o + i], want, 1e-5) << "step " << step << " head " << h << " i " << i;
      }
    }
    for (size_t i = 0; i < S.size(); ++i) EXPECT_NEAR(S[i], Sd[i], 1e-5) << "step " << step;
  }
}

// The *Seq forms do exactly the arithmetic of T single steps.
TEST_P(KernelsTest, WkvSeqEqualsSingleSteps) {
  std::mt19937 rng(10);
  const int H = 3, N = 8, C = H * N, T = 7;
  const size_t TC = static_cast<size_t>(T) * C, SS = static_cast<size_t>(H) * N * N;
  const std::vector<float> r = Uniform(rng, TC, -1, 1), k = Uniform(rng, TC, -2, 2),
                           v = Uniform(rng, TC, -1, 1), a = Uniform(rng, TC, 0, 1),
                           first = Uniform(rng, C, -1, 1), w5 = Uniform(rng, TC, 0.3f, 0.99f);
  std::vector<float> w4 = Uniform(rng, C, -2, 1), kk = Uniform(rng, TC, -0.5f, 0.5f);
  for (auto& x : w4) x = -std::exp(x);
  const std::vector<float> S0 = Uniform(rng, SS, -1, 1);
  {  // v4
    std::vector<float> aa(C, 0.0f), bb(C, 0.0f), pp(C, -1e30f), out(TC);
    std::vector<float> aa1 = aa, bb1 = bb, pp1 = pp, out1(TC);
    aviary::Wkv4Seq(T, C, k.data(), v.data(), first.data(), w4.data(), aa.data(), bb.data(),
                    pp.data(), out.data());
    for (int t = 0; t < T; ++t) {
      aviary::Wkv4(C, &k[t * C], &v[t * C], first.data(), w4.data(), aa1.data(), bb1.data(),
                   pp1.data(), &out1[t * C]);
    }
    EXPECT_TRUE(BitEqual(out, out1));
    EXPECT_TRUE(BitEqual(aa, aa1) && BitEqual(bb, bb1) && BitEqual(pp, pp1));
  }
  for (bool per_token : {false, true}) {  // v5 (one decay row) and v6 (a row per token)
    SCOPED_TRACE(per_token ? "decay per token" : "one decay row");
    std::vector<float> S = S0, S1 = S0, out(TC), out1(TC);
    aviary::Wkv5Seq(T, H, N, r.data(), k.data(), v.data(), w5.data(), per_token, first.data(),
                    S.data(), out.data());
    for (int t = 0; t < T; ++t) {
      aviary::Wkv5(H, N, &r[t * C], &k[t * C], &v[t * C], &w5[per_token ? t * C : 0], first.data(),
                   S1.data(), &out1[t * C]);
    }
    EXPECT_TRUE(BitEqual(out, out1));
    EXPECT_TRUE(BitEqual(S, S1));
  }
  {  // v7
    std::vector<float> S = S0, S1 = S0, out(TC), out1(TC);
    aviary::Wkv7Seq(T, H, N, r.data(), w5.data(), k.data(), v.data(), kk.data(), a.data(), S.data(),
                    out.data());
    for (int t = 0; t < T; ++t) {
      aviary::Wkv7(H, N, &r[t * C], &w5[t * C], &k[t * C], &v[t * C], &kk[t * C], &a[t * C],
                   S1.data(), &out1[t * C]);
    }
    EXPECT_TRUE(BitEqual(out, out1));
    EXPECT_TRUE(BitEqual(S, S1));
  }
}

INSTANTIATE_TEST_SUITE_P(Both, KernelsTest,
                         ::testing::Values(aviary::Kernels::kReference, aviary::Kernels::kFast),
                         [](const ::testing::TestParamInfo<aviary::Kernels>& i) {
                           return i.param == aviary::Kernels::kFast ? "Fast" : "Reference";
                         });

// ---- Tokenizer ----

TEST(ByteTokenizer, RoundTripsAllBytes) {
  const auto tok = aviary::MakeByteTokenizer();
  EXPECT_EQ(tok->vocab_size(), 256);
  std::string all;
  for (int i = 0; i < 256; ++i) all.push_back(static_cast<char>(i));  // includes NUL
  const std::vector<int32_t> ids = tok->Encode(all);
  ASSERT_EQ(ids.size(), 256u);
  for (int i = 0; i < 256; ++i) EXPECT_EQ(ids[i], i);  // 0x80..0xff -> 128..255, not negative
  EXPECT_EQ(tok->Decode(ids), all);
  EXPECT_TRUE(tok->Encode("").empty());
  EXPECT_EQ(tok->Decode(std::vector<int32_t>{}), "");
  static const char kText[] = "h\xc3\xa9llo\t\n\0!";
  const std::string text(kText, sizeof kText - 1);
  EXPECT_EQ(tok->Decode(tok->Encode(text)), text);
}

TEST(ByteTokenizer, DecodeRejectsIdsOutsideTheVocabulary) {
  const auto tok = aviary::MakeByteTokenizer();
  EXPECT_THROW(tok->Decode(std::vector<int32_t>{256}), aviary::Error);
  EXPECT_THROW(tok->Decode(std::vector<int32_t>{-1}), aviary::Error);
  EXPECT_THROW(tok->Decode(std::vector<int32_t>{65, 66, 1000}), aviary::Error);
  EXPECT_EQ(tok->Decode(std::vector<int32_t>{255}), "\xff");
}

TEST(ByteTokenizer, TokenizerForModel) {
  // An empty folder as both the model's folder and the cache, so that no vocabulary file can
  // be found whatever this machine has cached.
  namespace fs = std::filesystem;
  const fs::path empty =
      fs::path(::testing::TempDir()) / ("aviary_kernels_test_empty_" + std::to_string(::getpid()));
  fs::create_directories(empty);
  const std::string cache = empty.string();

  aviary::ModelInfo info;
  info.path = (empty / "big.bin").string();
  info.n_vocab = 256;
  EXPECT_EQ(aviary::TokenizerForModel(info, "", cache)->vocab_size(), 256);
  info.n_vocab = 65536;  // World: its vocabulary file is nowhere to be found
  EXPECT_THROW(aviary::TokenizerForModel(info, "", cache), aviary::Error);
  info.n_vocab = 12345;  // no tokenizer known for this size
  EXPECT_THROW(aviary::TokenizerForModel(info, "", cache), aviary::Error);
  std::error_code ec;
  fs::remove_all(empty, ec);
}

// ---- Utf8Stream ----

// Strict UTF-8 validation (no overlongs, no surrogates, <= U+10FFFF).
bool ValidUtf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = s[i];
    int n;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      n = 1, cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      n = 2, cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      n = 3, cp = c & 0x07;
    } else {
      return false;
    }
    if (i + n >= s.size()) return false;  // truncated
    for (int j = 1; j <= n; ++j) {
      const unsigned char cc = s[i + j];
      if ((cc & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    static const uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += n + 1;
  }
  return true;
}

TEST(Utf8Stream, ValidatorSanity) {
  EXPECT_TRUE(ValidUtf8("h\xc3\xa9"));
  EXPECT_FALSE(ValidUtf8("\xc3"));
  EXPECT_FALSE(ValidUtf8("\xf0\x9f\x90"));
  EXPECT_FALSE(ValidUtf8("\x80"));
  EXPECT_TRUE(ValidUtf8("\xf0\x9f\x90\xa6"));
}

TEST(Utf8Stream, NeverEmitsHalfACharacter) {
  const std::string text =
      "h\xc3\xa9llo \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x90\xa6";  // héllo 世界 🐦
  ASSERT_TRUE(ValidUtf8(text));
  {
    aviary::Utf8Stream stream;
    std::string joined;
    for (char c : text) {
      const std::string chunk = stream.Push(std::string_view(&c, 1));
      EXPECT_TRUE(ValidUtf8(chunk)) << "chunk after byte " << joined.size();
      joined += chunk;
    }
    EXPECT_EQ(joined, text);  // nothing left over after a complete character
    EXPECT_EQ(stream.Flush(), "");
  }
  // Every way of cutting the text into two pushes.
  for (size_t cut = 0; cut <= text.size(); ++cut) {
    aviary::Utf8Stream stream;
    const std::string a = stream.Push(std::string_view(text).substr(0, cut));
    const std::string b = stream.Push(std::string_view(text).substr(cut));
    EXPECT_TRUE(ValidUtf8(a)) << cut;
    EXPECT_TRUE(ValidUtf8(b)) << cut;
    EXPECT_EQ(a + b + stream.Flush(), text) << cut;
  }
}

TEST(Utf8Stream, FlushReturnsAnIncompleteTail) {
  aviary::Utf8Stream stream;
  EXPECT_EQ(stream.Push("ab\xe4\xb8"), "ab");
  EXPECT_EQ(stream.Flush(), "\xe4\xb8");
  EXPECT_EQ(stream.Flush(), "");
  EXPECT_EQ(stream.Push("ok"), "ok");
}

TEST(Utf8Stream, InvalidBytesPassThrough) {
  aviary::Utf8Stream stream;
  EXPECT_EQ(stream.Push("\xff"), "\xff");
  EXPECT_EQ(stream.Push("\x80"), "\x80");  // lone continuation byte
  EXPECT_EQ(stream.Push("a\xfe"
                        "b"),
            "a\xfe"
            "b");
  // A lead byte followed by something that cannot continue it is not held forever.
  EXPECT_EQ(stream.Push("\xe4"), "");
  EXPECT_EQ(stream.Push("z"), "\xe4z");
  EXPECT_EQ(stream.Flush(), "");

  const std::string messy = "x\xff\x80\x80y\xc0\xaf\xe4\xb8\x96\xed\xa0\x80\xf8z";
  aviary::Utf8Stream s2;
  std::string joined;
  for (char c : messy) joined += s2.Push(std::string_view(&c, 1));
  EXPECT_EQ(joined + s2.Flush(), messy);
}

// ---- Sampler ----

std::vector<float> RandomLogits(std::mt19937& rng, int n) {
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

// Sampler options with everything else at its default.
aviary::SamplerOptions Opts(float temperature = 1.0f, float top_p = 1.0f, int top_k = 0,
                            uint64_t seed = 0) {
  aviary::SamplerOptions o;
  o.temperature = temperature;
  o.top_p = top_p;
  o.top_k = top_k;
  o.seed = seed;
  return o;
}

TEST(Sampler, ArgMax) {
  EXPECT_EQ(aviary::ArgMax(std::vector<float>{1, 3, 2}), 1);
  EXPECT_EQ(aviary::ArgMax(std::vector<float>{5, 1, 5}), 0);  // first on ties
  EXPECT_EQ(aviary::ArgMax(std::vector<float>{-2, -1}), 1);
}

TEST(Sampler, GreedyModes) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 20; ++trial) {
    const std::vector<float> logits = RandomLogits(rng, 256);
    const int32_t best = aviary::ArgMax(logits);
    aviary::Sampler greedy(Opts(0.0f, 1.0f, 0, static_cast<uint64_t>(trial)));
    aviary::Sampler top_p0(Opts(1.0f, 0.0f, 0, 5));
    aviary::Sampler top_k1(Opts(1.5f, 1.0f, 1, 6));
    for (int i = 0; i < 10; ++i) {
      EXPECT_EQ(greedy.Sample(logits), best);
      EXPECT_EQ(top_p0.Sample(logits), best);
      EXPECT_EQ(top_k1.Sample(logits), best);
    }
  }
}

TEST(Sampler, SeedDeterminesTheSequence) {
  std::mt19937 rng(12);
  const std::vector<float> logits = RandomLogits(rng, 256);
  const std::vector<float> flat(256, 0.0f);
  aviary::Sampler a(Opts(1.0f, 1.0f, 0, 7)), b(Opts(1.0f, 1.0f, 0, 7)), c(Opts(1.0f, 1.0f, 0, 8));
  std::vector<int32_t> sa, sb, sc;
  for (int i = 0; i < 50; ++i) {
    sa.push_back(a.Sample(flat));
    sb.push_back(b.Sample(flat));
    sc.push_back(c.Sample(flat));
  }
  EXPECT_EQ(sa, sb);
  EXPECT_NE(sa, sc);
  for (int i = 0; i < 100; ++i) ASSERT_EQ(a.Sample(logits), b.Sample(logits));
  for (int32_t t : sc) EXPECT_TRUE(t >= 0 && t < 256);
}

TEST(Sampler, TopPKeepsOnlyTheNucleus) {
  const std::vector<float> logits = {std::log(0.2f), std::log(0.6f), std::log(0.1f),
                                     std::log(0.1f)};
  aviary::Sampler half(Opts(1.0f, 0.5f, 0, 3));
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(half.Sample(logits), 1);
  // top_p 0.7 keeps tokens 1 and 0 (0.6 + 0.2 >= 0.7), never 2 or 3.
  aviary::Sampler p07(Opts(1.0f, 0.7f, 0, 4));
  int seen[4] = {0, 0, 0, 0};
  for (int i = 0; i < 2000; ++i) seen[p07.Sample(logits)]++;
  EXPECT_EQ(seen[2] + seen[3], 0);
  EXPECT_GT(seen[0], 300);  // 25% of kept mass
  EXPECT_GT(seen[1], 1200);
  // top_k 2 likewise.
  aviary::Sampler k2(Opts(1.0f, 1.0f, 2, 4));
  for (int i = 0; i < 1000; ++i) {
    const int32_t t = k2.Sample(logits);
    ASSERT_TRUE(t == 0 || t == 1) << t;
  }
}

// Pearson chi-square of observed counts against expected probabilities.
double ChiSquare(const std::vector<int>& counts, const std::vector<double>& p, int draws) {
  double chi = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    const double e = p[i] * draws;
    chi += (counts[i] - e) * (counts[i] - e) / e;
  }
  return chi;
}

TEST(Sampler, FrequenciesFollowSoftmax) {
  const std::vector<float> logits = {0.5f, -1.0f, 1.2f, 0.0f};
  constexpr int kDraws = 20000;
  for (float temperature : {1.0f, 2.0f}) {
    SCOPED_TRACE("temperature " + std::to_string(temperature));
    std::vector<double> p(4);
    double total = 0;
    for (int i = 0; i < 4; ++i) total += p[i] = std::exp(logits[i] / temperature);
    for (auto& x : p) x /= total;
    aviary::Sampler sampler(Opts(temperature, 1.0f, 0, 2024));
    std::vector<int> counts(4, 0);
    for (int i = 0; i < kDraws; ++i) counts[sampler.Sample(logits)]++;
    // 3 degrees of freedom: P(chi2 > 25) ~ 1.6e-5 (and the seed is fixed).
    const double chi = ChiSquare(counts, p, kDraws);
    EXPECT_LT(chi, 25.0) << counts[0] << " " << counts[1] << " " << counts[2] << " " << counts[3];
  }
}

TEST(Sampler, InvalidOptionsThrow) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_THROW(aviary::Sampler(Opts(-1.0f, 1.0f, 0, 0)), aviary::UsageError);
  EXPECT_THROW(aviary::Sampler(Opts(nan, 1.0f, 0, 0)), aviary::UsageError);
  EXPECT_THROW(aviary::Sampler(Opts(inf, 1.0f, 0, 0)), aviary::UsageError);
  EXPECT_THROW(aviary::Sampler(Opts(1.0f, 1.5f, 0, 0)), aviary::UsageError);
  EXPECT_THROW(aviary::Sampler(Opts(1.0f, -0.1f, 0, 0)), aviary::UsageError);
  EXPECT_THROW(aviary::Sampler(Opts(1.0f, nan, 0, 0)), aviary::UsageError);
  EXPECT_THROW(aviary::Sampler(Opts(1.0f, 1.0f, -1, 0)), aviary::UsageError);
  EXPECT_NO_THROW(aviary::Sampler(Opts(0.0f, 1.0f, 0, 0)));
  aviary::Sampler ok(aviary::SamplerOptions{});
  EXPECT_THROW(ok.Sample(std::vector<float>{}), aviary::UsageError);
}

}  // namespace
