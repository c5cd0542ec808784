// The portable CUDA layer: every kernel source (.cu) includes this header first.
//
// Under nvcc it is plain CUDA. Under the host compiler it maps CUDA's built-ins (threadIdx, __shared__,
// __syncthreads, warp intrinsics, atomics, fast-math intrinsics) onto the SIMT emulator, so the same
// source runs on the CPU. Kernels reach tensor cores and async copies only through the wrappers in
// namespace `simt` below, which hold the inline PTX under nvcc and the emulator's collectives on the
// host (fragment layouts exactly as the PTX ISA gives them).
//
// Conventions for kernel sources:
//   * Everything goes inside `namespace fusedops::FUSEDOPS_BACKEND { ... }`, so the nvcc-built and the
//     emulated copies of a kernel never collide in one library (namespaces `cuda` and `emu`).
//   * Launch with SIMT_LAUNCH(kernel, grid, block, smem_bytes, stream, args...); wrap a template
//     kernel in parentheses: SIMT_LAUNCH((my_kernel<T, 64>), ...).
//   * Dynamic shared memory through simt::dynamic_smem<T>(); above 48 KiB call
//     simt::set_max_dynamic_smem(kernel, bytes) first (the emulator enforces it, as the GPU does).
//   * No __activemask, no implicit warp-synchronous code: every warp-level exchange goes through a
//     *_sync intrinsic with an explicit mask.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "../common/stream.h"

#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define FUSEDOPS_BACKEND cuda
#define FUSEDOPS_EMULATED 0

#define SIMT_LAUNCH(kernel, grid, block, smem, stream, ...)                        \
  do {                                                                             \
    kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__);                    \
    ::fusedops::FUSEDOPS_BACKEND::simt::check_launch(#kernel);                     \
  } while (0)

#else  // host compiler: the emulator

#include <atomic>
#include <cmath>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include "emulator.h"

#define FUSEDOPS_BACKEND emu
#define FUSEDOPS_EMULATED 1

#undef __shared__
#define __shared__ static thread_local
#define threadIdx (static_cast<const uint3&>(::fusedops::simt_emu::tls_thread->thread_idx))
#define blockIdx (static_cast<const uint3&>(::fusedops::simt_emu::tls_block.block_idx))
#define blockDim (static_cast<const dim3&>(::fusedops::simt_emu::tls_block.block_dim))
#define gridDim (static_cast<const dim3&>(::fusedops::simt_emu::tls_block.grid_dim))
#ifndef warpSize
#define warpSize 32
#endif

#define SIMT_LAUNCH(kernel, grid, block, smem, stream, ...)                                          \
  do {                                                                                               \
    (void)(stream);                                                                                  \
    ::fusedops::simt_emu::launch(#kernel, kernel, dim3(grid), dim3(block), (smem), __VA_ARGS__);     \
  } while (0)

// ---- synchronization and warp intrinsics ----------------------------------------------------------
static inline void __syncthreads() { ::fusedops::simt_emu::syncthreads(::fusedops::simt_emu::BarrierReduce::none, 0); }
static inline int __syncthreads_count(int p) {
  return ::fusedops::simt_emu::syncthreads(::fusedops::simt_emu::BarrierReduce::count, p);
}
static inline int __syncthreads_and(int p) {
  return ::fusedops::simt_emu::syncthreads(::fusedops::simt_emu::BarrierReduce::all, p);
}
static inline int __syncthreads_or(int p) {
  return ::fusedops::simt_emu::syncthreads(::fusedops::simt_emu::BarrierReduce::any, p);
}
static inline void __syncwarp(unsigned mask = 0xffffffffu) {
  char nothing = 0;
  ::fusedops::simt_emu::warp_collective(::fusedops::simt_emu::kSyncwarp, mask, &nothing, 1, &nothing, 1);
}

namespace fusedops::simt_emu {
template <class T>
inline T shuffle(ShuffleMode mode, unsigned mask, T var, int b, int c) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move at most 64 bits");
  ShuffleIn in{};
  std::memcpy(&in.value, &var, sizeof var);
  in.b = b;
  in.c = c;
  in.mode = static_cast<int32_t>(mode);
  uint64_t out;
  warp_collective(kShuffle, mask, &in, sizeof in, &out, sizeof out);
  T result;
  std::memcpy(&result, &out, sizeof result);
  return result;
}
inline int shuffle_clamp(int width, bool up) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) trap("__shfl*_sync: width must be a power of 2 in [1, 32]");
  return ((32 - width) << 8) | (up ? 0 : 0x1f);
}
template <class T>
inline T vote(const CollectiveKind& kind, unsigned mask, T value) {
  T out;
  warp_collective(kind, mask, &value, sizeof value, &out, sizeof out);
  return out;
}
inline unsigned reduce(const CollectiveKind& kind, unsigned mask, uint32_t value, int is_signed) {
  ReduceIn in{value, is_signed};
  unsigned out;
  warp_collective(kind, mask, &in, sizeof in, &out, sizeof out);
  return out;
}
}  // namespace fusedops::simt_emu

