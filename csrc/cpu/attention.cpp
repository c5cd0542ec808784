// Fused attention on the CPU: forward (o, lse) and backward (dq, dk, dv) with the semantics of
// kernels/attention.h (softcap, ALiBi, boolean/additive masks, sliding windows in either causal
// alignment, GQA, varlen, Philox dropout), for fp32, bf16 and fp16 (computed in fp32) and fp64.
//
// Algorithm: FlashAttention-2 (Dao, 2023, arXiv:2307.08691) restated for a CPU core.
//  * Forward: one task per (batch, query head, block of kFwdBr query rows), over blocks of kFwdBc keys.
//    The block's Q is packed transposed (head_dim × rows, pre-scaled by scale·log2 e) so the score tile
//    comes out as Sᵀ (keys × rows) with SIMD lanes running over query rows: the online-softmax
//    statistics (running max, sum) of kLanes rows live in one vector, with no horizontal reductions.
//    Scores are kept in log2 units so the softmax runs on a lean exp2 (as FlashAttention does on GPUs);
//    O accumulates in fp32 and its rescale by 2^(m_old - m_new) is folded into the P·V microkernel's
//    accumulator load.
//  * Backward: one task per (batch, kv head, range of key blocks), looping over every query head of the
//    GQA group and every query block that can see the key block. P is recomputed from the saved lse;
//    dK and dV accumulate in fp32 per key block, dQ in an fp32 buffer owned by the task (no atomics).
//    With few (batch, kv head) pairs the key blocks are split into a shape-determined number of chunks
//    whose dQ partials are summed in a fixed order afterwards, so results are bitwise identical run to
//    run and independent of the thread count (the `deterministic` flag is moot here).
//  * The matmul-like parts all go through one register-blocked microkernel (6 rows × 2 vectors of fp32
//    accumulators, a broadcast-FMA inner loop over vec.h vectors) with an optional epilogue, which
//    computes P = 2^(s - lse) and dS = P ∘ (dP - D) on the accumulators before they are stored. bf16
//    and fp16 tiles are converted to fp32 when packed; fp32 rows are read in place where the layout allows.
//  * Key blocks wholly outside a causal/sliding window are skipped (the causal case costs about half the
//    full one); blocks wholly inside it skip the per-element window test.
//  * Peak extra memory is O(tile) per thread plus, in the backward, an fp32 dQ accumulator per task
//    (group heads × rows × head_dim) and one float per query row (rowsum(dO∘O)): never O(L·S).
//  * Threads: fusedops::parallel_for (torch's intra-op pool). float64 takes a simple scalar path (it exists for gradcheck, not for speed).
// Limits: any head dim; sequence lengths below 2^31; scale, softcap and dropout_p arrive as float32.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "../common/parallel.h"
#include "../kernels/attention.h"
#include "vec.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports the _mm512_undefined_* operands inside vec.h's fp16 conversions as uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace fusedops::cpu::FUSEDOPS_CPU_ISA {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kFwdBr = 64;  // query rows per forward task
constexpr int64_t kFwdBc = 128;  // keys per forward step
constexpr int64_t kBwdBr = 64;  // query rows per backward step
constexpr int64_t kBwdBc = 64;  // keys per backward block
constexpr int64_t kBwdTargetTasks = 8;  // split key blocks until (batch, kv head, chunk) tasks reach this

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t div_up(int64_t x, int64_t m) { return (x + m - 1) / m; }

// ---- scratch memory ---------------------------------------------------------------------------------
struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// A 64-byte aligned float buffer that only grows.
class Buffer {
 public:
  float* get(int64_t n) {
    if (n > capacity_) {
      const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 16), 16)) * sizeof(float);
      void* p = std::aligned_alloc(64, bytes);
      if (p == nullptr) throw std::bad_alloc();
      data_.reset(static_cast<float*>(p));
      capacity_ = static_cast<int64_t>(bytes / sizeof(float));
    }
    return data_.get();
  }

 private:
  std::unique_ptr<float, FreeDeleter> data_;
  int64_t capacity_ = 0;
};

// ---- threads ------------------------------------------------------------------------------------------
// Calls body(worker) for worker in [0, workers), one worker per thread of torch's pool.
template <class F>
void on_workers(int64_t workers, F&& body) {
  if (workers <= 1) {
    body(0);
    return;
  }
  parallel_for(workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) body(w);
  });
}

// f(begin, end) over [0, n) in contiguous chunks of at least `grain`, spread over the threads.
template <class F>
void parallel_range(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(parallel_threads(), div_up(n, std::max<int64_t>(1, grain))));
  const int64_t per = div_up(n, chunks);
  on_workers(chunks, [&](int64_t w) {
    const int64_t begin = w * per, end = std::min(n, begin + per);
    if (begin < end) f(begin, end);
  });
}

// Runs task(t, scratch) for t in [0, n), handing tasks out dynamically (causal and windowed tasks differ
// in cost); each worker gets its own Scratch. Results never depend on which worker ran a task.
template <class Scratch, class F>
void run_tasks(int64_t n, F&& task) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(parallel_threads(), n));
  on_workers(workers, [&](int64_t) {
    Scratch scratch;
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) task(t, scratch);
  });
}

// ---- vector helpers -------------------------------------------------------------------------------------
inline vint iota_int() {
  vint v;
  for (int i = 0; i < kLanes; ++i) v[i] = i;
  return v;
}

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

// ---- the microkernel ------------------------------------------------------------------------------------
// An epilogue maps each finished accumulator vector (row r, columns col..col+kLanes-1 of C) to what is
// stored, so elementwise steps that follow a matmul need no extra pass over C.
struct NoEpilogue {
  vfloat operator()(int64_t, int64_t, vfloat acc) const { return acc; }
};

