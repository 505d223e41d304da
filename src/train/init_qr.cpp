// Blocked Householder QR in double for the orthogonal initialisation (init_qr.h). The work is
// in applying blocks of kBlock reflections as I - V T V^T to the trailing columns and to Q:
// two matrix products per block, here as Highway register tiles with run-time dispatch. Each
// output value is one chain of fused multiply-adds in a fixed order (rows, or reflections, in
// sequence) whichever tile, row chunk or thread computes it, so threads split columns freely.

#ifndef AVIARY_INIT_QR_ONCE
#define AVIARY_INIT_QR_ONCE
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "tensor/simd_targets.h"
#include "tensor/thread_pool.h"
#include "train/init_qr.h"

namespace aviary::train::qr {

// Reflections per block; V and T are stored this wide (zero-padded for a last, narrower block).
constexpr int64_t kBlock = 32;
// Rows per pass of the products: a chunk of V (kRowChunk x kBlock doubles) stays in the L2
// cache while the columns of a task go through it.
constexpr int64_t kRowChunk = 512;

}  // namespace aviary::train::qr
#endif  // AVIARY_INIT_QR_ONCE

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "train/init_qr.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace aviary::train::qr {
namespace HWY_NAMESPACE {
namespace {

namespace hn = hwy::HWY_NAMESPACE;

// Register tiles: kTileVecs vectors by up to kTileCols columns of accumulators, with kTileVecs
// loads and kTileCols broadcasts per kTileVecs x kTileCols multiply-adds; with the loaded
// vectors and a broadcast they fill 29 of AVX-512's 32 registers, or 13 of AVX2's 16.
#if HWY_MAX_BYTES >= 64
constexpr int kTileVecs = 4;
constexpr int kTileCols = 6;
#else
constexpr int kTileVecs = 2;
constexpr int kTileCols = 5;
#endif
// At most 8 doubles a vector, so that kTileVecs vectors divide kBlock (kTileVecs is 4 where
// vectors reach 8 doubles).
using DBlock = hn::CappedTag<double, 8>;
static_assert(kBlock % (kTileVecs * std::min(8, HWY_MAX_BYTES / 8)) == 0);

// w[j kBlock + i] += sum over rows [r0, r1) of v[row kBlock + i] a[j lda + row], for the cols
// columns from `a` and lanes i0 .. i0 + kTileVecs Lanes.
template <int kCols, class D>
HWY_INLINE void AccumulateTile(D d, const double* HWY_RESTRICT v, int64_t r0, int64_t r1,
                               const double* HWY_RESTRICT a, int64_t lda, size_t i0,
                               double* HWY_RESTRICT w) {
  using V = hn::Vec<D>;
  const size_t N = hn::Lanes(d);
  V acc[kCols][kTileVecs];
  for (int c = 0; c < kCols; ++c) {
    for (int k = 0; k < kTileVecs; ++k) acc[c][k] = hn::LoadU(d, w + c * kBlock + i0 + k * N);
  }
  for (int64_t row = r0; row < r1; ++row) {
    const double* vr = v + row * kBlock + i0;
    V vv[kTileVecs];
    for (int k = 0; k < kTileVecs; ++k) vv[k] = hn::LoadU(d, vr + k * N);
    for (int c = 0; c < kCols; ++c) {
      const V x = hn::Set(d, a[c * lda + row]);
      for (int k = 0; k < kTileVecs; ++k) acc[c][k] = hn::MulAdd(vv[k], x, acc[c][k]);
    }
  }
  for (int c = 0; c < kCols; ++c) {
    for (int k = 0; k < kTileVecs; ++k) hn::StoreU(acc[c][k], d, w + c * kBlock + i0 + k * N);
  }
}

// a[j lda + row] -= sum over i < b of vt[i rows + row] w[j kBlock + i], for rows
// r0 .. r0 + kVecs Lanes and kCols columns.
template <int kCols, int kVecs, class D>
HWY_INLINE void SubtractTile(D d, const double* HWY_RESTRICT vt, int64_t rows, int64_t b,
                             const double* HWY_RESTRICT w, int64_t r0, double* HWY_RESTRICT a,
                             int64_t lda) {
  using V = hn::Vec<D>;
  const size_t N = hn::Lanes(d);
  V acc[kCols][kVecs];
  for (int c = 0; c < kCols; ++c) {
    for (int k = 0; k < kVecs; ++k) acc[c][k] = hn::LoadU(d, a + c * lda + r0 + k * N);
  }
  for (int64_t i = 0; i < b; ++i) {
    const double* vi = vt + i * rows + r0;
    V vv[kVecs];
    for (int k = 0; k < kVecs; ++k) vv[k] = hn::LoadU(d, vi + k * N);
    for (int c = 0; c < kCols; ++c) {
      const V x = hn::Set(d, w[c * kBlock + i]);
      for (int k = 0; k < kVecs; ++k) acc[c][k] = hn::NegMulAdd(vv[k], x, acc[c][k]);
    }
  }
  for (int c = 0; c < kCols; ++c) {
    for (int k = 0; k < kVecs; ++k) hn::StoreU(acc[c][k], d, a + c * lda + r0 + k * N);
  }
}

template <int kCols>
void SubtractRows(const double* vt, int64_t rows, int64_t b, const double* w, int64_t r0,
                  int64_t r1, double* a, int64_t lda) {
  const DBlock d;
  const hn::CappedTag<double, 1> d1;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t row = r0;
  for (; row + kTileVecs * N <= r1; row += kTileVecs * N) {
    SubtractTile<kCols, kTileVecs>(d, vt, rows, b, w, row, a, lda);
  }
  for (; row + N <= r1; row += N) SubtractTile<kCols, 1>(d, vt, rows, b, w, row, a, lda);
  for (; row < r1; ++row) SubtractTile<kCols, 1>(d1, vt, rows, b, w, row, a, lda);
}

}  // namespace

// w (cols x kBlock) += (V^T A)^T: V is rows x kBlock row-major, A the rows x cols column-major
// matrix at `a` (column stride lda).
void AccumulateProducts(const double* v, int64_t rows, const double* a, int64_t lda, int64_t cols,
                        double* w) {
  const DBlock d;
  const size_t step = kTileVecs * hn::Lanes(d);
  for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
    const int64_t r1 = std::min(rows, r0 + kRowChunk);
    int64_t j = 0;
    for (; j + kTileCols <= cols; j += kTileCols) {
      for (size_t i0 = 0; i0 < kBlock; i0 += step) {
        AccumulateTile<kTileCols>(d, v, r0, r1, a + j * lda, lda, i0, w + j * kBlock);
      }
    }
    for (; j < cols; ++j) {
      for (size_t i0 = 0; i0 < kBlock; i0 += step) {
        AccumulateTile<1>(d, v, r0, r1, a + j * lda, lda, i0, w + j * kBlock);
      }
    }
  }
}

