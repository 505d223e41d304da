// 8-bit-activation MatMul for quantized weights with AVX-512 VNNI. See int8_matmul.h; the
// kernels and their design are in int8_matmul-inl.h, one compile unit per weight type
// (int8_matmul_<type>.cpp). Here: the settings, the rounding of the activations, the dispatch
// and the scalar definition.
#include "tensor/int8_matmul.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cstring>

#include "tensor/int8_matmul-inl.h"
#include "tensor/kernels.h"
#include "tensor/thread_pool.h"

namespace aviary::int8 {
namespace {

using vnni::BlockBytes;
using vnni::IsK;
using vnni::Offset;

// One block of x: its step d and the rounded values (the same numbers as the SIMD version).
float QuantizeBlockScalar(const float* x, int8_t* q) {
  float amax = 0;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.0f;
  const float id = d != 0 ? 1.0f / d : 0.0f;
  for (int i = 0; i < 32; ++i) {
    const float r = std::nearbyint(x[i] * id);
    q[i] = static_cast<int8_t>(r >= -127 && r <= 127 ? r : (r > 127 ? 127 : -127));
  }
  return d;
}

// The weight block's numbers in the u, k, m form.
struct WBlock {
  float d = 0, m = 0;
  uint8_t u[32] = {};
};
float Half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return F16ToF32(h);
}
WBlock UnpackBlockScalar(DType type, const uint8_t* p) {
  WBlock b;
  b.d = Half(p);
  const uint8_t* qs = nullptr;
  uint32_t qh = 0;
  switch (type) {
    case DType::kQ8_0:
      for (int i = 0; i < 32; ++i) b.u[i] = static_cast<uint8_t>(p[2 + i] ^ 0x80);
      return b;
    case DType::kQ4_0: qs = p + 2; break;
    case DType::kQ4_1:
      b.m = Half(p + 2);
      qs = p + 4;
      break;
    case DType::kQ5_0:
      std::memcpy(&qh, p + 2, 4);
      qs = p + 6;
      break;
    case DType::kQ5_1:
      b.m = Half(p + 2);
      std::memcpy(&qh, p + 4, 4);
      qs = p + 8;
      break;
    default: return b;
  }
  for (int i = 0; i < 16; ++i) {
    b.u[i] = static_cast<uint8_t>((qs[i] & 15) | (((qh >> i) & 1) << 4));
    b.u[i + 16] = static_cast<uint8_t>((qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4));
  }
  return b;
}

// Q4_K / Q5_K sub-block j (of 8) of the super-block at p: w = d sc_j q - dmin m_j, so the
// block's d_w = d * sc_j and m = -(dmin * m_j) (k = 0).
void SubBlockScalesK(const uint8_t* p, int j, float* d, float* m) {
  uint8_t sc, mn;
  ScaleMinK4(j, p + 4, &sc, &mn);  // scales follow d and dmin in both layouts
  *d = Half(p) * static_cast<float>(sc);
  *m = -(Half(p + 2) * static_cast<float>(mn));
}

// 32-weight block b of a row, in the u, k, m form.
WBlock UnpackScalar(DType type, const uint8_t* row, int64_t b) {
  WBlock w;
  if (IsK(type)) {
    const uint8_t* p = row + (b / 8) * BlockBytes(type);
    const int j = static_cast<int>(b % 8);
    SubBlockScalesK(p, j, &w.d, &w.m);
    const uint8_t* qs =
        p + (type == DType::kQ4_K ? offsetof(BlockQ4_K, qs) : offsetof(BlockQ5_K, qs));
    for (int i = 0; i < 32; ++i) {
      const uint8_t byte = qs[32 * (j / 2) + i];
      w.u[i] = static_cast<uint8_t>((j & 1) ? byte >> 4 : byte & 0x0f);
      if (type == DType::kQ5_K)
        w.u[i] |= static_cast<uint8_t>(((p[offsetof(BlockQ5_K, qh) + i] >> j) & 1) << 4);
    }
    return w;
  }
  return UnpackBlockScalar(type, row + b * BlockBytes(type));
}

#if AVIARY_HAVE_VNNI_CODE
AVIARY_VNNI_FN void QuantizeVnni(const float* x, int t0, int t1, int64_t cols, Activations* a) {
  for (int t = t0; t < t1; ++t) {
    int8_t* q = a->q.data() + t * a->padded_blocks * 32;
    float* d = a->d.data() + t * a->padded_blocks;
    int32_t* sums = a->sums.data() + t * a->padded_blocks;
    float* ds = a->ds.data() + t * a->padded_blocks;
    const float* xt = x + t * cols;
    for (int64_t b = 0; b < a->blocks; ++b) {
      const __m512 v0 = _mm512_loadu_ps(xt + b * 32), v1 = _mm512_loadu_ps(xt + b * 32 + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float step = amax / 127.0f;
      const float id = step != 0 ? 1.0f / step : 0.0f;
      const __m512 vid = _mm512_set1_ps(id);
      // Round to nearest even (the default MXCSR mode), clamp to [-127, 127] like the scalar
      // version (NaN converts to INT_MIN, so -127).
      const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
      const __m512i i0 =
          _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v0, vid)), hi), lo);
      const __m512i i1 =
          _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v1, vid)), hi), lo);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * 32), _mm512_cvtepi32_epi8(i0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + b * 32 + 16), _mm512_cvtepi32_epi8(i1));
      const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
      d[b] = step;
      sums[b] = sum;
      ds[b] = step * static_cast<float>(sum);
    }
  }
}

AVIARY_VNNI_FN void RegroupActivations(Activations* a, int t0, int t1) {
  for (int t = t0; t < t1; ++t) {
    vnni::Regroup(reinterpret_cast<const uint8_t*>(a->q_at(t)),
                  reinterpret_cast<uint8_t*>(a->qt.data() + t * a->padded_blocks * 32),
                  a->padded_blocks / 16);
  }
}
#endif  // AVIARY_HAVE_VNNI_CODE

}  // namespace