// C[m][n] = epi((accumulate ? row_scale[m]·C[m][n] : 0) + sum_k A(m, k)·B[k][n]) for m < MR,
// n < NV·kLanes, with A(m, k) = a[m·am + k·ak] (so A may be read transposed) and B, C row-major.
// (row0, col0) is the block's position in C, for the epilogue.
template <int MR, int NV, class Epi>
inline void micro(int64_t K, const float* __restrict a, int64_t am, int64_t ak, const float* __restrict b, int64_t ldb,
                  float* __restrict c, int64_t ldc, const float* row_scale, bool accumulate, const Epi& epi,
                  int64_t row0, int64_t col0) {
  vfloat acc[MR][NV];
  if (accumulate) {
    for (int m = 0; m < MR; ++m) {
      const vfloat s = vbroadcast(row_scale ? row_scale[m] : 1.0f);
      for (int v = 0; v < NV; ++v) acc[m][v] = load(c + m * ldc + v * kLanes) * s;
    }
  } else {
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = vbroadcast(0.0f);
  }
  const float* ap[MR];
  for (int m = 0; m < MR; ++m) ap[m] = a + m * am;
  for (int64_t k = 0; k < K; ++k) {
    vfloat bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(b + v * kLanes);
    b += ldb;
    for (int m = 0; m < MR; ++m) {
      const vfloat x = vbroadcast(*ap[m]);
      ap[m] += ak;
      for (int v = 0; v < NV; ++v) acc[m][v] = x * bv[v] + acc[m][v];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) store(c + m * ldc + v * kLanes, epi(row0 + m, col0 + v * kLanes, acc[m][v]));
}

template <int NV, class Epi>
inline void micro_rows(int mr, int64_t K, const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb, float* c,
                       int64_t ldc, const float* rs, bool acc, const Epi& epi, int64_t row0, int64_t col0) {
  switch (mr) {
    case 6: micro<6, NV>(K, a, am, ak, b, ldb, c, ldc, rs, acc, epi, row0, col0); break;
    case 5: micro<5, NV>(K, a, am, ak, b, ldb, c, ldc, rs, acc, epi, row0, col0); break;
    case 4: micro<4, NV>(K, a, am, ak, b, ldb, c, ldc, rs, acc, epi, row0, col0); break;
    case 3: micro<3, NV>(K, a, am, ak, b, ldb, c, ldc, rs, acc, epi, row0, col0); break;
    case 2: micro<2, NV>(K, a, am, ak, b, ldb, c, ldc, rs, acc, epi, row0, col0); break;
    default: micro<1, NV>(K, a, am, ak, b, ldb, c, ldc, rs, acc, epi, row0, col0); break;
  }
}

// C (M × N) = epi([row_scale ∘ C +] A (M × K) · B (K × N)); N a multiple of kLanes (operands are padded).
template <class Epi = NoEpilogue>
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb, float* c,
          int64_t ldc, const float* row_scale, bool accumulate, const Epi& epi = Epi()) {
  const int64_t nvec = N / kLanes;
  for (int64_t v0 = 0; v0 < nvec; v0 += 2) {
    const bool two = nvec - v0 >= 2;
    for (int64_t m0 = 0; m0 < M; m0 += 6) {
      const int mr = static_cast<int>(std::min<int64_t>(6, M - m0));
      const float* rs = row_scale ? row_scale + m0 : nullptr;
      float* cb = c + m0 * ldc + v0 * kLanes;
      if (two)
        micro_rows<2>(mr, K, a + m0 * am, am, ak, b + v0 * kLanes, ldb, cb, ldc, rs, accumulate, epi, m0, v0 * kLanes);
      else
        micro_rows<1>(mr, K, a + m0 * am, am, ak, b + v0 * kLanes, ldb, cb, ldc, rs, accumulate, epi, m0, v0 * kLanes);
    }
  }
}

// ---- conversions ---------------------------------------------------------------------------------------
// dst[0, np) = mul · src[0, n) followed by zeros; nothing at or past dst + np is written (rows packed
// back to back, np = n, end exactly at their buffer's end).
template <class T>
inline void load_row(const T* src, int64_t n, float mul, float* dst, int64_t np) {
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) store(dst + c, load(src + c) * mul);
  if (c < n) {
    const vfloat tail = load_partial(src + c, static_cast<int>(n - c)) * mul;
    if (c + kLanes <= np)
      store(dst + c, tail);
    else
      store_partial(dst + c, tail, static_cast<int>(n - c));
    c += kLanes;
  }
  for (; c < np; c += kLanes) store(dst + c, vbroadcast(0.0f));
}

// dst[0, n) = mul · src[0, n).
template <class T>
inline void store_row(const float* src, int64_t n, float mul, T* dst) {
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) store(dst + c, load(src + c) * mul);
  if (c < n) store_partial(dst + c, load(src + c) * mul, static_cast<int>(n - c));
}

// dst[e·ld + r] = mul · src_r[e] for r < rows, e < n; columns rows..ld-1 zero. `line` holds one padded row.
template <class T>
inline void pack_transposed(const T* src, int64_t src_ld, int64_t rows, int64_t n, float mul, float* dst, int64_t ld,
                            float* line) {
  const int64_t np = round_up(n, kLanes);
  for (int64_t e = 0; e < n; ++e) std::memset(dst + e * ld + rows, 0, sizeof(float) * (ld - rows));
  for (int64_t r = 0; r < rows; ++r) {
    load_row(src + r * src_ld, n, mul, line, np);
    for (int64_t e = 0; e < n; ++e) dst[e * ld + r] = line[e];
  }
}

// ---- Philox dropout ----------------------------------------------------------------------------------
inline void mulhilo(uint32_t m, vuint a, vuint& hi, vuint& lo) {
#if defined(__AVX512F__)
  // GCC turns the zero-extended 64-bit product into vpmuludq (its _mm512_mul_epu32 warns spuriously).
  typedef uint64_t vu64 __attribute__((vector_size(2 * kVecBytes)));
  const vu64 prod = __builtin_convertvector(a, vu64) * static_cast<uint64_t>(m);
  lo = __builtin_convertvector(prod, vuint);
  hi = __builtin_convertvector(prod >> 32, vuint);
#elif defined(__AVX2__)
  __m256i av;
  std::memcpy(&av, &a, sizeof av);
  const __m256i mv = _mm256_set1_epi32(static_cast<int>(m));
  const __m256i even = _mm256_mul_epu32(av, mv);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(av, 32), mv);
  const __m256i l = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  const __m256i h = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  std::memcpy(&lo, &l, sizeof lo);
  std::memcpy(&hi, &h, sizeof hi);
#else
  for (int i = 0; i < kLanes; ++i) {
    const uint64_t p = static_cast<uint64_t>(a[i]) * m;
    lo[i] = static_cast<uint32_t>(p);
    hi[i] = static_cast<uint32_t>(p >> 32);
  }
#endif
}

// f[jj] = keep ? keep_scale : 0 for keys j0 + jj (jj < n) of one query row's Philox stream; the same
// numbers as common/philox.h's philox_group, kLanes groups of 4 keys at a time.
void dropout_factors(uint64_t seed, uint64_t stream, int64_t j0, int64_t n, uint32_t threshold, float keep_scale,
                     float* f) {
  if (n <= 0) return;
  const int64_t g_first = j0 / 4, g_last = (j0 + n - 1) / 4;
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t g0 = g_first; g0 <= g_last; g0 += kLanes) {
    vuint c0, c1;
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t g = static_cast<uint64_t>(g0 + l);
      c0[l] = static_cast<uint32_t>(g);
      c1[l] = static_cast<uint32_t>(g >> 32);
    }
    vuint c2 = vuint{} + static_cast<uint32_t>(stream), c3 = vuint{} + static_cast<uint32_t>(stream >> 32);
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      vuint hi0, lo0, hi1, lo1;
      mulhilo(0xD2511F53u, c0, hi0, lo0);
      mulhilo(0xCD9E8D57u, c2, hi1, lo1);
      const vuint n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
      c0 = n0;
      c1 = lo1;
      c2 = n2;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const vuint* x[4] = {&c0, &c1, &c2, &c3};
    for (int l = 0; l < kLanes; ++l) {
      const int64_t jbase = 4 * (g0 + l) - j0;
      for (int c = 0; c < 4; ++c) {
        const int64_t jj = jbase + c;
        if (jj >= 0 && jj < n) f[jj] = (*x[c])[l] >= threshold ? keep_scale : 0.0f;
      }
    }
  }
}

