// Softmax cross-entropy on the CPU: the forward (per-row loss and logsumexp, and the gradient in the same
// sweep when autograd will need it; the in-place one also on transposed logits, forward_columns below), the
// backward (the gradient from the saved logsumexp) and the per-shard partials of vocabulary-parallel use.
// Semantics: kernels/cross_entropy.h.
//
// Algorithm. Rows are split over threads (fusedops::parallel_for); a row is read from memory once, in
// chunks of kChunk classes that stay in L1. Each chunk is converted to fp32 (softcap applied) into a small
// buffer while its max is taken, then exp(y - chunk max) is summed: an online softmax at chunk
// granularity, so each logit costs one exp and the running (max, sum) is rescaled once per chunk rather
// than per element. When the forward also produces the gradient, the chunk's exps are kept in a per-thread
// row buffer (L2); once the row's lse is known each chunk's exps are scaled by exp(chunk max - lse) into
// the gradient, written with non-temporal stores when it is large. Memory traffic is then one read of the
// logits and one write of the gradient, with one exp per logit. bf16/fp16 convert in registers (vec.h).
// The backward recomputes p = exp(y - lse) in one pass (one read, one write). f64 (for gradcheck) takes a
// plain scalar path with libm.
//
// Limits: classes <= 2^30 per row, the binding's limit (rows and row strides are 64-bit). The exp (vec.h's
// vexp2_lean) is good to 2e-7 relative for fp32 logits (3e-6 for 16-bit ones); it returns 0 below e^-88
// (true values are subnormal).
// Reference: Milakov & Gimelshein, "Online normalizer calculation for softmax", arXiv:1805.02867.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "../common/parallel.h"
#include "../kernels/cross_entropy.h"
#include "vec.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace fusedops::cpu::FUSEDOPS_CPU_ISA {
namespace {

constexpr int64_t kChunk = 2048;  // classes per chunk: 8 KiB of fp32, a multiple of every kLanes
static_assert(kChunk % kLanes == 0, "chunks hold whole vectors");
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// Gradients at least this large bypass the cache (non-temporal stores): they are not read back soon, and a
// normal store would first read each line from memory.
constexpr int64_t kStreamBytes = int64_t{16} << 20;

constexpr float kLog2e = 1.44269504088896341f;

// e^(x - ref) for x <= ref (or NaN), to the precision logits of type T deserve.
template <class T>
inline vfloat exp_shifted(vfloat x, vfloat ref) {
  return vexp2_lean<std::is_same<T, float>::value>((x - ref) * kLog2e);
}
template <class T>
inline vfloat exp_shifted(vfloat x, float ref) {
  return exp_shifted<T>(x, vbroadcast(ref));
}

inline vint lane_index() {
  vint v;
  for (int i = 0; i < kLanes; ++i) v[i] = i;
  return v;
}

// Lanes at or past n set to `fill`.
inline vfloat mask_tail(vfloat v, int n, float fill) {
  if (n >= kLanes) return v;
  return lane_index() < n ? v : vbroadcast(fill);
}

// The first n <= kLanes elements; lanes past them read as `fill`.
template <class T>
inline vfloat load_n(const T* p, int n, float fill = 0.0f) {
  return n == kLanes ? load(p) : load_partial(p, n, fill);
}

// Non-temporal store of a whole vector to an address aligned to its size (bf16 rounded by store_lean when
// kLean).
template <class T, bool kLean = false>
inline void store_stream(T* p, vfloat v) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4) {
    __m512 f;
    std::memcpy(&f, &v, sizeof f);
    _mm512_stream_ps(reinterpret_cast<float*>(p), f);
  } else {
    __m256i h;
    T tmp[kLanes];
    store_maybe_lean<kLean>(tmp, v);
    std::memcpy(&h, tmp, sizeof h);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h);
  }
#elif defined(__AVX2__)
  if constexpr (sizeof(T) == 4) {
    __m256 f;
    std::memcpy(&f, &v, sizeof f);
    _mm256_stream_ps(reinterpret_cast<float*>(p), f);
  } else {
    __m128i h;
    T tmp[kLanes];
    store_maybe_lean<kLean>(tmp, v);
    std::memcpy(&h, tmp, sizeof h);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
  }
#elif defined(__SSE2__)
  if constexpr (sizeof(T) == 4) {
    __m128 f;
    std::memcpy(&f, &v, sizeof f);
    _mm_stream_ps(reinterpret_cast<float*>(p), f);
  } else {
    store_maybe_lean<kLean>(p, v);
  }
#else
  store_maybe_lean<kLean>(p, v);
#endif
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();  // non-temporal stores are weakly ordered: publish them before the task ends
#endif
}

// What a row needs besides its logits; shared by all dtypes (Acc: float, or double for f64).
template <class Acc>
struct Problem {
  const CrossEntropyParams& p;
  const Acc* weight;  // full (total_classes) weights, or nullptr
  Acc eps, z, cap, inv_cap, total;
  Acc weight_sum;  // Σ_c w_c over all classes (C without weights)
  Acc denom;       // Σ_{rows not ignored} w_t