bool CpuSupported() {
#if AVIARY_HAVE_VNNI_CODE
  // F16C, also used, comes with every AVX-512 CPU (and clang 14 cannot test for it here).
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

bool Enabled() {
  return CpuSupported() && CurrentRuntime().options().activations != aviary::Activations::kF32;
}

void Quantize(const float* x, int T, int64_t cols, Activations* out) {
  out->cols = cols;
  out->T = T;
  out->blocks = cols / 32;
  out->padded_blocks = (out->blocks + 15) / 16 * 16;
  const int64_t nb = out->blocks, nbp = out->padded_blocks;
  const size_t total = static_cast<size_t>(nbp) * static_cast<size_t>(T);
  if (out->q.size() < total * 32) {  // grows only
    out->q.resize(total * 32);
    out->qt.resize(total * 32);
    out->d.resize(total);
    out->sums.resize(total);
    out->ds.resize(total);
  }
  // Tokens are independent: a long prompt's are rounded in parallel (16 tokens a task).
  auto tokens = [&](int t0, int t1) {
    for (int t = t0; t < t1; ++t) {  // padding blocks are zero: they add nothing
      std::fill(out->q.begin() + (t * nbp + nb) * 32, out->q.begin() + (t + 1) * nbp * 32, 0);
      std::fill(out->d.begin() + t * nbp + nb, out->d.begin() + (t + 1) * nbp, 0.0f);
      std::fill(out->sums.begin() + t * nbp + nb, out->sums.begin() + (t + 1) * nbp, 0);
      std::fill(out->ds.begin() + t * nbp + nb, out->ds.begin() + (t + 1) * nbp, 0.0f);
    }
#if AVIARY_HAVE_VNNI_CODE
    if (CpuSupported()) {
      QuantizeVnni(x, t0, t1, cols, out);
      if (T > 1) RegroupActivations(out, t0, t1);
      return;
    }
#endif
    for (int t = t0; t < t1; ++t) {
      for (int64_t b = 0; b < nb; ++b) {
        int8_t* q = out->q.data() + (t * nbp + b) * 32;
        const float d = QuantizeBlockScalar(x + t * cols + b * 32, q);
        int32_t sum = 0;
        for (int i = 0; i < 32; ++i) sum += q[i];
        out->d[t * nbp + b] = d;
        out->sums[t * nbp + b] = sum;
        out->ds[t * nbp + b] = d * static_cast<float>(sum);
      }
    }
  };
  ParallelForRanges(T, /*chunk=*/16, [&](int64_t t0, int64_t t1) {
    tokens(static_cast<int>(t0), static_cast<int>(t1));
  });
}

void MatMulRows(DType type, const uint8_t* w, size_t row_bytes, int64_t rows, int64_t /*cols*/,
                int64_t r0, int64_t r1, const Activations& a, float* y) {
#if AVIARY_HAVE_VNNI_CODE
  switch (type) {
    case DType::kQ4_0: return vnni::MatMulRowsT<DType::kQ4_0>(w, row_bytes, rows, r0, r1, a, y);
    case DType::kQ4_1: return vnni::MatMulRowsT<DType::kQ4_1>(w, row_bytes, rows, r0, r1, a, y);
    case DType::kQ5_0: return vnni::MatMulRowsT<DType::kQ5_0>(w, row_bytes, rows, r0, r1, a, y);
    case DType::kQ5_1: return vnni::MatMulRowsT<DType::kQ5_1>(w, row_bytes, rows, r0, r1, a, y);
    case DType::kQ8_0: return vnni::MatMulRowsT<DType::kQ8_0>(w, row_bytes, rows, r0, r1, a, y);
    case DType::kQ4_K: return vnni::MatMulRowsT<DType::kQ4_K>(w, row_bytes, rows, r0, r1, a, y);
    case DType::kQ5_K: return vnni::MatMulRowsT<DType::kQ5_K>(w, row_bytes, rows, r0, r1, a, y);
    default: break;
  }
#endif
  (void)type, (void)w, (void)row_bytes, (void)rows, (void)r0, (void)r1, (void)a, (void)y;
  std::abort();  // callers check SupportsType() and CpuSupported()
}

void ReferenceMatMul(const Tensor& w, const float* x, int T, float* y) {
  const int64_t rows = w.rows(), cols = w.cols(), blocks = cols / 32;
  const int k = Offset(w.type);
  std::vector<int8_t> q(static_cast<size_t>(cols));
  std::vector<float> d(static_cast<size_t>(blocks));
  std::vector<int32_t> sums(static_cast<size_t>(blocks));
  for (int t = 0; t < T; ++t) {
    for (int64_t b = 0; b < blocks; ++b) {
      d[b] = QuantizeBlockScalar(x + t * cols + b * 32, q.data() + b * 32);
      sums[b] = 0;
      for (int i = 0; i < 32; ++i) sums[b] += q[b * 32 + i];
    }
    for (int64_t r = 0; r < rows; ++r) {
      float acc = 0, mterm = 0;
      for (int64_t b = 0; b < blocks; ++b) {
        const WBlock wb = UnpackScalar(w.type, w.row(r), b);
        int32_t isum = -k * sums[b];
        for (int i = 0; i < 32; ++i) isum += static_cast<int32_t>(wb.u[i]) * q[b * 32 + i];
        acc += static_cast<float>(isum) * d[b] * wb.d;
        mterm += wb.m * (d[b] * static_cast<float>(sums[b]));
      }
      y[t * rows + r] = acc + mterm;
    }
  }
}

}  // namespace aviary::int8
