// The 8-bit-activation MatMul (int8_matmul.h) for the quantized types:
//  - the AVX-512 VNNI kernels against the scalar definition of the same arithmetic
//    (|fast - ref| <= 1e-5 * sum_c |w_c x_c|: both add the same exact integer block sums,
//    scaled in a different order);
//  - that definition against the float reference within the rounding bound
//    sum_c |w_c| * d_x(c) / 2 (each activation moves by at most half its block's step);
//  - results independent of T and of the thread count, bit for bit;
//  - the switch (the runtime's Activations) and its effect on the dispatching MatMul.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "tensor/dtype.h"
#include "tensor/int8_matmul.h"
#include "tensor/kernels.h"
#include "tensor/reference.h"
#include "tensor/tensor.h"
#include "tensor/thread_pool.h"
#include "tensor_fixtures.h"
#include "test_data.h"

namespace {

using aviary::DType;
namespace int8 = aviary::int8;
using aviary::testing::MakeTensor;
using aviary::testing::RandomMatrix;  // random quants (Q8_0 includes -128), scales of either sign

const DType kQuantTypes[] = {DType::kQ4_0, DType::kQ4_1, DType::kQ5_0, DType::kQ5_1,
                             DType::kQ8_0, DType::kQ4_K, DType::kQ5_K};

// Restores the kernels' runtime options after a test.
using Guard = aviary::testing::RuntimeGuard;

// Activations with blocks of very different magnitudes, zero blocks and exact ties (x / d on
// a .5) so the rounding rule is exercised.
std::vector<float> Activations(int T, int64_t cols, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(T) * cols);
  for (size_t b = 0; b < x.size() / 32; ++b) {
    const int kind = static_cast<int>(rng() % 8);
    const float scale = kind == 0 ? 0.0f : kind == 1 ? 1e-3f : kind == 2 ? 40.0f : 1.0f;
    for (int i = 0; i < 32; ++i) x[b * 32 + i] = normal(rng) * scale;
    if (kind == 3) {  // max 127: every multiple of 0.5 is a tie or exact
      for (int i = 0; i < 32; ++i)
        x[b * 32 + i] = static_cast<float>(static_cast<int>(rng() % 255) - 127) * 0.5f;
      x[b * 32] = 127.0f;
    }
  }
  return x;
}

bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(Int8MatMul, SwitchFollowsTheRuntimeAndTheCpu) {
  Guard guard;
  aviary::testing::SetInt8Activations(false);
  EXPECT_FALSE(int8::Enabled());
  aviary::testing::SetInt8Activations(true);
  EXPECT_EQ(int8::Enabled(), int8::CpuSupported());
  EXPECT_TRUE(int8::SupportsType(DType::kQ5_1));
  EXPECT_TRUE(int8::SupportsType(DType::kQ4_K));
  EXPECT_FALSE(int8::SupportsType(DType::kQ6_K));  // 16-weight sub-blocks: the float path
  EXPECT_FALSE(int8::SupportsType(DType::kF16));
  std::cout << "[ int8     ] AVX-512 VNNI " << (int8::CpuSupported() ? "present" : "absent")
            << ": the fast MatMul " << (int8::CpuSupported() ? "uses" : "cannot use")
            << " 8-bit activations\n";
}

