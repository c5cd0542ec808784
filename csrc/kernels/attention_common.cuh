// Pieces shared by the attention forward (attention_fwd.cu) and backward (attention_bwd.cu) kernels:
// the kernel-side argument block, the per-(batch, head) view of a sequence, the score modifiers of
// attention.h (scale, softcap, ALiBi, masks, windows, dropout), tile copies between global and shared
// memory, and the warp-level matrix products on which every kernel is built.
//
// The warp products all use the accumulator layout of mma.sync.m16n8k16 (a warp owns 16 rows; lane
// (g = lane / 4, t = lane % 4) holds rows g and g + 8, columns 2t and 2t + 1 of every 8-wide n-tile),
// whatever the element type: fp16/bf16 run on tensor cores (ldmatrix + mma.sync), fp32 runs the same
// products with FMAs from shared memory. So the kernels' masking, softmax and gradient code is written
// once, for one register layout, and the fp32 path is a slower but exact sibling of the fast one.
#pragma once

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "../simt/simt.cuh"
#include "attention.h"
#include "common.cuh"

#if FUSEDOPS_EMULATED
#define FUSEDOPS_LAUNCH_BOUNDS(...)
#else
#define FUSEDOPS_LAUNCH_BOUNDS(...) __launch_bounds__(__VA_ARGS__)
#endif

namespace fusedops::FUSEDOPS_BACKEND::attn {

constexpr float kLog2e = 1.4426950408889634f;

FUSEDOPS_HD constexpr int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
FUSEDOPS_HD constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Everything a kernel needs, resolved on the host once per call (flags, dropout threshold, ...).
struct KernelArgs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* delta = nullptr;  // backward workspace: rowsum(dO ∘ O) per (batch, head, row), laid out as the lse
  int64_t q_stride[3] = {}, k_stride[3] = {}, v_stride[3] = {}, o_stride[3] = {}, lse_stride[3] = {};
  int64_t dout_stride[3] = {}, dq_stride[3] = {}, dk_stride[3] = {}, dv_stride[3] = {};
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int batch = 0, heads_q = 0, heads_kv = 0, group = 1, len_q = 0, len_kv = 0, dim_qk = 0, dim_v = 0;
  float scale = 1.0f, softcap = 0.0f, inv_softcap = 0.0f;
  int64_t window_left = -1, window_right = -1;
  bool bottom_right = false;
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;
  int mask_kind = 0;   // AttentionMask
  int mask_dtype = 0;  // DType of an additive mask
  const void* mask = nullptr;
  int64_t mask_stride[4] = {};
  bool dropout = false;
  uint32_t dropout_threshold = 0;
  float dropout_scale = 1.0f;  // 1 / (1 - p)
  uint64_t dropout_seed = 0, dropout_offset = 0;
  // Every tensor's base and strides allow 16-byte vector accesses (cp.async, uint4 stores); otherwise
  // tiles move element by element (correct for any row alignment, slower).
  bool vector_io = true;
};

inline bool vector_aligned(const void* base, const int64_t (&stride)[3], size_t elem) {
  if (base == nullptr) return true;
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  for (int64_t s : stride)
    if ((s * static_cast<int64_t>(elem)) % 16 != 0) return false;
  return true;
}

