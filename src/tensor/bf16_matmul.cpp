// bfloat16-dot-product MatMul for F16 and BF16 weights with AVX512_BF16. See bf16_matmul.h.
//
// Written with x86 intrinsics rather than Highway, as int8_matmul.cpp is: the Debian Highway
// (1.0.3) has no op that is exactly vdpbf16ps with a fixed lane order, and that instruction
// is the whole point. The functions carry a target attribute and run only after a CPUID
// check, so the binary still runs on any x86-64 (elsewhere the file is the scalar definition).
//
// Every output y[t, r] is one accumulator of 16 float lanes: for each 32-column chunk in
// order, lane j adds w[2j] x[2j] + w[2j+1] x[2j+1] of that chunk (vdpbf16ps), the last chunk
// padded with zeros (masked loads for the weights, zero padding in Activations); then the lane
// sums of lane_sums.h. Weight chunks are rounded to bfloat16 the same way on both paths
// (F16 -> float -> bfloat16, nearest even), so:
//  - T = 1 streams R = 4 rows and rounds their chunks in registers;
//  - T > 1 rounds R rows once into a small buffer and runs an R-row x TT-token register tile
//    of accumulators over it, so each rounded weight serves every token of the chunk,
// and the two agree bit for bit, whatever the thread count. The tiles, the same for both
// types, are in bf16_matmul-inl.h, compiled in bf16_matmul_tile*.cpp.
#include "tensor/bf16_matmul.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <vector>

#include "tensor/bf16_matmul-inl.h"
#include "tensor/kernels.h"
#include "tensor/thread_pool.h"

namespace aviary::bf16 {
namespace {

// The bfloat16 the kernels use for weight c of a row.
uint16_t WeightBits(DType type, const uint8_t* row, int64_t c) {
  uint16_t h;
  std::memcpy(&h, row + 2 * c, 2);
  if (type == DType::kF16) return Round(F16ToF32(h));
  return (h & 0x7f80) == 0 ? static_cast<uint16_t>(h & 0x8000) : h;  // subnormals read as zero
}

#if AVIARY_HAVE_BF16_CODE
using tiles::FinalSums;
using tiles::GemmRows;
using tiles::kChunk;

// 32 weights from column c (n <= 32 of them; the rest zero), rounded to bfloat16.
template <DType kType>
AVIARY_BF16 __m512bh LoadWeights(const uint8_t* row, int64_t c, int n) {
  const uint16_t* p = reinterpret_cast<const uint16_t*>(row) + c;
  if constexpr (kType == DType::kBF16) {
    const __m512i v = n == kChunk
                          ? _mm512_loadu_si512(p)
                          : _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << n) - 1), p);
    return (__m512bh)v;  // vdpbf16ps reads subnormals as zero, as WeightBits does
  } else {
    __m256i lo, hi;
    if (n == kChunk) {
      lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
    } else {
      const uint32_t m = static_cast<uint32_t>((1ull << n) - 1);
      lo = _mm256_maskz_loadu_epi16(static_cast<__mmask16>(m & 0xffff), p);
      hi = _mm256_maskz_loadu_epi16(static_cast<__mmask16>(m >> 16), p + 16);
    }
    return _mm512_cvtne2ps_pbh(_mm512_cvtph_ps(hi), _mm512_cvtph_ps(lo));
  }
}

AVIARY_BF16_FN void RoundRow(const float* x, int64_t cols, int64_t padded, uint16_t* out) {
  int64_t c = 0;
  for (; c + kChunk <= cols; c += kChunk) {
    const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + c + 16), _mm512_loadu_ps(x + c));
    _mm512_storeu_si512(out + c, (__m512i)b);
  }
  if (c < cols) {
    const int n = static_cast<int>(cols - c);
    const uint32_t m = static_cast<uint32_t>((1ull << n) - 1);
    const __m512 lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m & 0xffff), x + c);
    const __m512 hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m >> 16), x + c + 16);
    _mm512_storeu_si512(out + c, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    c += kChunk;
  }
  for (; c < padded; c += kChunk) _mm512_storeu_si512(out + c, _mm512_setzero_si512());
}

