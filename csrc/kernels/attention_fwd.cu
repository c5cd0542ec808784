// Attention forward, CUDA: o = softmax(mods(scale · q kᵀ)) v and lse = log Σ exp(scores) per row, with
// every modifier of attention.h (softcap, ALiBi, boolean/additive masks, sliding windows with either
// alignment, GQA/MQA, Philox dropout, varlen).
//
// Algorithm: FlashAttention-2 (Dao, 2023, arXiv:2307.08691). One block per (64-row Q tile (32 in fp32's
// compact configuration at head dim 256), query head, batch entry); each warp owns 16 query rows. K/V
// tiles stream through shared memory in a two-stage cp.async pipeline (the next tile loads while this one
// is used); S = Q Kᵀ and O += P V run on tensor
// cores (mma.sync m16n8k16 with ldmatrix, .trans for V) for fp16/bf16, P staying in registers between
// the two products; the softmax is online with fp32 running max and sum per row. Tiles a causal or
// sliding window cannot see are never loaded; only tiles crossing a window edge, the sequence end, or
// carrying a mask or ALiBi take the per-element path. fp32 inputs run the same algorithm with FMA
// products (attention_common.cuh), for exactness rather than speed.
//
// Masks are staged per tile in shared memory as fp32 additive terms (coalesced loads, one float per
// element in the inner loop whatever the mask's kind or dtype).
//
// Limits: head dims multiples of 8 in [8, 256] (q/k and v may differ; the tile width is the larger
// rounded up to 32 — 8 instantiations for fp16/bf16, 3 for fp32 — and zero-padded 16-column slices are
// skipped). Up to 150 KiB of shared memory per block (sm_80, sm_90); on 99 KiB GPUs (sm_86/89/120) the
// instantiations that need more use compact tiles (ForwardTraits' kCompact, picked by with_tiles).
// Rows that are not 16-byte aligned fall back to element-wise copies. No Hopper (wgmma/TMA) path yet:
// the tile configuration lives in ForwardTraits so one can be added next to this one.
#include "attention_common.cuh"

