// Fused Adam / AdamW on the CPU (semantics in kernels/adam.h): one pass over each tensor reads param,
// grad and the moments and writes them back — 28 bytes per fp32 parameter, 20 with bf16 moments — which
// is the memory traffic the step cannot go below.
//
// Algorithm. The tensors of a call are cut into chunks of kChunk elements, numbered across tensors, and the
// chunks are shared among torch's threads (fusedops::parallel_for), so many small tensors cost one parallel
// region, not one each. Within a chunk, batches of 8 SIMD vectors: the update is adam.h's adam_update on
// vectors (explicit fma, IEEE sqrt and division: the same roundings as the CUDA kernel). Where moments or
// params are rounded stochastically, one vectorized Philox4x32-10 call per batch (a group of 8 elements per
// lane) draws the batch's random bits: lane L computes the group that a 4x4 transpose inside each 128-bit
// lane then puts in element order, so element e gets exactly adam_random16(philox_group(seed, stream, e / 8), e),
// the bits the CUDA kernel and the emulator use. The tail of a tensor (less than a batch) runs the same
// update on scalars.
//
// Cost. With fp32 moments the step is bound by memory on x86 CPUs with AVX2. With bf16 moments it moves 20
// bytes instead of 28, but where 32-bit vector multiplies are slow (AMD Zen 1: Philox's 20 multiplies per 8
// elements) and the divider is narrow (one sqrt and one division per element), it becomes bound by
// arithmetic: measured on a 2 GHz Zen 1, about 1 ns of divider and 1 ns of Philox per element and core, 3.7 ns
// of CPU time per parameter in all against 1.9 with fp32 moments (torch's fused Adam: 1.8).
//
// Limits: tensors are walked as flat arrays (the binding checks they are dense in a common layout).
// References: see kernels/adam.cu.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "../common/parallel.h"
#include "../kernels/adam.h"
#include "vec.h"

namespace fusedops::cpu::FUSEDOPS_CPU_ISA {
namespace {

constexpr int kBatch = 8 * kLanes;    // elements per inner iteration: one Philox group (8 elements) per lane
constexpr int64_t kChunk = 1 << 14;   // elements per unit of parallel work (a multiple of kBatch)
static_assert(kChunk % kBatch == 0, "chunks hold whole batches");

#if defined(__AVX512F__)
using ivec = __m512i;
using fvec = __m512;
#elif defined(__AVX2__)
using ivec = __m256i;
using fvec = __m256;
#elif defined(__SSE2__)
using ivec = __m128i;
using fvec = __m128;
#endif

// ---- arithmetic with the roundings adam.h relies on ------------------------------------------------------
inline vfloat vec_fma(vfloat a, vfloat b, vfloat c) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_fmadd_ps((fvec)a, (fvec)b, (fvec)c);
#elif defined(__AVX2__) && defined(__FMA__)
  return (vfloat)_mm256_fmadd_ps((fvec)a, (fvec)b, (fvec)c);
#else
  vfloat r;
  for (int i = 0; i < kLanes; ++i) r[i] = std::fma(a[i], b[i], c[i]);
  return r;
#endif
}

inline vfloat vec_sqrt(vfloat a) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_sqrt_ps((fvec)a);
#elif defined(__AVX2__)
  return (vfloat)_mm256_sqrt_ps((fvec)a);
#elif defined(__SSE2__)
  return (vfloat)_mm_sqrt_ps((fvec)a);
#else
  vfloat r;
  for (int i = 0; i < kLanes; ++i) r[i] = std::sqrt(a[i]);
  return r;
#endif
}

struct VecOps {
  static vfloat splat(float x) { return vbroadcast(x); }
  static vfloat fma(vfloat a, vfloat b, vfloat c) { return vec_fma(a, b, c); }
  static vfloat sqrt(vfloat a) { return vec_sqrt(a); }
  static vfloat max_nan(vfloat a, vfloat b) { return (a != a) | (a > b) ? a : b; }
};

struct ScalarOps {
  static float splat(float x) { return x; }
  static float fma(float a, float b, float c) { return std::fma(a, b, c); }
  static float sqrt(float a) { return std::sqrt(a); }
  static float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }
};

