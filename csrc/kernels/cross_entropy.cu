// Softmax cross-entropy, CUDA: the forward (per-row loss and logsumexp; the gradient too when autograd
// will need it), the backward (gradient from the saved logsumexp) and the per-shard partials of
// vocabulary-parallel use. Semantics: cross_entropy.h.
//
// Algorithm. A group of threads takes a row: a warp when the vocabulary is small (<= kWarpVocab classes,
// 8 rows per block), else the whole 256-thread block; blocks loop over rows (grid sized to the SMs).
// The forward reads the row once, with 16-byte vector loads, keeping a running (max, sum of exp) per
// thread that is rescaled only when a vector raises the max (online softmax); the group then merges the
// pairs with warp shuffles (and shared memory across warps). When the gradient is wanted in the forward,
// the group sweeps the row a second time (mostly an L2 hit) writing p·a - b; the backward does the same
// sweep from the saved lse. Ignored rows skip the softmax (their gradient row is zero-filled).
// Small prologue/epilogue kernels (one block each, fixed order, so deterministic) compute the mean's
// denominator and Σ w, and reduce the per-row losses.
//
// Limits: fp32/fp16/bf16 logits, fp32 math; classes <= 2^30, rows and strides 64-bit; any vocabulary size
// (registers do not grow with it). An out-of-range target cannot raise here: its row's loss and gradient
// are NaN, so a mean over it is NaN.
// References: Milakov & Gimelshein, "Online normalizer calculation for softmax", arXiv:1805.02867;
// Wortsman et al. / Chowdhery et al. (PaLM) for the z-loss.
#include "../simt/simt.cuh"

#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "cross_entropy.h"

#if FUSEDOPS_EMULATED
#define XENT_LAUNCH_BOUNDS
#else
// 4 blocks of 256 per SM (64 registers a thread): with the block size alone, ptxas for sm_90 caps the
// registers lower and spills in the forward.
#define XENT_LAUNCH_BOUNDS __launch_bounds__(256, 4)
#endif

namespace fusedops::FUSEDOPS_BACKEND {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpVocab = 2048;
constexpr float kLog2e = 1.4426950408889634f;

enum class Pass { forward, stats, backward };

// What the kernels read, converted once on the host.
struct Args {
  const void* logits;
  int64_t rows, ld;
  int classes;
  int64_t class_offset, total;
  const int64_t* target;
  const float* weight;  // full (total) weights or nullptr
  int64_t ignore;
  int reduction;
  float eps, z, cap, inv_cap;
  float eps_c;  // eps / total
  bool smooth;  // accumulate Σ w_c y_c
  float* loss;
  float* lse;
  float* reduced;
  const float* grad_scale;
  float* target_logit;
  float* smooth_sum;
  void* grad;
  int64_t grad_ld;
  const float* grad_loss;
  int64_t grad_loss_stride;
  const float* grad_lse;
  float* ws;  // [0] Σ_{rows kept} w_t, [1] Σ_c w_c, [2] 1 / ws[0]
};

template <class T>
struct VecOf {
  static constexpr int n = 16 / static_cast<int>(sizeof(T));
};

template <class T>
FUSEDOPS_DEVICE void load_vec(const T* p, float (&v)[VecOf<T>::n]) {
  constexpr int n = VecOf<T>::n;
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  T e[n];
  memcpy(static_cast<void*>(e), &raw, 16);
#pragma unroll
  for (int i = 0; i < n; ++i) v[i] = to_float(e[i]);
}

template <class T>
FUSEDOPS_DEVICE void store_vec(T* p, const float (&v)[VecOf<T>::n]) {
  constexpr int n = VecOf<T>::n;
  T e[n];
#pragma unroll
  for (int i = 0; i < n; ++i) e[i] = from_float<T>(v[i]);
  uint4 raw;
  memcpy(&raw, e, 16);
  *reinterpret_cast<uint4*>(p) = raw;
}

// How a row splits into a scalar head (up to 16-byte alignment), whole vectors and a scalar tail. With a
// second pointer (the gradient row) vectors are used only if both rows share their alignment.
struct Span {
  int head, nvec, tail;
};

template <class T>
FUSEDOPS_DEVICE Span row_span(const T* x, const T* g, int classes) {
  constexpr int n = VecOf<T>::n;
  const uintptr_t a = reinterpret_cast<uintptr_t>(x);
  Span s;
  if ((g != nullptr && ((a ^ reinterpret_cast<uintptr_t>(g)) & 15u) != 0) || a % sizeof(T) != 0) {
    s.head = classes;
    s.nvec = 0;
  } else {
    s.head = min(static_cast<int>(((16u - a % 16u) % 16u) / sizeof(T)), classes);
    s.nvec = (classes - s.head) / n;
  }
  s.tail = s.head + s.nvec * n;
  return s;
}

// tanh without libdevice's slow paths (an IEEE division's slow path is a call, and the registers live
// across it spill in the unrolled loops; the kernels avoid IEEE divisions for that reason): Cephes'
// odd polynomial below |u| = 0.625, 1 - 2/(e^{2|u|} + 1) above; a few ulp. NaN stays NaN, ±inf gives ±1.
FUSEDOPS_DEVICE float tanh_fast(float u) {
  const float au = fabsf(u);
  const float big = 1.0f - __fdividef(2.0f, exp2f(au * (2.0f * kLog2e)) + 1.0f);  // 2/inf = 0
  const float z = u * u;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = fmaf(p * z, u, u);
  return au < 0.625f ? small : copysignf(big, u);
}

FUSEDOPS_DEVICE float softcap(float x, const Args& a) { return a.cap > 0.0f ? a.cap * tanh_fast(x * a.inv_cap) : x; }

// e^(from - to) for merging running sums; a sum kept relative to -inf is empty (0), and from = to = +inf
// gives NaN, as the softmax of a row holding +inf is.
FUSEDOPS_DEVICE float rescale(float from, float to) { return from == -INFINITY ? 0.0f : exp2f((from - to) * kLog2e); }

FUSEDOPS_DEVICE void merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  s = s * rescale(m, mx) + s2 * rescale(m2, mx);
  m = mx;
}

