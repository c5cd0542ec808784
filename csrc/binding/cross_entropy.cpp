// torch.ops.fusedops.cross_entropy_*: argument checks, output allocation and dispatch to the CPU kernel,
// the emulated CUDA kernels or the CUDA kernels (csrc/kernels/cross_entropy.h).
//
// The Python layer (fusedops/cross_entropy.py) flattens what users pass to (rows, classes) logits and
// (rows,) int64 targets and decides which ops autograd needs; this layer checks everything again, because
// the ops can be called directly.
//
//   cross_entropy_forward        loss (reduced, or per row), lse, and the gradient when grad_mode is 1
//                                (grad_mode only matters to autograd otherwise: see fusedops/cross_entropy.py)
//   cross_entropy_forward_grad_  the same, the gradient written over the logits (linear cross-entropy's
//                                chunk buffers)
//   cross_entropy_backward       the gradient from the saved lse; cross_entropy_backward_ writes it over
//                                the logits (inplace_backward)
//   cross_entropy_stats          per-row partials of a vocabulary shard
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "binding/common.h"
#include "kernels/cross_entropy.h"

namespace fusedops {
namespace {

constexpr const char* kFwd = "fusedops.cross_entropy_forward";
constexpr const char* kFwdGrad = "fusedops.cross_entropy_forward_grad_";
constexpr const char* kBwd = "fusedops.cross_entropy_backward";
constexpr const char* kBwdInplace = "fusedops.cross_entropy_backward_";
constexpr const char* kStats = "fusedops.cross_entropy_stats";

at::ScalarType accum_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Tensors the params point into; kept alive for the duration of the call.
struct Keep {
  at::Tensor logits, target, weight, extra[4];
};

// The transposed layout the CPU forward's in-place gradient also takes (kernels/cross_entropy.h): rows
// contiguous, classes `stride(1)` apart, as the transpose of a contiguous (classes, rows) W @ hᵀ.
bool columns_layout(Backend b, const at::Tensor& logits, double softcap) {
  return b == Backend::cpu && logits.dim() == 2 && logits.scalar_type() != at::kDouble && softcap == 0.0 &&
         logits.size(0) > 1 && logits.size(1) > 1 && logits.stride(0) == 1 && logits.stride(1) >= logits.size(0);
}

// Checks what every entry point shares and fills the params' inputs. `writable`: the logits will be
// written (in-place gradient), so they must be usable as they are (no copy); `columns`: they may be in the
// transposed layout.
CrossEntropyParams prepare(const char* op, Backend b, Keep& keep, const at::Tensor& logits, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
                           double z_loss, double softcap, int64_t class_offset, int64_t total_classes, bool writable,
                           bool columns = false) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D (rows, classes), got shape ", logits.sizes());
  if (b == Backend::cpu) {
    check_dtype(logits, op, "logits", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  } else {
    check_dtype(logits, op, "logits", {at::kFloat, at::kHalf, at::kBFloat16});
  }
  check_device(b, logits, op, "logits");
  const int64_t rows = logits.size(0), classes = logits.size(1);
  TORCH_CHECK_VALUE(classes >= 1, op, ": logits must have at least one class, got shape ", logits.sizes());
  // 2^30, not 2^31 - 1: the CUDA kernels step 32-bit class indices by up to a block's width past the end.
  TORCH_CHECK_VALUE(classes <= (int64_t{1} << 30), op, ": at most 2^30 classes per row, got ", classes);
  const bool unit_stride = classes == 1 || logits.stride(1) == 1;
  const bool rows_apart = rows <= 1 || logits.stride(0) >= classes;
  if (writable && columns) {
    keep.logits = logits;
  } else if (writable) {
    TORCH_CHECK_VALUE(unit_stride && rows_apart, op,
                      ": logits are written in place, so their classes must be contiguous and rows must not overlap "
                      "(got strides ",
                      logits.strides(), ")");
    keep.logits = logits;
  } else {
    keep.logits = unit_stride && logits.stride(0) >= 0 ? logits : logits.contiguous();
  }

  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": target must be int64 class indices, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == rows, op, ": target must have shape (", rows,
                    ",) to match logits ", logits.sizes(), ", got ", target.sizes());
  check_same_device(target, logits, op, "target", "logits");
  keep.target = target.contiguous();

  if (total_classes < 0) total_classes = classes;
  TORCH_CHECK_VALUE(class_offset >= 0 && class_offset + classes <= total_classes, op,
                    ": this shard's classes [", class_offset, ", ", class_offset + classes,
                    ") must lie within [0, total_classes = ", total_classes, ")");

  const auto acc = accum_type(logits);
  if (weight.has_value() && weight->defined()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()), op, ": weight must be a floating tensor, got ",
                     w.scalar_type());
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == total_classes, op, ": weight must have shape (", total_classes,
                      ",) (one weight per class), got ", w.sizes());
    check_same_device(w, logits, op, "weight", "logits");
    keep.weight = w.to(acc).contiguous();
  }

  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(z_loss >= 0.0 && std::isfinite(z_loss), op, ": z_loss must be finite and >= 0, got ", z_loss);
  TORCH_CHECK_VALUE(softcap >= 0.0 && std::isfinite(softcap), op, ": softcap must be finite and >= 0 (0 = off), got ",
                    softcap);

  CrossEntropyParams p;
  p.dtype = dtype_code(logits.scalar_type());
  p.logits = keep.logits.data_ptr();
  p.rows = rows;
  p.classes = classes;
  p.ld = rows <= 1 ? classes : keep.logits.stride(0);
  if (writable && columns) p.class_stride = keep.logits.stride(1);
  p.class_offset = class_offset;
  p.total_classes = total_classes;
  p.target = keep.target.data_ptr<int64_t>();
  p.weight = keep.weight.defined() ? keep.weight.data_ptr() : nullptr;
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.z_loss = z_loss;
  p.softcap = softcap;

  // The CPU kernels get only valid targets: an out-of-range index is the caller's bug, reported here with
  // the row. (The emulated backend behaves as CUDA does: the row's loss and gradient become NaN.)
  if (b == Backend::cpu) {
    const int64_t* t = p.target;
    for (int64_t i = 0; i < rows; ++i) {
      TORCH_CHECK_INDEX(t[i] == ignore_index || (t[i] >= 0 && t[i] < total_classes), op, ": target[", i, "] = ", t[i],
                        " is out of range: class indices must be in [0, ", total_classes,
                        ") or equal ignore_index (", ignore_index, ")");
    }
  }
  return p;
}

