// The fast kernels (Highway SIMD, threaded) held to the scalar reference (reference.h):
// every weight type, odd sizes, T = 1 and T > 1, 1 and 2 threads; the results must also not
// depend on T or on the thread count (bit for bit), and whole models must agree with the
// reference path and with themselves across modes.
//
// Bounds (stated in docs/PERFORMANCE.md):
//  - widening (DequantizeRow, GatherRow): bit-identical to the reference;
//  - MatMul: |fast - ref| <= 1e-5 * sum_c |w_c x_c| per output (both are float sums of the
//    same exact products in different orders; measured worst ~1e-7);
//  - norms: |fast - ref| <= 1e-5 * (1 + |ref|); activations: relative 2e-6 (Highway's
//    exp/tanh are within 1-4 ulp);
//  - WKV: |fast - ref| <= 1e-5 * (1 + |ref|) for outputs and state after several steps;
//  - models, 40 tokens: |fast - ref| <= 2e-5 * max(1, max |logit| of the row) (model_test
//    holds both paths to 1e-4 of the float64 logits on its 3-token prompt).
#include <gtest/gtest.h>
#include <hwy/targets.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <iostream>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "aviary/model.h"
#include "tensor_fixtures.h"
#include "test_data.h"
#include "tensor/aligned.h"
#include "tensor/dtype.h"
#include "tensor/int8_matmul.h"
#include "tensor/kernels.h"
#include "tensor/reference.h"
#include "tensor/tensor.h"
#include "tensor/thread_pool.h"
#include "tensor/wkv.h"

namespace {

using aviary::DType;
using aviary::testing::MakeTensor;
using aviary::testing::RandomMatrix;

const DType kAllTypes[] = {DType::kF32,  DType::kF16,  DType::kBF16, DType::kQ4_0,
                           DType::kQ4_1, DType::kQ5_0, DType::kQ5_1, DType::kQ8_0,
                           DType::kQ4_K, DType::kQ5_K, DType::kQ6_K};

bool IsK(DType type) { return aviary::Traits(type).block_elems == aviary::kQKBlock; }

bool BitEqual(const float* a, const float* b, size_t n) {
  return std::memcmp(a, b, n * sizeof(float)) == 0;
}
bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && BitEqual(a.data(), b.data(), a.size());
}

std::string Sci(double v) {
  std::ostringstream os;
  os << std::scientific << std::setprecision(2) << v;
  return os.str();
}

// Restores the kernel choice, the rounded-activation switches and the thread count after a test.
using KernelGuard = aviary::testing::RuntimeGuard;

