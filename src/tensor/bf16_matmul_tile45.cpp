// The bfloat16 MatMul's sequence tiles of 4 and 5 rows (bf16_matmul-inl.h), in a file
// of their own so that the tile shapes compile in parallel.
#include "tensor/bf16_matmul-inl.h"

#if AVIARY_HAVE_BF16_CODE
namespace aviary::bf16::tiles {
AVIARY_BF16_TILE_INSTANCE(, 4);
AVIARY_BF16_TILE_INSTANCE(, 5);
}  // namespace aviary::bf16::tiles
#endif
