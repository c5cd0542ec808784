"""Float64 references for every fusedops op, written plainly in PyTorch.

Tests and benchmarks compare the kernels against these. Each function says in a few lines what the op
computes — no fusion, no tiling, no tricks — and computes it in float64.
"""
from __future__ import annotations

import torch


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


def _philox4x32_10(key: int, counters: "np.ndarray") -> "np.ndarray":
    """Philox4x32-10 (Salmon et al., SC'11) on an (N, 4) array of uint32 counters under a 64-bit key."""
    import numpy as np

    c = [counters[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    mask = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0 = c[0] * np.uint64(0xD2511F53)  # exact: a 32 x 32-bit product fits in 64 bits
        p1 = c[2] * np.uint64(0xCD9E8D57)
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
        k0 = (k0 + np.uint64(0x9E3779B9)) & mask
        k1 = (k1 + np.uint64(0xBB67AE85)) & mask
    return np.stack(c, axis=1).astype(np.uint32)


def adam_random_bits(seed: int, rng_id: int, step: int, numel: int) -> torch.Tensor:
    """The 16 random bits of each element of a tensor for FusedAdam's stochastic rounding (kernels/adam.h):
    element e takes half e % 2 (low, high) of word (e // 2) % 4 of Philox4x32-10 under key `seed` with counter
    (group lo, group hi, stream lo, stream hi), group = e // 8, stream = rng_id << 32 | step.
    Returned as int64 values in [0, 2**16)."""
    import numpy as np

    groups = np.arange((numel + 7) // 8, dtype=np.uint64)
    stream = (rng_id << 32) | step
    counters = np.stack([groups & np.uint64(0xFFFFFFFF), groups >> np.uint64(32),
                         np.full_like(groups, stream & 0xFFFFFFFF), np.full_like(groups, stream >> 32)], axis=1)
    words = _philox4x32_10(seed, counters.astype(np.uint32)).reshape(-1)  # word w covers elements 2w, 2w + 1
    halves = np.stack([words & 0xFFFF, words >> 16], axis=1).reshape(-1)[:numel]
    return torch.from_numpy(halves.astype(np.int64))


def bf16_stochastic_round(x: torch.Tensor, random16: torch.Tensor) -> torch.Tensor:
    """float32 x rounded to bfloat16 by adding 16 random bits (int64 in [0, 2**16)) to its bit pattern and
    truncating (finite x; x rounds away from zero with probability (its low 16 bits) / 2**16)."""
    bits = x.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = ((bits + random16) >> 16) << 16
    return rounded.to(torch.int32, copy=True).view(torch.float32).to(torch.bfloat16)


# ==== cross-entropy ========================================================================================




# ==== attention ============================================================================================