std::vector<float> RandomVector(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

// ---- thread pool ----

TEST(ThreadPool, EveryTaskRunsOnceAndNestedCallsRunSerially) {
  KernelGuard guard;
  for (int threads : {1, 2, 3, 8}) {
    aviary::testing::SetNumThreads(threads);
    EXPECT_EQ(aviary::NumThreads(), threads);
    for (int64_t n : {0, 1, 2, 7, 100, 1000}) {
      std::vector<std::atomic<int>> hits(n);
      std::atomic<int> nested{0};
      aviary::ParallelFor(n, [&](int64_t task, int thread) {
        EXPECT_GE(thread, 0);
        EXPECT_LT(thread, threads);
        hits[task].fetch_add(1);
        if (task == 0) aviary::ParallelFor(5, [&](int64_t, int) { nested.fetch_add(1); });
      });
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "task " << i;
      EXPECT_EQ(nested.load(), n > 0 ? 5 : 0);
    }
  }
}

TEST(ThreadPool, ManyShortLoopsInARow) {
  // The token loop's pattern: thousands of small parallel loops back to back.
  KernelGuard guard;
  aviary::testing::SetNumThreads(2);
  std::atomic<int64_t> sum{0};
  for (int i = 0; i < 20000; ++i) {
    aviary::ParallelFor(4, [&](int64_t task, int) { sum.fetch_add(task + 1); });
  }
  EXPECT_EQ(sum.load(), 20000 * 10);
}

// ---- widening ----

TEST(FastKernels, DequantizeRowIsBitIdenticalToReference) {
  std::mt19937 rng(11);
  for (DType type : kAllTypes) {
    for (int64_t cols : {32, 64, 96, 160, 256, 768, 1024, 4096}) {
      if (cols % aviary::Traits(type).block_elems != 0) continue;
      SCOPED_TRACE(std::string(aviary::DTypeName(type)) + " cols " + std::to_string(cols));
      const std::vector<uint8_t> bytes = RandomMatrix(type, 1, cols, rng);
      std::vector<float> ref(cols), fast(cols);
      aviary::DequantizeRow(type, bytes.data(), ref.data(), cols);
      aviary::fast::DequantizeRow(type, bytes.data(), fast.data(), cols);
      EXPECT_TRUE(BitEqual(ref, fast));
    }
    if (!aviary::IsQuantized(type)) {
      for (int64_t cols : {1, 3, 17, 33, 255}) {
        const std::vector<uint8_t> bytes = RandomMatrix(type, 1, cols, rng);
        std::vector<uint8_t> odd(bytes.size() + 1);  // at an odd address
        std::memcpy(odd.data() + 1, bytes.data(), bytes.size());
        std::vector<float> ref(cols), fast(cols);
        aviary::DequantizeRow(type, bytes.data(), ref.data(), cols);
        aviary::fast::DequantizeRow(type, odd.data() + 1, fast.data(), cols);
        EXPECT_TRUE(BitEqual(ref, fast)) << aviary::DTypeName(type) << " cols " << cols;
      }
    }
  }
}

// ---- MatMul ----

struct MatMulCase {
  DType type;
  int64_t rows, cols;
};

// Every type over odd sizes; `few` keeps a handful per type (the every-target test runs them
// once per SIMD target).
std::vector<MatMulCase> MatMulCases(bool few = false) {
  std::vector<MatMulCase> cases;
  const std::vector<int64_t> rows =
      few ? std::vector<int64_t>{1, 5, 13}
          : std::vector<int64_t>{1, 2, 3, 4, 5, 7, 8, 13, 31, 64, 100, 257, 300};
  for (DType type : kAllTypes) {
    std::vector<int64_t> cols =
        few ? std::vector<int64_t>{32, 96, 544} : std::vector<int64_t>{32, 64, 96, 160, 544};
    if (IsK(type)) cols = {256, 768};
    if (!aviary::IsQuantized(type)) {
      const std::vector<int64_t> odd =
          few ? std::vector<int64_t>{1, 17, 257} : std::vector<int64_t>{1, 5, 17, 33, 47, 100, 257};
      cols.insert(cols.end(), odd.begin(), odd.end());
    }
    for (int64_t r : rows) {
      for (int64_t c : cols) cases.push_back({type, r, c});
    }
  }
  return cases;
}

// Every output of `fast` [T, rows] within 1e-5 * sum_c |w_rc x_tc| of `ref` (wf: the weights
// as floats, [rows, cols]); *worst gets the largest |fast - ref| / sum seen.
::testing::AssertionResult WithinSumBound(const std::vector<float>& wf, const std::vector<float>& x,
                                          const std::vector<float>& ref,
                                          const std::vector<float>& fast, int64_t rows,
                                          int64_t cols, int T, double* worst) {
  for (int t = 0; t < T; ++t) {
    for (int64_t r = 0; r < rows; ++r) {
      double mag = 0;
      for (int64_t c = 0; c < cols; ++c) {
        mag += std::fabs(static_cast<double>(wf[r * cols + c]) * x[t * cols + c]);
      }
      const size_t i = static_cast<size_t>(t) * rows + r;
      const double err = std::fabs(static_cast<double>(fast[i]) - ref[i]);
      if (!(err <= 1e-5 * mag + 1e-30)) {
        return ::testing::AssertionFailure() << "t " << t << " r " << r << " ref " << ref[i]
                                             << " fast " << fast[i] << " (sum |w x| " << mag << ")";
      }
      if (mag > 0) *worst = std::max(*worst, err / mag);
    }
  }
  return ::testing::AssertionSuccess();
}

TEST(FastKernels, MatMulMatchesReferenceForEveryTypeAndSize) {
  KernelGuard guard;
  // Float activations here; int8_matmul_test and bf16_matmul_test have the rounded paths.
  aviary::testing::RoundedActivations::Set(false);
  std::mt19937 rng(42);
  double worst = 0;
  int checked = 0;
  for (const MatMulCase& mc : MatMulCases()) {
    const std::vector<uint8_t> bytes = RandomMatrix(mc.type, mc.rows, mc.cols, rng);
    const aviary::Tensor w = MakeTensor(mc.type, mc.rows, mc.cols, bytes.data());
    std::vector<float> wf(static_cast<size_t>(mc.rows * mc.cols));
    for (int64_t r = 0; r < mc.rows; ++r) {
      aviary::DequantizeRow(mc.type, w.row(r), &wf[r * mc.cols], mc.cols);
    }
    for (int T : {1, 2, 3, 5, 9, 64}) {
      SCOPED_TRACE(std::string(aviary::DTypeName(mc.type)) + " " + std::to_string(mc.rows) + "x" +
                   std::to_string(mc.cols) + " T=" + std::to_string(T));
      const std::vector<float> x = RandomVector(static_cast<size_t>(T) * mc.cols, rng);
      std::vector<float> ref(static_cast<size_t>(T) * mc.rows);
      aviary::ref::MatMul(w, x.data(), T, ref.data());

      std::vector<float> fast1(ref.size()), fast2(ref.size());
      aviary::testing::SetNumThreads(2);
      aviary::fast::MatMul(w, x.data(), T, fast1.data(), 1);
      aviary::fast::MatMul(w, x.data(), T, fast2.data(), 2);
      ASSERT_TRUE(BitEqual(fast1, fast2)) << "result depends on the thread count";

      ASSERT_TRUE(WithinSumBound(wf, x, ref, fast1, mc.rows, mc.cols, T, &worst));
      // T tokens at once == T single tokens, bit for bit.
      if (T > 1) {
        std::vector<float> single(ref.size());
        for (int t = 0; t < T; ++t) {
          aviary::fast::MatMul(w, x.data() + t * mc.cols, 1, single.data() + t * mc.rows, 2);
        }
        ASSERT_TRUE(BitEqual(fast1, single)) << "result depends on T";
      }
      ++checked;
    }
    if (!aviary::IsQuantized(mc.type) && mc.rows <= 8) {  // weights at an odd address
      std::vector<uint8_t> odd(bytes.size() + 1);
      std::memcpy(odd.data() + 1, bytes.data(), bytes.size());
      const aviary::Tensor wu = MakeTensor(mc.type, mc.rows, mc.cols, odd.data() + 1);
      const std::vector<float> x = RandomVector(static_cast<size_t>(3) * mc.cols, rng);
      std::vector<float> a(3 * mc.rows), b(3 * mc.rows);
      aviary::fast::MatMul(w, x.data(), 3, a.data());
      aviary::fast::MatMul(wu, x.data(), 3, b.data());
      EXPECT_TRUE(BitEqual(a, b)) << "odd address changes the result";
    }
  }
  std::cout << "[ matmul   ] " << checked
            << " cases, worst |fast - ref| / sum|w x| = " << Sci(worst) << " ("
            << aviary::KernelTarget() << ")\n";
  RecordProperty("worst_relative_error", Sci(worst));
}

// The same checks on every SIMD target compiled in that this CPU runs (AVX-512, AVX2, SSE4,
// ... as Highway's dispatch would pick on older CPUs), with float activations: the machines
// that build and test aviary mostly have AVX-512, its users mostly AVX2.
TEST(FastKernels, MatMulMatchesReferenceOnEveryCompiledTarget) {
  KernelGuard guard;
  aviary::testing::RoundedActivations::Set(false);
  std::mt19937 rng(43);
  const std::vector<int64_t> targets = hwy::SupportedAndGeneratedTargets();
  ASSERT_FALSE(targets.empty());
  struct ResetTargets {  // back to what the CPU supports, also after a failed assertion
    ~ResetTargets() { hwy::SetSupportedTargetsForTest(0); }
  } reset;
  std::string seen;
  for (int64_t target : targets) {
    hwy::SetSupportedTargetsForTest(target);
    const std::string name = aviary::KernelTarget();
    SCOPED_TRACE(name);
    EXPECT_EQ(name, hwy::TargetName(target)) << "dispatch did not follow the target";
    seen.append(name).append(" (worst ");
    double worst = 0;
    for (const MatMulCase& mc : MatMulCases(/*few=*/true)) {
      SCOPED_TRACE(std::string(aviary::DTypeName(mc.type)) + " " + std::to_string(mc.rows) + "x" +
                   std::to_string(mc.cols));
      const std::vector<uint8_t> bytes = RandomMatrix(mc.type, mc.rows, mc.cols, rng);
      const aviary::Tensor w = MakeTensor(mc.type, mc.rows, mc.cols, bytes.data());
      std::vector<float> wf(static_cast<size_t>(mc.rows * mc.cols));
      for (int64_t r = 0; r < mc.rows; ++r) {
        aviary::DequantizeRow(mc.type, w.row(r), &wf[r * mc.cols], mc.cols);
      }
      const int T = 3;
      const std::vector<float> x = RandomVector(static_cast<size_t>(T) * mc.cols, rng);
      std::vector<float> ref(static_cast<size_t>(T) * mc.rows), fast(ref.size()),
          single(ref.size());
      aviary::ref::MatMul(w, x.data(), T, ref.data());
      aviary::fast::MatMul(w, x.data(), T, fast.data(), 2);
      for (int t = 0; t < T; ++t) {
        aviary::fast::MatMul(w, x.data() + t * mc.cols, 1, single.data() + t * mc.rows, 1);
      }
      ASSERT_TRUE(BitEqual(fast, single)) << "result depends on T or the thread count";
      ASSERT_TRUE(WithinSumBound(wf, x, ref, fast, mc.rows, mc.cols, T, &worst));
    }
    seen.append(Sci(worst)).append(") ");
  }
  std::cout << "[ targets  ] " << seen << "\n";
}

TEST(FastKernels, MatMulDispatcherFollowsTheKernelChoice) {
  KernelGuard guard;
  std::mt19937 rng(5);
  const std::vector<uint8_t> bytes = RandomMatrix(DType::kQ8_0, 40, 96, rng);
  const aviary::Tensor w = MakeTensor(DType::kQ8_0, 40, 96, bytes.data());
  const std::vector<float> x = RandomVector(96 * 2, rng);
  std::vector<float> ref(80), fast(80), y(80);
  aviary::ref::MatMul(w, x.data(), 2, ref.data());
  aviary::fast::MatMul(w, x.data(), 2, fast.data());
  aviary::testing::SetKernels(aviary::Kernels::kReference);
  EXPECT_STREQ(aviary::KernelTarget(), "scalar");
  aviary::MatMul(w, x.data(), 2, y.data());
  EXPECT_TRUE(BitEqual(y, ref));
  aviary::testing::SetKernels(aviary::Kernels::kFast);
  aviary::MatMul(w, x.data(), 2, y.data());
  EXPECT_TRUE(BitEqual(y, fast));
}

// A batch of independent products (a layer stage: large matrices beside low-rank ones, of
// mixed types, on the rounded-activation paths where the CPU has them) gives every output bit
// for bit as the products one by one, with any thread count and T; the dispatcher's reference
// mode runs the reference product for each.
TEST(FastKernels, MatMulBatchEqualsTheProductsOneByOne) {
  KernelGuard guard;
  std::mt19937 rng(11);
  struct Shape {
    DType type;
    int64_t rows, cols;
  };
  const Shape shapes[] = {{DType::kQ8_0, 300, 256}, {DType::kF16, 257, 256},
                          {DType::kQ4_0, 64, 256},  {DType::kF16, 13, 256},
                          {DType::kQ4_K, 100, 256}, {DType::kQ5_1, 5, 256},
                          {DType::kF32, 256, 7}};  // the last reads only 7 columns of x
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<aviary::Tensor> ws;
  for (const Shape& s : shapes) bytes.push_back(RandomMatrix(s.type, s.rows, s.cols, rng));
  for (size_t j = 0; j < std::size(shapes); ++j) {
    ws.push_back(MakeTensor(shapes[j].type, shapes[j].rows, shapes[j].cols, bytes[j].data()));
  }
  for (bool rounded : {false, true}) {
    aviary::testing::RoundedActivations::Set(rounded);
    for (int T : {1, 4}) {
      const std::vector<float> x = RandomVector(static_cast<size_t>(T) * 256 * 2, rng);
      std::vector<std::vector<float>> single, batch;
      std::vector<aviary::MatMulJob> jobs;
      for (size_t j = 0; j < ws.size(); ++j) {
        const float* xj = x.data() + (j % 2) * T * 256;  // two different inputs
        single.emplace_back(static_cast<size_t>(T) * ws[j].rows());
        aviary::fast::MatMul(ws[j], xj, T, single.back().data(), 1);
        batch.emplace_back(single.back().size());
      }
      for (size_t j = 0; j < ws.size(); ++j) {
        jobs.push_back({ws[j], x.data() + (j % 2) * T * 256, batch[j].data()});
      }
      for (int threads : {1, 2, 3}) {
        SCOPED_TRACE("rounded " + std::to_string(rounded) + " T " + std::to_string(T) +
                     " threads " + std::to_string(threads));
        aviary::testing::SetNumThreads(threads);
        for (auto& b : batch) std::fill(b.begin(), b.end(), -1.0f);
        aviary::fast::MatMulBatch(jobs.data(), static_cast<int>(jobs.size()), T);
        for (size_t j = 0; j < ws.size(); ++j) EXPECT_TRUE(BitEqual(single[j], batch[j])) << j;
        for (auto& b : batch) std::fill(b.begin(), b.end(), -1.0f);
        aviary::MatMulBatch(jobs, T);  // the dispatcher, fast mode
        for (size_t j = 0; j < ws.size(); ++j) EXPECT_TRUE(BitEqual(single[j], batch[j])) << j;
      }
      aviary::testing::SetKernels(aviary::Kernels::kReference);
      aviary::MatMulBatch(jobs, T);
      for (size_t j = 0; j < ws.size(); ++j) {
        std::vector<float> ref(single[j].size());
        aviary::ref::MatMul(ws[j], jobs[j].x, T, ref.data());
        EXPECT_TRUE(BitEqual(ref, batch[j])) << "reference mode, product " << j;
      }
      aviary::testing::SetKernels(aviary::Kernels::kFast);
    }
  }
}

// Kernel buffers start on cache lines, small or large (glibc serves blocks from 128 KiB on
// by mmap, 16 bytes past a page), and growing keeps it so.
TEST(FastKernels, AlignedVectorsStartOnCacheLines) {
  for (size_t n : {1, 15, 16, 1000, 40000, 1 << 20}) {
    aviary::AlignedVector<float> f(n);
    aviary::AlignedVector<int8_t> b(n);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(f.data()) % aviary::kVectorAlign, 0u) << n;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data()) % aviary::kVectorAlign, 0u) << n;
    f.resize(3 * n + 7);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(f.data()) % aviary::kVectorAlign, 0u) << n;
  }
  aviary::int8::Activations a;
  std::vector<float> x(64 * 4096, 0.5f);
  aviary::int8::Quantize(x.data(), 64, 4096, &a);
  for (const void* p :
       {static_cast<const void*>(a.q.data()), static_cast<const void*>(a.qt.data()),
        static_cast<const void*>(a.d.data()), static_cast<const void*>(a.sums.data())}) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % aviary::kVectorAlign, 0u);
  }
}

