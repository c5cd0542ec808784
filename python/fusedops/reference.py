"""Float64 references for every fusedops op, written plainly in PyTorch.

Tests and benchmarks compare the kernels against these. Each function says in a few lines what the op
computes — no fusion, no tiling, no tricks — and computes it in float64.
"""
from __future__ import annotations

import torch


# ==== random numbers =======================================================================================

# Philox4x32-10 (Salmon et al., SC'11) in int64 tensor arithmetic: every 32-bit quantity lives in an int64
# lane, and the 32×32 → 64-bit products are formed from 16-bit halves so that nothing overflows.
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo32(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product m · x, for m and x in [0, 2^32)."""
    p_lo = m * (x & 0xFFFF)  # < 2^48
    p_hi = m * (x >> 16)  # < 2^48
    t = p_lo + ((p_hi & 0xFFFF) << 16)  # the product's low 48 bits plus carries, < 2^49
    return (p_hi >> 16) + (t >> 32), t & _U32


def philox4x32(counter, key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 of the 128-bit counter (c0, c1, c2, c3) under the 64-bit key (low word first).

    The counter words are int64 tensors (or ints) holding values in [0, 2^32), broadcast together; the
    four result words come back the same way."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    k0, k1 = key & _U32, (key >> 32) & _U32
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _U32, (k1 + _PHILOX_W1) & _U32
    return c0, c1, c2, c3



# ==== Adam / AdamW =========================================================================================

def adam_step(param: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float, beta1: float, beta2: float,
              eps: float, weight_decay: float, decoupled_weight_decay: bool, amsgrad: bool, maximize: bool,
              grad_scale: float | None = None) -> torch.Tensor:
    """One Adam/AdamW step in float64, as torch.optim.Adam documents it; returns the new param.

    `state` holds "step" (an int) and the float64 tensors "exp_avg", "exp_avg_sq" (and "max_exp_avg_sq"
    with amsgrad), all zero before the first step; they are updated in place.
    """
    p = param.double()
    g = grad.double()
    if grad_scale is not None:
        g = g / grad_scale
    if maximize:
        g = -g
    if weight_decay != 0:
        if decoupled_weight_decay:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    state["step"] += 1
    t = state["step"]
    state["exp_avg"].mul_(beta1).add_((1 - beta1) * g)
    state["exp_avg_sq"].mul_(beta2).add_((1 - beta2) * g * g)
    second = state["exp_avg_sq"]
    if amsgrad:
        torch.maximum(state["max_exp_avg_sq"], second, out=state["max_exp_avg_sq"])
        second = state["max_exp_avg_sq"]
    m_hat = state["exp_avg"] / (1 - beta1**t)
    v_hat = second / (1 - beta2**t)
    return p - lr * m_hat / (v_hat.sqrt() + eps)


def adam_new_state(param: torch.Tensor, amsgrad: bool) -> dict:
    """A zero float64 state for adam_step."""
    state = {"step": 0, "exp_avg": torch.zeros(param.shape, dtype=torch.float64),
             "exp_avg_sq": torch.zeros(param.shape, dtype=torch.float64)}
    if amsgrad:
        state["max_exp_avg_sq"] = torch.zeros(param.shape, dtype=torch.float64)
    return state


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (float64) rounded to `dtype` to nearest even, returned as float64."""
    return x.to(dtype).double()


def adam_random_bits(seed: int, rng_id: int, step: int, numel: int) -> torch.Tensor:
    """The 16 random bits of each element of a tensor for FusedAdam's stochastic rounding (kernels/adam.h):
    element e takes half e % 2 (low, high) of word (e // 2) % 4 of Philox4x32-10 under key `seed` with counter
    (group lo, group hi, stream lo, stream hi), group = e // 8, stream = rng_id << 32 | step.
    Returned as int64 values in [0, 2**16)."""
    groups = torch.arange((numel + 7) // 8, dtype=torch.int64)
    stream = (rng_id << 32) | step
    words = torch.stack(philox4x32((groups & _U32, groups >> 32, stream & _U32, stream >> 32), seed), dim=1)
    words = words.reshape(-1)  # word w covers elements 2w, 2w + 1
    return torch.stack([words & 0xFFFF, words >> 16], dim=1).reshape(-1)[:numel]


def bf16_stochastic_round(x: torch.Tensor, random16: torch.Tensor) -> torch.Tensor:
    """float32 x rounded to bfloat16 by adding 16 random bits (int64 in [0, 2**16)) to its bit pattern and
    truncating (finite x; x rounds away from zero with probability (its low 16 bits) / 2**16)."""
    bits = x.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = ((bits + random16) >> 16) << 16
    return rounded.to(torch.int32, copy=True).view(torch.float32).to(torch.bfloat16)


# ==== cross-entropy ========================================================================================

def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  z_loss: float = 0.0, softcap: float | None = None):
    """fusedops.cross_entropy in float64: returns (loss, lse), lse per token (0 where ignored).

    Per token: y = softcap·tanh(x/softcap) (if softcap), lse = log Σ_c exp(y_c), log p = y - lse,
    loss = -(1-ε)·w_t·log p_t - (ε/C)·Σ_c w_c·log p_c + z·lse²; ignored tokens: 0.
    mean = Σ loss / Σ_{tokens not ignored} w_t.
    """
    x = logits.double()
    classes = x.shape[1] if x.dim() >= 2 else x.shape[0]
    if x.dim() == 1:
        x, t = x.unsqueeze(0), target.reshape(1)
    else:
        x, t = x.movedim(1, -1).reshape(-1, classes), target.reshape(-1)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    w = weight.double() if weight is not None else torch.ones(classes, dtype=torch.float64, device=x.device)
    ignored = t == ignore_index
    t_safe = torch.where(ignored, torch.zeros_like(t), t)
    lse = torch.logsumexp(x, dim=1)
    logp = x - lse.unsqueeze(1)
    w_t = w[t_safe]
    nll = -logp.gather(1, t_safe.unsqueeze(1)).squeeze(1) * w_t
    loss = (1 - label_smoothing) * nll
    if label_smoothing > 0:  # as torch: no smoothing term at all without smoothing (it may be inf)
        loss = loss + label_smoothing / classes * -(logp * w).sum(dim=1)
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    loss = torch.where(ignored, torch.zeros_like(loss), loss)
    lse = torch.where(ignored, torch.zeros_like(lse), lse)
    shape = target.shape
    if reduction == "none":
        return loss.reshape(shape), lse.reshape(shape)
    if reduction == "sum":
        return loss.sum(), lse.reshape(shape)
    denom = torch.where(ignored, torch.zeros_like(w_t), w_t).sum()
    # torch's mean over a zero denominator is 0/0 = NaN, even when the smoothing term's sum is not 0
    mean = torch.where(denom != 0, loss.sum() / denom, torch.full_like(denom, float("nan")))
    return mean, lse.reshape(shape)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, class_weight: torch.Tensor | None = None, **options):
    """fusedops.linear_cross_entropy in float64: cross_entropy(hidden @ weight.T + bias, target); returns
    (loss, lse)."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if hidden.dim() > 2:  # (..., H): the class dimension is last
        logits = logits.reshape(-1, logits.shape[-1])
        loss, lse = cross_entropy(logits, target.reshape(-1), class_weight, **options)
        shape = target.shape if options.get("reduction", "mean") == "none" else ()
        return loss.reshape(shape), lse.reshape(target.shape)
    return cross_entropy(logits, target, class_weight, **options)


# ==== attention ============================================================================================

import math  # noqa: E402  (kept inside this section, which the attention work owns)

def dropout_threshold(p: float) -> int:
    """kernels/attention.h's dropout_threshold: p as a float32, scaled to 32 bits and truncated."""
    t = float(torch.tensor(p, dtype=torch.float32)) * 4294967296.0
    return 0xFFFFFFFF if t >= 4294967295.0 else int(t)