inline KernelArgs make_kernel_args(const AttentionForwardParams& p) {
  KernelArgs a;
  const size_t elem = dtype_size(p.dtype);
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.o = p.o;
  a.lse = static_cast<float*>(p.lse);
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = p.q_stride[i];
    a.k_stride[i] = p.k_stride[i];
    a.v_stride[i] = p.v_stride[i];
    a.o_stride[i] = p.o_stride[i];
    a.lse_stride[i] = p.lse_stride[i];
  }
  a.cu_seqlens_q = p.cu_seqlens_q;
  a.cu_seqlens_k = p.cu_seqlens_k;
  a.batch = static_cast<int>(p.batch);
  a.heads_q = static_cast<int>(p.heads_q);
  a.heads_kv = static_cast<int>(p.heads_kv);
  a.group = static_cast<int>(p.heads_q / p.heads_kv);
  a.len_q = static_cast<int>(p.len_q);
  a.len_kv = static_cast<int>(p.len_kv);
  a.dim_qk = static_cast<int>(p.head_dim);
  a.dim_v = static_cast<int>(p.head_dim_v);
  a.scale = p.scale;
  a.softcap = p.softcap;
  a.inv_softcap = p.softcap > 0.0f ? 1.0f / p.softcap : 0.0f;
  a.window_left = p.window_left < 0 ? -1 : p.window_left;
  a.window_right = p.window_right < 0 ? -1 : p.window_right;
  a.bottom_right = p.bottom_right;
  a.alibi_slopes = p.alibi_slopes;
  a.alibi_batch_stride = p.alibi_batch_stride;
  a.mask_kind = static_cast<int>(p.mask_kind);
  a.mask_dtype = static_cast<int>(p.mask_dtype);
  a.mask = p.mask_kind == AttentionMask::none ? nullptr : p.mask;
  if (a.mask == nullptr) a.mask_kind = 0;
  for (int i = 0; i < 4; ++i) a.mask_stride[i] = p.mask_stride[i];
  a.dropout = p.dropout_p > 0.0f;
  a.dropout_threshold = dropout_threshold(p.dropout_p);
  a.dropout_scale = a.dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
  a.dropout_seed = p.dropout_seed;
  a.dropout_offset = p.dropout_offset;
  a.vector_io = vector_aligned(p.q, p.q_stride, elem) && vector_aligned(p.k, p.k_stride, elem) &&
                vector_aligned(p.v, p.v_stride, elem) && vector_aligned(p.o, p.o_stride, elem);
  return a;
}

// The sequence of batch entry b: its lengths and, for varlen, where its rows start in the packed tensors.
struct Sequence {
  int len_q, len_k;
  int64_t q_row0, k_row0;
  int64_t shift;  // key index aligned with query row 0 (bottom-right alignment) or 0
};

FUSEDOPS_DEVICE Sequence sequence_of(const KernelArgs& a, int b) {
  Sequence s;
  if (a.cu_seqlens_q != nullptr) {
    s.q_row0 = a.cu_seqlens_q[b];
    s.k_row0 = a.cu_seqlens_k[b];
    // len_q / len_kv bound the grid; a longer sequence would be cut, never read out of bounds.
    s.len_q = min(static_cast<int>(a.cu_seqlens_q[b + 1] - s.q_row0), a.len_q);
    s.len_k = min(static_cast<int>(a.cu_seqlens_k[b + 1] - s.k_row0), a.len_kv);
  } else {
    s.q_row0 = 0;
    s.k_row0 = 0;
    s.len_q = a.len_q;
    s.len_k = a.len_kv;
  }
  s.shift = a.bottom_right ? static_cast<int64_t>(s.len_k) - s.len_q : 0;
  return s;
}

// Row `row` of head h of sequence b (row counted within the sequence).
template <class T, class P>
FUSEDOPS_DEVICE T* row_pointer(P* base, const int64_t (&stride)[3], int b, int h, int64_t row) {
  return static_cast<T*>(base) + b * stride[0] + h * stride[1] + row * stride[2];
}

// The visible columns [lo, hi) of one accumulator row within a tile, and ALiBi's zero-distance column
// (fractional columns never occur; a float keeps the per-element arithmetic in one register).
struct RowSpan {
  int lo, hi;
  float diag;
};

// Which keys row i sees and how its scores are modified, for one (batch, head).
struct ScoreMods {
  float scale, softcap, inv_softcap, slope;
  int64_t shift, window_left, window_right;
  int len_q, len_k;
  int mask_kind, mask_dtype;
  const void* mask;  // at (b, h)
  int64_t mask_row_stride, mask_col_stride;

  // Nothing element-specific beyond the window: whole tiles inside the window skip the per-element path.
  FUSEDOPS_DEVICE bool elementwise_free() const { return mask_kind == 0 && slope == 0.0f; }