// A -= V W^T: V^T is b x rows row-major (`vt`), W cols x kBlock, A as above.
void SubtractProducts(const double* vt, int64_t rows, int64_t b, const double* w, double* a,
                      int64_t lda, int64_t cols) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
    const int64_t r1 = std::min(rows, r0 + kRowChunk);
    int64_t j = 0;
    for (; j + kTileCols <= cols; j += kTileCols) {
      SubtractRows<kTileCols>(vt, rows, b, w + j * kBlock, r0, r1, a + j * lda, lda);
    }
    for (; j < cols; ++j) SubtractRows<1>(vt, rows, b, w + j * kBlock, r0, r1, a + j * lda, lda);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace aviary::train::qr
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace aviary::train {
namespace qr {

HWY_EXPORT(AccumulateProducts);
HWY_EXPORT(SubtractProducts);

namespace {

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
// I - V T V^T: V's rows k0..m-1 both row-major (v, kBlock values a row) and column-major (vt,
// V^T row-major), so that each product runs along contiguous memory; T upper triangular
// (LAPACK's dlarft, forward, columnwise), kBlock x kBlock.
struct BlockReflector {
  int64_t m = 0, k0 = 0, b = 0;
  std::vector<double> v;   // (m - k0) x kBlock
  std::vector<double> vt;  // b x (m - k0)
  std::vector<double> t;   // kBlock x kBlock
};

// Fills `r` (its buffers reused from block to block) with reflections k0 .. k0 + b - 1, whose
// vectors lie in the columns of `a` from their diagonal down.
void MakeBlockReflector(const double* a, int64_t m, int64_t k0, int64_t b,
                        const std::vector<double>& tau, BlockReflector& r) {
  const int64_t rows = m - k0;
  r.m = m;
  r.k0 = k0;
  r.b = b;
  r.vt.resize(static_cast<size_t>(b * rows));
  r.v.resize(static_cast<size_t>(rows * kBlock));
  for (int64_t i = 0; i < b; ++i) {
    const double* col = a + (k0 + i) * m;  // v_i: rows k0 + i .. m - 1
    double* vti = &r.vt[i * rows];
    std::fill(vti, vti + i, 0.0);
    std::copy(col + k0 + i, col + m, vti + i);
  }
  ParallelForRanges(rows, 4096, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      double* vr = &r.v[row * kBlock];
      for (int64_t i = 0; i < b; ++i) vr[i] = r.vt[i * rows + row];
      std::fill(vr + b, vr + kBlock, 0.0);
    }
  });
  // V^T V (symmetric: a product and its transpose round alike), column i at gram[i kBlock].
  std::vector<double> gram(static_cast<size_t>(b * kBlock), 0.0);
  const auto accumulate = HWY_DYNAMIC_DISPATCH(AccumulateProducts);
  ParallelForRanges(b, 8, [&](int64_t c0, int64_t c1) {
    accumulate(r.v.data(), rows, &r.vt[c0 * rows], rows, c1 - c0, &gram[c0 * kBlock]);
  });
  r.t.assign(static_cast<size_t>(kBlock * kBlock), 0.0);
  for (int64_t i = 0; i < b; ++i) {
    // T[0:i, i] = -tau_i T[0:i, 0:i] V[:, 0:i]^T v_i
    for (int64_t p = 0; p < i; ++p) {
      double s = 0;
      for (int64_t q = p; q < i; ++q) s += r.t[p * kBlock + q] * gram[i * kBlock + q];
      r.t[p * kBlock + i] = -tau[k0 + i] * s;
    }
    r.t[i * kBlock + i] = tau[k0 + i];
  }
}

// Columns [begin, end) of the column-major m-row matrix `a` times (I - V T V^T) from the left,
// or times its transpose (I - V T^T V^T). Columns spread over the pool in groups.
void ApplyBlockReflector(const BlockReflector& r, bool transpose, double* a, int64_t begin,
                         int64_t end) {
  const int64_t b = r.b, rows = r.m - r.k0;
  constexpr int64_t kColumnGroup = 32;
  ParallelForRanges(end - begin, kColumnGroup, [&](int64_t c0, int64_t c1) {
    const int64_t n = c1 - c0;
    double* cols = a + (begin + c0) * r.m + r.k0;
    std::vector<double> w(static_cast<size_t>(n * kBlock), 0.0),
        w2(static_cast<size_t>(n * kBlock), 0.0);
    HWY_DYNAMIC_DISPATCH(AccumulateProducts)(r.v.data(), rows, cols, r.m, n, w.data());
    for (int64_t j = 0; j < n; ++j) {  // w2 = T w or T^T w
      const double* wj = &w[j * kBlock];
      for (int64_t i = 0; i < b; ++i) {
        double s = 0;
        if (transpose) {
          for (int64_t p = 0; p <= i; ++p) s += r.t[p * kBlock + i] * wj[p];
        } else {
          for (int64_t p = i; p < b; ++p) s += r.t[i * kBlock + p] * wj[p];
        }
        w2[j * kBlock + i] = s;
      }
    }
    HWY_DYNAMIC_DISPATCH(SubtractProducts)(r.vt.data(), rows, b, w2.data(), cols, r.m, n);
  });
}

}  // namespace
}  // namespace qr

