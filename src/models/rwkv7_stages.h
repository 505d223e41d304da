// RWKV-7's own row stages, shared by inference (rwkv7.cpp) and training (src/train), so that a
// trained model's forward pass is the inference code's arithmetic. Buffers are (T, C) rows,
// C = H heads of N channels; each stage works on the token range [t0, t1).
#pragma once

namespace aviary {

// w = exp(-e^-0.5 sigmoid(w0 + w)), a = sigmoid(a0 + a) and, unless v0 is null (layer 0),
// v_mix = sigmoid(v0 + v_mix), in place: the offsets per channel, then the transcendental parts
// in whole-range (SIMD) passes. w0, a0, v0: (C).
void Rwkv7DecayAndGates(const float* w0, const float* a0, const float* v0, int C, int t0, int t1,
                        float* w, float* a, float* v_mix);

// kk = k k_k normalised per head (to at most 1/1e-12); k = k (1 + (a - 1) k_a); layer 0
// (first_layer) keeps its v as v_first, later layers take v += (v_first - v) v_mix.
// k_k, k_a: (C).
void Rwkv7KeysAndValues(const float* k_k, const float* k_a, bool first_layer, int H, int N, int t0,
                        int t1, const float* a, const float* v_mix, float* k, float* v, float* kk,
                        float* v_first);

// out += (sum over each head of r k r_k) v: the current token's bonus, added after the norm.
// r_k: (H, N).
void Rwkv7Bonus(const float* r_k, int H, int N, int t0, int t1, const float* r, const float* k,
                const float* v, float* out);

}  // namespace aviary