  // Rows [i0, i1) × keys [j0, j1) all inside the window (bounds of the sequence checked by the caller).
  FUSEDOPS_DEVICE bool tile_inside_window(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    return (window_left < 0 || j0 >= i1 - 1 + shift - window_left) && (window_right < 0 || j1 - 1 <= i0 + shift + window_right);
  }

  // The score after scale and softcap; `grad` = d(score)/d(scale·q·k) = 1 - tanh² under softcap, else 1.
  FUSEDOPS_DEVICE float capped(float dot, float& grad) const {
    const float s = dot * scale;
    if (softcap > 0.0f) {
      const float t = tanhf(s * inv_softcap);
      grad = 1.0f - t * t;
      return softcap * t;
    }
    grad = 1.0f;
    return s;
  }

  // Query row i against the key tile starting at n0 (width n): which of its columns are visible.
  FUSEDOPS_DEVICE RowSpan query_row(int64_t i, int64_t n0, int n) const {
    if (i >= len_q) return RowSpan{0, 0, 0.0f};
    int64_t lo = 0, hi = len_k;
    if (window_left >= 0) lo = max64(lo, i + shift - window_left);
    if (window_right >= 0) hi = min64(hi, i + shift + window_right + 1);
    return span(lo - n0, hi - n0, n, static_cast<float>(i + shift - n0));
  }
  // Key j against the query tile starting at m0 (width m): which queries (columns) see it.
  FUSEDOPS_DEVICE RowSpan key_row(int64_t j, int64_t m0, int m) const {
    if (j >= len_k) return RowSpan{0, 0, 0.0f};
    int64_t lo = 0, hi = len_q;
    if (window_right >= 0) lo = max64(lo, j - shift - window_right);
    if (window_left >= 0) hi = min64(hi, j - shift + window_left + 1);
    return span(lo - m0, hi - m0, m, static_cast<float>(j - shift - m0));
  }
  FUSEDOPS_DEVICE static RowSpan span(int64_t lo, int64_t hi, int n, float diag) {
    const int l = static_cast<int>(min64(max64(lo, 0), n)), h = static_cast<int>(min64(max64(hi, 0), n));
    return RowSpan{l, h > l ? h : l, diag};
  }

  // The final score of column `col` of a row: ALiBi and the (additive form of the) mask added, -inf
  // outside the row's visible span. `mask_value` is 0 without a mask.
  FUSEDOPS_DEVICE float finish(float s, int col, const RowSpan& row, float mask_value) const {
    if (col < row.lo || col >= row.hi) return -INFINITY;
    return s - slope * fabsf(row.diag - static_cast<float>(col)) + mask_value;
  }

  // The mask at (i, j) as an additive term: a false boolean entry is -inf.
  FUSEDOPS_DEVICE float mask_at(int64_t i, int64_t j) const {
    const int64_t at = i * mask_row_stride + j * mask_col_stride;
    if (mask_kind == static_cast<int>(AttentionMask::boolean))
      return static_cast<const unsigned char*>(mask)[at] != 0 ? 0.0f : -INFINITY;
    if (mask_dtype == static_cast<int>(DType::f16)) return __half2float(static_cast<const __half*>(mask)[at]);
    if (mask_dtype == static_cast<int>(DType::bf16)) return __bfloat162float(static_cast<const __nv_bfloat16*>(mask)[at]);
    return static_cast<const float*>(mask)[at];
  }
};

FUSEDOPS_DEVICE ScoreMods score_mods_of(const KernelArgs& a, const Sequence& seq, int b, int h) {
  ScoreMods m;
  m.scale = a.scale;
  m.softcap = a.softcap;
  m.inv_softcap = a.inv_softcap;
  m.slope = a.alibi_slopes != nullptr ? a.alibi_slopes[b * a.alibi_batch_stride + h] : 0.0f;
  m.shift = seq.shift;
  m.window_left = a.window_left;
  m.window_right = a.window_right;
  m.len_q = seq.len_q;
  m.len_k = seq.len_k;
  m.mask_kind = a.mask_kind;
  m.mask_dtype = a.mask_dtype;
  m.mask = nullptr;
  m.mask_row_stride = a.mask_stride[2];
  m.mask_col_stride = a.mask_stride[3];
  if (a.mask_kind != 0) {
    const size_t elem = a.mask_kind == static_cast<int>(AttentionMask::boolean)
                            ? 1
                            : (a.mask_dtype == static_cast<int>(DType::f32) ? 4 : 2);
    m.mask = static_cast<const unsigned char*>(a.mask) + (b * a.mask_stride[0] + h * a.mask_stride[1]) * elem;
  }
  return m;
}