  explicit Problem(const CrossEntropyParams& params) : p(params) {
    weight = static_cast<const Acc*>(p.weight);
    eps = static_cast<Acc>(p.label_smoothing);
    z = static_cast<Acc>(p.z_loss);
    cap = static_cast<Acc>(p.softcap);
    inv_cap = cap > 0 ? Acc(1) / cap : Acc(0);
    total = static_cast<Acc>(p.total_classes);
    double ws = static_cast<double>(p.total_classes);
    if (weight != nullptr && p.label_smoothing > 0) {
      ws = 0;
      for (int64_t c = 0; c < p.total_classes; ++c) ws += weight[c];
    }
    weight_sum = static_cast<Acc>(ws);
    double d = 0;
    for (int64_t i = 0; i < p.rows; ++i) {
      const int64_t t = p.target[i];
      if (t != p.ignore_index) d += static_cast<double>(target_weight(t));
    }
    denom = static_cast<Acc>(d);
  }

  bool valid(int64_t t) const { return t >= 0 && t < p.total_classes; }
  // w_t; NaN for an out-of-range target, so its row's loss and gradient come out NaN.
  Acc target_weight(int64_t t) const {
    if (!valid(t)) return std::numeric_limits<Acc>::quiet_NaN();
    return weight != nullptr ? weight[t] : Acc(1);
  }
  Acc reduction_scale() const { return p.reduction == Reduction::mean ? Acc(1) / denom : Acc(1); }

  // The per-row loss from the row's lse, target logit and Σ w_c y_c (terms with a zero factor are left
  // out, so an infinite logit does not turn them into 0·inf = NaN).
  Acc loss(Acc lse, Acc wt, Acc yt, Acc smooth) const {
    Acc l = (Acc(1) - eps) * wt * (lse - yt);
    if (eps > 0) l += eps / total * (weight_sum * lse - smooth);
    if (z > 0) l += z * lse * lse;
    return l;
  }
};

// The reduced loss from the per-row ones (sum, or mean over the targets' weights), when asked for.
template <class Acc>
void write_reduced(const CrossEntropyParams& p, const Problem<Acc>& pr, const Acc* loss) {
  if (p.reduced == nullptr) return;
  double sum = 0;
  for (int64_t r = 0; r < p.rows; ++r) sum += loss[r];
  // A mean over a zero denominator (every row ignored or of weight 0) is NaN, as torch's 0/0, even when
  // smoothing or z-loss terms make the sum non-zero.
  const double mean = pr.denom != 0 ? sum / static_cast<double>(pr.denom) : std::numeric_limits<double>::quiet_NaN();
  *static_cast<Acc*>(p.reduced) = static_cast<Acc>(p.reduction == Reduction::mean ? mean : sum);
}

// Gradient coefficients of one row: dL/dy_c = a·p_c - b_smooth·w_c - b_target·[c = t].
template <class Acc>
struct GradCoef {
  Acc a, b_target, b_smooth;
};

template <class Acc>
GradCoef<Acc> grad_coef(const Problem<Acc>& pr, Acc gl, Acc glse, Acc lse, Acc wt) {
  GradCoef<Acc> k;
  Acc a = (Acc(1) - pr.eps) * wt;
  k.b_target = gl * a;
  if (pr.eps > 0) a += pr.eps / pr.total * pr.weight_sum;
  if (pr.z > 0) a += Acc(2) * pr.z * lse;
  k.a = gl * a + glse;
  k.b_smooth = gl * pr.eps / pr.total;
  if constexpr (std::is_same<Acc, float>::value) {  // the gradient loops' store_lean needs plain NaNs
    k.a = canonical_nan(k.a);
    k.b_target = canonical_nan(k.b_target);
    k.b_smooth = canonical_nan(k.b_smooth);
  }
  return k;
}

// ---- fp32 / bf16 / fp16 rows: vectorized ---------------------------------------------------------------

struct ChunkStat {
  float max;   // the chunk's max (-inf if all -inf or NaN)
  float ref;   // what the exps were taken relative to (max, or 0 when max is -inf)
  float sum;   // Σ exp(y - ref)
};

struct Scratch {
  std::unique_ptr<float[]> chunk;   // kChunk + kLanes
  std::unique_ptr<float[]> exps;    // classes + kLanes (forward with gradient)
  std::unique_ptr<float[]> tanhs;   // classes + kLanes (forward with gradient and softcap)
  std::unique_ptr<ChunkStat[]> stats;

  Scratch(int64_t classes, bool keep_exps, bool keep_tanh) {
    chunk.reset(new float[kChunk + kLanes]);
    if (keep_exps) exps.reset(new float[classes + kLanes]);
    if (keep_tanh) tanhs.reset(new float[classes + kLanes]);
    stats.reset(new ChunkStat[classes / kChunk + 3]);
  }
};

// Softcap in registers; `th` receives tanh(x / cap).
inline vfloat apply_cap(vfloat v, float cap, float inv_cap, vfloat* th) {
  const vfloat t = vtanh(v * inv_cap);
  if (th != nullptr) *th = t;
  return t * cap;
}

// Elements [0, head) form the first segment (so that later ones start aligned for the gradient's stores),
// then kChunk-long chunks.
inline int64_t chunk_end(int64_t start, int64_t head, int64_t classes) {
  if (start == 0 && head > 0) return std::min(head, classes);
  return std::min(start + kChunk, classes);
}

struct RowSums {
  float max;     // max over the row (-inf when every element is -inf or NaN)
  float lse;     // local lse (NaN propagates; -inf when max is -inf and no NaN was seen)
  double smooth; // Σ w_c y_c (when asked)
  int chunks;
};

// The common case gets its own lean loops (no softcap, no smoothing sum, no per-vector option tests), so the
// compiler keeps the accumulators in registers: the general loops below spill them and run ~5x slower.

