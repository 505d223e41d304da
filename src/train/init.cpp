#include "train/init.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>
#include <utility>

#include "aviary/error.h"
#include "tensor/thread_pool.h"
#include "train/init_qr.h"

namespace aviary::train {
namespace {

uint64_t SplitMix64(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// A float product rounded once, as torch's float ops round it, whatever the compiler would
// otherwise contract into a fused multiply-add (the product of two floats is exact in double).
float Mul(float a, float b) { return static_cast<float>(static_cast<double>(a) * b); }

// dst (cols x rows, row-major) = convert(src (rows x cols, row-major)) transposed, in square
// tiles so that both sides use whole cache lines; tile rows spread over the pool.
template <typename To, typename From, typename Convert>
void Transpose(const From* src, int64_t rows, int64_t cols, To* dst, Convert convert) {
  constexpr int64_t kTile = 32;
  ParallelForRanges((rows + kTile - 1) / kTile, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t i0 = t0 * kTile; i0 < std::min(rows, t1 * kTile); i0 += kTile) {
      const int64_t i1 = std::min(rows, i0 + kTile);
      for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
        const int64_t j1 = std::min(cols, j0 + kTile);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = j0; j < j1; ++j) dst[j * rows + i] = convert(src[i * cols + j]);
        }
      }
    }
  });
}

// x_* of the time and channel mixes: 1 - (i/C)^exponent, in torch's float arithmetic.
void MixSchedule(float* out, int C, double exponent) {
  const float e = static_cast<float>(exponent);
  for (int i = 0; i < C; ++i) {
    const float base = static_cast<float>(static_cast<double>(i) / C);
    out[i] = 1.0f - static_cast<float>(std::pow(static_cast<double>(base), e));
  }
}

void Fill(float* out, size_t n, float value) { std::fill(out, out + n, value); }

}  // namespace

InitRng::InitRng(uint64_t seed, uint64_t stream) {
  uint64_t x = seed ^ (stream * 0xD1B54A32D192ED03ull);
  for (uint64_t& s : s_) s = SplitMix64(x);
}

uint64_t InitRng::Next() {
  const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = Rotl(s_[3], 45);
  return result;
}

double InitRng::Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

double InitRng::Normal() {
  if (has_spare_) {
    has_spare_ = false;
    return spare_;
  }
  const double u1 = 1.0 - Uniform();  // (0, 1]: the logarithm stays finite
  const double u2 = Uniform();
  const double radius = std::sqrt(-2.0 * std::log(u1));
  const double angle = 2.0 * std::numbers::pi * u2;
  spare_ = radius * std::sin(angle);
  has_spare_ = true;
  return radius * std::cos(angle);
}

std::vector<float> OrthogonalFrom(int64_t rows, int64_t cols, double gain,
                                  std::vector<double> gaussian) {
  if (rows < 1 || cols < 1 || gaussian.size() != static_cast<size_t>(rows * cols)) {
    throw Error("orthogonal init: " + std::to_string(gaussian.size()) + " values for a " +
                std::to_string(rows) + " x " + std::to_string(cols) + " matrix");
  }
  // Buffers are released as soon as they are used: a 0.1B model's head is 400 MB in double.
  if (rows < cols) {
    // QR of the transpose (cols x rows), whose column-major form is the row-major matrix; the
    // result is Q transposed, so row i of the output is column i of Q.
    std::vector<double> q = OrthonormalColumns(cols, rows, gaussian);
    gaussian = {};
    std::vector<float> out(q.size());
    for (size_t i = 0; i < q.size(); ++i) out[i] = static_cast<float>(q[i] * gain);
    return out;
  }
  // QR of the matrix itself: column j of the column-major copy is column j of the matrix.
  std::vector<double> a(gaussian.size());
  Transpose(gaussian.data(), rows, cols, a.data(), [](double x) { return x; });
  gaussian = {};
  const std::vector<double> q = OrthonormalColumns(rows, cols, a);
  a = {};
  std::vector<float> out(q.size());
  Transpose(q.data(), cols, rows, out.data(),
            [gain](double x) { return static_cast<float>(x * gain); });
  return out;
}