// ---- norms and activations ----

TEST(FastKernels, NormsMatchReference) {
  std::mt19937 rng(7);
  double worst = 0;
  for (int n : {1, 3, 8, 15, 16, 17, 64, 100, 768, 1024, 2560}) {
    for (float offset : {0.0f, 3.0f, -50.0f}) {
      std::vector<float> x = RandomVector(n, rng, 2.0f);
      for (auto& v : x) v += offset;
      const std::vector<float> w = RandomVector(n, rng), b = RandomVector(n, rng);
      std::vector<float> ref(n), fast(n);
      aviary::ref::LayerNorm(x.data(), w.data(), b.data(), n, 1e-5f, ref.data());
      aviary::fast::LayerNorm(x.data(), w.data(), b.data(), n, 1e-5f, fast.data());
      for (int i = 0; i < n; ++i) {
        const double err = std::fabs(static_cast<double>(fast[i]) - ref[i]);
        ASSERT_LE(err, 1e-5 * (1 + std::fabs(ref[i]))) << "n " << n << " i " << i;
        worst = std::max(worst, err / (1 + std::fabs(ref[i])));
      }
      for (int groups : {1, 2, 4}) {
        if (n % groups != 0) continue;
        aviary::ref::GroupNorm(x.data(), w.data(), b.data(), n, groups, 64e-5f, ref.data());
        aviary::fast::GroupNorm(x.data(), w.data(), b.data(), n, groups, 64e-5f, fast.data());
        for (int i = 0; i < n; ++i) {
          ASSERT_LE(std::fabs(static_cast<double>(fast[i]) - ref[i]),
                    1e-5 * (1 + std::fabs(ref[i])))
              << "groups " << groups << " n " << n << " i " << i;
        }
      }
    }
  }
  std::cout << "[ norms    ] worst |fast - ref| / (1 + |ref|) = " << Sci(worst) << "\n";
}

