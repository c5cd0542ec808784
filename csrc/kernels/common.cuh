// Device helpers shared by the CUDA kernels: element conversions, warp and block reductions, sizes.
// Torch-free; compiled by nvcc and, through simt.cuh, by the host compiler for the emulator.
#pragma once

#include "../simt/simt.cuh"

namespace fusedops::FUSEDOPS_BACKEND {

constexpr unsigned kFullMask = 0xffffffffu;

template <class T>
FUSEDOPS_HD constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

// fp32 <-> storage types (float, __half, __nv_bfloat16), rounding to nearest even.
template <class T>
FUSEDOPS_DEVICE float to_float(T v) {
  if constexpr (std::is_same<T, float>::value) {
    return v;
  } else if constexpr (std::is_same<T, __half>::value) {
    return __half2float(v);
  } else {
    static_assert(std::is_same<T, __nv_bfloat16>::value, "to_float: float, __half or __nv_bfloat16");
    return __bfloat162float(v);
  }
}

template <class T>
FUSEDOPS_DEVICE T from_float(float v) {
  if constexpr (std::is_same<T, float>::value) {
    return v;
  } else if constexpr (std::is_same<T, __half>::value) {
    return __float2half_rn(v);
  } else {
    static_assert(std::is_same<T, __nv_bfloat16>::value, "from_float: float, __half or __nv_bfloat16");
    return __float2bfloat16_rn(v);
  }
}

// Two fp32 values packed into one 32-bit register of 16-bit elements (the operand format of mma.sync);
// `lo` goes to the lower half.
template <class T>
FUSEDOPS_DEVICE uint32_t pack_pair(float lo, float hi) {
  static_assert(sizeof(T) == 2, "pack_pair: a 16-bit element type");
  const T l = from_float<T>(lo), h = from_float<T>(hi);
  uint16_t lb, hb;
  memcpy(&lb, &l, 2);
  memcpy(&hb, &h, 2);
  return static_cast<uint32_t>(lb) | (static_cast<uint32_t>(hb) << 16);
}

// Reductions over the lanes of a warp (all 32 lanes must take part); every lane gets the result.
FUSEDOPS_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

FUSEDOPS_DEVICE float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Reductions over a whole block whose size is a multiple of 32; `scratch` is 32 floats of shared
// memory. Every thread gets the result. Contains barriers: all threads of the block must call it.
FUSEDOPS_DEVICE float block_sum(float v, float* scratch) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

FUSEDOPS_DEVICE float block_max(float v, float* scratch) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

}  // namespace fusedops::FUSEDOPS_BACKEND