// ---- T = 1: R rows streamed and rounded in registers ----

// The rows are read one after the other, so memory is read in address order: the hardware
// prefetchers see one long stream, where R rows side by side would be R short interleaved
// streams, each too short for them to lock on. Each row keeps its own accumulator, in column
// order as in the T > 1 tiles, and out-of-order execution overlaps one row's chain of
// vdpbf16ps with the next row's. The row R rows ahead is prefetched at our pace (over a page
// boundary, where the hardware prefetchers stop).
template <DType kType, int R>
AVIARY_BF16 void GemvRows(const uint8_t* w, size_t row_bytes, int64_t cols, const uint16_t* x,
                          float* y) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) {
    const uint8_t* row = w + r * row_bytes;
    const char* ahead = reinterpret_cast<const char*>(row + R * row_bytes);
    __m512 sum = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + kChunk <= cols; c += kChunk) {
      _mm_prefetch(ahead + c * 2, _MM_HINT_T0);  // a chunk is one cache line of weights
      sum = _mm512_dpbf16_ps(sum, LoadWeights<kType>(row, c, kChunk),
                             (__m512bh)_mm512_load_si512(x + c));
    }
    if (c < cols) {
      const int n = static_cast<int>(cols - c);
      sum =
          _mm512_dpbf16_ps(sum, LoadWeights<kType>(row, c, n), (__m512bh)_mm512_load_si512(x + c));
    }
    acc[r] = sum;
  }
  float sums[16];
  FinalSums(acc, R, sums);
  for (int r = 0; r < R; ++r) y[r] = sums[r];
}

// ---- T > 1: R rows rounded once into `wbuf` (stride `ws`), R x TT tokens of accumulators ----

template <DType kType>
AVIARY_BF16 void RoundWeightsRow(const uint8_t* row, int64_t cols, int64_t padded, uint16_t* out) {
  int64_t c = 0;
  for (; c < cols; c += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, cols - c));
    _mm512_store_si512(out + c, (__m512i)LoadWeights<kType>(row, c, n));
  }
  for (; c < padded; c += kChunk) _mm512_store_si512(out + c, _mm512_setzero_si512());
}

// 6 rows x 4 tokens: 24 accumulators, 6 weight vectors and one activation vector in the 32
// registers; each activation load serves 6 vdpbf16ps, each weight load 4. Of the shapes that
// fit (4 x 4, 8 x 2, 4 x 6, 6 x 4), it serves the loads best on wide matrices such as the
// FFN's value matrix (768 x 3072 at 0.1B), which dominate a layer's products.
constexpr int kTileRows = 6;