// ---- problem geometry ------------------------------------------------------------------------------------
// One (batch, head)'s view: sequence lengths, packed-row offsets (varlen), score modifiers.
struct Seq {
  int64_t len_q = 0, len_kv = 0, row_q = 0, row_k = 0, shift = 0;
};

inline Seq sequence(const AttentionForwardParams& p, int64_t b) {
  Seq s;
  if (p.cu_seqlens_q != nullptr) {
    s.row_q = p.cu_seqlens_q[b];
    s.row_k = p.cu_seqlens_k[b];
    s.len_q = p.cu_seqlens_q[b + 1] - s.row_q;
    s.len_kv = p.cu_seqlens_k[b + 1] - s.row_k;
  } else {
    s.len_q = p.len_q;
    s.len_kv = p.len_kv;
  }
  s.shift = p.bottom_right ? s.len_kv - s.len_q : 0;
  return s;
}

template <class T>
inline T* at3(const void* base, const int64_t (&s)[3], int64_t b, int64_t h, int64_t row) {
  return const_cast<T*>(static_cast<const T*>(base)) + b * s[0] + h * s[1] + row * s[2];
}

// Visible keys of query row i: [key_lo(i), key_hi(i)); visible queries of key j: [query_lo(j), query_hi(j)).
struct Window {
  int64_t left = -1, right = -1, shift = 0, len_q = 0, len_kv = 0;
  int64_t key_lo(int64_t i) const { return left < 0 ? 0 : std::max<int64_t>(0, i + shift - left); }
  int64_t key_hi(int64_t i) const { return right < 0 ? len_kv : std::min<int64_t>(len_kv, i + shift + right + 1); }
  int64_t query_lo(int64_t j) const { return right < 0 ? 0 : std::max<int64_t>(0, j - shift - right); }
  int64_t query_hi(int64_t j) const { return left < 0 ? len_q : std::min<int64_t>(len_q, j - shift + left + 1); }
  // Whether some (i, j) of the tile lies outside the window (so the per-element test is needed).
  bool cuts(int64_t i0, int64_t ni, int64_t j0, int64_t nj) const {
    const int64_t dmin = j0 - (i0 + ni - 1) - shift, dmax = (j0 + nj - 1) - i0 - shift;
    return (left >= 0 && dmin < -left) || (right >= 0 && dmax > right);
  }
};

inline Window window_of(const AttentionForwardParams& p, const Seq& s) {
  return Window{p.window_left, p.window_right, s.shift, s.len_q, s.len_kv};
}

// Everything that turns scale·q·k into the final score, for one (batch, head).
struct Mods {
  float softcap = 0, inv_softcap = 0;
  bool alibi = false;
  float slope = 0;
  AttentionMask mask_kind = AttentionMask::none;
  DType mask_dtype = DType::f32;
  const unsigned char* mask = nullptr;  // at (b, h, 0, 0)
  int64_t mask_si = 0, mask_sj = 0;     // in bytes
  Window win;

  bool any_elementwise() const { return softcap > 0 || alibi || mask_kind != AttentionMask::none; }

  float mask_value(int64_t i, int64_t j) const {
    const unsigned char* ptr = mask + i * mask_si + j * mask_sj;
    switch (mask_dtype) {
      case DType::f16: {
        fp16_t h;
        std::memcpy(&h, ptr, 2);
        return to_float(h);
      }
      case DType::bf16: {
        bf16_t h;
        std::memcpy(&h, ptr, 2);
        return to_float(h);
      }
      case DType::f64: {
        double d;
        std::memcpy(&d, ptr, 8);
        return static_cast<float>(d);
      }
      default: {
        float f;
        std::memcpy(&f, ptr, 4);
        return f;
      }
    }
  }
};

Mods mods_of(const AttentionForwardParams& p, const Seq& s, int64_t b, int64_t h) {
  Mods m;
  m.softcap = p.softcap;
  m.inv_softcap = p.softcap > 0 ? 1.0f / p.softcap : 0.0f;
  if (p.alibi_slopes != nullptr) {
    m.alibi = true;
    m.slope = p.alibi_slopes[b * p.alibi_batch_stride + h];
  }
  m.mask_kind = p.mask_kind;
  if (p.mask_kind != AttentionMask::none) {
    const int64_t es = p.mask_kind == AttentionMask::boolean ? 1 : static_cast<int64_t>(dtype_size(p.mask_dtype));
    m.mask_dtype = p.mask_dtype;
    m.mask = static_cast<const unsigned char*>(p.mask) + (b * p.mask_stride[0] + h * p.mask_stride[1]) * es;
    m.mask_si = p.mask_stride[2] * es;
    m.mask_sj = p.mask_stride[3] * es;
  }
  m.win = window_of(p, s);
  return m;
}

// Turns a tile of scale·q·k (rows i0.., keys j0..) into final scores in place: softcap, ALiBi, additive
// mask, then -inf outside the window (if `window`) or where a boolean mask is false. Scores are held in
// units of `unit` (log2(e) when the caller works in the exp2 domain, else 1). The tile is s[o·ld + c], its
// lanes (c) running over query rows when `lanes_are_rows` (the forward's Sᵀ) or over keys (the backward's
// S); padded lanes beyond the valid count are processed too, never read back. With softcap, dsoft
// receives d(score)/d(scale·q·k) = 1 - tanh² in the same layout.
void apply_mods(float* s, int64_t ld, bool lanes_are_rows, int64_t i0, int64_t ni, int64_t j0, int64_t nj,
                const Mods& md, bool window, float unit, float* dsoft) {
  const int64_t n_outer = lanes_are_rows ? nj : ni, n_inner = lanes_are_rows ? ni : nj;
  const int64_t inner_p = round_up(n_inner, kLanes);
  const vint lane = iota_int();
  const int64_t wl = md.win.left, wr = md.win.right;
  const float cap = md.softcap * unit, inv_cap = md.softcap > 0 ? 1.0f / cap : 0.0f, slope = md.slope * unit;
  if (md.softcap > 0 || md.alibi || window) {
    for (int64_t o = 0; o < n_outer; ++o) {
      float* row = s + o * ld;
      // d = j - i - shift at lane 0 of this row; it falls by one per lane along rows, rises along keys.
      const int64_t d0 = lanes_are_rows ? (j0 + o) - i0 - md.win.shift : j0 - (i0 + o) - md.win.shift;
      for (int64_t c = 0; c < inner_p; c += kLanes) {
        vfloat x = load(row + c);
        const vint d = lanes_are_rows ? static_cast<int32_t>(d0 - c) - lane : static_cast<int32_t>(d0 + c) + lane;
        if (md.softcap > 0) {
          const vfloat t = vtanh(x * inv_cap);
          x = t * cap;
          if (dsoft != nullptr) store(dsoft + o * ld + c, 1.0f - t * t);
        }
        if (md.alibi) {
          const vint ad = d < 0 ? -d : d;
          x = x - __builtin_convertvector(ad, vfloat) * slope;
        }
        if (window) {
          vint visible = ~vint{};
          if (wl >= 0) visible &= d >= static_cast<int32_t>(-wl);
          if (wr >= 0) visible &= d <= static_cast<int32_t>(wr);
          x = visible ? x : vbroadcast(-kInf);
        }
        store(row + c, x);
      }
    }
  }
  if (md.mask_kind == AttentionMask::none) return;
  for (int64_t o = 0; o < n_outer; ++o) {
    float* row = s + o * ld;
    for (int64_t c = 0; c < n_inner; ++c) {
      const int64_t i = lanes_are_rows ? i0 + c : i0 + o, j = lanes_are_rows ? j0 + o : j0 + c;
      if (md.mask_kind == AttentionMask::boolean) {
        if (md.mask[i * md.mask_si + j * md.mask_sj] == 0) row[c] = -kInf;
      } else {
        row[c] += md.mask_value(i, j) * unit;
      }
    }
  }
}

