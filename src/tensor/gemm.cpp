// The fp32 products of training (gemm.h): Highway SIMD with run-time dispatch, on the thread
// pool, cut into cache blocks of outputs.
//
// Forward (y = x W^T): every output must be MatMul's (matmul-inl.h) bit for bit, so it is a dot
// product in MatMul's order: one vector accumulator over the columns in chunks of kLanes,
// LaneSums, then the scalar tail. A register tile of kDotRows rows x kDotTokens tokens of such
// accumulators (GemmTile's shape) runs over the columns, but blocked for large T: a block of
// rows stays in L2 while token tiles pass over it, and on wide rows the columns are taken in
// passes of kDotDepth (the token tile stays in L1 while the block's rows stream past), the
// accumulators parked in memory between passes, which keeps every bit. Rows that do not start
// on a vector boundary are read from aligned copies.
//
// Backward (dX = dY W, dW = dY^T X): both are C (+)= A B with B row-major, so one kernel serves
// both: a register tile of kAxpyRows rows of C x kAxpyVecs vectors of its columns (kNarrowRows x
// kNarrowVecs for outputs 32 columns wide), one broadcast of A times the row's vectors of B per
// step of the reduction. A is read in place, B from a contiguous panel (its rows are a whole
// matrix row apart in memory, which would thrash L1), the reduction taken in passes of
// kAxpyDepth that store C and load it back. Every output is one multiply-add chain over the
// reduction index in increasing order, whatever the blocks.
//
// Threads split the outputs into blocks and never a sum, so results do not depend on the
// thread count. Compiled with -ffp-contract=off (CMakeLists.txt), like the MatMul it matches.

// Highway re-includes this file once per target; the parts outside HWY_NAMESPACE are guarded.
#ifndef AVIARY_GEMM_ONCE
#define AVIARY_GEMM_ONCE
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "tensor/aligned.h"
#include "tensor/gemm.h"
#include "tensor/kernels.h"
#include "tensor/reference.h"
#include "tensor/simd_targets.h"
#include "tensor/tensor.h"
#include "tensor/thread_pool.h"

namespace aviary {
// The operands of C (M x N, row stride ldc) = A (M x K) B (K x N, row stride ldb), with
// A(i, k) = a[i * lda + k], or a[k * lda + i] when a_transposed.
struct AxpyArgs {
  const float* a;
  int64_t lda;
  bool a_transposed;
  const float* b;
  int64_t ldb;
  float* c;
  int64_t ldc;
  int64_t M, N, K;
  bool accumulate;
};
}  // namespace aviary
#endif  // AVIARY_GEMM_ONCE

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "tensor/gemm.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "tensor/matmul-inl.h"

