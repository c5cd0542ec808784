// fusedops::parallel_for_range on ATen's intra-op thread pool (see csrc/common/parallel.h).
#include <ATen/Parallel.h>

#include "common/parallel.h"

namespace fusedops {

void parallel_for_range(int64_t n, int64_t grain, void* context, RangeFn fn) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(context, begin, end); });
}

int parallel_threads() { return at::get_num_threads(); }

}  // namespace fusedops