// ---- forward, fp32 compute ---------------------------------------------------------------------------------
struct FwdScratch {
  Buffer qt, st, o, kbuf, vbuf, stats, drop, line;
  // K and V of one (batch, kv head) converted to fp32 (and V padded), kept while this worker's tasks stay
  // on that head (tasks are handed out head by head), so each is converted once per worker, not once per
  // query block.
  int64_t kv_b = -1, kv_g = -1;
};

struct FwdTask {
  int64_t b, h, i0, cost;
};

template <class T>
void forward_task(const AttentionForwardParams& p, const FwdTask& task, FwdScratch& w) {
  const int64_t b = task.b, h = task.h, i0 = task.i0;
  const Seq sq = sequence(p, b);
  const int64_t g = h / (p.heads_q / p.heads_kv);
  const int64_t E = p.head_dim, Ev = p.head_dim_v, Evp = round_up(Ev, kLanes);
  const int64_t rows = std::min(kFwdBr, sq.len_q - i0), Brp = round_up(rows, kLanes);
  const Mods md = mods_of(p, sq, b, h);
  const int64_t jlo = md.win.key_lo(i0), jhi = md.win.key_hi(i0 + rows - 1);

  float* m = w.stats.get(4 * Brp);
  float* l = m + Brp;
  float* alpha = l + Brp;
  float* inv_l = alpha + Brp;
  float* O = w.o.get(rows * Evp);
  for (int64_t c = 0; c < Brp; c += kLanes) {
    store(m + c, vbroadcast(-kInf));
    store(l + c, vbroadcast(0.0f));
  }
  std::memset(O, 0, sizeof(float) * rows * Evp);

  const bool dropout = p.dropout_p > 0;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const float keep_scale = dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
  const uint64_t stream0 = p.dropout_offset + static_cast<uint64_t>((b * p.heads_q + h) * p.len_q + i0);

  if (jlo < jhi) {
    float* QT = w.qt.get(E * Brp);
    // Scores in log2 units: the softmax then runs on exp2 (FlashAttention's trick), lse converts back.
    pack_transposed(at3<const T>(p.q, p.q_stride, b, h, sq.row_q + i0), p.q_stride[2], rows, E, p.scale * kLog2e, QT, Brp,
                    w.line.get(round_up(std::max(E, Ev), kLanes)));
    float* ST = w.st.get(kFwdBc * Brp);
    // fp32 rows with unit stride are used in place: K as the broadcast operand, V when no padding is needed.
    constexpr bool f32 = std::is_same<T, float>::value;
    const bool v_in_place = f32 && Ev % kLanes == 0;
    float* Kc = f32 ? nullptr : w.kbuf.get(sq.len_kv * E);
    float* Vc = v_in_place ? nullptr : w.vbuf.get(sq.len_kv * Evp);
    if (w.kv_b != b || w.kv_g != g) {
      const T* k0 = at3<const T>(p.k, p.k_stride, b, g, sq.row_k);
      const T* v0 = at3<const T>(p.v, p.v_stride, b, g, sq.row_k);
      for (int64_t j = 0; j < sq.len_kv; ++j) {
        if (!f32) load_row(k0 + j * p.k_stride[2], E, 1.0f, Kc + j * E, E);
        if (!v_in_place) load_row(v0 + j * p.v_stride[2], Ev, 1.0f, Vc + j * Evp, Evp);
      }
      w.kv_b = b;
      w.kv_g = g;
    }
    float* drop = dropout ? w.drop.get(kFwdBc) : nullptr;

    for (int64_t j0 = jlo; j0 < jhi; j0 += kFwdBc) {
      const int64_t cols = std::min(kFwdBc, jhi - j0);
      const T* kp = at3<const T>(p.k, p.k_stride, b, g, sq.row_k + j0);
      const float* A;
      int64_t lda;
      if constexpr (f32) {
        A = reinterpret_cast<const float*>(kp);
        lda = p.k_stride[2];
      } else {
        A = Kc + j0 * E;
        lda = E;
      }
      // Sᵀ (cols × rows) = K · (scale·Q)ᵀ
      gemm(cols, Brp, E, A, lda, 1, QT, Brp, ST, Brp, nullptr, false);
      const bool cut = md.win.cuts(i0, rows, j0, cols);
      if (md.any_elementwise() || cut) apply_mods(ST, Brp, true, i0, rows, j0, cols, md, cut, kLog2e, nullptr);

      // Online softmax, kLanes query rows per vector.
      // (Independent partial maxima and sums: one dependency chain would leave the loops latency-bound.)
      for (int64_t c = 0; c < Brp; c += kLanes) {
        const vfloat m_old = load(m + c);
        const float* col = ST + c;
        vfloat m0 = m_old, m1 = m_old, m2 = m_old, m3 = m_old;
        int64_t jj = 0;
        for (; jj + 4 <= cols; jj += 4) {
          m0 = vmax(load(col + jj * Brp), m0);
          m1 = vmax(load(col + (jj + 1) * Brp), m1);
          m2 = vmax(load(col + (jj + 2) * Brp), m2);
          m3 = vmax(load(col + (jj + 3) * Brp), m3);
        }
        for (; jj < cols; ++jj) m0 = vmax(load(col + jj * Brp), m0);
        const vfloat mx = vmax(vmax(m0, m1), vmax(m2, m3));
        const vfloat m_safe = mx == -kInf ? vbroadcast(0.0f) : mx;
        const vfloat a = vexp2_lean<true>(m_old - m_safe);
        vfloat s0 = vbroadcast(0.0f), s1 = vbroadcast(0.0f);
        for (jj = 0; jj + 2 <= cols; jj += 2) {
          const vfloat e0 = vexp2_lean<true>(load(col + jj * Brp) - m_safe);
          const vfloat e1 = vexp2_lean<true>(load(col + (jj + 1) * Brp) - m_safe);
          store(ST + jj * Brp + c, e0);
          store(ST + (jj + 1) * Brp + c, e1);
          s0 += e0;
          s1 += e1;
        }
        if (jj < cols) {
          const vfloat e0 = vexp2_lean<true>(load(col + jj * Brp) - m_safe);
          store(ST + jj * Brp + c, e0);
          s0 += e0;
        }
        store(m + c, mx);
        store(l + c, load(l + c) * a + (s0 + s1));
        store(alpha + c, a);
      }
      if (dropout) {
        for (int64_t ii = 0; ii < rows; ++ii) {
          dropout_factors(p.dropout_seed, stream0 + ii, j0, cols, threshold, keep_scale, drop);
          for (int64_t jj = 0; jj < cols; ++jj) ST[jj * Brp + ii] *= drop[jj];
        }
      }

      const float* B;
      int64_t ldb;
      const T* vp = at3<const T>(p.v, p.v_stride, b, g, sq.row_k + j0);
      if (v_in_place) {
        B = reinterpret_cast<const float*>(vp);
        ldb = p.v_stride[2];
      } else {
        B = Vc + j0 * Evp;
        ldb = Evp;
      }
      // O (rows × Ev) = alpha ∘ O + P · V, with P read from Sᵀ.
      gemm(rows, Evp, cols, ST, 1, Brp, B, ldb, O, Evp, alpha, true);
    }
  }

  float* lse = at3<float>(p.lse, p.lse_stride, b, h, sq.row_q + i0);
  for (int64_t ii = 0; ii < rows; ++ii) {
    const bool any = l[ii] > 0;
    inv_l[ii] = any ? 1.0f / l[ii] : 0.0f;
    lse[ii * p.lse_stride[2]] = any ? m[ii] * kLn2 + std::log(l[ii]) : -kInf;
    store_row(O + ii * Evp, Ev, inv_l[ii], at3<T>(p.o, p.o_stride, b, h, sq.row_q + i0 + ii));
  }
}