TEST(FastKernels, ActivationsMatchCmathAndDoNotDependOnPosition) {
  std::mt19937 rng(8);
  struct Op {
    const char* name;
    void (*fast)(float*, size_t);
    void (*ref)(float*, size_t);
    float lo, hi;
  };
  const Op ops[] = {
      {"tanh", aviary::fast::Tanh, aviary::ref::Tanh, -12, 12},
      {"sigmoid", aviary::fast::Sigmoid, aviary::ref::Sigmoid, -100, 100},
      {"silu", aviary::fast::Silu, aviary::ref::Silu, -30, 30},
      {"exp", aviary::fast::Exp, aviary::ref::Exp, -100, 88},
      {"squared relu", aviary::fast::SquaredRelu, aviary::ref::SquaredRelu, -1e3, 1e3}};
  for (const Op& op : ops) {
    std::uniform_real_distribution<float> u(op.lo, op.hi);
    double worst = 0;
    for (size_t n : {1u, 2u, 5u, 16u, 17u, 100u, 1000u}) {
      std::vector<float> x(n);
      for (auto& v : x) v = u(rng);
      std::vector<float> ref = x, fast = x;
      op.ref(ref.data(), n);
      op.fast(fast.data(), n);
      for (size_t i = 0; i < n; ++i) {
        const double err = std::fabs(static_cast<double>(fast[i]) - ref[i]);
        ASSERT_LE(err, 2e-6 * std::fabs(ref[i]) + 1e-37) << op.name << " x " << x[i];
        if (ref[i] != 0) worst = std::max(worst, err / std::fabs(ref[i]));
        float one = x[i];  // the same element alone gives the same bits
        op.fast(&one, 1);
        ASSERT_EQ(std::memcmp(&one, &fast[i], 4), 0) << op.name << " x " << x[i];
      }
    }
    std::cout << "[ activ.   ] " << op.name << " worst relative error " << Sci(worst) << "\n";
  }
  float big[3] = {89.0f, 1000.0f, -1000.0f};
  aviary::fast::Exp(big, 3);
  EXPECT_TRUE(std::isinf(big[0]) && std::isinf(big[1]));
  EXPECT_EQ(big[2], 0.0f);
}

