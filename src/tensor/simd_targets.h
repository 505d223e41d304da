// The Highway targets every SIMD file of aviary compiles for. Included before
// hwy/foreach_target.h by each of them: the matrix files (kernels.cpp, matmul_*.cpp) call each
// other per target, so they must all have the same set.
#pragma once

// Scalable vectors (SVE, RVV) cannot be held in arrays; these kernels use fixed-size ones.
#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS (HWY_SVE | HWY_SVE2 | HWY_SVE_256 | HWY_SVE2_128 | HWY_RVV)
#endif
