// The processes of a data-parallel training run and what they exchange: the gradients' sum
// over ranks, a few small sums and flags, the weights' checksums.
//
// Over MPI when aviary is built with it (AVIARY_MPI) and started by a launcher (mpirun);
// otherwise one process, where every exchange is a no-op. Only comm.cpp includes mpi.h, and
// nothing here assumes the ranks share a host: everything goes through messages.
//
// A GPU build would swap in NCCL here: ncclAllReduce on device buffers, on a CUDA stream of its
// own, with the same buckets started by the same backward-pass callback; MPI would then only
// start the processes and exchange the NCCL unique id (a Broadcast).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace aviary::train {

// Splits a flat buffer of n floats into fixed buckets [k S, (k + 1) S) and says which buckets
// are complete as ranges of it become ready, so that each bucket is sent exactly once, as soon
// as its last float is final, whatever order and sizes the ranges come in. (A bucket is one
// reduction call: bounded, so a huge model never needs one giant message, and small enough that
// the first ones leave while the backward pass still computes the rest.)
class Buckets {
 public:
  Buckets(size_t n, size_t bucket_floats);
  size_t count() const { return ready_.size(); }
  // Marks [begin, end) ready (ranges must not overlap earlier ones) and returns the buckets it
  // completed, as [begin, end) float ranges, in increasing order.
  std::vector<std::pair<size_t, size_t>> MarkReady(size_t begin, size_t end);
  // Every bucket complete.
  bool AllReady() const { return complete_ == ready_.size(); }
  // Starts over (the next step).
  void Reset();

 private:
  size_t n_, size_;
  std::vector<size_t> ready_;  // floats ready per bucket
  size_t complete_ = 0;
};

class Comm {
 public:
  // Floats per bucket of the gradients' reduction by default (4 MiB).
  static constexpr size_t kBucketFloats = size_t{1} << 20;

  virtual ~Comm() = default;
  int rank() const { return rank_; }
  int size() const { return size_; }
  // This host's name (for error messages on multi-host runs).
  virtual std::string host() const;

  // The gradients' sum over ranks, in place, in buckets: Begin(data, n) once per step, then
  // Ready(begin, end) as ranges become final (each range once; a completed bucket starts its
  // reduction at once, without blocking), then Finish() waits for all of them. Every rank ends
  // with the same sum.
  virtual void Begin(float* data, size_t n) {}
  virtual void Ready(size_t begin, size_t end) {}
  virtual void Finish() {}
  // The same, blocking, for a whole buffer.
  void AllReduceSum(float* data, size_t n) {
    Begin(data, n);
    Ready(0, n);
    Finish();
  }
  // Small blocking sums and maxima over ranks, in place.
  virtual void AllReduceSum(double* data, size_t n) {}
  virtual void AllReduceMax(double* data, size_t n) {}
  // Every rank's value, in rank order.
  virtual std::vector<uint64_t> AllGather(uint64_t value) { return {value}; }
  virtual void Broadcast(void* data, size_t bytes, int root) {}
  virtual void Barrier() {}
  // Ends every rank of the job with this exit status (one process: exits).
  [[noreturn]] virtual void Abort(int status);
  // Ends this rank's part in the job (every rank calls it; later exchanges are errors). Also
  // done at exit.
  virtual void Finalize() {}

  // Seconds this process spent inside exchanges (issuing, polling and waiting for them) since
  // the last call; the rest of a step is computation.
  double TakeSeconds() {
    const double s = seconds_;
    seconds_ = 0;
    return s;
  }

 protected:
  int rank_ = 0, size_ = 1;
  double seconds_ = 0;
};

// How the process was started (the CLI reads it from the launcher's environment).
struct CommOptions {
  int launched = 0;  // processes a launcher (mpirun) started; 0: none
  int rank = 0;      // this one's rank, as the launcher says
  size_t bucket_floats = Comm::kBucketFloats;  // per bucket of the gradients' reduction (larger
                                               // suits a network with high latency)
};
// Sets up the run's communicator: MPI's world when this build has MPI and a launcher started the
// process (initialising MPI; it is finalised at exit), else one process. Throws aviary::Error
// when a launcher started several processes of a build without MPI (and on ranks other than 0
// exits with status 1 without a word, so the message is said once). Once per process.
Comm& InitWorldComm(const CommOptions& options);
// The communicator InitWorldComm set up; one process when it was never called.
Comm& WorldComm();
// A single-process communicator (tests).
std::unique_ptr<Comm> SingleProcessComm();
// Whether this build has MPI.
bool CommHasMpi();
// A 64-bit checksum of the floats' bits (FNV-1a over 64-bit words), to compare ranks' weights.
uint64_t FloatsChecksum(const float* data, size_t n);

}  // namespace aviary::train
