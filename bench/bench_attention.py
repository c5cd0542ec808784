"""Attention: forward and forward + backward over a sweep of sequence lengths, causal and not, fp32 and bf16.

fusedops.scaled_dot_product_attention against torch's F.scaled_dot_product_attention (the peer for
ratios) eager and under torch.compile (when it compiles here), and FlashAttention's flash_attn_func on
CUDA when installed (16-bit only; it takes (B, S, H, D) tensors, its own layout). The total number of
tokens B·S is fixed across the sweep (as FlashAttention's own benchmarks do), so longer sequences come
in smaller batches. A very slow path (torch's bf16 backward on a CPU without bf16 units runs at a few
GFLOP/s) gets fewer timed runs from the time budget, and its row says so.

FLOPs counted as FlashAttention does: forward 4·B·H·S²·D (two matmuls), halved when causal (the half
that is computed); backward 2.5× the forward, so forward + backward 3.5×. The fraction compares with the
matmul rate measured at the start of the run (for bf16 the faster of the fp32 and bf16 rates: a CPU
without bf16 units computes it in fp32). Peak memory is the extra memory of the first call (the inputs
exist before).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from . import harness

OP = "attention"


def shapes(quick: bool, device: str) -> dict[str, list[int]]:
    if device == "cuda":
        if quick:
            return {"S": [512, 2048, 8192], "D": [128], "tokens": [16384], "model_dim": [2048]}
        return {"S": [512, 1024, 2048, 4096, 8192, 16384], "D": [128], "tokens": [16384], "model_dim": [2048]}
    if quick:
        return {"S": [128, 256], "D": [64], "tokens": [512], "model_dim": [256]}
    return {"S": [256, 512, 1024, 2048], "D": [64], "tokens": [2048], "model_dim": [256]}


@dataclasses.dataclass
class Case:
    batch: int
    heads: int
    seq: int
    head_dim: int
    dtype: str
    causal: bool

    @property
    def label(self) -> str:
        return (f"B={self.batch} H={self.heads} S={self.seq} D={self.head_dim} {self.dtype}"
                f"{' causal' if self.causal else ''}")


def cases(ctx, shapes: dict) -> list[Case]:
    out = []
    for dt in ctx.pick_dtypes(["float32", "bfloat16"]):
        for causal in (False, True):
            for d in shapes["D"]:
                for s in shapes["S"]:
                    for tokens in shapes["tokens"]:
                        for model_dim in shapes["model_dim"]:
                            out.append(Case(max(1, tokens // s), max(1, model_dim // d), s, d, dt, causal))
    return out


def _flash_attn(device: torch.device, dtype: torch.dtype):
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from flash_attn import flash_attn_func

        return flash_attn_func
    except Exception:  # noqa: BLE001 - FlashAttention is optional
        return None


def _impls(ctx, case: Case, q, k, v, grad_out):
    """(name, mode, fn, note, compile first) for both modes."""
    import fusedops

    def forward(attn, q, k, v):
        def run():
            with torch.no_grad():
                return attn(q, k, v)
        return run

    def forward_backward(attn, q, k, v, g):
        def run():
            out = attn(q, k, v)
            return torch.autograd.grad(out, (q, k, v), g)
        return run

    causal = case.causal
    ours = lambda q, k, v: fusedops.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    stock = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    impls = []
    for mode in ("fwd", "fwd+bwd"):
        make = forward if mode == "fwd" else (lambda a, q, k, v: forward_backward(a, q, k, v, grad_out))
        impls.append(("fusedops", mode, make(ours, q, k, v), "", False))
        impls.append(("torch", mode, make(stock, q, k, v), "F.scaled_dot_product_attention", False))
        if ctx.compile:
            impls.append(("torch.compile", mode, make(harness.compiled(stock), q, k, v), "inductor, default mode",
                          True))
        flash = _flash_attn(ctx.device, q.dtype)
        if flash is not None:
            # Its own (B, S, H, D) layout, contiguous: the copies are made here, outside the timing.
            qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
            gf = grad_out.transpose(1, 2).contiguous()
            fa = lambda q, k, v: flash(q, k, v, causal=causal)  # noqa: E731
            run = forward(fa, qf, kf, vf) if mode == "fwd" else forward_backward(fa, qf, kf, vf, gf)
            impls.append(("flash-attn", mode, run, "flash_attn_func, (B, S, H, D) layout", False))
    return impls


def run_case(ctx, case: Case) -> list[harness.Row]:
    device = ctx.device
    dtype = harness.DTYPES[case.dtype]
    shape = (case.batch, case.heads, case.seq, case.head_dim)
    q, k, v = (torch.randn(shape, device=device).to(dtype).requires_grad_(True) for _ in range(3))
    grad_out = torch.randn_like(q)
    forward_flops = 4.0 * case.batch * case.heads * case.seq**2 * case.head_dim * (0.5 if case.causal else 1.0)
    limit = ctx.limits.matmul_tflops(dtype)
    unit = "TFLOP/s" if device.type == "cuda" else "GFLOP/s"
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        flops = forward_flops * (3.5 if mode == "fwd+bwd" else 1.0)
        params = {"mode": mode, "B": case.batch, "H": case.heads, "S": case.seq, "D": case.head_dim,
                  "dtype": case.dtype, "causal": case.causal, "x": case.seq, "x_label": "sequence length S",
                  "panel": f"{mode}, D={case.head_dim}, {case.dtype}{', causal' if case.causal else ''}"}
        impls = [harness.Impl(fn, impl, note, first_call)
                 for impl, m, fn, note, first_call in _impls(ctx, case, q, k, v, grad_out) if m == mode]
        rows += harness.measure_rows(ctx, impls, op=OP, case=f"{mode} {case.label}", params=params, unit=unit,
                                     rate=harness.flop_rate(flops, limit, device))
    del q, k, v, grad_out
    harness.free_memory(device)
    return rows
