// Fused scaled-dot-product attention: the torch-free interface shared by the CPU kernel
// (csrc/cpu/attention.cpp), the CUDA kernels (csrc/kernels/attention_*.cu, also run by the emulator)
// and the binding (csrc/binding/attention.cpp).
//
// Semantics, per (batch b, query head h, query row i, key j), with kv head g = h / (heads_q / heads_kv):
//   s   = scale · <q[b,h,i,:], k[b,g,j,:]>
//   s   = softcap · tanh(s / softcap)                    if softcap > 0
//   s  += -slope(b,h) · |i + shift - j|                  if alibi_slopes
//   s  += mask[b,h,i,j]                                  if mask_kind == additive
//   key j is visible iff  i + shift - window_left <= j <= i + shift + window_right  (a negative bound is
//   unbounded; causal is window_right = 0) and mask[b,h,i,j] is true if mask_kind == boolean;
//   shift = len_kv - len_q (per sequence for varlen) when bottom_right (FlashAttention's alignment),
//   else 0 (torch's top-left alignment).
//   p   = softmax over the visible keys of s  (a row with no visible key, or whose visible scores are
//         all -inf, gets p = 0: output 0, lse = -inf, gradient 0 — never NaN)
//   p  *= keep(b,h,i,j) / (1 - dropout_p)                if dropout_p > 0 (see dropout_keep below)
//   o[b,h,i,:] = sum_j p · v[b,g,j,:];   lse[b,h,i] = log sum_j exp(s) over the visible keys.
//
// Layout: q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), o (B, Hq, L, Ev), lse (B, Hq, L),
// addressed through strides in elements for (batch, head, row); the last dimension is contiguous.
// Varlen (cu_seqlens_q != nullptr): sequence b's rows are cu_seqlens[b] .. cu_seqlens[b+1]-1 of packed
// tensors (total, H, E); the batch stride is unused; len_q / len_kv are upper bounds of the
// per-sequence lengths (for grid sizing; no host synchronization is needed to know them).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../common/dtype.h"
#include "../common/philox.h"
#include "../common/stream.h"
#include "../cpu/isa.h"

namespace fusedops {

enum class AttentionMask : int { none = 0, boolean = 1, additive = 2 };

struct AttentionForwardParams {
  DType dtype = DType::f32;  // of q, k, v, o: f32, f16, bf16 (and f64 on the CPU)
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  void* lse = nullptr;  // float (double when dtype is f64), natural log
  int64_t batch = 0, heads_q = 0, heads_kv = 0, len_q = 0, len_kv = 0, head_dim = 0, head_dim_v = 0;
  int64_t q_stride[3] = {0, 0, 0};  // batch, head, row
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int64_t o_stride[3] = {0, 0, 0};
  int64_t lse_stride[3] = {0, 0, 0};

  const int32_t* cu_seqlens_q = nullptr;  // (batch + 1) offsets, device memory
  const int32_t* cu_seqlens_k = nullptr;

  float scale = 1.0f;
  float softcap = 0.0f;
  int64_t window_left = -1, window_right = -1;  // -1 (unbounded) or in [0, 2^31)
  bool bottom_right = false;

  const float* alibi_slopes = nullptr;  // slope(b, h) = alibi_slopes[b * alibi_batch_stride + h]
  int64_t alibi_batch_stride = 0;

  AttentionMask mask_kind = AttentionMask::none;
  DType mask_dtype = DType::f32;  // additive masks: f32 or the q dtype; boolean masks: one byte per element
  const void* mask = nullptr;
  int64_t mask_stride[4] = {0, 0, 0, 0};  // b, h, i, j; 0 broadcasts

  float dropout_p = 0.0f;
  uint64_t dropout_seed = 0;
  uint64_t dropout_offset = 0;
};

struct AttentionBackwardParams {
  AttentionForwardParams fwd;  // the forward's inputs; fwd.o and fwd.lse are its outputs, read here
  const void* dout = nullptr;   // (B, Hq, L, Ev), dtype fwd.dtype
  int64_t dout_stride[3] = {0, 0, 0};
  void* dq = nullptr;           // (B, Hq, L, E)
  void* dk = nullptr;           // (B, Hkv, S, E): summed over the query heads of each kv head
  void* dv = nullptr;           // (B, Hkv, S, Ev)
  int64_t dq_stride[3] = {0, 0, 0};
  int64_t dk_stride[3] = {0, 0, 0};
  int64_t dv_stride[3] = {0, 0, 0};
  bool deterministic = true;    // bitwise identical results run to run
  void* workspace = nullptr;    // attention_backward_workspace_bytes(...) bytes, allocated by the caller
  size_t workspace_bytes = 0;
};

// Dropout: element (b, h, i, j) is kept iff its Philox number is >= dropout_threshold(p), where the
// number is philox_group(seed, stream, j / 4).x[j % 4] with
//   stream = offset + (b · heads_q + h) · len_q + i
// (len_q the upper bound for varlen). Identical on every backend; fusedops.reference replays it.
inline uint32_t dropout_threshold(float p) {
  const double t = static_cast<double>(p) * 4294967296.0;
  return t >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(t);
}

namespace cuda {
void attention_forward(const AttentionForwardParams& p, cudaStream_t stream);
size_t attention_backward_workspace_bytes(const AttentionBackwardParams& p);
void attention_backward(const AttentionBackwardParams& p, cudaStream_t stream);
}  // namespace cuda
namespace emu {
void attention_forward(const AttentionForwardParams& p, cudaStream_t stream);
size_t attention_backward_workspace_bytes(const AttentionBackwardParams& p);
void attention_backward(const AttentionBackwardParams& p, cudaStream_t stream);
}  // namespace emu

}  // namespace fusedops

FUSEDOPS_CPU_DECL(void attention_forward(const ::fusedops::AttentionForwardParams& p))
FUSEDOPS_CPU_DECL(void attention_backward(const ::fusedops::AttentionBackwardParams& p))
