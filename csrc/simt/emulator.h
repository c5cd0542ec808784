// SIMT emulator: runs CUDA kernels, compiled by the host compiler, on the CPU.
//
// Each CUDA block runs on one OS thread; each CUDA thread of the block is a fiber (its own stack,
// switched in user space). A fiber runs until it reaches a synchronization point — __syncthreads,
// a warp collective (__shfl_*_sync, __ballot_sync, __syncwarp, mma.sync, ldmatrix), or the end of
// the kernel — and the block's scheduler then resumes another runnable fiber in the order the
// schedule dictates (in order, reversed, or seeded random). So:
//   * __syncthreads is a counting barrier over the block's live threads (exited threads count as
//     arrived, as on sm_70+).
//   * Warp collectives are keyed by their mask: every live lane named in the mask deposits its
//     operands, the last to arrive computes every lane's result with the semantics the PTX ISA gives
//     (shfl.sync modes with segment clamps, mma/ldmatrix fragment layouts), then all resume.
//     Reading from a lane that is not taking part yields a poison value (all bits set), as
//     "undefined" on hardware should never go unnoticed.
//   * A block whose live threads all wait on something that can never happen is a deadlock: the
//     launch fails with an error naming the kernel, the block and what each thread waits on.
//   * Dynamic shared memory is one buffer per block, filled with 0xFF (NaN for floats) at block
//     start so reads of unwritten shared memory show; it ends at a guard page, so overruns fault.
//   * cp.async copies land at some point between issue and their group's wait: at the wait in order,
//     at issue reversed, either at random under the random schedule. Static __shared__ variables are thread_local
//     (one per OS thread, and a block never changes OS thread); they are not poisoned.
// Limits: races between blocks, the memory model's weaker orderings, timing, and Hopper-only
// instructions are not modelled. Emulation shows that a kernel computes the right function on
// every schedule tried; only a GPU run shows that it does so on the hardware, and fast.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include <vector_types.h>

namespace fusedops::simt_emu {

enum class Schedule : int { in_order = 0, reversed = 1, random = 2 };

// The schedule applies to launches that start after the call. The initial schedule comes from the
// environment variable FUSEDOPS_SIMT_SCHEDULE ("in_order", "reversed", "random" or "random:SEED").
void set_schedule(Schedule schedule, uint64_t seed);
Schedule current_schedule();
uint64_t current_seed();

// Per-thread built-ins, read through the threadIdx/blockIdx/blockDim/gridDim macros.
struct ThreadBuiltins {
  uint3 thread_idx;
  unsigned lane;
};
struct BlockBuiltins {
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern thread_local ThreadBuiltins* tls_thread;
extern thread_local BlockBuiltins tls_block;

// A borrowed callable, so a launch allocates nothing for its body.
class BodyRef {
 public:
  template <class F>
  explicit BodyRef(F& f) : object_(&f), call_([](void* o) { (*static_cast<F*>(o))(); }) {}
  void operator()() const { call_(object_); }

 private:
  void* object_;
  void (*call_)(void*);
};

struct LaunchSpec {
  const char* kernel_name;
  const void* kernel;  // identifies the kernel for set_max_dynamic_smem
  dim3 grid;
  dim3 block;
  size_t dynamic_smem_bytes;
};

// Runs `body` once per thread of every block of the grid; returns when all have finished.
// Throws std::runtime_error on a deadlock, a bad launch configuration, or a trap in the kernel.
void run_grid(const LaunchSpec& spec, BodyRef body);

template <class... Params, class... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
            Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  // Converted once, as the launch would; each thread gets its own copy of the parameters.
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  auto body = [&] { std::apply(kernel, params); };
  run_grid(LaunchSpec{name, reinterpret_cast<const void*>(kernel), grid, block, smem}, BodyRef(body));
}

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes): launches asking
// for more than 48 KiB of dynamic shared memory fail without it, as they do on the GPU. At most the
// modelled device's per-block opt-in limit, device_smem_limit().
void set_max_dynamic_smem(const void* kernel, size_t bytes);

// The per-block opt-in limit of the device the emulator models (cudaDevAttrMaxSharedMemoryPerBlockOptin):
// sm_90's 227 KiB unless set lower, e.g. to sm_80's 163 KiB or the 99 KiB of sm_86/sm_89/sm_120, so that
// tests run the tile configurations chosen for those GPUs. Launches above it fail, whatever attribute was
// set before the change. Between kDefaultDynamicSmem (48 KiB) and kMaxDynamicSmem.
constexpr size_t kMaxDynamicSmem = 227 * 1024;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
void set_device_smem_limit(size_t bytes);
size_t device_smem_limit();

// Fails the running launch with `message` (a device-side trap).
[[noreturn]] void trap(const char* message);

unsigned char* dynamic_smem();
size_t dynamic_smem_size();

// ---- synchronization -------------------------------------------------------------------------
enum class BarrierReduce : int { none, count, all, any };
int syncthreads(BarrierReduce reduce, int predicate);

// A warp collective: each lane named in `mask` deposits `in`; when every live lane of the mask has
// arrived, `kind.compute` fills each lane's `out` from all lanes' `in`.
struct LaneSlot {
  alignas(16) unsigned char in[64];
  alignas(16) unsigned char out[64];
};
struct CollectiveKind {
  const char* name;
  // lanes[i] is lane i's slot; `arrived` names the lanes that take part (a subset of the mask:
  // lanes of the mask that have exited or do not exist are left out).
  void (*compute)(LaneSlot* lanes, unsigned mask, unsigned arrived);
  bool needs_full_warp;  // .aligned instructions (mma, ldmatrix): all 32 lanes must take part
};
void warp_collective(const CollectiveKind& kind, unsigned mask, const void* in, size_t in_bytes, void* out,
                     size_t out_bytes);

// ---- collectives defined in emulator.cpp --------------------------------------------------------
enum class ShuffleMode : int { idx = 0, up = 1, down = 2, bfly = 3 };
struct ShuffleIn {
  uint64_t value;
  int32_t b;      // source lane, delta or xor mask
  int32_t c;      // PTX clamp operand: segment mask in bits 12:8, clamp value in bits 4:0
  int32_t mode;
};
struct ReduceIn {
  uint32_t value;
  int32_t is_signed;
};
extern const CollectiveKind kShuffle, kBallot, kAny, kAll, kSyncwarp, kReduceAdd, kReduceMin, kReduceMax,
    kReduceAnd, kReduceOr, kReduceXor, kMatchAny;

enum class MmaType : int { f16 = 0, bf16 = 1 };
// D = A·B + C for one m16n8k16 tile with the fragment layouts of mma.sync.aligned.m16n8k16.row.col.
void mma_m16n8k16(MmaType type, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                  const float (&c)[4]);
// ldmatrix.sync.aligned.m8n8.x{count}[.trans].shared.b16
void ldmatrix(int count, bool trans, uint32_t* regs, const void* row_address);
// cp.async.{ca,cg}.shared.global [dst], [src], bytes, src_bytes. The source is read at issue; the
// destination is written at issue or when the issuing thread waits for the copy's group (or exits),
// depending on the schedule, so both a read before cp.async.wait_group and a prefetch that overwrites a
// buffer still in use show up under some schedule. cp.async.commit_group closes the thread's group.
void cp_async(void* dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);

}  // namespace fusedops::simt_emu
