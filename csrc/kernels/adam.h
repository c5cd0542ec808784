// Fused Adam / AdamW: the torch-free interface shared by the CPU kernel (csrc/cpu/adam.cpp), the CUDA
// multi-tensor kernel (csrc/kernels/adam.cu, also run by the emulator) and the binding
// (csrc/binding/adam.cpp).
//
// One call updates a list of tensors of one parameter dtype. Per tensor, with s its step counter before
// the call and t = s + 1 (fp32 arithmetic, as torch keeps the step in a float32 tensor):
//
//   if found_inf && *found_inf != 0: nothing changes at all (step counters included)
//   g  = grad / *grad_scale, written back to grad         (only with grad_scale: torch's fused Adam)
//   g  = -g                                               if maximize
//   p  = p · (1 - lr·wd)                                  AdamW (decoupled), wd != 0
//   g  = g + wd · p                                       Adam (L2), wd != 0
//   m  = lerp(m, g, 1 - β1)
//   v  = β2 · v + (1 - β2) · g²
//   v̂  = max(v̂, v), used for v below                      if amsgrad
//   p  = p - lr / (1 - β1^t) · m / (√v / √(1 - β2^t) + eps)
//   step counter = t
//
// The arithmetic is fp32 with the per-tensor coefficients computed in double (adam_tensor_scalars), as
// torch.optim.Adam computes them in Python. Every multiply-add is an explicit fma and no other product
// feeds an addition, so a compiler cannot contract differently on different targets: the CPU kernel (every
// ISA), the emulator and the GPU execute the same roundings and agree bit for bit (up to the double-precision
// pow of the bias corrections, whose last-bit differences between libm and CUDA almost never survive the
// rounding to float).
//
// Storage: params f32, f16 or bf16 (grads of the same dtype); moments (exp_avg, exp_avg_sq, max_exp_avg_sq)
// f32, or bf16 rounded stochastically. A 16-bit param is stored back rounded to nearest even, or keeps an
// fp32 master copy that the update reads and writes (the param is then the master rounded to nearest), or
// (bf16) is rounded stochastically.
//
// Stochastic rounding of x to bf16 adds 16 random bits to x's fp32 bit pattern and truncates, so x rounds
// up (in magnitude) with probability (dropped bits) / 2^16: unbiased. Each element draws one 16-bit random
// value per step, from Philox4x32-10 (common/philox.h) keyed by the seed: element e of a tensor takes half
// e % 2 (low, high) of word (e / 2) % 4 of philox_group(seed, stream, e / 8), stream = rng_id << 32 | t.
// The value rounds every stochastically stored quantity of that element (exp_avg, exp_avg_sq,
// max_exp_avg_sq, a bf16 param): each rounding is unbiased on its own; sharing the draw correlates their
// errors, which enters the update only at second order (ulp² terms), and halves the Philox work to one call
// per 8 elements — the cost that matters on CPUs with slow vector 32-bit multiplies. rng_id is the tensor's
// position in the optimizer's parameter list, so a run resumed from a state_dict draws the same numbers as
// the uninterrupted run.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../common/dtype.h"
#include "../common/philox.h"
#include "../common/stream.h"
#include "../cpu/isa.h"

#if defined(__CUDACC__)
#define FUSEDOPS_ADAM_HD __host__ __device__ __forceinline__
#else
#define FUSEDOPS_ADAM_HD inline
#endif

