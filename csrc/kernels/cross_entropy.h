// Fused softmax cross-entropy: the torch-free interface shared by the CPU kernel
// (csrc/cpu/cross_entropy.cpp), the CUDA kernels (csrc/kernels/cross_entropy.cu, also run by the emulator)
// and the binding (csrc/binding/cross_entropy.cpp).
//
// Semantics, per row (token) i with target t = target[i] (a class index in [0, total_classes)):
//   y_c   = softcap · tanh(x_c / softcap)            if softcap > 0, else x_c
//   lse   = log Σ_c exp(y_c)
//   loss  = (1 - ε) · w_t · (lse - y_t)  +  (ε / C) · Σ_c w_c · (lse - y_c)  +  z · lse²
//   (C = total_classes, ε = label_smoothing, z = z_loss, w = class weights or 1; exactly torch's
//   cross_entropy for z = 0 and no softcap). A row whose target equals ignore_index is ignored: loss 0,
//   lse 0, gradient 0, and no softmax work.
//   Reductions: none (per row), sum, mean = sum / Σ_{rows not ignored} w_t (NaN when that is 0, as torch).
//   d loss / d y_c = ((1 - ε) w_t + (ε/C) Σ w + 2 z lse) · p_c  -  (1 - ε) w_t [c = t]  -  (ε/C) w_c,
//   p = softmax(y); times (1 - (y_c/softcap)²) for d y / d x.
//   A target that is neither ignore_index nor in range makes the row's loss and gradient NaN (the CPU
//   binding rejects such targets before the kernel runs; the CUDA kernels cannot raise).
//   A row whose logits are all -inf has lse = NaN (softmax 0/0), as torch's log_softmax.
//
// Vocabulary sharding: a kernel may see only the classes [class_offset, class_offset + classes) of
// total_classes (tensor-parallel logits). cross_entropy_stats then returns per-row partials (the local
// lse, the target's logit when this shard holds it, Σ_c w_c y_c over the shard) that the caller combines
// across shards; cross_entropy_backward takes the combined lse and produces this shard's gradient.
//
// Layout: logits (rows, classes) with row stride `ld` (elements) and unit class stride; grad likewise with
// `grad_ld` (it may alias logits: every element is read before it is written, by the same thread).
// The CPU forward also takes the transposed layout, for its in-place gradient only: ld = 1 and
// class_stride >= rows (a (classes, rows) matrix, as W @ hᵀ makes it), grad == logits, no softcap.
// Per-row outputs and weights are in the accumulation type: double for f64 logits, float otherwise.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../common/dtype.h"
#include "../common/stream.h"
#include "../cpu/isa.h"

namespace fusedops {

enum class Reduction : int { none = 0, mean = 1, sum = 2 };  // torch's at::Reduction codes

struct CrossEntropyParams {
  DType dtype = DType::f32;  // of logits and grad: f32, f16, bf16 (and f64 on the CPU)
  const void* logits = nullptr;
  int64_t rows = 0, classes = 0, ld = 0;
  int64_t class_stride = 1;   // 1, or the transposed layout (above)
  int64_t class_offset = 0;   // first class held here (0 unless sharded)
  int64_t total_classes = 0;  // C; equals classes unless sharded
  const int64_t* target = nullptr;  // (rows)
  const void* weight = nullptr;     // (total_classes) in the accumulation type, or nullptr (all 1)
  int64_t ignore_index = -100;
  Reduction reduction = Reduction::mean;
  double label_smoothing = 0.0, z_loss = 0.0;
  double softcap = 0.0;  // 0: off

  // cross_entropy_forward: per-row loss and lse; the reduced loss (sum or mean) unless reduction is none;
  // with grad != nullptr also the gradient of the (reduced) loss, times *grad_scale when given.
  void* loss = nullptr;     // (rows)
  void* lse = nullptr;      // (rows); cross_entropy_backward reads it
  void* reduced = nullptr;  // () when reduction != none
  const void* grad_scale = nullptr;  // () optional factor for the forward's gradient

  // cross_entropy_stats (sharded): per-row partials.
  void* target_logit = nullptr;  // (rows): y_t when class_offset <= t < class_offset + classes, else 0
  void* smooth_sum = nullptr;    // (rows): Σ_{c here} w_c y_c, or nullptr when not needed

  // The gradient (forward with grad, or backward).
  void* grad = nullptr;
  int64_t grad_ld = 0;
  // cross_entropy_backward: upstream gradients. grad_loss[i * grad_loss_stride] is the upstream of row i's
  // loss for reduction none, of the reduced loss otherwise (stride 0; mean divides it by the denominator).
  const void* grad_loss = nullptr;
  int64_t grad_loss_stride = 0;
  const void* grad_lse = nullptr;  // (rows) upstream of lse, or nullptr

  // CUDA only: kCrossEntropyWorkspaceFloats floats of device memory for the launch's own scalars.
  float* workspace = nullptr;
};

constexpr int64_t kCrossEntropyWorkspaceFloats = 4;

namespace cuda {
void cross_entropy_forward(const CrossEntropyParams& p, cudaStream_t stream);
void cross_entropy_backward(const CrossEntropyParams& p, cudaStream_t stream);
void cross_entropy_stats(const CrossEntropyParams& p, cudaStream_t stream);
}  // namespace cuda
namespace emu {
void cross_entropy_forward(const CrossEntropyParams& p, cudaStream_t stream);
void cross_entropy_backward(const CrossEntropyParams& p, cudaStream_t stream);
void cross_entropy_stats(const CrossEntropyParams& p, cudaStream_t stream);
}  // namespace emu

}  // namespace fusedops

FUSEDOPS_CPU_DECL(void cross_entropy_forward(const ::fusedops::CrossEntropyParams& p))
FUSEDOPS_CPU_DECL(void cross_entropy_backward(const ::fusedops::CrossEntropyParams& p))
FUSEDOPS_CPU_DECL(void cross_entropy_stats(const ::fusedops::CrossEntropyParams& p))