// Max of a chunk of plain logits; 16-bit ones are also converted into `cb`.
template <class T>
inline vfloat chunk_max_plain(const T* xc, int64_t len, float* cb) {
  constexpr bool kConvert = !std::is_same<T, float>::value;
  vfloat m0 = vbroadcast(-kInf), m1 = m0;
  int64_t i = 0;
  for (; i + 2 * kLanes <= len; i += 2 * kLanes) {
    const vfloat v0 = load(xc + i), v1 = load(xc + i + kLanes);
    m0 = vmax(m0, v0);
    m1 = vmax(m1, v1);
    if constexpr (kConvert) {
      store(cb + i, v0);
      store(cb + i + kLanes, v1);
    }
  }
  for (; i < len; i += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, len - i));
    const vfloat v = mask_tail(load_n(xc + i, n), n, -kInf);
    m0 = vmax(m0, v);
    if constexpr (kConvert) store(cb + i, v);
  }
  return vmax(m0, m1);
}

// Σ e^(y - ref) over a chunk, read from the fp32 chunk buffer (kBuffered) or the fp32 logits; the exps are
// also kept in `keep` (kKeep). Lanes past the end read as -inf: e = 0.
//
// The exps are compute bound, the next chunk's max pass memory bound: the logits one chunk further on
// (`ahead`, possibly past the row or the tensor: prefetches never fault) are pulled into the cache while the
// exps run, so that the two overlap instead of alternating (~18% of the forward's time on an AVX2 EPYC).
template <class T>
inline void prefetch_vectors(const T* p) {
  for (int b = 0; b < 2 * kLanes * static_cast<int>(sizeof(T)); b += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + b, 0, 3);
}
template <class T, bool kBuffered, bool kKeep>
inline float chunk_exp_sum(const float* src, int64_t len, float ref, float* keep, const T* ahead) {
  // One accumulator: a second one would be spilled (the exp's constants take most of AVX2's 16 registers)
  // and its chain then runs through memory.
  vfloat acc = vbroadcast(0.0f);
  int64_t i = 0;
  for (; i + 2 * kLanes <= len; i += 2 * kLanes) {
    prefetch_vectors(ahead + i);
    const vfloat e0 = exp_shifted<T>(load(src + i), ref), e1 = exp_shifted<T>(load(src + i + kLanes), ref);
    acc += e0 + e1;
    if constexpr (kKeep) {
      store(keep + i, e0);
      store(keep + i + kLanes, e1);
    }
  }
  for (; i < len; i += kLanes) {
    const vfloat x = kBuffered || i + kLanes <= len ? load(src + i)
                                                    : load_partial(src + i, static_cast<int>(len - i), -kInf);
    const vfloat e = exp_shifted<T>(x, ref);
    acc += e;
    if constexpr (kKeep) store(keep + i, e);
  }
  return hsum(acc);
}

// One read of the row: chunk maxima and exp sums, Σ w_c y_c when `want_smooth`, the exps (and tanhs) kept
// in the scratch row buffers when they exist. A chunk is read from memory once: the first pass takes its
// max (and converts it into the chunk buffer when it is not plain fp32), the second, from L1, its exps.
template <class T>
RowSums row_sweep(const T* x, int64_t classes, int64_t head, const Problem<float>& pr, const float* w_local,
                  bool want_smooth, Scratch& s) {
  const bool capped = pr.cap > 0;
  const bool buffered = capped || !std::is_same<T, float>::value;
  float* cb = s.chunk.get();
  double smooth = 0;
  int nchunks = 0;
  for (int64_t start = 0; start < classes;) {
    const int64_t end = chunk_end(start, head, classes);
    const int64_t len = end - start;
    const T* xc = x + start;
    vfloat vmx;
    if (!capped && !want_smooth) {
      vmx = chunk_max_plain(xc, len, cb);
    } else {
      vfloat vmx0 = vbroadcast(-kInf), vmx1 = vmx0, vsm = vbroadcast(0.0f);
      auto first = [&](int64_t i, int n, vfloat& vm) {
        vfloat v = load_n(xc + i, n);
        if (capped) {
          vfloat th;
          v = apply_cap(v, pr.cap, pr.inv_cap, &th);
          if (s.tanhs) store(s.tanhs.get() + start + i, th);
        }
        if (want_smooth) vsm += (w_local != nullptr ? v * load_n(w_local + start + i, n) : v);  // tail lanes: 0
        v = mask_tail(v, n, -kInf);
        vm = vmax(vm, v);
        if (buffered) store(cb + i, v);
      };
      int64_t i = 0;
      for (; i + 2 * kLanes <= len; i += 2 * kLanes) {
        first(i, kLanes, vmx0);
        first(i + kLanes, kLanes, vmx1);
      }
      for (; i < len; i += kLanes) first(i, static_cast<int>(std::min<int64_t>(kLanes, len - i)), vmx0);
      vmx = vmax(vmx0, vmx1);
      if (want_smooth) smooth += hsum(vsm);
    }
    const float mx = hmax(vmx);
    const float ref = mx == -kInf ? 0.0f : mx;
    float* keep = s.exps ? s.exps.get() + start : nullptr;
    float sum;
    if (buffered) {
      sum = keep ? chunk_exp_sum<T, true, true>(cb, len, ref, keep, xc + kChunk)
                 : chunk_exp_sum<T, true, false>(cb, len, ref, keep, xc + kChunk);
    } else if constexpr (std::is_same<T, float>::value) {  // unbuffered: plain fp32 logits, read again from L1
      sum = keep ? chunk_exp_sum<T, false, true>(xc, len, ref, keep, xc + kChunk)
                 : chunk_exp_sum<T, false, false>(xc, len, ref, keep, xc + kChunk);
    } else {
      sum = kNaN;  // unreachable: 16-bit logits are always buffered
    }
    s.stats[nchunks++] = ChunkStat{mx, ref, sum};
    start = end;
  }
  float mx = -kInf;
  for (int k = 0; k < nchunks; ++k) mx = std::max(mx, s.stats[k].max);
  const float ref = mx == -kInf ? 0.0f : mx;
  double sum = 0;
  for (int k = 0; k < nchunks; ++k) {
    const ChunkStat& c = s.stats[k];
    // A chunk of -inf (and NaN) logits adds its sum as is: 0, or NaN.
    sum += c.max == -kInf ? static_cast<double>(c.sum) : c.sum * std::exp(static_cast<double>(c.ref) - ref);
  }
  RowSums r;
  r.max = mx;
  r.lse = static_cast<float>(ref + std::log(sum));
  r.smooth = smooth;
  r.chunks = nchunks;
  return r;
}