template <class T>
void forward_f32(const AttentionForwardParams& p) {
  // Head by head, so that consecutive tasks (on all threads) read the same K and V while they are in
  // cache; within a head the largest blocks (causal/windowed) first, so the small ones even out the end.
  std::vector<FwdTask> tasks;
  for (int64_t b = 0; b < p.batch; ++b) {
    const Seq sq = sequence(p, b);
    const Window win = window_of(p, sq);
    const size_t first = tasks.size();
    for (int64_t i0 = 0; i0 < sq.len_q; i0 += kFwdBr) {
      const int64_t rows = std::min(kFwdBr, sq.len_q - i0);
      tasks.push_back({b, 0, i0, rows * std::max<int64_t>(1, win.key_hi(i0 + rows - 1) - win.key_lo(i0))});
    }
    std::stable_sort(tasks.begin() + first, tasks.end(),
                     [](const FwdTask& x, const FwdTask& y) { return x.cost > y.cost; });
    const size_t blocks = tasks.size() - first;
    for (int64_t h = 1; h < p.heads_q; ++h)
      for (size_t t = 0; t < blocks; ++t) {
        FwdTask task = tasks[first + t];
        task.h = h;
        tasks.push_back(task);
      }
  }
  run_tasks<FwdScratch>(static_cast<int64_t>(tasks.size()),
                        [&](int64_t t, FwdScratch& w) { forward_task<T>(p, tasks[t], w); });
}

// ---- backward, fp32 compute --------------------------------------------------------------------------------
struct BwdScratch {
  Buffer kt, kr, vt, dk, dv, q, dout, s, pd, dp, dsoft, stats, drop, dq, line;
};

struct BwdTask {
  int64_t b, g, kt_begin, kt_end;
  float* dq_partial;  // this chunk's dQ partial (group × len_q × Ep), or nullptr: the task owns dQ
};

// Index of row i of (b, h) in the per-row float buffers (rowsum(dO∘O)).
inline int64_t row_index(const AttentionForwardParams& p, const Seq& sq, int64_t total_q, int64_t b, int64_t h,
                         int64_t i) {
  return p.cu_seqlens_q != nullptr ? h * total_q + sq.row_q + i : (b * p.heads_q + h) * p.len_q + i;
}