// ---- Philox4x32-10 on kLanes groups at once --------------------------------------------------------------
// hi:lo = a · m per lane (32 x 32 -> 64 bits).
inline void mulhilo(vuint a, uint32_t m, vuint& hi, vuint& lo) {
#if defined(__AVX512F__)
  const ivec av = (ivec)a, mv = _mm512_set1_epi32(static_cast<int>(m));
  const ivec even = _mm512_mul_epu32(av, mv), odd = _mm512_mul_epu32(_mm512_srli_epi64(av, 32), mv);
  lo = (vuint)_mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = (vuint)_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
#elif defined(__AVX2__)
  const ivec av = (ivec)a, mv = _mm256_set1_epi32(static_cast<int>(m));
  const ivec even = _mm256_mul_epu32(av, mv), odd = _mm256_mul_epu32(_mm256_srli_epi64(av, 32), mv);
  lo = (vuint)_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = (vuint)_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
#elif defined(__SSE2__)
  const ivec av = (ivec)a, mv = _mm_set1_epi32(static_cast<int>(m));
  const ivec even = _mm_mul_epu32(av, mv), odd = _mm_mul_epu32(_mm_srli_epi64(av, 32), mv);
  const ivec e = _mm_shuffle_epi32(even, _MM_SHUFFLE(3, 1, 2, 0)), o = _mm_shuffle_epi32(odd, _MM_SHUFFLE(3, 1, 2, 0));
  lo = (vuint)_mm_unpacklo_epi32(e, o);
  hi = (vuint)_mm_unpackhi_epi32(e, o);
#else
  for (int i = 0; i < kLanes; ++i) {
    const uint64_t p = static_cast<uint64_t>(a[i]) * m;
    hi[i] = static_cast<uint32_t>(p >> 32);
    lo[i] = static_cast<uint32_t>(p);
  }
#endif
}

// x0..x3 -> per 128-bit block b: out[j] = (x0[4b+j], x1[4b+j], x2[4b+j], x3[4b+j]).
inline void transpose4(const vuint (&x)[4], vuint (&out)[4]) {
#if defined(__AVX512F__)
  const ivec t0 = _mm512_unpacklo_epi32((ivec)x[0], (ivec)x[1]), t1 = _mm512_unpacklo_epi32((ivec)x[2], (ivec)x[3]);
  const ivec t2 = _mm512_unpackhi_epi32((ivec)x[0], (ivec)x[1]), t3 = _mm512_unpackhi_epi32((ivec)x[2], (ivec)x[3]);
  out[0] = (vuint)_mm512_unpacklo_epi64(t0, t1);
  out[1] = (vuint)_mm512_unpackhi_epi64(t0, t1);
  out[2] = (vuint)_mm512_unpacklo_epi64(t2, t3);
  out[3] = (vuint)_mm512_unpackhi_epi64(t2, t3);
#elif defined(__AVX2__)
  const ivec t0 = _mm256_unpacklo_epi32((ivec)x[0], (ivec)x[1]), t1 = _mm256_unpacklo_epi32((ivec)x[2], (ivec)x[3]);
  const ivec t2 = _mm256_unpackhi_epi32((ivec)x[0], (ivec)x[1]), t3 = _mm256_unpackhi_epi32((ivec)x[2], (ivec)x[3]);
  out[0] = (vuint)_mm256_unpacklo_epi64(t0, t1);
  out[1] = (vuint)_mm256_unpackhi_epi64(t0, t1);
  out[2] = (vuint)_mm256_unpacklo_epi64(t2, t3);
  out[3] = (vuint)_mm256_unpackhi_epi64(t2, t3);
#elif defined(__SSE2__)
  const ivec t0 = _mm_unpacklo_epi32((ivec)x[0], (ivec)x[1]), t1 = _mm_unpacklo_epi32((ivec)x[2], (ivec)x[3]);
  const ivec t2 = _mm_unpackhi_epi32((ivec)x[0], (ivec)x[1]), t3 = _mm_unpackhi_epi32((ivec)x[2], (ivec)x[3]);
  out[0] = (vuint)_mm_unpacklo_epi64(t0, t1);
  out[1] = (vuint)_mm_unpackhi_epi64(t0, t1);
  out[2] = (vuint)_mm_unpacklo_epi64(t2, t3);
  out[3] = (vuint)_mm_unpackhi_epi64(t2, t3);
#else
  for (int b = 0; b < kLanes / 4; ++b)
    for (int j = 0; j < 4; ++j)
      for (int k = 0; k < 4; ++k) out[j][4 * b + k] = x[k][4 * b + j];
#endif
}