template <DType kType>
AVIARY_BF16_FN void MatMulRowsT(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols,
                                int64_t r0, int64_t r1, const Activations& a, float* y) {
  if (a.T == 1) {
    const uint16_t* x = a.at(0);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) GemvRows<kType, 4>(w + r * row_bytes, row_bytes, cols, x, y + r);
    switch (r1 - r) {
      case 3: GemvRows<kType, 3>(w + r * row_bytes, row_bytes, cols, x, y + r); break;
      case 2: GemvRows<kType, 2>(w + r * row_bytes, row_bytes, cols, x, y + r); break;
      case 1: GemvRows<kType, 1>(w + r * row_bytes, row_bytes, cols, x, y + r); break;
      default: break;
    }
    return;
  }
  // Per-thread buffers of kTileRows rounded rows and of the accumulators carried between
  // column spans; they grow to the widest matrix and the longest chunk once.
  thread_local AlignedVector<uint16_t> buf;
  thread_local AlignedVector<float> carry;
  const int64_t ws = a.padded_cols;
  if (buf.size() < static_cast<size_t>(kTileRows * ws)) buf.resize(kTileRows * ws);
  if (carry.size() < static_cast<size_t>(a.T) * kTileRows * 16) carry.resize(a.T * kTileRows * 16);
  for (int64_t r = r0; r < r1; r += kTileRows) {
    const int n = static_cast<int>(std::min<int64_t>(kTileRows, r1 - r));
    for (int i = 0; i < n; ++i) {
      RoundWeightsRow<kType>(w + (r + i) * row_bytes, cols, ws, buf.data() + i * ws);
    }
    float* yr = y + r;
    switch (n) {
      case 6: GemmRows<6>(buf.data(), ws, a, carry.data(), yr, rows); break;
      case 5: GemmRows<5>(buf.data(), ws, a, carry.data(), yr, rows); break;
      case 4: GemmRows<4>(buf.data(), ws, a, carry.data(), yr, rows); break;
      case 3: GemmRows<3>(buf.data(), ws, a, carry.data(), yr, rows); break;
      case 2: GemmRows<2>(buf.data(), ws, a, carry.data(), yr, rows); break;
      default: GemmRows<1>(buf.data(), ws, a, carry.data(), yr, rows); break;
    }
  }
}
#endif  // AVIARY_HAVE_BF16_CODE

}  // namespace

uint16_t Round(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000);  // zero, subnormal
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

bool CpuSupported() {
#if AVIARY_HAVE_BF16_CODE
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

bool Enabled() {
  return CpuSupported() && CurrentRuntime().options().activations == aviary::Activations::kAuto;
}

void RoundActivations(const float* x, int T, int64_t cols, Activations* out) {
  out->T = T;
  out->padded_cols = (cols + 31) / 32 * 32;
  const int64_t pc = out->padded_cols;
  const size_t total = static_cast<size_t>(pc) * static_cast<size_t>(T);
  if (out->x.size() < total) out->x.resize(total);  // grows only
  // On the calling thread: one instruction rounds 32 values, so even a 64 x 8192 chunk takes
  // a few microseconds, about what handing it to the pool would cost.
  for (int64_t t = 0; t < T; ++t) {
    uint16_t* o = out->x.data() + t * pc;
#if AVIARY_HAVE_BF16_CODE
    if (CpuSupported()) {
      RoundRow(x + t * cols, cols, pc, o);
      continue;
    }
#endif
    for (int64_t c = 0; c < cols; ++c) o[c] = Round(x[t * cols + c]);
    std::fill(o + cols, o + pc, uint16_t{0});
  }
}

void MatMulRows(DType type, const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols,
                int64_t r0, int64_t r1, const Activations& a, float* y) {
#if AVIARY_HAVE_BF16_CODE
  switch (type) {
    case DType::kF16: return MatMulRowsT<DType::kF16>(w, row_bytes, rows, cols, r0, r1, a, y);
    case DType::kBF16: return MatMulRowsT<DType::kBF16>(w, row_bytes, rows, cols, r0, r1, a, y);
    default: break;
  }
#endif
  (void)type, (void)w, (void)row_bytes, (void)rows, (void)cols, (void)r0, (void)r1, (void)a,
      (void)y;
  std::abort();  // callers check SupportsType() and CpuSupported()
}

void ReferenceMatMul(const Tensor& w, const float* x, int T, float* y) {
  const int64_t rows = w.rows(), cols = w.cols();
  std::vector<float> wr(static_cast<size_t>(cols)), xr(static_cast<size_t>(cols));
  for (int t = 0; t < T; ++t) {
    for (int64_t c = 0; c < cols; ++c) xr[c] = Widen(Round(x[t * cols + c]));
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) wr[c] = Widen(WeightBits(w.type, w.row(r), c));
      double sum = 0;
      for (int64_t c = 0; c < cols; ++c) sum += static_cast<double>(wr[c]) * xr[c];
      y[t * rows + r] = static_cast<float>(sum);
    }
  }
}

}  // namespace aviary::bf16
