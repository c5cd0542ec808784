// torch.ops.fusedops.attention_forward / attention_backward: argument checks, output allocation and
// dispatch to the CPU kernel, the emulated CUDA kernels or the CUDA kernels (csrc/kernels/attention.h).
//
// attention_forward's `deterministic` is not used by the forward itself: it records, for the autograd
// formula registered in Python (which sees only the forward's inputs), how the backward should run.
//
// The Python layer (fusedops/attention.py) normalizes what users pass (masks expanded to
// (B, Hq, L, S) with 0 strides where they broadcast, scale resolved, windows from is_causal); this
// layer checks everything again, because torch.ops.fusedops.* can be called directly.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "binding/common.h"
#include "kernels/attention.h"

namespace fusedops {
namespace {

constexpr const char* kFwd = "fusedops.attention_forward";
constexpr const char* kBwd = "fusedops.attention_backward";

// Strides of (batch, head, row). A dimension of size 1 is never stepped: its stride, which torch leaves
// arbitrary (e.g. 1 after an unsqueeze), is passed as 0 so it cannot cost the CUDA kernels their 16-byte
// vector copies.
void strides3(const at::Tensor& t, bool varlen, int64_t (&s)[3]) {
  auto stride = [&](int64_t dim) { return t.size(dim) == 1 ? 0 : t.stride(dim); };
  if (varlen) {  // (total, H, D)
    s[0] = 0;
    s[1] = stride(1);
    s[2] = stride(0);
  } else {  // (B, H, L, D)
    s[0] = stride(0);
    s[1] = stride(1);
    s[2] = stride(2);
  }
}

at::Tensor unit_last_stride(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

struct Inputs {
  at::Tensor q, k, v, mask, alibi, cu_q, cu_k;
  bool varlen = false;
};

// Checks the forward's arguments and fills everything of AttentionForwardParams but the outputs.
AttentionForwardParams forward_params(const char* op, Backend b, Inputs& in, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                      double scale, double softcap, int64_t window_left, int64_t window_right,
                                      bool bottom_right, double dropout_p, int64_t dropout_seed) {
  const bool varlen = in.varlen;
  const int64_t dims = varlen ? 3 : 4;
  const char* layout = varlen ? "(total, heads, head_dim)" : "(batch, heads, seq, head_dim)";
  TORCH_CHECK_VALUE(in.q.dim() == dims, op, ": query must be ", layout, ", got shape ", in.q.sizes());
  TORCH_CHECK_VALUE(in.k.dim() == dims, op, ": key must be ", layout, ", got shape ", in.k.sizes());
  TORCH_CHECK_VALUE(in.v.dim() == dims, op, ": value must be ", layout, ", got shape ", in.v.sizes());
  if (b == Backend::cpu) {
    check_dtype(in.q, op, "query", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  } else {
    check_dtype(in.q, op, "query", {at::kFloat, at::kHalf, at::kBFloat16});
  }
  TORCH_CHECK_TYPE(in.k.scalar_type() == in.q.scalar_type() && in.v.scalar_type() == in.q.scalar_type(), op,
                   ": query, key and value must have the same dtype, got ", in.q.scalar_type(), ", ",
                   in.k.scalar_type(), " and ", in.v.scalar_type());
  check_device(b, in.q, op, "query");
  check_same_device(in.k, in.q, op, "key", "query");
  check_same_device(in.v, in.q, op, "value", "query");
  in.q = unit_last_stride(in.q);
  in.k = unit_last_stride(in.k);
  in.v = unit_last_stride(in.v);

  AttentionForwardParams p;
  p.dtype = dtype_code(in.q.scalar_type());
  const int64_t hd = 1;  // the heads dimension: (batch, heads, seq, dim) and (total, heads, dim) alike
  p.heads_q = in.q.size(hd);
  p.heads_kv = in.k.size(hd);
  p.head_dim = in.q.size(-1);
  p.head_dim_v = in.v.size(-1);
  TORCH_CHECK_VALUE(in.k.size(-1) == p.head_dim, op, ": key's head dim ", in.k.size(-1), " differs from query's ",
                    p.head_dim);
  TORCH_CHECK_VALUE(in.v.size(hd) == p.heads_kv, op, ": value has ", in.v.size(hd), " heads but key has ", p.heads_kv);
  TORCH_CHECK_VALUE(p.heads_kv > 0 && p.heads_q % p.heads_kv == 0, op, ": the number of query heads (", p.heads_q,
                    ") must be a multiple of the number of key/value heads (", p.heads_kv, ")");
  if (b != Backend::cpu) {
    for (auto [d, name] : {std::pair{p.head_dim, "query/key"}, std::pair{p.head_dim_v, "value"}})
      TORCH_CHECK_VALUE(d >= 8 && d <= 256 && d % 8 == 0, op, ": the CUDA kernels take ", name,
                        " head dims that are multiples of 8 from 8 to 256, got ", d);
  }
  if (varlen) {
    TORCH_CHECK_VALUE(in.k.size(0) == in.v.size(0), op, ": key and value have ", in.k.size(0), " and ", in.v.size(0),
                      " rows");
    for (auto [t, name] : {std::pair{&in.cu_q, "cu_seqlens_q"}, std::pair{&in.cu_k, "cu_seqlens_k"}}) {
      TORCH_CHECK_VALUE(t->defined(), op, ": varlen attention needs ", name);
      TORCH_CHECK_TYPE(t->scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t->scalar_type());
      TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) >= 1, op, ": ", name, " must be 1-D (batch + 1), got shape ",
                        t->sizes());
      check_same_device(*t, in.q, op, name, "query");
      *t = t->contiguous();
    }
    TORCH_CHECK_VALUE(in.cu_q.size(0) == in.cu_k.size(0), op, ": cu_seqlens_q and cu_seqlens_k must have the same length");
    TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0 && max_seqlen_q <= INT32_MAX && max_seqlen_k <= INT32_MAX, op,
                      ": max_seqlen_q and max_seqlen_k must be in [0, 2^31), got ", max_seqlen_q, " and ", max_seqlen_k);
    // Offsets in host memory (cpu and cuda-emulated backends) are checked here: the kernels trust them.
    // On a GPU that would need a synchronization, so there they are the caller's responsibility.
    if (in.cu_q.device().is_cpu()) {
      for (auto [t, name, total, max_len, max_name] :
           {std::tuple{&in.cu_q, "cu_seqlens_q", in.q.size(0), max_seqlen_q, "max_seqlen_q"},
            std::tuple{&in.cu_k, "cu_seqlens_k", in.k.size(0), max_seqlen_k, "max_seqlen_k"}}) {
        const int32_t* c = t->data_ptr<int32_t>();
        const int64_t n = t->size(0);
        TORCH_CHECK_VALUE(c[0] == 0 && c[n - 1] == total, op, ": ", name, " must rise from 0 to the number of packed rows (",
                          total, "), got ", c[0], " .. ", c[n - 1]);
        for (int64_t b = 0; b + 1 < n; ++b) {
          TORCH_CHECK_VALUE(c[b + 1] >= c[b], op, ": ", name, " must be non-decreasing, got ", c[b], " then ", c[b + 1]);
          TORCH_CHECK_VALUE(c[b + 1] - c[b] <= max_len, op, ": sequence ", b, " has ", c[b + 1] - c[b], " rows, more than ",
                            max_name, " = ", max_len);
        }
      }
    }
    p.batch = in.cu_q.size(0) - 1;
    p.len_q = max_seqlen_q;
    p.len_kv = max_seqlen_k;
    p.cu_seqlens_q = in.cu_q.data_ptr<int32_t>();
    p.cu_seqlens_k = in.cu_k.data_ptr<int32_t>();
  } else {
    p.batch = in.q.size(0);
    p.len_q = in.q.size(2);
    p.len_kv = in.k.size(2);
    TORCH_CHECK_VALUE(in.k.size(0) == p.batch && in.v.size(0) == p.batch, op, ": query, key and value batch sizes differ (",
                      p.batch, ", ", in.k.size(0), ", ", in.v.size(0), ")");
    TORCH_CHECK_VALUE(in.v.size(2) == p.len_kv, op, ": key has ", p.len_kv, " positions but value has ", in.v.size(2));
  }
  strides3(in.q, varlen, p.q_stride);
  strides3(in.k, varlen, p.k_stride);
  strides3(in.v, varlen, p.v_stride);
  p.q = in.q.data_ptr();
  p.k = in.k.data_ptr();
  p.v = in.v.data_ptr();