// The group's (max, sum) and sums: every thread of the group gets the result. For the block-wide group
// all threads of the block must call (they do: the whole block works on the same row).
template <int G>
FUSEDOPS_DEVICE void group_max_sum(float& m, float& s, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(kFullMask, m, off), s2 = __shfl_xor_sync(kFullMask, s, off);
    merge(m, s, m2, s2);
  }
  if constexpr (G > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // the previous row may still read scratch
    if (lane == 0) {
      scratch[warp] = m;
      scratch[32 + warp] = s;
    }
    __syncthreads();
    m = scratch[0];
    s = scratch[32];
    for (int w = 1; w < G / 32; ++w) merge(m, s, scratch[w], scratch[32 + w]);
  }
}

template <int G>
FUSEDOPS_DEVICE float group_sum(float v, float* scratch) {
  if constexpr (G == 32) {
    return warp_sum(v);
  } else {
    return block_sum(v, scratch);
  }
}

// Running (max, sum) of one thread over the elements it reads.
struct Online {
  float m = -INFINITY, s = 0.0f, sw = 0.0f;

  template <int N>
  FUSEDOPS_DEVICE void add(const float (&y)[N]) {
    float vm = y[0];
#pragma unroll
    for (int i = 1; i < N; ++i) vm = fmaxf(vm, y[i]);
    if (vm > m) {
      s *= rescale(m, vm);
      m = vm;
    }
    const float ref = m == -INFINITY ? 0.0f : m;  // all -inf so far: exp(-inf - 0) = 0, NaN stays NaN
#pragma unroll
    for (int i = 0; i < N; ++i) s += exp2f((y[i] - ref) * kLog2e);
  }
};

// Gradient coefficients of a row: dL/dy_c = a·p_c - bs·w_c - bt·[c = t].
struct Coef {
  float a, bt, bs, lse;
  int t_local;  // -1: the target is not in this row's classes
};

FUSEDOPS_DEVICE Coef make_coef(const Args& a, float gl, float glse, float lse, float wt, int64_t t) {
  Coef k;
  float c = (1.0f - a.eps) * wt;
  k.bt = gl * c;
  if (a.eps > 0.0f) c += a.eps_c * a.ws[1];
  if (a.z > 0.0f) c += 2.0f * a.z * lse;
  k.a = gl * c + glse;
  k.bs = gl * a.eps_c;
  k.lse = lse;
  const int64_t tl = t - a.class_offset;
  k.t_local = (t >= 0 && t < a.total && tl >= 0 && tl < a.classes) ? static_cast<int>(tl) : -1;
  return k;
}

