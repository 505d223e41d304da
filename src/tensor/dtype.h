// Weight data types and their storage layouts (ggml's block formats for the quantized ones).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace aviary {

enum class DType : uint8_t { kF32, kF16, kBF16, kQ4_0, kQ4_1, kQ5_0, kQ5_1, kQ8_0 };

struct DTypeTraits {
  std::string_view name;
  int block_elems;  // elements per block (1 for plain floats)
  int block_bytes;  // bytes per block
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
struct BlockQ4_0 { uint16_t d; uint8_t qs[16]; };
struct BlockQ4_1 { uint16_t d, m; uint8_t qs[16]; };
struct BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[16]; };
struct BlockQ5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[16]; };
struct BlockQ8_0 { uint16_t d; int8_t qs[32]; };
#pragma pack(pop)
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22 &&
              sizeof(BlockQ5_1) == 24 && sizeof(BlockQ8_0) == 34);

// Widens `n` stored elements starting at `src` to float. n must be a multiple of the block size.
void DequantizeRow(DType type, const uint8_t* src, float* dst, int64_t n);

}  // namespace aviary