template <class T>
static inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  using namespace ::fusedops::simt_emu;
  return shuffle(ShuffleMode::idx, mask, var, src_lane, shuffle_clamp(width, false));
}
template <class T>
static inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  using namespace ::fusedops::simt_emu;
  return shuffle(ShuffleMode::up, mask, var, static_cast<int>(delta), shuffle_clamp(width, true));
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  using namespace ::fusedops::simt_emu;
  return shuffle(ShuffleMode::down, mask, var, static_cast<int>(delta), shuffle_clamp(width, false));
}
template <class T>
static inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  using namespace ::fusedops::simt_emu;
  return shuffle(ShuffleMode::bfly, mask, var, lane_mask, shuffle_clamp(width, false));
}
static inline unsigned __ballot_sync(unsigned mask, int pred) {
  return ::fusedops::simt_emu::vote<unsigned>(::fusedops::simt_emu::kBallot, mask, pred ? 1u : 0u);
}
static inline int __any_sync(unsigned mask, int pred) {
  return ::fusedops::simt_emu::vote<int>(::fusedops::simt_emu::kAny, mask, pred);
}
static inline int __all_sync(unsigned mask, int pred) {
  return ::fusedops::simt_emu::vote<int>(::fusedops::simt_emu::kAll, mask, pred);
}
template <class T>
static inline unsigned __match_any_sync(unsigned mask, T value) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes 32- or 64-bit values");
  uint64_t v = 0;
  std::memcpy(&v, &value, sizeof value);
  return ::fusedops::simt_emu::vote<uint64_t>(::fusedops::simt_emu::kMatchAny, mask, v) & 0xffffffffu;
}
static inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
  return ::fusedops::simt_emu::reduce(::fusedops::simt_emu::kReduceAdd, mask, v, 0);
}
static inline int __reduce_add_sync(unsigned mask, int v) {
  return static_cast<int>(::fusedops::simt_emu::reduce(::fusedops::simt_emu::kReduceAdd, mask, static_cast<uint32_t>(v), 1));
}
static inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
  return ::fusedops::simt_emu::reduce(::fusedops::simt_emu::kReduceMin, mask, v, 0);
}
static inline int __reduce_min_sync(unsigned mask, int v) {
  return static_cast<int>(::fusedops::simt_emu::reduce(::fusedops::simt_emu::kReduceMin, mask, static_cast<uint32_t>(v), 1));
}
static inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
  return ::fusedops::simt_emu::reduce(::fusedops::simt_emu::kReduceMax, mask, v, 0);
}
static inline int __reduce_max_sync(unsigned mask, int v) {
  return static_cast<int>(::fusedops::simt_emu::reduce(::fusedops::simt_emu::kReduceMax, mask, static_cast<uint32_t>(v), 1));
}
static inline unsigned __reduce_and_sync(unsigned mask, unsigned v) {
  return ::fusedops::simt_emu::reduce(::fusedops::simt_emu::kReduceAnd, mask, v, 0);
}
static inline unsigned __reduce_or_sync(unsigned mask, unsigned v) {
  return ::fusedops::simt_emu::reduce(::fusedops::simt_emu::kReduceOr, mask, v, 0);
}
static inline unsigned __reduce_xor_sync(unsigned mask, unsigned v) {
  return ::fusedops::simt_emu::reduce(::fusedops::simt_emu::kReduceXor, mask, v, 0);
}

static inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] static inline void __trap() { ::fusedops::simt_emu::trap("__trap() called"); }
static inline void __nanosleep(unsigned) {}