HWY_BEFORE_NAMESPACE();
namespace aviary {
namespace HWY_NAMESPACE {

// Register tiles: the accumulators take most of the vector registers (32 on AVX-512 and NEON,
// 16 on AVX2 and older x86), leaving room for one step's operands.
#if HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3
constexpr int kDotRows = 2, kDotTokens = 4;
constexpr int kAxpyRows = 6, kAxpyVecs = 2;
constexpr int kNarrowRows = 12, kNarrowVecs = 1;
#else
constexpr int kDotRows = 4, kDotTokens = 4;
constexpr int kAxpyRows = 6, kAxpyVecs = 4;
constexpr int kNarrowRows = 12, kNarrowVecs = 2;
#endif
// Columns per forward pass: a token tile's x (kDotTokens x kDotDepth floats) stays in L1.
constexpr int64_t kDotDepth = 1024;
// Reduction steps per backward pass: the B panel (kAxpyDepth x kAxpyVecs vectors, 32 KiB with
// 512-bit vectors) stays in L1.
constexpr int64_t kAxpyDepth = 128;

// Where the kernels read n rows of `cols` floats (row stride `stride`): in place when each row
// starts on a vector boundary, else copied into `copy` at a padded stride (a vector load that
// straddles two cache lines costs two). The values are the same either way.
struct Rows {
  const float* data;
  int64_t stride;
};
HWY_INLINE Rows AlignedRows(const float* src, int64_t n, int64_t cols, AlignedVector<float>& copy) {
  if (reinterpret_cast<uintptr_t>(src) % kVectorAlign == 0 && cols % 16 == 0) return {src, cols};
  const int64_t stride = (cols + 15) / 16 * 16;
  if (copy.size() < static_cast<size_t>(n * stride)) copy.resize(n * stride);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(copy.data() + i * stride, src + i * cols, cols * sizeof(float));
  }
  return {copy.data(), stride};
}

// y[t, r] for the nr x nt valid entries of a tile: lane sums, then the scalar tail in column
// order, as GemmTile finishes.
template <int R, int TT>
HWY_INLINE void FinishDots(const VF (&acc)[R][TT], const float* const (&wr)[R],
                           const float* const (&xt)[TT], int nr, int nt, int64_t vec_cols,
                           int64_t cols, float* y, int64_t rows) {
  static_assert(R * TT <= 16, "one LaneSums for the tile");
  float sums[16];
  LaneSums(&acc[0][0], R * TT, sums);
  for (int r = 0; r < nr; ++r) {
    for (int t = 0; t < nt; ++t) {
      float sum = sums[r * TT + t];
      for (int64_t c = vec_cols; c < cols; ++c) sum = ScalarMulAdd(wr[r][c], xt[t][c], sum);
      y[t * rows + r] = sum;
    }
  }
}

// Outputs [t0, t1) x [r0, r1) of y = x W^T; `call` numbers the product (MatMulForwardF32 call).
void ForwardBlock(uint64_t call, const float* w, int64_t rows, int64_t cols, const float* x,
                  float* y, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  constexpr int R = kDotRows, TT = kDotTokens;
  constexpr size_t kTileFloats = R * TT * kLanes;
  const DF df;
  const int64_t vec_cols = cols / static_cast<int64_t>(kLanes) * static_cast<int64_t>(kLanes);
  const int64_t row_tiles = (r1 - r0 + R - 1) / R;
  // Per thread, grown once: the block's rows and a token tile, aligned; each row tile's
  // accumulators between passes over the columns. A thread's next block of the same product
  // usually has the same rows (consecutive blocks share their rows): their copy is kept.
  thread_local AlignedVector<float> w_copy, x_copy, parked;
  thread_local uint64_t copied_call = 0;
  thread_local int64_t copied_r0 = -1;
  Rows wb;
  if (copied_call == call && copied_r0 == r0) {
    wb = {w_copy.data(), (cols + 15) / 16 * 16};
  } else {
    wb = AlignedRows(w + r0 * cols, r1 - r0, cols, w_copy);
    if (wb.data == w_copy.data()) copied_call = call, copied_r0 = r0;
  }
  if (vec_cols > kDotDepth && parked.size() < row_tiles * kTileFloats) {
    parked.resize(row_tiles * kTileFloats);
  }
  for (int64_t t = t0; t < t1; t += TT) {
    const int nt = static_cast<int>(std::min<int64_t>(TT, t1 - t));
    const Rows xb = AlignedRows(x + t * cols, nt, cols, x_copy);
    const float* xt[TT];  // a short tile repeats its last token; its extra outputs are dropped
    for (int j = 0; j < TT; ++j) xt[j] = xb.data + std::min(j, nt - 1) * xb.stride;
    for (int64_t c0 = 0; c0 == 0 || c0 < vec_cols; c0 += kDotDepth) {
      const int64_t c1 = std::min(vec_cols, c0 + kDotDepth);
      const bool first = c0 == 0, last = c1 == vec_cols;
      for (int64_t tile = 0; tile < row_tiles; ++tile) {
        const int64_t r = tile * R;  // in the block
        const int nr = static_cast<int>(std::min<int64_t>(R, r1 - r0 - r));
        const float* wr[R];  // likewise the last row of a short tile
        for (int i = 0; i < R; ++i) wr[i] = wb.data + (r + std::min(i, nr - 1)) * wb.stride;
        float* park = first && last ? nullptr : parked.data() + tile * kTileFloats;
        VF acc[R][TT];
        for (int i = 0; i < R; ++i) {
          for (int j = 0; j < TT; ++j) {
            acc[i][j] = first ? hn::Zero(df) : hn::Load(df, park + (i * TT + j) * kLanes);
          }
        }
        for (int64_t c = c0; c < c1; c += kLanes) {
          VF xv[TT];
          for (int j = 0; j < TT; ++j) xv[j] = hn::Load(df, xt[j] + c);
          for (int i = 0; i < R; ++i) {
            const VF wv = hn::Load(df, wr[i] + c);
            for (int j = 0; j < TT; ++j) acc[i][j] = hn::MulAdd(wv, xv[j], acc[i][j]);
          }
        }
        if (last) {
          FinishDots(acc, wr, xt, nr, nt, vec_cols, cols, y + t * rows + r0 + r, rows);
        } else {
          for (int i = 0; i < R; ++i) {
            for (int j = 0; j < TT; ++j) hn::Store(acc[i][j], df, park + (i * TT + j) * kLanes);
          }
        }
      }
    }
  }
}

// ---- backward ----

// C tile (MR x NV vectors, row stride ldc) = (load ? C : 0) + A x B over kc steps: A read in
// place at one broadcast per row and step (rows of `a`, or, kTransposed, its columns), B from its
// panel (NV vectors per step). Rows of A: a short tile (`rows` valid) repeats its last one, the
// caller drops those outputs. Columns of A: all MR are read.
template <bool kTransposed, int MR, int NV>
HWY_INLINE void AxpyTile(const float* a, int64_t lda, int rows, const float* bp, int64_t kc,
                         float* c, int64_t ldc, bool load) {
  constexpr int64_t kWidth = NV * static_cast<int64_t>(kLanes);
  const DF df;
  VF acc[MR][NV];
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) {
      acc[i][v] = load ? hn::LoadU(df, c + i * ldc + v * kLanes) : hn::Zero(df);
    }
  }
  const float* ai[MR];  // rows of A
  for (int i = 0; i < MR; ++i) ai[i] = a + std::min(i, rows - 1) * lda;
  for (int64_t k = 0; k < kc; ++k) {
    VF b[NV];
    for (int v = 0; v < NV; ++v) b[v] = hn::Load(df, bp + k * kWidth + v * kLanes);
    for (int i = 0; i < MR; ++i) {
      const VF av = hn::Set(df, kTransposed ? a[k * lda + i] : ai[i][k]);
      for (int v = 0; v < NV; ++v) acc[i][v] = hn::MulAdd(av, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) hn::StoreU(acc[i][v], df, c + i * ldc + v * kLanes);
  }
}

