// The WKV recurrences: the part of RWKV that carries information from token to token.
// Each function advances the state by one token; the *Seq forms by T tokens (inputs and
// outputs are T rows of C = H*N floats), doing exactly the per-token arithmetic of T single
// steps, so sequence mode and one-token mode agree bit for bit.
//
// Fast path (default): Highway SIMD, heads spread over the thread pool when the work is large
// enough (each head's recurrence is independent). Kernels::kReference: the scalar loops of
// reference.cpp.
#pragma once

namespace aviary {

// RWKV-4, per channel c < C, numerically stable form with a running exponent pp:
//   wkv = (e^pp aa + e^(u+k) v) / (e^pp bb + e^(u+k));  then decay by e^w and add k, v.
// `decay` is the prepared w = -exp(time_decay); `first` is u = time_first.
void Wkv4(int C, const float* k, const float* v, const float* first, const float* decay, float* aa,
          float* bb, float* pp, float* out);

// RWKV-5/6, per head h, state S[h] is [N key, N value]:
//   out[j] = sum_i r[i] (u[i] k[i] v[j] + S[i][j]);  S[i][j] = w[i] S[i][j] + k[i] v[j].
// `decay` (w) and `first` (u) are per channel, H*N each.
void Wkv5(int H, int N, const float* r, const float* k, const float* v, const float* decay,
          const float* first, float* S, float* out);

// RWKV-7, per head h, state S[h] is [N value, N key]:
//   S = S diag(w) + (S (-kk)) (kk a)^T + v k^T;  out = S r.
// The S·(-kk) term uses the state before decay.
void Wkv7(int H, int N, const float* r, const float* decay, const float* k, const float* v,
          const float* kk, const float* a, float* S, float* out);

// T tokens. Wkv5Seq: `decay_per_token` false = one decay row for all tokens (v5), true = a
// row per token (v6).
void Wkv4Seq(int T, int C, const float* k, const float* v, const float* first, const float* decay,
             float* aa, float* bb, float* pp, float* out);
void Wkv5Seq(int T, int H, int N, const float* r, const float* k, const float* v,
             const float* decay, bool decay_per_token, const float* first, float* S, float* out);
void Wkv7Seq(int T, int H, int N, const float* r, const float* decay, const float* k,
             const float* v, const float* kk, const float* a, float* S, float* out);

// The fast implementations, callable directly (tests compare them with reference.h).
// `max_threads` 0 = the pool's thread count.
namespace fast {
void Wkv4Seq(int T, int C, const float* k, const float* v, const float* first, const float* decay,
             float* aa, float* bb, float* pp, float* out, int max_threads = 0);
void Wkv5Seq(int T, int H, int N, const float* r, const float* k, const float* v,
             const float* decay, bool decay_per_token, const float* first, float* S, float* out,
             int max_threads = 0);
void Wkv7Seq(int T, int H, int N, const float* r, const float* decay, const float* k,
             const float* v, const float* kk, const float* a, float* S, float* out,
             int max_threads = 0);
}  // namespace fast

}  // namespace aviary
