// The training products (tensor/gemm.h), fast and reference, against double-precision loops on
// odd shapes; the forward bit for bit against MatMul on an F32 Tensor; every output the same
// bits on 1, 2 and 3 threads; on every SIMD target this CPU runs.
//
// Bound: |got - exact| <= 1e-5 * (|initial value| + sum_k |a_k b_k|) per output (float sums of
// the same products as the double sum, in some fixed order).
#include <gtest/gtest.h>
#include <hwy/targets.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "aviary/runtime.h"
#include "tensor/gemm.h"
#include "tensor/kernels.h"
#include "tensor/tensor.h"
#include "tensor/thread_pool.h"

namespace {

using aviary::Kernels;

struct Shape {
  int64_t rows, cols;
  int T;
};

// Odd sizes around the vector widths and register tiles; cols > 1024 takes the forward in
// several passes over the columns, a reduction over 128 the backward in several passes; 32
// columns the backward's narrow tiles.
const Shape kShapes[] = {{1, 1, 1},      {3, 17, 5},      {17, 33, 7},   {33, 100, 13},
                         {100, 257, 19}, {257, 3, 33},    {65, 1030, 9}, {300, 40, 130},
                         {16, 64, 12},   {200, 700, 150}, {70, 32, 100}};

std::string Name(const Shape& s) {
  return std::to_string(s.rows) + "x" + std::to_string(s.cols) + " T=" + std::to_string(s.T);
}

// n random floats in [-1, 1), starting one float past a 64-byte boundary (unaligned rows).
struct Buffer {
  std::vector<float> storage;
  float* data() { return storage.data() + 1; }
  const float* data() const { return storage.data() + 1; }
  size_t size() const { return storage.size() - 1; }
};
Buffer Random(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  Buffer b{std::vector<float>(n + 1)};
  for (float& f : b.storage) f = u(rng);
  return b;
}

struct Operands {
  Buffer w, x, dy, init_dx, init_dw;  // init_*: what accumulate adds to
};
Operands MakeOperands(const Shape& s, uint32_t seed) {
  std::mt19937 rng(seed);
  Operands o;
  o.w = Random(s.rows * s.cols, rng);
  o.x = Random(s.T * s.cols, rng);
  o.dy = Random(s.T * s.rows, rng);
  o.init_dx = Random(s.T * s.cols, rng);
  o.init_dw = Random(s.rows * s.cols, rng);
  return o;
}

// Exact sums and their bound: value = init + sum_k a(k) b(k), scale = |init| + sum |a(k) b(k)|.
struct Exact {
  std::vector<double> value, scale;
};

Exact ForwardExact(const Shape& s, const Operands& o) {
  Exact e{std::vector<double>(s.T * s.rows), std::vector<double>(s.T * s.rows)};
  for (int t = 0; t < s.T; ++t) {
    for (int64_t r = 0; r < s.rows; ++r) {
      double sum = 0, scale = 0;
      for (int64_t c = 0; c < s.cols; ++c) {
        const double p = double{o.w.data()[r * s.cols + c]} * o.x.data()[t * s.cols + c];
        sum += p;
        scale += std::fabs(p);
      }
      e.value[t * s.rows + r] = sum;
      e.scale[t * s.rows + r] = scale;
    }
  }
  return e;
}

Exact BackwardInputExact(const Shape& s, const Operands& o, bool accumulate) {
  Exact e{std::vector<double>(s.T * s.cols), std::vector<double>(s.T * s.cols)};
  for (int t = 0; t < s.T; ++t) {
    for (int64_t c = 0; c < s.cols; ++c) {
      const double init = accumulate ? o.init_dx.data()[t * s.cols + c] : 0.0;
      double sum = init, scale = std::fabs(init);
      for (int64_t r = 0; r < s.rows; ++r) {
        const double p = double{o.dy.data()[t * s.rows + r]} * o.w.data()[r * s.cols + c];
        sum += p;
        scale += std::fabs(p);
      }
      e.value[t * s.cols + c] = sum;
      e.scale[t * s.cols + c] = scale;
    }
  }
  return e;
}

Exact BackwardWeightExact(const Shape& s, const Operands& o, bool accumulate) {
  Exact e{std::vector<double>(s.rows * s.cols), std::vector<double>(s.rows * s.cols)};
  for (int64_t r = 0; r < s.rows; ++r) {
    for (int64_t c = 0; c < s.cols; ++c) {
      const double init = accumulate ? o.init_dw.data()[r * s.cols + c] : 0.0;
      double sum = init, scale = std::fabs(init);
      for (int t = 0; t < s.T; ++t) {
        const double p = double{o.dy.data()[t * s.rows + r]} * o.x.data()[t * s.cols + c];
        sum += p;
        scale += std::fabs(p);
      }
      e.value[r * s.cols + c] = sum;
      e.scale[r * s.cols + c] = scale;
    }
  }
  return e;
}

void ExpectNear(const std::vector<float>& got, const Exact& exact, const char* what) {
  ASSERT_EQ(got.size(), exact.value.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_LE(std::fabs(got[i] - exact.value[i]), 1e-5 * exact.scale[i] + 1e-30)
        << what << " output " << i << ": " << got[i] << " vs " << exact.value[i];
  }
}

// The three products of one shape on the current runtime.
struct Results {
  std::vector<float> y, dx, dx_acc, dw, dw_acc;
};
Results Run(const Shape& s, const Operands& o) {
  Results r;
  r.y.assign(s.T * s.rows, NAN);
  aviary::MatMulForwardF32(o.w.data(), s.rows, s.cols, o.x.data(), s.T, r.y.data());
  r.dx.assign(s.T * s.cols, NAN);
  aviary::MatMulBackwardInput(o.w.data(), s.rows, s.cols, o.dy.data(), s.T, r.dx.data(), false);
  r.dx_acc.assign(o.init_dx.data(), o.init_dx.data() + o.init_dx.size());
  aviary::MatMulBackwardInput(o.w.data(), s.rows, s.cols, o.dy.data(), s.T, r.dx_acc.data(), true);
  r.dw.assign(s.rows * s.cols, NAN);
  aviary::MatMulBackwardWeight(o.dy.data(), o.x.data(), s.T, s.rows, s.cols, r.dw.data(), false);
  r.dw_acc.assign(o.init_dw.data(), o.init_dw.data() + o.init_dw.size());
  aviary::MatMulBackwardWeight(o.dy.data(), o.x.data(), s.T, s.rows, s.cols, r.dw_acc.data(), true);
  return r;
}

// MatMul on an F32 Tensor over the same floats.
std::vector<float> InferenceMatMul(const Shape& s, const Operands& o) {
  const aviary::Tensor w{"w",
                         aviary::DType::kF32,
                         {s.rows, s.cols},
                         reinterpret_cast<const uint8_t*>(o.w.data()),
                         static_cast<size_t>(s.rows * s.cols) * sizeof(float)};
  std::vector<float> y(s.T * s.rows, NAN);
  aviary::MatMul(w, o.x.data(), s.T, y.data());
  return y;
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Every shape against the exact sums, the forward against MatMul bit for bit, and (threads
// > 1) the same bits as `single`, the results on one thread.
void CheckAll(Kernels kernels, int threads, std::vector<Results>* single) {
  aviary::Runtime runtime({.threads = threads, .kernels = kernels});
  const aviary::ScopedRuntime scope(&runtime);
  for (size_t i = 0; i < std::size(kShapes); ++i) {
    const Shape& s = kShapes[i];
    SCOPED_TRACE(Name(s) + " threads=" + std::to_string(threads));
    const Operands o = MakeOperands(s, 7 + static_cast<uint32_t>(i));
    Results r = Run(s, o);
    EXPECT_TRUE(SameBits(r.y, InferenceMatMul(s, o))) << "forward differs from MatMul";
    ExpectNear(r.y, ForwardExact(s, o), "forward");
    ExpectNear(r.dx, BackwardInputExact(s, o, false), "backward input");
    ExpectNear(r.dx_acc, BackwardInputExact(s, o, true), "backward input, accumulate");
    ExpectNear(r.dw, BackwardWeightExact(s, o, false), "backward weight");
    ExpectNear(r.dw_acc, BackwardWeightExact(s, o, true), "backward weight, accumulate");
    if (threads == 1) {
      single->push_back(std::move(r));
      continue;
    }
    const Results& one = (*single)[i];
    EXPECT_TRUE(SameBits(r.y, one.y)) << "forward depends on the thread count";
    EXPECT_TRUE(SameBits(r.dx, one.dx)) << "backward input depends on the thread count";
    EXPECT_TRUE(SameBits(r.dx_acc, one.dx_acc)) << "backward input depends on the thread count";
    EXPECT_TRUE(SameBits(r.dw, one.dw)) << "backward weight depends on the thread count";
    EXPECT_TRUE(SameBits(r.dw_acc, one.dw_acc)) << "backward weight depends on the thread count";
  }
}

TEST(Gemm, FastMatchesExactSumsMatMulAndItselfOnAnyThreadCount) {
  std::vector<Results> single;
  for (int threads : {1, 2, 3}) CheckAll(Kernels::kFast, threads, &single);
}

TEST(Gemm, ReferenceMatchesExactSumsMatMulAndItselfOnAnyThreadCount) {
  std::vector<Results> single;
  for (int threads : {1, 2, 3}) CheckAll(Kernels::kReference, threads, &single);
}

// The register tiles differ per target (AVX-512 against 16-register x86 ones): each target
// this CPU runs, held to the same checks.
TEST(Gemm, EveryTargetMatchesExactSumsAndMatMul) {
  struct ResetTargets {  // back to what the CPU supports, also after a failed assertion
    ~ResetTargets() { hwy::SetSupportedTargetsForTest(0); }
  } reset;
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    SCOPED_TRACE(aviary::KernelTarget());
    std::vector<Results> single;
    for (int threads : {1, 2}) CheckAll(Kernels::kFast, threads, &single);
  }
}

// An optimizer step changes W in place between two forwards: the second must see the new values
// (the kernels keep aligned copies of W's rows within one call only).
TEST(Gemm, ForwardSeesWeightsChangedInPlace) {
  const Shape s{40, 100, 300};  // W's rows unaligned (copied), several token blocks per row block
  Operands o = MakeOperands(s, 99);
  for (int threads : {1, 2}) {
    aviary::Runtime runtime({.threads = threads});
    const aviary::ScopedRuntime scope(&runtime);
    std::vector<float> y(s.T * s.rows);
    for (int step = 0; step < 3; ++step) {
      for (size_t i = 0; i < o.w.size(); ++i) o.w.data()[i] *= -0.5f;
      aviary::MatMulForwardF32(o.w.data(), s.rows, s.cols, o.x.data(), s.T, y.data());
      EXPECT_TRUE(SameBits(y, InferenceMatMul(s, o))) << "threads " << threads << " step " << step;
    }
  }
}

TEST(Gemm, EmptySumsGiveZerosOrKeepTheValues) {
  float dx[3] = {1, 2, 3}, dw[2] = {4, 5};
  const float w = 0, dy = 0, x[3] = {0, 0, 0};
  for (Kernels kernels : {Kernels::kFast, Kernels::kReference}) {
    aviary::Runtime runtime({.threads = 2, .kernels = kernels});
    const aviary::ScopedRuntime scope(&runtime);
    // rows = 0: dx is an empty sum.
    aviary::MatMulBackwardInput(&w, 0, 3, &dy, 1, dx, true);
    EXPECT_EQ(dx[2], 3.0f);
    aviary::MatMulBackwardInput(&w, 0, 3, &dy, 1, dx, false);
    EXPECT_EQ(dx[0], 0.0f);
    EXPECT_EQ(dx[2], 0.0f);
    // T = 0: dw is an empty sum.
    aviary::MatMulBackwardWeight(&dy, x, 0, 1, 2, dw, true);
    EXPECT_EQ(dw[1], 5.0f);
    aviary::MatMulBackwardWeight(&dy, x, 0, 1, 2, dw, false);
    EXPECT_EQ(dw[1], 0.0f);
    dx[2] = 3, dw[1] = 5;
  }
}

}  // namespace