// Outputs [i0, i1) x [j0, j1) of C (+)= A B (g.K > 0), in tiles of MR x NV vectors.
template <bool kTransposed, int MR, int NV>
void AxpyBlockT(const AxpyArgs& g, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  constexpr int64_t kWidth = NV * static_cast<int64_t>(kLanes);
  thread_local AlignedVector<float> b_panel;  // grows once
  if (b_panel.size() < static_cast<size_t>(kAxpyDepth * kWidth)) {
    b_panel.resize(kAxpyDepth * kWidth);
  }
  for (int64_t k0 = 0; k0 < g.K; k0 += kAxpyDepth) {
    const int64_t kc = std::min(kAxpyDepth, g.K - k0);
    const bool load = k0 > 0 || g.accumulate;
    for (int64_t j = j0; j < j1; j += kWidth) {
      // B's rows k0 .. k0 + kc, columns j .. j + kWidth, zeros past j1.
      const int64_t nj = std::min(kWidth, j1 - j);
      float* bp = b_panel.data();
      for (int64_t k = 0; k < kc; ++k) {
        std::memcpy(bp + k * kWidth, g.b + (k0 + k) * g.ldb + j, nj * sizeof(float));
        std::fill(bp + k * kWidth + nj, bp + (k + 1) * kWidth, 0.0f);
      }
      for (int64_t i = i0; i < i1; i += MR) {
        const int ni = static_cast<int>(std::min<int64_t>(MR, i1 - i));
        const float* a = kTransposed ? g.a + k0 * g.lda + i : g.a + i * g.lda + k0;
        float* c = g.c + i * g.ldc + j;
        if (ni == MR && nj == kWidth) {
          AxpyTile<kTransposed, MR, NV>(a, g.lda, ni, bp, kc, c, g.ldc, load);
          continue;
        }
        // An edge tile: through a full-size copy, the outputs outside C left out; columns of A
        // copied with zeros past the last row.
        HWY_ALIGN float edge[MR * kWidth] = {};
        HWY_ALIGN float a_edge[kTransposed ? kAxpyDepth * MR : 1];
        int64_t lda = g.lda;
        if (kTransposed && ni < MR) {
          for (int64_t k = 0; k < kc; ++k) {
            for (int r = 0; r < MR; ++r) a_edge[k * MR + r] = r < ni ? a[k * g.lda + r] : 0.0f;
          }
          a = a_edge;
          lda = MR;
        }
        if (load) {
          for (int r = 0; r < ni; ++r) {
            std::memcpy(edge + r * kWidth, c + r * g.ldc, nj * sizeof(float));
          }
        }
        AxpyTile<kTransposed, MR, NV>(a, lda, ni, bp, kc, edge, kWidth, load);
        for (int r = 0; r < ni; ++r) {
          std::memcpy(c + r * g.ldc, edge + r * kWidth, nj * sizeof(float));
        }
      }
    }
  }
}

