// Attention backward, CUDA: dq, dk, dv of attention_fwd.cu's o = softmax(mods(scale · q kᵀ)) v, with the
// same modifiers (softcap's tanh derivative, ALiBi, masks, windows, GQA/MQA, Philox dropout, varlen).
//
// Algorithm: FlashAttention-2's backward (Dao, 2023, arXiv:2307.08691, Algorithm 2), with P recomputed
// from the forward's log-sum-exp, in three kernels:
//   1. delta = rowsum(dO ∘ O) per query row, into the caller's workspace (the softmax Jacobian term;
//      with dropout it equals rowsum(P ∘ Z ∘ dP̃), so it stays correct).
//   2. dK/dV: one block per (key tile of 64, or 32 for fp32 and compact tiles above head dim 128; kv head;
//      batch entry), iterating over the query heads of its GQA group and the Q tiles its window reaches
//      (two-stage cp.async pipeline). Phase 1 computes Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (warps split keys ×
//      queries) and writes P∘Z and dS to shared memory; phase 2
//      accumulates dV += (P∘Z)ᵀ dO and dK += dSᵀ Q in registers (warps split keys × head dim, which keeps
//      the accumulators of head dim 256 spill-free). dK and dV are complete without atomics.
//   3. dQ: one block per (Q tile of 64 rows; query head; batch entry), iterating over K tiles like the
//      forward: recompute S and dP, form dS, accumulate dQ += dS K with dS in registers.
// Determinism: every output element is summed by one thread in a fixed order, so results are bitwise
// identical run to run (for `deterministic` true or false: there is no atomic path). The price is the
// separate dQ pass, which recomputes Q Kᵀ and dO Vᵀ: 7 tile products instead of FlashAttention-2's 5
// (about 1.4× the backward's tensor-core work), against FA2's fp32 atomicAdd of dQ partials.
//
// Limits: as the forward (head dims multiples of 8 in [8, 256]; up to 160 KiB of shared memory per
// block; compact tiles on 99 KiB GPUs, except for fp32 above head dim 128, for which none is provided;
// element-wise copies for rows that are not 16-byte aligned). fp32 uses FMA products.
#include "attention_common.cuh"