template <class T>
void backward_task(const AttentionBackwardParams& bp, const BwdTask& task, const float* Dsum, int64_t total_q,
                   BwdScratch& w) {
  const AttentionForwardParams& p = bp.fwd;
  const int64_t b = task.b, g = task.g, grp = p.heads_q / p.heads_kv;
  const Seq sq = sequence(p, b);
  const int64_t E = p.head_dim, Ev = p.head_dim_v, Ep = round_up(E, kLanes), Evp = round_up(Ev, kLanes);
  const int64_t Bcp = kBwdBc;  // a multiple of kLanes
  const float scale = p.scale;

  float* dQ = task.dq_partial != nullptr ? task.dq_partial : w.dq.get(grp * sq.len_q * Ep);
  std::memset(dQ, 0, sizeof(float) * grp * sq.len_q * Ep);

  float* KT = w.kt.get(E * Bcp);
  float* Kr = w.kr.get(kBwdBc * Ep);
  float* VT = w.vt.get(Ev * Bcp);
  float* dK = w.dk.get(kBwdBc * Ep);
  float* dV = w.dv.get(kBwdBc * Evp);
  float* Q = w.q.get(kBwdBr * Ep);
  float* dO = w.dout.get(kBwdBr * Evp);
  float* S = w.s.get(kBwdBr * Bcp);
  float* PD = w.pd.get(kBwdBr * Bcp);
  float* DP = w.dp.get(kBwdBr * Bcp);
  float* dsoft = p.softcap > 0 ? w.dsoft.get(kBwdBr * Bcp) : nullptr;
  float* lse_row = w.stats.get(2 * kBwdBr);
  float* D_row = lse_row + kBwdBr;
  float* line = w.line.get(round_up(std::max(E, Ev), kLanes));
  const bool dropout = p.dropout_p > 0;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const float keep_scale = dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
  // fp32 rows that need no padding are read in place (as matmul operands) instead of copied.
  constexpr bool f32 = std::is_same<T, float>::value;
  const bool q_in_place = f32 && E % kLanes == 0, k_in_place = q_in_place;
  const bool do_in_place = f32 && Ev % kLanes == 0;

  for (int64_t kt = task.kt_begin; kt < task.kt_end; ++kt) {
    const int64_t j0 = kt * kBwdBc, cols = std::min(kBwdBc, sq.len_kv - j0);
    const T* kp = at3<const T>(p.k, p.k_stride, b, g, sq.row_k + j0);
    const T* vp = at3<const T>(p.v, p.v_stride, b, g, sq.row_k + j0);
    pack_transposed(kp, p.k_stride[2], cols, E, 1.0f, KT, Bcp, line);
    pack_transposed(vp, p.v_stride[2], cols, Ev, 1.0f, VT, Bcp, line);
    const float* Kb = Kr;
    int64_t ldk = Ep;
    if (k_in_place) {
      Kb = reinterpret_cast<const float*>(kp);
      ldk = p.k_stride[2];
    } else {
      for (int64_t jj = 0; jj < cols; ++jj) load_row(kp + jj * p.k_stride[2], E, 1.0f, Kr + jj * Ep, Ep);
    }
    std::memset(dK, 0, sizeof(float) * cols * Ep);
    std::memset(dV, 0, sizeof(float) * cols * Evp);

    const Window win = window_of(p, sq);
    const int64_t ilo = win.query_lo(j0), ihi = win.query_hi(j0 + cols - 1);
    for (int64_t hh = 0; hh < grp; ++hh) {
      const int64_t h = g * grp + hh;
      const Mods md = mods_of(p, sq, b, h);
      const uint64_t stream_h = p.dropout_offset + static_cast<uint64_t>((b * p.heads_q + h) * p.len_q);
      float* dQh = dQ + hh * sq.len_q * Ep;
      for (int64_t i0 = ilo; i0 < ihi; i0 += kBwdBr) {
        const int64_t rows = std::min(kBwdBr, ihi - i0);
        const T* q_rows = at3<const T>(p.q, p.q_stride, b, h, sq.row_q + i0);
        const T* do_rows = at3<const T>(bp.dout, bp.dout_stride, b, h, sq.row_q + i0);
        const float* Qb = q_in_place ? reinterpret_cast<const float*>(q_rows) : Q;
        const float* dOb = do_in_place ? reinterpret_cast<const float*>(do_rows) : dO;
        const int64_t ldq = q_in_place ? p.q_stride[2] : Ep, lddo = do_in_place ? bp.dout_stride[2] : Evp;
        for (int64_t ii = 0; ii < rows; ++ii) {
          const int64_t row = sq.row_q + i0 + ii;
          if (!q_in_place) load_row(q_rows + ii * p.q_stride[2], E, 1.0f, Q + ii * Ep, Ep);
          if (!do_in_place) load_row(do_rows + ii * bp.dout_stride[2], Ev, 1.0f, dO + ii * Evp, Evp);
          const float lse = *at3<const float>(p.lse, p.lse_stride, b, h, row);
          lse_row[ii] = lse == -kInf ? kInf : lse * kLog2e;  // rows that saw no key: P = 0
          D_row[ii] = Dsum[row_index(p, sq, total_q, b, h, i0 + ii)];
        }
        // S (rows × keys) = Q · Kᵀ, then the scores (log2 units) and P = 2^(s - lse): in the matmul's
        // epilogue unless softcap/ALiBi/masks/the window must act on the scores first.
        const bool cut = win.cuts(i0, rows, j0, cols);
        const bool mods = md.any_elementwise() || cut;
        const float to_log2 = scale * kLog2e;
        if (mods) {
          gemm(rows, Bcp, E, Qb, ldq, 1, KT, Bcp, S, Bcp, nullptr, false,
               [&](int64_t, int64_t, vfloat acc) { return acc * to_log2; });
          apply_mods(S, Bcp, false, i0, rows, j0, cols, md, cut, kLog2e, dsoft);
          for (int64_t ii = 0; ii < rows; ++ii) {
            const vfloat ls = vbroadcast(lse_row[ii]);
            float* srow = S + ii * Bcp;
            for (int64_t c = 0; c < Bcp; c += kLanes) store(srow + c, vexp2_lean<true>(load(srow + c) - ls));
          }
        } else {
          gemm(rows, Bcp, E, Qb, ldq, 1, KT, Bcp, S, Bcp, nullptr, false, [&](int64_t r, int64_t, vfloat acc) {
            return vexp2_lean<true>(acc * to_log2 - vbroadcast(lse_row[r]));
          });
        }
        const float* Pd = S;
        if (dropout) {
          for (int64_t ii = 0; ii < rows; ++ii) {
            float* f = PD + ii * Bcp;
            for (int64_t c = cols; c < Bcp; ++c) f[c] = 0.0f;
            dropout_factors(p.dropout_seed, stream_h + i0 + ii, j0, cols, threshold, keep_scale, f);
          }
          Pd = PD;  // holds the factors until P∘f is formed below, after dP needs them
        }
        // dP (rows × keys) = dO · Vᵀ, and in its epilogue dS = P ∘ (dP ∘ f - D) [∘ softcap'] (and, with
        // dropout, P ∘ f over the factors, for dV).
        gemm(rows, Bcp, Ev, dOb, lddo, 1, VT, Bcp, DP, Bcp, nullptr, false, [&](int64_t r, int64_t c, vfloat dp) {
          const int64_t at = r * Bcp + c;
          const vfloat P = load(S + at);
          if (dropout) {
            const vfloat f = load(PD + at);
            dp = dp * f;
            store(PD + at, P * f);
          }
          vfloat ds = P * (dp - vbroadcast(D_row[r]));
          if (dsoft != nullptr) ds = ds * load(dsoft + at);
          return ds;
        });
        // dV (keys × Ev) += (P∘f)ᵀ · dO;  dK (keys × E) += dSᵀ · Q;  dQ (rows × E) += dS · K
        gemm(cols, Evp, rows, Pd, 1, Bcp, dOb, lddo, dV, Evp, nullptr, true);
        gemm(cols, Ep, rows, DP, 1, Bcp, Qb, ldq, dK, Ep, nullptr, true);
        gemm(rows, Ep, cols, DP, Bcp, 1, Kb, ldk, dQh + i0 * Ep, Ep, nullptr, true);
      }
    }
    for (int64_t jj = 0; jj < cols; ++jj) {
      store_row(dK + jj * Ep, E, scale, at3<T>(bp.dk, bp.dk_stride, b, g, sq.row_k + j0 + jj));
      store_row(dV + jj * Evp, Ev, 1.0f, at3<T>(bp.dv, bp.dv_stride, b, g, sq.row_k + j0 + jj));
    }
  }
  if (task.dq_partial == nullptr) {
    for (int64_t hh = 0; hh < grp; ++hh)
      for (int64_t i = 0; i < sq.len_q; ++i)
        store_row(dQ + (hh * sq.len_q + i) * Ep, E, scale, at3<T>(bp.dq, bp.dq_stride, b, g * grp + hh, sq.row_q + i));
  }
}