template <class T, bool kLean = false>
inline void store_grad(T* g, vfloat v, int n, bool stream) {
  if (n < kLanes) {
    store_partial(g, v, n);
  } else if (stream) {
    store_stream<T, kLean>(g, v);
  } else {
    store_maybe_lean<kLean>(g, v);
  }
}

// Lanes of the vector starting at class `base` that hold the target get `b_target` subtracted.
inline vfloat sub_target(vfloat g, int64_t base, int64_t t_local, float b_target) {
  const int64_t d = t_local - base;
  if (d < 0 || d >= kLanes) return g;
  g[d] -= b_target;
  return g;
}

template <class T>
void zero_row(T* g, int64_t classes) {
  const T zero = from_float<T>(0.0f);
  std::fill(g, g + classes, zero);
}

// The stores of a gradient row are aligned (for streaming) from element `head` on.
template <class T>
int64_t aligned_head(const T* g, int64_t classes) {
  constexpr uintptr_t kAlign = sizeof(T) * kLanes;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(g);
  if (addr % sizeof(T) != 0) return 0;
  const int64_t head = static_cast<int64_t>(((kAlign - addr % kAlign) % kAlign) / sizeof(T));
  return std::min(head, classes);
}

// g[start, end) = a·e - b_target·[c = t] (no smoothing, no softcap): the common case's lean loop. The last
// vector is stored partially; the chunk holds at least one whole vector. Its NaNs come from 16-bit logits, the
// hardware or canonical scalars, so store_lean rounds them right.
template <class T, bool kStream>
inline void grad_chunk_plain(T* g, const float* e, int64_t start, int64_t end, float a, int64_t t_local,
                             float b_target) {
  const vfloat va = vbroadcast(a);
  int64_t i = start;
  for (; i + kLanes <= end; i += kLanes) {
    vfloat gv = load(e + i) * va;
    if (t_local - i >= 0 && t_local - i < kLanes) gv = sub_target(gv, i, t_local, b_target);
    if constexpr (kStream) {
      store_stream<T, true>(g + i, gv);
    } else {
      store_maybe_lean<true>(g + i, gv);
    }
  }
  if (i < end) store_partial(g + i, sub_target(load(e + i) * va, i, t_local, b_target), static_cast<int>(end - i));
}