namespace fusedops::FUSEDOPS_BACKEND {
namespace attn {

// ---- 1. delta = rowsum(dO ∘ O) ---------------------------------------------------------------------------

constexpr int kDeltaRows = 32;  // rows per block; four lanes per row

template <class T>
__global__ void FUSEDOPS_LAUNCH_BOUNDS(128) attention_backward_delta_kernel(const KernelArgs a) {
  const BlockCoord at = block_coord((a.len_q + kDeltaRows - 1) / kDeltaRows, a.heads_q);
  const int b = at.batch, h = at.head;
  const Sequence seq = sequence_of(a, b);
  if (at.tile * kDeltaRows >= seq.len_q) return;
  const int row = at.tile * kDeltaRows + static_cast<int>(threadIdx.x) / 4, quarter = threadIdx.x % 4;
  float sum = 0.0f;
  if (row < seq.len_q) {
    const T* o = row_pointer<const T>(a.o, a.o_stride, b, h, seq.q_row0 + row);
    const T* dout = row_pointer<const T>(a.dout, a.dout_stride, b, h, seq.q_row0 + row);
    for (int c = quarter; c < a.dim_v; c += 4) sum = fmaf(to_float(o[c]), to_float(dout[c]), sum);
  }
  sum += __shfl_xor_sync(kFullMask, sum, 1);
  sum += __shfl_xor_sync(kFullMask, sum, 2);
  if (quarter == 0 && row < seq.len_q) *row_pointer<float>(a.delta, a.lse_stride, b, h, seq.q_row0 + row) = sum;
}

// delta has the lse's layout, (B, Hq, L) or for varlen (Hq, total rows): sized by the rows that exist, not
// by batch × the bound on a sequence's length. `row` counts within the packed tensor (q_row0 included).
FUSEDOPS_DEVICE float delta_of(const KernelArgs& a, int b, int h, int64_t row) {
  return *row_pointer<const float>(a.delta, a.lse_stride, b, h, row);
}

// ---- 2. dK, dV ---------------------------------------------------------------------------------------------

template <class T, int kDim_, bool kCompact_>
struct BackwardKVTraits {
  static constexpr bool kTensorCores = sizeof(T) == 2;
  static constexpr int kDim = kDim_;
  // Compact (99 KiB GPUs): fp16/bf16 take 32-row query tiles up to kDim 128 and 32-key tiles in one stage
  // above; fp32 one stage (above kDim 128 none of this file's fp32 tilings fits 99 KiB).
  static constexpr bool kCompact = kCompact_;
  static constexpr bool kFitsSmallGpus = kTensorCores || kDim <= 128;
  static constexpr int kWarpsKeys = kTensorCores ? (kCompact && kDim > 128 ? 2 : 4) : 2;  // warps along the key tile
  static constexpr int kBlockN = 16 * kWarpsKeys;
  // Warps along the queries (phase 1) and the head dim (phase 2): the dK + dV accumulators are
  // kDim / kSplit floats per thread.
  static constexpr int kSplit = kTensorCores || kDim <= 128 ? 2 : 4;
  static constexpr int kWarps = kWarpsKeys * kSplit;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = kTensorCores && kDim <= 128 && !kCompact ? 64 : 32;
  static constexpr int kStages = kCompact ? (kTensorCores && kDim <= 128 ? 2 : 1) : (kTensorCores || kDim <= 128 ? 2 : 1);
  static constexpr int kQueriesPerWarp = kBlockM / kSplit;
  static constexpr int kColsPerWarp = kDim / kSplit;
  static constexpr int kPitch = kDim + 16 / static_cast<int>(sizeof(T));
  static constexpr int kPitchP = kBlockM + 16 / static_cast<int>(sizeof(T));
  static constexpr size_t kSmemBytes = sizeof(T) * (static_cast<size_t>(kPitch) * (2 * kBlockN + 2 * kStages * kBlockM) +
                                                    2 * static_cast<size_t>(kBlockN) * kPitchP) +
                                       sizeof(float) * 2 * kStages * kBlockM;
  static constexpr int kMaskPitch = kBlockN + 4;  // mask tile: queries × keys, fp32 additive form
  static constexpr size_t kMaskBytes = sizeof(float) * kStages * kBlockM * kMaskPitch;
  static_assert(kSmemBytes + kMaskBytes <= kMaxSmemBytes, "shared memory beyond sm_80's limit");
};

template <class T, int kDim, bool kCompact>
__global__ void FUSEDOPS_LAUNCH_BOUNDS(BackwardKVTraits<T, kDim, kCompact>::kThreads, 1)
    attention_backward_dkdv_kernel(const KernelArgs a) {
  using Tr = BackwardKVTraits<T, kDim, kCompact>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kPitch = Tr::kPitch, kPitchP = Tr::kPitchP;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kQT = Tr::kQueriesPerWarp / 8;  // phase-1 n-tiles (queries)
  constexpr int kCT = Tr::kColsPerWarp / 8;     // phase-2 n-tiles (head dim)

  const BlockCoord at = block_coord((a.len_kv + kBlockN - 1) / kBlockN, a.heads_kv);
  const int b = at.batch, kvh = at.head;
  const Sequence seq = sequence_of(a, b);
  const int n0 = at.tile * kBlockN;
  if (n0 >= seq.len_k) return;
  const int keys = min(kBlockN, seq.len_k - n0);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int warp_keys = warp % Tr::kWarpsKeys, warp_split = warp / Tr::kWarpsKeys;

  // Query rows that see any key of this tile (the same for every head of the group).
  int64_t i_lo = 0, i_hi = seq.len_q;
  if (a.window_right >= 0) i_lo = max64(i_lo, static_cast<int64_t>(n0) - seq.shift - a.window_right);
  if (a.window_left >= 0) i_hi = min64(i_hi, static_cast<int64_t>(n0 + keys - 1) - seq.shift + a.window_left + 1);
  const int m_begin = i_hi > i_lo ? static_cast<int>(i_lo / kBlockM) : 0;
  const int m_tiles = i_hi > i_lo ? static_cast<int>((i_hi + kBlockM - 1) / kBlockM) - m_begin : 0;
  const int iterations = m_tiles * a.group;

  unsigned char* smem = simt::dynamic_smem<unsigned char>();
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kBlockN * kPitch;
  T* sQ = sV + kBlockN * kPitch;
  T* sdO = sQ + Tr::kStages * kBlockM * kPitch;
  T* sP = sdO + Tr::kStages * kBlockM * kPitch;  // (P ∘ Z)ᵀ: keys × queries
  T* sdS = sP + kBlockN * kPitchP;                // dSᵀ
  float* sLse = reinterpret_cast<float*>(sdS + kBlockN * kPitchP);
  float* sDelta = sLse + Tr::kStages * kBlockM;
  float* sMask = sDelta + Tr::kStages * kBlockM;

  load_tile<T, kBlockN, kDim, kPitch, kThreads>(sK, row_pointer<const T>(a.k, a.k_stride, b, kvh, seq.k_row0 + n0),
                                                a.k_stride[2], keys, a.dim_qk, a.vector_io, tid);
  load_tile<T, kBlockN, kDim, kPitch, kThreads>(sV, row_pointer<const T>(a.v, a.v_stride, b, kvh, seq.k_row0 + n0),
                                                a.v_stride[2], keys, a.dim_v, a.vector_io, tid);
  auto load_q = [&](int it, int stage) {
    const int h = kvh * a.group + it / m_tiles, m0 = (m_begin + it % m_tiles) * kBlockM;
    const int rows = min(kBlockM, seq.len_q - m0);
    load_tile<T, kBlockM, kDim, kPitch, kThreads>(sQ + stage * kBlockM * kPitch,
                                                  row_pointer<const T>(a.q, a.q_stride, b, h, seq.q_row0 + m0),
                                                  a.q_stride[2], rows, a.dim_qk, a.vector_io, tid);
    load_tile<T, kBlockM, kDim, kPitch, kThreads>(sdO + stage * kBlockM * kPitch,
                                                  row_pointer<const T>(a.dout, a.dout_stride, b, h, seq.q_row0 + m0),
                                                  a.dout_stride[2], rows, a.dim_v, a.vector_io, tid);
    // Rows past the sequence end get lse = +inf and delta = 0: P = 0 and dS = 0 there, with no test.
    for (int r = tid; r < kBlockM; r += kThreads) {
      const bool valid = r < rows;
      sLse[stage * kBlockM + r] = valid ? *row_pointer<const float>(a.lse, a.lse_stride, b, h, seq.q_row0 + m0 + r) : INFINITY;
      sDelta[stage * kBlockM + r] = valid ? delta_of(a, b, h, seq.q_row0 + m0 + r) : 0.0f;
    }
    if (a.mask_kind != 0) {
      load_mask_tile<kBlockM, kBlockN, Tr::kMaskPitch, kThreads>(sMask + stage * kBlockM * Tr::kMaskPitch,
                                                                 score_mods_of(a, seq, b, h), m0, n0, tid);
    }
  };
  if (iterations > 0) load_q(0, 0);
  simt::cp_async_commit();

  float acc_dk[kCT][4], acc_dv[kCT][4];
#pragma unroll
  for (int nt = 0; nt < kCT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[nt][e] = acc_dv[nt][e] = 0.0f;
  const int key_row = warp_keys * 16 + g;  // this thread's keys: key_row and key_row + 8 of the tile
  const int q_col0 = warp_split * Tr::kQueriesPerWarp;
  const int d_col0 = warp_split * Tr::kColsPerWarp;

  for (int it = 0; it < iterations; ++it) {
    const int stage = Tr::kStages == 2 ? it & 1 : 0;
    if constexpr (Tr::kStages == 2) {
      if (it + 1 < iterations) load_q(it + 1, stage ^ 1);
      simt::cp_async_commit();
      simt::cp_async_wait<1>();
    } else {
      simt::cp_async_wait<0>();
    }
    __syncthreads();
    const int h = kvh * a.group + it / m_tiles, m0 = (m_begin + it % m_tiles) * kBlockM;
    const T* sQs = sQ + stage * kBlockM * kPitch;
    const T* sdOs = sdO + stage * kBlockM * kPitch;
    const float* lse = sLse + stage * kBlockM;
    const float* delta = sDelta + stage * kBlockM;
    const ScoreMods mods = score_mods_of(a, seq, b, h);
    const Dropout drop = dropout_of(a, b, h);

    // Phase 1: Sᵀ and dPᵀ for 16 keys × kQueriesPerWarp queries.
    float st[kQT][4], dpt[kQT][4];
#pragma unroll
    for (int nt = 0; nt < kQT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.0f;
    warp_gemm_abt<kDim>(st, sK + warp_keys * 16 * kPitch, kPitch, sQs + q_col0 * kPitch, kPitch, a.dim_qk);
    warp_gemm_abt<kDim>(dpt, sV + warp_keys * 16 * kPitch, kPitch, sdOs + q_col0 * kPitch, kPitch, a.dim_v);

    const bool plain = mods.elementwise_free() &&
                       mods.tile_inside_window(m0, min(m0 + kBlockM, seq.len_q), n0, n0 + keys);
    const RowSpan span[2] = {mods.key_row(n0 + key_row, m0, kBlockM), mods.key_row(n0 + key_row + 8, m0, kBlockM)};
    const float* mask_tile = sMask + stage * kBlockM * Tr::kMaskPitch;
    uint32_t keep = 0xffffffffu;  // bit nt·4 + e
    if (drop.on) {
      keep = 0;
#pragma unroll 1
      for (int x = 0; x < kQT * 4; ++x) {
        const int nt = x / 4, e = x % 4;
        keep |= drop.one(m0 + q_col0 + nt * 8 + 2 * t + (e & 1), n0 + key_row + 8 * (e >> 1)) << x;
      }
    }
#pragma unroll
    for (int nt = 0; nt < kQT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = q_col0 + nt * 8 + 2 * t + (e & 1), r = e >> 1;  // query column within the tile
        float grad;
        float s = mods.capped(st[nt][e], grad);
        if (!plain) {
          const float mask_value = mods.mask_kind != 0 ? mask_tile[col * Tr::kMaskPitch + key_row + 8 * r] : 0.0f;
          s = mods.finish(s, col, span[r], mask_value);
        }
        const float p = s == -INFINITY ? 0.0f : exp2f(s * kLog2e - lse[col] * kLog2e);
        const float z = drop.on ? drop.factor(keep, nt * 4 + e) : 1.0f;
        st[nt][e] = p * z;
        dpt[nt][e] = p * (dpt[nt][e] * z - delta[col]) * grad;
      }
    }
#pragma unroll
    for (int nt = 0; nt < kQT; ++nt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int at = (key_row + 8 * r) * kPitchP + q_col0 + nt * 8 + 2 * t;
        if constexpr (std::is_same<T, float>::value) {
          *reinterpret_cast<float2*>(sP + at) = make_float2(st[nt][2 * r], st[nt][2 * r + 1]);
          *reinterpret_cast<float2*>(sdS + at) = make_float2(dpt[nt][2 * r], dpt[nt][2 * r + 1]);
        } else {
          *reinterpret_cast<uint32_t*>(sP + at) = pack_pair<T>(st[nt][2 * r], st[nt][2 * r + 1]);
          *reinterpret_cast<uint32_t*>(sdS + at) = pack_pair<T>(dpt[nt][2 * r], dpt[nt][2 * r + 1]);
        }
      }
    }
    __syncthreads();

    // Phase 2: dV += (P∘Z)ᵀ dO and dK += dSᵀ Q for 16 keys × kColsPerWarp head-dim columns.
    warp_gemm_ab<kBlockM>(acc_dv, sP + warp_keys * 16 * kPitchP, kPitchP, sdOs + d_col0, kPitch, kBlockM, a.dim_v - d_col0);
    warp_gemm_ab<kBlockM>(acc_dk, sdS + warp_keys * 16 * kPitchP, kPitchP, sQs + d_col0, kPitch, kBlockM, a.dim_qk - d_col0);
    __syncthreads();  // this stage's Q/dO and sP/sdS are free for the next iteration
    if constexpr (Tr::kStages == 1) {
      if (it + 1 < iterations) load_q(it + 1, 0);
      simt::cp_async_commit();
    }
  }

  // Epilogue: dK (scaled) and dV through the sK/sV tiles for wide stores; tiles no query sees get zeros.
  simt::cp_async_wait<0>();
  __syncthreads();
  store_accumulators<T, kCT>(sK + warp_keys * 16 * kPitch + d_col0, kPitch, acc_dk, a.scale, a.scale);
  store_accumulators<T, kCT>(sV + warp_keys * 16 * kPitch + d_col0, kPitch, acc_dv, 1.0f, 1.0f);
  __syncthreads();
  store_tile<T, kBlockN, kDim, kPitch, kThreads>(row_pointer<T>(a.dk, a.dk_stride, b, kvh, seq.k_row0 + n0), a.dk_stride[2],
                                                 sK, keys, a.dim_qk, a.vector_io, tid);
  store_tile<T, kBlockN, kDim, kPitch, kThreads>(row_pointer<T>(a.dv, a.dv_stride, b, kvh, seq.k_row0 + n0), a.dv_stride[2],
                                                 sV, keys, a.dim_v, a.vector_io, tid);
}

// ---- 3. dQ -------------------------------------------------------------------------------------------------

template <class T, int kDim_, bool kCompact_>
struct BackwardQTraits {
  static constexpr bool kTensorCores = sizeof(T) == 2;
  static constexpr int kDim = kDim_;
  // Compact (99 KiB GPUs): 16-key tiles in one stage (the 64-row query tile and its 4 warps stay).
  static constexpr bool kCompact = kCompact_;
  static constexpr bool kFitsSmallGpus = kTensorCores || kDim <= 128;
  static constexpr int kRowWarps = !kTensorCores && kDim > 128 ? 2 : 4;
  static constexpr int kColSplit = !kTensorCores && kDim > 128 ? 2 : 1;  // as in ForwardTraits
  static constexpr int kOutCols = kDim / kColSplit;
  static constexpr int kWarps = kRowWarps * kColSplit;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kRowWarps;
  // S, dP (kBlockN / 2 floats each per thread) and dQ (kDim / 2) live together: 32 keys per tile, 16
  // above head dim 128 (which keeps ~40 registers of headroom under the 255 limit).
  static constexpr int kBlockN = kDim <= 128 && !kCompact ? 32 : 16;
  static constexpr int kStages = kCompact ? 1 : 2;
  static constexpr int kPitch = kDim + 16 / static_cast<int>(sizeof(T));
  static constexpr int kScratchPitch = kBlockN + 4;
  static constexpr size_t kSmemBytes = sizeof(T) * static_cast<size_t>(kPitch) * (2 * kBlockM + 2 * kStages * kBlockN) +
                                       (kTensorCores ? 0 : sizeof(float) * 16 * kWarps * kScratchPitch);
  static constexpr int kMaskPitch = kBlockN + 4;
  static constexpr size_t kMaskBytes = sizeof(float) * kStages * kBlockM * kMaskPitch;
  static_assert(kSmemBytes + kMaskBytes <= kMaxSmemBytes, "shared memory beyond sm_80's limit");
};

template <class T, int kDim, bool kCompact>
__global__ void FUSEDOPS_LAUNCH_BOUNDS(BackwardQTraits<T, kDim, kCompact>::kThreads, 1)
    attention_backward_dq_kernel(const KernelArgs a) {
  using Tr = BackwardQTraits<T, kDim, kCompact>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kPitch = Tr::kPitch, kThreads = Tr::kThreads;
  constexpr int kNT = kBlockN / 8;
  constexpr int kOT = Tr::kOutCols / 8;

  const BlockCoord at = block_coord((a.len_q + kBlockM - 1) / kBlockM, a.heads_q);
  const int b = at.batch, h = at.head, kvh = h / a.group;
  const Sequence seq = sequence_of(a, b);
  const int m0 = at.tile * kBlockM;
  if (m0 >= seq.len_q) return;
  const int rows = min(kBlockM, seq.len_q - m0);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int row_warp = warp % Tr::kRowWarps, col0 = warp / Tr::kRowWarps * Tr::kOutCols;
  const ScoreMods mods = score_mods_of(a, seq, b, h);
  const Dropout drop = dropout_of(a, b, h);

  int64_t j_lo = 0, j_hi = seq.len_k;
  if (a.window_left >= 0) j_lo = max64(j_lo, static_cast<int64_t>(m0) + seq.shift - a.window_left);
  if (a.window_right >= 0) j_hi = min64(j_hi, static_cast<int64_t>(m0 + rows - 1) + seq.shift + a.window_right + 1);
  const int n_begin = j_hi > j_lo ? static_cast<int>(j_lo / kBlockN) : 0;
  const int n_end = j_hi > j_lo ? static_cast<int>((j_hi + kBlockN - 1) / kBlockN) : 0;

  unsigned char* smem = simt::dynamic_smem<unsigned char>();
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kBlockM * kPitch;
  T* sK = sdO + kBlockM * kPitch;
  T* sV = sK + Tr::kStages * kBlockN * kPitch;
  float* scratch = reinterpret_cast<float*>(sV + Tr::kStages * kBlockN * kPitch) + warp * 16 * Tr::kScratchPitch;
  float* sMask = reinterpret_cast<float*>(sV + Tr::kStages * kBlockN * kPitch) +
                 (Tr::kTensorCores ? 0 : 16 * Tr::kWarps * Tr::kScratchPitch);

  load_tile<T, kBlockM, kDim, kPitch, kThreads>(sQ, row_pointer<const T>(a.q, a.q_stride, b, h, seq.q_row0 + m0),
                                                a.q_stride[2], rows, a.dim_qk, a.vector_io, tid);
  load_tile<T, kBlockM, kDim, kPitch, kThreads>(sdO, row_pointer<const T>(a.dout, a.dout_stride, b, h, seq.q_row0 + m0),
                                                a.dout_stride[2], rows, a.dim_v, a.vector_io, tid);
  const T* k = row_pointer<const T>(a.k, a.k_stride, b, kvh, seq.k_row0);
  const T* v = row_pointer<const T>(a.v, a.v_stride, b, kvh, seq.k_row0);
  auto load_kv = [&](int n, int stage) {
    const int n0 = n * kBlockN, keys = min(kBlockN, seq.len_k - n0);
    load_tile<T, kBlockN, kDim, kPitch, kThreads>(sK + stage * kBlockN * kPitch, k + n0 * a.k_stride[2], a.k_stride[2],
                                                  keys, a.dim_qk, a.vector_io, tid);
    load_tile<T, kBlockN, kDim, kPitch, kThreads>(sV + stage * kBlockN * kPitch, v + n0 * a.v_stride[2], a.v_stride[2],
                                                  keys, a.dim_v, a.vector_io, tid);
    if (mods.mask_kind != 0)
      load_mask_tile<kBlockM, kBlockN, Tr::kMaskPitch, kThreads>(sMask + stage * kBlockM * Tr::kMaskPitch, mods, m0, n0, tid);
  };
  if (n_begin < n_end) load_kv(n_begin, 0);
  simt::cp_async_commit();

  const int64_t row_i[2] = {static_cast<int64_t>(m0) + row_warp * 16 + g, static_cast<int64_t>(m0) + row_warp * 16 + g + 8};
  float lse_log2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool valid = row_i[r] < seq.len_q;
    lse_log2[r] = valid ? *row_pointer<const float>(a.lse, a.lse_stride, b, h, seq.q_row0 + row_i[r]) * kLog2e : INFINITY;
    delta[r] = valid ? delta_of(a, b, h, seq.q_row0 + row_i[r]) : 0.0f;
  }

