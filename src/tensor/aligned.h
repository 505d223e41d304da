// Vectors whose data starts on a 64-byte (cache line, AVX-512 register) boundary.
//
// malloc aligns to 16 bytes, and glibc serves large blocks from mmap at 16 bytes past a page:
// every 512-bit load from such a buffer straddles two cache lines and costs two L1 accesses
// instead of one, in kernels that are bound by their loads. Buffers the kernels stream use
// this.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace aviary {

inline constexpr size_t kVectorAlign = 64;

template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new (n * sizeof(T), std::align_val_t{kVectorAlign}));
  }
  void deallocate(T* p, size_t) { ::operator delete (p, std::align_val_t{kVectorAlign}); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const {
    return true;
  }
};

template <typename T>
using AlignedVector = std::vector<T, AlignedAllocator<T>>;

}  // namespace aviary