// Loads the mask over query rows [i0, i0 + kRows) × keys [j0, j0 + kCols) into shared memory as additive
// fp32 terms (row pitch kPitch), so the per-element code reads one float whatever the mask's kind and
// dtype, and global reads are coalesced along the keys. Entries outside the sequence are 0 (those
// elements are invisible anyway). Synchronous stores: the barrier that publishes the K/V tile publishes
// this too.
template <int kRows, int kCols, int kPitch, int kThreads>
FUSEDOPS_DEVICE void load_mask_tile(float* smem, const ScoreMods& m, int64_t i0, int64_t j0, int tid) {
#pragma unroll 1
  for (int x = tid; x < kRows * kCols; x += kThreads) {
    const int r = x / kCols, c = x % kCols;
    const int64_t i = i0 + r, j = j0 + c;
    smem[r * kPitch + c] = i < m.len_q && j < m.len_k ? m.mask_at(i, j) : 0.0f;
  }
}

// Dropout of attention.h: (b, h, i, j) is kept iff philox_group(seed, stream_i, j / 4).x[j % 4] >= threshold.
// The kernels evaluate it in rolled loops into keep bitmasks, so Philox's ten rounds appear once in the
// code rather than once per accumulator element.
struct Dropout {
  bool on;
  uint32_t threshold;
  float scale;
  uint64_t seed, stream0;  // stream of row 0 of this (batch, head)

  // Keep bits of keys j and j + 1 of row i (j even: one Philox call serves both), in bits 0 and 1.
  FUSEDOPS_DEVICE uint32_t pair(int64_t i, int64_t j) const {
    const Philox4 r = philox_group(seed, stream0 + static_cast<uint64_t>(i), static_cast<uint64_t>(j) >> 2);
    // Selects instead of r.x[j & 3]: a dynamic index would put r in local memory.
    const bool high = (j & 2) != 0;
    const uint32_t x0 = high ? r.x[2] : r.x[0], x1 = high ? r.x[3] : r.x[1];
    return (x0 >= threshold ? 1u : 0u) | (x1 >= threshold ? 2u : 0u);
  }
  FUSEDOPS_DEVICE uint32_t one(int64_t i, int64_t j) const {
    const Philox4 r = philox_group(seed, stream0 + static_cast<uint64_t>(i), static_cast<uint64_t>(j) >> 2);
    const uint32_t lo = (j & 1) ? r.x[1] : r.x[0], hi = (j & 1) ? r.x[3] : r.x[2];
    return ((j & 2) ? hi : lo) >= threshold ? 1u : 0u;
  }
  FUSEDOPS_DEVICE float factor(uint32_t bits, int bit) const { return (bits >> bit) & 1u ? scale : 0.0f; }
};

FUSEDOPS_DEVICE Dropout dropout_of(const KernelArgs& a, int b, int h) {
  return Dropout{a.dropout, a.dropout_threshold, a.dropout_scale, a.dropout_seed,
                 a.dropout_offset + (static_cast<uint64_t>(b) * a.heads_q + h) * static_cast<uint64_t>(a.len_q)};
}

// Keep bits of a thread's accumulator elements in the mma layout (rows row_i[0..1], keys n0 + nt·8 + 2t
// + c): bit 2·(r·kNT + nt) + c. All ones without dropout.
template <int kNT>
FUSEDOPS_DEVICE uint32_t dropout_bits_rows(const Dropout& drop, const int64_t (&row_i)[2], int64_t n0) {
  static_assert(2 * 2 * kNT <= 32, "one 32-bit mask per tile");
  if (!drop.on) return 0xffffffffu;
  const int t = threadIdx.x % 4;
  uint32_t bits = 0;
#pragma unroll 1
  for (int x = 0; x < 2 * kNT; ++x) {
    const int r = x / kNT, nt = x % kNT;
    bits |= drop.pair(r == 0 ? row_i[0] : row_i[1], n0 + nt * 8 + 2 * t) << (2 * x);
  }
  return bits;
}