  float acc_dq[kOT][4];
#pragma unroll
  for (int nt = 0; nt < kOT; ++nt) acc_dq[nt][0] = acc_dq[nt][1] = acc_dq[nt][2] = acc_dq[nt][3] = 0.0f;

  for (int n = n_begin; n < n_end; ++n) {
    const int stage = Tr::kStages == 2 ? (n - n_begin) & 1 : 0;
    if constexpr (Tr::kStages == 2) {
      if (n + 1 < n_end) load_kv(n + 1, stage ^ 1);
      simt::cp_async_commit();
      simt::cp_async_wait<1>();
    } else {
      simt::cp_async_wait<0>();
    }
    __syncthreads();
    const T* sKs = sK + stage * kBlockN * kPitch;
    const T* sVs = sV + stage * kBlockN * kPitch;
    const int n0 = n * kBlockN;

    float s[kNT][4], dp[kNT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.0f;
    warp_gemm_abt<kDim>(s, sQ + row_warp * 16 * kPitch, kPitch, sKs, kPitch, a.dim_qk);
    warp_gemm_abt<kDim>(dp, sdO + row_warp * 16 * kPitch, kPitch, sVs, kPitch, a.dim_v);

    const bool plain = mods.elementwise_free() && n0 + kBlockN <= seq.len_k &&
                       mods.tile_inside_window(m0, m0 + rows, n0, n0 + kBlockN);
    const RowSpan span[2] = {mods.query_row(row_i[0], n0, kBlockN), mods.query_row(row_i[1], n0, kBlockN)};
    const float* mask_row = sMask + (stage * kBlockM + row_warp * 16 + g) * Tr::kMaskPitch;
    const uint32_t keep = dropout_bits_rows<kNT>(drop, row_i, n0);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * t + (e & 1), r = e >> 1;
        float grad;
        float sc = mods.capped(s[nt][e], grad);
        if (!plain) {
          const float mask_value = mods.mask_kind != 0 ? mask_row[r * 8 * Tr::kMaskPitch + col] : 0.0f;
          sc = mods.finish(sc, col, span[r], mask_value);
        }
        const float p = sc == -INFINITY ? 0.0f : exp2f(sc * kLog2e - lse_log2[r]);
        const float z = drop.on ? drop.factor(keep, 2 * (r * kNT + nt) + (e & 1)) : 1.0f;
        s[nt][e] = p * (dp[nt][e] * z - delta[r]) * grad;  // dS
      }
    }
    warp_gemm_cb<kNT>(acc_dq, s, scratch, Tr::kScratchPitch, sKs + col0, kPitch, a.dim_qk - col0);
    __syncthreads();
    if constexpr (Tr::kStages == 1) {
      if (n + 1 < n_end) load_kv(n + 1, 0);
      simt::cp_async_commit();
    }
  }

