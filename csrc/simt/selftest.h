// Kernels that exercise one CUDA semantic each, run by tests/test_simt.py on the emulator (and on a
// GPU when there is one) against references written in Python from the CUDA and PTX documentation.
#pragma once

#include <cstdint>

#include "../common/stream.h"

namespace fusedops {

struct SelftestArgs {
  void* a = nullptr;  // inputs/outputs, meaning per test
  void* b = nullptr;
  void* c = nullptr;
  void* d = nullptr;
  int64_t i[6] = {0, 0, 0, 0, 0, 0};  // integer parameters, meaning per test
  int threads = 32;
  int blocks = 1;
  int64_t smem = 0;
};

// The tests by name: shuffle, vote, reduce, match_any, barrier, barrier_reduce, atomics, dynamic_smem,
// mma, ldmatrix, cp_async, cp_async_groups, smem_overrun, deadlock, missing_barrier, misaligned_ldmatrix, big_smem, syncwarp, trap,
// block_dims. Throws std::invalid_argument for an unknown name.
#define FUSEDOPS_SELFTEST_DECL void simt_selftest(const char* name, const SelftestArgs& args, cudaStream_t stream)
namespace cuda {
FUSEDOPS_SELFTEST_DECL;
}
namespace emu {
FUSEDOPS_SELFTEST_DECL;
}
#undef FUSEDOPS_SELFTEST_DECL

}  // namespace fusedops
