// Weight data types and their storage layouts (ggml's block formats for the quantized ones).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace aviary {

enum class DType : uint8_t {
  kF32,
  kF16,
  kBF16,
  kQ4_0,
  kQ4_1,
  kQ5_0,
  kQ5_1,
  kQ8_0,
  kQ4_K,
  kQ5_K,
  kQ6_K,  // ggml's K-quants: super-blocks of 256 (see below)
};
constexpr int kNumDTypes = 11;

// Everything about a weight type that is data: its name, its block layout and its codes in the
// file formats that can store it (-1: that format cannot). The code that differs per type
// (dequantizing, quantizing, the matrix kernels) switches on DType; docs/DEVELOPING.md lists it.
struct DTypeTraits {
  std::string_view name;
  int block_elems;     // elements per block (1 for plain floats)
  int block_bytes;     // bytes per block
  int ggml_type;       // ggml's tensor type (GGUF tensor infos)
  int gguf_file_type;  // llama.cpp's general.file_type for a file mostly of this type
  int rwkvcpp_type;    // rwkv.cpp's .bin data type
};

const DTypeTraits& Traits(DType type);
inline std::string_view DTypeName(DType type) { return Traits(type).name; }
inline bool IsQuantized(DType type) { return Traits(type).block_elems > 1; }

// Bytes of `n` elements; n must be a multiple of the block size.
inline size_t StorageBytes(DType type, uint64_t n) {
  const auto& t = Traits(type);
  return static_cast<size_t>(n / t.block_elems) * t.block_bytes;
}

float F16ToF32(uint16_t h);
uint16_t F32ToF16(float f);  // round to nearest even
inline float BF16ToF32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// ggml's blocks of 32 weights. x = d * (q - offset) or x = d * q + m.
constexpr int kQBlock = 32;
#pragma pack(push, 1)
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[16];
};
struct BlockQ4_1 {
  uint16_t d, m;
  uint8_t qs[16];
};
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];
  uint8_t qs[16];
};
struct BlockQ5_1 {
  uint16_t d, m;
  uint8_t qh[4];
  uint8_t qs[16];
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
#pragma pack(pop)
// ggml's K-quants: super-blocks of 256 weights with one f16 scale (and one f16 scale of the
// minima), and a small integer scale per sub-block, so the per-block scales cost ~0.2-0.5 bit
// per weight instead of 0.5-1 (Q4_0, Q5_1): more bits for the weights at the same size.
//  - Q4_K, Q5_K: 8 sub-blocks of 32, x = d * sc_j * q - dmin * m_j, with 6-bit sc_j and m_j
//    packed in `scales` (see ScaleMinK4). The 4 low bits of q: byte i of qs[32 c .. 32 c + 32)
//    holds element i of sub-block 2c (low nibble) and of sub-block 2c + 1 (high nibble); Q5_K's
//    fifth bit of element i of sub-block j is bit j of qh[i].
//  - Q6_K: 16 sub-blocks of 16, x = d * sc_j * (q - 32), with signed 8-bit sc_j; per half of
//    128: element l (< 32) + 32 k takes the nibble (k < 2: low, else high) of ql[64 h + l +
//    32 (k & 1)] and bits 2k, 2k+1 of qh[32 h + l] as its top two bits.
constexpr int kQKBlock = 256;
constexpr int kKScaleBytes = 12;
#pragma pack(push, 1)
struct BlockQ4_K {
  uint16_t d, dmin;
  uint8_t scales[kKScaleBytes];
  uint8_t qs[128];
};
struct BlockQ5_K {
  uint16_t d, dmin;
  uint8_t scales[kKScaleBytes];
  uint8_t qh[32];
  uint8_t qs[128];
};
struct BlockQ6_K {
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;
};
#pragma pack(pop)
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22 &&
              sizeof(BlockQ5_1) == 24 && sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210);

// Q4_K / Q5_K: the 6-bit scale and minimum of sub-block j (0..7) from the 12 packed bytes.
inline void ScaleMinK4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = static_cast<uint8_t>((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4));
    *m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// Widens `n` stored elements starting at `src` to float. n must be a multiple of the block size.
void DequantizeRow(DType type, const uint8_t* src, float* dst, int64_t n);

}  // namespace aviary