def dropout_keep(seed: int, streams: torch.Tensor, num_keys: int, p: float) -> torch.Tensor:
    """Which keys survive dropout: bool (*streams.shape, num_keys). Key j of a query row with Philox stream
    `stream` is kept iff word j % 4 of Philox(counter = (j // 4, stream), key = seed) >= dropout_threshold(p)."""
    streams = torch.as_tensor(streams, dtype=torch.int64).cpu()
    groups = torch.arange((num_keys + 3) // 4, dtype=torch.int64)
    s = streams.unsqueeze(-1)
    words = philox4x32((groups & _U32, groups >> 32, s & _U32, s >> 32), seed)
    numbers = torch.stack(words, dim=-1).flatten(-2)[..., :num_keys]
    return numbers >= dropout_threshold(p)


def _safe_softmax(s: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over the visible entries of the last dim, and its logsumexp; rows with nothing visible (or only
    -inf scores) give p = 0 and lse = -inf rather than NaN."""
    s = s.masked_fill(~visible, float("-inf"))
    if s.shape[-1] == 0:  # no keys at all
        return s.new_zeros(s.shape), s.new_full(s.shape[:-1], float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    total = e.sum(dim=-1, keepdim=True)
    nonzero = total > 0
    p = e / torch.where(nonzero, total, torch.ones_like(total))
    lse = torch.where(nonzero, m + torch.log(torch.where(nonzero, total, torch.ones_like(total))),
                      torch.full_like(total, float("-inf")))
    return p, lse.squeeze(-1)


def attention_dense(q, k, v, *, attn_mask, scale, softcap, slopes, window, bottom_right, dropout_p, dropout_seed,
                     streams):
    """The attention kernels' semantics exactly as csrc/kernels/attention.h states them (alignment, windows,
    ALiBi, masks, Philox dropout by stream): q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) →
    (out (B, Hq, L, Ev), lse (B, Hq, L)), in float64. slopes: (B, Hq) or None; streams: the Philox stream of
    each query row, (B, Hq, L)."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, L, E = q.shape
    S = k.shape[2]
    group = Hq // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)
    s = scale * (q @ k.transpose(-1, -2))
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(L, device=q.device).view(L, 1)
    j = torch.arange(S, device=q.device).view(1, S)
    d = j - i - ((S - L) if bottom_right else 0)  # key position relative to the query's diagonal
    if slopes is not None:
        s = s - slopes.double().view(B, Hq, 1, 1) * d.abs().double()
    visible = torch.ones(B, Hq, L, S, dtype=torch.bool, device=q.device)
    if window[0] >= 0:
        visible = visible & (d >= -window[0])
    if window[1] >= 0:
        visible = visible & (d <= window[1])
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            s = s + attn_mask.double()
    p, lse = _safe_softmax(s, visible)
    if dropout_p > 0:
        keep = dropout_keep(dropout_seed, streams, S, dropout_p).to(q.device)
        p = p * keep / (1.0 - dropout_p)
    return p @ v, lse


