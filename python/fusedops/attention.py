"""Fused scaled-dot-product attention (FlashAttention-2 style: never materializes the L × S scores).

Three entry points over the same kernels (``torch.ops.fusedops.attention_forward/backward``):

* :func:`scaled_dot_product_attention` — a drop-in for ``torch.nn.functional.scaled_dot_product_attention``
  (same arguments, shapes, broadcasting, masks, GQA and *top-left* causal alignment).
* :func:`attention` — the richer interface: sliding windows, tanh soft-capping, ALiBi, the logsumexp,
  *bottom-right* causal alignment (FlashAttention's) when L ≠ S.
* :func:`attention_varlen` — packed variable-length sequences.

Differences from torch, on purpose: a query row that can see no key (everything masked) gets output 0 and
gradient 0 instead of NaN; dropout uses a counter-based Philox stream (the same mask on every backend for
the same seed, see ``kernels/attention.h``); the backward is deterministic.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import _backend
from ._autocast import cast_lower

__all__ = ["scaled_dot_product_attention", "attention", "attention_varlen", "Attention"]

_FWD = torch.ops.fusedops.attention_forward
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---- torch.library: fake (meta) kernels and the autograd formula, so torch.compile traces the ops ----------

@torch.library.register_fake("fusedops::attention_forward")
def _attention_forward_fake(q, k, v, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            scale, softcap, window_left, window_right, bottom_right, dropout_p, dropout_seed, backend,
                            deterministic=True):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if cu_seqlens_q is not None:
        out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype)
    else:
        out = q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]))
        lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=lse_dtype)
    return out, lse


@torch.library.register_fake("fusedops::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, out, lse, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k, scale, softcap, window_left, window_right, bottom_right,
                             dropout_p, dropout_seed, deterministic, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_INPUTS = ("q", "k", "v", "attn_mask", "alibi_slopes", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
           "scale", "softcap", "window_left", "window_right", "bottom_right", "dropout_p", "dropout_seed", "backend",
           "deterministic")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_INPUTS, inputs))
    out, lse = output
    ctx.save_for_backward(args["q"], args["k"], args["v"], out, lse, args["attn_mask"], args["alibi_slopes"],
                          args["cu_seqlens_q"], args["cu_seqlens_k"])
    ctx.scalars = tuple(args[n] for n in _INPUTS[7:16])  # max_seqlen_q .. dropout_seed
    ctx.backend = args["backend"]  # the backend the forward resolved: the backward runs there too
    ctx.deterministic = args.get("deterministic", True)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    """lse is not differentiable (as in FlashAttention); q, k, v and an additive attn_mask are."""
    q, k, v, out, lse, attn_mask, alibi_slopes, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _backward_kernel(grad_out, q, k, v, out, lse, attn_mask, alibi_slopes, cu_q, cu_k, *ctx.scalars,
                                  ctx.deterministic, ctx.backend)
    dmask = None
    if ctx.needs_input_grad[3]:
        dmask = _additive_mask_grad(grad_out, q, k, v, out, lse, attn_mask, alibi_slopes, *ctx.scalars)
    return (dq, dk, dv, dmask) + (None,) * (len(_INPUTS) - 4)


torch.library.register_autograd("fusedops::attention_forward", _backward, setup_context=_setup_context)
_forward = _backend.autograd_caller(_FWD, _setup_context, _backward, "AttentionForward")
_backward_kernel = _backend.differentiable_once("fusedops::attention_backward", "fusedops attention")


def _additive_mask_grad(grad_out, q, k, v, out, lse, attn_mask, alibi_slopes, max_seqlen_q, max_seqlen_k, scale,
                        softcap, window_left, window_right, bottom_right, dropout_p, dropout_seed):
    """d loss / d attn_mask for an additive mask that requires grad: dS = P ∘ (dP ∘ f - rowsum(dO ∘ O)).

    This gradient has the mask's (B, H, L, S) size, so it is formed here with plain torch ops (fp32, or fp64
    for fp64 inputs) rather than in the kernel."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, L, _ = q.shape
    S = k.shape[2]
    group = Hq // k.shape[1]
    qf, kf, vf = q.to(ct), k.to(ct).repeat_interleave(group, 1), v.to(ct).repeat_interleave(group, 1)
    s = scale * (qf @ kf.transpose(-1, -2))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(L, device=q.device).view(L, 1)
    j = torch.arange(S, device=q.device).view(1, S)
    d = j - i - ((S - L) if bottom_right else 0)
    if alibi_slopes is not None:
        s = s - alibi_slopes.to(ct).expand(B, Hq).reshape(B, Hq, 1, 1) * d.abs().to(ct)
    s = s + attn_mask.to(ct)
    visible = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if window_left >= 0:
        visible = visible & (d >= -window_left)
    if window_right >= 0:
        visible = visible & (d <= window_right)
    lse = lse.to(ct).unsqueeze(-1)
    p = torch.where(visible & torch.isfinite(lse), torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)), 0)
    dout = grad_out.to(ct)
    dp = dout @ vf.transpose(-1, -2)
    if dropout_p > 0:
        from . import reference

        # masks come without varlen, so every sequence has L rows
        streams = torch.arange(B * Hq * L, dtype=torch.int64).view(B, Hq, L)
        keep = reference.dropout_keep(dropout_seed, streams, S, dropout_p).to(q.device)
        dp = dp * keep / (1.0 - float(torch.tensor(dropout_p, dtype=torch.float32)))
    D = (dout * out.to(ct)).sum(-1, keepdim=True)
    return (p * (dp - D)).to(attn_mask.dtype)


