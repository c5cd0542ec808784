"""Adam step over ~100 tensors of mixed sizes: fusedops.optim.FusedAdam against torch.optim.Adam
(fused=True: the peer for ratios; foreach=True) in the same run.

Bytes counted per parameter: fp32 moments 28 (read param, grad, exp_avg, exp_avg_sq; write param, exp_avg,
exp_avg_sq), bf16 moments 20. The rate is that traffic over the median step time; the fraction is against
the machine's measured triad bandwidth. torch has no bf16-moment option, so in the bf16-moment cases its row
is its fp32 step (the time a user of torch would pay).
"""
from __future__ import annotations

import gc

import torch

from . import harness

OP = "adam"


def tensor_sizes(total: int, count: int = 100, seed: int = 0) -> list[int]:
    """`count` sizes summing to about `total`: a model-like mix of large matrices and small vectors
    (biases, norms), odd sizes included."""
    g = torch.Generator().manual_seed(seed)
    big = count * 3 // 5
    weights = torch.rand(big, generator=g) + 0.2
    small = [int(torch.randint(1, 8193, (1,), generator=g)) for _ in range(count - big)]
    budget = total - sum(small)
    large = [max(1, int(w)) for w in (weights / weights.sum() * budget).tolist()]
    sizes = large + small
    order = torch.randperm(count, generator=g).tolist()
    return [sizes[i] for i in order]


def _time_step(opt, device, quick: bool) -> float:
    return harness.time_ms(opt.step, device, warmup=2, reps=5 if quick else 9, min_time_s=0.5 if quick else 2.0)


def run(ctx) -> list[harness.Row]:
    from fusedops.optim import FusedAdam

    device = ctx.device
    totals = [2_500_000, 10_000_000] if ctx.quick else [25_000_000, 100_000_000]
    rows: list[harness.Row] = []
    triad = ctx.limits.triad_gbs
    for total in totals:
        sizes = tensor_sizes(total)
        n = sum(sizes)
        label = f"{len(sizes)} tensors, {n / 1e6:.0f}M params"
        g = torch.Generator(device="cpu").manual_seed(1)
        params = [torch.randn(s, generator=g).to(device).requires_grad_() for s in sizes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device) * 1e-3
        ctx.log(f"adam: {label} on {device}")

        def measure(impl, case, make, bytes_per_param, note=""):
            opt = make()
            ms = _time_step(opt, device, ctx.quick)
            del opt
            gc.collect()
            gbs = bytes_per_param * n / (ms * 1e-3) / 1e9
            rows.append(harness.Row(op=OP, case=case, impl=impl, device=device.type, ms=ms, metric=gbs, unit="GB/s",
                                    fraction=gbs / triad, note=note,
                                    params={"params": n, "tensors": len(sizes), "bytes_per_param": bytes_per_param}))
            ctx.log(f"  {impl:14s} {case:40s} {ms:8.2f} ms  {gbs:6.1f} GB/s")
            return ms

        case32 = f"{label}, fp32 moments"
        torch_ms = measure("torch", case32, lambda: torch.optim.Adam(params, lr=1e-3, fused=True), 28, "fused=True")
        measure("torch-foreach", case32, lambda: torch.optim.Adam(params, lr=1e-3, foreach=True), 28, "foreach=True")
        measure("fusedops", case32, lambda: FusedAdam(params, lr=1e-3), 28)

        case16 = f"{label}, bf16 moments"
        measure("fusedops", case16, lambda: FusedAdam(params, lr=1e-3, state_dtype=torch.bfloat16), 20,
                "stochastically rounded bf16 moments")
        gbs = 28 * n / (torch_ms * 1e-3) / 1e9
        rows.append(harness.Row(op=OP, case=case16, impl="torch", device=device.type, ms=torch_ms, metric=gbs,
                                unit="GB/s", fraction=gbs / triad,
                                note="fused=True with fp32 moments (torch has no bf16 moments), same measurement",
                                params={"params": n, "tensors": len(sizes), "bytes_per_param": 28}))
        del params
        gc.collect()
    return rows