// Gradients of n elements from their logits x (classes c0, c0 + 1, ...), in place.
template <int N>
FUSEDOPS_DEVICE void grad_vec(float (&x)[N], int c0, const Args& a, const Coef& k) {
  float d[N];
  if (a.cap > 0.0f) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float th = tanh_fast(x[i] * a.inv_cap);
      x[i] = a.cap * th;
      d[i] = 1.0f - th * th;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float g = k.a * exp2f((x[i] - k.lse) * kLog2e);
    if (a.eps > 0.0f) g -= k.bs * (a.weight != nullptr ? a.weight[a.class_offset + c0 + i] : 1.0f);
    if (c0 + i == k.t_local) g -= k.bt;
    x[i] = a.cap > 0.0f ? g * d[i] : g;
  }
}

// Writes the row's gradient; x and g may be the same row (each element is read before it is written, by
// the thread that writes it).
template <class T, int G>
FUSEDOPS_DEVICE void write_grad(const T* x, T* g, const Args& a, const Coef& k, int lane) {
  constexpr int n = VecOf<T>::n;
  const Span sp = row_span(x, g, a.classes);
  auto scalar = [&](int j) {
    float y[1] = {to_float(x[j])};
    grad_vec(y, j, a, k);
    g[j] = from_float<T>(y[0]);
  };
  for (int j = lane; j < sp.head; j += G) scalar(j);
  for (int v = lane; v < sp.nvec; v += G) {
    const int c0 = sp.head + v * n;
    float y[n];
    load_vec(x + c0, y);
    grad_vec(y, c0, a, k);
    store_vec(g + c0, y);
  }
  for (int j = sp.tail + lane; j < a.classes; j += G) scalar(j);
}

template <class T, int G>
FUSEDOPS_DEVICE void zero_row(T* g, const Args& a, int lane) {
  constexpr int n = VecOf<T>::n;
  const Span sp = row_span(g, static_cast<const T*>(nullptr), a.classes);
  const float zeros[n] = {};
  for (int j = lane; j < sp.head; j += G) g[j] = from_float<T>(0.0f);
  for (int v = lane; v < sp.nvec; v += G) store_vec(g + sp.head + v * n, zeros);
  for (int j = sp.tail + lane; j < a.classes; j += G) g[j] = from_float<T>(0.0f);
}

// One sweep over the row: this thread's running (max, sum) and Σ w_c y_c.
template <class T, int G>
FUSEDOPS_DEVICE Online sweep(const T* x, const T* g, const Args& a, int lane) {
  constexpr int n = VecOf<T>::n;
  const Span sp = row_span(x, g, a.classes);
  Online o;
  auto scalar = [&](int j) {
    const float y[1] = {softcap(to_float(x[j]), a)};
    o.add(y);
    if (a.smooth) o.sw += (a.weight != nullptr ? a.weight[a.class_offset + j] : 1.0f) * y[0];
  };
  auto vector = [&](const float (&raw)[n], int c0) {
    float y[n];
#pragma unroll
    for (int i = 0; i < n; ++i) y[i] = softcap(raw[i], a);
    o.add(y);
    if (a.smooth) {
#pragma unroll
      for (int i = 0; i < n; ++i) o.sw += (a.weight != nullptr ? a.weight[a.class_offset + c0 + i] : 1.0f) * y[i];
    }
  };
  for (int j = lane; j < sp.head; j += G) scalar(j);
  int v = lane;
  for (; v + G < sp.nvec; v += 2 * G) {  // two loads in flight per thread
    float y0[n], y1[n];
    load_vec(x + sp.head + v * n, y0);
    load_vec(x + sp.head + (v + G) * n, y1);
    vector(y0, sp.head + v * n);
    vector(y1, sp.head + (v + G) * n);
  }
  if (v < sp.nvec) {
    float y0[n];
    load_vec(x + sp.head + v * n, y0);
    vector(y0, sp.head + v * n);
  }
  for (int j = sp.tail + lane; j < a.classes; j += G) scalar(j);
  return o;
}

