// Float -> stored weights: F32, F16, BF16 and ggml's Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 blocks,
// bit-exact with ggml's reference encoders (quantize_row_*_ref in ggml-quants.c,
// GGML_FP32_TO_FP16 and GGML_FP32_TO_BF16), which is what llama.cpp's and rwkv.cpp's
// quantizers write when no importance matrix is given; and the K-quants Q6_K, Q5_K, Q4_K with
// aviary's own search (ggml's layout, not its bytes: a longer search than ggml's reference
// encoders, for a little less error; see quantize.cpp). DequantizeRow (dtype.h) is the inverse.
#pragma once

#include <cstdint>

#include "tensor/dtype.h"

namespace aviary {

// Round to nearest even; NaN stays a (quiet) NaN with its sign, as ggml does.
uint16_t F32ToBF16(float f);

// How the block encoders round q = x / d + offset. kReference: the product, then the sum, each
// rounded to float, as ggml-quants.c is written (and as llama.cpp's quantizer runs today).
// kFusedMultiplyAdd: one rounding, as ggml builds did whose compiler contracted the expression
// into an FMA (-march=native with GCC's default -ffp-contract=fast; some older rwkv.cpp
// files): the two differ in rare exact ties (about 1 block in 500). Q8_0, F16 and BF16 have no
// such expression and ignore this, as do the K-quants.
enum class QuantRounding { kReference, kFusedMultiplyAdd };

// Encodes `n` floats (a multiple of the type's block size) into StorageBytes(type, n) bytes.
void QuantizeRow(DType type, const float* src, uint8_t* dst, int64_t n,
                 QuantRounding rounding = QuantRounding::kReference);

}  // namespace aviary