template <class T>
void forward_vec(const CrossEntropyParams& p) {
  const Problem<float> pr(p);
  const auto* logits = static_cast<const T*>(p.logits);
  T* grad = static_cast<T*>(p.grad);
  auto* loss = static_cast<float*>(p.loss);
  auto* lse_out = static_cast<float*>(p.lse);
  const float gscale = grad != nullptr ? (p.grad_scale ? *static_cast<const float*>(p.grad_scale) : 1.0f) *
                                             pr.reduction_scale()
                                       : 0.0f;
  const bool stream = grad != nullptr && p.rows * p.classes * int64_t(sizeof(T)) >= kStreamBytes &&
                      p.grad != p.logits;
  const bool want_smooth = pr.eps > 0;
  const int64_t V = p.classes;
  parallel_for(p.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)), [&](int64_t begin, int64_t end) {
    Scratch s(V, grad != nullptr, grad != nullptr && pr.cap > 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = p.target[r];
      T* g = grad != nullptr ? grad + r * p.grad_ld : nullptr;
      if (t == p.ignore_index) {
        loss[r] = 0.0f;
        lse_out[r] = 0.0f;
        if (g) zero_row(g, V);
        continue;
      }
      const T* x = logits + r * p.ld;
      const int64_t head = g ? aligned_head(g, V) : 0;
      const RowSums rs = row_sweep(x, V, head, pr, pr.weight, want_smooth, s);
      // All -inf: lse = log 0 = -inf is returned, but the loss and gradient are 0/0 = NaN, as torch's
      // log_softmax makes them.
      const float lse = rs.max == -kInf ? kNaN : rs.lse;
      const float wt = pr.target_weight(t);
      float yt = kNaN;
      if (pr.valid(t)) {
        yt = to_float(x[t]);
        if (pr.cap > 0) yt = pr.cap * std::tanh(yt * pr.inv_cap);
      }
      lse_out[r] = rs.lse;
      loss[r] = pr.loss(lse, wt, yt, static_cast<float>(rs.smooth));
      if (!g) continue;
      const GradCoef<float> k = grad_coef(pr, gscale, 0.0f, lse, wt);
      const int64_t t_local = pr.valid(t) ? t : -1;
      const float* e = s.exps.get();
      const float* th = s.tanhs.get();
      int chunk = 0;
      for (int64_t start = 0; start < V; ++chunk) {
        const int64_t end = chunk_end(start, head, V);
        const ChunkStat& cs = s.stats[chunk];
        // A chunk of -inf logits holds zeros (or NaN); a NaN lse must still make the whole row NaN.
        const float f = std::isnan(lse) ? kNaN : (cs.max == -kInf ? 0.0f : std::exp(cs.ref - lse));
        const float a = k.a * f;  // k.a's NaN is canonical, f's is kNaN: so is a's
        if (!want_smooth && !th && end - start >= kLanes) {
          if (stream) {
            grad_chunk_plain<T, true>(g, e, start, end, a, t_local, k.b_target);
          } else {
            grad_chunk_plain<T, false>(g, e, start, end, a, t_local, k.b_target);
          }
          start = end;
          continue;
        }
        for (int64_t i = start; i < end; i += kLanes) {
          const int n = static_cast<int>(std::min<int64_t>(kLanes, end - i));
          vfloat gv = load(e + i) * a;
          if (want_smooth) gv -= (pr.weight != nullptr ? load_n(pr.weight + i, n) : vbroadcast(1.0f)) * k.b_smooth;
          gv = sub_target(gv, i, t_local, k.b_target);
          if (th) {
            const vfloat tv = load(th + i);
            gv = gv * (1.0f - tv * tv);
          }
          store_grad(g + i, gv, n, stream);
        }
        start = end;
      }
    }
    if (stream) stream_fence();
  });
  write_reduced(p, pr, loss);
}

// ---- the transposed layout: logit (row r, class c) at x[c * class_stride + r] ----------------------------
// linear_cross_entropy's chunk of logits computed as W @ hᵀ (MKL's faster orientation on the CPU here),
// gradient written in place. Lanes hold rows: per row a running max and sum, updated kColChunk classes at a
// time (a max pass, then the exps relative to it from L1: one exp per logit, plus one per row and chunk);
// then a second read of the logits writes the gradient over them. Rows are split over threads in tiles of
// kTileVecs vectors, so a chunk's classes × a tile's rows stay in L1.
constexpr int kColChunk = 16;
constexpr int kTileVecs = 32;

