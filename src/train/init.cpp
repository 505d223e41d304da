#include "train/init.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>
#include <utility>

#include "aviary/error.h"
#include "tensor/thread_pool.h"

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

double Dot(const double* a, const double* b, int64_t n) {
  // Four partial sums in a fixed order: vectorisable, and the same result on every run.
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

// Applies the reflection I - 2 v v^T (v of unit length, `len` values) to rows [row, row + len)
// of columns [begin, end) of the column-major m-row matrix `a`; columns spread over the pool
// (each column's arithmetic is the same whichever thread does it).
void Reflect(const double* v, int64_t len, int64_t row, double* a, int64_t m, int64_t begin,
             int64_t end) {
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(len, 1));
  ParallelForRanges(end - begin, chunk, [&](int64_t c0, int64_t c1) {
    for (int64_t j = begin + c0; j < begin + c1; ++j) {
      double* col = a + j * m + row;
      const double s = 2 * Dot(v, col, len);
      for (int64_t i = 0; i < len; ++i) col[i] -= s * v[i];
    }
  });
}

// A block of reflections H_k0 ... H_{k0+b-1} (H_i = I - tau_i v_i v_i^T) in the compact WY form
// I - V T V^T: V's rows k0..m-1 copied row-major (b values a row, so the products below run
// along contiguous memory) and T upper triangular (LAPACK's dlarft, forward, columnwise).
struct BlockReflector {
  int64_t m, k0, b;
  std::vector<double> v;  // (m - k0) x b
  std::vector<double> t;  // b x b
};

BlockReflector MakeBlockReflector(const double* a, int64_t m, int64_t k0, int64_t b,
                                  const std::vector<double>& tau) {
  BlockReflector r{m, k0, b, std::vector<double>(static_cast<size_t>((m - k0) * b), 0.0),
                   std::vector<double>(static_cast<size_t>(b * b), 0.0)};
  for (int64_t i = 0; i < b; ++i) {
    const double* col = a + (k0 + i) * m;  // v_i: rows k0 + i .. m - 1
    for (int64_t row = k0 + i; row < m; ++row) r.v[(row - k0) * b + i] = col[row];
  }
  std::vector<double> gram(static_cast<size_t>(b * b), 0.0);  // V^T V
  for (int64_t row = 0; row < m - k0; ++row) {
    const double* vr = &r.v[row * b];
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t j = 0; j < b; ++j) gram[i * b + j] += vr[i] * vr[j];
    }
  }
  for (int64_t i = 0; i < b; ++i) {
    // T[0:i, i] = -tau_i T[0:i, 0:i] V[:, 0:i]^T v_i
    for (int64_t p = 0; p < i; ++p) {
      double s = 0;
      for (int64_t q = p; q < i; ++q) s += r.t[p * b + q] * gram[q * b + i];
      r.t[p * b + i] = -tau[k0 + i] * s;
    }
    r.t[i * b + i] = tau[k0 + i];
  }
  return r;
}