template <class T, int G, Pass P>
__global__ void XENT_LAUNCH_BOUNDS xent_rows(Args a) {
  constexpr int kGroups = kThreads / G;
  __shared__ float scratch[64];
  const int lane = threadIdx.x % G;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGroups;
  const float rscale = a.reduction == static_cast<int>(Reduction::mean) ? a.ws[2] : 1.0f;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kGroups + threadIdx.x / G; row < a.rows; row += stride) {
    const int64_t t = a.target[row];
    const T* x = static_cast<const T*>(a.logits) + row * a.ld;
    T* g = a.grad != nullptr ? static_cast<T*>(a.grad) + row * a.grad_ld : nullptr;
    if (t == a.ignore) {
      if (lane == 0) {
        if constexpr (P == Pass::forward) {
          a.loss[row] = 0.0f;
          a.lse[row] = 0.0f;
        } else if constexpr (P == Pass::stats) {
          a.lse[row] = 0.0f;
          a.target_logit[row] = 0.0f;
          if (a.smooth_sum != nullptr) a.smooth_sum[row] = 0.0f;
        }
      }
      if (g != nullptr) zero_row<T, G>(g, a, lane);
      continue;
    }
    const bool valid = t >= 0 && t < a.total;
    const float wt = valid ? (a.weight != nullptr ? a.weight[t] : 1.0f) : NAN;
    if constexpr (P == Pass::backward) {
      const float gl = a.grad_loss[row * a.grad_loss_stride] * rscale;
      const Coef k = make_coef(a, gl, a.grad_lse != nullptr ? a.grad_lse[row] : 0.0f, a.lse[row], wt, t);
      write_grad<T, G>(x, g, a, k, lane);
    } else {
      Online o = sweep<T, G>(x, g, a, lane);
      // The target's logit is read before the group's reduction: with an in-place gradient (g == x) other
      // threads overwrite the row as soon as they leave it.
      const int64_t tl = t - a.class_offset;
      const bool here = valid && tl >= 0 && tl < a.classes;
      const float yt = lane == 0 && here ? softcap(to_float(x[tl]), a) : (valid ? 0.0f : NAN);
      // A warp's shuffles do not order memory: the read must be complete before any lane writes the row.
      if constexpr (G == 32) __syncwarp();
      group_max_sum<G>(o.m, o.s, scratch);
      if (a.smooth) o.sw = group_sum<G>(o.sw, scratch);
      const float lse_raw = o.m + logf(o.s);  // -inf when every logit is -inf, NaN when one is NaN
      if constexpr (P == Pass::stats) {
        if (lane == 0) {
          a.lse[row] = lse_raw;
          a.target_logit[row] = yt;  // 0 when another shard holds the target
          if (a.smooth_sum != nullptr) a.smooth_sum[row] = o.sw;
        }
      } else {
        const float lse = o.m == -INFINITY ? NAN : lse_raw;  // all -inf: 0/0, as torch's log_softmax
        if (lane == 0) {
          float l = (1.0f - a.eps) * wt * (lse - yt);
          if (a.eps > 0.0f) l += a.eps_c * (a.ws[1] * lse - o.sw);
          if (a.z > 0.0f) l += a.z * lse * lse;
          a.loss[row] = l;
          a.lse[row] = lse_raw;
        }
        if (g != nullptr) {
          const float gl = (a.grad_scale != nullptr ? *a.grad_scale : 1.0f) * rscale;
          write_grad<T, G>(x, g, a, make_coef(a, gl, 0.0f, lse, wt, t), lane);
        }
      }
    }
  }
}

// ws[0] = Σ_{rows kept} w_t (NaN if a kept target is out of range), ws[1] = Σ_c w_c, ws[2] = 1 / ws[0].
__global__ void XENT_LAUNCH_BOUNDS xent_prologue(Args a) {
  __shared__ float scratch[32];
  float d = 0.0f;
  for (int64_t i = threadIdx.x; i < a.rows; i += kThreads) {
    const int64_t t = a.target[i];
    if (t == a.ignore) continue;
    d += (t >= 0 && t < a.total) ? (a.weight != nullptr ? a.weight[t] : 1.0f) : NAN;
  }
  d = block_sum(d, scratch);
  float w = static_cast<float>(a.total);
  if (a.weight != nullptr && a.eps > 0.0f) {
    w = 0.0f;
    for (int64_t c = threadIdx.x; c < a.total; c += kThreads) w += a.weight[c];
    w = block_sum(w, scratch);
  }
  if (threadIdx.x == 0) {
    a.ws[0] = d;
    a.ws[1] = w;
    a.ws[2] = 1.0f / d;  // inf when every row is ignored; then no row uses it
  }
}