// ---- tiles between global and shared memory ----------------------------------------------------------

// Copies rows [0, rows) × columns [0, cols) of a kRows × kCols tile into shared memory (row pitch kPitch
// elements) and zero-fills the rest of the tile, so padded head-dim columns and rows past the sequence
// end contribute exact zeros (never the 0xFF poison) to the products. With `vector` the copies are
// 16-byte cp.async (the caller commits and waits); otherwise element by element, synchronously.
template <class T, int kRows, int kCols, int kPitch, int kThreads>
FUSEDOPS_DEVICE void load_tile(T* smem, const T* gmem, int64_t row_stride, int rows, int cols, bool vector, int tid) {
  constexpr int kChunk = 16 / static_cast<int>(sizeof(T));
  constexpr int kChunksPerRow = kCols / kChunk;
  static_assert(kCols % kChunk == 0, "tile width in 16-byte chunks");
#pragma unroll 4
  for (int c = tid; c < kRows * kChunksPerRow; c += kThreads) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * kChunk;
    T* dst = smem + r * kPitch + col;
    const bool valid = r < rows && col < cols;
    const T* src = valid ? gmem + r * row_stride + col : gmem;
    if (vector) {
      simt::cp_async_16(dst, src, valid);
    } else {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) dst[e] = valid ? src[e] : from_float<T>(0.0f);
    }
  }
}

// Writes rows [0, rows) × columns [0, cols) of a shared-memory tile to global memory.
template <class T, int kRows, int kCols, int kPitch, int kThreads>
FUSEDOPS_DEVICE void store_tile(T* gmem, int64_t row_stride, const T* smem, int rows, int cols, bool vector, int tid) {
  constexpr int kChunk = 16 / static_cast<int>(sizeof(T));
  constexpr int kChunksPerRow = kCols / kChunk;
#pragma unroll 4
  for (int c = tid; c < kRows * kChunksPerRow; c += kThreads) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * kChunk;
    if (r >= rows || col >= cols) continue;
    const T* src = smem + r * kPitch + col;
    T* dst = gmem + r * row_stride + col;
    if (vector) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) dst[e] = src[e];
    }
  }
}

// Stores a warp's accumulator tile (16 rows, kNTiles·8 columns, mma layout) into shared memory as T.
template <class T, int kNTiles>
FUSEDOPS_DEVICE void store_accumulators(T* smem, int pitch, const float (&acc)[kNTiles][4], float factor0, float factor1) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float f = r == 0 ? factor0 : factor1;
      T* dst = smem + (g + 8 * r) * pitch + nt * 8 + 2 * t;
      if constexpr (std::is_same<T, float>::value) {
        *reinterpret_cast<float2*>(dst) = make_float2(acc[nt][2 * r] * f, acc[nt][2 * r + 1] * f);
      } else {
        *reinterpret_cast<uint32_t*>(dst) = pack_pair<T>(acc[nt][2 * r] * f, acc[nt][2 * r + 1] * f);
      }
    }
  }
}

// ---- warp-level products (16 rows per warp, mma accumulator layout) ------------------------------------

FUSEDOPS_DEVICE float dot4(float4 a, float4 b, float c) {
  return fmaf(a.w, b.w, fmaf(a.z, b.z, fmaf(a.y, b.y, fmaf(a.x, b.x, c))));
}