void InitRwkv7(const ParamLayout& layout, uint64_t seed, float* params) {
  const Rwkv7Config& c = layout.config();
  const int L = c.n_layer, C = c.n_embd, N = c.head_size, V = c.vocab;
  std::fill(params, params + layout.total_floats(), 0.0f);

  const std::vector<ParamEntry>& entries = layout.entries();
  auto orthogonal = [&](size_t index, double gain) {
    const ParamEntry& e = entries[index];
    const int64_t rows = e.pth_shape[0], cols = e.pth_shape[1];
    InitRng rng(seed, index);
    std::vector<double> gaussian(e.size);
    for (double& g : gaussian) g = rng.Normal();
    const std::vector<float> w = OrthogonalFrom(rows, cols, gain, std::move(gaussian));
    float* out = params + e.offset;
    if (e.transposed_in_pth) {
      Transpose(w.data(), rows, cols, out, [](float x) { return x; });
    } else {
      std::copy(w.begin(), w.end(), out);
    }
  };
  // model.py's ortho_init for the low-rank w2/a2/v2/g2 (pth shape (D, C)).
  auto low_rank_orthogonal = [&](size_t index) {
    const ParamEntry& e = entries[index];
    const double rows = static_cast<double>(e.pth_shape[0]),
                 cols = static_cast<double>(e.pth_shape[1]);
    orthogonal(index, (rows > cols ? std::sqrt(rows / cols) : 1.0) * 0.1);
  };

  // The per-channel schedules shared by every layer (model.py computes them in double and
  // stores them as float).
  std::vector<float> linear(C), zigzag(C);
  const double half_n = (N - 1) / 2.0;
  for (int i = 0; i < C; ++i) {
    linear[i] = static_cast<float>(C > 1 ? static_cast<double>(i) / (C - 1) - 0.5 : -0.5);
    const float z = static_cast<float>(half_n > 0 ? ((i % N) - half_n) / half_n : 0.0);
    zigzag[i] = Mul(z, std::fabs(z));
  }

  for (size_t index = 0; index < entries.size(); ++index) {
    const ParamEntry& e = entries[index];
    float* p = params + e.offset;
    const std::string& name = e.name;
    if (name == "emb.weight") {
      InitRng rng(seed, index);
      for (size_t i = 0; i < e.size; ++i) {
        p[i] = static_cast<float>(-1e-4 + 2e-4 * rng.Uniform());
      }
      continue;
    }
    if (name == "head.weight") {
      orthogonal(index, V > C ? 0.5 * std::sqrt(static_cast<double>(V) / C) : 0.5);
      continue;
    }
    if (name == "ln_out.weight") {
      Fill(p, e.size, 1.0f);
      continue;
    }
    if (name == "ln_out.bias") continue;

    // blocks.<l>.<rest>
    const size_t dot = name.find('.', 7);
    const int l = std::stoi(name.substr(7, dot - 7));
    const std::string rest = name.substr(dot + 1);
    const double ratio_0_to_1 = L > 1 ? static_cast<double>(l) / (L - 1) : 0.0;
    const double ratio_1_to_almost0 = 1.0 - static_cast<double>(l) / L;

    if (rest.ends_with(".weight") && rest.starts_with("ln")) {
      Fill(p, e.size, 1.0f);  // ln0, ln1, ln2
    } else if (rest.ends_with(".bias")) {
      // LayerNorm and GroupNorm biases: 0
    } else if (rest == "att.x_r" || rest == "att.x_g") {
      MixSchedule(p, C, 0.2 * ratio_1_to_almost0);
    } else if (rest == "att.x_w" || rest == "att.x_a") {
      MixSchedule(p, C, 0.9 * ratio_1_to_almost0);
    } else if (rest == "att.x_k" || rest == "att.x_v") {
      MixSchedule(p, C, 0.7 * ratio_1_to_almost0);
    } else if (rest == "att.w1" || rest == "att.a1" || rest == "att.v1" || rest == "att.g1") {
      // 0
    } else if (rest == "att.w2" || rest == "att.a2" || rest == "att.v2" || rest == "att.g2") {
      low_rank_orthogonal(index);
    } else if (rest == "att.w0") {
      const double exponent = 1 + std::pow(ratio_0_to_1, 0.3);
      for (int i = 0; i < C; ++i) {
        const double position = C > 1 ? static_cast<double>(i) / (C - 1) : 0.0;
        const float www = static_cast<float>(-6 + 6 * std::pow(position, exponent));
        p[i] = (www + 0.5f) + Mul(zigzag[i], 2.5f);
      }
    } else if (rest == "att.a0") {
      for (int i = 0; i < C; ++i) {
        p[i] = ((0.0f - 0.19f) + Mul(zigzag[i], 0.3f)) + Mul(linear[i], 0.4f);
      }
    } else if (rest == "att.v0") {
      for (int i = 0; i < C; ++i) p[i] = (0.0f + 0.73f) - Mul(linear[i], 0.4f);
    } else if (rest == "att.k_k") {
      for (int i = 0; i < C; ++i) p[i] = (0.0f + 0.71f) - Mul(linear[i], 0.1f);
    } else if (rest == "att.k_a") {
      Fill(p, e.size, 1.02f);
    } else if (rest == "att.r_k") {
      Fill(p, e.size, -0.04f);
    } else if (rest == "att.receptance.weight" || rest == "att.value.weight" ||
               rest == "ffn.key.weight") {
      orthogonal(index, 1.0);
    } else if (rest == "att.key.weight") {
      orthogonal(index, 0.1);
    } else if (rest == "att.output.weight" || rest == "ffn.value.weight") {
      // 0
    } else if (rest == "att.ln_x.weight") {
      Fill(p, e.size, static_cast<float>(std::pow(static_cast<double>(l + 1) / L, 0.7)));
    } else if (rest == "ffn.x_k") {
      MixSchedule(p, C, std::pow(ratio_1_to_almost0, 4));
    } else {
      throw Error("RWKV-7 init: no rule for parameter '" + name + "'");
    }
  }
}

}  // namespace aviary::train