  simt::cp_async_wait<0>();
  __syncthreads();
  T* sdQ = sQ + row_warp * 16 * kPitch + col0;  // this warp's rows and columns of sQ, no longer read
  store_accumulators<T, kOT>(sdQ, kPitch, acc_dq, a.scale, a.scale);
  __syncwarp();
  const int warp_row0 = m0 + row_warp * 16;
  store_tile<T, 16, Tr::kOutCols, kPitch, 32>(row_pointer<T>(a.dq, a.dq_stride, b, h, seq.q_row0 + warp_row0) + col0,
                                              a.dq_stride[2], sdQ, min(16, seq.len_q - warp_row0), a.dim_qk - col0,
                                              a.vector_io, lane);
}

KernelArgs backward_args(const AttentionBackwardParams& p) {
  KernelArgs a = make_kernel_args(p.fwd);
  const size_t elem = dtype_size(p.fwd.dtype);
  a.dout = p.dout;
  a.dq = p.dq;
  a.dk = p.dk;
  a.dv = p.dv;
  for (int i = 0; i < 3; ++i) {
    a.dout_stride[i] = p.dout_stride[i];
    a.dq_stride[i] = p.dq_stride[i];
    a.dk_stride[i] = p.dk_stride[i];
    a.dv_stride[i] = p.dv_stride[i];
  }
  a.vector_io = a.vector_io && vector_aligned(p.dout, p.dout_stride, elem) && vector_aligned(p.dq, p.dq_stride, elem) &&
                vector_aligned(p.dk, p.dk_stride, elem) && vector_aligned(p.dv, p.dv_stride, elem);
  a.delta = static_cast<float*>(p.workspace);
  return a;
}

}  // namespace attn