# ---- argument handling -------------------------------------------------------------------------------------

def _check_tensor(t, name: str, fn: str, min_dim: int = 0) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fusedops.{fn}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fusedops.{fn}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"fusedops.{fn}: {name} must have at least {min_dim} dims, got shape {tuple(t.shape)}")


def _check_qkv(q, k, v, fn: str, min_dim: int, names=("q", "k", "v"), seq_dim: int = -2) -> None:
    """Types, dtypes, devices, head dims, and that k and v have the same positions (dim seq_dim)."""
    nq, nk, nv = names
    for t, name in ((q, nq), (k, nk), (v, nv)):
        _check_tensor(t, name, fn, min_dim)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"fusedops.{fn}: {nq}, {nk} and {nv} must have the same dtype, got {q.dtype}, {k.dtype} "
                        f"and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"fusedops.{fn}: {nq}, {nk} and {nv} must be on the same device, got {q.device}, "
                         f"{k.device} and {v.device}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"fusedops.{fn}: {nk}'s head dim ({k.shape[-1]}) must equal {nq}'s ({q.shape[-1]})")
    if k.shape[seq_dim] != v.shape[seq_dim]:
        raise ValueError(f"fusedops.{fn}: {nk} and {nv} must have the same number of positions, got {nk} shape "
                         f"{tuple(k.shape)} and {nv} shape {tuple(v.shape)}")


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _resolve_scale(scale, head_dim: int, fn: str) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    scale = float(scale)
    if not abs(scale) <= _FLOAT32_MAX:  # the kernels take it as a float32
        raise ValueError(f"fusedops.{fn}: scale must be finite as a float32, got {scale}")
    return scale


def _check_softcap(softcap, fn: str) -> float:
    softcap = float(softcap)
    if not 0 <= softcap <= _FLOAT32_MAX:
        raise ValueError(f"fusedops.{fn}: softcap must be >= 0 (0 = off) and finite as a float32, got {softcap}")
    return softcap