// ---- atomics: real atomics on host memory ----------------------------------------------------------
template <class T, class Op>
static inline T simt_atomic_update(T* address, Op op) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomics on 32- or 64-bit words");
  using Word = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  Word* w = reinterpret_cast<Word*>(address);
  Word old_bits = __atomic_load_n(w, __ATOMIC_RELAXED);
  for (;;) {
    T old_value;
    std::memcpy(&old_value, &old_bits, sizeof old_value);
    T new_value = op(old_value);
    Word new_bits;
    std::memcpy(&new_bits, &new_value, sizeof new_bits);
    if (__atomic_compare_exchange_n(w, &old_bits, new_bits, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return old_value;
  }
}
static inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
}
static inline float atomicAdd(float* a, float v) { return simt_atomic_update(a, [v](float x) { return x + v; }); }
static inline double atomicAdd(double* a, double v) { return simt_atomic_update(a, [v](double x) { return x + v; }); }
static inline int atomicSub(int* a, int v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicSub(unsigned* a, unsigned v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }
static inline int atomicMax(int* a, int v) { return simt_atomic_update(a, [v](int x) { return x > v ? x : v; }); }
static inline unsigned atomicMax(unsigned* a, unsigned v) {
  return simt_atomic_update(a, [v](unsigned x) { return x > v ? x : v; });
}
static inline int atomicMin(int* a, int v) { return simt_atomic_update(a, [v](int x) { return x < v ? x : v; }); }
static inline unsigned atomicMin(unsigned* a, unsigned v) {
  return simt_atomic_update(a, [v](unsigned x) { return x < v ? x : v; });
}
static inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicExch(unsigned* a, unsigned v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }
static inline float atomicExch(float* a, float v) { return simt_atomic_update(a, [v](float) { return v; }); }
static inline int atomicOr(int* a, int v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicOr(unsigned* a, unsigned v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }
static inline int atomicAnd(int* a, int v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicAnd(unsigned* a, unsigned v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }
template <class T>
static inline T simt_atomic_cas(T* a, T compare, T value) {
  __atomic_compare_exchange_n(a, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;  // the old value, whether or not the swap happened
}
static inline int atomicCAS(int* a, int c, int v) { return simt_atomic_cas(a, c, v); }
static inline unsigned atomicCAS(unsigned* a, unsigned c, unsigned v) { return simt_atomic_cas(a, c, v); }
static inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long c, unsigned long long v) {
  return simt_atomic_cas(a, c, v);
}

// ---- arithmetic intrinsics ------------------------------------------------------------------------
// glibc already declares __expf, __logf, ... (its own internal names), so these are macros.
namespace fusedops::simt_emu::math {
inline float exp(float x) { return std::exp(x); }
inline float exp10(float x) { return std::pow(10.0f, x); }
inline float log(float x) { return std::log(x); }
inline float log2(float x) { return std::log2(x); }
inline float sin(float x) { return std::sin(x); }
inline float cos(float x) { return std::cos(x); }
inline float tan(float x) { return std::tan(x); }
inline float pow(float x, float y) { return std::pow(x, y); }
}  // namespace fusedops::simt_emu::math
#define __expf(x) ::fusedops::simt_emu::math::exp(x)
#define __exp10f(x) ::fusedops::simt_emu::math::exp10(x)
#define __logf(x) ::fusedops::simt_emu::math::log(x)
#define __log2f(x) ::fusedops::simt_emu::math::log2(x)
#define __sinf(x) ::fusedops::simt_emu::math::sin(x)
#define __cosf(x) ::fusedops::simt_emu::math::cos(x)
#define __tanf(x) ::fusedops::simt_emu::math::tan(x)
#define __powf(x, y) ::fusedops::simt_emu::math::pow(x, y)
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fsqrt_rn(float x) { return std::sqrt(x); }
static inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
static inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }
static inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
static inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
static inline int __float_as_int(float x) { int u; std::memcpy(&u, &x, 4); return u; }
static inline float __int_as_float(int u) { float x; std::memcpy(&x, &u, 4); return x; }
static inline long long __double_as_longlong(double x) { long long u; std::memcpy(&u, &x, 8); return u; }
static inline double __longlong_as_double(long long u) { double x; std::memcpy(&x, &u, 8); return x; }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
static inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
static inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
static inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
template <class T>
static inline T __ldg(const T* p) { return *p; }
// CUDA's device-side min/max overloads.
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline float max(float a, float b) { return std::fmax(a, b); }
static inline double max(double a, double b) { return std::fmax(a, b); }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline float min(float a, float b) { return std::fmin(a, b); }
static inline double min(double a, double b) { return std::fmin(a, b); }

#endif  // __CUDACC__

#define FUSEDOPS_HD __host__ __device__
#define FUSEDOPS_DEVICE __device__ __forceinline__

namespace fusedops::FUSEDOPS_BACKEND::simt {

// ---- host side of a launch -------------------------------------------------------------------------

#if FUSEDOPS_EMULATED
inline void check_launch(const char*) {}
template <class Kernel>
inline void set_max_dynamic_smem(Kernel kernel, size_t bytes) {
  ::fusedops::simt_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}
// The emulator pretends to have a few SMs, so grids sized from it stay small and still span blocks.
inline int sm_count() { return 4; }
inline size_t max_dynamic_smem() { return ::fusedops::simt_emu::device_smem_limit(); }
inline void memset_async(void* ptr, int value, size_t bytes, cudaStream_t) { std::memset(ptr, value, bytes); }
#else
inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: left pending, the next launch check (torch's too) would report it
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
  }
}
inline void check_launch(const char* kernel) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA launch of ") + kernel + " failed: " + cudaGetErrorString(e));
}
// The most dynamic shared memory a block may opt into on the current device (163 KiB on sm_80, 227 KiB on
// sm_90, 99 KiB on sm_86/sm_89/sm_120).
inline size_t max_dynamic_smem() {
  int device = 0, bytes = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  return static_cast<size_t>(bytes);
}
template <class Kernel>
inline void set_max_dynamic_smem(Kernel kernel, size_t bytes) {
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
        "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
}
inline int sm_count() {
  int device = 0, count = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return count;
}
inline void memset_async(void* ptr, int value, size_t bytes, cudaStream_t stream) {
  check(cudaMemsetAsync(ptr, value, bytes, stream), "cudaMemsetAsync");
}
#endif

// ---- device side ----------------------------------------------------------------------------------

// The block's dynamic shared memory (16-byte aligned at least).
template <class T>
FUSEDOPS_DEVICE T* dynamic_smem() {
#if FUSEDOPS_EMULATED
  return reinterpret_cast<T*>(::fusedops::simt_emu::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char fusedops_dynamic_smem[];
  return reinterpret_cast<T*>(fusedops_dynamic_smem);
#endif
}

#if !FUSEDOPS_EMULATED
FUSEDOPS_DEVICE uint32_t smem_address(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
#endif

// D = A·B + C on one m16n8k16 tile: A 16×16 row-major (4 registers of 2 halves), B 16×8 col-major
// (2 registers), C and D 16×8 fp32 (4 values), in the PTX ISA's fragment layouts.
FUSEDOPS_DEVICE void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
#if FUSEDOPS_EMULATED
  ::fusedops::simt_emu::mma_m16n8k16(::fusedops::simt_emu::MmaType::f16, d, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}
FUSEDOPS_DEVICE void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
#if FUSEDOPS_EMULATED
  ::fusedops::simt_emu::mma_m16n8k16(::fusedops::simt_emu::MmaType::bf16, d, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}
// Picks the instruction from the element type (__half or __nv_bfloat16).
template <class T>
FUSEDOPS_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    mma_m16n8k16_bf16(d, a, b, c);
  } else {
    static_assert(std::is_same<T, __half>::value, "mma_m16n8k16 takes __half or __nv_bfloat16");
    mma_m16n8k16_f16(d, a, b, c);
  }
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: `row` is this lane's row address in shared
// memory (lanes 8i..8i+7 address matrix i; 16-byte aligned rows).
FUSEDOPS_DEVICE void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
#if FUSEDOPS_EMULATED
  ::fusedops::simt_emu::ldmatrix(1, false, r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_address(row)));
#endif
}
FUSEDOPS_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
#if FUSEDOPS_EMULATED
  ::fusedops::simt_emu::ldmatrix(2, false, r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_address(row)));