// The reduced loss: Σ loss (sum) or Σ loss / ws[0] (mean; NaN when the denominator is 0 — every row ignored
// or of weight 0 — as torch, whose mean is then 0/0 even when smoothing or z-loss terms are not 0).
__global__ void XENT_LAUNCH_BOUNDS xent_epilogue(Args a) {
  __shared__ float scratch[32];
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < a.rows; i += kThreads) s += a.loss[i];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0)
    *a.reduced = a.reduction != static_cast<int>(Reduction::mean) ? s : a.ws[0] != 0.0f ? s / a.ws[0] : NAN;
}

Args make_args(const CrossEntropyParams& p) {
  Args a;
  a.logits = p.logits;
  a.rows = p.rows;
  a.ld = p.ld;
  a.classes = static_cast<int>(p.classes);
  a.class_offset = p.class_offset;
  a.total = p.total_classes;
  a.target = p.target;
  a.weight = static_cast<const float*>(p.weight);
  a.ignore = p.ignore_index;
  a.reduction = static_cast<int>(p.reduction);
  a.eps = static_cast<float>(p.label_smoothing);
  a.z = static_cast<float>(p.z_loss);
  a.cap = static_cast<float>(p.softcap);
  a.inv_cap = p.softcap > 0 ? static_cast<float>(1.0 / p.softcap) : 0.0f;
  a.eps_c = static_cast<float>(p.label_smoothing / static_cast<double>(p.total_classes));
  a.smooth = p.label_smoothing > 0 || p.smooth_sum != nullptr;
  a.loss = static_cast<float*>(p.loss);
  a.lse = static_cast<float*>(p.lse);
  a.reduced = static_cast<float*>(p.reduced);
  a.grad_scale = static_cast<const float*>(p.grad_scale);
  a.target_logit = static_cast<float*>(p.target_logit);
  a.smooth_sum = static_cast<float*>(p.smooth_sum);
  a.grad = p.grad;
  a.grad_ld = p.grad_ld;
  a.grad_loss = static_cast<const float*>(p.grad_loss);
  a.grad_loss_stride = p.grad_loss_stride;
  a.grad_lse = static_cast<const float*>(p.grad_lse);
  a.ws = p.workspace;
  return a;
}

template <class T, Pass P>
void launch_rows(const Args& a, cudaStream_t stream) {
  if (a.rows == 0) return;
  const int per_sm = 4;  // as XENT_LAUNCH_BOUNDS promises; blocks loop over rows
  if (a.classes <= kWarpVocab) {
    const int64_t need = ceil_div<int64_t>(a.rows, kThreads / 32);
    const int grid = static_cast<int>(std::min<int64_t>(need, int64_t{simt::sm_count()} * per_sm));
    SIMT_LAUNCH((xent_rows<T, 32, P>), grid, kThreads, 0, stream, a);
  } else {
    const int grid = static_cast<int>(std::min<int64_t>(a.rows, int64_t{simt::sm_count()} * per_sm));
    SIMT_LAUNCH((xent_rows<T, kThreads, P>), grid, kThreads, 0, stream, a);
  }
}

template <Pass P>
void launch_rows_dtype(const CrossEntropyParams& p, const Args& a, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::f32: return launch_rows<float, P>(a, stream);
    case DType::f16: return launch_rows<__half, P>(a, stream);
    case DType::bf16: return launch_rows<__nv_bfloat16, P>(a, stream);
    default: throw std::invalid_argument("fusedops: the CUDA cross-entropy kernels take f32, f16 or bf16 logits");
  }
}

}  // namespace

void cross_entropy_forward(const CrossEntropyParams& p, cudaStream_t stream) {
  const Args a = make_args(p);
  SIMT_LAUNCH(xent_prologue, 1, kThreads, 0, stream, a);
  launch_rows_dtype<Pass::forward>(p, a, stream);
  if (a.reduced != nullptr) SIMT_LAUNCH(xent_epilogue, 1, kThreads, 0, stream, a);
}

void cross_entropy_backward(const CrossEntropyParams& p, cudaStream_t stream) {
  const Args a = make_args(p);
  SIMT_LAUNCH(xent_prologue, 1, kThreads, 0, stream, a);
  launch_rows_dtype<Pass::backward>(p, a, stream);
}

void cross_entropy_stats(const CrossEntropyParams& p, cudaStream_t stream) {
  const Args a = make_args(p);
  SIMT_LAUNCH(xent_prologue, 1, kThreads, 0, stream, a);
  launch_rows_dtype<Pass::stats>(p, a, stream);
}

}  // namespace fusedops::FUSEDOPS_BACKEND
