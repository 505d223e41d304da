// The K-quant encoders (Q4_K, Q5_K, Q6_K in tensor/quantize.h) against the decoder
// (DequantizeRow, tensor/dtype.h) and against a reading of ggml's block layout done here:
//  - round trips on Gaussian and heavy-tailed data beat the 32-element formats of similar size;
//  - blocks built by hand decode to the values worked out here from the layout;
//  - every stored level is the nearest one for the stored scales;
//  - edge cases (zeros, constants, one-signed data, an outlier, tiny, huge, NaN and inf) give
//    finite, sane output; encoding is deterministic and block by block;
//  - re-encoding a decoded row changes it little.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "tensor/dtype.h"
#include "tensor/quantize.h"

namespace aviary {
namespace {

constexpr DType kKTypes[] = {DType::kQ4_K, DType::kQ5_K, DType::kQ6_K};

// ---- data: from std::mt19937's raw output (specified exactly by the standard), not from
// std::*_distribution (whose algorithms vary between standard libraries) ----

class Source {
 public:
  explicit Source(uint32_t seed) : rng_(seed) {}
  double Uniform() { return (static_cast<double>(rng_()) + 0.5) / 4294967296.0; }  // (0, 1)
  double Gaussian() {                                                              // Box-Muller
    const double r = std::sqrt(-2.0 * std::log(Uniform()));
    return r * std::cos(6.283185307179586 * Uniform());
  }
  double Laplace() { return (rng_() & 1 ? 1.0 : -1.0) * -std::log(Uniform()); }
  double StudentT3() {  // N / sqrt(chi^2_3 / 3): heavy tails, finite variance
    const double a = Gaussian(), b = Gaussian(), c = Gaussian();
    return Gaussian() / std::sqrt((a * a + b * b + c * c) / 3.0);
  }