// The group lane L = 4·b + j computes: after transpose4, out[j] then holds groups j·kLanes/4 .. (j+1)·kLanes/4 - 1
// in order, so out[0..3] end to end are the kLanes groups in order.
inline vuint lane_groups() {
  vuint g;
  for (int lane = 0; lane < kLanes; ++lane) g[lane] = static_cast<uint32_t>((lane % 4) * (kLanes / 4) + lane / 4);
  return g;
}

// Philox4x32-10 on kLanes groups at once. After 10 rounds, words() gives the Philox words of groups first_group .. first_group + kLanes - 1 in order: out[0..3] laid
// end to end hold group first_group's 4 words, then the next group's, and so on.
struct PhiloxLanes {
  vuint c0, c1, c2, c3;
  uint32_t k0, k1;

  // first_group is a multiple of kLanes: adding a lane's offset never carries into the high word.
  PhiloxLanes(uint64_t key, uint64_t stream, uint64_t first_group, const vuint& groups)
      : c0(groups + static_cast<uint32_t>(first_group)),
        c1(vuint{} + static_cast<uint32_t>(first_group >> 32)),
        c2(vuint{} + static_cast<uint32_t>(stream)),
        c3(vuint{} + static_cast<uint32_t>(stream >> 32)),
        k0(static_cast<uint32_t>(key)),
        k1(static_cast<uint32_t>(key >> 32)) {}

