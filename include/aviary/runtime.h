// How a model runs: its threads, kernels and activation rounding (a Runtime), and how its file
// is held in memory (LoadOptions). Nothing here reads the environment: a program chooses (the
// aviary CLI maps its flags and AVIARY_* variables onto these options).
#pragma once

#include <cstdint>
#include <memory>

namespace aviary {

// Which implementation computes the products and activations.
enum class Kernels {
  kFast,       // Highway SIMD with run-time dispatch, threaded over the runtime's pool
  kReference,  // the scalar loops the fast kernels are tested against
};

// Which rounded-activation paths the fast kernels may take, each only where the CPU has it.
enum class Activations {
  kAuto,  // 8-bit activations for quantized matrices, bfloat16 for F16/BF16 ones
  kInt8,  // 8-bit only
  kF32,   // neither: every product in float
};

// How a model file's bytes are held.
enum class LoadMode {
  kAuto,  // read into huge pages for files of 512 MiB and more where the kernel offers them
  kMmap,  // memory-mapped: pages come in on first touch and are shared with the page cache
  kRead,  // read at once into anonymous memory advised for huge pages
};

struct RuntimeOptions {
  int threads = 0;  // including the calling thread; 0 = the hardware threads
  Kernels kernels = Kernels::kFast;
  Activations activations = Activations::kAuto;
};

// Threads, kernel choice and activation rounding for the models that run on it. Each Runtime
// owns its own pool of worker threads (started on first use), so two models on two runtimes
// evaluate at the same time at full speed. One Runtime runs one evaluation at a time at full
// speed: a second caller arriving while its pool is busy runs its work on its own thread.
class Runtime {
 public:
  // Throws aviary::UsageError for threads outside 0..1024.
  explicit Runtime(const RuntimeOptions& options = {});
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  // The options as given (threads may be 0); threads() is the resolved count.
  const RuntimeOptions& options() const { return options_; }
  int threads() const { return threads_; }
  // The instruction set the kernels run with, e.g. "AVX3" (AVX-512) or "AVX2"; "scalar" for
  // Kernels::kReference.
  const char* kernel_target() const;
  // Whether products use 8-bit (quantized weights) or bfloat16 (F16/BF16 weights) activations
  // on this CPU with these options.
  bool int8_activations() const;
  bool bf16_activations() const;

  // Parallel loops this runtime handed to its workers, and the ones it ran on the caller's
  // thread alone because another caller held its pool.
  struct Stats {
    uint64_t parallel_runs = 0;
    uint64_t busy_fallbacks = 0;
  };
  Stats stats() const;

  // The runtime of models loaded without one (and of kernels called outside any model):
  // default options, created on first use.
  static const std::shared_ptr<Runtime>& Default();

 private:
  struct Pool;  // the worker threads and their counters (src/tensor/thread_pool.cpp)
  friend struct RuntimeAccess;
  RuntimeOptions options_;
  int threads_;
  std::unique_ptr<Pool> pool_;
};

struct LoadOptions {
  LoadMode load_mode = LoadMode::kAuto;
  std::shared_ptr<Runtime> runtime;  // null: Runtime::Default()
};

}  // namespace aviary
