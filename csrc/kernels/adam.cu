// Fused Adam / AdamW, CUDA: one launch updates every tensor of a dtype group (semantics in adam.h).
//
// Algorithm. The host packs the tensors' addresses, sizes and step-counter addresses into the kernel's
// parameters (AdamTensorList: up to 32764 bytes, which CUDA >= 12.1 allows on sm_70+; 16 tensors a launch
// under an older driver), so a launch needs no copy to the device and no host synchronization. The tensors
// are cut into chunks of kChunk elements, numbered consecutively across tensors; a grid of a few blocks per
// SM walks the chunks grid-stride, so a launch takes any number of chunks (no per-block table as in ATen's
// multi_tensor_apply) and each block finds its tensor by walking the chunk prefix sums forward. A thread
// updates 4 consecutive elements at a time: one 16-byte (fp32) or 8-byte (16-bit) load and store per array
// when the tensor's arrays are aligned, element by element otherwise and in the tail. The bias corrections
// are computed in the kernel from the step counter (and lr, if given as a tensor) in device memory, so with
// capturable=True the launch can be captured in a CUDA graph and replayed.
//
// Step counters. Every block reads them, so they may be advanced only after the last read: each block, when
// done, takes a ticket from a counter in device memory; the block with the last ticket advances the
// counters of every tensor of the launch and puts the counter back to zero (the "last block" pattern of
// CUDA's threadFenceReduction sample). found_inf skips the whole launch, counters included.
//
// Limits. A tensor never spans launches; a group launches more than once only when its addresses do not fit
// the parameters (about 400-540 tensors per launch; groups of up to 16 tensors use a 1-2 KB list instead, as a
// launch copies the whole parameter block). Launches sharing a ticket counter must not run concurrently
// (one optimizer steps on one stream). The stochastic rounding bits come from Philox
// (common/philox.h), one call per 8 elements, so the CPU kernel, the emulator and the GPU round
// identically.
//
// References: Kingma & Ba, "Adam" (2015); Loshchilov & Hutter, "Decoupled weight decay" (2019); torch.optim
// Adam/AdamW for the exact semantics; Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (2011).
#include "../simt/simt.cuh"
#include "adam.h"
#include "common.cuh"

namespace fusedops::FUSEDOPS_BACKEND {
namespace {

constexpr int kThreads = 256;
constexpr int kElemsPerThread = 4;  // one vector load per array; half a Philox group
constexpr int64_t kChunk = kThreads * kElemsPerThread * 16;
constexpr int kBlocksPerSm = 8;
constexpr size_t kMaxParamBytes = 32764;
constexpr int kMinBlocksPerSm = 4;  // caps registers at 64 per thread: 1024 threads per SM keep loads in flight

#if FUSEDOPS_EMULATED
#define FUSEDOPS_ADAM_LAUNCH_BOUNDS
#else
#define FUSEDOPS_ADAM_LAUNCH_BOUNDS __launch_bounds__(kThreads, kMinBlocksPerSm)
#endif

// Arrays per tensor: param, grad, exp_avg, exp_avg_sq, then max_exp_avg_sq (amsgrad), then the fp32 master
// copy (master rounding). kCapacity tensors: a short list for small groups (a launch copies, and the emulator
// gives every thread, the whole parameter block), the most that fits the 32764 bytes otherwise.
template <int kArrays, int kCapacityWanted>
struct AdamTensorList {
  static constexpr size_t kBytesPerTensor = sizeof(void*) * (kArrays + 1) + 2 * sizeof(int64_t) + sizeof(uint32_t);
  static constexpr int kMaxCapacity =
      static_cast<int>((kMaxParamBytes - sizeof(AdamConfig) - sizeof(void*) - 64) / kBytesPerTensor);
  static constexpr int kCapacity = kCapacityWanted < kMaxCapacity ? kCapacityWanted : kMaxCapacity;
  void* arrays[kArrays][kCapacity];
  float* step[kCapacity];
  int64_t numel[kCapacity];
  int64_t chunk_end[kCapacity];  // chunks of tensors 0..i
  uint32_t rng_id[kCapacity];
  int count;
};
constexpr int kSmallList = 16;
constexpr int kLargeList = 1 << 20;  // as many as fit

struct DeviceOps {
  static FUSEDOPS_DEVICE float splat(float x) { return x; }
  static FUSEDOPS_DEVICE float fma(float a, float b, float c) { return fmaf(a, b, c); }
  static FUSEDOPS_DEVICE float sqrt(float x) { return sqrtf(x); }
  static FUSEDOPS_DEVICE float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }
};

// 16-bit values from and to their bit patterns.
template <class T>
FUSEDOPS_DEVICE T from_bits(uint16_t bits) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __ushort_as_bfloat16(bits);
  } else {
    return __ushort_as_half(bits);
  }
}
template <class T>
FUSEDOPS_DEVICE uint16_t to_bits(T x) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __bfloat16_as_ushort(x);
  } else {
    return __half_as_ushort(x);
  }
}

