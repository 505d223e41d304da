#include "tensor/thread_pool.h"

#include "aviary/error.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <string>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace aviary {
namespace {

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#else
  std::this_thread::yield();
#endif
}

// How long an idle worker spins before it sleeps: long enough to bridge the gaps between the
// matrix products of one token (and between tokens while generating), short enough not to
// burn a core when the model is idle.
constexpr auto kSpin = std::chrono::microseconds(1000);

// The claim word: job id (20 bits) << 44 | task count (22 bits) << 22 | next task (22 bits).
constexpr uint64_t kJobMask = (uint64_t{1} << 20) - 1;
constexpr uint64_t kTaskMask = (uint64_t{1} << 22) - 1;
constexpr int64_t kMaxTasksPerRun = static_cast<int64_t>(kTaskMask);

thread_local bool t_inside_task = false;
thread_local Runtime* t_runtime = nullptr;  // nullptr: Runtime::Default()

// Jobs are handed out task by task through one atomic word holding (job id, task count, next
// task), claimed with compare-and-swap, so a worker that wakes late can never take a task of a
// job that has moved on. The caller runs tasks too and returns when every task is done: it never
// waits for a worker that has not started (on a busy machine a worker may not get a core for
// milliseconds; the caller then simply does all the work).
class Workers {
 public:
  Workers(int threads, Runtime* owner) : owner_(owner) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { WorkerLoop(i); });
  }
  ~Workers() {
    stop_.store(true);
    generation_.fetch_add(1);
    generation_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void Run(int64_t n_tasks, detail::TaskFn fn, void* ctx, int threads) {
    const uint64_t job = job_id_ = (job_id_ + 1) & kJobMask;
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    participants_.store(threads - 1, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    claim_.store(job << 44 | static_cast<uint64_t>(n_tasks) << 22, std::memory_order_release);
    generation_.store(static_cast<uint32_t>(job));  // seq_cst: wakes the workers
    if (sleepers_.load() > 0) generation_.notify_all();
    t_inside_task = true;
    RunTasks(job, 0);
    t_inside_task = false;
    for (int spins = 0; done_.load(std::memory_order_acquire) != n_tasks; ++spins) {
      if (spins < 4096) {
        CpuRelax();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  // Claims the next task of `job`; false when the job has none left or is not current.
  bool Claim(uint64_t job, int64_t* task) {
    uint64_t c = claim_.load(std::memory_order_acquire);
    for (;;) {
      if ((c >> 44) != job) return false;
      const int64_t index = static_cast<int64_t>(c & kTaskMask);
      if (index >= static_cast<int64_t>((c >> 22) & kTaskMask)) return false;
      if (claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel,
                                       std::memory_order_acquire)) {
        *task = index;
        return true;
      }
    }
  }

  void RunTasks(uint64_t job, int thread) {
    int64_t task;
    while (Claim(job, &task)) {
      // The job cannot finish while this task is claimed, so fn_ and ctx_ are still its own.
      fn_.load(std::memory_order_relaxed)(ctx_.load(std::memory_order_relaxed), task, thread);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void WorkerLoop(int index) {
    t_inside_task = true;  // a worker's nested ParallelFor runs serially
    t_runtime = owner_;    // kernel choice and activation rounding inside tasks are the owner's
    uint32_t seen = 0;     // the generation at construction
    for (;;) {
      // Wait for the next job: spin first, then sleep.
      const auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        CpuRelax();
        if ((++spins & 255) == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          sleepers_.fetch_add(1);  // seq_cst, paired with Run()'s store then load
          generation_.wait(seen);
          sleepers_.fetch_sub(1);
        }
      }
      seen = generation_.load(std::memory_order_acquire);
      if (stop_.load()) return;
      if (index <= participants_.load(std::memory_order_relaxed)) RunTasks(seen & kJobMask, index);
    }
  }

  Runtime* owner_;
  std::vector<std::thread> workers_;
  std::atomic<uint32_t> generation_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  uint64_t job_id_ = 0;  // only Run() (under the pool's run mutex) touches it
  std::atomic<detail::TaskFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int> participants_{0};
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};
};

}  // namespace

// A runtime's workers, started by its first parallel loop, and what the stats report.
struct Runtime::Pool {
  std::mutex run_mutex;              // one ParallelFor at a time uses the workers
  std::unique_ptr<Workers> workers;  // created under run_mutex
  std::atomic<uint64_t> parallel_runs{0};
  std::atomic<uint64_t> busy_fallbacks{0};
};

struct RuntimeAccess {
  static Runtime::Pool& PoolOf(Runtime& runtime) { return *runtime.pool_; }
};

int HardwareThreads() {
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(std::min(hw, 1024u));
}

Runtime::Runtime(const RuntimeOptions& options)
    : options_(options), threads_(options.threads), pool_(std::make_unique<Pool>()) {
  if (options.threads < 0 || options.threads > 1024) {
    throw UsageError("thread count " + std::to_string(options.threads) +
                     " is outside 1..1024 (0 = the hardware threads)");
  }
  if (threads_ == 0) threads_ = HardwareThreads();
}

Runtime::~Runtime() = default;

Runtime::Stats Runtime::stats() const {
  return {pool_->parallel_runs.load(std::memory_order_relaxed),
          pool_->busy_fallbacks.load(std::memory_order_relaxed)};
}

const std::shared_ptr<Runtime>& Runtime::Default() {
  static const std::shared_ptr<Runtime> runtime = std::make_shared<Runtime>();
  return runtime;
}

Runtime& CurrentRuntime() { return t_runtime ? *t_runtime : *Runtime::Default(); }

Runtime* SetThreadRuntime(Runtime* runtime) {
  Runtime* previous = t_runtime;
  t_runtime = runtime;
  return previous;
}

ScopedRuntime::ScopedRuntime(Runtime* runtime) : previous_(t_runtime), installed_(runtime) {
  if (installed_) t_runtime = runtime;
}

ScopedRuntime::~ScopedRuntime() {
  if (installed_) t_runtime = previous_;
}

int NumThreads() { return CurrentRuntime().threads(); }

namespace detail {

void ParallelForImpl(int64_t n_tasks, TaskFn fn, void* ctx, int max_threads) {
  Runtime& runtime = CurrentRuntime();
  const int pool_threads = runtime.threads();
  int threads = max_threads > 0 ? std::min(max_threads, pool_threads) : pool_threads;
  if (threads > n_tasks) threads = static_cast<int>(n_tasks);
  auto serial = [&] {
    for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t, 0);
  };
  if (threads <= 1 || t_inside_task) return serial();
  auto& pool = RuntimeAccess::PoolOf(runtime);
  std::unique_lock<std::mutex> run(pool.run_mutex, std::try_to_lock);
  if (!run.owns_lock()) {  // another thread is using this runtime's pool
    pool.busy_fallbacks.fetch_add(1, std::memory_order_relaxed);
    return serial();
  }
  if (!pool.workers) pool.workers = std::make_unique<Workers>(pool_threads, &runtime);
  pool.parallel_runs.fetch_add(1, std::memory_order_relaxed);
  Workers* workers = pool.workers.get();
  // More tasks than the claim word counts: run them in slices.
  struct Slice {
    TaskFn fn;
    void* ctx;
    int64_t offset;
  } slice{fn, ctx, 0};
  auto trampoline = [](void* c, int64_t task, int thread) {
    const Slice* s = static_cast<const Slice*>(c);
    s->fn(s->ctx, s->offset + task, thread);
  };
  for (; slice.offset < n_tasks; slice.offset += kMaxTasksPerRun) {
    const int64_t n = std::min(kMaxTasksPerRun, n_tasks - slice.offset);
    if (slice.offset == 0 && n == n_tasks) {
      workers->Run(n, fn, ctx, threads);
    } else {
      workers->Run(n, trampoline, &slice, threads);
    }
  }
}

}  // namespace detail
}  // namespace aviary