// Householder reflections in blocks of kBlock, each block applied as one product (a 65536 x 768
// head would otherwise stream through memory once per column): the initialisation is the only
// QR aviary needs, too small a use to add LAPACK.
std::vector<double> OrthonormalColumns(int64_t m, int64_t n, std::vector<double>& a) {
  using namespace qr;
  std::vector<double> r_diag(n), tau(n);
  BlockReflector block;
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
      MakeBlockReflector(a.data(), m, k0, k1 - k0, tau, block);
      ApplyBlockReflector(block, true, a.data(), k1, n);
    }
  }
  std::vector<double> q(static_cast<size_t>(m * n), 0.0);
  for (int64_t j = 0; j < n; ++j) q[j * m + j] = 1;
  // Q = H_0 ... H_{n-1} [I; 0], block by block from the last; a block starting at k0 leaves
  // the columns before k0 alone (they are still unit vectors above row k0).
  for (int64_t k0 = (n - 1) / kBlock * kBlock; k0 >= 0; k0 -= kBlock) {
    const int64_t k1 = std::min(n, k0 + kBlock);
    MakeBlockReflector(a.data(), m, k0, k1 - k0, tau, block);
    ApplyBlockReflector(block, false, q.data(), k0, n);
  }
  for (int64_t j = 0; j < n; ++j) {
    if (r_diag[j] < 0) {
      for (int64_t i = 0; i < m; ++i) q[j * m + i] = -q[j * m + i];
    }
  }
  return q;
}

}  // namespace aviary::train
#endif  // HWY_ONCE