template <class T>
void forward_columns(const CrossEntropyParams& p) {
  const Problem<float> pr(p);
  T* x = static_cast<T*>(const_cast<void*>(p.logits));  // the gradient is written over it
  auto* loss = static_cast<float*>(p.loss);
  auto* lse_out = static_cast<float*>(p.lse);
  const int64_t R = p.rows, V = p.classes, cs = p.class_stride;
  const float gscale = (p.grad_scale ? *static_cast<const float*>(p.grad_scale) : 1.0f) * pr.reduction_scale();
  const bool smooth = pr.eps > 0;
  const float* w = pr.weight;
  const int64_t nvec = (R + kLanes - 1) / kLanes;
  parallel_for(nvec, 1, [&](int64_t vbegin, int64_t vend) {
    constexpr int kTile = kTileVecs * kLanes;
    alignas(64) float m[kTile], mnew[kTile], ref[kTile], s[kTile], lse_g[kTile], a[kTile], bs[kTile], keep[kTile];
    double sm[kTile];
    for (int64_t v0 = vbegin; v0 < vend; v0 += kTileVecs) {
      const int64_t r0 = v0 * kLanes;
      const int rows = static_cast<int>(std::min<int64_t>(std::min<int64_t>(vend - v0, kTileVecs) * kLanes, R - r0));
      const int nv = (rows + kLanes - 1) / kLanes;
      auto lanes = [&](int j) { return std::min(kLanes, rows - j * kLanes); };
      // Vectors whose rows are all ignored cost nothing.
      bool live[kTileVecs];
      for (int j = 0; j < nv; ++j) {
        live[j] = false;
        for (int l = 0; l < lanes(j); ++l) live[j] |= p.target[r0 + j * kLanes + l] != p.ignore_index;
      }
      std::fill(m, m + kTile, -kInf);
      std::fill(s, s + kTile, 0.0f);
      std::fill(sm, sm + kTile, 0.0);
      for (int64_t c0 = 0; c0 < V; c0 += kColChunk) {
        const int kc = static_cast<int>(std::min<int64_t>(kColChunk, V - c0));
        const T* xc = x + c0 * cs + r0;
        for (int j = 0; j < nv; ++j) store(mnew + j * kLanes, load(m + j * kLanes));
        for (int k = 0; k < kc; ++k)
          for (int j = 0; j < nv; ++j)
            if (live[j])
              store(mnew + j * kLanes,
                    vmax(load_n(xc + k * cs + j * kLanes, lanes(j), -kInf), load(mnew + j * kLanes)));
        for (int j = 0; j < nv; ++j) {
          if (!live[j]) continue;
          const vfloat mo = load(m + j * kLanes), mn = load(mnew + j * kLanes);
          const vfloat rf = mn == -kInf ? vbroadcast(0.0f) : mn;
          // A row still all -inf keeps its sum as is (0, or NaN from a NaN logit). The rescale is at fp32
          // precision whatever T: the sum goes through it at every change of the max.
          const vfloat factor = mo == -kInf ? vbroadcast(1.0f) : exp_shifted<float>(mo, rf);
          store(s + j * kLanes, load(s + j * kLanes) * factor);
          store(ref + j * kLanes, rf);
          store(m + j * kLanes, mn);
        }
        alignas(64) float part[kTile];
        if (smooth) std::fill(part, part + kTile, 0.0f);
        for (int k = 0; k < kc; ++k) {
          const float wc = w != nullptr ? w[c0 + k] : 1.0f;
          for (int j = 0; j < nv; ++j) {
            if (!live[j]) continue;
            const vfloat v = load_n(xc + k * cs + j * kLanes, lanes(j));
            store(s + j * kLanes, load(s + j * kLanes) + exp_shifted<T>(v, load(ref + j * kLanes)));
            if (smooth) store(part + j * kLanes, load(part + j * kLanes) + v * wc);
          }
        }
        if (smooth)
          for (int i = 0; i < rows; ++i) sm[i] += part[i];
      }
      // Per row: the loss and lse, and the gradient's coefficients (the target's logit read before the
      // gradient overwrites it).
      float g_target[kTile];
      for (int i = 0; i < rows; ++i) {
        const int64_t r = r0 + i, t = p.target[r];
        keep[i] = 0.0f;
        a[i] = bs[i] = 0.0f;
        lse_g[i] = 0.0f;
        if (t == p.ignore_index) {
          loss[r] = lse_out[r] = 0.0f;
          continue;
        }
        const float rf = m[i] == -kInf ? 0.0f : m[i];
        const float lse_raw = rf + std::log(s[i]);
        const float lse = m[i] == -kInf ? kNaN : lse_raw;  // all -inf: 0/0, as torch's log_softmax
        const float wt = pr.target_weight(t);
        const float yt = pr.valid(t) ? to_float(x[t * cs + r]) : kNaN;
        lse_out[r] = lse_raw;
        loss[r] = pr.loss(lse, wt, yt, static_cast<float>(sm[i]));
        const GradCoef<float> k = grad_coef(pr, gscale, 0.0f, lse, wt);
        keep[i] = 1.0f;
        a[i] = k.a;
        bs[i] = k.b_smooth;
        lse_g[i] = lse;
        // The target's own gradient, as the pass below computes it plus its -b_target, in one rounding.
        float gt = exp_shifted<T>(vbroadcast(yt), lse)[0] * k.a;
        if (smooth) gt -= k.b_smooth * (w != nullptr ? w[t] : 1.0f);
        g_target[i] = gt - k.b_target;
      }
      for (int64_t c = 0; c < V; ++c) {
        T* xc = x + c * cs + r0;
        const float wc = w != nullptr ? w[c] : 1.0f;
        for (int j = 0; j < nv; ++j) {
          const int n = lanes(j);
          vfloat g = vbroadcast(0.0f);
          if (live[j]) {
            g = exp_shifted<T>(load_n(xc + j * kLanes, n), load(lse_g + j * kLanes)) * load(a + j * kLanes);
            if (smooth) g -= load(bs + j * kLanes) * wc;
            g = load(keep + j * kLanes) != 0.0f ? g : vbroadcast(0.0f);  // ignored rows: 0, even for NaN logits
          }
          store_grad(xc + j * kLanes, g, n, false);
        }
      }
      for (int i = 0; i < rows; ++i) {
        const int64_t r = r0 + i, t = p.target[r];
        if (keep[i] != 0.0f && pr.valid(t)) x[t * cs + r] = from_float<T>(g_target[i]);
      }
    }
  });
  write_reduced(p, pr, loss);
}

template <class T>
void stats_vec(const CrossEntropyParams& p) {
  const Problem<float> pr(p);
  const auto* logits = static_cast<const T*>(p.logits);
  auto* lse_out = static_cast<float*>(p.lse);
  auto* yt_out = static_cast<float*>(p.target_logit);
  auto* sm_out = static_cast<float*>(p.smooth_sum);
  const int64_t V = p.classes;
  const float* w_local = pr.weight != nullptr ? pr.weight + p.class_offset : nullptr;
  parallel_for(p.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)), [&](int64_t begin, int64_t end) {
    Scratch s(V, false, false);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = p.target[r];
      if (t == p.ignore_index) {
        lse_out[r] = 0.0f;
        yt_out[r] = 0.0f;
        if (sm_out) sm_out[r] = 0.0f;
        continue;
      }
      const T* x = logits + r * p.ld;
      const RowSums rs = row_sweep(x, V, 0, pr, w_local, sm_out != nullptr, s);
      lse_out[r] = rs.lse;
      float yt = 0.0f;
      if (!pr.valid(t)) {
        yt = kNaN;
      } else if (t >= p.class_offset && t < p.class_offset + V) {
        yt = to_float(x[t - p.class_offset]);
        if (pr.cap > 0) yt = pr.cap * std::tanh(yt * pr.inv_cap);
      }
      yt_out[r] = yt;
      if (sm_out) sm_out[r] = static_cast<float>(rs.smooth);
    }
  });
}