 private:
  std::mt19937 rng_;
};

enum class Shape { kGaussian, kLaplace, kStudentT3 };

std::vector<float> Draw(Shape shape, int64_t n, uint32_t seed) {
  Source source(seed);
  std::vector<float> x(n);
  for (float& v : x) {
    v = static_cast<float>(shape == Shape::kGaussian  ? source.Gaussian()
                           : shape == Shape::kLaplace ? source.Laplace()
                                                      : source.StudentT3());
  }
  return x;
}

std::vector<uint8_t> Encode(DType type, const std::vector<float>& x) {
  std::vector<uint8_t> bytes(StorageBytes(type, x.size()));
  QuantizeRow(type, x.data(), bytes.data(), static_cast<int64_t>(x.size()));
  return bytes;
}

std::vector<float> Decode(DType type, const std::vector<uint8_t>& bytes, int64_t n) {
  std::vector<float> y(n);
  DequantizeRow(type, bytes.data(), y.data(), n);
  return y;
}

std::vector<float> RoundTrip(DType type, const std::vector<float>& x) {
  return Decode(type, Encode(type, x), static_cast<int64_t>(x.size()));
}

double SquaredError(const std::vector<float>& x, const std::vector<float>& y) {
  double sum = 0.0;
  for (size_t i = 0; i < x.size(); ++i) sum += (double{x[i]} - y[i]) * (double{x[i]} - y[i]);
  return sum;
}

double SquaredNorm(const std::vector<float>& x) {
  double sum = 0.0;
  for (float v : x) sum += double{v} * v;
  return sum;
}

// RMS of y - x over RMS of x.
double RelativeRms(const std::vector<float>& x, const std::vector<float>& y) {
  return std::sqrt(SquaredError(x, y) / SquaredNorm(x));
}

bool AllFinite(const std::vector<float>& y) {
  return std::all_of(y.begin(), y.end(), [](float v) { return std::isfinite(v); });
}

// ---- ggml's layout, read here from the comment in dtype.h (not from DequantizeRow) ----

// The 4-bit part of element e (0..255) of a Q4_K / Q5_K block: byte i of qs[32 c ..] holds
// element i of sub-block 2c in its low nibble and of sub-block 2c + 1 in its high nibble.
int LowNibbleK(const uint8_t* qs, int e) {
  const int j = e / 32, i = e % 32;
  const uint8_t byte = qs[32 * (j / 2) + i];
  return j % 2 == 0 ? byte & 0x0f : byte >> 4;
}

// Q5_K's fifth bit of element e: bit j (its sub-block) of qh[i] (its index in the sub-block).
int FifthBitK(const uint8_t* qh, int e) { return (qh[e % 32] >> (e / 32)) & 1; }

// Q6_K's level (0..63) of element e: in half h, element l + 32 t (l < 32, t < 4) takes the low
// (t < 2) or high nibble of ql[64 h + l + 32 (t % 2)] and bits 2t, 2t + 1 of qh[32 h + l].
int LevelQ6K(const BlockQ6_K& b, int e) {
  const int h = e / 128, t = (e % 128) / 32, l = e % 32;
  const uint8_t low = b.ql[64 * h + l + 32 * (t % 2)];
  const int nibble = t < 2 ? low & 0x0f : low >> 4;
  return nibble | (((b.qh[32 * h + l] >> (2 * t)) & 3) << 4);
}

template <typename Block>
Block BlockAt(const std::vector<uint8_t>& bytes, int64_t index) {
  Block b;
  std::memcpy(&b, bytes.data() + index * sizeof(Block), sizeof(Block));
  return b;
}

// ---- sizes and names ----

TEST(QuantizeK, TraitsAndStorage) {
  EXPECT_EQ(StorageBytes(DType::kQ4_K, 512), 288u);
  EXPECT_EQ(StorageBytes(DType::kQ5_K, 256), 176u);
  EXPECT_EQ(StorageBytes(DType::kQ5_K, 1024), 4 * 176u);
  EXPECT_EQ(StorageBytes(DType::kQ6_K, 256), 210u);
  EXPECT_EQ(StorageBytes(DType::kQ6_K, 768), 3 * 210u);
  EXPECT_EQ(Traits(DType::kQ4_K).name, "Q4_K");
  EXPECT_EQ(Traits(DType::kQ5_K).name, "Q5_K");
  EXPECT_EQ(Traits(DType::kQ6_K).name, "Q6_K");
  for (DType type : kKTypes) {
    EXPECT_EQ(Traits(type).block_elems, 256) << DTypeName(type);
    EXPECT_TRUE(IsQuantized(type)) << DTypeName(type);
  }
}

// ---- round-trip error ----

struct Errors {
  double q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k;
};

Errors Measure(const std::vector<float>& x) {
  return {RelativeRms(x, RoundTrip(DType::kQ4_0, x)), RelativeRms(x, RoundTrip(DType::kQ4_1, x)),
          RelativeRms(x, RoundTrip(DType::kQ5_0, x)), RelativeRms(x, RoundTrip(DType::kQ5_1, x)),
          RelativeRms(x, RoundTrip(DType::kQ8_0, x)), RelativeRms(x, RoundTrip(DType::kQ4_K, x)),
          RelativeRms(x, RoundTrip(DType::kQ5_K, x)), RelativeRms(x, RoundTrip(DType::kQ6_K, x))};
}

// Bounds: the worst over 300 seeds (at n = 256, where one block decides) plus about 10%.
// Measured on 2^20 Gaussian values: Q4_0 0.0859, Q4_1 0.0783, Q4_K 0.0706, Q5_1 0.0379,
// Q5_K 0.0350, Q6_K 0.0173, Q8_0 0.0054 (ggml's reference K encoders: 0.0714, 0.0361, 0.0177).
TEST(QuantizeK, GaussianRoundTripBeatsTheBlockFormats) {
  for (int64_t n : {256, 512, 2048}) {
    Errors pooled{};  // sums of squared relative errors over the seeds
    for (uint32_t seed = 1; seed <= 5; ++seed) {
      const std::vector<float> x = Draw(Shape::kGaussian, n, seed);
      const Errors e = Measure(x);
      SCOPED_TRACE("n=" + std::to_string(n) + " seed=" + std::to_string(seed));
      EXPECT_LT(e.q4_k, 0.090);
      EXPECT_LT(e.q5_k, 0.044);
      EXPECT_LT(e.q6_k, 0.023);
      // Q4_K: 4.5 bits per weight against 4.5 (Q4_0) and 5 (Q4_1).
      EXPECT_LT(e.q4_k, e.q4_0);
      EXPECT_LT(e.q4_k, e.q4_1);
      EXPECT_LT(e.q5_k, e.q5_0);
      EXPECT_LT(e.q6_k, 0.6 * e.q5_k);
      EXPECT_LT(e.q6_k, 0.6 * e.q5_1);
      EXPECT_LT(e.q6_k, 4.5 * e.q8_0);  // 6.5 bits against 8.5: about 3.3 times the error
      pooled.q5_1 += e.q5_1 * e.q5_1;
      pooled.q5_k += e.q5_k * e.q5_k;
    }
    // Q5_K (5.5 bits) against Q5_1 (6 bits) loses a single block now and then; pooled it wins.
    EXPECT_LT(pooled.q5_k, 0.95 * pooled.q5_1) << "n=" << n;
  }
}

TEST(QuantizeK, HeavyTailedRoundTripBeatsTheBlockFormats) {
  for (Shape shape : {Shape::kLaplace, Shape::kStudentT3}) {
    for (int64_t n : {256, 2048}) {
      Errors pooled{};
      for (uint32_t seed = 11; seed <= 15; ++seed) {
        const std::vector<float> x = Draw(shape, n, seed);
        const Errors e = Measure(x);
        SCOPED_TRACE(std::string(shape == Shape::kLaplace ? "Laplace" : "Student-t3") +
                     " n=" + std::to_string(n) + " seed=" + std::to_string(seed));
        EXPECT_LT(e.q4_k, 0.125);
        EXPECT_LT(e.q5_k, 0.065);
        EXPECT_LT(e.q6_k, 0.042);
        EXPECT_LT(e.q4_k, e.q4_0);
        EXPECT_LT(e.q6_k, e.q5_k);
        EXPECT_LT(e.q6_k, 4.5 * e.q8_0);
        pooled.q4_1 += e.q4_1 * e.q4_1;
        pooled.q4_k += e.q4_k * e.q4_k;
        pooled.q5_1 += e.q5_1 * e.q5_1;
        pooled.q5_k += e.q5_k * e.q5_k;
      }
      EXPECT_LT(pooled.q4_k, 0.95 * pooled.q4_1);
      EXPECT_LT(pooled.q5_k, pooled.q5_1);
    }
  }
}

// ---- hand-built blocks against the layout ----

// Sub-block scales and mins with high bits set in sub-blocks 4..7, and their 12 bytes worked
// out by hand from ggml's packing: bytes 0..3 hold sc_0..3 in their low 6 bits and the top 2
// bits of sc_4..7 in their high 2; bytes 4..7 the same for the mins; bytes 8..11 hold the low
// 4 bits of sc_4..7 (low nibble) and of m_4..7 (high nibble).
constexpr uint8_t kHandScales[8] = {1, 2, 3, 4, 37, 58, 17, 63};
constexpr uint8_t kHandMins[8] = {5, 6, 7, 8, 28, 43, 48, 9};
constexpr uint8_t kHandPacked[kKScaleBytes] = {0x81, 0xC2, 0x43, 0xC4, 0x45, 0x86,
                                               0xC7, 0x08, 0xC5, 0xBA, 0x01, 0x9F};
constexpr uint16_t kHalfHalf = 0x3800, kHalfQuarter = 0x3400, kHalfEighth = 0x3000;

TEST(QuantizeK, HandBuiltScalesUnpack) {
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    ScaleMinK4(j, kHandPacked, &sc, &m);
    EXPECT_EQ(sc, kHandScales[j]) << j;
    EXPECT_EQ(m, kHandMins[j]) << j;
  }
}

TEST(QuantizeK, HandBuiltQ4_KDecodes) {
  BlockQ4_K b;
  b.d = kHalfHalf;
  b.dmin = kHalfQuarter;
  std::memcpy(b.scales, kHandPacked, kKScaleBytes);
  for (int i = 0; i < 128; ++i) b.qs[i] = static_cast<uint8_t>(i * 37 + 11);
  // Walk the bytes (the decoder walks the elements): byte i of qs[32 c ..] is element i of
  // sub-blocks 2c (low nibble) and 2c + 1 (high nibble).
  double want[256];
  for (int byte = 0; byte < 128; ++byte) {
    const int c = byte / 32, i = byte % 32;
    const int lo = b.qs[byte] & 0x0f, hi = b.qs[byte] >> 4;
    want[64 * c + i] = 0.5 * kHandScales[2 * c] * lo - 0.25 * kHandMins[2 * c];
    want[64 * c + 32 + i] = 0.5 * kHandScales[2 * c + 1] * hi - 0.25 * kHandMins[2 * c + 1];
  }
  std::vector<uint8_t> bytes(sizeof b);
  std::memcpy(bytes.data(), &b, sizeof b);
  const std::vector<float> y = Decode(DType::kQ4_K, bytes, 256);
  for (int e = 0; e < 256; ++e) EXPECT_EQ(y[e], want[e]) << e;  // all exact in float
}

TEST(QuantizeK, HandBuiltQ5_KDecodes) {
  BlockQ5_K b;
  b.d = kHalfHalf;
  b.dmin = kHalfQuarter;
  std::memcpy(b.scales, kHandPacked, kKScaleBytes);
  for (int i = 0; i < 128; ++i) b.qs[i] = static_cast<uint8_t>(i * 53 + 7);
  for (int i = 0; i < 32; ++i) b.qh[i] = static_cast<uint8_t>(i * 29 + 0x5a);
  int level[256];
  for (int byte = 0; byte < 128; ++byte) {
    const int c = byte / 32, i = byte % 32;
    level[64 * c + i] = b.qs[byte] & 0x0f;
    level[64 * c + 32 + i] = b.qs[byte] >> 4;
  }
  // Bit j of qh[i] is the fifth bit of element i of sub-block j.
  for (int i = 0; i < 32; ++i) {
    for (int j = 0; j < 8; ++j) level[32 * j + i] |= ((b.qh[i] >> j) & 1) << 4;
  }
  std::vector<uint8_t> bytes(sizeof b);
  std::memcpy(bytes.data(), &b, sizeof b);
  const std::vector<float> y = Decode(DType::kQ5_K, bytes, 256);
  int top_bits = 0;
  for (int e = 0; e < 256; ++e) {
    const int j = e / 32;
    EXPECT_EQ(y[e], 0.5 * kHandScales[j] * level[e] - 0.25 * kHandMins[j]) << e;
    top_bits += level[e] >> 4;
  }
  EXPECT_GT(top_bits, 64);  // the pattern does exercise the fifth bit
  EXPECT_LT(top_bits, 192);
}

TEST(QuantizeK, HandBuiltQ6_KDecodes) {
  constexpr int8_t kScales[16] = {-128, 127, -1,   1, 5,  -7, 64,  -64,
                                  3,    100, -100, 2, -2, 33, -33, 0};
  BlockQ6_K b;
  b.d = kHalfEighth;
  std::memcpy(b.scales, kScales, sizeof kScales);
  for (int i = 0; i < 128; ++i) b.ql[i] = static_cast<uint8_t>(i * 71 + 3);
  for (int i = 0; i < 64; ++i) b.qh[i] = static_cast<uint8_t>(i * 113 + 0x27);
  // Walk the bytes. ql: in half h (64 bytes), byte r holds element r % 32 + 32 (r / 32) in its
  // low nibble and that element + 64 in its high nibble. qh: in half h (32 bytes), bits 2t,
  // 2t + 1 of byte l are the top two bits of element l + 32 t.
  int level[256] = {};
  for (int byte = 0; byte < 128; ++byte) {
    const int h = byte / 64, r = byte % 64;
    const int e = 128 * h + r % 32 + 32 * (r / 32);
    level[e] |= b.ql[byte] & 0x0f;
    level[e + 64] |= b.ql[byte] >> 4;
  }
  for (int byte = 0; byte < 64; ++byte) {
    const int h = byte / 32, l = byte % 32;
    for (int t = 0; t < 4; ++t) level[128 * h + 32 * t + l] |= ((b.qh[byte] >> (2 * t)) & 3) << 4;
  }
  std::vector<uint8_t> bytes(sizeof b);
  std::memcpy(bytes.data(), &b, sizeof b);
  const std::vector<float> y = Decode(DType::kQ6_K, bytes, 256);
  for (int e = 0; e < 256; ++e) {
    EXPECT_EQ(y[e], 0.125 * kScales[e / 16] * (level[e] - 32)) << e;
    EXPECT_EQ(level[e], LevelQ6K(b, e)) << e;  // the element-wise reading used below agrees
  }
}

// ---- the encoder's choices ----

// Each element's stored level is the nearest one for its sub-block's stored scale (and min):
// the neighbouring levels, where they exist, are no closer.
TEST(QuantizeK, StoredLevelsAreNearestForStoredScales) {
  const int64_t n = 2048;
  const std::vector<float> x = Draw(Shape::kLaplace, n, 7);
  for (DType type : kKTypes) {
    SCOPED_TRACE(std::string(DTypeName(type)));
    const std::vector<uint8_t> bytes = Encode(type, x);
    const std::vector<float> y = Decode(type, bytes, n);
    for (int64_t blk = 0; blk < n / 256; ++blk) {
      for (int e = 0; e < 256; ++e) {
        const int64_t at = 256 * blk + e;
        float step, offset = 0.0f;  // y = step * (level - zero) - offset
        int level, zero = 0, top;
        if (type == DType::kQ6_K) {
          const auto b = BlockAt<BlockQ6_K>(bytes, blk);
          step = F16ToF32(b.d) * b.scales[e / 16];
          level = LevelQ6K(b, e);
          zero = 32;
          top = 63;
        } else {
          uint8_t sc, m;
          if (type == DType::kQ4_K) {
            const auto b = BlockAt<BlockQ4_K>(bytes, blk);
            ScaleMinK4(e / 32, b.scales, &sc, &m);
            step = F16ToF32(b.d) * sc;
            offset = F16ToF32(b.dmin) * m;
            level = LowNibbleK(b.qs, e);
            top = 15;
          } else {
            const auto b = BlockAt<BlockQ5_K>(bytes, blk);
            ScaleMinK4(e / 32, b.scales, &sc, &m);
            step = F16ToF32(b.d) * sc;
            offset = F16ToF32(b.dmin) * m;
            level = LowNibbleK(b.qs, e) | (FifthBitK(b.qh, e) << 4);
            top = 31;
          }
        }
        ASSERT_EQ(y[at], step * static_cast<float>(level - zero) - offset) << "element " << at;
        if (step == 0.0f) continue;
        const double here = std::fabs(double{x[at]} - y[at]);
        // The encoder rounds (x + offset) / step in float, and the neighbours' values are
        // rounded to float too.
        const double slack = 1e-5 * std::fabs(step) + 1e-6 * (std::fabs(y[at]) + offset);
        if (level > 0) {
          EXPECT_LE(here, std::fabs(x[at] - (double{y[at]} - step)) + slack) << "element " << at;
        }
        if (level < top) {
          EXPECT_LE(here, std::fabs(x[at] - (double{y[at]} + step)) + slack) << "element " << at;
        }
      }
    }
  }
}

// Re-encoding a decoded row: the values already lie on the blocks' grids, which the encoder
// mostly finds again. Bounds: the worst over 200 seeds plus a margin (Q5_K, whose sub-blocks
// often leave a few of their 32 levels unused, finds them least often).
TEST(QuantizeK, ReEncodingADecodedRowChangesItLittle) {
  const double max_added_error[] = {0.10, 0.25, 0.15};  // of the first round's, in RMS
  const double min_unchanged[] = {0.70, 0.65, 0.97};    // fraction of values kept exactly
  for (int t = 0; t < 3; ++t) {
    const DType type = kKTypes[t];
    for (uint32_t seed = 21; seed <= 23; ++seed) {
      const std::vector<float> x = Draw(Shape::kGaussian, 4096, seed);
      const std::vector<float> once = RoundTrip(type, x);
      const std::vector<float> twice = RoundTrip(type, once);
      int64_t unchanged = 0;
      for (size_t i = 0; i < x.size(); ++i) unchanged += once[i] == twice[i];
      SCOPED_TRACE(std::string(DTypeName(type)) + " seed=" + std::to_string(seed));
      EXPECT_LT(RelativeRms(once, twice), max_added_error[t] * RelativeRms(x, once));
      EXPECT_GT(unchanged, min_unchanged[t] * x.size());
    }
  }
}

TEST(QuantizeK, DeterministicAndBlockByBlock) {
  const std::vector<float> x = Draw(Shape::kStudentT3, 768, 31);
  for (DType type : kKTypes) {
    const std::vector<uint8_t> whole = Encode(type, x);
    EXPECT_EQ(Encode(type, x), whole) << DTypeName(type);
    const size_t block_bytes = StorageBytes(type, 256);
    for (int blk = 0; blk < 3; ++blk) {
      const std::vector<float> part(x.begin() + 256 * blk, x.begin() + 256 * (blk + 1));
      EXPECT_EQ(Encode(type, part), std::vector<uint8_t>(whole.begin() + block_bytes * blk,
                                                         whole.begin() + block_bytes * (blk + 1)))
          << DTypeName(type) << " block " << blk;
    }
  }
}

// Scaling the input by a power of two (keeping the f16 scales normal) scales the output
// exactly: the search does not depend on the magnitude of the data.
TEST(QuantizeK, PowerOfTwoScalingCommutes) {
  const std::vector<float> x = Draw(Shape::kGaussian, 512, 41);
  for (DType type : kKTypes) {
    const std::vector<float> y = RoundTrip(type, x);
    for (float factor : {0.25f, 16.0f}) {
      std::vector<float> scaled(x);
      for (float& v : scaled) v *= factor;
      const std::vector<float> ys = RoundTrip(type, scaled);
      for (size_t i = 0; i < x.size(); ++i) {
        ASSERT_EQ(ys[i], y[i] * factor) << DTypeName(type) << " factor " << factor << " at " << i;
      }
    }
  }
}

// ---- edge cases ----

TEST(QuantizeK, ZerosDecodeToZeros) {
  const std::vector<float> x(512, 0.0f);
  for (DType type : kKTypes) {
    const std::vector<float> y = RoundTrip(type, x);
    for (float v : y) ASSERT_EQ(v, 0.0f) << DTypeName(type);
  }
}

// (Constants whose f16 scales are normal halves: below about 0.25, Q6_K's d = c / 4096 is a
// subnormal half with fewer significant bits.)
TEST(QuantizeK, ConstantBlocksReconstruct) {
  for (float c : {0.37f, -0.37f, 1000.0f, -2.5f, 3e4f, -3e4f}) {
    const std::vector<float> x(256, c);
    for (DType type : kKTypes) {
      const std::vector<float> y = RoundTrip(type, x);
      for (float v : y) {
        // The f16 scale's precision (2^-11) is what is left.
        ASSERT_NEAR(v, c, 1e-3 * std::fabs(c)) << DTypeName(type) << " c=" << c;
      }
    }
  }
}

// Data of one sign: Q4_K / Q5_K cannot store a positive minimum, so all-positive data use only
// the upper levels; all-negative data use them all.
TEST(QuantizeK, OneSignedData) {
  Source source(51);
  std::vector<float> positive(512), negative(512);
  for (float& v : positive) v = static_cast<float>(1.0 + source.Uniform());
  for (float& v : negative) v = static_cast<float>(-1.0 - source.Uniform());
  // Measured: Q4_K 0.0218 and 0.0107, Q5_K 0.0110 and 0.0054, Q6_K 0.0099 and 0.0098 (Q4_1:
  // 0.0112 and 0.0116).
  const double bounds_positive[] = {0.025, 0.013, 0.011};  // Q4_K, Q5_K, Q6_K
  const double bounds_negative[] = {0.012, 0.0062, 0.011};
  for (int t = 0; t < 3; ++t) {
    const DType type = kKTypes[t];
    EXPECT_LT(RelativeRms(positive, RoundTrip(type, positive)), bounds_positive[t])
        << DTypeName(type);
    EXPECT_LT(RelativeRms(negative, RoundTrip(type, negative)), bounds_negative[t])
        << DTypeName(type);
  }
}

// One huge value: the other sub-blocks' scales round to little or nothing next to its own
// (a limit of the format), but all stays finite, the outlier itself survives and nothing
// strays outside the data's range.
TEST(QuantizeK, SingleHugeOutlier) {
  std::vector<float> x = Draw(Shape::kGaussian, 512, 61);
  x[37] = 1000.0f;
  x[300] = -1000.0f;
  for (DType type : kKTypes) {
    const std::vector<float> y = RoundTrip(type, x);
    ASSERT_TRUE(AllFinite(y)) << DTypeName(type);
    EXPECT_NEAR(y[37], 1000.0f, 5.0f) << DTypeName(type);
    EXPECT_NEAR(y[300], -1000.0f, 5.0f) << DTypeName(type);
    for (size_t i = 0; i < x.size(); ++i) {
      if (i == 37 || i == 300) continue;
      EXPECT_LT(std::fabs(y[i] - x[i]), 5.0f) << DTypeName(type) << " at " << i;
    }
  }
}

TEST(QuantizeK, TinyValuesStayTinyAndFinite) {
  for (float scale : {1e-30f, 1e-40f /* subnormal */}) {
    std::vector<float> x = Draw(Shape::kGaussian, 256, 71);
    float amax = 0.0f;
    for (float& v : x) {
      v *= scale;
      amax = std::max(amax, std::fabs(v));
    }
    for (DType type : kKTypes) {
      const std::vector<float> y = RoundTrip(type, x);
      for (float v : y) {
        ASSERT_TRUE(std::isfinite(v)) << DTypeName(type);
        ASSERT_LE(std::fabs(v), amax) << DTypeName(type);  // f16 has no such scale: zeros
      }
    }
  }
}

// Values whose scale d would overflow f16: the scales clamp to the largest half (no inf), so the
// output saturates with the right signs.
TEST(QuantizeK, HugeValuesClampTheScales) {
  for (float scale : {1e8f, 1e30f, 3e38f}) {
    std::vector<float> x = Draw(Shape::kGaussian, 512, 81);
    float amax = 0.0f;
    for (float& v : x) {
      v = std::clamp(v * scale, -FLT_MAX, FLT_MAX);
      amax = std::max(amax, std::fabs(v));
    }
    for (DType type : kKTypes) {
      SCOPED_TRACE(std::string(DTypeName(type)) + " scale " + std::to_string(scale));
      const std::vector<uint8_t> bytes = Encode(type, x);
      for (int blk = 0; blk < 2; ++blk) {
        std::vector<uint16_t> halves;
        if (type == DType::kQ4_K) {
          const auto b = BlockAt<BlockQ4_K>(bytes, blk);
          halves = {b.d, b.dmin};
        } else if (type == DType::kQ5_K) {
          const auto b = BlockAt<BlockQ5_K>(bytes, blk);
          halves = {b.d, b.dmin};
        } else {
          halves = {BlockAt<BlockQ6_K>(bytes, blk).d};
        }
        for (uint16_t h : halves) EXPECT_TRUE(std::isfinite(F16ToF32(h))) << blk;
      }
      const std::vector<float> y = Decode(type, bytes, 512);
      ASSERT_TRUE(AllFinite(y));
      for (size_t i = 0; i < x.size(); ++i) {
        if (std::fabs(x[i]) > 0.25f * amax) {
          EXPECT_EQ(y[i] > 0, x[i] > 0) << "at " << i;
        }
      }
    }
  }
}

// NaN and inf: garbage out is allowed, but no crash (run under the sanitizers to check for
// undefined behaviour), and the blocks without them are unaffected.
TEST(QuantizeK, NonFiniteInputStaysInItsBlock) {
  const std::vector<float> clean = Draw(Shape::kGaussian, 768, 91);
  std::vector<float> x = clean;
  x[5] = std::numeric_limits<float>::quiet_NaN();
  x[100] = std::numeric_limits<float>::infinity();
  x[200] = -std::numeric_limits<float>::infinity();
  std::vector<float> all_nan(256, std::numeric_limits<float>::quiet_NaN());
  std::vector<float> all_inf(256, std::numeric_limits<float>::infinity());
  for (DType type : kKTypes) {
    const std::vector<uint8_t> dirty = Encode(type, x), tidy = Encode(type, clean);
    const size_t block_bytes = StorageBytes(type, 256);
    EXPECT_TRUE(std::equal(dirty.begin() + block_bytes, dirty.end(), tidy.begin() + block_bytes))
        << DTypeName(type);
    Decode(type, dirty, 768);
    Decode(type, Encode(type, all_nan), 256);
    Decode(type, Encode(type, all_inf), 256);
  }
}

}  // namespace
}  // namespace aviary