namespace fusedops::FUSEDOPS_BACKEND {
namespace attn {

template <class T, int kDim_, bool kCompact_>
struct ForwardTraits {
  static constexpr bool kTensorCores = sizeof(T) == 2;
  static constexpr int kDim = kDim_;
  // Compact (GPUs with 99 KiB of shared memory per block, attention_common.cuh): key tiles of half the
  // width; fp32 at kDim 256, whose key tiles are already 16 wide, gets 32-row query tiles and one stage.
  static constexpr bool kCompact = kCompact_;
  static constexpr bool kFitsSmallGpus = true;
  static constexpr bool kCompactRows = kCompact && !kTensorCores && kDim > 128;
  static constexpr int kRowWarps = kCompactRows ? 2 : 4;  // each owns 16 query rows
  // fp32 at kDim 256 splits the output columns between two warps per 16 rows (both compute the same
  // scores): 128 fp32 accumulators plus the FMA path's operands do not fit one thread's registers.
  static constexpr int kColSplit = !kTensorCores && kDim > 128 ? 2 : 1;
  static constexpr int kOutCols = kDim / kColSplit;
  static constexpr int kWarps = kRowWarps * kColSplit;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kRowWarps;
  // Score tile width: the accumulators (kDim / 2 floats per thread for O, kBlockN / 2 for S) must stay
  // in registers at kDim 256; fp32 needs more registers around its FMA products than mma does.
  static constexpr int kBlockN =
      (kDim <= 128 ? (kTensorCores ? 64 : 32) : (kTensorCores ? 32 : 16)) / (kCompact && !kCompactRows ? 2 : 1);
  static constexpr int kStages = kCompactRows ? 1 : 2;
  static constexpr int kPitch = kDim + 16 / static_cast<int>(sizeof(T));  // 16-byte skew: conflict-free ldmatrix
  static constexpr int kScratchPitch = kBlockN + 4;                        // fp32 P staging
  static constexpr size_t kTileBytes = sizeof(T) * static_cast<size_t>(kPitch);
  static constexpr size_t kSmemBytes = kTileBytes * (kBlockM + 2 * kStages * kBlockN) +
                                       (kTensorCores ? 0 : sizeof(float) * 16 * kWarps * kScratchPitch);
  // Masked calls also stage each tile's mask as fp32 (allocated only when there is a mask).
  static constexpr int kMaskPitch = kBlockN + 4;
  static constexpr size_t kMaskBytes = sizeof(float) * kStages * kBlockM * kMaskPitch;
  static_assert(kSmemBytes + kMaskBytes <= kMaxSmemBytes, "shared memory beyond sm_80's limit");
};

template <class T, int kDim, bool kCompact>
__global__ void FUSEDOPS_LAUNCH_BOUNDS(ForwardTraits<T, kDim, kCompact>::kThreads, 1)
    attention_forward_kernel(const KernelArgs a) {
  using Tr = ForwardTraits<T, kDim, kCompact>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kPitch = Tr::kPitch, kThreads = Tr::kThreads;
  constexpr int kNT = kBlockN / 8;  // score n-tiles per warp
  constexpr int kOT = Tr::kOutCols / 8;  // output n-tiles per warp

  const BlockCoord at = block_coord((a.len_q + kBlockM - 1) / kBlockM, a.heads_q);
  const int b = at.batch, h = at.head, kvh = h / a.group;
  const Sequence seq = sequence_of(a, b);
  const int m0 = at.tile * kBlockM;
  if (m0 >= seq.len_q) return;  // past this sequence's end (varlen): the whole block leaves together
  const int rows = min(kBlockM, seq.len_q - m0);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int row_warp = warp % Tr::kRowWarps, col0 = warp / Tr::kRowWarps * Tr::kOutCols;
  const ScoreMods mods = score_mods_of(a, seq, b, h);
  const Dropout drop = dropout_of(a, b, h);

  // Keys any row of this tile can see: the window bounds the loop, so invisible tiles cost nothing.
  int64_t j_lo = 0, j_hi = seq.len_k;
  if (a.window_left >= 0) j_lo = max64(j_lo, static_cast<int64_t>(m0) + seq.shift - a.window_left);
  if (a.window_right >= 0) j_hi = min64(j_hi, static_cast<int64_t>(m0 + rows - 1) + seq.shift + a.window_right + 1);
  const int n_begin = j_hi > j_lo ? static_cast<int>(j_lo / kBlockN) : 0;
  const int n_end = j_hi > j_lo ? static_cast<int>((j_hi + kBlockN - 1) / kBlockN) : 0;

  unsigned char* smem = simt::dynamic_smem<unsigned char>();
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kBlockM * kPitch;
  T* sV = sK + Tr::kStages * kBlockN * kPitch;
  float* scratch = reinterpret_cast<float*>(sV + Tr::kStages * kBlockN * kPitch) + warp * 16 * Tr::kScratchPitch;
  float* sMask = reinterpret_cast<float*>(sV + Tr::kStages * kBlockN * kPitch) +
                 (Tr::kTensorCores ? 0 : 16 * Tr::kWarps * Tr::kScratchPitch);

  const T* q = row_pointer<const T>(a.q, a.q_stride, b, h, seq.q_row0 + m0);
  const T* k = row_pointer<const T>(a.k, a.k_stride, b, kvh, seq.k_row0);
  const T* v = row_pointer<const T>(a.v, a.v_stride, b, kvh, seq.k_row0);
  load_tile<T, kBlockM, kDim, kPitch, kThreads>(sQ, q, a.q_stride[2], rows, a.dim_qk, a.vector_io, tid);
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

  float acc_o[kOT][4];
#pragma unroll
  for (int nt = 0; nt < kOT; ++nt) acc_o[nt][0] = acc_o[nt][1] = acc_o[nt][2] = acc_o[nt][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  const int64_t row_i[2] = {static_cast<int64_t>(m0) + row_warp * 16 + g, static_cast<int64_t>(m0) + row_warp * 16 + g + 8};

  for (int n = n_begin; n < n_end; ++n) {
    const int stage = Tr::kStages == 2 ? (n - n_begin) & 1 : 0;
    if constexpr (Tr::kStages == 2) {
      if (n + 1 < n_end) load_kv(n + 1, stage ^ 1);  // into the buffer the previous iteration released
      simt::cp_async_commit();
      simt::cp_async_wait<1>();
    } else {
      simt::cp_async_wait<0>();
    }
    __syncthreads();
    const T* sKs = sK + stage * kBlockN * kPitch;
    const T* sVs = sV + stage * kBlockN * kPitch;
    const int n0 = n * kBlockN;

    float s[kNT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
    warp_gemm_abt<kDim>(s, sQ + row_warp * 16 * kPitch, kPitch, sKs, kPitch, a.dim_qk);

    const bool plain = mods.elementwise_free() && n0 + kBlockN <= seq.len_k &&
                       mods.tile_inside_window(m0, m0 + rows, n0, n0 + kBlockN);
    if (plain) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float grad;
          s[nt][e] = mods.capped(s[nt][e], grad);
        }
      }
    } else {
      const RowSpan span[2] = {mods.query_row(row_i[0], n0, kBlockN), mods.query_row(row_i[1], n0, kBlockN)};
      const float* mask_row = sMask + (stage * kBlockM + row_warp * 16 + g) * Tr::kMaskPitch;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nt * 8 + 2 * t + (e & 1), r = e >> 1;
          float grad;
          const float capped = mods.capped(s[nt][e], grad);
          const float mask_value = mods.mask_kind != 0 ? mask_row[r * 8 * Tr::kMaskPitch + col] : 0.0f;
          s[nt][e] = mods.finish(capped, col, span[r], mask_value);
        }
      }
    }