// Columns [begin, end) of the column-major m-row matrix `a` times (I - V T V^T) from the left,
// or times its transpose (I - V T^T V^T). Columns spread over the pool in groups; rows go in
// chunks that keep V's rows in cache across a group. Each value's sums run in the same order
// whichever thread computes it.
void ApplyBlockReflector(const BlockReflector& r, bool transpose, double* a, int64_t begin,
                         int64_t end) {
  const int64_t b = r.b, rows = r.m - r.k0;
  constexpr int64_t kRowChunk = 128;
  ParallelForRanges(end - begin, 32, [&](int64_t c0, int64_t c1) {
    const int64_t n = c1 - c0;
    std::vector<double> w(static_cast<size_t>(n * b), 0.0), w2(static_cast<size_t>(n * b));
    for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {  // w = V^T a
      const int64_t r1 = std::min(rows, r0 + kRowChunk);
      for (int64_t j = 0; j < n; ++j) {
        const double* col = a + (begin + c0 + j) * r.m + r.k0;
        double* wj = &w[j * b];
        for (int64_t row = r0; row < r1; ++row) {
          const double x = col[row];
          const double* vr = &r.v[row * b];
          for (int64_t i = 0; i < b; ++i) wj[i] += vr[i] * x;
        }
      }
    }
    for (int64_t j = 0; j < n; ++j) {  // w2 = T w or T^T w
      for (int64_t i = 0; i < b; ++i) {
        double s = 0;
        if (transpose) {
          for (int64_t p = 0; p <= i; ++p) s += r.t[p * b + i] * w[j * b + p];
        } else {
          for (int64_t p = i; p < b; ++p) s += r.t[i * b + p] * w[j * b + p];
        }
        w2[j * b + i] = s;
      }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {  // a -= V w2
      const int64_t r1 = std::min(rows, r0 + kRowChunk);
      for (int64_t j = 0; j < n; ++j) {
        double* col = a + (begin + c0 + j) * r.m + r.k0;
        const double* wj = &w2[j * b];
        for (int64_t row = r0; row < r1; ++row) col[row] -= Dot(&r.v[row * b], wj, b);
      }
    }
  });
}

// The Q of the QR decomposition of the m x n (m >= n) column-major matrix `a` (destroyed), its
// columns multiplied by the signs of R's diagonal, column-major. Householder reflections in
// double, in blocks of 32 applied as one product each (a 65536 x 768 head would otherwise
// stream through memory once per column): the initialisation is the only QR aviary needs, too
// small a use to add LAPACK.
std::vector<double> OrthonormalColumns(int64_t m, int64_t n, std::vector<double>& a) {
  constexpr int64_t kBlock = 32;
  std::vector<double> r_diag(n), tau(n);
  for (int64_t k0 = 0; k0 < n; k0 += kBlock) {
    const int64_t k1 = std::min(n, k0 + kBlock);
    for (int64_t k = k0; k < k1; ++k) {
      double* x = a.data() + k * m + k;  // becomes the unit reflection vector
      const int64_t len = m - k;
      const double norm = std::sqrt(Dot(x, x, len));
      const double alpha = x[0] >= 0 ? -norm : norm;
      r_diag[k] = alpha;
      x[0] -= alpha;
      const double v_norm = std::sqrt(Dot(x, x, len));
      if (v_norm == 0) continue;  // a zero column: no reflection (tau 0, x stays 0)
      for (int64_t i = 0; i < len; ++i) x[i] /= v_norm;
      tau[k] = 2;
      Reflect(x, len, k, a.data(), m, k + 1, k1);  // the rest of this block's columns
    }
    if (k1 < n) {
      ApplyBlockReflector(MakeBlockReflector(a.data(), m, k0, k1 - k0, tau), true, a.data(), k1, n);
    }
  }
  std::vector<double> q(static_cast<size_t>(m * n), 0.0);
  for (int64_t j = 0; j < n; ++j) q[j * m + j] = 1;
  // Q = H_0 ... H_{n-1} [I; 0], block by block from the last; a block starting at k0 leaves
  // the columns before k0 alone (they are still unit vectors above row k0).
  for (int64_t k0 = (n - 1) / kBlock * kBlock; k0 >= 0; k0 -= kBlock) {
    const int64_t k1 = std::min(n, k0 + kBlock);
    ApplyBlockReflector(MakeBlockReflector(a.data(), m, k0, k1 - k0, tau), false, q.data(), k0, n);
  }
  for (int64_t j = 0; j < n; ++j) {
    if (r_diag[j] < 0) {
      for (int64_t i = 0; i < m; ++i) q[j * m + i] = -q[j * m + i];
    }
  }
  return q;
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
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) a[j * rows + i] = gaussian[i * cols + j];
  }
  gaussian = {};
  const std::vector<double> q = OrthonormalColumns(rows, cols, a);
  a = {};
  std::vector<float> out(q.size());
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      out[i * cols + j] = static_cast<float>(q[j * rows + i] * gain);
    }
  }
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
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) out[j * rows + i] = w[i * cols + j];
      }
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