namespace fusedops {

enum class AdamParamRounding : int {
  nearest = 0,     // 16-bit params rounded to nearest even (fp32 params: exact)
  master = 1,      // an fp32 master copy holds the param; the 16-bit param is its rounding to nearest
  stochastic = 2,  // bf16 params rounded stochastically
};

// One parameter and its state: `numel` elements each, all dense in the same layout (the kernels walk the
// storage linearly, so any common dense layout works).
struct AdamTensor {
  void* param = nullptr;           // AdamConfig::param_dtype
  void* grad = nullptr;            // AdamConfig::param_dtype
  void* exp_avg = nullptr;         // AdamConfig::state_dtype
  void* exp_avg_sq = nullptr;      // AdamConfig::state_dtype
  void* max_exp_avg_sq = nullptr;  // AdamConfig::state_dtype; amsgrad only
  float* master = nullptr;         // fp32 master copy; AdamParamRounding::master only
  float* step = nullptr;           // the step counter (one float in the param's memory)
  int64_t numel = 0;
  uint32_t rng_id = 0;             // identity in the random streams
};

// What is the same for every tensor of a call.
struct AdamConfig {
  DType param_dtype = DType::f32;  // f32, f16, bf16
  DType state_dtype = DType::f32;  // f32 or bf16
  AdamParamRounding rounding = AdamParamRounding::nearest;
  bool decoupled_weight_decay = false;  // AdamW
  bool amsgrad = false;
  bool maximize = false;
  double lr = 1e-3;
  const float* lr_ptr = nullptr;   // when set, the learning rate is *lr_ptr (device memory; capturable)
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  const float* grad_scale = nullptr;  // GradScaler's scale: grads are divided by it (device memory)
  const float* found_inf = nullptr;   // nonzero: skip the step (device memory)
  uint64_t seed = 0;               // stochastic rounding
};

// fp32 constants of the update that are the same for every tensor of a call.
struct AdamScalars {
  bool maximize, l2, decoupled, lerp_from_grad;
  float weight_decay;  // L2 coefficient
  float decay;         // AdamW: p *= decay
  float lerp_coeff;    // m = fma(lerp_coeff, g - m, lerp_from_grad ? g : m), torch's lerp
  float beta2, one_minus_beta2, eps;
};

// Constants that depend on the tensor's step count.
struct AdamTensorScalars {
  float neg_step_size;   // -lr / (1 - β1^t)
  float inv_bias2_sqrt;  // 1 / √(1 - β2^t)
  uint32_t step;         // t, for the random streams
};

FUSEDOPS_ADAM_HD AdamScalars adam_scalars(const AdamConfig& c, double lr) {
  AdamScalars s;
  s.maximize = c.maximize;
  s.l2 = !c.decoupled_weight_decay && c.weight_decay != 0.0;
  s.decoupled = c.decoupled_weight_decay && c.weight_decay != 0.0;
  s.weight_decay = static_cast<float>(c.weight_decay);
  s.decay = static_cast<float>(1.0 - lr * c.weight_decay);
  // torch's lerp(start, end, w): start + w·(end - start) for |w| < 0.5, else end + (w - 1)·(end - start).
  const float w = static_cast<float>(1.0 - c.beta1);
  s.lerp_from_grad = !(w < 0.5f && w > -0.5f);
  s.lerp_coeff = s.lerp_from_grad ? w - 1.0f : w;
  s.beta2 = static_cast<float>(c.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - c.beta2);
  s.eps = static_cast<float>(c.eps);
  return s;
}

FUSEDOPS_ADAM_HD AdamTensorScalars adam_tensor_scalars(const AdamConfig& c, double lr, float step_before) {
  const float t = step_before + 1.0f;
  const double bias1 = 1.0 - ::pow(c.beta1, static_cast<double>(t));
  const double bias2 = 1.0 - ::pow(c.beta2, static_cast<double>(t));
  AdamTensorScalars ts;
  ts.neg_step_size = static_cast<float>(-(lr / bias1));
  ts.inv_bias2_sqrt = static_cast<float>(1.0 / ::sqrt(bias2));
  ts.step = t > 0.0f ? static_cast<uint32_t>(t) : 0u;
  return ts;
}

// The Philox stream of a tensor at step t (see the top of this file).
FUSEDOPS_ADAM_HD uint64_t adam_rng_stream(uint32_t rng_id, uint32_t step) {
  return static_cast<uint64_t>(rng_id) << 32 | step;
}

// Element e's 16 random bits, from r = philox_group(seed, stream, e / 8).
FUSEDOPS_ADAM_HD uint32_t adam_random16(const Philox4& r, uint64_t e) {
  return (r.x[(e >> 1) & 3u] >> ((e & 1u) * 16u)) & 0xffffu;
}

// The update of one element, or of one SIMD vector of elements: V is float or a vector type, Ops supplies
// splat (broadcast a float), fma, sqrt and max_nan (max propagating NaN, as torch.maximum) for it. g is
// the gradient already unscaled. Returns the new param; m, v and vmax are updated in place.
template <class V, class Ops>
FUSEDOPS_ADAM_HD V adam_update(V p, V g, V& m, V& v, V& vmax, bool amsgrad, const AdamScalars& s,
                               const AdamTensorScalars& ts) {
  if (s.maximize) g = -g;
  if (s.l2) g = Ops::fma(Ops::splat(s.weight_decay), p, g);
  if (s.decoupled) p = p * Ops::splat(s.decay);
  const V diff = g - m;
  m = Ops::fma(Ops::splat(s.lerp_coeff), diff, s.lerp_from_grad ? g : m);
  v = Ops::fma(Ops::splat(s.one_minus_beta2) * g, g, Ops::splat(s.beta2) * v);
  V second = v;
  if (amsgrad) {
    vmax = Ops::max_nan(vmax, v);
    second = vmax;
  }
  const V denom = Ops::fma(Ops::sqrt(second), Ops::splat(ts.inv_bias2_sqrt), Ops::splat(s.eps));
  return Ops::fma(Ops::splat(ts.neg_step_size), m / denom, p);
}

// Stochastic rounding of an fp32 bit pattern to bf16 bits with 16 random bits: NaN stays a quiet NaN,
// ±inf stays ±inf, a finite value rounds away from zero with probability (its low 16 bits) / 2^16.
FUSEDOPS_ADAM_HD uint16_t adam_bf16_stochastic_bits(uint32_t x, uint32_t random16) {
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + (random16 & 0xffffu)) >> 16);
}

// The CUDA kernel (and its emulated build). ticket: one zero-initialized unsigned in device memory, left
// zero (the blocks of a launch count themselves on it so that the last one advances the step counters).
// adam_tensors_per_launch: how many tensors one launch holds (more are launched in turns).
namespace cuda {
void adam_step(const AdamConfig& config, const AdamTensor* tensors, int64_t count, unsigned* ticket,
               cudaStream_t stream);
int adam_tensors_per_launch(const AdamConfig& config);
}  // namespace cuda
namespace emu {
void adam_step(const AdamConfig& config, const AdamTensor* tensors, int64_t count, unsigned* ticket,
               cudaStream_t stream);
int adam_tensors_per_launch(const AdamConfig& config);
}  // namespace emu

}  // namespace fusedops

FUSEDOPS_CPU_DECL(void adam_step(const ::fusedops::AdamConfig& config, const ::fusedops::AdamTensor* tensors,
                                 int64_t count))