size_t attention_backward_workspace_bytes(const AttentionBackwardParams& p) {
  // delta, laid out as the lse (whose strides the caller sets: for varlen, lse_stride[1] is the total rows).
  const int64_t rows = p.fwd.cu_seqlens_q != nullptr ? p.fwd.lse_stride[1] : p.fwd.batch * p.fwd.len_q;
  return static_cast<size_t>(rows * p.fwd.heads_q) * sizeof(float);
}

void attention_backward(const AttentionBackwardParams& p, cudaStream_t stream) {
  attn::check_head_dims(p.fwd);
  if (p.workspace_bytes < attention_backward_workspace_bytes(p) || (p.workspace == nullptr && p.workspace_bytes > 0))
    throw std::invalid_argument("fusedops: attention backward workspace too small");
  if (p.fwd.batch == 0) return;
  const attn::KernelArgs args = attn::backward_args(p);
  const int dim = static_cast<int>(p.fwd.head_dim > p.fwd.head_dim_v ? p.fwd.head_dim : p.fwd.head_dim_v);
  attn::dispatch_dtype(p.fwd.dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    if (p.fwd.len_q > 0 && p.fwd.heads_q > 0) {
      const unsigned grid = attn::grid_size((p.fwd.len_q + attn::kDeltaRows - 1) / attn::kDeltaRows, p.fwd.heads_q, p.fwd.batch);
      SIMT_LAUNCH((attn::attention_backward_delta_kernel<T>), grid, 4 * attn::kDeltaRows, 0, stream, args);
    }
    attn::dispatch_head_dim<std::is_same<T, float>::value>(dim, [&](auto dim_tag) {
      constexpr int kDim = decltype(dim_tag)::value;
      const bool masked = args.mask_kind != 0;
      if (p.fwd.len_kv > 0 && p.fwd.heads_kv > 0) {
        attn::with_tiles<attn::BackwardKVTraits, T, kDim>("backward (dK, dV)", masked, [&](auto tiles, size_t smem) {
          using Tr = decltype(tiles);
          const unsigned grid = attn::grid_size((p.fwd.len_kv + Tr::kBlockN - 1) / Tr::kBlockN, p.fwd.heads_kv, p.fwd.batch);
          attn::prepare_smem(attn::attention_backward_dkdv_kernel<T, kDim, Tr::kCompact>, smem);
          SIMT_LAUNCH((attn::attention_backward_dkdv_kernel<T, kDim, Tr::kCompact>), grid, Tr::kThreads, smem, stream, args);
        });
      }
      if (p.fwd.len_q > 0 && p.fwd.heads_q > 0) {
        attn::with_tiles<attn::BackwardQTraits, T, kDim>("backward (dQ)", masked, [&](auto tiles, size_t smem) {
          using Tr = decltype(tiles);
          const unsigned grid = attn::grid_size((p.fwd.len_q + Tr::kBlockM - 1) / Tr::kBlockM, p.fwd.heads_q, p.fwd.batch);
          attn::prepare_smem(attn::attention_backward_dq_kernel<T, kDim, Tr::kCompact>, smem);
          SIMT_LAUNCH((attn::attention_backward_dq_kernel<T, kDim, Tr::kCompact>), grid, Tr::kThreads, smem, stream, args);
        });
      }
    });
  });
}

}  // namespace fusedops::FUSEDOPS_BACKEND
