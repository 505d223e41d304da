// A persistent pool of worker threads for the kernels. Threads are started once (first use, or
// SetNumThreads) and then reused: running a parallel loop inside the token loop starts no thread
// and allocates nothing. Idle workers spin briefly (the next matrix product usually follows
// within microseconds) and then sleep on a futex.
//
// Thread count: SetNumThreads(n) if called, else the environment variable AVIARY_THREADS, else
// the number of hardware threads. The caller of ParallelFor always takes part, so n = 1 means
// no worker threads at all.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace aviary {

// Sets the number of threads the kernels use (>= 1; 0 = the default). Not thread-safe with
// respect to a running ParallelFor: call it before evaluating.
void SetNumThreads(int n);
// The number of threads ParallelFor may use (including the calling thread).
int NumThreads();
// The default: AVIARY_THREADS if set and valid, else std::thread::hardware_concurrency().
int DefaultNumThreads();

namespace detail {
using TaskFn = void (*)(void* ctx, int64_t task, int thread);
void ParallelForImpl(int64_t n_tasks, TaskFn fn, void* ctx, int max_threads);
}  // namespace detail

// Runs fn(task, thread) for every task in [0, n_tasks), spread over up to `max_threads`
// threads (0 = NumThreads()); `thread` is in [0, threads) (0 = the caller), for statistics
// only: nested or concurrent callers may see the same index, so per-thread buffers must be
// thread_local, not indexed by it. Tasks are handed out dynamically. Returns when all are
// done. Called from inside a task, or while another thread is using the pool, it runs the
// tasks serially on the calling thread (same results: work never depends on the thread).
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