void AxpyBlock(const AxpyArgs& g, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  constexpr int MR = kAxpyRows, NV = kAxpyVecs, NR = kNarrowRows, NN = kNarrowVecs;
  // Narrow outputs (a low-rank matrix's 32 columns) in a tile as narrow, not padded with zeros.
  const bool narrow = j1 - j0 <= NN * static_cast<int64_t>(kLanes);
  if (g.a_transposed) {
    return narrow ? AxpyBlockT<true, NR, NN>(g, i0, i1, j0, j1)
                  : AxpyBlockT<true, MR, NV>(g, i0, i1, j0, j1);
  }
  narrow ? AxpyBlockT<false, NR, NN>(g, i0, i1, j0, j1)
         : AxpyBlockT<false, MR, NV>(g, i0, i1, j0, j1);
}

}  // namespace HWY_NAMESPACE
}  // namespace aviary
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace aviary {

HWY_EXPORT(ForwardBlock);
HWY_EXPORT(AxpyBlock);

namespace {

// Work below which a product runs on the calling thread alone (as MatMul decides).
constexpr int64_t kMinParallelMacs = 1 << 17;

// Runs fn(i0, i1, j0, j1) over blocks of an m x n output, bm x bn at most; with several
// threads the blocks are halved (down to min_bm, min_bn) until each thread has a few to take,
// so a small output still spreads. Outputs never depend on the blocks, only speed does.
template <class F>
void ForBlocks(int64_t m, int64_t n, int64_t bm, int64_t bn, int64_t min_bm, int64_t min_bn,
               int64_t macs, F&& fn) {
  const int threads = macs < kMinParallelMacs ? 1 : NumThreads();
  auto blocks = [&] { return ((m + bm - 1) / bm) * ((n + bn - 1) / bn); };
  if (threads > 1) {
    while (blocks() < 4 * threads && bn > min_bn) bn /= 2;
    while (blocks() < 4 * threads && bm > min_bm) bm /= 2;
  }
  const int64_t n_blocks = (n + bn - 1) / bn;
  auto run = [&](int64_t task, int) {
    const int64_t i0 = task / n_blocks * bm, j0 = task % n_blocks * bn;
    fn(i0, std::min(m, i0 + bm), j0, std::min(n, j0 + bn));
  };
  if (threads == 1) {
    for (int64_t task = 0; task < blocks(); ++task) run(task, 0);
  } else {
    ParallelFor(blocks(), run, threads);
  }
}

void Axpy(const AxpyArgs& g) {
  if (g.M <= 0 || g.N <= 0) return;
  if (g.K <= 0) {  // an empty sum
    if (!g.accumulate) {
      for (int64_t i = 0; i < g.M; ++i) std::fill(g.c + i * g.ldc, g.c + i * g.ldc + g.N, 0.0f);
    }
    return;
  }
  const auto block = HWY_DYNAMIC_DISPATCH(AxpyBlock);
  // 384 x 256 outputs: each B panel serves many row tiles (its copy costs little), and C's block
  // (384 KiB) stays in L2 over the passes.
  ForBlocks(g.M, g.N, 384, 256, 12, 64, g.M * g.N * g.K,
            [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) { block(g, i0, i1, j0, j1); });
}

// The scalar loops of Kernels::kReference: each output's chain in the order of the sum, as the
// fast kernels, without fused multiply-adds.
void RefBackwardInput(const float* w, int64_t rows, int64_t cols, const float* dy, int T, float* dx,
                      bool accumulate) {
  for (int64_t t = 0; t < T; ++t) {
    float* out = dx + t * cols;
    if (!accumulate) std::fill(out, out + cols, 0.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const float g = dy[t * rows + r];
      const float* wr = w + r * cols;
      for (int64_t c = 0; c < cols; ++c) out[c] += g * wr[c];
    }
  }
}

void RefBackwardWeight(const float* dy, const float* x, int T, int64_t rows, int64_t cols,
                       float* dw, bool accumulate) {
  if (!accumulate) std::fill(dw, dw + rows * cols, 0.0f);
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * cols;
    for (int64_t r = 0; r < rows; ++r) {
      const float g = dy[t * rows + r];
      float* out = dw + r * cols;
      for (int64_t c = 0; c < cols; ++c) out[c] += g * xt[c];
    }
  }
}

}  // namespace

