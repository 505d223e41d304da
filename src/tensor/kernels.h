// Numeric kernels shared by every model version. Model code calls only these (and wkv.h), so
// speed work changes this folder and not the models.
//
// Two implementations sit behind every function here:
//  - fast (default): Highway SIMD with run-time dispatch (one binary picks AVX-512, AVX2,
//    SSE4, NEON, ... on the machine it runs on), threaded over the persistent pool
//    (thread_pool.h); weights are widened to float in registers, never to memory per token;
//  - reference (Kernels::kReference): the scalar loops in reference.cpp, the definition the
//    fast kernels are tested against.
// The current runtime (thread_pool.h) chooses between them and sets which rounded-activation
// paths the fast MatMul may take (Activations in aviary/runtime.h; int8_matmul.h, bf16_matmul.h).
// Both compute every output with the same code whatever T (tokens at once) and however many
// threads run, so sequence mode and one-token mode agree bit for bit in either mode.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "aviary/runtime.h"
#include "tensor/tensor.h"

namespace aviary {

// The implementation the current runtime (thread_pool.h) asks for.
Kernels ActiveKernels();
// The instruction set the fast kernels run with on this machine, e.g. "AVX3" (AVX-512) or
// "AVX2"; "scalar" when the current runtime asks for the reference kernels.
const char* KernelTarget();
// The instruction set of `kernels` on this machine (as above).
const char* KernelTargetOf(Kernels kernels);

// y[t, r] = sum_c w[r, c] * x[t, c] for t < T. `w` is [rows, cols] in its stored type and is
// read once for all T tokens; x is [T, cols], y is [T, rows]. Each output is computed by the
// same code whatever T is and whatever the thread count, so results agree bit for bit.
void MatMul(const Tensor& w, const float* x, int T, float* y);

// One product of a batch: y = W x over the batch's T tokens, shapes as for MatMul.
struct MatMulJob {
  const Tensor& w;
  const float* x;
  float* y;
};
// Independent products (no job reads another's y) run as one parallel loop: one thread
// hand-off for all of them, and the small ones (low-rank matrices) run beside the large ones
// instead of alone on the calling thread. Every output is the same as from MatMul.
void MatMulBatch(std::span<const MatMulJob> jobs, int T);

// Row `row` of `table` (e.g. the embedding) widened to float.
void GatherRow(const Tensor& table, int64_t row, float* y);

void LayerNorm(const float* x, const float* weight, const float* bias, int n, float eps, float* y);
// GroupNorm over `groups` equal slices of x[0..n), each normalised on its own.
void GroupNorm(const float* x, const float* weight, const float* bias, int n, int groups, float eps,
               float* y);

inline float Sigmoid(float x) { return 1.0f / (1.0f + __builtin_expf(-x)); }

// Element-wise activations over n floats, in place. Each element's result depends only on its
// value (never on n or its position), so T rows at once == T calls of one row.
void TanhInPlace(float* x, size_t n);
void SigmoidInPlace(float* x, size_t n);
void ExpInPlace(float* x, size_t n);
void SiluInPlace(float* x, size_t n);         // x * sigmoid(x)
void SquaredReluInPlace(float* x, size_t n);  // max(x, 0)^2 (channel mix)

// The fast implementations, callable directly (tests and benchmarks compare them with the
// reference in reference.h). `max_threads` 0 = the current runtime's thread count.
namespace fast {
void MatMul(const Tensor& w, const float* x, int T, float* y, int max_threads = 0);
void MatMulBatch(const MatMulJob* jobs, int n_jobs, int T, int max_threads = 0);
void DequantizeRow(DType type, const uint8_t* src, float* dst, int64_t n);
void LayerNorm(const float* x, const float* weight, const float* bias, int n, float eps, float* y);
void GroupNorm(const float* x, const float* weight, const float* bias, int n, int groups, float eps,
               float* y);
void Tanh(float* x, size_t n);
void Sigmoid(float* x, size_t n);
void Exp(float* x, size_t n);
void Silu(float* x, size_t n);
void SquaredRelu(float* x, size_t n);
}  // namespace fast

}  // namespace aviary
