// Element types as the torch-free kernel interfaces name them.
#pragma once

#include <cstddef>

namespace fusedops {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

constexpr size_t dtype_size(DType t) { return t == DType::f64 ? 8 : (t == DType::f32 ? 4 : 2); }

}  // namespace fusedops