template <class T>
FUSEDOPS_DEVICE void load4(const T* base, int64_t e, int n, bool vector, float (&out)[4]) {
  if (vector) {
    if constexpr (sizeof(T) == 4) {
      const float4 q = *reinterpret_cast<const float4*>(base + e);
      out[0] = q.x;
      out[1] = q.y;
      out[2] = q.z;
      out[3] = q.w;
    } else {
      const uint2 q = *reinterpret_cast<const uint2*>(base + e);
      out[0] = to_float(from_bits<T>(static_cast<uint16_t>(q.x)));
      out[1] = to_float(from_bits<T>(static_cast<uint16_t>(q.x >> 16)));
      out[2] = to_float(from_bits<T>(static_cast<uint16_t>(q.y)));
      out[3] = to_float(from_bits<T>(static_cast<uint16_t>(q.y >> 16)));
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = i < n ? to_float(base[e + i]) : 0.0f;
  }
}

// fp32 -> T, to nearest even, or (bf16 only, stochastic) with the 16 random bits in random16[i].
template <class T>
FUSEDOPS_DEVICE T round_to(float x, bool stochastic, uint32_t random16) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    if (stochastic) return from_bits<T>(adam_bf16_stochastic_bits(__float_as_uint(x), random16));
  }
  return from_float<T>(x);
}

template <class T>
FUSEDOPS_DEVICE void store4(T* base, int64_t e, int n, bool vector, const float (&in)[4], bool stochastic,
                            const uint32_t (&random16)[4]) {
  if (vector) {
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float4*>(base + e) = make_float4(in[0], in[1], in[2], in[3]);
    } else {
      uint32_t bits[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) bits[i] = to_bits(round_to<T>(in[i], stochastic, random16[i]));
      *reinterpret_cast<uint2*>(base + e) = make_uint2(bits[0] | bits[1] << 16, bits[2] | bits[3] << 16);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (i < n) base[e + i] = round_to<T>(in[i], stochastic, random16[i]);
  }
}