Reduction to_reduction(int64_t r, const char* op) {
  TORCH_CHECK_VALUE(r >= 0 && r <= 2, op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", r);
  return static_cast<Reduction>(r);
}

// An optional 0-dim scalar of the accumulation type, on the logits' device.
at::Tensor scalar_arg(const std::optional<at::Tensor>& t, const at::Tensor& logits, const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(t->numel() == 1, op, ": ", name, " must hold one value, got shape ", t->sizes());
  check_same_device(*t, logits, op, name, "logits");
  return t->to(accum_type(logits)).reshape({}).contiguous();
}

enum class Entry { forward, backward, stats };

void run_cpu(Entry e, const CrossEntropyParams& p) {
  switch (e) {
    case Entry::forward: {
      auto run = [&]() { FUSEDOPS_CPU_DISPATCH(cross_entropy_forward(p)) };
      return run();
    }
    case Entry::backward: {
      auto run = [&]() { FUSEDOPS_CPU_DISPATCH(cross_entropy_backward(p)) };
      return run();
    }
    case Entry::stats: {
      auto run = [&]() { FUSEDOPS_CPU_DISPATCH(cross_entropy_stats(p)) };
      return run();
    }
  }
}

void dispatch(Backend b, Entry e, CrossEntropyParams& p, const at::Tensor& like) {
  at::Tensor workspace;
  if (b != Backend::cpu) {
    workspace = new_output({kCrossEntropyWorkspaceFloats}, like.options().dtype(at::kFloat));
    p.workspace = workspace.data_ptr<float>();
  }
  switch (b) {
    case Backend::cpu: run_cpu(e, p); break;
    case Backend::emulated:
      switch (e) {
        case Entry::forward: emu::cross_entropy_forward(p, nullptr); break;
        case Entry::backward: emu::cross_entropy_backward(p, nullptr); break;
        case Entry::stats: emu::cross_entropy_stats(p, nullptr); break;
      }
      break;
    case Backend::cuda: {
#if defined(FUSEDOPS_WITH_CUDA)
      LaunchScope scope(b, like);
      switch (e) {
        case Entry::forward: cuda::cross_entropy_forward(p, scope.stream()); break;
        case Entry::backward: cuda::cross_entropy_backward(p, scope.stream()); break;
        case Entry::stats: cuda::cross_entropy_stats(p, scope.stream()); break;
      }
#endif
      break;
    }
  }
}

// Shared by the two forwards: `grad` is where the gradient goes (undefined: not computed).
std::tuple<at::Tensor, at::Tensor> forward_into(const char* op, Backend b, CrossEntropyParams& p, Keep& keep,
                                                const at::Tensor& grad, const std::optional<at::Tensor>& grad_scale,
                                                Reduction reduction) {
  const auto opts = keep.logits.options().dtype(accum_type(keep.logits));
  p.reduction = reduction;
  at::Tensor per_row = new_output({p.rows}, opts);
  at::Tensor lse = new_output({p.rows}, opts);
  at::Tensor loss = reduction == Reduction::none ? per_row : new_output({}, opts);
  p.loss = per_row.data_ptr();
  p.lse = lse.data_ptr();
  p.reduced = reduction == Reduction::none ? nullptr : loss.data_ptr();
  if (grad.defined()) {
    keep.extra[0] = scalar_arg(grad_scale, keep.logits, op, "grad_scale");
    p.grad_scale = keep.extra[0].defined() ? keep.extra[0].data_ptr() : nullptr;
    p.grad = grad.data_ptr();
    p.grad_ld = p.rows <= 1 ? p.classes : grad.stride(0);
  }
  dispatch(b, Entry::forward, p, keep.logits);
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& grad_scale, int64_t ignore_index, int64_t reduction, double label_smoothing,
    double z_loss, double softcap, int64_t grad_mode, int64_t backend) {
  const Backend b = to_backend(backend, kFwd);
  TORCH_CHECK_VALUE(grad_mode >= 0 && grad_mode <= 2, kFwd, ": grad_mode must be 0, 1 or 2, got ", grad_mode);
  const bool compute_grad = grad_mode == 1;
  Keep keep;
  CrossEntropyParams p =
      prepare(kFwd, b, keep, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, 0, -1, false);
  at::Tensor grad = compute_grad ? reuse_output({p.rows, p.classes}, logits.options())
                                 : at::empty({0}, logits.options());
  auto [loss, lse] = forward_into(kFwd, b, p, keep, compute_grad ? grad : at::Tensor(), grad_scale,
                                  to_reduction(reduction, kFwd));
  return {loss, lse, grad};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_grad_(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& grad_scale, int64_t ignore_index, int64_t reduction, double label_smoothing,
    double z_loss, double softcap, int64_t backend) {
  const Backend b = to_backend(backend, kFwdGrad);
  Keep keep;
  const bool columns = columns_layout(b, logits, softcap);
  CrossEntropyParams p = prepare(kFwdGrad, b, keep, logits, target, weight, ignore_index, label_smoothing, z_loss,
                                 softcap, 0, -1, true, columns);
  return forward_into(kFwdGrad, b, p, keep, logits, grad_scale, to_reduction(reduction, kFwdGrad));
}

// Checks the backward's upstream gradients and lse; fills the params.
void prepare_backward(const char* op, CrossEntropyParams& p, Keep& keep, const at::Tensor& grad_loss,
                      const std::optional<at::Tensor>& grad_lse, const at::Tensor& lse, Reduction reduction) {
  const auto acc = accum_type(keep.logits);
  p.reduction = reduction;
  check_same_device(grad_loss, keep.logits, op, "grad_loss", "logits");
  if (reduction == Reduction::none) {
    TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == p.rows, op,
                      ": with reduction none, grad_loss must have shape (", p.rows, ",), got ", grad_loss.sizes());
    keep.extra[0] = grad_loss.scalar_type() == acc ? grad_loss : grad_loss.to(acc);
    p.grad_loss_stride = p.rows <= 1 ? 0 : keep.extra[0].stride(0);
  } else {
    TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": with reduction mean or sum, grad_loss must be a scalar, got shape ",
                      grad_loss.sizes());
    keep.extra[0] = grad_loss.to(acc).reshape({}).contiguous();
    p.grad_loss_stride = 0;
  }
  p.grad_loss = keep.extra[0].data_ptr();
  if (grad_lse.has_value() && grad_lse->defined()) {
    TORCH_CHECK_VALUE(grad_lse->dim() == 1 && grad_lse->size(0) == p.rows, op, ": grad_lse must have shape (", p.rows,
                      ",), got ", grad_lse->sizes());
    check_same_device(*grad_lse, keep.logits, op, "grad_lse", "logits");
    keep.extra[1] = grad_lse->to(acc).contiguous();
    p.grad_lse = keep.extra[1].data_ptr();
  }
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == p.rows, op, ": lse must have shape (", p.rows, ",), got ",
                    lse.sizes());
  check_same_device(lse, keep.logits, op, "lse", "logits");
  TORCH_CHECK_TYPE(lse.scalar_type() == acc, op, ": lse must be ", acc, " (as the forward returns it), got ",
                   lse.scalar_type());
  keep.extra[2] = lse.contiguous();
  p.lse = const_cast<void*>(keep.extra[2].data_ptr());
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                  const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                                  int64_t reduction, double label_smoothing, double z_loss, double softcap,
                                  int64_t class_offset, int64_t total_classes, int64_t backend) {
  const Backend b = to_backend(backend, kBwd);
  Keep keep;
  CrossEntropyParams p = prepare(kBwd, b, keep, logits, target, weight, ignore_index, label_smoothing, z_loss, softcap,
                                 class_offset, total_classes, false);
  prepare_backward(kBwd, p, keep, grad_loss, grad_lse, lse, to_reduction(reduction, kBwd));
  at::Tensor grad = reuse_output({p.rows, p.classes}, logits.options());
  p.grad = grad.data_ptr();
  p.grad_ld = p.classes;
  if (p.rows > 0) dispatch(b, Entry::backward, p, keep.logits);
  return grad;
}