  // The kernels take these as float32: a double beyond its range would become inf there.
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(scale)), op, ": scale must be finite as a float32, got ", scale);
  TORCH_CHECK_VALUE(softcap >= 0 && std::isfinite(static_cast<float>(softcap)), op,
                    ": softcap must be >= 0 (0 = off) and finite as a float32, got ", softcap);
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  // j - i - shift lies within ±(2^31 - 1) (lengths are below 2^31), so a larger bound cuts nothing; clamped,
  // the kernels' index arithmetic (in int32 on some paths, i ± shift ± bound in int64) cannot overflow.
  const auto bound = [](int64_t w) { return w < 0 ? int64_t{-1} : std::min<int64_t>(w, INT32_MAX); };
  p.window_left = bound(window_left);
  p.window_right = bound(window_right);
  p.bottom_right = bottom_right;
  p.dropout_p = static_cast<float>(dropout_p);
  p.dropout_seed = static_cast<uint64_t>(dropout_seed);

  if (in.alibi.defined()) {
    TORCH_CHECK_TYPE(in.alibi.scalar_type() == at::kFloat, op, ": alibi_slopes must be float32, got ",
                     in.alibi.scalar_type());
    check_same_device(in.alibi, in.q, op, "alibi_slopes", "query");
    in.alibi = in.alibi.contiguous();
    const bool per_head = in.alibi.dim() == 1 && in.alibi.size(0) == p.heads_q;
    const bool per_batch_head = in.alibi.dim() == 2 && in.alibi.size(0) == p.batch && in.alibi.size(1) == p.heads_q;
    TORCH_CHECK_VALUE(per_head || per_batch_head, op, ": alibi_slopes must have shape (", p.heads_q, ") or (", p.batch,
                      ", ", p.heads_q, "), got ", in.alibi.sizes());
    p.alibi_slopes = in.alibi.data_ptr<float>();
    p.alibi_batch_stride = per_batch_head ? p.heads_q : 0;
  }

  if (in.mask.defined()) {
    TORCH_CHECK_VALUE(!varlen, op, ": masks are not supported with variable-length sequences");
    const auto mt = in.mask.scalar_type();
    TORCH_CHECK_TYPE(mt == at::kBool || mt == at::kFloat || mt == in.q.scalar_type(), op,
                     ": attn_mask must be bool, float32 or the query's dtype (", in.q.scalar_type(), "), got ", mt);
    TORCH_CHECK_VALUE(in.mask.dim() == 4 && in.mask.size(0) == p.batch && in.mask.size(1) == p.heads_q &&
                          in.mask.size(2) == p.len_q && in.mask.size(3) == p.len_kv,
                      op, ": attn_mask must be expanded to (", p.batch, ", ", p.heads_q, ", ", p.len_q, ", ", p.len_kv,
                      "), got ", in.mask.sizes());
    check_same_device(in.mask, in.q, op, "attn_mask", "query");
    p.mask_kind = mt == at::kBool ? AttentionMask::boolean : AttentionMask::additive;
    p.mask_dtype = mt == at::kBool ? DType::f32 : dtype_code(in.mask.scalar_type());
    p.mask = in.mask.data_ptr();
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = in.mask.size(i) == 1 ? 0 : in.mask.stride(i);
  }
  return p;
}

