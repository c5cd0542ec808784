"""Float64 references for every fusedops op, written plainly in PyTorch.

Tests and benchmarks compare the kernels against these. Each function says in a few lines what the op
computes — no fusion, no tiling, no tricks — and computes it in float64.
"""
from __future__ import annotations

import torch


# ==== Adam / AdamW =========================================================================================




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
    return loss.sum() / torch.where(ignored, torch.zeros_like(w_t), w_t).sum(), lse.reshape(shape)


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