  void round() {
    vuint hi0, lo0, hi1, lo1;
    mulhilo(c0, 0xD2511F53u, hi0, lo0);
    mulhilo(c2, 0xCD9E8D57u, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }

  void words(vuint (&out)[4]) const {
    const vuint x[4] = {c0, c1, c2, c3};
    transpose4(x, out);
  }
};

constexpr int kPhiloxRounds = 10;

// The 16-bit random values of element vector q of a batch, zero-extended to 32-bit lanes: words[] end to end
// hold 2·kLanes values per entry, so vector q takes half q % 2 of words[q / 2] (in registers: a reload
// through memory would miss store-to-load forwarding for the upper halves).
inline vuint random_lanes(const vuint (&words)[4], int q) {
  const ivec w = (ivec)words[q / 2];
#if defined(__AVX512F__)
  return (vuint)_mm512_cvtepu16_epi32(q % 2 ? _mm512_extracti64x4_epi64(w, 1) : _mm512_castsi512_si256(w));
#elif defined(__AVX2__)
  return (vuint)_mm256_cvtepu16_epi32(q % 2 ? _mm256_extracti128_si256(w, 1) : _mm256_castsi256_si128(w));
#elif defined(__SSE2__)
  return (vuint)_mm_unpacklo_epi16(q % 2 ? _mm_srli_si128(w, 8) : w, _mm_setzero_si128());
#else
  vhalfbits h;
  std::memcpy(&h, reinterpret_cast<const uint16_t*>(&words[q / 2]) + (q % 2) * kLanes, sizeof h);
  return __builtin_convertvector(h, vuint);
#endif
}

// ---- loads and stores ----------------------------------------------------------------------------------------
inline void store_stochastic(bf16_t* p, vfloat v, vuint random16) {
  const vuint u = as_uint(v);
  // A NaN gets no random increment (which could carry it into ±inf or the sign bit) and its quiet bit set.
  const vuint is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  const vuint bits = ((u + (random16 & ~is_nan)) >> 16) | (is_nan & 0x40u);  // random16 < 2^16
  const vhalfbits h = __builtin_convertvector(bits, vhalfbits);
  std::memcpy(p, &h, sizeof h);
}

template <class T>
inline void store_rounded(T* p, vfloat v, bool stochastic, vuint random16) {
  if constexpr (std::is_same<T, bf16_t>::value) {
    if (stochastic) {
      store_stochastic(p, v, random16);
      return;
    }
  }
  store(p, v);
}

template <class T>
inline T round_scalar(float x, bool stochastic, uint32_t random16) {
  if constexpr (std::is_same<T, bf16_t>::value) {
    if (stochastic) {
      uint32_t u;
      std::memcpy(&u, &x, 4);
      return bf16_t{adam_bf16_stochastic_bits(u, random16)};
    }
  }
  return from_float<T>(x);
}

struct CallScalars {
  const AdamConfig* cfg;
  AdamScalars s;
  float grad_scale;
  bool unscale;
};

// Elements [begin, end) of one tensor; begin is a multiple of kBatch.
template <class P, class S, bool kAmsgrad, AdamParamRounding kRounding>
void update_range(const CallScalars& call, const AdamTensor& t, const AdamTensorScalars& tensor_scalars,
                  int64_t begin, int64_t end) {
  constexpr bool kStochasticState = std::is_same<S, bf16_t>::value;
  constexpr bool kStochasticParam = kRounding == AdamParamRounding::stochastic;
  constexpr bool kMaster = kRounding == AdamParamRounding::master;
  constexpr bool kRandom = kStochasticParam || kStochasticState;
  // Local copies: the stores below could alias the callers' structs, which would force a reload of every
  // coefficient in every iteration.
  const AdamScalars s = call.s;
  const AdamTensorScalars ts = tensor_scalars;
  const bool unscale = call.unscale;
  P* param = static_cast<P*>(t.param);
  P* grad = static_cast<P*>(t.grad);
  S* exp_avg = static_cast<S*>(t.exp_avg);
  S* exp_avg_sq = static_cast<S*>(t.exp_avg_sq);
  S* max_exp_avg_sq = static_cast<S*>(t.max_exp_avg_sq);
  float* master = t.master;
  const uint64_t seed = call.cfg->seed;
  const uint64_t stream = adam_rng_stream(t.rng_id, ts.step);

  int64_t e = begin;
  if (end - begin >= kBatch) {
    const vuint groups = lane_groups();
    const vfloat scale = vbroadcast(call.grad_scale);
    for (; e + kBatch <= end; e += kBatch) {
      // The batch's 16-bit random values in element order (adam.h): one Philox group per 8 elements.
      vuint words[4] = {};
      if (kRandom) {
        PhiloxLanes philox(seed, stream, static_cast<uint64_t>(e) / 8, groups);
        for (int r = 0; r < kPhiloxRounds; ++r) philox.round();
        philox.words(words);
      }
      for (int q = 0; q < kBatch / kLanes; ++q) {
        const int64_t x = e + q * kLanes;
        const vuint r = kRandom ? random_lanes(words, q) : vuint{};
        vfloat p = kMaster ? load(master + x) : load(param + x);
        vfloat g = load(grad + x);
        vfloat m = load(exp_avg + x), v = load(exp_avg_sq + x), vmax{};
        if (kAmsgrad) vmax = load(max_exp_avg_sq + x);
        if (unscale) {
          g = g / scale;
          store(grad + x, g);
        }
        p = adam_update<vfloat, VecOps>(p, g, m, v, vmax, kAmsgrad, s, ts);
        if (kMaster) store(master + x, p);
        store_rounded(param + x, p, kStochasticParam, r);
        store_rounded(exp_avg + x, m, kStochasticState, r);
        store_rounded(exp_avg_sq + x, v, kStochasticState, r);
        if (kAmsgrad) store_rounded(max_exp_avg_sq + x, vmax, kStochasticState, r);
      }
    }
  }
  for (; e < end; ++e) {
    uint32_t r = 0;
    if (kRandom) r = adam_random16(philox_group(seed, stream, static_cast<uint64_t>(e) / 8), static_cast<uint64_t>(e));
    float p = kMaster ? master[e] : to_float(param[e]);
    float g = to_float(grad[e]);
    float m = to_float(exp_avg[e]), v = to_float(exp_avg_sq[e]), vmax = 0.0f;
    if (kAmsgrad) vmax = to_float(max_exp_avg_sq[e]);
    if (unscale) {
      g = g / call.grad_scale;
      grad[e] = from_float<P>(g);
    }
    p = adam_update<float, ScalarOps>(p, g, m, v, vmax, kAmsgrad, s, ts);
    if (kMaster) master[e] = p;
    param[e] = round_scalar<P>(p, kStochasticParam, r);
    exp_avg[e] = round_scalar<S>(m, kStochasticState, r);
    exp_avg_sq[e] = round_scalar<S>(v, kStochasticState, r);
    if (kAmsgrad) max_exp_avg_sq[e] = round_scalar<S>(vmax, kStochasticState, r);
  }
}

// Below this many chunks (512K elements) per thread, a parallel region costs more than it saves.
constexpr int64_t kMinChunksPerThread = 32;

template <class P, class S, bool kAmsgrad, AdamParamRounding kRounding>
void run(const CallScalars& call, const AdamTensor* tensors, int64_t count, double lr) {
  std::vector<AdamTensorScalars> per_tensor(static_cast<size_t>(count));
  std::vector<int64_t> chunk_end(static_cast<size_t>(count));
  int64_t chunks = 0;
  for (int64_t i = 0; i < count; ++i) {
    per_tensor[i] = adam_tensor_scalars(*call.cfg, lr, *tensors[i].step);
    chunks += (tensors[i].numel + kChunk - 1) / kChunk;
    chunk_end[i] = chunks;
  }
  parallel_for(chunks, kMinChunksPerThread, [&](int64_t first, int64_t last) {
    int64_t tensor = std::upper_bound(chunk_end.begin(), chunk_end.end(), first) - chunk_end.begin();
    for (int64_t chunk = first; chunk < last; ++chunk) {
      while (chunk >= chunk_end[tensor]) ++tensor;
      const int64_t begin = (chunk - (tensor == 0 ? 0 : chunk_end[tensor - 1])) * kChunk;
      const int64_t end = std::min(begin + kChunk, tensors[tensor].numel);
      update_range<P, S, kAmsgrad, kRounding>(call, tensors[tensor], per_tensor[tensor], begin, end);
    }
  });
  for (int64_t i = 0; i < count; ++i) *tensors[i].step += 1.0f;
}

template <class P, class S, bool kAmsgrad>
void dispatch_rounding(const CallScalars& call, const AdamTensor* t, int64_t n, double lr) {
  switch (call.cfg->rounding) {
    case AdamParamRounding::master:
      if constexpr (!std::is_same<P, float>::value) return run<P, S, kAmsgrad, AdamParamRounding::master>(call, t, n, lr);
      break;
    case AdamParamRounding::stochastic:
      if constexpr (std::is_same<P, bf16_t>::value) return run<P, S, kAmsgrad, AdamParamRounding::stochastic>(call, t, n, lr);
      break;
    default: break;
  }
  run<P, S, kAmsgrad, AdamParamRounding::nearest>(call, t, n, lr);
}

template <class P, class S>
void dispatch_amsgrad(const CallScalars& call, const AdamTensor* t, int64_t n, double lr) {
  if (call.cfg->amsgrad) {
    dispatch_rounding<P, S, true>(call, t, n, lr);
  } else {
    dispatch_rounding<P, S, false>(call, t, n, lr);
  }
}

template <class P>
void dispatch_state(const CallScalars& call, const AdamTensor* t, int64_t n, double lr) {
  if (call.cfg->state_dtype == DType::bf16) {
    dispatch_amsgrad<P, bf16_t>(call, t, n, lr);
  } else {
    dispatch_amsgrad<P, float>(call, t, n, lr);
  }
}

}  // namespace

void adam_step(const AdamConfig& config, const AdamTensor* tensors, int64_t count) {
  if (count <= 0) return;
  if (config.found_inf != nullptr && *config.found_inf != 0.0f) return;
  const double lr = config.lr_ptr != nullptr ? static_cast<double>(*config.lr_ptr) : config.lr;
  CallScalars call;
  call.cfg = &config;
  call.s = adam_scalars(config, lr);
  call.unscale = config.grad_scale != nullptr;
  call.grad_scale = call.unscale ? *config.grad_scale : 1.0f;
  switch (config.param_dtype) {
    case DType::f16: dispatch_state<fp16_t>(call, tensors, count, lr); break;
    case DType::bf16: dispatch_state<bf16_t>(call, tensors, count, lr); break;
    default: dispatch_state<float>(call, tensors, count, lr); break;
  }
}

}  // namespace fusedops::cpu::FUSEDOPS_CPU_ISA