void MatMulForwardF32(const float* w, int64_t rows, int64_t cols, const float* x, int T, float* y) {
  if (T <= 0 || rows <= 0) return;
  if (ActiveKernels() == Kernels::kReference) {
    const Tensor tensor{"w",
                        DType::kF32,
                        {rows, cols},
                        reinterpret_cast<const uint8_t*>(w),
                        static_cast<size_t>(rows * cols) * sizeof(float)};
    return ref::MatMul(tensor, x, T, y);
  }
  const auto block = HWY_DYNAMIC_DISPATCH(ForwardBlock);
  static std::atomic<uint64_t> calls{0};  // never 0: ForwardBlock's copies start unnumbered
  const uint64_t call = ++calls;
  // Blocks of up to 256 rows, fewer for wide rows: the block's rows (at most 1 MiB) stay in L2
  // while every token tile passes over them.
  int64_t block_rows = 256;
  while (block_rows > 16 && block_rows * cols * static_cast<int64_t>(sizeof(float)) > (1 << 20)) {
    block_rows /= 2;
  }
  ForBlocks(rows, T, block_rows, 96, 16, 12, rows * cols * T,
            [&](int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
              block(call, w, rows, cols, x, y, r0, r1, t0, t1);
            });
}

void MatMulBackwardInput(const float* w, int64_t rows, int64_t cols, const float* dy, int T,
                         float* dx, bool accumulate) {
  if (ActiveKernels() == Kernels::kReference) {
    return RefBackwardInput(w, rows, cols, dy, T, dx, accumulate);
  }
  // dx (T x cols) = dy (T x rows) W (rows x cols).
  Axpy({dy, rows, false, w, cols, dx, cols, T, cols, rows, accumulate});
}

void MatMulBackwardWeight(const float* dy, const float* x, int T, int64_t rows, int64_t cols,
                          float* dw, bool accumulate) {
  if (ActiveKernels() == Kernels::kReference) {
    return RefBackwardWeight(dy, x, T, rows, cols, dw, accumulate);
  }
  // dw (rows x cols) = dy^T (rows x T) x (T x cols).
  Axpy({dy, rows, true, x, cols, dw, cols, rows, cols, T, accumulate});
}

}  // namespace aviary
#endif  // HWY_ONCE
