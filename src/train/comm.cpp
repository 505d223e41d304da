#include "train/comm.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "aviary/error.h"

#ifdef AVIARY_WITH_MPI
#include <mpi.h>
#endif

namespace aviary::train {
namespace {

using Clock = std::chrono::steady_clock;

class SingleComm final : public Comm {};

#ifdef AVIARY_WITH_MPI

class MpiComm final : public Comm {
 public:
  explicit MpiComm(size_t bucket_floats) : bucket_floats_(bucket_floats) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      // A rank waiting for the others' gradients yields its core instead of spinning on it
      // (unless the user chose otherwise): on a machine whose cores are all busy, a spinning
      // rank takes the CPU from the ranks it is waiting for.
      setenv("OMPI_MCA_mpi_yield_when_idle", "1", 0);
      // Only the thread that runs the training loop calls MPI (the kernels' workers never do).
      int provided = 0;
      MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
  }
  ~MpiComm() override { Finalize(); }
  void Finalize() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }

  std::string host() const override {
    char name[MPI_MAX_PROCESSOR_NAME];
    int len = 0;
    MPI_Get_processor_name(name, &len);
    return std::string(name, static_cast<size_t>(std::max(len, 0)));
  }

  void Begin(float* data, size_t n) override {
    if (requests_.size()) throw Error("internal: a gradient reduction is still in flight");
    if (!buckets_ || n != n_) buckets_ = std::make_unique<Buckets>(n, bucket_floats_);
    buckets_->Reset();
    data_ = data;
    n_ = n;
  }

  void Ready(size_t begin, size_t end) override {
    const auto t0 = Clock::now();
    for (const auto& [b, e] : buckets_->MarkReady(begin, end)) {
      MPI_Request request;
      MPI_Iallreduce(MPI_IN_PLACE, data_ + b, static_cast<int>(e - b), MPI_FLOAT, MPI_SUM,
                     MPI_COMM_WORLD, &request);
      requests_.push_back(request);
    }
    // MPI advances non-blocking reductions only inside MPI calls (no progress thread by
    // default): each callback lets the ones under way move on while the backward continues.
    if (!requests_.empty()) {
      int done = 0;
      MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &done,
                  MPI_STATUSES_IGNORE);
    }
    seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
  }

  void Finish() override {
    const auto t0 = Clock::now();
    if (!buckets_->AllReady()) throw Error("internal: gradients not all marked ready");
    MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE);
    requests_.clear();
    seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
  }

  void AllReduceSum(double* data, size_t n) override {
    Timed([&] {
      MPI_Allreduce(MPI_IN_PLACE, data, static_cast<int>(n), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    });
  }
  void AllReduceMax(double* data, size_t n) override {
    Timed([&] {
      MPI_Allreduce(MPI_IN_PLACE, data, static_cast<int>(n), MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    });
  }
  std::vector<uint64_t> AllGather(uint64_t value) override {
    std::vector<uint64_t> all(static_cast<size_t>(size_));
    Timed([&] {
      MPI_Allgather(&value, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, MPI_COMM_WORLD);
    });
    return all;
  }
  void Broadcast(void* data, size_t bytes, int root) override {
    Timed([&] {
      for (size_t at = 0; at < bytes;) {
        const size_t part = std::min<size_t>(bytes - at, INT_MAX);
        MPI_Bcast(static_cast<char*>(data) + at, static_cast<int>(part), MPI_BYTE, root,
                  MPI_COMM_WORLD);
        at += part;
      }
    });
  }
  void Barrier() override {
    Timed([] { MPI_Barrier(MPI_COMM_WORLD); });
  }
  [[noreturn]] void Abort(int status) override {
    MPI_Abort(MPI_COMM_WORLD, status);
    std::_Exit(status);
  }

 private:
  template <typename F>
  void Timed(F&& f) {
    const auto t0 = Clock::now();
    f();
    seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
  }

  size_t bucket_floats_;
  std::unique_ptr<Buckets> buckets_;
  float* data_ = nullptr;
  size_t n_ = 0;
  std::vector<MPI_Request> requests_;
};

#endif  // AVIARY_WITH_MPI

}  // namespace

Buckets::Buckets(size_t n, size_t bucket_floats)
    : n_(n), size_(std::max<size_t>(bucket_floats, 1)), ready_((n + size_ - 1) / size_, 0) {}

void Buckets::Reset() {
  std::fill(ready_.begin(), ready_.end(), 0);
  complete_ = 0;
}

std::vector<std::pair<size_t, size_t>> Buckets::MarkReady(size_t begin, size_t end) {
  if (begin > end || end > n_) throw Error("internal: a gradient range outside the buffer");
  std::vector<std::pair<size_t, size_t>> done;
  while (begin < end) {
    const size_t k = begin / size_;
    const size_t b = k * size_, e = std::min(b + size_, n_);
    const size_t part = std::min(end, e) - begin;
    ready_[k] += part;
    if (ready_[k] > e - b) throw Error("internal: a gradient range marked ready twice");
    if (ready_[k] == e - b) {
      done.emplace_back(b, e);
      ++complete_;
    }
    begin += part;
  }
  return done;
}

std::string Comm::host() const {
  char name[256] = {};
  if (gethostname(name, sizeof name - 1) != 0) return "?";
  return name;
}

void Comm::Abort(int status) { std::exit(status); }

namespace {
std::unique_ptr<Comm>& World() {
  static std::unique_ptr<Comm> world;
  return world;
}
}  // namespace

Comm& InitWorldComm(const CommOptions& options) {
  std::unique_ptr<Comm>& world = World();
  if (world) throw Error("internal: the communicator is set up twice");
#ifdef AVIARY_WITH_MPI
  if (options.launched > 0) {
    world = std::make_unique<MpiComm>(std::max<size_t>(options.bucket_floats, 1));
    return *world;
  }
#else
  if (options.launched > 1) {
    // Every process would say the same: the first says it, the others just fail.
    if (options.rank != 0) std::_Exit(1);
    throw Error("this aviary was built without MPI, so it cannot train as " +
                std::to_string(options.launched) +
                " processes under mpirun: rebuild it with MPI (Debian: libopenmpi-dev) or run "
                "one process without mpirun");
  }
#endif
  world = std::make_unique<SingleComm>();
  return *world;
}

Comm& WorldComm() {
  std::unique_ptr<Comm>& world = World();
  if (!world) world = std::make_unique<SingleComm>();
  return *world;
}

std::unique_ptr<Comm> SingleProcessComm() { return std::make_unique<SingleComm>(); }

bool CommHasMpi() {
#ifdef AVIARY_WITH_MPI
  return true;
#else
  return false;
#endif
}

uint64_t FloatsChecksum(const float* data, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  size_t i = 0;
  for (; i + 2 <= n; i += 2) {
    uint64_t word;
    std::memcpy(&word, data + i, sizeof word);
    h = (h ^ word) * 0x100000001b3ull;
  }
  if (i < n) {
    uint32_t last;
    std::memcpy(&last, data + i, sizeof last);
    h = (h ^ last) * 0x100000001b3ull;
  }
  return h;
}

}  // namespace aviary::train