void cross_entropy_backward_(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                             at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                             const at::Tensor& lse, int64_t ignore_index, int64_t reduction, double label_smoothing,
                             double z_loss, double softcap, int64_t class_offset, int64_t total_classes,
                             int64_t backend) {
  const Backend b = to_backend(backend, kBwdInplace);
  Keep keep;
  CrossEntropyParams p = prepare(kBwdInplace, b, keep, logits, target, weight, ignore_index, label_smoothing, z_loss,
                                 softcap, class_offset, total_classes, true);
  prepare_backward(kBwdInplace, p, keep, grad_loss, grad_lse, lse, to_reduction(reduction, kBwdInplace));
  p.grad = logits.data_ptr();
  p.grad_ld = p.ld;
  if (p.rows > 0) dispatch(b, Entry::backward, p, keep.logits);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_stats(const at::Tensor& logits, const at::Tensor& target,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   int64_t ignore_index, double softcap,
                                                                   int64_t class_offset, int64_t total_classes,
                                                                   bool smooth, int64_t backend) {
  const Backend b = to_backend(backend, kStats);
  Keep keep;
  CrossEntropyParams p =
      prepare(kStats, b, keep, logits, target, weight, ignore_index, 0.0, 0.0, softcap, class_offset, total_classes, false);
  const auto opts = logits.options().dtype(accum_type(logits));
  at::Tensor lse = new_output({p.rows}, opts);
  at::Tensor yt = new_output({p.rows}, opts);
  at::Tensor sw = smooth ? new_output({p.rows}, opts) : at::empty({0}, opts);
  p.reduction = Reduction::none;
  p.lse = lse.data_ptr();
  p.target_logit = yt.data_ptr();
  p.smooth_sum = smooth ? sw.data_ptr() : nullptr;
  if (p.rows > 0) dispatch(b, Entry::stats, p, keep.logits);
  return {lse, yt, sw};
}

}  // namespace
}  // namespace fusedops

