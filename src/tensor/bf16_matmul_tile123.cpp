// The bfloat16 MatMul's sequence tiles of 1, 2 and 3 rows (bf16_matmul-inl.h), in a file
// of their own so that the tile shapes compile in parallel.
#include "tensor/bf16_matmul-inl.h"

#if AVIARY_HAVE_BF16_CODE
namespace aviary::bf16::tiles {
AVIARY_BF16_TILE_INSTANCE(, 1);
AVIARY_BF16_TILE_INSTANCE(, 2);
AVIARY_BF16_TILE_INSTANCE(, 3);
}  // namespace aviary::bf16::tiles
#endif
