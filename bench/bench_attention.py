"""Attention: fusedops.scaled_dot_product_attention against torch's, forward and forward+backward.

FLOPs counted as FlashAttention does: forward 4·B·H·L·S·D (two matmuls), halved when causal (the half
that is computed); backward 2.5× the forward; forward+backward 3.5×. The fraction column compares with
the fp32 matmul rate measured at the start of the run (bf16 is computed in fp32 on CPUs without bf16
units, so the fp32 rate is the relevant ceiling there too). Peak memory: one forward+backward at
S = 8192, the extra resident memory of the call (the inputs are allocated before).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import fusedops

from . import harness

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _cases(ctx):
    """(mode, batch·heads, S, D, dtype name, causal)."""
    out = []
    if ctx.quick:
        for dt in ("float32", "bfloat16"):
            for causal in (False, True):
                for mode in ("fwd", "fwd+bwd"):
                    out.append((mode, 8, 512, 64, dt, causal))
        return out
    for dt in ("float32", "bfloat16"):
        for S in (512, 1024, 2048, 4096):
            bh = {512: 32, 1024: 16}.get(S, 8)
            for D in (64, 128):
                if dt == "bfloat16" and (S >= 2048 or (S == 1024 and D == 128)):
                    continue  # torch's bf16 backward runs at a few GFLOP/s: minutes per case
                if S == 4096 and D == 128:
                    continue
                for causal in (False, True):
                    for mode in ("fwd", "fwd+bwd"):
                        out.append((mode, bh, S, D, dt, causal))
    return out


def _inputs(bh, S, D, dtype, device, grad):
    B = 2 if bh % 2 == 0 else 1
    H = bh // B
    q, k, v = (torch.randn(B, H, S, D, device=device).to(dtype).requires_grad_(grad) for _ in range(3))
    return q, k, v


def _runner(impl, mode, q, k, v, causal):
    sdpa = fusedops.scaled_dot_product_attention if impl == "fusedops" else F.scaled_dot_product_attention
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return sdpa(q, k, v, is_causal=causal)
    else:
        g = torch.randn_like(q)

        def run():
            out = sdpa(q, k, v, is_causal=causal)
            return torch.autograd.grad(out, (q, k, v), g)
    return run


def run(ctx) -> list[harness.Row]:
    rows: list[harness.Row] = []
    device = ctx.device
    peak = ctx.limits.matmul_fp32_tflops
    for mode, bh, S, D, dt, causal in _cases(ctx):
        if not ctx.want_dtype(dt):
            continue
        q, k, v = _inputs(bh, S, D, DTYPES[dt], device, grad=mode != "fwd")
        flops = 4.0 * bh * S * S * D * (0.5 if causal else 1.0) * (3.5 if mode == "fwd+bwd" else 1.0)
        case = f"{mode} BH={bh} S={S} D={D} {dt}{' causal' if causal else ''}"
        for impl in ("fusedops", "torch"):
            fn = _runner(impl, mode, q, k, v, causal)
            big = flops > 5e10
            ms = harness.time_ms(fn, device, warmup=1, reps=2 if big else 3)
            tflops = flops / (ms * 1e-3) / 1e12
            rows.append(harness.Row(op="attention", case=case, impl=impl, device=str(device), ms=ms, metric=tflops,
                                    unit="TFLOP/s", fraction=tflops / peak if peak > 0 else 0.0,
                                    params=dict(mode=mode, BH=bh, S=S, D=D, dtype=dt, causal=causal)))
            ctx.log(f"attention {case} {impl}: {ms:.1f} ms, {tflops * 1e3:.1f} GFLOP/s")
        del q, k, v

    # Peak memory of one forward+backward at S = 8192 (O(S) for fused kernels; S² scores would be 256 MiB
    # per head in fp32).
    if ctx.want_dtype("float32"):
        bh, S, D = (2, 8192, 64) if not ctx.quick else (1, 4096, 64)
        q, k, v = _inputs(bh, S, D, torch.float32, device, grad=True)
        flops = 4.0 * bh * S * S * D * 3.5
        case = f"fwd+bwd peak memory BH={bh} S={S} D={D} float32"
        for impl in ("fusedops", "torch"):
            fn = _runner(impl, "fwd+bwd", q, k, v, False)
            fn()  # warm up allocator and thread pool outside the measurement
            ms_box = []

            def timed():
                t0 = time.perf_counter()
                fn()
                ms_box.append((time.perf_counter() - t0) * 1e3)

            mib = harness.peak_memory_mib(timed, device)
            ms = ms_box[0]
            tflops = flops / (ms * 1e-3) / 1e12
            rows.append(harness.Row(op="attention", case=case, impl=impl, device=str(device), ms=ms, metric=tflops,
                                    unit="TFLOP/s", fraction=tflops / peak if peak > 0 else 0.0, peak_mib=mib,
                                    note="single run", params=dict(mode="fwd+bwd", BH=bh, S=S, D=D,
                                                                   dtype="float32", causal=False)))
            ctx.log(f"attention {case} {impl}: {ms:.0f} ms, peak {mib} MiB")
    return rows
