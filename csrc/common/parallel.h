// Intra-op parallelism for the torch-free CPU kernels and the SIMT emulator.
// Declared here, implemented by the binding layer on top of ATen's thread pool, so kernels honour
// torch.set_num_threads() without depending on torch.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

namespace fusedops {

using RangeFn = void (*)(void* context, int64_t begin, int64_t end);

// Calls fn(context, begin, end) on disjoint chunks covering [0, n), each at least `grain` long
// (except the last), possibly on several threads. Returns when all chunks are done; rethrows the
// first exception a chunk threw.
void parallel_for_range(int64_t n, int64_t grain, void* context, RangeFn fn);

// Number of threads parallel_for_range may use.
int parallel_threads();

template <class F>
void parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  using Fn = std::remove_reference_t<F>;
  parallel_for_range(n, grain, const_cast<void*>(static_cast<const void*>(&f)), [](void* c, int64_t b, int64_t e) {
    (*static_cast<Fn*>(c))(b, e);
  });
}

}  // namespace fusedops
