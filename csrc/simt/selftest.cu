// Self-test kernels for the SIMT layer: each exercises one CUDA semantic (shuffles with widths and
// partial masks, votes, redux, barriers with early exit, atomics, shared memory, mma.sync, ldmatrix,
// cp.async) or one failure the emulator must report (deadlock, missing barrier, misaligned ldmatrix,
// oversized shared memory, trap). tests/test_simt.py drives them and checks the results against
// Python references written from the CUDA programming guide and the PTX ISA, on the emulator and,
// when present, on a GPU — so the emulator is held to what the hardware does.
#include "simt.cuh"
#include "selftest.h"

namespace fusedops::FUSEDOPS_BACKEND {
namespace {

template <class T>
__device__ T shuffle_by_mode(int mode, unsigned mask, T v, int arg, int width) {
  switch (mode) {
    case 0: return __shfl_sync(mask, v, arg, width);
    case 1: return __shfl_up_sync(mask, v, static_cast<unsigned>(arg), width);
    case 2: return __shfl_down_sync(mask, v, static_cast<unsigned>(arg), width);
    default: return __shfl_xor_sync(mask, v, arg, width);
  }
}

// Lanes outside `active` exit first; `mask` may still name them (CUDA allows exited lanes in the mask).
__global__ void shuffle_kernel(const void* in, const int* arg, void* out, int mode, unsigned mask, int width, int wide,
                               unsigned active) {
  const unsigned t = threadIdx.x;
  if (!(active >> (t % 32) & 1u)) return;
  if (wide) {
    static_cast<double*>(out)[t] = shuffle_by_mode(mode, mask, static_cast<const double*>(in)[t], arg[t], width);
  } else {
    static_cast<unsigned*>(out)[t] = shuffle_by_mode(mode, mask, static_cast<const unsigned*>(in)[t], arg[t], width);
  }
}

__global__ void vote_kernel(const int* pred, unsigned* out, unsigned mask) {
  const unsigned t = threadIdx.x;
  if (!(mask >> (t % 32) & 1u)) return;
  out[3 * t + 0] = __ballot_sync(mask, pred[t]);
  out[3 * t + 1] = static_cast<unsigned>(__any_sync(mask, pred[t]));
  out[3 * t + 2] = static_cast<unsigned>(__all_sync(mask, pred[t]));
}

__global__ void reduce_kernel(const unsigned* in, unsigned* out, unsigned mask) {
  const unsigned t = threadIdx.x;
  if (!(mask >> (t % 32) & 1u)) return;
  const unsigned v = in[t];
  out[6 * t + 0] = __reduce_add_sync(mask, v);
  out[6 * t + 1] = static_cast<unsigned>(__reduce_min_sync(mask, static_cast<int>(v)));
  out[6 * t + 2] = static_cast<unsigned>(__reduce_max_sync(mask, static_cast<int>(v)));
  out[6 * t + 3] = __reduce_and_sync(mask, v);
  out[6 * t + 4] = __reduce_or_sync(mask, v);
  out[6 * t + 5] = __reduce_xor_sync(mask, v);
}

__global__ void match_any_kernel(const unsigned* in, unsigned* out, unsigned mask) {
  const unsigned t = threadIdx.x;
  if (!(mask >> (t % 32) & 1u)) return;
  out[t] = __match_any_sync(mask, in[t]);
}

// Threads at or above `stay` return at once; the rest rotate values through shared memory `rounds`
// times, so each round needs both barriers.
__global__ void barrier_kernel(const float* in, float* out, int stay, int rounds) {
  const int t = static_cast<int>(threadIdx.x);
  if (t >= stay) return;
  float* s = simt::dynamic_smem<float>();
  float v = in[t];
  for (int r = 0; r < rounds; ++r) {
    s[t] = v;
    __syncthreads();
    v = s[(t + 1) % stay] + 1.0f;
    __syncthreads();
  }
  out[t] = v;
}

__global__ void barrier_reduce_kernel(const int* pred, int* out) {
  const unsigned t = threadIdx.x;
  out[3 * t + 0] = __syncthreads_count(pred[t]);
  out[3 * t + 1] = __syncthreads_and(pred[t]);
  out[3 * t + 2] = __syncthreads_or(pred[t]);
}

__global__ void atomics_kernel(int* counters, float* fsum, unsigned* umax, unsigned* cas_counter, int ncounters) {
  const unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&counters[g % static_cast<unsigned>(ncounters)], 1);
  atomicAdd(fsum, 1.0f);
  atomicMax(umax, g);
  unsigned old = *cas_counter, assumed;
  do {
    assumed = old;
    old = atomicCAS(cas_counter, assumed, assumed + 2u);
  } while (old != assumed);
}

__global__ void dynamic_smem_kernel(const float* in, unsigned* before, float* out) {
  const unsigned t = threadIdx.x, n = blockDim.x;
  float* s = simt::dynamic_smem<float>();
  before[t] = __float_as_uint(s[t]);
  __syncthreads();  // every thread reads its word before any thread overwrites it
  s[t] = in[t];
  __syncthreads();
  out[t] = s[n - 1 - t];
}

template <class T>
__device__ uint32_t pack2(const T* p) {
  uint32_t r;
  memcpy(&r, p, sizeof r);
  return r;
}

// One warp computes D = A·B + C (A 16×16 row-major, C/D 16×8 row-major). method 0: fragments read
// from global memory in the PTX layouts, B given as Bt (8×16); method 1: ldmatrix.x4 for A and
// ldmatrix.x2 for B from Bt in shared memory; method 2: ldmatrix.x2.trans for B given as 16×8
// row-major.
template <class T>
__global__ void mma_kernel(const T* A, const T* B, const float* C, float* D, int method) {
  const int lane = static_cast<int>(threadIdx.x), g = lane / 4, t = lane % 4;
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  if (method == 0) {
    for (int r = 0; r < 4; ++r) a[r] = pack2(&A[(g + 8 * (r & 1)) * 16 + 2 * t + 8 * (r >> 1)]);
    for (int r = 0; r < 2; ++r) b[r] = pack2(&B[g * 16 + 2 * t + 8 * r]);
  } else {
    __shared__ __align__(16) T sA[16 * 16];
    __shared__ __align__(16) T sB[16 * 8];
    for (int i = lane; i < 16 * 16; i += 32) sA[i] = A[i];
    for (int i = lane; i < 16 * 8; i += 32) sB[i] = B[i];
    __syncwarp();
    const int m = lane / 8, r = lane % 8;
    simt::ldmatrix_x4(a, &sA[(r + 8 * (m & 1)) * 16 + 8 * (m >> 1)]);
    if (method == 1) {
      simt::ldmatrix_x2(b, &sB[r * 16 + 8 * (m & 1)]);          // Bt rows n, k halves 0-7 / 8-15
    } else {
      simt::ldmatrix_x2_trans(b, &sB[(r + 8 * (m & 1)) * 8]);  // B rows k 0-7 / 8-15
    }
  }
  simt::mma_m16n8k16<T>(d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = d[i];
}

// Matrices given as (count·8) rows of 8 16-bit values; lane l supplies the address of row perm[l].
__global__ void ldmatrix_kernel(const uint16_t* src, const int* perm, uint32_t* out, int count, int trans) {
  __shared__ __align__(16) uint16_t s[32 * 8];
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < count * 64; i += 32) s[i] = src[i];
  __syncwarp();
  const void* row = &s[perm[lane] * 8];
  uint32_t r[4] = {0, 0, 0, 0};
  if (count == 1) {
    uint32_t x[1];
    trans ? simt::ldmatrix_x1_trans(x, row) : simt::ldmatrix_x1(x, row);
    r[0] = x[0];
  } else if (count == 2) {
    uint32_t x[2];
    trans ? simt::ldmatrix_x2_trans(x, row) : simt::ldmatrix_x2(x, row);
    r[0] = x[0];
    r[1] = x[1];
  } else {
    trans ? simt::ldmatrix_x4_trans(r, row) : simt::ldmatrix_x4(r, row);
  }
  for (int i = 0; i < count; ++i) out[lane * count + i] = r[i];
}

// Each thread copies 16 bytes through shared memory with cp.async; threads at or above `valid`
// zero-fill instead of reading.
__global__ void cp_async_kernel(const float4* src, float4* dst, int valid) {
  const int t = static_cast<int>(threadIdx.x);
  float4* s = simt::dynamic_smem<float4>();
  simt::cp_async_16(&s[t], &src[t], t < valid);
  simt::cp_async_commit();
  simt::cp_async_wait<0>();
  __syncthreads();
  dst[t] = s[blockDim.x - 1 - t];
}

// Two groups in flight: after wait_group 1 the first has landed and the second need not have
// (dst[n..2n) records what was there); after wait_group 0 both have.
__global__ void cp_async_groups_kernel(const float4* src, float4* dst) {
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  float4* s = simt::dynamic_smem<float4>();
  simt::cp_async_16(&s[t], &src[t]);
  simt::cp_async_commit();
  simt::cp_async_16(&s[n + t], &src[n + t]);
  simt::cp_async_commit();
  simt::cp_async_wait<1>();
  __syncthreads();
  dst[t] = s[n - 1 - t];
  dst[n + t] = s[n + t];
  __syncthreads();
  simt::cp_async_wait<0>();
  __syncthreads();
  dst[2 * n + t] = s[2 * n - 1 - t];
}

// Writes one float past the end of its dynamic shared memory.
__global__ void smem_overrun_kernel(float* out) {
  float* s = simt::dynamic_smem<float>();
  s[threadIdx.x + 4] = 1.0f;
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void deadlock_kernel(float* out, int variant) {
  const unsigned t = threadIdx.x;
  if (variant == 0) {
    // Half of warp 0 waits at the barrier, the other half in a shuffle that needs the whole warp.
    if (t < 16) {
      __syncthreads();
    } else if (t < 32) {
      out[t] = __shfl_sync(0xffffffffu, 1.0f, 0);
    }
  } else {
    // Lane 0 waits in a pairwise shuffle with lane 1, which waits for the whole warp.
    if (t == 0) {
      out[0] = __shfl_sync(0x3u, 1.0f, 1);
    } else if (t < 32) {
      out[t] = __shfl_sync(0xffffffffu, 2.0f, 0);
    }
  }
}

// Thread t reads what thread t-1 wrote, with the barrier in between only when `with_barrier`.
// In lane order the race is hidden; reversed or random schedules expose it.
__global__ void missing_barrier_kernel(const float* in, float* out, int with_barrier) {
  const unsigned t = threadIdx.x;
  float* s = simt::dynamic_smem<float>();
  s[t] = in[t];
  if (with_barrier) __syncthreads();
  out[t] = s[t == 0 ? 0 : t - 1];
}

__global__ void misaligned_ldmatrix_kernel(uint32_t* out) {
  __shared__ __align__(16) uint16_t s[8 * 8 + 8];
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < 72; i += 32) s[i] = static_cast<uint16_t>(i);
  __syncwarp();
  uint32_t r[1];
  simt::ldmatrix_x1(r, &s[1 + (lane % 8) * 8]);  // rows 2 bytes off their 16-byte alignment
  out[lane] = r[0];
}

__global__ void big_smem_kernel(float* out) {
  float* s = simt::dynamic_smem<float>();
  const unsigned t = threadIdx.x;
  s[t] = static_cast<float>(t);
  __syncthreads();
  out[t] = s[blockDim.x - 1 - t];
}

// Lanes in `mask` exchange values with their xor-1 neighbour through shared memory, ordered by
// __syncwarp(mask) alone.
__global__ void syncwarp_kernel(const float* in, float* out, unsigned mask) {
  __shared__ float s[32];
  const unsigned lane = threadIdx.x % 32;
  if (!(mask >> lane & 1u)) return;
  s[lane] = in[threadIdx.x];
  __syncwarp(mask);
  out[threadIdx.x] = s[lane ^ 1u];
}

__global__ void trap_kernel(int thread) {
  if (static_cast<int>(threadIdx.x) == thread) __trap();
}

__global__ void block_dims_kernel(int* out) {
  const unsigned bx = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned tx = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int* o = out + 8 * (bx * blockDim.x * blockDim.y * blockDim.z + tx);
  o[0] = static_cast<int>(threadIdx.x);
  o[1] = static_cast<int>(threadIdx.y);
  o[2] = static_cast<int>(threadIdx.z);
  o[3] = static_cast<int>(blockIdx.x);
  o[4] = static_cast<int>(blockIdx.y);
  o[5] = static_cast<int>(blockIdx.z);
  o[6] = static_cast<int>(blockDim.x * 10000 + blockDim.y * 100 + blockDim.z);
  o[7] = static_cast<int>(gridDim.x * 10000 + gridDim.y * 100 + gridDim.z);
}

template <class T>
T* as(void* p) {
  return static_cast<T*>(p);
}

}  // namespace

