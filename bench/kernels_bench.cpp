// Microbenchmarks of the kernels (Google Benchmark): MatMul per weight type and shape, fast and
// reference, one token (generation) and 64 tokens (sequence mode), plus the WKV recurrences.
//   build/aviary_kernels_bench --benchmark_filter='MatMul/Q8_0' --benchmark_min_time=0.5
// Counters: bytes_per_second = weight bytes streamed, FLOPS = 2 * rows * cols * T per second.
#include <benchmark/benchmark.h>

#include <cstring>
#include <random>
#include <vector>

#include "tensor/dtype.h"
#include "tensor/gemm.h"
#include "tensor/kernels.h"
#include "tensor/reference.h"
#include "tensor/tensor.h"
#include "tensor/thread_pool.h"
#include "tensor/wkv.h"

namespace {

using aviary::DType;

constexpr DType kTypes[] = {DType::kF32,  DType::kF16,  DType::kBF16, DType::kQ4_0,
                            DType::kQ4_1, DType::kQ5_0, DType::kQ5_1, DType::kQ8_0};

// Random stored bytes for a rows x cols matrix: floats ~ N(0, 0.05), quantized blocks with
// small positive scales (half 0x2000 ~ 0.0078) and random quants.
std::vector<uint8_t> RandomWeights(DType type, int64_t rows, int64_t cols) {
  std::mt19937 rng(1);
  const size_t bytes = aviary::StorageBytes(type, static_cast<uint64_t>(rows * cols));
  std::vector<uint8_t> data(bytes);
  if (type == DType::kF32 || type == DType::kF16 || type == DType::kBF16) {
    std::normal_distribution<float> normal(0.0f, 0.05f);
    for (int64_t i = 0; i < rows * cols; ++i) {
      const float f = normal(rng);
      if (type == DType::kF32) {
        std::memcpy(&data[4 * i], &f, 4);
      } else if (type == DType::kF16) {
        const uint16_t h = aviary::F32ToF16(f);
        std::memcpy(&data[2 * i], &h, 2);
      } else {
        uint32_t bits;
        std::memcpy(&bits, &f, 4);
        const uint16_t h = static_cast<uint16_t>(bits >> 16);
        std::memcpy(&data[2 * i], &h, 2);
      }
    }
    return data;
  }
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  const int block = aviary::Traits(type).block_bytes;
  const bool has_m = type == DType::kQ4_1 || type == DType::kQ5_1;
  for (size_t off = 0; off < bytes; off += block) {
    const uint16_t d = 0x2000, m = 0xa000;
    std::memcpy(&data[off], &d, 2);
    if (has_m) std::memcpy(&data[off + 2], &m, 2);
  }
  return data;
}

struct Case {
  std::vector<uint8_t> bytes;
  aviary::Tensor w;
  std::vector<float> x, y;
};

Case MakeCase(DType type, int64_t rows, int64_t cols, int T) {
  Case c;
  c.bytes = RandomWeights(type, rows, cols);
  c.w.name = "w";
  c.w.type = type;
  c.w.shape = {rows, cols};
  c.w.data = c.bytes.data();
  c.w.nbytes = c.bytes.size();
  std::mt19937 rng(2);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  c.x.resize(static_cast<size_t>(T) * cols);
  for (auto& v : c.x) v = normal(rng);
  c.y.resize(static_cast<size_t>(T) * rows);
  return c;
}

// Args: type index, rows, cols, T, threads, reference(0/1).
void BM_MatMul(benchmark::State& state) {
  const DType type = kTypes[state.range(0)];
  const int64_t rows = state.range(1), cols = state.range(2);
  const int T = static_cast<int>(state.range(3));
  const int threads = static_cast<int>(state.range(4));
  const bool reference = state.range(5) != 0;
  Case c = MakeCase(type, rows, cols, T);
  aviary::Runtime runtime({.threads = threads});
  const aviary::ScopedRuntime on_runtime(&runtime);
  for (auto _ : state) {
    if (reference) {
      aviary::ref::MatMul(c.w, c.x.data(), T, c.y.data());
    } else {
      aviary::fast::MatMul(c.w, c.x.data(), T, c.y.data(), threads);
    }
    benchmark::DoNotOptimize(c.y.data());
    benchmark::ClobberMemory();
  }
  state.SetLabel(std::string(aviary::DTypeName(type)) + (reference ? " reference" : " fast ") +
                 (reference ? "" : aviary::KernelTarget()));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * c.w.nbytes);
  state.counters["FLOPS"] =
      benchmark::Counter(2.0 * rows * cols * T * state.iterations(), benchmark::Counter::kIsRate);
}

void MatMulArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"type", "rows", "cols", "T", "threads", "ref"});
  for (int type = 0; type < 8; ++type) {
    // 1024 x 1024 (RWKV-7 0.4B attention), 4096 x 1024 (its FFN key), T = 1 and 64.
    for (auto [rows, cols] : {std::pair{1024, 1024}, std::pair{4096, 1024}}) {
      for (int T : {1, 64}) {
        for (int threads : {1, 2}) b->Args({type, rows, cols, T, threads, 0});
      }
      b->Args({type, rows, cols, 1, 1, 1});  // the scalar reference, one token
    }
  }
  b->UseRealTime();
}
BENCHMARK(BM_MatMul)->Apply(MatMulArgs);

// The training products (gemm.h) at RWKV-7 training shapes, and MatMul on the same F32 weights
// for comparison with the forward. Args: product (0 forward, 1 backward input, 2 backward
// weight, 3 MatMul), rows, cols, T, threads.
void BM_Gemm(benchmark::State& state) {
  const int product = static_cast<int>(state.range(0));
  const int64_t rows = state.range(1), cols = state.range(2);
  const int T = static_cast<int>(state.range(3));
  const int threads = static_cast<int>(state.range(4));
  Case c = MakeCase(DType::kF32, rows, cols, T);
  const float* w = reinterpret_cast<const float*>(c.bytes.data());
  std::vector<float> dy(static_cast<size_t>(T) * rows, 0.01f), dx(c.x.size());
  std::vector<float> dw(static_cast<size_t>(rows) * cols);
  aviary::Runtime runtime({.threads = threads});
  const aviary::ScopedRuntime on_runtime(&runtime);
  for (auto _ : state) {
    switch (product) {
      case 0: aviary::MatMulForwardF32(w, rows, cols, c.x.data(), T, c.y.data()); break;
      case 1: aviary::MatMulBackwardInput(w, rows, cols, dy.data(), T, dx.data(), false); break;
      case 2:
        aviary::MatMulBackwardWeight(dy.data(), c.x.data(), T, rows, cols, dw.data(), false);
        break;
      default: aviary::fast::MatMul(c.w, c.x.data(), T, c.y.data(), threads); break;
    }
    benchmark::ClobberMemory();
  }
  static const char* const kNames[] = {"forward", "backward input", "backward weight", "MatMul"};
  state.SetLabel(std::string(kNames[product]) + " " + aviary::KernelTarget());
  state.counters["FLOPS"] =
      benchmark::Counter(2.0 * rows * cols * T * state.iterations(), benchmark::Counter::kIsRate);
}

void GemmArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"product", "rows", "cols", "T", "threads"});
  // RWKV-7 at 768 wide: the square projections, the FFN key and value, the low-rank paths and
  // a small model's matrices; T = 768 and 6144 positions per step.
  const std::pair<int, int> shapes[] = {{768, 768}, {3072, 768}, {768, 3072}, {128, 128},
                                        {512, 128}, {32, 768},   {768, 32},   {256, 128}};
  for (int product = 0; product < 4; ++product) {
    for (auto [rows, cols] : shapes) {
      for (int T : {768, 6144}) {
        for (int threads : {1, 2}) b->Args({product, rows, cols, T, threads});
      }
    }
  }
  b->UseRealTime();
}
BENCHMARK(BM_Gemm)->Apply(GemmArgs);

// WKV-7 and WKV-5 over a 0.4B-sized layer (16 heads of 64): one token, and 64 tokens.
void BM_Wkv(benchmark::State& state) {
  const bool v7 = state.range(0) == 7;
  const int T = static_cast<int>(state.range(1));
  const bool reference = state.range(2) != 0;
  const int H = 16, N = 64, C = H * N;
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f), pos(0.5f, 0.99f);
  auto vec = [&](size_t n, bool positive) {
    std::vector<float> v(n);
    for (auto& f : v) f = positive ? pos(rng) : u(rng) * 0.1f;
    return v;
  };
  auto r = vec(T * C, false), k = vec(T * C, false), v = vec(T * C, false);
  auto w = vec(T * C, true), kk = vec(T * C, false), a = vec(T * C, true);
  auto first = vec(C, false);
  std::vector<float> S(static_cast<size_t>(C) * N, 0.0f), out(T * C);
  aviary::Runtime runtime(
      {.threads = 1, .kernels = reference ? aviary::Kernels::kReference : aviary::Kernels::kFast});
  const aviary::ScopedRuntime on_runtime(&runtime);
  for (auto _ : state) {
    if (v7) {
      aviary::Wkv7Seq(T, H, N, r.data(), w.data(), k.data(), v.data(), kk.data(), a.data(),
                      S.data(), out.data());
    } else {
      aviary::Wkv5Seq(T, H, N, r.data(), k.data(), v.data(), w.data(), true, first.data(), S.data(),
                      out.data());
    }
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * T);
  state.SetLabel(reference ? "reference" : "fast");
}
BENCHMARK(BM_Wkv)->ArgNames({"v", "T", "ref"})->ArgsProduct({{5, 7}, {1, 64}, {0, 1}});

}  // namespace

BENCHMARK_MAIN();
