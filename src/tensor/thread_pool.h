// The kernels' thread pools and the runtime they run on.
//
// Each Runtime (aviary/runtime.h) owns a pool of worker threads, started on the runtime's first
// parallel loop and then reused: a parallel loop inside the token loop starts no thread and
// allocates nothing. Idle workers spin briefly (the next matrix product usually follows within
// microseconds) and then sleep on a futex. The caller of ParallelFor always takes part, so a
// runtime of 1 thread has no worker threads at all.
//
// Which runtime: the kernels read this thread's current runtime (CurrentRuntime) instead of
// taking it as a parameter. The runtime is fixed for a whole evaluation while MatMul and
// ParallelFor are called from every stage of every model version, so Model::Eval installs the
// model's runtime for its duration (ScopedRuntime) and each pool's workers have their owner
// installed; a thread runs one evaluation at a time, so two threads evaluating two models each
// see their own. Outside any evaluation (tests and tools calling kernels directly) it is
// Runtime::Default().
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "aviary/runtime.h"

namespace aviary {

// The runtime the kernels on this thread use.
Runtime& CurrentRuntime();

// Makes `runtime` the current runtime on this thread while it lives; nullptr keeps the current
// one. Only a thread pointer changes: no allocation, no lock.
class ScopedRuntime {
 public:
  explicit ScopedRuntime(Runtime* runtime);
  ~ScopedRuntime();
  ScopedRuntime(const ScopedRuntime&) = delete;
  ScopedRuntime& operator=(const ScopedRuntime&) = delete;

 private:
  Runtime* previous_;
  bool installed_;
};

// Replaces this thread's current runtime (nullptr: back to the default) and returns the previous
// one (nullptr when it was the default); for tests that switch runtimes between kernel calls.
Runtime* SetThreadRuntime(Runtime* runtime);

// The number of threads ParallelFor may use (including the calling thread): the current
// runtime's.
int NumThreads();
// std::thread::hardware_concurrency(), at least 1 and at most 1024.
int HardwareThreads();

namespace detail {
using TaskFn = void (*)(void* ctx, int64_t task, int thread);
void ParallelForImpl(int64_t n_tasks, TaskFn fn, void* ctx, int max_threads);
}  // namespace detail

// Runs fn(task, thread) for every task in [0, n_tasks), spread over up to `max_threads`
// threads (0 = NumThreads()) of the current runtime's pool; `thread` is in [0, threads) (0 =
// the caller), for statistics only: nested or concurrent callers may see the same index, so
// per-thread buffers must be thread_local, not indexed by it. Tasks are handed out
// dynamically. Returns when all are done. Called from inside a task, or while another thread
// is using the same pool, it runs the tasks serially on the calling thread (same results: work
// never depends on the thread).
template <typename F>
void ParallelFor(int64_t n_tasks, F&& fn, int max_threads = 0) {
  if (n_tasks <= 0) return;
  auto call = [](void* ctx, int64_t task, int thread) {
    (*static_cast<std::remove_reference_t<F>*>(ctx))(task, thread);
  };
  detail::ParallelForImpl(n_tasks, call, const_cast<void*>(static_cast<const void*>(&fn)),
                          max_threads);
}

// fn(begin, end) over consecutive ranges of `chunk` items that cover [0, n), spread over the
// pool; fewer than two chunks run inline on the caller (no hand-off for small work).
template <typename F>
void ParallelForRanges(int64_t n, int64_t chunk, F&& fn) {
  if (n < 2 * chunk) return fn(int64_t{0}, n);
  ParallelFor((n + chunk - 1) / chunk, [&](int64_t task, int) {
    const int64_t begin = task * chunk;
    fn(begin, std::min(n, begin + chunk));
  });
}

}  // namespace aviary