template <class T>
void backward_f32(const AttentionBackwardParams& bp) {
  const AttentionForwardParams& p = bp.fwd;
  const int64_t grp = p.heads_q / p.heads_kv, E = p.head_dim, Ev = p.head_dim_v, Ep = round_up(E, kLanes);
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t total_q = varlen ? p.cu_seqlens_q[p.batch] : p.batch * p.len_q;

  // rowsum(dO ∘ O) per query row.
  std::vector<float> Dsum(static_cast<size_t>(varlen ? p.heads_q * total_q : p.batch * p.heads_q * p.len_q));
  parallel_range(p.batch * p.heads_q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
      const Seq sq = sequence(p, b);
      for (int64_t i = 0; i < sq.len_q; ++i) {
        const T* o = at3<const T>(p.o, p.o_stride, b, h, sq.row_q + i);
        const T* d = at3<const T>(bp.dout, bp.dout_stride, b, h, sq.row_q + i);
        vfloat acc = vbroadcast(0.0f);
        int64_t c = 0;
        for (; c + kLanes <= Ev; c += kLanes) acc += load(o + c) * load(d + c);
        if (c < Ev) acc += load_partial(o + c, static_cast<int>(Ev - c)) * load_partial(d + c, static_cast<int>(Ev - c));
        Dsum[row_index(p, sq, total_q, b, h, i)] = hsum(acc);
      }
    }
  });

  // Plan: (batch, kv head) pairs, each split into `chunks` ranges of key blocks of about equal work.
  int64_t pairs = p.batch * p.heads_kv;
  const int64_t chunks_wanted = std::max<int64_t>(1, div_up(kBwdTargetTasks, std::max<int64_t>(1, pairs)));
  std::vector<BwdTask> tasks;
  struct Partial {
    int64_t b, g, first, count;
    float* data;
  };
  std::vector<Partial> partials;
  std::vector<int64_t> partial_offsets;
  int64_t partial_floats = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const Seq sq = sequence(p, b);
    const Window win = window_of(p, sq);
    const int64_t nkt = div_up(sq.len_kv, kBwdBc);
    const int64_t chunks = std::max<int64_t>(1, std::min(chunks_wanted, nkt));
    std::vector<int64_t> bounds{0};
    if (chunks > 1) {
      std::vector<int64_t> cost(nkt);
      int64_t total = 0;
      for (int64_t kt = 0; kt < nkt; ++kt) {
        const int64_t j0 = kt * kBwdBc, j1 = std::min(sq.len_kv, j0 + kBwdBc);
        cost[kt] = 1 + std::max<int64_t>(0, win.query_hi(j1 - 1) - win.query_lo(j0));
        total += cost[kt];
      }
      int64_t acc = 0;
      for (int64_t kt = 0; kt < nkt && static_cast<int64_t>(bounds.size()) < chunks; ++kt) {
        acc += cost[kt];
        if (acc * chunks >= total * static_cast<int64_t>(bounds.size()) && kt + 1 < nkt) bounds.push_back(kt + 1);
      }
    }
    bounds.push_back(nkt);
    const int64_t nchunks = static_cast<int64_t>(bounds.size()) - 1;
    for (int64_t g = 0; g < p.heads_kv; ++g) {
      if (nchunks > 1) {
        partials.push_back({b, g, static_cast<int64_t>(tasks.size()), nchunks, nullptr});
        for (int64_t c = 0; c < nchunks; ++c) {
          partial_offsets.push_back(partial_floats);
          partial_floats += grp * sq.len_q * Ep;
          tasks.push_back({b, g, bounds[c], bounds[c + 1], nullptr});
        }
      } else {
        partial_offsets.push_back(-1);
        tasks.push_back({b, g, 0, nkt, nullptr});
      }
    }
  }
  std::unique_ptr<float, FreeDeleter> partial_mem;
  if (partial_floats > 0) {
    void* mem = std::aligned_alloc(64, static_cast<size_t>(round_up(partial_floats, 16)) * sizeof(float));
    if (mem == nullptr) throw std::bad_alloc();
    partial_mem.reset(static_cast<float*>(mem));
    for (size_t t = 0; t < tasks.size(); ++t)
      if (partial_offsets[t] >= 0) tasks[t].dq_partial = partial_mem.get() + partial_offsets[t];
  }
  run_tasks<BwdScratch>(static_cast<int64_t>(tasks.size()),
                        [&](int64_t t, BwdScratch& w) { backward_task<T>(bp, tasks[t], Dsum.data(), total_q, w); });

  // dQ of split pairs: the chunks' partials summed in chunk order.
  for (const Partial& part : partials) {
    const Seq sq = sequence(p, part.b);
    parallel_range(grp * sq.len_q, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(static_cast<size_t>(Ep));
      for (int64_t r = begin; r < end; ++r) {
        const int64_t hh = r / sq.len_q, i = r % sq.len_q;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t c = 0; c < part.count; ++c) {
          const float* src = tasks[part.first + c].dq_partial + r * Ep;
          for (int64_t e = 0; e < Ep; e += kLanes) store(acc.data() + e, load(acc.data() + e) + load(src + e));
        }
        store_row(acc.data(), E, p.scale, at3<T>(bp.dq, bp.dq_stride, part.b, part.g * grp + hh, sq.row_q + i));
      }
    });
  }
}

// ---- float64: a plain scalar path ------------------------------------------------------------------------------
// Score of (i, j) from raw = scale·q·k, -inf when not visible; *dsoft = d score / d raw.
double score_f64(const AttentionForwardParams& p, const Mods& md, int64_t i, int64_t j, double raw, double* dsoft) {
  const int64_t d = j - i - md.win.shift;
  if ((md.win.left >= 0 && d < -md.win.left) || (md.win.right >= 0 && d > md.win.right))
    return -std::numeric_limits<double>::infinity();
  double s = raw;
  *dsoft = 1.0;
  if (p.softcap > 0) {
    const double t = std::tanh(raw / static_cast<double>(p.softcap));
    s = p.softcap * t;
    *dsoft = 1.0 - t * t;
  }
  if (md.alibi) s -= static_cast<double>(md.slope) * static_cast<double>(d < 0 ? -d : d);
  if (md.mask_kind == AttentionMask::boolean) {
    if (md.mask[i * md.mask_si + j * md.mask_sj] == 0) return -std::numeric_limits<double>::infinity();
  } else if (md.mask_kind == AttentionMask::additive) {
    const unsigned char* ptr = md.mask + i * md.mask_si + j * md.mask_sj;
    double m;
    if (md.mask_dtype == DType::f64) {
      std::memcpy(&m, ptr, 8);
    } else {
      m = md.mask_value(i, j);
    }
    s += m;
  }
  return s;
}

double dot_f64(const double* a, const double* b, int64_t n) {
  double s = 0;
  for (int64_t e = 0; e < n; ++e) s += a[e] * b[e];
  return s;
}