TEST(Int8MatMul, QuantizeRoundsPerBlock) {
  // Any machine: Quantize is the SIMD or scalar version; both follow the header's rule.
  std::mt19937 rng(3);
  const int64_t cols = 96;  // 3 blocks -> padded to 16
  const std::vector<float> x = Activations(2, cols, rng);
  int8::Activations a;
  int8::Quantize(x.data(), 2, cols, &a);
  ASSERT_EQ(a.blocks, 3);
  ASSERT_EQ(a.padded_blocks, 16);
  for (int t = 0; t < 2; ++t) {
    for (int64_t b = 0; b < 16; ++b) {
      const float* xb = x.data() + t * cols + b * 32;
      float amax = 0;
      if (b < 3) {
        for (int i = 0; i < 32; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
      }
      const float d = amax / 127.0f;
      EXPECT_EQ(a.d_at(t)[b], d) << "t " << t << " block " << b;
      int32_t sum = 0;
      for (int i = 0; i < 32; ++i) {
        const int8_t q = a.q_at(t)[b * 32 + i];
        sum += q;
        if (b >= 3) {
          EXPECT_EQ(q, 0) << "padding";
          continue;
        }
        const float want = d == 0 ? 0.0f : std::nearbyint(xb[i] * (1.0f / d));
        EXPECT_EQ(q, static_cast<int8_t>(want)) << "t " << t << " b " << b << " i " << i;
        EXPECT_LE(std::fabs(static_cast<double>(q) * d - xb[i]), 0.5 * d * (1 + 1e-6) + 1e-30);
      }
      EXPECT_EQ(a.sums_at(t)[b], sum);
      EXPECT_EQ(a.ds_at(t)[b], d * static_cast<float>(sum));
    }
  }
  if (!int8::CpuSupported()) return;  // the regrouped copy is made for the VNNI kernels
  for (int t = 0; t < 2; ++t) {
    for (int64_t b = 0; b < 16; ++b) {
      for (int i = 0; i < 32; ++i) {  // block b's byte i: group 0, step i / 4, lane b
        ASSERT_EQ(a.qt_at(t)[(i / 4) * 64 + b * 4 + i % 4], a.q_at(t)[b * 32 + i]);
      }
    }
  }
}

// The kernels add the same exact integer block sums as the definition and differ only in the
// order of the float scaling: |fast - def| <= 1e-5 sum_c |w_c q_c d_c| for every output, where
// wf is the dequantized rows x cols matrix and q, d the activations' rounding of x. `worst`
// (if given) keeps the largest |fast - def| / sum seen.
::testing::AssertionResult WithinFloatRoundingOfDefinition(
    const std::vector<float>& wf, const int8::Activations& a, int T, int64_t rows, int64_t cols,
    const std::vector<float>& fast, const std::vector<float>& def, double* worst = nullptr) {
  for (int t = 0; t < T; ++t) {
    for (int64_t r = 0; r < rows; ++r) {
      double mag = 0;
      for (int64_t c = 0; c < cols; ++c) {
        mag += std::fabs(static_cast<double>(wf[r * cols + c]) * a.q_at(t)[c] * a.d_at(t)[c / 32]);
      }
      const size_t i = static_cast<size_t>(t) * rows + r;
      const double err = std::fabs(static_cast<double>(fast[i]) - def[i]);
      if (err > 1e-5 * mag + 1e-30) {
        return ::testing::AssertionFailure() << "t " << t << " r " << r << " def " << def[i]
                                             << " fast " << fast[i] << " (sum " << mag << ")";
      }
      if (worst && mag > 0) *worst = std::max(*worst, err / mag);
    }
  }
  return ::testing::AssertionSuccess();
}

TEST(Int8MatMul, MatchesDefinitionAndFloatWithinTheRoundingBound) {
  Guard guard;
  std::mt19937 rng(21);
  double worst_kernel = 0, worst_bound = 0;
  int checked = 0;
  for (DType type : kQuantTypes) {
    for (int64_t rows : {1, 3, 4, 5, 13, 64, 101}) {
      // K-quants: whole super-blocks; 768 and 2304 leave half a group of 16 blocks empty.
      const std::vector<int64_t> col_list = aviary::Traits(type).block_elems == aviary::kQKBlock
                                                ? std::vector<int64_t>{256, 768, 2304}
                                                : std::vector<int64_t>{32, 64, 96, 544, 1024, 2592};
      for (int64_t cols : col_list) {
        const std::vector<uint8_t> bytes = RandomMatrix(type, rows, cols, rng);
        const aviary::Tensor w = MakeTensor(type, rows, cols, bytes.data());
        std::vector<float> wf(static_cast<size_t>(rows * cols));
        for (int64_t r = 0; r < rows; ++r)
          aviary::DequantizeRow(type, w.row(r), &wf[r * cols], cols);
        for (int T : {1, 2, 5, 64}) {
          SCOPED_TRACE(std::string(aviary::DTypeName(type)) + " " + std::to_string(rows) + "x" +
                       std::to_string(cols) + " T=" + std::to_string(T));
          const std::vector<float> x = Activations(T, cols, rng);
          std::vector<float> def(static_cast<size_t>(T) * rows), flt(def.size());
          int8::ReferenceMatMul(w, x.data(), T, def.data());
          aviary::ref::MatMul(w, x.data(), T, flt.data());
          int8::Activations a;
          int8::Quantize(x.data(), T, cols, &a);
          for (int t = 0; t < T; ++t) {
            for (int64_t r = 0; r < rows; ++r) {
              double mag = 0, bound = 0;
              for (int64_t c = 0; c < cols; ++c) {
                const double wc = wf[r * cols + c];
                mag += std::fabs(wc * x[t * cols + c]);
                bound += std::fabs(wc) * a.d_at(t)[c / 32] / 2;
              }
              const size_t i = static_cast<size_t>(t) * rows + r;
              const double err = std::fabs(static_cast<double>(def[i]) - flt[i]);
              ASSERT_LE(err, bound * (1 + 1e-5) + 2e-5 * mag + 1e-30)
                  << "t " << t << " r " << r << " int8 " << def[i] << " float " << flt[i];
              if (bound > 0) worst_bound = std::max(worst_bound, err / (bound + 2e-5 * mag));
            }
          }
          if (!int8::CpuSupported()) {
            ++checked;
            continue;
          }
          aviary::testing::SetInt8Activations(true);
          aviary::testing::SetNumThreads(2);
          std::vector<float> fast1(def.size()), fast2(def.size());
          aviary::fast::MatMul(w, x.data(), T, fast1.data(), 1);
          aviary::fast::MatMul(w, x.data(), T, fast2.data(), 2);
          ASSERT_TRUE(BitEqual(fast1, fast2)) << "result depends on the thread count";
          ASSERT_TRUE(
              WithinFloatRoundingOfDefinition(wf, a, T, rows, cols, fast1, def, &worst_kernel));
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
  std::cout << "[ int8     ] " << checked
            << " cases; VNNI vs definition: worst |d| / sum|w x| = " << worst_kernel
            << "; definition vs float: worst error / bound = " << worst_bound << "\n";
  EXPECT_GT(checked, 0);
}

// Rows longer than one span of the T > 1 kernel (8 groups of 16 blocks = 4096 columns) are
// walked span by span with the accumulators parked between spans: the results must still be
// the one-token kernel's (which never splits a row) bit for bit, and the definition's within
// float rounding. 5 rows: one full pass of 4 and a pass with 1 valid row.
TEST(Int8MatMul, LongRowsInSpansMatchOneTokenAtATime) {
  Guard guard;
  if (!int8::CpuSupported()) GTEST_SKIP() << "no AVX-512 VNNI on this CPU: the float path runs";
  aviary::testing::SetInt8Activations(true);
  aviary::testing::SetNumThreads(2);
  std::mt19937 rng(34);
  const int64_t rows = 5;
  for (DType type : kQuantTypes) {
    // 9 groups (a span and a one-group rest) and 17 (two spans and a rest, the last part-empty).
    const std::vector<int64_t> col_list = aviary::Traits(type).block_elems == aviary::kQKBlock
                                              ? std::vector<int64_t>{4352, 8448}
                                              : std::vector<int64_t>{4128, 8224};
    for (int64_t cols : col_list) {
      SCOPED_TRACE(std::string(aviary::DTypeName(type)) + " cols " + std::to_string(cols));
      const std::vector<uint8_t> bytes = RandomMatrix(type, rows, cols, rng);
      const aviary::Tensor w = MakeTensor(type, rows, cols, bytes.data());
      const int T = 7;
      const std::vector<float> x = Activations(T, cols, rng);
      std::vector<float> def(static_cast<size_t>(T) * rows), fast(def.size()), single(def.size());
      int8::ReferenceMatMul(w, x.data(), T, def.data());
      aviary::fast::MatMul(w, x.data(), T, fast.data(), 2);
      for (int t = 0; t < T; ++t) {
        aviary::fast::MatMul(w, x.data() + t * cols, 1, single.data() + t * rows, 1);
      }
      ASSERT_TRUE(BitEqual(fast, single)) << "result depends on T";
      int8::Activations a;
      int8::Quantize(x.data(), T, cols, &a);
      std::vector<float> wf(static_cast<size_t>(rows * cols));
      for (int64_t r = 0; r < rows; ++r) aviary::DequantizeRow(type, w.row(r), &wf[r * cols], cols);
      ASSERT_TRUE(WithinFloatRoundingOfDefinition(wf, a, T, rows, cols, fast, def));
    }
  }
}

TEST(Int8MatMul, DispatchingMatMulUsesItOnlyWhenEnabled) {
  Guard guard;
  if (!int8::CpuSupported()) GTEST_SKIP() << "no AVX-512 VNNI on this CPU: the float path runs";
  std::mt19937 rng(8);
  const std::vector<uint8_t> bytes = RandomMatrix(DType::kQ5_1, 24, 160, rng);
  const aviary::Tensor w = MakeTensor(DType::kQ5_1, 24, 160, bytes.data());
  const std::vector<float> x = Activations(3, 160, rng);
  std::vector<float> def(72), flt(72), y(72);
  int8::ReferenceMatMul(w, x.data(), 3, def.data());
  aviary::ref::MatMul(w, x.data(), 3, flt.data());
  aviary::testing::SetKernels(aviary::Kernels::kFast);
  aviary::testing::SetInt8Activations(true);
  aviary::MatMul(w, x.data(), 3, y.data());
  // Relative differences: some blocks of x are large (40 sigma).
  auto rel = [](float a, float b) {
    return std::fabs(static_cast<double>(a) - b) / (1 + std::fabs(b));
  };
  double d_int8 = 0, d_float = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    d_int8 = std::max(d_int8, rel(y[i], def[i]));
    d_float = std::max(d_float, rel(y[i], flt[i]));
  }
  EXPECT_LT(d_int8, 1e-5);
  EXPECT_GT(d_float, 1e-4) << "8-bit activations should move the result measurably";
  aviary::testing::SetInt8Activations(false);
  aviary::MatMul(w, x.data(), 3, y.data());
  for (size_t i = 0; i < y.size(); ++i) EXPECT_LT(rel(y[i], flt[i]), 1e-5);
  // The reference kernels never round activations.
  aviary::testing::SetInt8Activations(true);
  aviary::testing::SetKernels(aviary::Kernels::kReference);
  aviary::MatMul(w, x.data(), 3, y.data());
  EXPECT_TRUE(BitEqual(y, flt));
  aviary::testing::SetKernels(aviary::Kernels::kFast);
}

}  // namespace
