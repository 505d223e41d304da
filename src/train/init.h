// RWKV-LM's initialisation of a new RWKV-7 model (RWKV-v7/train_temp/src/model.py: the module
// constructors, then RWKV.generate_init_weight, which re-initialises the 2-D ".weight"
// matrices), deterministic from a 64-bit seed.
//
// What each tensor gets (L layers, layer l, C channels, i = 0..C-1):
//   emb.weight                     uniform in [-1e-4, 1e-4)
//   ln0/ln1/ln2/ln_out             weight 1, bias 0 (nn.LayerNorm)
//   att.x_r x_w x_k x_v x_a x_g    1 - (i/C)^(k (1 - l/L)), k = 0.2 0.9 0.7 0.7 0.9 0.2
//   att.w0                         the decay schedule: -6 + 6 (i/(C-1))^(1 + (l/(L-1))^0.3)
//                                  + 0.5 + 2.5 zigzag
//   att.a0, v0, k_k, k_a, r_k      -0.19 + 0.3 zigzag + 0.4 linear, 0.73 - 0.4 linear,
//                                  0.71 - 0.1 linear, 1.02, -0.04
//   att.w1 a1 v1 g1                0
//   att.w2 a2 v2 g2                orthogonal, gain 0.1 (x sqrt(D/C) when D > C), shaped as in
//                                  the .pth and stored transposed
//   att.receptance, value          orthogonal, gain 1
//   att.key                        orthogonal, gain 0.1
//   att.output, ffn.value          0
//   att.ln_x                       weight ((l + 1) / L)^0.7, bias 0
//   ffn.x_k                        1 - (i/C)^((1 - l/L)^4)
//   ffn.key                        orthogonal, gain 1
//   head.weight                    orthogonal, gain 0.5 sqrt(V/C) when V > C, else 0.5
// with linear = i/(C-1) - 0.5 and zigzag = z |z|, z = ((i mod N) - (N-1)/2) / ((N-1)/2).
// A one-layer model (where model.py divides by L - 1 = 0) takes l/(L-1) = 0.
//
// "Orthogonal" is torch.nn.init.orthogonal_: the Q of the QR decomposition of a Gaussian
// matrix, its columns multiplied by the signs of R's diagonal (rows < cols: of the transpose),
// times the gain. The random numbers are this file's own (xoshiro256** and Box-Muller), one
// stream per tensor, so a seed gives the same model on every platform and thread count; they
// are not the numbers torch would draw.
#pragma once

#include <cstdint>
#include <vector>

#include "train/params.h"

namespace aviary::train {

// Fills `params` (layout.total_floats() floats; the padding between tensors becomes 0).
// Every tensor is initialised, frozen or not.
void InitRwkv7(const ParamLayout& layout, uint64_t seed, float* params);

// The generator behind InitRwkv7: xoshiro256** seeded through splitmix64 from (seed, stream).
class InitRng {
 public:
  InitRng(uint64_t seed, uint64_t stream);
  uint64_t Next();
  double Uniform();  // [0, 1), 53 bits
  double Normal();   // standard normal (Box-Muller, both values of a pair used)

 private:
  uint64_t s_[4];
  double spare_ = 0;
  bool has_spare_ = false;
};

// torch.nn.init.orthogonal_ applied to the rows x cols matrix whose values were drawn as
// `gaussian` (row-major; consumed): the result, row-major, times `gain`.
std::vector<float> OrthogonalFrom(int64_t rows, int64_t cols, double gain,
                                  std::vector<double> gaussian);

}  // namespace aviary::train
