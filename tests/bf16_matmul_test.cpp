// The bfloat16-dot-product MatMul (bf16_matmul.h) for F16 and BF16 weights:
//  - the rounding of one float to bfloat16 (nearest, ties to even; subnormals to zero; NaN,
//    infinities, overflow), and the vector rounding of whole activation rows equal to it;
//  - the AVX512_BF16 kernels against the scalar definition of the same arithmetic
//    (|fast - def| <= 1e-5 * sum_c |w_c x_c|: the same exact products, summed in float);
//  - that definition against the float reference within the rounding bound
//    sum_c |w_c x_c| * (2^-7 + 2^-16) (F16 weights and activations each rounded by <= 2^-8);
//  - results independent of T and of the thread count, bit for bit, on odd shapes;
//  - the switch (the runtime's Activations) and its effect on the dispatching MatMul.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "tensor/bf16_matmul.h"
#include "tensor/dtype.h"
#include "tensor/kernels.h"
#include "tensor/reference.h"
#include "tensor/tensor.h"
#include "tensor/thread_pool.h"
#include "tensor_fixtures.h"
#include "test_data.h"

namespace {

using aviary::DType;
namespace bf16 = aviary::bf16;
using aviary::testing::MakeTensor;
using aviary::testing::RandomMatrix;

// Restores the kernels' runtime options after a test.
using Guard = aviary::testing::RuntimeGuard;

float Bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(Bf16MatMul, RoundsToNearestEvenAndFlushesSubnormals) {
  EXPECT_EQ(bf16::Round(1.0f), 0x3f80);
  EXPECT_EQ(bf16::Round(-2.0f), 0xc000);
  // bfloat16 keeps 7 mantissa bits: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 (to even: 1);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6 (to even: 1 + 2^-6).
  EXPECT_EQ(bf16::Round(1.0f + 0x1p-8f), 0x3f80);
  EXPECT_EQ(bf16::Round(1.0f + 3 * 0x1p-8f), 0x3f82);
  EXPECT_EQ(bf16::Round(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81);  // above halfway: up
  EXPECT_EQ(bf16::Round(Bits(0x00000001u)), 0x0000);          // subnormals read as zero, sign kept
  EXPECT_EQ(bf16::Round(Bits(0x807fffffu)), 0x8000);
  EXPECT_EQ(bf16::Round(std::numeric_limits<float>::min()), 0x0080);  // smallest normal stays
  EXPECT_EQ(bf16::Round(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(bf16::Round(std::numeric_limits<float>::max()), 0x7f80);  // rounds up to infinity
  EXPECT_TRUE(std::isnan(bf16::Widen(bf16::Round(std::nanf("")))));
  EXPECT_TRUE(std::isnan(bf16::Widen(bf16::Round(Bits(0x7f800001u)))));  // signalling NaN stays NaN
  EXPECT_EQ(bf16::Widen(0x3f82), 1.0f + 0x1p-6f);
}

TEST(Bf16MatMul, ActivationRowsRoundAsOneValueDoes) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t cols : {1, 5, 31, 32, 33, 64, 100, 768}) {
    const int T = 3;
    std::vector<float> x(static_cast<size_t>(T) * cols);
    for (size_t i = 0; i < x.size(); ++i) {
      switch (rng() % 8) {
        case 0: x[i] = Bits(static_cast<uint32_t>(rng()) & 0x807fffffu); break;  // subnormal
        case 1: x[i] = 1.0f + static_cast<float>(rng() % 256) * 0x1p-8f; break;  // ties
        case 2: x[i] = normal(rng) * 1e30f; break;
        default: x[i] = normal(rng); break;
      }
    }
    x[0] = std::numeric_limits<float>::infinity();
    bf16::Activations a;
    bf16::RoundActivations(x.data(), T, cols, &a);
    ASSERT_EQ(a.padded_cols % 32, 0);
    ASSERT_GE(a.padded_cols, cols);
    for (int t = 0; t < T; ++t) {
      for (int64_t c = 0; c < a.padded_cols; ++c) {
        const uint16_t want = c < cols ? bf16::Round(x[t * cols + c]) : 0;
        ASSERT_EQ(a.at(t)[c], want) << "cols " << cols << " t " << t << " c " << c << " x "
                                    << (c < cols ? x[t * cols + c] : 0.0f);
      }
    }
  }
}

TEST(Bf16MatMul, KernelsMatchTheirDefinitionWhichIsWithinTheRoundingBound) {
  Guard guard;
  std::mt19937 rng(21);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::cout << "[ bf16     ] AVX512_BF16 " << (bf16::CpuSupported() ? "present" : "absent")
            << ": the fast MatMul " << (bf16::CpuSupported() ? "uses" : "cannot use")
            << " bfloat16 dot products for F16/BF16\n";
  double worst_kernel = 0, worst_bound = 0;
  int checked = 0;
  for (DType type : {DType::kF16, DType::kBF16}) {
    // Rounding F16 weights adds its own 2^-8; BF16 weights are used as they are.
    const double unit = type == DType::kF16 ? 0x1p-7 + 0x1p-16 : 0x1p-8;
    for (int64_t rows : {1, 3, 5, 6, 7, 13, 40}) {
      for (int64_t cols : {1, 17, 32, 33, 64, 100, 256}) {
        const std::vector<uint8_t> bytes = RandomMatrix(type, rows, cols, rng);
        const aviary::Tensor w = MakeTensor(type, rows, cols, bytes.data());
        std::vector<float> wf(static_cast<size_t>(rows * cols));
        for (int64_t r = 0; r < rows; ++r)
          aviary::DequantizeRow(type, w.row(r), &wf[r * cols], cols);
        for (int T : {1, 2, 5, 9}) {
          SCOPED_TRACE(std::string(aviary::DTypeName(type)) + " " + std::to_string(rows) + "x" +
                       std::to_string(cols) + " T=" + std::to_string(T));
          std::vector<float> x(static_cast<size_t>(T) * cols);
          for (auto& v : x) v = normal(rng) * (rng() % 4 == 0 ? 30.0f : 1.0f);
          std::vector<float> def(static_cast<size_t>(T) * rows), flt(def.size());
          bf16::ReferenceMatMul(w, x.data(), T, def.data());
          aviary::ref::MatMul(w, x.data(), T, flt.data());
          for (int t = 0; t < T; ++t) {
            for (int64_t r = 0; r < rows; ++r) {
              double mag = 0;
              for (int64_t c = 0; c < cols; ++c)
                mag += std::fabs(wf[r * cols + c] * x[t * cols + c]);
              const size_t i = static_cast<size_t>(t) * rows + r;
              const double err = std::fabs(static_cast<double>(def[i]) - flt[i]);
              ASSERT_LE(err, mag * (unit + 1e-5) + 1e-30)
                  << "def " << def[i] << " float " << flt[i];
              if (mag > 0) worst_bound = std::max(worst_bound, err / (mag * unit));
            }
          }
          if (!bf16::CpuSupported()) {
            ++checked;
            continue;
          }
          aviary::testing::SetBf16Activations(true);
          std::vector<float> fast1(def.size()), fast2(def.size()), fast3(def.size());
          aviary::fast::MatMul(w, x.data(), T, fast1.data(), 1);
          aviary::fast::MatMul(w, x.data(), T, fast2.data(), 2);
          aviary::testing::SetNumThreads(3);
          aviary::fast::MatMul(w, x.data(), T, fast3.data(), 3);
          ASSERT_TRUE(BitEqual(fast1, fast2)) << "result depends on the thread count";
          ASSERT_TRUE(BitEqual(fast1, fast3)) << "result depends on the thread count";
          for (int t = 0; t < T; ++t) {
            for (int64_t r = 0; r < rows; ++r) {
              double mag = 0;
              for (int64_t c = 0; c < cols; ++c) {
                mag += std::fabs(bf16::Widen(bf16::Round(wf[r * cols + c])) *
                                 bf16::Widen(bf16::Round(x[t * cols + c])));
              }
              const size_t i = static_cast<size_t>(t) * rows + r;
              const double err = std::fabs(static_cast<double>(fast1[i]) - def[i]);
              ASSERT_LE(err, 1e-5 * mag + 1e-30)
                  << "t " << t << " r " << r << " def " << def[i] << " fast " << fast1[i];
              if (mag > 0) worst_kernel = std::max(worst_kernel, err / mag);
            }
          }
          if (T > 1) {
            std::vector<float> single(def.size());
            for (int t = 0; t < T; ++t) {
              aviary::fast::MatMul(w, x.data() + t * cols, 1, single.data() + t * rows, 2);
            }
            ASSERT_TRUE(BitEqual(fast1, single)) << "result depends on T";
          }
          ++checked;
        }
      }
    }
  }
  std::cout << "[ bf16     ] " << checked
            << " cases; kernels vs definition: worst |d| / sum|w x| = " << worst_kernel
            << "; definition vs float: worst error / bound = " << worst_bound << "\n";
  EXPECT_GT(checked, 0);
}

// A long sequence-mode product (T = 64, the models' chunk) over every tile path: 6-row tiles
// with 1-5 rows left, 4-token tiles with 1-3 tokens left, and rows longer than 2048 columns,
// which are walked in spans of 2048 with the accumulators carried between them (4100 columns:
// two whole spans and a last one of 4 columns, zero-padded).
TEST(Bf16MatMul, LongChunksEqualOneTokenAtATime) {
  Guard guard;
  if (!bf16::CpuSupported()) GTEST_SKIP() << "no AVX512_BF16 on this CPU: the float path runs";
  aviary::testing::SetBf16Activations(true);
  std::mt19937 rng(9);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t cols : {96, 4100}) {
    for (int64_t rows : {48, 52, 53, 71}) {
      for (int T : {64, 63, 62, 61}) {
        const std::vector<uint8_t> bytes = RandomMatrix(DType::kF16, rows, cols, rng);
        const aviary::Tensor w = MakeTensor(DType::kF16, rows, cols, bytes.data());
        std::vector<float> x(static_cast<size_t>(T) * cols);
        for (auto& v : x) v = normal(rng);
        std::vector<float> all(static_cast<size_t>(T) * rows), single(all.size());
        aviary::fast::MatMul(w, x.data(), T, all.data(), 2);
        for (int t = 0; t < T; ++t) {
          aviary::fast::MatMul(w, x.data() + t * cols, 1, single.data() + t * rows, 1);
        }
        EXPECT_TRUE(BitEqual(all, single)) << rows << " x " << cols << ", T " << T;
      }
    }
  }
}

TEST(Bf16MatMul, DispatchingMatMulUsesItOnlyWhenEnabled) {
  Guard guard;
  aviary::testing::SetBf16Activations(false);
  EXPECT_FALSE(bf16::Enabled());
  aviary::testing::SetBf16Activations(true);
  EXPECT_EQ(bf16::Enabled(), bf16::CpuSupported());
  EXPECT_TRUE(bf16::SupportsType(DType::kF16));
  EXPECT_TRUE(bf16::SupportsType(DType::kBF16));
  EXPECT_FALSE(bf16::SupportsType(DType::kF32));  // F32 matrices stay exact
  EXPECT_FALSE(bf16::SupportsType(DType::kQ8_0));
  if (!bf16::CpuSupported()) GTEST_SKIP() << "no AVX512_BF16 on this CPU: the float path runs";
  std::mt19937 rng(8);
  const std::vector<uint8_t> bytes = RandomMatrix(DType::kF16, 24, 160, rng);
  const aviary::Tensor w = MakeTensor(DType::kF16, 24, 160, bytes.data());
  std::vector<float> x(3 * 160);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto& v : x) v = normal(rng);
  std::vector<float> def(72), flt(72), y(72);
  bf16::ReferenceMatMul(w, x.data(), 3, def.data());
  aviary::ref::MatMul(w, x.data(), 3, flt.data());
  aviary::testing::SetKernels(aviary::Kernels::kFast);
  auto rel = [](float a, float b) {
    return std::fabs(static_cast<double>(a) - b) / (1 + std::fabs(b));
  };
  aviary::MatMul(w, x.data(), 3, y.data());
  double d_bf16 = 0, d_float = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    d_bf16 = std::max(d_bf16, rel(y[i], def[i]));
    d_float = std::max(d_float, rel(y[i], flt[i]));
  }
  EXPECT_LT(d_bf16, 1e-5);
  EXPECT_GT(d_float, 1e-4) << "bfloat16 products should move the result measurably";
  aviary::testing::SetBf16Activations(false);
  aviary::MatMul(w, x.data(), 3, y.data());
  for (size_t i = 0; i < y.size(); ++i) EXPECT_LT(rel(y[i], flt[i]), 1e-5);
  // The reference kernels never round.
  aviary::testing::SetBf16Activations(true);
  aviary::testing::SetKernels(aviary::Kernels::kReference);
  aviary::MatMul(w, x.data(), 3, y.data());
  EXPECT_TRUE(BitEqual(y, flt));
}

}  // namespace
