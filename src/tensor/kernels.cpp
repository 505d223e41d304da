// Fast kernels (Highway SIMD, run-time dispatch, threaded) and the switch between them and the
// scalar reference (reference.cpp).
//
// The float-path MatMul (its design, per weight type) is in matmul-inl.h.

// Highway re-includes this file once per target; the parts outside HWY_NAMESPACE are guarded.
#ifndef AVIARY_KERNELS_ONCE
#define AVIARY_KERNELS_ONCE
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "tensor/bf16_matmul.h"
#include "tensor/int8_matmul.h"
#include "tensor/kernels.h"
#include "tensor/reference.h"
#include "tensor/simd_targets.h"
#include "tensor/thread_pool.h"
#endif  // AVIARY_KERNELS_ONCE

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tensor/kernels.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"
#include "tensor/matmul-inl.h"

HWY_BEFORE_NAMESPACE();
namespace aviary {
namespace HWY_NAMESPACE {

// Rows [r0, r1) of y = W x for all T tokens.
void MatMulRows(DType type, const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols,
                int64_t r0, int64_t r1, const float* x, int T, float* y) {
  switch (type) {
    case DType::kF32: return MatMulRowsT<DType::kF32>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kF16: return MatMulRowsT<DType::kF16>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kBF16: return MatMulRowsT<DType::kBF16>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kQ4_0: return MatMulRowsT<DType::kQ4_0>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kQ4_1: return MatMulRowsT<DType::kQ4_1>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kQ5_0: return MatMulRowsT<DType::kQ5_0>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kQ5_1: return MatMulRowsT<DType::kQ5_1>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kQ8_0: return MatMulRowsT<DType::kQ8_0>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kQ4_K: return MatMulRowsT<DType::kQ4_K>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kQ5_K: return MatMulRowsT<DType::kQ5_K>(w, row_bytes, rows, cols, r0, r1, x, T, y);
    case DType::kQ6_K: return MatMulRowsT<DType::kQ6_K>(w, row_bytes, rows, cols, r0, r1, x, T, y);
  }
}

void DecodeRowAny(DType type, const uint8_t* src, float* dst, int64_t n) {
  switch (type) {
    case DType::kF32: return DecodeRowT<DType::kF32>(src, n, dst);
    case DType::kF16: return DecodeRowT<DType::kF16>(src, n, dst);
    case DType::kBF16: return DecodeRowT<DType::kBF16>(src, n, dst);
    case DType::kQ4_0: return DecodeRowT<DType::kQ4_0>(src, n, dst);
    case DType::kQ4_1: return DecodeRowT<DType::kQ4_1>(src, n, dst);
    case DType::kQ5_0: return DecodeRowT<DType::kQ5_0>(src, n, dst);
    case DType::kQ5_1: return DecodeRowT<DType::kQ5_1>(src, n, dst);
    case DType::kQ8_0: return DecodeRowT<DType::kQ8_0>(src, n, dst);
    case DType::kQ4_K: return DecodeRowT<DType::kQ4_K>(src, n, dst);
    case DType::kQ5_K: return DecodeRowT<DType::kQ5_K>(src, n, dst);
    case DType::kQ6_K: return DecodeRowT<DType::kQ6_K>(src, n, dst);
  }
}

// ---- norms ----

// Float statistics in vector lanes, two passes (mean, then squared deviations).
void LayerNormF(const float* x, const float* weight, const float* bias, int n, float eps,
                float* y) {
  const DF df;
  const int vec_n = n / static_cast<int>(kLanes) * static_cast<int>(kLanes);
  VF acc = hn::Zero(df);
  for (int i = 0; i < vec_n; i += kLanes) acc = hn::Add(acc, hn::LoadU(df, x + i));
  float sum = HorizontalSum(acc);
  for (int i = vec_n; i < n; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(n);
  const VF vm = hn::Set(df, mean);
  acc = hn::Zero(df);
  for (int i = 0; i < vec_n; i += kLanes) {
    const VF d = hn::Sub(hn::LoadU(df, x + i), vm);
    acc = hn::MulAdd(d, d, acc);
  }
  float ss = HorizontalSum(acc);
  for (int i = vec_n; i < n; ++i) ss += (x[i] - mean) * (x[i] - mean);
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  const VF vinv = hn::Set(df, inv);
  for (int i = 0; i < vec_n; i += kLanes) {
    const VF nx = hn::Mul(hn::Sub(hn::LoadU(df, x + i), vm), vinv);
    hn::StoreU(hn::MulAdd(nx, hn::LoadU(df, weight + i), hn::LoadU(df, bias + i)), df, y + i);
  }
  for (int i = vec_n; i < n; ++i) y[i] = (x[i] - mean) * inv * weight[i] + bias[i];
}

// ---- element-wise activations ----
// The tail is padded into a full vector so every element goes through the same vector code.

template <class F>
HWY_INLINE void Map(float* x, size_t n, F f) {
  const DF df;
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) hn::StoreU(f(df, hn::LoadU(df, x + i)), df, x + i);
  if (i < n) {
    HWY_ALIGN float tail[kLanes] = {};
    std::memcpy(tail, x + i, (n - i) * sizeof(float));
    hn::Store(f(df, hn::Load(df, tail)), df, tail);
    std::memcpy(x + i, tail, (n - i) * sizeof(float));
  }
}

HWY_INLINE VF SigmoidV(DF df, VF v) {
  // With e = e^-|v| (never overflows): 1 / (1 + e) for v >= 0, e / (1 + e) for v < 0.
  const VF e = hn::Exp(df, hn::Neg(hn::Abs(v)));
  const VF inv = hn::Div(hn::Set(df, 1.0f), hn::Add(hn::Set(df, 1.0f), e));
  return hn::IfThenElse(hn::Lt(v, hn::Zero(df)), hn::Mul(e, inv), inv);
}

// Functors rather than lambdas: every compiler then applies the target attributes.
struct TanhOp {
  HWY_INLINE VF operator()(DF df, VF v) const { return hn::Tanh(df, v); }
};
struct SigmoidOp {
  HWY_INLINE VF operator()(DF df, VF v) const { return SigmoidV(df, v); }
};
struct SiluOp {
  HWY_INLINE VF operator()(DF df, VF v) const { return hn::Mul(v, SigmoidV(df, v)); }
};
struct SquaredReluOp {  // branch-free: the signs of FFN keys are a coin toss
  HWY_INLINE VF operator()(DF df, VF v) const {
    const VF r = hn::IfThenZeroElse(hn::Lt(v, hn::Zero(df)), v);  // NaN stays NaN
    return hn::Mul(r, r);
  }
};
struct ExpOp {
  HWY_INLINE VF operator()(DF df, VF v) const {
    const float kMaxLog = 88.7228394f;  // ln(FLT_MAX)
    const VF e = hn::Exp(df, hn::Min(v, hn::Set(df, kMaxLog)));
    return hn::IfThenElse(hn::Gt(v, hn::Set(df, kMaxLog)), hn::Inf(df), e);
  }
};

void TanhF(float* x, size_t n) { Map(x, n, TanhOp()); }
void SigmoidF(float* x, size_t n) { Map(x, n, SigmoidOp()); }
void SiluF(float* x, size_t n) { Map(x, n, SiluOp()); }
void ExpF(float* x, size_t n) { Map(x, n, ExpOp()); }
void SquaredReluF(float* x, size_t n) { Map(x, n, SquaredReluOp()); }

const char* TargetNameF() { return hwy::TargetName(HWY_TARGET); }

}  // namespace HWY_NAMESPACE
}  // namespace aviary
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace aviary {

HWY_EXPORT(MatMulRows);
HWY_EXPORT(DecodeRowAny);
HWY_EXPORT(LayerNormF);
HWY_EXPORT(TanhF);
HWY_EXPORT(SigmoidF);
HWY_EXPORT(SiluF);
HWY_EXPORT(ExpF);
HWY_EXPORT(SquaredReluF);
HWY_EXPORT(TargetNameF);

namespace {

inline bool Reference() { return CurrentRuntime().options().kernels == Kernels::kReference; }

// Work below which a product runs on the calling thread alone: waking workers costs a few
// microseconds, the low-rank matrices (e.g. 64 x 1024) take about as long.
constexpr int64_t kMinParallelMacs = 1 << 17;

}  // namespace

Kernels ActiveKernels() { return CurrentRuntime().options().kernels; }
const char* KernelTarget() { return KernelTargetOf(ActiveKernels()); }
const char* KernelTargetOf(Kernels kernels) {
  return kernels == Kernels::kReference ? "scalar" : HWY_DYNAMIC_DISPATCH(TargetNameF)();
}

const char* Runtime::kernel_target() const { return KernelTargetOf(options_.kernels); }
bool Runtime::int8_activations() const {
  return options_.kernels == Kernels::kFast && options_.activations != Activations::kF32 &&
         int8::CpuSupported();
}
bool Runtime::bf16_activations() const {
  return options_.kernels == Kernels::kFast && options_.activations == Activations::kAuto &&
         bf16::CpuSupported();
}

namespace fast {

void MatMul(const Tensor& w, const float* x, int T, float* y, int max_threads) {
  const MatMulJob job{w, x, y};
  MatMulBatch(&job, 1, T, max_threads);
}

void MatMulBatch(const MatMulJob* jobs, int n_jobs, int T, int max_threads) {
  const auto kernel = HWY_DYNAMIC_DISPATCH(MatMulRows);
  // How each product is cut into tasks of whole 4-row tiles. Quantized weights take 8-bit
  // activations and integer dot products where the CPU has them, F16/BF16 weights bfloat16
  // ones; each x is rounded once here, before the rows are split, so every thread sees the
  // same numbers.
  enum class Path : uint8_t { kFloat, kInt8, kBf16 };
  struct Plan {
    Path path;
    int64_t tiles_per_task, first_task;
  };
  // One rounded x per product, kept for reuse (no allocation once they have grown).
  thread_local std::vector<int8::Activations> caller_acts;
  thread_local std::vector<bf16::Activations> caller_bf16;
  thread_local std::vector<Plan> plans;
  if (caller_acts.size() < static_cast<size_t>(n_jobs)) caller_acts.resize(n_jobs);
  if (caller_bf16.size() < static_cast<size_t>(n_jobs)) caller_bf16.resize(n_jobs);
  plans.resize(n_jobs);
  const int8::Activations* acts = caller_acts.data();  // what the workers' lambda reads
  const bf16::Activations* acts_bf16 = caller_bf16.data();
  int64_t macs = 0;
  for (int j = 0; j < n_jobs; ++j) macs += jobs[j].w.rows() * jobs[j].w.cols() * T;
  int threads = max_threads > 0 ? max_threads : NumThreads();
  if (macs < kMinParallelMacs) threads = 1;
  int64_t tasks = 0;
  for (int j = 0; j < n_jobs; ++j) {
    const Tensor& w = jobs[j].w;
    Plan& p = plans[j];
    p.path = int8::SupportsType(w.type) && int8::Enabled()   ? Path::kInt8
             : bf16::SupportsType(w.type) && bf16::Enabled() ? Path::kBf16
                                                             : Path::kFloat;
    if (p.path == Path::kInt8) int8::Quantize(jobs[j].x, T, w.cols(), &caller_acts[j]);
    if (p.path == Path::kBf16) bf16::RoundActivations(jobs[j].x, T, w.cols(), &caller_bf16[j]);
    // About 8 tasks per thread and product (dynamic hand-out evens out a busy core), each of at
    // least 16 rows so it streams a useful amount of memory; a product too small to be worth
    // splitting (a low-rank matrix) is one task, run beside the others.
    const int64_t tiles = (w.rows() + 3) / 4;
    int64_t per_task = tiles;
    if (threads > 1 && w.rows() * w.cols() * T >= kMinParallelMacs) {
      per_task = std::max<int64_t>(4, tiles / (8 * threads));
    }
    p.tiles_per_task = std::max<int64_t>(1, std::min(per_task, tiles));
    p.first_task = tasks;
    tasks += (tiles + p.tiles_per_task - 1) / p.tiles_per_task;
  }
  const Plan* plan = plans.data();  // the caller's plans, read by the workers
  auto run = [&](int64_t task, int) {
    int j = n_jobs - 1;
    while (plan[j].first_task > task) --j;  // a handful of products: a scan is enough
    const Tensor& w = jobs[j].w;
    const int64_t rows = w.rows();
    const int64_t r0 = (task - plan[j].first_task) * plan[j].tiles_per_task * 4;
    const int64_t r1 = std::min(rows, r0 + plan[j].tiles_per_task * 4);
    switch (plan[j].path) {
      case Path::kInt8:
        int8::MatMulRows(w.type, w.data, w.row_bytes(), rows, w.cols(), r0, r1, acts[j], jobs[j].y);
        break;
      case Path::kBf16:
        bf16::MatMulRows(w.type, w.data, w.row_bytes(), rows, w.cols(), r0, r1, acts_bf16[j],
                         jobs[j].y);
        break;
      case Path::kFloat:
        kernel(w.type, w.data, w.row_bytes(), rows, w.cols(), r0, r1, jobs[j].x, T, jobs[j].y);
        break;
    }
  };
  if (threads == 1 || tasks == 1) {
    for (int64_t t = 0; t < tasks; ++t) run(t, 0);
  } else {
    ParallelFor(tasks, run, threads);
  }
}

void DequantizeRow(DType type, const uint8_t* src, float* dst, int64_t n) {
  HWY_DYNAMIC_DISPATCH(DecodeRowAny)(type, src, dst, n);
}

void LayerNorm(const float* x, const float* weight, const float* bias, int n, float eps, float* y) {
  HWY_DYNAMIC_DISPATCH(LayerNormF)(x, weight, bias, n, eps, y);
}

void GroupNorm(const float* x, const float* weight, const float* bias, int n, int groups, float eps,
               float* y) {
  const int g = n / groups;
  const auto norm = HWY_DYNAMIC_DISPATCH(LayerNormF);
  for (int h = 0; h < groups; ++h) norm(x + h * g, weight + h * g, bias + h * g, g, eps, y + h * g);
}

void Tanh(float* x, size_t n) { HWY_DYNAMIC_DISPATCH(TanhF)(x, n); }
void Sigmoid(float* x, size_t n) { HWY_DYNAMIC_DISPATCH(SigmoidF)(x, n); }
void Exp(float* x, size_t n) { HWY_DYNAMIC_DISPATCH(ExpF)(x, n); }
void Silu(float* x, size_t n) { HWY_DYNAMIC_DISPATCH(SiluF)(x, n); }
void SquaredRelu(float* x, size_t n) { HWY_DYNAMIC_DISPATCH(SquaredReluF)(x, n); }

}  // namespace fast

// ---- the dispatching entry points ----

void MatMul(const Tensor& w, const float* x, int T, float* y) {
  if (Reference()) return ref::MatMul(w, x, T, y);
  fast::MatMul(w, x, T, y);
}

void MatMulBatch(std::span<const MatMulJob> jobs, int T) {
  if (Reference()) {
    for (const MatMulJob& j : jobs) ref::MatMul(j.w, j.x, T, j.y);
    return;
  }
  fast::MatMulBatch(jobs.data(), static_cast<int>(jobs.size()), T);
}

void GatherRow(const Tensor& table, int64_t row, float* y) {
  if (Reference()) return aviary::DequantizeRow(table.type, table.row(row), y, table.cols());
  fast::DequantizeRow(table.type, table.row(row), y, table.cols());
}

void LayerNorm(const float* x, const float* weight, const float* bias, int n, float eps, float* y) {
  if (Reference()) return ref::LayerNorm(x, weight, bias, n, eps, y);
  fast::LayerNorm(x, weight, bias, n, eps, y);
}

void GroupNorm(const float* x, const float* weight, const float* bias, int n, int groups, float eps,
               float* y) {
  if (Reference()) return ref::GroupNorm(x, weight, bias, n, groups, eps, y);
  fast::GroupNorm(x, weight, bias, n, groups, eps, y);
}

void TanhInPlace(float* x, size_t n) { Reference() ? ref::Tanh(x, n) : fast::Tanh(x, n); }
void SigmoidInPlace(float* x, size_t n) { Reference() ? ref::Sigmoid(x, n) : fast::Sigmoid(x, n); }
void ExpInPlace(float* x, size_t n) { Reference() ? ref::Exp(x, n) : fast::Exp(x, n); }
void SiluInPlace(float* x, size_t n) { Reference() ? ref::Silu(x, n) : fast::Silu(x, n); }
void SquaredReluInPlace(float* x, size_t n) {
  Reference() ? ref::SquaredRelu(x, n) : fast::SquaredRelu(x, n);
}

}  // namespace aviary
#endif  // HWY_ONCE
