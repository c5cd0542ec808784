"""Fused softmax cross-entropy: `cross_entropy` and `CrossEntropyLoss`, torch's semantics plus z-loss,
logit soft-capping, the per-token logsumexp and an in-place backward; optionally vocabulary-parallel.

The kernels (torch.ops.fusedops.cross_entropy_*) never materialize the softmax. How the gradient is made
depends on what autograd will need (``grad_mode`` of the forward op):

* 0 -- the forward reads the logits once (loss and lse); the backward reads them again and writes the
  gradient (exact for any upstream gradient, of the loss and of the lse);
* 1 -- the forward also writes the gradient of the (reduced) loss in the same sweep; the backward only
  scales it by the upstream gradient (nothing at all when that is 1, the usual ``loss.backward()``, on the
  CPU). Used by default for CPU tensors with reduction "mean"/"sum" when the lse is not returned;
* 2 -- like 0, but the backward writes the gradient over the logits' own buffer (``inplace_backward``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _backend
from ._autocast import cast_float32

__all__ = ["cross_entropy", "CrossEntropyLoss"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
GRAD_RECOMPUTE, GRAD_FUSED, GRAD_INPLACE = 0, 1, 2
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _ops():
    return torch.ops.fusedops


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake (meta) implementations, for torch.compile and shape propagation ------------------------------

@torch.library.register_fake("fusedops::cross_entropy_forward")
def _forward_fake(logits, target, weight, grad_scale, ignore_index, reduction, label_smoothing, z_loss, softcap,
                  grad_mode, backend):
    rows, classes = logits.shape
    acc = _acc(logits.dtype)
    loss = logits.new_empty((rows,) if reduction == 0 else (), dtype=acc)
    lse = logits.new_empty((rows,), dtype=acc)
    grad = logits.new_empty((rows, classes) if grad_mode == GRAD_FUSED else (0,))
    return loss, lse, grad


@torch.library.register_fake("fusedops::cross_entropy_forward_grad_")
def _forward_grad_fake(logits, target, weight, grad_scale, ignore_index, reduction, label_smoothing, z_loss, softcap,
                       backend):
    rows = logits.shape[0]
    acc = _acc(logits.dtype)
    return logits.new_empty((rows,) if reduction == 0 else (), dtype=acc), logits.new_empty((rows,), dtype=acc)


@torch.library.register_fake("fusedops::cross_entropy_backward")
def _backward_fake(grad_loss, grad_lse, logits, target, weight, lse, ignore_index, reduction, label_smoothing, z_loss,
                   softcap, class_offset, total_classes, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("fusedops::cross_entropy_backward_")
def _backward_inplace_fake(grad_loss, grad_lse, logits, target, weight, lse, ignore_index, reduction, label_smoothing,
                           z_loss, softcap, class_offset, total_classes, backend):
    return None


@torch.library.register_fake("fusedops::cross_entropy_stats")
def _stats_fake(logits, target, weight, ignore_index, softcap, class_offset, total_classes, smooth, backend):
    rows = logits.shape[0]
    acc = _acc(logits.dtype)
    return (logits.new_empty((rows,), dtype=acc), logits.new_empty((rows,), dtype=acc),
            logits.new_empty((rows,) if smooth else (0,), dtype=acc))


# ---- autograd -------------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    logits, target, weight, _grad_scale, ignore_index, reduction, eps, z, cap, grad_mode, backend = inputs
    _loss, lse, grad = output
    ctx.grad_mode = grad_mode
    ctx.args = (ignore_index, reduction, eps, z, cap, backend)
    ctx.consumed = False
    ctx.set_materialize_grads(False)
    # The gradient computed in advance is a constant of the graph: what the backward hands on from it must
    # not require grad (a second derivative through it is refused, _backend.refuse_create_graph).
    ctx.mark_non_differentiable(grad)
    if grad_mode == GRAD_FUSED:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(logits, target, weight, lse)


def _writable_in_place(logits: Tensor) -> bool:
    """Whether the (N, C) logits can take their gradient in place (the binding's rule): classes contiguous and
    rows apart. Otherwise (strided classes, rows overlapping as in an expanded tensor) the gradient gets its
    own buffer."""
    n, c = logits.shape
    return (c == 1 or logits.stride(1) == 1) and (n <= 1 or logits.stride(0) >= c)


def _mark_overwritten(logits: Tensor) -> None:
    """Bumps the logits' version after the in-place backward wrote over them, so that another op which saved
    them for its own backward raises autograd's "modified by an inplace operation" instead of reading the
    gradient as if it were the logits."""
    if not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(logits)


def _backward(ctx, g_loss, g_lse, _g_grad):
    ignore_index, reduction, eps, z, cap, backend = ctx.args
    if ctx.grad_mode == GRAD_FUSED:
        _backend.refuse_create_graph("fusedops.cross_entropy")
        (grad,) = ctx.saved_tensors
        if g_lse is not None:
            raise RuntimeError(
                "fusedops.cross_entropy: this forward computed the loss's gradient in advance (grad_mode 1), so its "
                "lse output cannot be differentiated; call it with return_lse=True, which selects grad_mode 0")
        if g_loss is None:
            return (None,) * 11
        (grad,) = _backend.scale_saved_gradients([grad], g_loss if reduction != 0 else g_loss.unsqueeze(1))
        return (grad,) + (None,) * 10
    logits, target, weight, lse = ctx.saved_tensors
    if g_loss is None and g_lse is None:
        return (None,) * 11
    if g_loss is None:
        g_loss = lse.new_zeros(lse.shape if reduction == 0 else ())
    if ctx.grad_mode == GRAD_INPLACE:
        if ctx.consumed:
            raise RuntimeError(
                "fusedops.cross_entropy: inplace_backward=True wrote the gradient over the logits in the first "
                "backward, so the graph cannot be backpropagated through again (call it with "
                "inplace_backward=False to retain the graph)")
        ctx.consumed = True
        _ops().cross_entropy_backward_(g_loss, g_lse, logits, target, weight, lse, ignore_index, reduction, eps, z,
                                       cap, 0, logits.shape[1], backend)
        _mark_overwritten(logits)
        return (logits,) + (None,) * 10
    grad = _backward_kernel(g_loss, g_lse, logits, target, weight, lse, ignore_index, reduction, eps, z, cap, 0,
                            logits.shape[1], backend)
    return (grad,) + (None,) * 10


torch.library.register_autograd("fusedops::cross_entropy_forward", _backward, setup_context=_setup_context)
_forward = _backend.autograd_caller(torch.ops.fusedops.cross_entropy_forward, _setup_context, _backward,
                                    "CrossEntropyForward")
_backward_kernel = _backend.differentiable_once("fusedops::cross_entropy_backward", "fusedops.cross_entropy")


# ---- argument handling ----------------------------------------------------------------------------------

def _legacy_reduction(size_average, reduce) -> str:
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        return "none"
    return "mean" if size_average else "sum"


def _check_scalar(op: str, name: str, value, *, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fusedops.{op}: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"fusedops.{op}: {name} must be finite and in [{lo}, {hi}], got {value}")
    return value


def _flatten(op: str, input: Tensor, target: Tensor, weight: Optional[Tensor], sharded: bool = False):
    """Checks input/target/weight and returns (rows, classes) logits, (rows,) int64 targets, the weight.
    Sharded: the weight covers the whole vocabulary, which only the kernels' binding knows."""
    if not isinstance(input, Tensor):
        raise TypeError(f"fusedops.{op}: input must be a Tensor, got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"fusedops.{op}: target must be a Tensor, got {type(target).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fusedops.{op}: input must be float32, float16, bfloat16 or float64, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"fusedops.{op}: input must have a class dimension: (C,), (N, C) or (N, C, d1, ...), got a scalar")
    if target.is_floating_point() or target.is_complex():
        if target.shape == input.shape:
            raise NotImplementedError(
                f"fusedops.{op}: probability (soft) targets are not supported; pass class indices "
                "(torch.nn.functional.cross_entropy handles probability targets)")
        raise TypeError(f"fusedops.{op}: target must hold integer class indices, got {target.dtype}")
    if target.dtype == torch.bool:
        raise TypeError(f"fusedops.{op}: target must hold integer class indices, got torch.bool")
    if target.device != input.device:
        raise ValueError(f"fusedops.{op}: target is on {target.device} but input is on {input.device}")
    classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    expected = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else torch.Size([])
    if target.shape != expected:
        raise ValueError(
            f"fusedops.{op}: target must have shape {tuple(expected)} for input of shape {tuple(input.shape)} "
            f"(the class dimension is dim {0 if input.dim() == 1 else 1}), got {tuple(target.shape)}")
    if weight is not None:
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            raise TypeError(f"fusedops.{op}: weight must be a floating Tensor of shape ({classes},)")
        if weight.dim() != 1 or (weight.shape != (classes,) and not sharded):
            raise ValueError(f"fusedops.{op}: weight must have shape ({classes},) (one per class), got {tuple(weight.shape)}")
        if weight.device != input.device:
            raise ValueError(f"fusedops.{op}: weight is on {weight.device} but input is on {input.device}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(f"fusedops.{op}: the gradient with respect to weight is not implemented "
                                      "(as in torch); pass weight.detach()")
    if input.dim() == 1:
        logits = input.unsqueeze(0)
    elif input.dim() == 2:
        logits = input
    else:
        logits = input.movedim(1, -1).reshape(-1, classes)
    return logits, (target if target.dim() == 1 else target.reshape(-1)).long(), weight


def _options(op, reduction, label_smoothing, z_loss, softcap, ignore_index):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"fusedops.{op}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    eps = _check_scalar(op, "label_smoothing", label_smoothing, lo=0.0, hi=1.0)
    z = _check_scalar(op, "z_loss", z_loss)
    if softcap is None:
        cap = 0.0
    else:
        cap = _check_scalar(op, "softcap", softcap)
        if cap <= 0.0:
            raise ValueError(f"fusedops.{op}: softcap must be positive (None turns it off), got {softcap}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"fusedops.{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    return _REDUCTIONS[reduction], eps, z, cap


# ---- vocabulary-parallel ----------------------------------------------------------------------------------

def shard_layout(classes: int, group, device: torch.device) -> tuple[int, int]:
    """(offset of this rank's classes, total classes) for a vocabulary sharded in rank order over `group`."""
    import torch.distributed as dist

    mine = torch.tensor([classes], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    sizes = [int(s.item()) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


def combine_shards(lse_local: Tensor, target_logit: Tensor, smooth_sum: Tensor, target: Tensor,
                   weight: Optional[Tensor], ignore_index: int, eps: float, z: float, total: int, group):
    """From each shard's partials (cross_entropy_stats), all-reduced over `group`: the global lse (0 for
    ignored rows), the per-row loss and the mean's denominator (Σ of the targets' weights)."""
    import torch.distributed as dist

    top = lse_local.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    ref = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    parts = [torch.exp(lse_local - ref), target_logit] + ([smooth_sum] if eps > 0 else [])
    sums = torch.stack(parts)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    valid = target != ignore_index
    lse = torch.where(valid, ref + torch.log(sums[0]), torch.zeros_like(ref))
    lse_n = torch.where(torch.isneginf(lse), torch.full_like(lse, math.nan), lse)  # all -inf: NaN, as torch
    if weight is not None:
        wt = weight.to(lse.dtype)[target.clamp(0, total - 1)]
    else:
        wt = torch.ones_like(lse)
    loss = (1.0 - eps) * wt * (lse_n - sums[1])
    if eps > 0:
        wsum = weight.to(lse.dtype).sum() if weight is not None else float(total)
        loss = loss + eps / total * (wsum * lse_n - sums[2])
    if z > 0:
        loss = loss + z * lse_n * lse_n
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    denom = torch.where(valid, wt, torch.zeros_like(wt)).sum()
    return lse, loss, denom


def reduce_loss(loss_rows: Tensor, denom: Tensor, reduction: int) -> Tensor:
    if reduction == 0:
        return loss_rows
    total = loss_rows.sum()
    if reduction != 1:
        return total
    # a zero denominator (every token ignored or of weight 0) gives NaN, as torch's 0/0, whatever the sum
    return torch.where(denom != 0, total / denom, torch.full_like(total, float("nan")))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, eps, z, cap, inplace, group, backend):
        offset, total = shard_layout(logits.shape[1], group, logits.device)
        lse_local, target_logit, smooth = _ops().cross_entropy_stats(logits, target, weight, ignore_index, cap, offset,
                                                                     total, eps > 0, backend)
        lse, loss_rows, denom = combine_shards(lse_local, target_logit, smooth, target, weight, ignore_index, eps, z,
                                               total, group)
        ctx.args = (ignore_index, reduction, eps, z, cap, offset, total, backend, inplace)
        ctx.consumed = False
        ctx.save_for_backward(logits, target, weight, lse)
        ctx.set_materialize_grads(False)
        return reduce_loss(loss_rows, denom, reduction), lse

    @staticmethod
    def backward(ctx, g_loss, g_lse):
        _backend.refuse_create_graph("fusedops.cross_entropy")
        ignore_index, reduction, eps, z, cap, offset, total, backend, inplace = ctx.args
        logits, target, weight, lse = ctx.saved_tensors
        if g_loss is None and g_lse is None:
            return (None,) * 11
        if g_loss is None:
            g_loss = lse.new_zeros(lse.shape if reduction == 0 else ())
        args = (g_loss, g_lse, logits, target, weight, lse, ignore_index, reduction, eps, z, cap, offset, total,
                backend)
        if inplace and _writable_in_place(logits):
            if ctx.consumed:
                raise RuntimeError("fusedops.cross_entropy: inplace_backward=True overwrote the logits in the first "
                                   "backward; the graph cannot be backpropagated through again")
            ctx.consumed = True
            _ops().cross_entropy_backward_(*args)
            _mark_overwritten(logits)
            return (logits,) + (None,) * 10
        return (_backward_kernel(*args),) + (None,) * 10


# ---- the public API ---------------------------------------------------------------------------------------

def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: Optional[float] = None, return_lse: bool = False, inplace_backward: bool = False,
                  process_group=None, size_average: Optional[bool] = None, reduce: Optional[bool] = None,
                  _grad_mode: Optional[int] = None):
    """Softmax cross-entropy between logits `input` and class indices `target`, as
    torch.nn.functional.cross_entropy (same shapes: (C,), (N, C), (N, C, d1, ...); same weight,
    ignore_index, reduction, label_smoothing and legacy size_average/reduce), fused: the softmax is never
    materialized.

    Extras:
      z_loss: adds z_loss · logsumexp² for every token not ignored (PaLM's auxiliary loss), reduced like the
        loss (mean: divided by the same denominator, the sum of the targets' weights).
      softcap: logits → softcap · tanh(logits / softcap) before the softmax (None: off).
      return_lse: also return the per-token logsumexp (of the soft-capped logits; 0 for ignored tokens;
        float32, float64 for float64 input), shaped like target. It is differentiable.
      inplace_backward: the backward writes the gradient over the logits' buffer instead of allocating one;
        the logits must not be used after the backward (a later use that autograd tracks raises).
      process_group: logits sharded over the vocabulary across the ranks of this torch.distributed group
        (each rank passes its contiguous slice, in rank order; target and weight are the full, identical
        ones on every rank). The result is the unsharded loss on every rank; each rank's gradient is its
        slice's.

    Returns the loss (input's dtype), or (loss, lse) with return_lse.
    """
    op = "cross_entropy"
    if isinstance(input, Tensor):
        input, weight = cast_float32(input.device, input, weight)
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    red, eps, z, cap = _options(op, reduction, label_smoothing, z_loss, softcap, ignore_index)
    out_shape = target.shape if isinstance(target, Tensor) else None
    logits, tgt, weight = _flatten(op, input, target, weight, sharded=process_group is not None)
    if weight is not None:
        weight = weight.detach()
    if process_group is not None:
        backend = _backend.resolve(op, input.device)
        loss, lse = _VocabParallelCrossEntropy.apply(logits, tgt, weight, ignore_index, red, eps, z, cap,
                                                     bool(inplace_backward), process_group, backend)
    else:
        backend = _backend.resolve(op, input.device)
        needs_grad = torch.is_grad_enabled() and input.requires_grad
        if _grad_mode is not None:
            mode = int(_grad_mode)
            if mode == GRAD_FUSED and return_lse:
                raise ValueError("fusedops.cross_entropy: grad_mode 1 cannot differentiate the lse (return_lse)")
        elif not needs_grad:
            mode = GRAD_RECOMPUTE
        elif inplace_backward:
            mode = GRAD_INPLACE
        elif red != 0 and not return_lse and input.device.type == "cpu":
            mode = GRAD_FUSED
        else:
            mode = GRAD_RECOMPUTE
        if mode == GRAD_INPLACE and not _writable_in_place(logits):
            mode = GRAD_RECOMPUTE
        if not needs_grad and mode == GRAD_FUSED:
            mode = GRAD_RECOMPUTE
        loss, lse, _grad = _forward(logits, tgt, weight, None, ignore_index, red, eps, z, cap, mode, backend)
    if loss.dtype != input.dtype:
        loss = loss.to(input.dtype)
    if red == 0:
        loss = loss.reshape(out_shape)
    if return_lse:
        return loss, lse.reshape(out_shape)
    return loss


class CrossEntropyLoss(torch.nn.Module):
    """torch.nn.CrossEntropyLoss on fusedops.cross_entropy, with its extras (z_loss, softcap, return_lse,
    inplace_backward, process_group) as keyword arguments."""

    __constants__ = ["ignore_index", "reduction", "label_smoothing"]

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 softcap: Optional[float] = None, return_lse: bool = False, inplace_backward: bool = False,
                 process_group=None) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _legacy_reduction(size_average, reduce)
        _options("CrossEntropyLoss", reduction, label_smoothing, z_loss, softcap, ignore_index)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward
        self.process_group = process_group

    def forward(self, input: Tensor, target: Tensor):
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                             z_loss=self.z_loss, softcap=self.softcap, return_lse=self.return_lse,
                             inplace_backward=self.inplace_backward, process_group=self.process_group)

    def extra_repr(self) -> str:
        parts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        return ", ".join(parts)