FUSEDOPS_DEVICE bool aligned(const void* p, size_t bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

template <bool kAmsgrad, AdamParamRounding kRounding, int kListSize>
struct AdamLayout {
  static constexpr int kArrays = 4 + (kAmsgrad ? 1 : 0) + (kRounding == AdamParamRounding::master ? 1 : 0);
  static constexpr int kMasterArray = 4 + (kAmsgrad ? 1 : 0);
  using List = AdamTensorList<kArrays, kListSize>;
  static_assert(sizeof(AdamConfig) + sizeof(List) + sizeof(unsigned*) <= kMaxParamBytes,
                "kernel parameters exceed CUDA's 32764-byte limit");
};

// Updates elements [begin, end) of one tensor. P: param (and grad) type; S: moment type; kRounding: how
// 16-bit params are stored.
template <class P, class S, bool kAmsgrad, AdamParamRounding kRounding, int kListSize>
FUSEDOPS_DEVICE void adam_update_range(const AdamConfig& cfg, const AdamScalars& s, float grad_scale, double lr,
                                       const typename AdamLayout<kAmsgrad, kRounding, kListSize>::List& list,
                                       int tensor, int64_t begin, int64_t end) {
  using Layout = AdamLayout<kAmsgrad, kRounding, kListSize>;
  constexpr bool kStochasticState = std::is_same<S, __nv_bfloat16>::value;
  constexpr bool kStochasticParam = kRounding == AdamParamRounding::stochastic;
  constexpr bool kMaster = kRounding == AdamParamRounding::master;
  static_assert(!kStochasticParam || std::is_same<P, __nv_bfloat16>::value, "stochastic rounding of bf16 params only");
  static_assert(!kMaster || sizeof(P) == 2, "master weights for 16-bit params only");

  const AdamTensorScalars ts = adam_tensor_scalars(cfg, lr, *list.step[tensor]);
  P* param = static_cast<P*>(list.arrays[0][tensor]);
  P* grad = static_cast<P*>(list.arrays[1][tensor]);
  S* exp_avg = static_cast<S*>(list.arrays[2][tensor]);
  S* exp_avg_sq = static_cast<S*>(list.arrays[3][tensor]);
  S* max_exp_avg_sq = kAmsgrad ? static_cast<S*>(list.arrays[4][tensor]) : nullptr;
  float* master = kMaster ? static_cast<float*>(list.arrays[Layout::kMasterArray][tensor]) : nullptr;
  const bool unscale = cfg.grad_scale != nullptr;
  bool vector = aligned(param, 4 * sizeof(P)) && aligned(grad, 4 * sizeof(P)) && aligned(exp_avg, 4 * sizeof(S)) &&
                aligned(exp_avg_sq, 4 * sizeof(S));
  if (kAmsgrad) vector = vector && aligned(max_exp_avg_sq, 4 * sizeof(S));
  if (kMaster) vector = vector && aligned(master, 16);
  const uint64_t stream = adam_rng_stream(list.rng_id[tensor], ts.step);

  for (int64_t e = begin + kElemsPerThread * static_cast<int64_t>(threadIdx.x); e < end;
       e += kElemsPerThread * static_cast<int64_t>(blockDim.x)) {
    const int n = end - e < kElemsPerThread ? static_cast<int>(end - e) : kElemsPerThread;
    const bool vec = vector && n == kElemsPerThread;
    float p[4], g[4], m[4], v[4], vmax[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (kMaster) {
      load4(master, e, n, vec, p);
    } else {
      load4(param, e, n, vec, p);
    }
    load4(grad, e, n, vec, g);
    load4(exp_avg, e, n, vec, m);
    load4(exp_avg_sq, e, n, vec, v);
    if (kAmsgrad) load4(max_exp_avg_sq, e, n, vec, vmax);
    if (unscale) {
#pragma unroll
      for (int i = 0; i < 4; ++i) g[i] = g[i] / grad_scale;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = adam_update<float, DeviceOps>(p[i], g[i], m[i], v[i], vmax[i], kAmsgrad, s, ts);

    // e is a multiple of 4: this thread's elements take two words of one Philox group (the neighbouring
    // thread takes the other two; recomputing the group costs less than exchanging it).
    uint32_t bits[4] = {0, 0, 0, 0};
    if (kStochasticState || kStochasticParam) {
      const Philox4 r = philox_group(cfg.seed, stream, static_cast<uint64_t>(e) / 8);
      // adam_random16 for e .. e + 3, with the word picked by a select (an indexed pick would put r in
      // local memory).
      const bool upper = (e & 4) != 0;
      const uint32_t first = upper ? r.x[2] : r.x[0], second = upper ? r.x[3] : r.x[1];
      bits[0] = first & 0xffffu;
      bits[1] = first >> 16;
      bits[2] = second & 0xffffu;
      bits[3] = second >> 16;
    }
    if (kMaster) store4(master, e, n, vec, p, false, bits);
    store4(param, e, n, vec, p, kStochasticParam, bits);
    if (unscale) store4(grad, e, n, vec, g, false, bits);
    store4(exp_avg, e, n, vec, m, kStochasticState, bits);
    store4(exp_avg_sq, e, n, vec, v, kStochasticState, bits);
    if (kAmsgrad) store4(max_exp_avg_sq, e, n, vec, vmax, kStochasticState, bits);
  }
}

template <class P, class S, bool kAmsgrad, AdamParamRounding kRounding, int kListSize>
__global__ void FUSEDOPS_ADAM_LAUNCH_BOUNDS adam_kernel(
    const __grid_constant__ AdamConfig cfg,
    const __grid_constant__ typename AdamLayout<kAmsgrad, kRounding, kListSize>::List list, unsigned* ticket) {
  if (cfg.found_inf != nullptr && *cfg.found_inf != 0.0f) return;
  const double lr = cfg.lr_ptr != nullptr ? static_cast<double>(*cfg.lr_ptr) : cfg.lr;
  const float grad_scale = cfg.grad_scale != nullptr ? *cfg.grad_scale : 1.0f;
  const AdamScalars s = adam_scalars(cfg, lr);
  const int64_t chunks = list.count > 0 ? list.chunk_end[list.count - 1] : 0;
  int tensor = 0;
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    while (chunk >= list.chunk_end[tensor]) ++tensor;  // empty tensors own no chunk and are passed over
    const int64_t first = tensor == 0 ? 0 : list.chunk_end[tensor - 1];
    const int64_t begin = (chunk - first) * kChunk;
    const int64_t end = begin + kChunk < list.numel[tensor] ? begin + kChunk : list.numel[tensor];
    adam_update_range<P, S, kAmsgrad, kRounding, kListSize>(cfg, s, grad_scale, lr, list, tensor, begin, end);
  }

  // Every thread of the block is past its last read of a step counter; then one ticket per block.
  __syncthreads();
  unsigned taken = 0;
  if (threadIdx.x == 0) {
    __threadfence();
    taken = atomicAdd(ticket, 1u);
  }
  if (__syncthreads_or(threadIdx.x == 0 && taken == gridDim.x - 1)) {
    __threadfence();  // the other blocks' reads happened before their tickets
    for (int i = static_cast<int>(threadIdx.x); i < list.count; i += static_cast<int>(blockDim.x))
      *list.step[i] += 1.0f;
    if (threadIdx.x == 0) *ticket = 0;
  }
}

template <class P, class S, bool kAmsgrad, AdamParamRounding kRounding, int kListSize>
void adam_launch_lists(const AdamConfig& cfg, const AdamTensor* tensors, int64_t count, unsigned* ticket,
                       cudaStream_t stream) {
  using Layout = AdamLayout<kAmsgrad, kRounding, kListSize>;
  using List = typename Layout::List;
  const int64_t max_blocks = static_cast<int64_t>(simt::sm_count()) * kBlocksPerSm;
  // Kernel parameters are copied at launch, so one host-side list serves every launch in turn.
  static thread_local List list;
  int64_t done = 0;
  while (done < count) {
    list.count = static_cast<int>(count - done < List::kCapacity ? count - done : List::kCapacity);
    int64_t chunks = 0;
    for (int i = 0; i < list.count; ++i) {
      const AdamTensor& t = tensors[done + i];
      list.arrays[0][i] = t.param;
      list.arrays[1][i] = t.grad;
      list.arrays[2][i] = t.exp_avg;
      list.arrays[3][i] = t.exp_avg_sq;
      if (kAmsgrad) list.arrays[4][i] = t.max_exp_avg_sq;
      if (kRounding == AdamParamRounding::master) list.arrays[Layout::kMasterArray][i] = t.master;
      list.step[i] = t.step;
      list.numel[i] = t.numel;
      list.rng_id[i] = t.rng_id;
      chunks += ceil_div(t.numel, kChunk);
      list.chunk_end[i] = chunks;
    }
    // At least one block, so that the step counters of empty tensors advance too.
    const int64_t blocks = chunks < 1 ? 1 : (chunks < max_blocks ? chunks : max_blocks);
    SIMT_LAUNCH((adam_kernel<P, S, kAmsgrad, kRounding, kListSize>), static_cast<unsigned>(blocks), kThreads, 0,
                stream, cfg, list, ticket);
    done += list.count;
  }
}

// Kernel parameters beyond 4 KiB need a driver of CUDA 12.1 or newer too (a 12.x runtime may run on an
// older driver under minor-version compatibility); with an older one, launches take the short list.
inline bool large_kernel_params() {
#if FUSEDOPS_EMULATED
  return true;
#else
  static const bool ok = [] {
    int version = 0;
    return cudaDriverGetVersion(&version) == cudaSuccess && version >= 12010;
  }();
  return ok;
#endif
}

template <class P, class S, bool kAmsgrad, AdamParamRounding kRounding>
void adam_launch(const AdamConfig& cfg, const AdamTensor* tensors, int64_t count, unsigned* ticket,
                 cudaStream_t stream) {
  if (count <= kSmallList || !large_kernel_params()) {
    adam_launch_lists<P, S, kAmsgrad, kRounding, kSmallList>(cfg, tensors, count, ticket, stream);
  } else {
    adam_launch_lists<P, S, kAmsgrad, kRounding, kLargeList>(cfg, tensors, count, ticket, stream);
  }
}

template <class P, class S, bool kAmsgrad>
void dispatch_rounding(const AdamConfig& c, const AdamTensor* t, int64_t n, unsigned* ticket, cudaStream_t stream) {
  switch (c.rounding) {
    case AdamParamRounding::master:
      if constexpr (sizeof(P) == 2) {
        adam_launch<P, S, kAmsgrad, AdamParamRounding::master>(c, t, n, ticket, stream);
        return;
      }
      break;
    case AdamParamRounding::stochastic:
      if constexpr (std::is_same<P, __nv_bfloat16>::value) {
        adam_launch<P, S, kAmsgrad, AdamParamRounding::stochastic>(c, t, n, ticket, stream);
        return;
      }
      break;
    default: break;
  }
  adam_launch<P, S, kAmsgrad, AdamParamRounding::nearest>(c, t, n, ticket, stream);
}

template <class P, class S>
void dispatch_amsgrad(const AdamConfig& c, const AdamTensor* t, int64_t n, unsigned* ticket, cudaStream_t stream) {
  if (c.amsgrad) {
    dispatch_rounding<P, S, true>(c, t, n, ticket, stream);
  } else {
    dispatch_rounding<P, S, false>(c, t, n, ticket, stream);
  }
}

template <class P>
void dispatch_state(const AdamConfig& c, const AdamTensor* t, int64_t n, unsigned* ticket, cudaStream_t stream) {
  if (c.state_dtype == DType::bf16) {
    dispatch_amsgrad<P, __nv_bfloat16>(c, t, n, ticket, stream);
  } else {
    dispatch_amsgrad<P, float>(c, t, n, ticket, stream);
  }
}

}  // namespace

void adam_step(const AdamConfig& config, const AdamTensor* tensors, int64_t count, unsigned* ticket,
               cudaStream_t stream) {
  if (count <= 0) return;
  switch (config.param_dtype) {
    case DType::f16: dispatch_state<__half>(config, tensors, count, ticket, stream); break;
    case DType::bf16: dispatch_state<__nv_bfloat16>(config, tensors, count, ticket, stream); break;
    default: dispatch_state<float>(config, tensors, count, ticket, stream); break;
  }
}

int adam_tensors_per_launch(const AdamConfig& config) {
  const int arrays = 4 + (config.amsgrad ? 1 : 0) + (config.rounding == AdamParamRounding::master ? 1 : 0);
  switch (arrays) {
    case 4: return AdamTensorList<4, kLargeList>::kCapacity;
    case 5: return AdamTensorList<5, kLargeList>::kCapacity;
    default: return AdamTensorList<6, kLargeList>::kCapacity;
  }
}

}  // namespace fusedops::FUSEDOPS_BACKEND