TORCH_LIBRARY_FRAGMENT(fusedops, m) {
  m.def(
      "cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight, Tensor? grad_scale, int ignore_index, "
      "int reduction, float label_smoothing, float z_loss, float softcap, int grad_mode, int backend) "
      "-> (Tensor loss, Tensor lse, Tensor grad)");
  m.def(
      "cross_entropy_forward_grad_(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor? grad_scale, "
      "int ignore_index, int reduction, float label_smoothing, float z_loss, float softcap, int backend) "
      "-> (Tensor loss, Tensor lse)");
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor lse, int ignore_index, int reduction, float label_smoothing, float z_loss, float softcap, "
      "int class_offset, int total_classes, int backend) -> Tensor");
  m.def(
      "cross_entropy_backward_(Tensor grad_loss, Tensor? grad_lse, Tensor(a!) logits, Tensor target, Tensor? weight, "
      "Tensor lse, int ignore_index, int reduction, float label_smoothing, float z_loss, float softcap, "
      "int class_offset, int total_classes, int backend) -> ()");
  m.def(
      "cross_entropy_stats(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float softcap, "
      "int class_offset, int total_classes, bool smooth, int backend) "
      "-> (Tensor lse, Tensor target_logit, Tensor smooth_sum)");
}

TORCH_LIBRARY_IMPL(fusedops, CPU, m) {
  m.impl("cross_entropy_forward", &fusedops::cross_entropy_forward);
  m.impl("cross_entropy_forward_grad_", &fusedops::cross_entropy_forward_grad_);
  m.impl("cross_entropy_backward", &fusedops::cross_entropy_backward);
  m.impl("cross_entropy_backward_", &fusedops::cross_entropy_backward_);
  m.impl("cross_entropy_stats", &fusedops::cross_entropy_stats);
}

#if defined(FUSEDOPS_WITH_CUDA)
TORCH_LIBRARY_IMPL(fusedops, CUDA, m) {
  m.impl("cross_entropy_forward", &fusedops::cross_entropy_forward);
  m.impl("cross_entropy_forward_grad_", &fusedops::cross_entropy_forward_grad_);
  m.impl("cross_entropy_backward", &fusedops::cross_entropy_backward);
  m.impl("cross_entropy_backward_", &fusedops::cross_entropy_backward_);
  m.impl("cross_entropy_stats", &fusedops::cross_entropy_stats);
}
#endif