def _slopes(alibi_slopes, B, H):
    """ALiBi slopes given per head (H,) or per batch and head (B, H), as (B, H)."""
    return None if alibi_slopes is None else alibi_slopes.double().expand(B, H)


def attention(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, alibi_slopes=None, scale=None, attn_mask=None,
              dropout_p=0.0, dropout_seed=0, bottom_right=True):
    """Reference for fusedops.attention (layout (B, H, L, E); causal and windows aligned bottom-right unless
    bottom_right=False). attn_mask: bool (True = may attend) or additive, broadcastable to (B, Hq, L, S).
    Returns (out, lse) in float64."""
    B, Hq, L, E = q.shape
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    window = (window[0], 0) if causal else tuple(window)
    streams = torch.arange(B * Hq * L, dtype=torch.int64).view(B, Hq, L)  # ((b·Hq + h)·L + i)
    return attention_dense(q, k, v, attn_mask=attn_mask, scale=scale, softcap=softcap,
                            slopes=_slopes(alibi_slopes, B, Hq), window=window, bottom_right=bottom_right,
                            dropout_p=dropout_p, dropout_seed=dropout_seed, streams=streams)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, *, causal=False, window=(-1, -1),
                     softcap=0.0, alibi_slopes=None, scale=None, dropout_p=0.0, dropout_seed=0, bottom_right=True):
    """Reference for fusedops.attention_varlen: q (total_q, H, E); sequence b is rows cu[b]:cu[b+1]. Dropout
    streams use max_seqlen_q as the row count of every sequence. Returns (out (total_q, H, Ev), lse (H, total_q))."""
    Hq, E = q.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    window = (window[0], 0) if causal else tuple(window)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1).unsqueeze(0)
        kb = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1).unsqueeze(0)
        vb = v[cu_k[b]:cu_k[b + 1]].transpose(0, 1).unsqueeze(0)
        Lb = qb.shape[2]
        streams = ((b * Hq + torch.arange(Hq).view(Hq, 1)) * max_seqlen_q + torch.arange(Lb).view(1, Lb)).unsqueeze(0)
        slopes = None
        if alibi_slopes is not None:
            slopes = (alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes).view(1, Hq)
        o, lse = attention_dense(qb, kb, vb, attn_mask=None, scale=scale, softcap=softcap, slopes=slopes,
                                  window=window, bottom_right=bottom_right, dropout_p=dropout_p,
                                  dropout_seed=dropout_seed, streams=streams)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, dropout_seed=0):
    """Reference for fusedops.scaled_dot_product_attention (torch's semantics: batch dims broadcast, causal
    aligned top-left and combined with attn_mask, a fully masked row gives 0). Dropout follows fusedops' Philox
    streams, numbered over the output's flattened batch dims: (flat batch index · L + i)."""
    q, k, v = query.double(), key.double(), value.double()
    L, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if enable_gqa and q.dim() >= 3 and k.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])  # value's batch counts too
    q, k, v = (t.expand(*batch, *t.shape[-2:]) for t in (q, k, v))
    s = scale * (q @ k.transpose(-1, -2))
    visible = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if is_causal:
        visible = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            s = s + attn_mask.double()
    visible = visible.expand(s.shape)
    p, _ = _safe_softmax(s, visible)
    if dropout_p > 0:
        batch = p.shape[:-2]
        streams = torch.arange(math.prod(batch) * L, dtype=torch.int64).view(*batch, L)
        p = p * dropout_keep(dropout_seed, streams, S, dropout_p).to(p.device) / (1.0 - dropout_p)
    return p @ v