// acc(16 × 8·kNTiles) += A · Bᵀ with A (16 rows) and B (8·kNTiles rows) both stored row-major along the
// contraction dimension, of which the first k_len (≤ kK, a multiple of 8) columns are used.
template <int kK, int kNTiles, class T>
FUSEDOPS_DEVICE void warp_gemm_abt(float (&acc)[kNTiles][4], const T* sA, int pitch_a, const T* sB, int pitch_b,
                                   int k_len) {
  const int lane = threadIdx.x % 32;
  if constexpr (std::is_same<T, float>::value) {
    const int g = lane / 4, t = lane % 4;
    const float* a0p = sA + g * pitch_a;
    const float* a1p = a0p + 8 * pitch_a;
    const float* bp = sB + 2 * t * pitch_b;
#pragma unroll 2
    for (int k = 0; k < k_len; k += 4) {
      const float4 a0 = *reinterpret_cast<const float4*>(a0p + k), a1 = *reinterpret_cast<const float4*>(a1p + k);
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        const float4 b0 = *reinterpret_cast<const float4*>(bp + nt * 8 * pitch_b + k);
        const float4 b1 = *reinterpret_cast<const float4*>(bp + (nt * 8 + 1) * pitch_b + k);
        acc[nt][0] = dot4(a0, b0, acc[nt][0]);
        acc[nt][1] = dot4(a0, b1, acc[nt][1]);
        acc[nt][2] = dot4(a1, b0, acc[nt][2]);
        acc[nt][3] = dot4(a1, b1, acc[nt][3]);
      }
    }
  } else {
    static_assert(kNTiles % 2 == 0, "B fragments are loaded for pairs of n-tiles");
    const T* a_row = sA + (lane % 16) * pitch_a + (lane / 16) * 8;
    const T* b_row = sB + ((lane & 7) + 8 * (lane >> 4)) * pitch_b + 8 * ((lane >> 3) & 1);
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk) {
      if (kk * 16 >= k_len) break;
      uint32_t a[4];
      simt::ldmatrix_x4(a, a_row + kk * 16);
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t b[4];
        simt::ldmatrix_x4(b, b_row + np * 16 * pitch_b + kk * 16);
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        simt::mma_m16n8k16<T>(acc[2 * np], a, b0, acc[2 * np]);
        simt::mma_m16n8k16<T>(acc[2 * np + 1], a, b1, acc[2 * np + 1]);
      }
    }
  }
}

// acc(16 × 8·kNTiles) += A · B with A (16 rows, row-major along k) and B (k rows, row-major along n);
// k_len (≤ kK, a multiple of 8) rows of B are used and n-tiles at or past n_len are skipped.
template <int kK, int kNTiles, class T>
FUSEDOPS_DEVICE void warp_gemm_ab(float (&acc)[kNTiles][4], const T* sA, int pitch_a, const T* sB, int pitch_b, int k_len,
                                  int n_len) {
  const int lane = threadIdx.x % 32;
  if constexpr (std::is_same<T, float>::value) {
    const int g = lane / 4, t = lane % 4;
    const float* a0p = sA + g * pitch_a;
    const float* a1p = a0p + 8 * pitch_a;
    const float* bp = sB + 2 * t;
#pragma unroll 2
    for (int k = 0; k < k_len; ++k) {
      const float a0 = a0p[k], a1 = a1p[k];
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        if (nt * 8 >= n_len) break;
        const float2 b = *reinterpret_cast<const float2*>(bp + k * pitch_b + nt * 8);
        acc[nt][0] = fmaf(a0, b.x, acc[nt][0]);
        acc[nt][1] = fmaf(a0, b.y, acc[nt][1]);
        acc[nt][2] = fmaf(a1, b.x, acc[nt][2]);
        acc[nt][3] = fmaf(a1, b.y, acc[nt][3]);
      }
    }
  } else {
    static_assert(kNTiles % 2 == 0, "B fragments are loaded for pairs of n-tiles");
    const T* a_row = sA + (lane % 16) * pitch_a + (lane / 16) * 8;
    const T* b_row = sB + ((lane & 7) + 8 * ((lane >> 3) & 1)) * pitch_b + 8 * (lane >> 4);
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk) {
      if (kk * 16 >= k_len) break;
      uint32_t a[4];
      simt::ldmatrix_x4(a, a_row + kk * 16);
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        if (np * 16 >= n_len) break;
        uint32_t b[4];
        simt::ldmatrix_x4_trans(b, b_row + kk * 16 * pitch_b + np * 16);
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        simt::mma_m16n8k16<T>(acc[2 * np], a, b0, acc[2 * np]);
        simt::mma_m16n8k16<T>(acc[2 * np + 1], a, b1, acc[2 * np + 1]);
      }
    }
  }
}