void simt_selftest(const char* name, const SelftestArgs& x, cudaStream_t stream) {
  const std::string test(name);
  const unsigned mask = static_cast<unsigned>(x.i[0]);
  if (test == "shuffle") {
    SIMT_LAUNCH(shuffle_kernel, x.blocks, x.threads, 0, stream, x.a, as<const int>(x.b), x.c, static_cast<int>(x.i[0]),
                static_cast<unsigned>(x.i[1]), static_cast<int>(x.i[2]), static_cast<int>(x.i[3]),
                static_cast<unsigned>(x.i[4]));
  } else if (test == "vote") {
    SIMT_LAUNCH(vote_kernel, x.blocks, x.threads, 0, stream, as<const int>(x.a), as<unsigned>(x.b), mask);
  } else if (test == "reduce") {
    SIMT_LAUNCH(reduce_kernel, x.blocks, x.threads, 0, stream, as<const unsigned>(x.a), as<unsigned>(x.b), mask);
  } else if (test == "match_any") {
    SIMT_LAUNCH(match_any_kernel, x.blocks, x.threads, 0, stream, as<const unsigned>(x.a), as<unsigned>(x.b), mask);
  } else if (test == "barrier") {
    SIMT_LAUNCH(barrier_kernel, x.blocks, x.threads, x.threads * sizeof(float), stream, as<const float>(x.a),
                as<float>(x.b), static_cast<int>(x.i[0]), static_cast<int>(x.i[1]));
  } else if (test == "barrier_reduce") {
    SIMT_LAUNCH(barrier_reduce_kernel, x.blocks, x.threads, 0, stream, as<const int>(x.a), as<int>(x.b));
  } else if (test == "atomics") {
    SIMT_LAUNCH(atomics_kernel, x.blocks, x.threads, 0, stream, as<int>(x.a), as<float>(x.b), as<unsigned>(x.c),
                as<unsigned>(x.d), static_cast<int>(x.i[0]));
  } else if (test == "dynamic_smem") {
    SIMT_LAUNCH(dynamic_smem_kernel, x.blocks, x.threads, x.threads * sizeof(float), stream, as<const float>(x.a),
                as<unsigned>(x.b), as<float>(x.c));
  } else if (test == "mma") {
    if (x.i[0] == 0) {
      SIMT_LAUNCH((mma_kernel<__half>), 1, 32, 0, stream, as<const __half>(x.a), as<const __half>(x.b),
                  as<const float>(x.c), as<float>(x.d), static_cast<int>(x.i[1]));
    } else {
      SIMT_LAUNCH((mma_kernel<__nv_bfloat16>), 1, 32, 0, stream, as<const __nv_bfloat16>(x.a),
                  as<const __nv_bfloat16>(x.b), as<const float>(x.c), as<float>(x.d), static_cast<int>(x.i[1]));
    }
  } else if (test == "ldmatrix") {
    SIMT_LAUNCH(ldmatrix_kernel, 1, 32, 0, stream, as<const uint16_t>(x.a), as<const int>(x.b), as<uint32_t>(x.c),
                static_cast<int>(x.i[0]), static_cast<int>(x.i[1]));
  } else if (test == "cp_async") {
    SIMT_LAUNCH(cp_async_kernel, 1, x.threads, x.threads * sizeof(float4), stream, as<const float4>(x.a),
                as<float4>(x.b), static_cast<int>(x.i[0]));
  } else if (test == "cp_async_groups") {
    SIMT_LAUNCH(cp_async_groups_kernel, 1, x.threads, 2 * x.threads * sizeof(float4), stream, as<const float4>(x.a),
                as<float4>(x.b));
  } else if (test == "smem_overrun") {
    SIMT_LAUNCH(smem_overrun_kernel, 1, 4, 4 * sizeof(float), stream, as<float>(x.a));
  } else if (test == "deadlock") {
    SIMT_LAUNCH(deadlock_kernel, 1, x.threads, 0, stream, as<float>(x.a), static_cast<int>(x.i[0]));
  } else if (test == "missing_barrier") {
    SIMT_LAUNCH(missing_barrier_kernel, 1, x.threads, x.threads * sizeof(float), stream, as<const float>(x.a),
                as<float>(x.b), static_cast<int>(x.i[0]));
  } else if (test == "misaligned_ldmatrix") {
    SIMT_LAUNCH(misaligned_ldmatrix_kernel, 1, 32, 0, stream, as<uint32_t>(x.a));
  } else if (test == "big_smem") {
    if (x.i[1]) simt::set_max_dynamic_smem(big_smem_kernel, static_cast<size_t>(x.smem));
    SIMT_LAUNCH(big_smem_kernel, 1, x.threads, static_cast<size_t>(x.smem), stream, as<float>(x.a));
  } else if (test == "syncwarp") {
    SIMT_LAUNCH(syncwarp_kernel, 1, x.threads, 0, stream, as<const float>(x.a), as<float>(x.b), mask);
  } else if (test == "trap") {
    SIMT_LAUNCH(trap_kernel, 1, x.threads, 0, stream, static_cast<int>(x.i[0]));
  } else if (test == "block_dims") {
    const dim3 block(static_cast<unsigned>(x.threads), static_cast<unsigned>(x.i[0]), static_cast<unsigned>(x.i[1]));
    const dim3 grid(static_cast<unsigned>(x.blocks), static_cast<unsigned>(x.i[2]), static_cast<unsigned>(x.i[3]));
    SIMT_LAUNCH(block_dims_kernel, grid, block, 0, stream, as<int>(x.a));
  } else {
    throw std::invalid_argument("unknown SIMT self-test '" + test + "'");
  }
}

}  // namespace fusedops::FUSEDOPS_BACKEND