// Dropout factor of (b, h, i, j) (f64 path: one Philox call per element group, scalar).
double dropout_factor_f64(const AttentionForwardParams& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (p.dropout_p <= 0) return 1.0;
  const uint64_t stream = p.dropout_offset + static_cast<uint64_t>((b * p.heads_q + h) * p.len_q + i);
  const Philox4 r = philox_group(p.dropout_seed, stream, static_cast<uint64_t>(j / 4));
  return r.x[j % 4] >= dropout_threshold(p.dropout_p) ? 1.0 / (1.0 - static_cast<double>(p.dropout_p)) : 0.0;
}

void forward_f64(const AttentionForwardParams& p) {
  const int64_t E = p.head_dim, Ev = p.head_dim_v, grp = p.heads_q / p.heads_kv;
  parallel_range(p.batch * p.heads_q, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> s, acc(static_cast<size_t>(Ev));
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads_q, h = bh % p.heads_q, g = h / grp;
      const Seq sq = sequence(p, b);
      const Mods md = mods_of(p, sq, b, h);
      s.resize(static_cast<size_t>(sq.len_kv));
      for (int64_t i = 0; i < sq.len_q; ++i) {
        const double* q = at3<const double>(p.q, p.q_stride, b, h, sq.row_q + i);
        double mx = -std::numeric_limits<double>::infinity(), ds;
        for (int64_t j = 0; j < sq.len_kv; ++j) {
          const double* k = at3<const double>(p.k, p.k_stride, b, g, sq.row_k + j);
          s[j] = score_f64(p, md, i, j, p.scale * dot_f64(q, k, E), &ds);
          mx = std::max(mx, s[j]);
        }
        double l = 0;
        std::fill(acc.begin(), acc.end(), 0.0);
        if (mx != -std::numeric_limits<double>::infinity()) {
          for (int64_t j = 0; j < sq.len_kv; ++j) {
            const double e = std::exp(s[j] - mx);
            l += e;
            const double pe = e * dropout_factor_f64(p, b, h, i, j);
            if (pe == 0) continue;
            const double* v = at3<const double>(p.v, p.v_stride, b, g, sq.row_k + j);
            for (int64_t c = 0; c < Ev; ++c) acc[c] += pe * v[c];
          }
        }
        double* o = at3<double>(p.o, p.o_stride, b, h, sq.row_q + i);
        for (int64_t c = 0; c < Ev; ++c) o[c] = l > 0 ? acc[c] / l : 0.0;
        *at3<double>(p.lse, p.lse_stride, b, h, sq.row_q + i) =
            l > 0 ? mx + std::log(l) : -std::numeric_limits<double>::infinity();
      }
    }
  });
}

void backward_f64(const AttentionBackwardParams& bp) {
  const AttentionForwardParams& p = bp.fwd;
  const int64_t E = p.head_dim, Ev = p.head_dim_v, grp = p.heads_q / p.heads_kv;
  parallel_range(p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> dk, dv, dq(static_cast<size_t>(E));
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / p.heads_kv, g = bg % p.heads_kv;
      const Seq sq = sequence(p, b);
      dk.assign(static_cast<size_t>(sq.len_kv * E), 0.0);
      dv.assign(static_cast<size_t>(sq.len_kv * Ev), 0.0);
      for (int64_t hh = 0; hh < grp; ++hh) {
        const int64_t h = g * grp + hh;
        const Mods md = mods_of(p, sq, b, h);
        for (int64_t i = 0; i < sq.len_q; ++i) {
          const int64_t row = sq.row_q + i;
          const double* q = at3<const double>(p.q, p.q_stride, b, h, row);
          const double* o = at3<const double>(p.o, p.o_stride, b, h, row);
          const double* dout = at3<const double>(bp.dout, bp.dout_stride, b, h, row);
          const double lse = *at3<const double>(p.lse, p.lse_stride, b, h, row);
          const double D = dot_f64(dout, o, Ev);
          std::fill(dq.begin(), dq.end(), 0.0);
          if (lse != -std::numeric_limits<double>::infinity()) {
            for (int64_t j = 0; j < sq.len_kv; ++j) {
              const double* k = at3<const double>(p.k, p.k_stride, b, g, sq.row_k + j);
              const double* v = at3<const double>(p.v, p.v_stride, b, g, sq.row_k + j);
              double dsoft;
              const double s = score_f64(p, md, i, j, p.scale * dot_f64(q, k, E), &dsoft);
              const double P = std::exp(s - lse);
              if (P == 0) continue;
              const double f = dropout_factor_f64(p, b, h, i, j);
              const double ds = P * (f * dot_f64(dout, v, Ev) - D) * dsoft * p.scale;
              for (int64_t c = 0; c < Ev; ++c) dv[j * Ev + c] += P * f * dout[c];
              for (int64_t c = 0; c < E; ++c) {
                dq[c] += ds * k[c];
                dk[j * E + c] += ds * q[c];
              }
            }
          }
          double* dqo = at3<double>(bp.dq, bp.dq_stride, b, h, row);
          for (int64_t c = 0; c < E; ++c) dqo[c] = dq[c];
        }
      }
      for (int64_t j = 0; j < sq.len_kv; ++j) {
        double* dko = at3<double>(bp.dk, bp.dk_stride, b, g, sq.row_k + j);
        double* dvo = at3<double>(bp.dv, bp.dv_stride, b, g, sq.row_k + j);
        for (int64_t c = 0; c < E; ++c) dko[c] = dk[j * E + c];
        for (int64_t c = 0; c < Ev; ++c) dvo[c] = dv[j * Ev + c];
      }
    }
  });
}

void check_params(const AttentionForwardParams& p) {
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0)
    throw std::invalid_argument("fusedops attention (cpu): heads_q must be a multiple of heads_kv");
  if (p.head_dim <= 0 || p.head_dim_v <= 0)
    throw std::invalid_argument("fusedops attention (cpu): head dims must be positive");
  if (p.len_q > INT32_MAX || p.len_kv > INT32_MAX)
    throw std::invalid_argument("fusedops attention (cpu): sequence lengths must be below 2^31");
}

}  // namespace

void attention_forward(const AttentionForwardParams& p) {
  check_params(p);
  switch (p.dtype) {
    case DType::f32: forward_f32<float>(p); break;
    case DType::bf16: forward_f32<bf16_t>(p); break;
    case DType::f16: forward_f32<fp16_t>(p); break;
    case DType::f64: forward_f64(p); break;
  }
}

void attention_backward(const AttentionBackwardParams& p) {
  check_params(p.fwd);
  switch (p.fwd.dtype) {
    case DType::f32: backward_f32<float>(p); break;
    case DType::bf16: backward_f32<bf16_t>(p); break;
    case DType::f16: backward_f32<fp16_t>(p); break;
    case DType::f64: backward_f64(p); break;
  }
}

}  // namespace fusedops::cpu::FUSEDOPS_CPU_ISA