// acc(16 × 8·kNTiles) += C · B, where C (16 × 8·kCTiles) is an accumulator tile this warp just computed
// (P or dS) and B (8·kCTiles rows) is row-major in shared memory. On tensor cores C's registers are
// already the A fragments (FlashAttention-2's register reuse); fp32 goes through the warp's `scratch`
// (16 rows × scratch_pitch floats).
template <int kCTiles, int kNTiles, class T>
FUSEDOPS_DEVICE void warp_gemm_cb(float (&acc)[kNTiles][4], const float (&c)[kCTiles][4], float* scratch, int scratch_pitch,
                                  const T* sB, int pitch_b, int n_len) {
  if constexpr (std::is_same<T, float>::value) {
    __syncwarp();  // the previous product's reads of scratch are done
    store_accumulators<float, kCTiles>(scratch, scratch_pitch, c, 1.0f, 1.0f);
    __syncwarp();
    warp_gemm_ab<kCTiles * 8, kNTiles>(acc, scratch, scratch_pitch, sB, pitch_b, kCTiles * 8, n_len);
  } else {
    static_assert(kCTiles % 2 == 0 && kNTiles % 2 == 0, "k16 slices, pairs of n-tiles");
    const int lane = threadIdx.x % 32;
    const T* b_row = sB + ((lane & 7) + 8 * ((lane >> 3) & 1)) * pitch_b + 8 * (lane >> 4);
#pragma unroll
    for (int kk = 0; kk < kCTiles / 2; ++kk) {
      const uint32_t a[4] = {pack_pair<T>(c[2 * kk][0], c[2 * kk][1]), pack_pair<T>(c[2 * kk][2], c[2 * kk][3]),
                             pack_pair<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]),
                             pack_pair<T>(c[2 * kk + 1][2], c[2 * kk + 1][3])};
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        if (np * 16 >= n_len) break;
        uint32_t b[4];
        simt::ldmatrix_x4_trans(b, b_row + kk * 16 * pitch_b + np * 16);
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        simt::mma_m16n8k16<T>(acc[2 * np], a, b0, acc[2 * np]);
        simt::mma_m16n8k16<T>(acc[2 * np + 1], a, b1, acc[2 * np + 1]);
      }
    }
  }
}

// ---- host-side helpers ------------------------------------------------------------------------------------

template <int N>
struct IntConst {
  static constexpr int value = N;
};

// Calls f(IntConst<kDim>) with the tile width that covers `dim` (the larger of the q/k and v head dims).
// fp16/bf16: every multiple of 32 up to 256; fp32 (the simple SIMT path): 64, 128, 256. Narrower head
// dims are zero-padded in shared memory and the padded 16-column slices are skipped at run time, so
// padding costs registers and shared memory, not arithmetic.
template <bool kFp32, class F>
void dispatch_head_dim(int dim, F&& f) {
#if defined(FUSEDOPS_ATTENTION_ONLY_DIM)  // development: compile-check a single instantiation quickly
  (void)dim;
  return f(IntConst<FUSEDOPS_ATTENTION_ONLY_DIM>{});
#else
  if constexpr (kFp32) {
    if (dim <= 64) return f(IntConst<64>{});
    if (dim <= 128) return f(IntConst<128>{});
    return f(IntConst<256>{});
  } else {
    switch ((dim + 31) / 32) {
      case 1: return f(IntConst<32>{});
      case 2: return f(IntConst<64>{});
      case 3: return f(IntConst<96>{});
      case 4: return f(IntConst<128>{});
      case 5: return f(IntConst<160>{});
      case 6: return f(IntConst<192>{});
      case 7: return f(IntConst<224>{});
      default: return f(IntConst<256>{});
    }
  }
#endif
}

template <class F>
void dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::f32: return f(float{});
    case DType::f16: return f(__half{});
    case DType::bf16: return f(__nv_bfloat16{});
    default: throw std::invalid_argument("fusedops: the CUDA attention kernels take float32, float16 or bfloat16");
  }
}