#endif
}
FUSEDOPS_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if FUSEDOPS_EMULATED
  ::fusedops::simt_emu::ldmatrix(4, false, r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
#endif
}
FUSEDOPS_DEVICE void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row) {
#if FUSEDOPS_EMULATED
  ::fusedops::simt_emu::ldmatrix(1, true, r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_address(row)));
#endif
}
FUSEDOPS_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
#if FUSEDOPS_EMULATED
  ::fusedops::simt_emu::ldmatrix(2, true, r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_address(row)));
#endif
}
FUSEDOPS_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#if FUSEDOPS_EMULATED
  ::fusedops::simt_emu::ldmatrix(4, true, r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
#endif
}

// cp.async.cg.shared.global of 16 bytes (sm_80+); when `valid` is false the destination is zero-filled
// and the source is not read. The data is in shared memory only after cp_async_wait for its group (and,
// for other threads, a barrier after that): the emulator lands copies at the wait, as the GPU may.
FUSEDOPS_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, bool valid = true) {
#if FUSEDOPS_EMULATED
  ::fusedops::simt_emu::cp_async(smem_dst, gmem_src, 16, valid ? 16 : 0);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem_dst)), "l"(gmem_src),
               "r"(valid ? 16 : 0)
               : "memory");
#endif
}
FUSEDOPS_DEVICE void cp_async_commit() {
#if FUSEDOPS_EMULATED
  ::fusedops::simt_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most `pending` committed groups are still in flight.
template <int pending>
FUSEDOPS_DEVICE void cp_async_wait() {
#if FUSEDOPS_EMULATED
  ::fusedops::simt_emu::cp_async_wait(pending);
#else
  // "memory": shared-memory accesses written after the wait must not be moved before it.
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
#endif
}

}  // namespace fusedops::FUSEDOPS_BACKEND::simt