    const uint32_t keep = dropout_bits_rows<kNT>(drop, row_i, n0);

    // Online softmax; a row that has seen no visible key yet keeps max -inf and exponentiates
    // against 0, so it produces zeros, never NaN.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      const float m_new = fmaxf(row_max[r], mx);
      const float base = m_new == -INFINITY ? 0.0f : m_new * kLog2e;
      const float correction = exp2f(row_max[r] * kLog2e - base);
      row_max[r] = m_new;
      row_sum[r] *= correction;
#pragma unroll
      for (int nt = 0; nt < kOT; ++nt) {
        acc_o[nt][2 * r] *= correction;
        acc_o[nt][2 * r + 1] *= correction;
      }
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        float p0 = exp2f(s[nt][2 * r] * kLog2e - base), p1 = exp2f(s[nt][2 * r + 1] * kLog2e - base);
        row_sum[r] += p0 + p1;  // the normalizer counts dropped keys too
        if (drop.on) {
          p0 *= drop.factor(keep, 2 * (r * kNT + nt));
          p1 *= drop.factor(keep, 2 * (r * kNT + nt) + 1);
        }
        s[nt][2 * r] = p0;
        s[nt][2 * r + 1] = p1;
      }
    }

    warp_gemm_cb<kNT>(acc_o, s, scratch, Tr::kScratchPitch, sVs + col0, kPitch, a.dim_v - col0);
    __syncthreads();  // every warp is done with this stage's K and V before they are overwritten
    if constexpr (Tr::kStages == 1) {
      if (n + 1 < n_end) load_kv(n + 1, 0);
      simt::cp_async_commit();
    }
  }

  // Epilogue: normalize, write lse, stage O through this warp's rows of sQ for wide stores.
  simt::cp_async_wait<0>();
  __syncthreads();  // sQ's copies (issued by all threads) have landed even when no K tile was visible
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    sum += __shfl_xor_sync(kFullMask, sum, 2);
    const bool empty = row_max[r] == -INFINITY || !(sum > 0.0f);
    inv[r] = empty ? 0.0f : __frcp_rn(sum);
    if (t == 0 && col0 == 0 && row_i[r] < seq.len_q) {
      *row_pointer<float>(a.lse, a.lse_stride, b, h, seq.q_row0 + row_i[r]) = empty ? -INFINITY : row_max[r] + logf(sum);
    }
  }
  T* sO = sQ + row_warp * 16 * kPitch + col0;  // this warp's rows and columns of sQ
  store_accumulators<T, kOT>(sO, kPitch, acc_o, inv[0], inv[1]);
  __syncwarp();
  const int warp_row0 = m0 + row_warp * 16;
  T* o = row_pointer<T>(a.o, a.o_stride, b, h, seq.q_row0 + warp_row0) + col0;
  store_tile<T, 16, Tr::kOutCols, kPitch, 32>(o, a.o_stride[2], sO, min(16, seq.len_q - warp_row0), a.dim_v - col0,
                                             a.vector_io, lane);
}

}  // namespace attn

void attention_forward(const AttentionForwardParams& p, cudaStream_t stream) {
  attn::check_head_dims(p);
  if (p.batch == 0 || p.heads_q == 0 || p.len_q == 0) return;
  const attn::KernelArgs args = attn::make_kernel_args(p);
  const int dim = static_cast<int>(p.head_dim > p.head_dim_v ? p.head_dim : p.head_dim_v);
  attn::dispatch_dtype(p.dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    attn::dispatch_head_dim<std::is_same<T, float>::value>(dim, [&](auto dim_tag) {
      constexpr int kDim = decltype(dim_tag)::value;
      attn::with_tiles<attn::ForwardTraits, T, kDim>("forward", args.mask_kind != 0, [&](auto tiles, size_t smem) {
        using Tr = decltype(tiles);
        const unsigned grid = attn::grid_size((p.len_q + Tr::kBlockM - 1) / Tr::kBlockM, p.heads_q, p.batch);
        attn::prepare_smem(attn::attention_forward_kernel<T, kDim, Tr::kCompact>, smem);
        SIMT_LAUNCH((attn::attention_forward_kernel<T, kDim, Tr::kCompact>), grid, Tr::kThreads, smem, stream, args);
      });
    });
  });
}

}  // namespace fusedops::FUSEDOPS_BACKEND