// ---- WKV ----

std::vector<float> Uniform(std::mt19937& rng, size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

void ExpectClose(const std::vector<float>& fast, const std::vector<float>& ref,
                 const std::string& what, double* worst) {
  ASSERT_EQ(fast.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    const double err = std::fabs(static_cast<double>(fast[i]) - ref[i]);
    ASSERT_LE(err, 1e-5 * (1 + std::fabs(ref[i]))) << what << " i " << i << " ref " << ref[i];
    *worst = std::max(*worst, err / (1 + std::fabs(ref[i])));
  }
}

TEST(FastKernels, Wkv5And7MatchReference) {
  KernelGuard guard;
  std::mt19937 rng(9);
  double worst = 0;
  // 1040: one head longer than the v7 kernel's stack buffer (kMaxWkv7Head), which v7 runs on
  // the scalar code and v5/v6 still on SIMD.
  for (int N : {4, 6, 8, 16, 64, 1040}) {
    for (int H : {1, 3, 40}) {
      if (N * N * H > 64 * 64 * 40 && H > 1) continue;
      const int C = H * N, T = 7;
      SCOPED_TRACE("H " + std::to_string(H) + " N " + std::to_string(N));
      const auto r = Uniform(rng, T * C, -1, 1), k = Uniform(rng, T * C, -1, 1);
      const auto v = Uniform(rng, T * C, -1, 1), w = Uniform(rng, T * C, 0.5f, 0.999f);
      const auto a = Uniform(rng, T * C, 0, 1), first = Uniform(rng, C, -1, 1);
      auto kk = Uniform(rng, T * C, -1, 1);
      for (int i = 0; i < T * H; ++i) {  // unit length per head, as in the model
        double norm = 0;
        for (int j = 0; j < N; ++j) norm += kk[i * N + j] * kk[i * N + j];
        for (int j = 0; j < N; ++j)
          kk[i * N + j] = static_cast<float>(kk[i * N + j] / std::sqrt(norm));
      }
      const auto S0 = Uniform(rng, static_cast<size_t>(C) * N, -1, 1);
      for (int version : {5, 6, 7}) {
        SCOPED_TRACE("v" + std::to_string(version));
        auto run = [&](bool reference, int threads, int tokens_per_call) {
          aviary::testing::SetKernels(reference ? aviary::Kernels::kReference
                                                : aviary::Kernels::kFast);
          aviary::testing::SetNumThreads(threads);
          std::vector<float> S = S0, out(T * C);
          for (int t0 = 0; t0 < T; t0 += tokens_per_call) {
            const int n = std::min(tokens_per_call, T - t0);
            const size_t o = static_cast<size_t>(t0) * C;
            if (version == 7) {
              aviary::Wkv7Seq(n, H, N, r.data() + o, w.data() + o, k.data() + o, v.data() + o,
                              kk.data() + o, a.data() + o, S.data(), out.data() + o);
            } else {
              const bool per_token = version == 6;
              aviary::Wkv5Seq(n, H, N, r.data() + o, k.data() + o, v.data() + o,
                              w.data() + (per_token ? o : 0), per_token, first.data(), S.data(),
                              out.data() + o);
            }
          }
          out.insert(out.end(), S.begin(), S.end());
          return out;
        };
        const std::vector<float> ref = run(true, 1, 1);
        const std::vector<float> fast = run(false, 1, T);
        ExpectClose(fast, ref, "out+state", &worst);
        EXPECT_TRUE(BitEqual(fast, run(false, 2, T))) << "depends on the thread count";
        EXPECT_TRUE(BitEqual(fast, run(false, 2, 1))) << "depends on T";
        EXPECT_TRUE(BitEqual(fast, run(false, 1, 3))) << "depends on T";
      }
    }
  }
  std::cout << "[ wkv 5/6/7] worst |fast - ref| / (1 + |ref|) = " << Sci(worst) << "\n";
}

TEST(FastKernels, Wkv4MatchesReference) {
  KernelGuard guard;
  std::mt19937 rng(10);
  double worst = 0;
  for (int C : {1, 7, 16, 64, 100, 1024}) {
    const int T = 6;
    const auto first = Uniform(rng, C, -1, 1);
    auto decay = Uniform(rng, C, -2, 1);
    for (auto& d : decay) d = -std::exp(d);
    auto k = Uniform(rng, T * C, -3, 3);
    for (int c = 0; c < C; ++c) k[3 * C + c] = 60.0f + c % 40;  // huge keys at step 3
    const auto v = Uniform(rng, T * C, -2, 2);
    auto run = [&](bool reference, int threads, int per_call) {
      aviary::testing::SetKernels(reference ? aviary::Kernels::kReference : aviary::Kernels::kFast);
      aviary::testing::SetNumThreads(threads);
      std::vector<float> aa(C, 0.0f), bb(C, 0.0f), pp(C, -1e30f), out(T * C);
      for (int t0 = 0; t0 < T; t0 += per_call) {
        const int n = std::min(per_call, T - t0);
        aviary::Wkv4Seq(n, C, k.data() + t0 * C, v.data() + t0 * C, first.data(), decay.data(),
                        aa.data(), bb.data(), pp.data(), out.data() + t0 * C);
      }
      // aa, bb are scaled by e^-pp: compare out and pp, and aa / bb (the meaningful ratio).
      std::vector<float> all = out;
      for (int c = 0; c < C; ++c) all.push_back(aa[c] / bb[c]);
      all.insert(all.end(), pp.begin(), pp.end());
      return all;
    };
    const std::vector<float> ref = run(true, 1, 1), fast = run(false, 1, T);
    ExpectClose(fast, ref, "C " + std::to_string(C), &worst);
    EXPECT_TRUE(BitEqual(fast, run(false, 2, 1)));
  }
  std::cout << "[ wkv 4    ] worst |fast - ref| / (1 + |ref|) = " << Sci(worst) << "\n";
}

// ---- whole models ----

// Rounded activations (8-bit for quantized matrices, bfloat16 for F16 ones) vs the float
// reference over 40 tokens of odd bytes, relative to each row's largest |logit|. The rounding
// (half a step of max|x|/127 per block; 2^-9 of each bfloat16 factor) is amplified along the
// recurrence on these out-of-distribution inputs: measured worst 0.35 (tiny 6v0 Q5_0),
// typically 0.003-0.1. A wrong kernel gives garbage (>= 1). The tight checks are
// int8_matmul_test / bf16_matmul_test (kernel vs definition) and model_test (the per-type
// tolerance on the 3-token prompt).
constexpr double kRoundedRelativeBound = 0.5;

class FastModelTest : public ::testing::TestWithParam<aviary::testing::ModelCase> {};

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - b[i]);
    if (!(d <= m)) m = d;
  }
  return m;
}

