"""Linear cross-entropy: the loss of ``hidden @ weight.T (+ bias)`` without ever holding the N×V logits.

Tokens are processed in chunks: a chunk's logits come from a torch matmul into a buffer the fused
cross-entropy kernel then overwrites with their gradient (torch.ops.fusedops.cross_entropy_forward_grad_),
and the chunk's gradients are taken at once (hidden: G @ W; weight: += Gᵀ @ h; bias: += Σ G). The weight
(and bias) gradients are accumulated chunk after chunk in a fixed order, so results are bitwise
reproducible run to run (for a fixed thread count). Peak extra memory: one chunk of logits plus the
gradients themselves.

When the upstream gradient is not known to be a scalar at the forward (reduction "none", or return_lse),
the forward keeps only the per-token lse and the backward recomputes each chunk's logits (one more matmul).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _backend
from ._autocast import autocast_dtype, cast_lower
from .cross_entropy import (_REDUCTIONS, _acc, _legacy_reduction, _ops, _options, combine_shards, reduce_loss,
                            shard_layout)

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss"]

_CHUNK_BYTES = 128 * 2**20  # logits per chunk


def _chunk_rows(n: int, v: int, element_size: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, min(int(chunk_size), max(n, 1)))
    rows = max(1, _CHUNK_BYTES // max(1, v * element_size))
    if rows >= 16:
        rows -= rows % 16  # whole GEMM tiles
    return max(1, min(rows, max(n, 1)))


def _chunk_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], columns: bool = False) -> Tensor:
    """The chunk's (rows, V) logits; `columns`: computed as W @ hᵀ and returned as its transpose (classes
    rows·1 apart), which the CPU kernel's in-place forward takes: MKL runs that orientation ~15% faster here
    (W streamed once as the left operand; measured at H=2048, V=128256, 256 rows)."""
    if columns:
        if bias is not None:
            return torch.addmm(bias.to(h.dtype).unsqueeze(1), weight, h.t()).t()
        return torch.mm(weight, h.t()).t()
    if bias is not None:
        return torch.addmm(bias.to(h.dtype), h, weight.t())
    return torch.mm(h, weight.t())


def _weight_grad_accumulator(weight: Tensor, n: int, chunk_rows: int, acc: torch.dtype) -> Tensor:
    """dW's running sum: in the weight's dtype when one chunk makes it (one rounding, as torch's own), else at
    least `acc` (float32 for 16-bit weights): rounded to 16 bits after every chunk, the sum lost precision with
    the number of chunks (bf16, 4096 tokens in chunks of 16: 12x torch's error)."""
    dtype = weight.dtype if n <= chunk_rows else torch.promote_types(weight.dtype, acc)
    return torch.zeros(weight.shape, dtype=dtype, device=weight.device)


def _accumulate(g: Tensor, h: Tensor, weight: Tensor, dh: Optional[Tensor], dw: Optional[Tensor],
                db: Optional[Tensor], rows: slice) -> None:
    """The chunk's gradients from its logits' gradient g (B, V)."""
    if dh is not None:
        torch.mm(g, weight, out=dh[rows])
    if dw is not None:
        if dw.dtype == g.dtype:
            dw.addmm_(g.t(), h)
        elif g.device.type == "cpu":  # exact products, and faster: a CPU without bf16 units multiplies in fp32
            dw.addmm_(g.t().to(dw.dtype), h.to(dw.dtype))
        else:  # tensor cores: a 16-bit product (fp32 inside the GEMM), rounded once per chunk, then summed
            dw.add_(torch.mm(g.t(), h))
    if db is not None:
        db.add_(g.sum(0, dtype=db.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, ignore_index, reduction, eps, z, cap, chunk_rows,
                want_lse, group, backend):
        n, v = hidden.shape[0], weight.shape[0]
        acc = _acc(hidden.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        fused = (need_h or need_w or need_b) and reduction != 0 and not want_lse
        offset, total = shard_layout(v, group, hidden.device) if group is not None else (0, v)

        if class_weight is not None and class_weight.shape[0] != total:
            raise ValueError(f"fusedops.linear_cross_entropy: class_weight must have shape ({total},) (one weight per "
                             f"class{' of the whole vocabulary' if group is not None else ''}), got "
                             f"{tuple(class_weight.shape)}")
        valid = target != ignore_index
        if class_weight is not None:
            wt = class_weight.to(acc)[target.clamp(0, total - 1)]
            denom = torch.where(valid, wt, torch.zeros_like(wt)).sum()
        else:
            denom = valid.sum().to(acc)
        loss_rows = hidden.new_empty((n,), dtype=acc)
        lse_all = hidden.new_empty((n,), dtype=acc)
        dh = dw = db = None
        if fused:
            gscale = (1.0 / denom if reduction == 1 else torch.ones((), dtype=acc, device=hidden.device)).to(acc)
            dh = torch.empty_like(hidden) if need_h else None
            dw = _weight_grad_accumulator(weight, n, chunk_rows, acc) if need_w else None
            db = torch.zeros(v, dtype=acc, device=hidden.device) if need_b else None
        # The transposed chunk layout where the CPU kernel takes it (not float64, no softcap) and it pays: with
        # few rows per chunk, h @ Wᵀ re-packs the whole weight for little work (15% of that GEMM at 256 rows,
        # H=2048, V=128256); at 1024 rows that is gone, and the transposed kernel (which reads the chunk twice)
        # made the call 1-6% slower instead.
        columns = (fused and group is None and backend == _backend.CPU and cap == 0.0 and
                   hidden.dtype != torch.float64 and chunk_rows < 512)
        for i0 in range(0, n, chunk_rows):
            rows = slice(i0, min(n, i0 + chunk_rows))
            h, t = hidden[rows], target[rows]
            logits = _chunk_logits(h, weight, bias, columns and h.shape[0] > 1)
            if group is None:
                if fused:
                    l, lse = _ops().cross_entropy_forward_grad_(logits, t, class_weight, gscale, ignore_index, 0, eps,
                                                                z, cap, backend)
                else:
                    l, lse, _ = _ops().cross_entropy_forward(logits, t, class_weight, None, ignore_index, 0, eps, z,
                                                             cap, 0, backend)
            else:
                lse_l, yt, sw = _ops().cross_entropy_stats(logits, t, class_weight, ignore_index, cap, offset, total,
                                                           eps > 0, backend)
                lse, l, _ = combine_shards(lse_l, yt, sw, t, class_weight, ignore_index, eps, z, total, group)
                if fused:
                    _ops().cross_entropy_backward_(gscale.expand(l.shape[0]), None, logits, t, class_weight, lse,
                                                   ignore_index, 0, eps, z, cap, offset, total, backend)
            loss_rows[rows] = l
            lse_all[rows] = lse
            if fused:
                _accumulate(logits, h, weight, dh, dw, db, rows)
            del logits
        if fused and group is not None and dh is not None:
            torch.distributed.all_reduce(dh, group=group)
        if dw is not None:
            dw = dw.to(weight.dtype)
        ctx.fused = fused
        ctx.args = (ignore_index, reduction, eps, z, cap, chunk_rows, group, backend, offset, total)
        ctx.set_materialize_grads(False)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if not want_lse:
            ctx.mark_non_differentiable(lse_all)
        if fused:
            ctx.save_for_backward(dh, dw, db)
        else:
            ctx.save_for_backward(hidden, weight, bias, target, class_weight, lse_all, denom)
        return reduce_loss(loss_rows, denom, reduction), lse_all

    @staticmethod
    def backward(ctx, g_loss, g_lse):
        _backend.refuse_create_graph("fusedops.linear_cross_entropy")
        ignore_index, reduction, eps, z, cap, chunk_rows, group, backend, offset, total = ctx.args
        none = (None,) * 11
        if g_loss is None and g_lse is None:
            return (None, None, None) + none
        if ctx.fused:
            # g_lse, when present, is zeros: without return_lse the lse never reaches the caller.
            grads = _backend.scale_saved_gradients(ctx.saved_tensors, g_loss)
            dh, dw, db = grads
            return (dh, dw, db.to(ctx.bias_dtype) if db is not None else None) + none
        hidden, weight, bias, target, class_weight, lse_all, denom = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, v = hidden.shape[0], weight.shape[0]
        acc = lse_all.dtype
        if g_loss is None:
            g_rows = lse_all.new_zeros((n,))
        elif reduction == 0:
            g_rows = g_loss.to(acc)
        else:
            g = g_loss.to(acc) / denom if reduction == 1 else g_loss.to(acc)
            g_rows = g.expand(n)
        dh = torch.empty_like(hidden) if need_h else None
        dw = _weight_grad_accumulator(weight, n, chunk_rows, acc) if need_w else None
        db = torch.zeros(v, dtype=acc, device=hidden.device) if need_b else None
        for i0 in range(0, n, chunk_rows):
            rows = slice(i0, min(n, i0 + chunk_rows))
            h = hidden[rows]
            logits = _chunk_logits(h, weight, bias)
            _ops().cross_entropy_backward_(g_rows[rows], g_lse[rows] if g_lse is not None else None, logits,
                                           target[rows], class_weight, lse_all[rows], ignore_index, 0, eps, z, cap,
                                           offset, total, backend)
            _accumulate(logits, h, weight, dh, dw, db, rows)
            del logits
        if group is not None and dh is not None:
            torch.distributed.all_reduce(dh, group=group)
        if dw is not None:
            dw = dw.to(weight.dtype)
        return (dh, dw, db.to(bias.dtype) if db is not None else None) + none


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, *,
                         class_weight: Optional[Tensor] = None, z_loss: float = 0.0, softcap: Optional[float] = None,
                         return_lse: bool = False, inplace_backward: bool = False, process_group=None,
                         chunk_size: Optional[int] = None, size_average: Optional[bool] = None,
                         reduce: Optional[bool] = None):
    """cross_entropy(hidden @ weight.T + bias, target, ...) without materializing the logits.

    hidden (..., H); weight (V, H) (this rank's slice of the vocabulary with process_group, in rank order;
    hidden and target are then the same on every rank, and the returned hidden gradient is the full one,
    summed over ranks); target (...) class indices; bias (V,) or None. class_weight is torch's per-class
    `weight` (renamed: `weight` is the projection here). Options as fusedops.cross_entropy (inplace_backward
    is accepted and has nothing to do: the chunk buffers are always overwritten in place). chunk_size: tokens
    per chunk (default: ~128 MiB of logits).

    Returns the loss (hidden's dtype), or (loss, lse) with return_lse.
    """
    op = "linear_cross_entropy"
    # Under autocast, as torch's F.cross_entropy(F.linear(hidden, weight, bias)): the matmul in the autocast
    # dtype, the loss in float32.
    autocast_on = isinstance(hidden, Tensor) and autocast_dtype(hidden.device) is not None
    if autocast_on:
        hidden, weight, bias = cast_lower(hidden.device, hidden, weight, bias)
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    red, eps, z, cap = _options(op, reduction, label_smoothing, z_loss, softcap, ignore_index)
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fusedops.{op}: {name} must be a Tensor, got {type(t).__name__}")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"fusedops.{op}: hidden must be float32, float16, bfloat16 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"fusedops.{op}: weight ({weight.dtype}) must have hidden's dtype ({hidden.dtype})")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"fusedops.{op}: hidden must be (..., H) and weight (V, H) with the same H, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"fusedops.{op}: weight must have at least one row (class)")
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"fusedops.{op}: target must hold integer class indices, got {target.dtype}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"fusedops.{op}: target must have shape {tuple(hidden.shape[:-1])} (hidden without its last "
                         f"dimension), got {tuple(target.shape)}")
    v = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (v,) or not bias.is_floating_point():
            raise ValueError(f"fusedops.{op}: bias must be a floating Tensor of shape ({v},)")
    if class_weight is not None:
        if not isinstance(class_weight, Tensor) or class_weight.dim() != 1 or not class_weight.is_floating_point():
            raise TypeError(f"fusedops.{op}: class_weight must be a 1-D floating Tensor")
        class_weight = class_weight.detach()
    for name, t in (("weight", weight), ("target", target), ("bias", bias), ("class_weight", class_weight)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"fusedops.{op}: {name} is on {t.device} but hidden is on {hidden.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"fusedops.{op}: chunk_size must be a positive int, got {chunk_size!r}")
    backend = _backend.resolve(op, hidden.device)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    t2 = target.reshape(-1).long()
    rows = _chunk_rows(h2.shape[0], v, h2.element_size(), chunk_size)
    with torch.autocast(hidden.device.type, enabled=False):
        loss, lse = _LinearCrossEntropy.apply(h2, weight, bias, t2, class_weight, ignore_index, red, eps, z, cap,
                                              rows, bool(return_lse), process_group, backend)
    loss = loss.to(torch.float32 if autocast_on and hidden.dtype != torch.float64 else hidden.dtype)
    if red == 0:
        loss = loss.reshape(target.shape)
    if return_lse:
        return loss, lse.reshape(target.shape)
    return loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of linear_cross_entropy: forward(hidden, weight, target, bias=None)."""

    def __init__(self, class_weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: Optional[float] = None,
                 return_lse: bool = False, inplace_backward: bool = False, process_group=None,
                 chunk_size: Optional[int] = None) -> None:
        super().__init__()
        _options("LinearCrossEntropyLoss", reduction, label_smoothing, z_loss, softcap, ignore_index)
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward
        self.process_group = process_group
        self.chunk_size = chunk_size

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None):
        return linear_cross_entropy(hidden, weight, target, bias, self.ignore_index, self.reduction,
                                    self.label_smoothing, class_weight=self.class_weight, z_loss=self.z_loss,
                                    softcap=self.softcap, return_lse=self.return_lse,
                                    inplace_backward=self.inplace_backward, process_group=self.process_group,
                                    chunk_size=self.chunk_size)