inline void check_head_dims(const AttentionForwardParams& p) {
  for (int64_t d : {p.head_dim, p.head_dim_v})
    if (d < 8 || d > 256 || d % 8 != 0)
      throw std::invalid_argument("fusedops: the CUDA attention kernels take head dims that are multiples of 8 in [8, 256]");
}

// Blocks of a (tiles, heads, batch) grid, linearized into x so any batch × heads fits.
inline unsigned grid_size(int64_t tiles, int64_t heads, int64_t batch) {
  const int64_t n = tiles * heads * batch;
  if (n > 0x7fffffff) throw std::invalid_argument("fusedops: attention problem too large for one grid");
  return static_cast<unsigned>(n);
}

struct BlockCoord {
  int tile, head, batch;
};
FUSEDOPS_DEVICE BlockCoord block_coord(int tiles, int heads) {
  unsigned x = blockIdx.x;
  BlockCoord c;
  c.tile = static_cast<int>(x % static_cast<unsigned>(tiles));
  x /= static_cast<unsigned>(tiles);
  c.head = static_cast<int>(x % static_cast<unsigned>(heads));
  c.batch = static_cast<int>(x / static_cast<unsigned>(heads));
  return c;
}

// sm_80's opt-in limit per block (sm_90 allows 227 KiB).
constexpr size_t kMaxSmemBytes = 163 * 1024;
// The opt-in limit of GPUs of compute capability 8.6, 8.9 and 12.0 (RTX 30/40/50 series, A10, A40, L4,
// L40S). The default tiles are sized for sm_80/sm_90; a kernel whose default tiles need more than this
// also has a compact configuration (its traits' kCompact) that fits it, mask included, and with_tiles
// picks it on such a GPU.
constexpr size_t kCompactSmemBytes = 99 * 1024;

// Calls f(Tr{}, smem_bytes) with the tile configuration Tr to launch and its dynamic shared memory: the
// default one, or, when that needs more than this device allows, the compact one. Compact kernels are
// instantiated only where the default exceeds kCompactSmemBytes and the compact one fits it. When nothing
// fits (on 99 KiB GPUs: the fp32 backward above head dim 128, whose traits say kFitsSmallGpus = false),
// says so clearly, naming the kernel.
template <template <class, int, bool> class Traits, class T, int kDim, class F>
void with_tiles(const char* kernel_name, bool masked, F&& f) {
  using Default = Traits<T, kDim, false>;
  using Compact = Traits<T, kDim, true>;
  static_assert(!Default::kFitsSmallGpus || Default::kSmemBytes + Default::kMaskBytes <= kCompactSmemBytes ||
                    Compact::kSmemBytes + Compact::kMaskBytes <= kCompactSmemBytes,
                "a kernel meant to run on 99 KiB GPUs has no configuration that fits them");
  const size_t need = Default::kSmemBytes + (masked ? Default::kMaskBytes : 0);
  const size_t limit = need > 48 * 1024 ? simt::max_dynamic_smem() : need;
  if constexpr (Default::kSmemBytes + Default::kMaskBytes > kCompactSmemBytes &&
                Compact::kSmemBytes + Compact::kMaskBytes <= kCompactSmemBytes) {
    const size_t compact = Compact::kSmemBytes + (masked ? Compact::kMaskBytes : 0);
    if (need > limit && compact <= limit) return f(Compact{}, compact);
  }
  if (need > limit)
    throw std::invalid_argument(std::string("fusedops: the CUDA attention ") + kernel_name + " kernel for head dim " +
                                std::to_string(kDim) + " needs " + std::to_string(need / 1024) +
                                " KiB of shared memory per block, and this GPU allows " + std::to_string(limit / 1024) +
                                " KiB; use a smaller head dim, 16-bit inputs, or the CPU backend");
  f(Default{}, need);
}

// Opts `kernel` into `bytes` of dynamic shared memory (with_tiles has checked that the device allows it).
template <class Kernel>
void prepare_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) simt::set_max_dynamic_smem(kernel, bytes);
}

}  // namespace fusedops::FUSEDOPS_BACKEND::attn