// One row's gradient from its logits and lse (the backward): one read, one exp and one write per logit.
// Two vectors per step keep two exp chains in flight; the flags are template parameters so that the loop
// carries no branch but the target's. Without smoothing, the NaNs that can reach the stores are those of
// 16-bit logits, the hardware's or canonical scalars (grad_coef), so store_lean rounds them right.
template <class T, bool kCapped, bool kSmooth>
void grad_row(const T* x, T* g, int64_t V, const Problem<float>& pr, const float* w_local, const GradCoef<float>& k,
              float lse, int64_t t_local, bool stream) {
  auto one = [&](int64_t i, int n) {
    vfloat y = load_n(x + i, n), th = vbroadcast(0.0f);
    if (kCapped) y = apply_cap(y, pr.cap, pr.inv_cap, &th);
    vfloat gv = exp_shifted<T>(y, lse) * k.a;
    if (kSmooth) gv -= (w_local != nullptr ? load_n(w_local + i, n) : vbroadcast(1.0f)) * k.b_smooth;
    gv = sub_target(gv, i, t_local, k.b_target);
    if (kCapped) gv = gv * (1.0f - th * th);
    return gv;
  };
  const int64_t head = aligned_head(g, V);
  int64_t i = 0;
  if (head > 0) {
    store_partial(g, one(0, static_cast<int>(head)), static_cast<int>(head));
    i = head;
  }
  // In place (g == x) both vectors are loaded before either is stored.
  for (; i + 2 * kLanes <= V; i += 2 * kLanes) {
    const vfloat g0 = one(i, kLanes), g1 = one(i + kLanes, kLanes);
    store_grad<T, !kSmooth>(g + i, g0, kLanes, stream);
    store_grad<T, !kSmooth>(g + i + kLanes, g1, kLanes, stream);
  }
  for (; i < V; i += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, V - i));
    store_grad<T, !kSmooth>(g + i, one(i, n), n, stream);
  }
}

template <class T>
void backward_vec(const CrossEntropyParams& p) {
  const Problem<float> pr(p);
  const auto* logits = static_cast<const T*>(p.logits);
  T* grad = static_cast<T*>(p.grad);
  const auto* lse_in = static_cast<const float*>(p.lse);
  const auto* gloss = static_cast<const float*>(p.grad_loss);
  const auto* glse = static_cast<const float*>(p.grad_lse);
  const float rscale = pr.reduction_scale();
  // Streaming stores pay only into memory the rows have not just been read from (in place, the lines are
  // in cache already, and a partial-line streaming store of them is very slow).
  const bool stream = p.rows * p.classes * int64_t(sizeof(T)) >= kStreamBytes && p.grad != p.logits;
  const int64_t V = p.classes;
  const float* w_local = pr.weight != nullptr ? pr.weight + p.class_offset : nullptr;
  auto row_fn = pr.cap > 0 ? (pr.eps > 0 ? &grad_row<T, true, true> : &grad_row<T, true, false>)
                           : (pr.eps > 0 ? &grad_row<T, false, true> : &grad_row<T, false, false>);
  parallel_for(p.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = p.target[r];
      T* g = grad + r * p.grad_ld;
      if (t == p.ignore_index) {
        zero_row(g, V);
        continue;
      }
      const float lse = canonical_nan(lse_in[r]);
      const float gl = gloss[r * p.grad_loss_stride] * rscale;
      const GradCoef<float> k = grad_coef(pr, gl, glse ? glse[r] : 0.0f, lse, pr.target_weight(t));
      row_fn(logits + r * p.ld, g, V, pr, w_local, k, lse, pr.valid(t) ? t - p.class_offset : -1, stream);
    }
    if (stream) stream_fence();
  });
}

// ---- f64: scalar, libm ----------------------------------------------------------------------------------

struct RowSums64 {
  double max, lse, smooth;
};

RowSums64 row_sums64(const double* x, int64_t V, const Problem<double>& pr, const double* w_local, bool want_smooth) {
  auto y_at = [&](int64_t c) { return pr.cap > 0 ? pr.cap * std::tanh(x[c] * pr.inv_cap) : x[c]; };
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < V; ++c) mx = std::max(mx, y_at(c));  // NaN ignored here, propagated by the sum
  const double ref = std::isinf(mx) && mx < 0 ? 0.0 : mx;
  double sum = 0, smooth = 0;
  for (int64_t c = 0; c < V; ++c) {
    const double y = y_at(c);
    sum += std::exp(y - ref);
    if (want_smooth) smooth += (w_local ? w_local[c] : 1.0) * y;
  }
  return RowSums64{mx, ref + std::log(sum), smooth};
}

void forward64(const CrossEntropyParams& p) {
  const Problem<double> pr(p);
  const auto* logits = static_cast<const double*>(p.logits);
  auto* grad = static_cast<double*>(p.grad);
  auto* loss = static_cast<double*>(p.loss);
  auto* lse_out = static_cast<double*>(p.lse);
  const double gscale =
      grad ? (p.grad_scale ? *static_cast<const double*>(p.grad_scale) : 1.0) * pr.reduction_scale() : 0.0;
  const int64_t V = p.classes;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  parallel_for(p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = p.target[r];
      double* g = grad ? grad + r * p.grad_ld : nullptr;
      if (t == p.ignore_index) {
        loss[r] = lse_out[r] = 0.0;
        if (g) std::fill(g, g + V, 0.0);
        continue;
      }
      const double* x = logits + r * p.ld;
      const RowSums64 rs = row_sums64(x, V, pr, pr.weight, pr.eps > 0);
      const double lse = std::isinf(rs.max) && rs.max < 0 ? nan : rs.lse;
      const double wt = pr.target_weight(t);
      double yt = nan;
      if (pr.valid(t)) yt = pr.cap > 0 ? pr.cap * std::tanh(x[t] * pr.inv_cap) : x[t];
      lse_out[r] = rs.lse;
      loss[r] = pr.loss(lse, wt, yt, rs.smooth);
      if (!g) continue;
      const GradCoef<double> k = grad_coef(pr, gscale, 0.0, lse, wt);
      for (int64_t c = 0; c < V; ++c) {
        const double th = pr.cap > 0 ? std::tanh(x[c] * pr.inv_cap) : 0.0;
        const double y = pr.cap > 0 ? pr.cap * th : x[c];
        double gv = k.a * std::exp(y - lse);
        if (pr.eps > 0) gv -= k.b_smooth * (pr.weight ? pr.weight[c] : 1.0);
        if (c == t) gv -= k.b_target;
        g[c] = pr.cap > 0 ? gv * (1.0 - th * th) : gv;
      }
    }
  });
  write_reduced(p, pr, loss);
}