TEST_P(FastModelTest, FastMatchesReferenceAndIsThreadIndependent) {
  const auto& c = GetParam();
  REQUIRE_SHARED(c.model);
  KernelGuard guard;
  const auto model = aviary::Model::Load(aviary::testing::SharedPath(c.model));
  std::vector<int32_t> tokens;
  for (int i = 0; i < 40; ++i) tokens.push_back((i * 37 + 11) % model->info().n_vocab);
  auto eval = [&](aviary::Kernels k, int threads, bool one_by_one, bool rounded = false) {
    aviary::testing::SetKernels(k);
    aviary::testing::RoundedActivations::Set(rounded);
    aviary::testing::SetNumThreads(threads);
    aviary::State state = model->NewState();
    std::vector<float> logits, row;
    if (one_by_one) {
      for (int32_t t : tokens) {
        model->Eval(std::span<const int32_t>(&t, 1), state, &row);
        logits.insert(logits.end(), row.begin(), row.end());
      }
    } else {
      model->Eval(tokens, state, &logits, /*all_positions=*/true);
    }
    return logits;
  };
  const std::vector<float> ref = eval(aviary::Kernels::kReference, 1, false);
  const std::vector<float> fast = eval(aviary::Kernels::kFast, 2, false);
  // 40 tokens of odd bytes: rounding differences grow along the recurrence, so the bound is
  // relative to each row's largest logit (on the 3-token prompt of model_test both paths are
  // within 1e-4 absolute of the float64 logits).
  const size_t V = model->info().n_vocab;
  // Largest |a - ref| over all rows, absolute and relative to each row's largest |logit|.
  auto compare = [&](const std::vector<float>& a, double* d, double* rel) {
    *d = 0, *rel = 0;
    for (size_t row = 0; row < tokens.size(); ++row) {
      double scale = 1, diff = 0;
      for (size_t i = row * V; i < (row + 1) * V; ++i) {
        scale = std::max(scale, std::fabs(static_cast<double>(ref[i])));
        diff = std::max(diff, std::fabs(static_cast<double>(a[i]) - ref[i]));
      }
      *d = std::max(*d, diff);
      *rel = std::max(*rel, diff / scale);
    }
  };
  double d, rel;
  compare(fast, &d, &rel);
  std::cout << "[ fast/ref ] " << std::left << std::setw(40) << c.model << " max " << Sci(d)
            << "  relative to the row's max |logit| " << Sci(rel) << "\n";
  EXPECT_LE(rel, 2e-5);
  EXPECT_LE(MaxAbsDiff(fast, ref), 1e-3);
  EXPECT_TRUE(BitEqual(fast, eval(aviary::Kernels::kFast, 1, false))) << "threads 1 vs 2";
  EXPECT_TRUE(BitEqual(fast, eval(aviary::Kernels::kFast, 2, true))) << "sequence vs one-by-one";
  for (float f : fast) ASSERT_TRUE(std::isfinite(f));

  // Rounded activations (the default where the CPU has AVX-512 VNNI / BF16): the same
  // independence of threads and mode, and a bound from the activation rounding.
  if (!aviary::testing::RoundedActivations::CpuSupported()) return;
  const std::vector<float> q = eval(aviary::Kernels::kFast, 2, false, true);
  compare(q, &d, &rel);
  std::cout << "[ rnd/ref  ] " << std::left << std::setw(40) << c.model << " max " << Sci(d)
            << "  relative to the row's max |logit| " << Sci(rel) << "\n";
  bool has_rounded = false;  // a matrix that a rounded path multiplies on this CPU
  for (const auto& [type, count] : model->info().tensor_types) {
    has_rounded |= (type[0] == 'Q' && aviary::int8::CpuSupported()) ||
                   ((type == "F16" || type == "BF16") && aviary::bf16::CpuSupported());
  }
  if (!has_rounded) {
    EXPECT_TRUE(BitEqual(q, fast)) << "no matrix of a rounded type, yet rounding changed it";
  }
  EXPECT_LE(rel, kRoundedRelativeBound);
  EXPECT_TRUE(BitEqual(q, eval(aviary::Kernels::kFast, 1, false, true))) << "threads 1 vs 2";
  EXPECT_TRUE(BitEqual(q, eval(aviary::Kernels::kFast, 2, true, true))) << "sequence vs one-by-one";
  for (float f : q) ASSERT_TRUE(std::isfinite(f));
}

INSTANTIATE_TEST_SUITE_P(AllModels, FastModelTest,
                         ::testing::ValuesIn(aviary::testing::AllModelCases()),
                         [](const ::testing::TestParamInfo<aviary::testing::ModelCase>& i) {
                           std::string name = i.param.model;
                           name = name.substr(name.rfind('/') + 1);
                           for (char& ch : name) {
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           }
                           return name;
                         });

}  // namespace
