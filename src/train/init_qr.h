// The QR decomposition behind the orthogonal initialisation (init.h): blocked Householder
// reflections in double, their block products on Highway SIMD (init_qr.cpp) spread over the
// thread pool by columns, so the result is the same whatever the thread count.
#pragma once

#include <cstdint>
#include <vector>

namespace aviary::train {

// The Q of the QR decomposition of the m x n (m >= n) column-major matrix `a` (destroyed), its
// columns multiplied by the signs of R's diagonal, column-major (m x n: only the first n
// columns of the full Q are formed).
std::vector<double> OrthonormalColumns(int64_t m, int64_t n, std::vector<double>& a);

}  // namespace aviary::train