void stats64(const CrossEntropyParams& p) {
  const Problem<double> pr(p);
  const auto* logits = static_cast<const double*>(p.logits);
  auto* lse_out = static_cast<double*>(p.lse);
  auto* yt_out = static_cast<double*>(p.target_logit);
  auto* sm_out = static_cast<double*>(p.smooth_sum);
  const double* w_local = pr.weight ? pr.weight + p.class_offset : nullptr;
  parallel_for(p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = p.target[r];
      if (t == p.ignore_index) {
        lse_out[r] = yt_out[r] = 0.0;
        if (sm_out) sm_out[r] = 0.0;
        continue;
      }
      const double* x = logits + r * p.ld;
      const RowSums64 rs = row_sums64(x, p.classes, pr, w_local, sm_out != nullptr);
      lse_out[r] = rs.lse;
      double yt = 0.0;
      if (!pr.valid(t)) {
        yt = std::numeric_limits<double>::quiet_NaN();
      } else if (t >= p.class_offset && t < p.class_offset + p.classes) {
        const double xt = x[t - p.class_offset];
        yt = pr.cap > 0 ? pr.cap * std::tanh(xt * pr.inv_cap) : xt;
      }
      yt_out[r] = yt;
      if (sm_out) sm_out[r] = rs.smooth;
    }
  });
}

void backward64(const CrossEntropyParams& p) {
  const Problem<double> pr(p);
  const auto* logits = static_cast<const double*>(p.logits);
  auto* grad = static_cast<double*>(p.grad);
  const auto* lse_in = static_cast<const double*>(p.lse);
  const auto* gloss = static_cast<const double*>(p.grad_loss);
  const auto* glse = static_cast<const double*>(p.grad_lse);
  const double rscale = pr.reduction_scale();
  const double* w_local = pr.weight ? pr.weight + p.class_offset : nullptr;
  const int64_t V = p.classes;
  parallel_for(p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = p.target[r];
      double* g = grad + r * p.grad_ld;
      if (t == p.ignore_index) {
        std::fill(g, g + V, 0.0);
        continue;
      }
      const double* x = logits + r * p.ld;
      const double lse = lse_in[r];
      const GradCoef<double> k =
          grad_coef(pr, gloss[r * p.grad_loss_stride] * rscale, glse ? glse[r] : 0.0, lse, pr.target_weight(t));
      const int64_t t_local = pr.valid(t) ? t - p.class_offset : -1;
      for (int64_t c = 0; c < V; ++c) {
        const double th = pr.cap > 0 ? std::tanh(x[c] * pr.inv_cap) : 0.0;
        const double y = pr.cap > 0 ? pr.cap * th : x[c];
        double gv = k.a * std::exp(y - lse);
        if (pr.eps > 0) gv -= k.b_smooth * (w_local ? w_local[c] : 1.0);
        if (c == t_local) gv -= k.b_target;
        g[c] = pr.cap > 0 ? gv * (1.0 - th * th) : gv;
      }
    }
  });
}

}  // namespace

void cross_entropy_forward(const CrossEntropyParams& p) {
  if (p.class_stride != 1) {
    switch (p.dtype) {
      case DType::f32: return forward_columns<float>(p);
      case DType::bf16: return forward_columns<bf16_t>(p);
      case DType::f16: return forward_columns<fp16_t>(p);
      case DType::f64: break;  // not taken: the binding keeps f64 in rows
    }
  }
  switch (p.dtype) {
    case DType::f32: return forward_vec<float>(p);
    case DType::bf16: return forward_vec<bf16_t>(p);
    case DType::f16: return forward_vec<fp16_t>(p);
    case DType::f64: return forward64(p);
  }
}

void cross_entropy_stats(const CrossEntropyParams& p) {
  switch (p.dtype) {
    case DType::f32: return stats_vec<float>(p);
    case DType::bf16: return stats_vec<bf16_t>(p);
    case DType::f16: return stats_vec<fp16_t>(p);
    case DType::f64: return stats64(p);
  }
}

void cross_entropy_backward(const CrossEntropyParams& p) {
  switch (p.dtype) {
    case DType::f32: return backward_vec<float>(p);
    case DType::bf16: return backward_vec<bf16_t>(p);
    case DType::f16: return backward_vec<fp16_t>(p);
    case DType::f64: return backward64(p);
  }
}

}  // namespace fusedops::cpu::FUSEDOPS_CPU_ISA
