// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a counter-based
// generator, so any element's random number is a pure function of (key, counter). The CPU kernels,
// the emulator and the GPU all call this same code, which is what makes dropout masks identical on
// every backend and testable exactly against the Python reference (fusedops.reference.philox4x32).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDOPS_PHILOX_HD __host__ __device__ __forceinline__
#else
#define FUSEDOPS_PHILOX_HD inline
#endif

namespace fusedops {

struct Philox4 {
  uint32_t x[4];
};

FUSEDOPS_PHILOX_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Ten rounds of Philox4x32 on `counter` under the 64-bit `key`.
FUSEDOPS_PHILOX_HD Philox4 philox4x32(uint64_t key, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, c0, hi0, lo0);
    philox_mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four 32-bit random numbers for `group` (4 consecutive elements) of `stream`: the counter is
// (group lo, group hi, stream lo, stream hi).
FUSEDOPS_PHILOX_HD Philox4 philox_group(uint64_t seed, uint64_t stream, uint64_t group) {
  return philox4x32(seed, static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                    static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32));
}

}  // namespace fusedops