void dispatch_forward(Backend b, const AttentionForwardParams& p, const at::Tensor& like) {
  switch (b) {
    case Backend::cpu: {
      auto run = [&]() { FUSEDOPS_CPU_DISPATCH(attention_forward(p)) };
      run();
      break;
    }
    case Backend::emulated: emu::attention_forward(p, nullptr); break;
    case Backend::cuda: {
#if defined(FUSEDOPS_WITH_CUDA)
      LaunchScope scope(b, like);
      cuda::attention_forward(p, scope.stream());
#endif
      break;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& attn_mask,
                                                     const std::optional<at::Tensor>& alibi_slopes,
                                                     const std::optional<at::Tensor>& cu_seqlens_q,
                                                     const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                                     int64_t max_seqlen_k, double scale, double softcap,
                                                     int64_t window_left, int64_t window_right, bool bottom_right,
                                                     double dropout_p, int64_t dropout_seed, int64_t backend,
                                                     bool /*deterministic: read by the autograd formula*/) {
  const Backend b = to_backend(backend, kFwd);
  Inputs in{q, k, v, attn_mask.value_or(at::Tensor()), alibi_slopes.value_or(at::Tensor()),
            cu_seqlens_q.value_or(at::Tensor()), cu_seqlens_k.value_or(at::Tensor()), cu_seqlens_q.has_value()};
  AttentionForwardParams p = forward_params(kFwd, b, in, max_seqlen_q, max_seqlen_k, scale, softcap, window_left,
                                            window_right, bottom_right, dropout_p, dropout_seed);
  const auto lse_dtype = p.dtype == DType::f64 ? at::kDouble : at::kFloat;
  at::Tensor out, lse;
  if (in.varlen) {
    const int64_t total_q = in.q.size(0);
    out = new_output({total_q, p.heads_q, p.head_dim_v}, in.q.options());
    lse = new_output({p.heads_q, total_q}, in.q.options().dtype(lse_dtype));
    p.lse_stride[0] = 0;
    p.lse_stride[1] = total_q;
    p.lse_stride[2] = 1;
  } else {
    out = new_output({p.batch, p.heads_q, p.len_q, p.head_dim_v}, in.q.options());
    lse = new_output({p.batch, p.heads_q, p.len_q}, in.q.options().dtype(lse_dtype));
    p.lse_stride[0] = p.heads_q * p.len_q;
    p.lse_stride[1] = p.len_q;
    p.lse_stride[2] = 1;
  }
  strides3(out, in.varlen, p.o_stride);
  p.o = out.data_ptr();
  p.lse = lse.data_ptr();
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  dispatch_forward(b, p, in.q);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, double softcap, int64_t window_left, int64_t window_right, bool bottom_right,
    double dropout_p, int64_t dropout_seed, bool deterministic, int64_t backend) {
  const Backend b = to_backend(backend, kBwd);
  Inputs in{q, k, v, attn_mask.value_or(at::Tensor()), alibi_slopes.value_or(at::Tensor()),
            cu_seqlens_q.value_or(at::Tensor()), cu_seqlens_k.value_or(at::Tensor()), cu_seqlens_q.has_value()};
  AttentionBackwardParams p;
  p.fwd = forward_params(kBwd, b, in, max_seqlen_q, max_seqlen_k, scale, softcap, window_left, window_right,
                         bottom_right, dropout_p, dropout_seed);
  const auto lse_dtype = p.fwd.dtype == DType::f64 ? at::kDouble : at::kFloat;
  check_dtype(out, kBwd, "out", {in.q.scalar_type()});
  check_dtype(dout, kBwd, "grad_out", {in.q.scalar_type()});
  check_dtype(lse, kBwd, "lse", {lse_dtype});
  for (auto [t, name] : {std::pair{&out, "out"}, std::pair{&dout, "grad_out"}, std::pair{&lse, "lse"}})
    check_same_device(*t, in.q, kBwd, name, "query");
  const auto expected_out = in.varlen ? std::vector<int64_t>{in.q.size(0), p.fwd.heads_q, p.fwd.head_dim_v}
                                      : std::vector<int64_t>{p.fwd.batch, p.fwd.heads_q, p.fwd.len_q, p.fwd.head_dim_v};
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(expected_out), kBwd, ": out must have shape ",
                    at::IntArrayRef(expected_out), ", got ", out.sizes());
  TORCH_CHECK_VALUE(dout.sizes() == out.sizes(), kBwd, ": grad_out has shape ", dout.sizes(), " but out has ",
                    out.sizes());
  const auto expected_lse = in.varlen ? std::vector<int64_t>{p.fwd.heads_q, in.q.size(0)}
                                      : std::vector<int64_t>{p.fwd.batch, p.fwd.heads_q, p.fwd.len_q};
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(expected_lse), kBwd, ": lse must have shape ",
                    at::IntArrayRef(expected_lse), ", got ", lse.sizes());
  const at::Tensor out_c = unit_last_stride(out), dout_c = unit_last_stride(dout), lse_c = lse.contiguous();
  p.fwd.o = const_cast<void*>(out_c.data_ptr());
  strides3(out_c, in.varlen, p.fwd.o_stride);
  p.fwd.lse = const_cast<void*>(lse_c.data_ptr());
  if (in.varlen) {
    p.fwd.lse_stride[0] = 0;
    p.fwd.lse_stride[1] = in.q.size(0);
  } else {
    p.fwd.lse_stride[0] = p.fwd.heads_q * p.fwd.len_q;
    p.fwd.lse_stride[1] = p.fwd.len_q;
  }
  p.fwd.lse_stride[2] = 1;
  p.dout = dout_c.data_ptr();
  strides3(dout_c, in.varlen, p.dout_stride);

  at::Tensor dq = new_output(in.q.sizes(), in.q.options());
  at::Tensor dk = new_output(in.k.sizes(), in.k.options());
  at::Tensor dv = new_output(in.v.sizes(), in.v.options());
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  strides3(dq, in.varlen, p.dq_stride);
  strides3(dk, in.varlen, p.dk_stride);
  strides3(dv, in.varlen, p.dv_stride);
  p.deterministic = deterministic;
  if (dq.numel() == 0 && dk.numel() == 0 && dv.numel() == 0) return {dq, dk, dv};

  at::Tensor workspace;
  switch (b) {
    case Backend::cpu: {
      auto run = [&]() { FUSEDOPS_CPU_DISPATCH(attention_backward(p)) };
      run();
      break;
    }
    case Backend::emulated: {
      p.workspace_bytes = emu::attention_backward_workspace_bytes(p);
      workspace = new_output({static_cast<int64_t>(p.workspace_bytes)}, in.q.options().dtype(at::kByte));
      p.workspace = workspace.data_ptr();
      emu::attention_backward(p, nullptr);
      break;
    }
    case Backend::cuda: {
#if defined(FUSEDOPS_WITH_CUDA)
      LaunchScope scope(b, in.q);
      p.workspace_bytes = cuda::attention_backward_workspace_bytes(p);
      workspace = new_output({static_cast<int64_t>(p.workspace_bytes)}, in.q.options().dtype(at::kByte));
      p.workspace = workspace.data_ptr();
      cuda::attention_backward(p, scope.stream());
#endif
      break;
    }
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fusedops

TORCH_LIBRARY_FRAGMENT(fusedops, m) {
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? alibi_slopes, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, float softcap, "
      "int window_left, int window_right, bool bottom_right, float dropout_p, int dropout_seed, int backend, "
      "bool deterministic=True) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, "
      "Tensor? alibi_slopes, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "float scale, float softcap, int window_left, int window_right, bool bottom_right, float dropout_p, "
      "int dropout_seed, bool deterministic, int backend) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

TORCH_LIBRARY_IMPL(fusedops, CPU, m) {
  m.impl("attention_forward", &fusedops::attention_forward);
  m.impl("attention_backward", &fusedops::attention_backward);
}

#if defined(FUSEDOPS_WITH_CUDA)
TORCH_LIBRARY_IMPL(fusedops, CUDA, m) {
  m.impl("attention_forward", &fusedops::attention_forward);
  m.impl("attention_backward", &fusedops::attention_backward);
}
#endif
