#include "tensor/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
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

// Jobs are handed out task by task through one atomic word holding (job id, task count, next
// task), claimed with compare-and-swap, so a worker that wakes late can never take a task of a
// job that has moved on. The caller runs tasks too and returns when every task is done: it never
// waits for a worker that has not started (on a busy machine a worker may not get a core for
// milliseconds; the caller then simply does all the work).
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { WorkerLoop(i); });
  }
  ~Pool() {
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

  std::vector<std::thread> workers_;
  std::atomic<uint32_t> generation_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  uint64_t job_id_ = 0;  // only Run() (under g_run_mutex) touches it
  std::atomic<detail::TaskFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int> participants_{0};
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};
};

std::mutex g_config_mutex;  // guards g_pool replacement and g_threads
std::mutex g_run_mutex;     // one ParallelFor at a time uses the workers
std::unique_ptr<Pool> g_pool;
int g_threads = 0;  // 0: not chosen yet

int ParseThreads(const char* s) {
  if (!s || !*s) return 0;
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  if (*end != '\0' || v < 1 || v > 1024) return 0;
  return static_cast<int>(v);
}

// The pool for `threads` threads, created on first use.
Pool* GetPool(int threads) {
  std::lock_guard<std::mutex> lock(g_config_mutex);
  if (!g_pool || g_pool->size() != threads) {
    g_pool.reset();
    g_pool = std::make_unique<Pool>(threads);
  }
  return g_pool.get();
}

}  // namespace

int DefaultNumThreads() {
  if (const int env = ParseThreads(std::getenv("AVIARY_THREADS"))) return env;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(std::min(hw, 1024u));
}

void SetNumThreads(int n) {
  std::lock_guard<std::mutex> run(g_run_mutex);
  std::lock_guard<std::mutex> lock(g_config_mutex);
  g_threads = n > 0 ? std::min(n, 1024) : DefaultNumThreads();
  if (g_pool && g_pool->size() != g_threads) g_pool.reset();  // restarted lazily
}

int NumThreads() {
  std::lock_guard<std::mutex> lock(g_config_mutex);
  if (g_threads == 0) g_threads = DefaultNumThreads();
  return g_threads;
}

namespace detail {

void ParallelForImpl(int64_t n_tasks, TaskFn fn, void* ctx, int max_threads) {
  const int pool_threads = NumThreads();
  int threads = max_threads > 0 ? std::min(max_threads, pool_threads) : pool_threads;
  if (threads > n_tasks) threads = static_cast<int>(n_tasks);
  auto serial = [&] {
    for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t, 0);
  };
  if (threads <= 1 || t_inside_task) return serial();
  std::unique_lock<std::mutex> run(g_run_mutex, std::try_to_lock);
  if (!run.owns_lock()) return serial();  // another thread is using the pool
  Pool* pool = GetPool(pool_threads);
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
      pool->Run(n, fn, ctx, threads);
    } else {
      pool->Run(n, trampoline, &slice, threads);
    }
  }
}

}  // namespace detail
}  // namespace aviary