def _check_dropout(dropout_p, fn: str) -> float:
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fusedops.{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_p


def _dropout_seed(dropout_p: float, generator: Optional[torch.Generator]) -> int:
    """A fresh 62-bit Philox key from torch's generator (`generator`, else the default CPU generator, which
    needs no device synchronization even for CUDA inputs). 0 when there is no dropout."""
    if dropout_p == 0.0:
        return 0
    if _backend.capturing():
        # The key is a kernel argument: a captured graph would replay one dropout mask on every run.
        raise RuntimeError("fusedops: attention with dropout_p > 0 cannot be captured in a CUDA graph (each "
                           "replay would reuse the captured dropout mask); capture with dropout_p=0")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


def _window(causal: bool, window, fn: str) -> tuple[int, int]:
    try:
        left, right = (int(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"fusedops.{fn}: window must be a pair (left, right) of ints, got {window!r}") from None
    left, right = (-1 if left < 0 else left), (-1 if right < 0 else right)
    if causal:
        if right > 0:
            raise ValueError(f"fusedops.{fn}: causal=True means window[1] = 0, but window={tuple(window)}; pass "
                             "causal=False with a window instead")
        right = 0
    return left, right


def _alibi(alibi_slopes, batch: Optional[int], heads: int, device, fn: str):
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.is_floating_point():
        raise TypeError(f"fusedops.{fn}: alibi_slopes must be a floating-point tensor")
    if alibi_slopes.device != device:
        raise ValueError(f"fusedops.{fn}: alibi_slopes is on {alibi_slopes.device} but query is on {device}")
    ok = (alibi_slopes.dim() == 1 and alibi_slopes.shape[0] == heads) or (
        alibi_slopes.dim() == 2 and batch is not None and tuple(alibi_slopes.shape) == (batch, heads))
    if not ok:
        want = f"({heads},)" + (f" or ({batch}, {heads})" if batch is not None else "")
        raise ValueError(f"fusedops.{fn}: alibi_slopes must have shape {want}, got {tuple(alibi_slopes.shape)}")
    return alibi_slopes.detach().to(torch.float32)


def _check_head_dims(q, v, backend: int, fn: str) -> None:
    if backend == _backend.CPU:
        return
    for d, name in ((q.shape[-1], "query/key"), (v.shape[-1], "value")):
        if not (8 <= d <= 256 and d % 8 == 0):
            raise ValueError(f"fusedops.{fn}: the CUDA kernels take {name} head dims that are multiples of 8 from "
                             f"8 to 256, got {d}")


def _run(fn, q, k, v, attn_mask, alibi, cu_q, cu_k, max_q, max_k, scale, softcap, window, bottom_right, dropout_p,
         generator, deterministic):
    backend = _backend.resolve(fn, q.device)
    _check_head_dims(q, v, backend, fn)
    if q.dtype == torch.float64 and backend != _backend.CPU:
        raise TypeError(f"fusedops.{fn}: float64 runs on the cpu backend only (got the "
                        f"{_backend.current_backend()} backend)")
    seed = _dropout_seed(dropout_p, generator)
    args = (q, k, v, attn_mask, alibi, cu_q, cu_k, max_q, max_k, scale, softcap, window[0], window[1], bottom_right,
            dropout_p, seed, backend, deterministic)
    return _forward(*args)


# ---- scaled_dot_product_attention ---------------------------------------------------------------------------

def _broadcast_shapes(*shapes) -> Optional[tuple]:
    """torch.broadcast_shapes for plain shapes (much cheaper per call); None when they do not broadcast."""
    ndim = max(len(shape) for shape in shapes)
    out = []
    for i in range(-ndim, 0):
        size = 1
        for shape in shapes:
            if len(shape) >= -i and shape[i] != 1:
                if size != 1 and size != shape[i]:
                    return None
                size = shape[i]
        out.append(size)
    return tuple(out)


def _flatten_batch(t: torch.Tensor, batch: Sequence[int]) -> torch.Tensor:
    """(*batch, N, D) → (B, H, N, D): the last batch dim is the heads, the others merge into B (a view when
    their strides allow; a 3-D or 2-D input gets B = 1 and H = 1 as needed)."""
    if tuple(t.shape[:-2]) != tuple(batch):
        t = t.expand(*batch, t.shape[-2], t.shape[-1])
    if len(batch) == 2:
        return t
    if len(batch) == 0:
        return t[None, None]
    if len(batch) == 1:
        return t[None]
    return t.reshape(math.prod(batch[:-1]), batch[-1], t.shape[-2], t.shape[-1])  # -1 is ambiguous when empty


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on fusedops' fused kernels.

    query (..., L, E), key (..., S, E), value (..., S, Ev) → (..., L, Ev); the batch dims ``...`` (any number,
    including none) broadcast as in torch. ``attn_mask``: bool (True = may attend) or additive float (float32
    or the query's dtype), broadcastable to (..., L, S); an additive mask may require grad (its gradient,
    which has the (..., L, S) size of the scores, is then formed with plain torch ops outside the kernel).
    ``is_causal``: query i sees keys j <= i — torch's *top-left* alignment, also when L ≠ S (contrast
    :func:`attention`, which aligns bottom-right); combined with ``attn_mask`` when both are given.
    ``enable_gqa``: key/value may have fewer heads (dim -3) than query, a divisor of it.

    Unlike torch, a row that can see no key returns 0 (not NaN) and its gradient is 0. Dropout draws its Philox
    seed from torch's default CPU generator. Arbitrary strides are honoured without copies as long as the last
    dim is contiguous (e.g. a (B, S, H, D) tensor transposed to (B, H, S, D)).
    """
    fn = "scaled_dot_product_attention"
    if isinstance(query, torch.Tensor):
        query, key, value, attn_mask = cast_lower(query.device, query, key, value, attn_mask)
    _check_qkv(query, key, value, fn, 2, ("query", "key", "value"))
    dropout_p = _check_dropout(dropout_p, fn)
    L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
    qb, kb, vb = tuple(query.shape[:-2]), tuple(key.shape[:-2]), tuple(value.shape[:-2])
    if enable_gqa and len(qb) >= 1 and len(kb) >= 1:
        if len(vb) == 0 or kb[-1] != vb[-1]:
            raise ValueError(f"fusedops.{fn}: with enable_gqa, key and value must have the same number of heads "
                             f"(dim -3), got {tuple(key.shape)} and {tuple(value.shape)}")
        hq, hkv = qb[-1], kb[-1]
        if hkv == 0 or hq % hkv != 0:
            raise ValueError(f"fusedops.{fn}: the number of query heads ({hq}) must be a multiple of the number "
                             f"of key/value heads ({hkv}) with enable_gqa")
        lead = _broadcast_shapes(qb[:-1], kb[:-1], vb[:-1])
        out_batch = None if lead is None else (*lead, hq)
        kv_batch = None if lead is None else (*lead, hkv)
    else:
        out_batch = kv_batch = _broadcast_shapes(qb, kb, vb)
    if out_batch is None:
        raise ValueError(f"fusedops.{fn}: the batch dims of query {tuple(query.shape)}, key {tuple(key.shape)} and "
                         f"value {tuple(value.shape)} do not broadcast"
                         + ("" if enable_gqa else " (different head counts need enable_gqa=True)"))
    q4 = _flatten_batch(query, out_batch)
    k4 = _flatten_batch(key, kv_batch)
    v4 = _flatten_batch(value, kv_batch)

    mask4 = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"fusedops.{fn}: attn_mask must be a tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise TypeError(f"fusedops.{fn}: attn_mask must be bool, float32 or the query's dtype ({query.dtype}), "
                            f"got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"fusedops.{fn}: attn_mask is on {attn_mask.device} but query is on {query.device}")
        if _broadcast_shapes(tuple(attn_mask.shape), (*out_batch, L, S)) != (*out_batch, L, S):
            raise ValueError(f"fusedops.{fn}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"(..., L, S) = {(*out_batch, L, S)}")
        full = (*out_batch, L, S)
        mask4 = _flatten_batch(attn_mask if tuple(attn_mask.shape) == full else attn_mask.expand(full), out_batch)

    scale = _resolve_scale(scale, E, fn)
    window = (-1, 0) if is_causal else (-1, -1)
    out, _ = _run(fn, q4, k4, v4, mask4, None, None, None, 0, 0, scale, 0.0, window, False, dropout_p, None, True)
    return out.reshape(*out_batch, L, value.shape[-1])


# ---- attention --------------------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              window: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, dropout_p: float = 0.0, generator: Optional[torch.Generator] = None,
              return_lse: bool = False, deterministic: bool = True):
    """Fused attention with FlashAttention's options, layout (B, H, L, E) like SDPA.

    q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) with Hq a multiple of Hkv (GQA/MQA: query head h
    reads kv head h // (Hq // Hkv)) → out (B, Hq, L, Ev), and with ``return_lse`` also lse (B, Hq, L) float32
    (float64 for float64 inputs), the natural-log logsumexp of each row's scores (-inf for a row with no visible
    key). lse is not differentiable. Any strides with a contiguous last dim are read in place.

    Alignment: query i sits at key position i + (S - L) — *bottom-right*, as in FlashAttention — so with
    ``causal`` query i sees keys j <= i + S - L (the last query sees every key). torch's SDPA (and
    :func:`scaled_dot_product_attention`) align *top-left* instead: j <= i. They agree when L == S.

    window (left, right): query i sees keys i + S - L - left <= j <= i + S - L + right; -1 is unbounded.
    ``causal=True`` is window[1] = 0. softcap > 0: scores become softcap · tanh(score / softcap) (before
    ALiBi). alibi_slopes (Hq,) or (B, Hq): adds -slope · |i + S - L - j| (not differentiated).
    dropout_p: Philox dropout, seeded from ``generator`` (default: torch's default CPU generator); the backward
    replays the same mask. deterministic: the backward gives bitwise identical results run to run (the CPU
    kernel always does).
    """
    fn = "attention"
    if isinstance(q, torch.Tensor):
        q, k, v = cast_lower(q.device, q, k, v)
    _check_qkv(q, k, v, fn, 4)
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if t.dim() != 4:
            raise ValueError(f"fusedops.{fn}: {name} must be (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"fusedops.{fn}: q, k and v must have the same batch size, got {q.shape[0]}, {k.shape[0]} "
                         f"and {v.shape[0]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"fusedops.{fn}: k and v must have the same number of heads, got {k.shape[1]} and "
                         f"{v.shape[1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"fusedops.{fn}: the number of query heads ({q.shape[1]}) must be a multiple of the number "
                         f"of key/value heads ({k.shape[1]})")
    softcap = _check_softcap(softcap, fn)
    win = _window(causal, window, fn)
    slopes = _alibi(alibi_slopes, q.shape[0], q.shape[1], q.device, fn)
    dropout_p = _check_dropout(dropout_p, fn)
    scale = _resolve_scale(scale, q.shape[-1], fn)
    out, lse = _run(fn, q, k, v, None, slopes, None, None, 0, 0, scale, softcap, win, True, dropout_p, generator,
                    bool(deterministic))
    return (out, lse) if return_lse else out


def _check_cu_seqlens(cu: torch.Tensor, name: str, total: int, max_len: int, fn: str, like: torch.Tensor):
    if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"fusedops.{fn}: {name} must be an int32 (or int64) tensor")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"fusedops.{fn}: {name} must be 1-D with batch + 1 entries, got shape {tuple(cu.shape)}")
    if cu.device != like.device:
        raise ValueError(f"fusedops.{fn}: {name} is on {cu.device} but q is on {like.device}")
    # On the CPU the offsets can be checked for free; on a GPU that would need a host synchronization.
    if cu.device.type == "cpu" and not torch.compiler.is_compiling():
        c = cu.tolist()
        lengths = [b - a for a, b in zip(c[:-1], c[1:])]
        if c[0] != 0 or c[-1] != total or any(n < 0 for n in lengths):
            raise ValueError(f"fusedops.{fn}: {name} must rise from 0 to the number of packed rows ({total}), "
                             f"got {c[:8]}{'...' if len(c) > 8 else ''}")
        if lengths and max(lengths) > max_len:
            raise ValueError(f"fusedops.{fn}: a sequence of {max(lengths)} rows exceeds the given maximum "
                             f"{'max_seqlen_q' if name.endswith('q') else 'max_seqlen_k'}={max_len}")
    return cu.to(torch.int32)


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int] = None,
                     max_seqlen_k: Optional[int] = None, *, causal: bool = False, window: tuple[int, int] = (-1, -1),
                     softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     dropout_p: float = 0.0, generator: Optional[torch.Generator] = None, return_lse: bool = False,
                     deterministic: bool = True):
    """:func:`attention` over packed variable-length sequences.

    q (total_q, Hq, E), k (total_k, Hkv, E), v (total_k, Hkv, Ev); sequence b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v (int32 offsets
    from 0 to total, batch + 1 entries, on q's device). Returns out (total_q, Hq, Ev) and, with ``return_lse``,
    lse (Hq, total_q). Alignment (bottom-right, per sequence) and the options are those of :func:`attention`;
    alibi_slopes may be (Hq,) or (batch, Hq).

    max_seqlen_q / max_seqlen_k bound the sequence lengths (they size the CUDA grid). When None they default
    to total_q / total_k, which needs no look at the offsets (no host synchronization: CUDA-graph capturable)
    at the price of a larger, mostly idle grid. The dropout stream of row i of sequence b and head h is
    (b · Hq + h) · max_seqlen_q + i, so the same dropout mask needs the same max_seqlen_q.
    """
    fn = "attention_varlen"
    if isinstance(q, torch.Tensor):
        q, k, v = cast_lower(q.device, q, k, v)
    _check_qkv(q, k, v, fn, 3, seq_dim=0)
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if t.dim() != 3:
            raise ValueError(f"fusedops.{fn}: {name} must be (total, heads, head_dim), got shape {tuple(t.shape)}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"fusedops.{fn}: k and v must have the same number of heads, got {k.shape[1]} and "
                         f"{v.shape[1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"fusedops.{fn}: the number of query heads ({q.shape[1]}) must be a multiple of the number "
                         f"of key/value heads ({k.shape[1]})")
    max_q = q.shape[0] if max_seqlen_q is None else int(max_seqlen_q)
    max_k = k.shape[0] if max_seqlen_k is None else int(max_seqlen_k)
    if not (0 <= max_q < 2**31 and 0 <= max_k < 2**31):
        raise ValueError(f"fusedops.{fn}: max_seqlen_q and max_seqlen_k must be in [0, 2^31), got {max_q} and "
                         f"{max_k}")
    cu_q = _check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_q, fn, q)
    cu_k = _check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_k, fn, q)
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(f"fusedops.{fn}: cu_seqlens_q and cu_seqlens_k must have the same length, got "
                         f"{cu_q.shape[0]} and {cu_k.shape[0]}")
    softcap = _check_softcap(softcap, fn)
    win = _window(causal, window, fn)
    slopes = _alibi(alibi_slopes, cu_q.shape[0] - 1, q.shape[1], q.device, fn)
    dropout_p = _check_dropout(dropout_p, fn)
    scale = _resolve_scale(scale, q.shape[-1], fn)
    out, lse = _run(fn, q, k, v, None, slopes, cu_q, cu_k, max_q, max_k, scale, softcap, win, True, dropout_p,
                    generator, bool(deterministic))
    return (out, lse) if return_lse else out


# ---- module ------------------------------------------------------------------------------------------------

class Attention(torch.nn.Module):
    """Multi-head self-attention on :func:`attention`: x (B, N, dim) → (B, N, dim).

    Parameters are named like timm's ``Attention`` (``qkv``: dim → (heads + 2·kv_heads)·head_dim, ``proj``),
    so its state dicts load when ``num_kv_heads`` is left at ``num_heads``. q, k and v are read as strided
    views of the qkv projection (no copies). Dropout on the attention weights (``attn_drop``) only in training.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, num_kv_heads: Optional[int] = None, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, causal: bool = False,
                 window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                 alibi_slopes: Optional[torch.Tensor] = None, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if dim % num_heads != 0:
            raise ValueError(f"Attention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"Attention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.causal, self.window, self.softcap = causal, tuple(window), softcap
        self.attn_drop = attn_drop
        self.qkv = torch.nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=qkv_bias, device=device,
                                   dtype=dtype)
        self.proj = torch.nn.Linear(dim, dim, device=device, dtype=dtype)
        self.proj_drop = torch.nn.Dropout(proj_drop)
        self.register_buffer("alibi_slopes", None if alibi_slopes is None else alibi_slopes.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x)
        q = qkv[..., : H * D].view(B, N, H, D).transpose(1, 2)
        k = qkv[..., H * D: (H + Hkv) * D].view(B, N, Hkv, D).transpose(1, 2)
        v = qkv[..., (H + Hkv) * D:].view(B, N, Hkv, D).transpose(1, 2)
        o = attention(q, k, v, causal=self.causal, window=self.window, softcap=self.softcap,
                      alibi_slopes=self.alibi_slopes, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, C)))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}, window={self.window}, softcap={self.softcap}, attn_drop={self.attn_drop}")
