"""Adam: one optimizer step over ~100 fp32 tensors of mixed sizes (a model's worth of parameters).

fusedops.optim.FusedAdam (fp32 moments, and bf16 moments with state_dtype=torch.bfloat16) against
torch.optim.Adam with fused=True (the peer for ratios) and foreach=True, and apex.optimizers.FusedAdam
(adam_w_mode=False) on CUDA when apex is installed, all on the same parameters and gradients.

Bytes counted per parameter: fp32 moments 28 (read param, grad, exp_avg, exp_avg_sq; write param, exp_avg,
exp_avg_sq), bf16 moments 20. The rate is that traffic over the median step time; the fraction is against
the machine's measured triad bandwidth (the same read-read-write pattern). No peer has bf16 moments: the
bf16-moment row's ratios compare it with their fp32 steps, the time a user of those would pay.
"""
from __future__ import annotations

import dataclasses

import torch

from . import harness

OP = "adam"
PEER = "torch fused"


def shapes(quick: bool, device: str) -> dict[str, list[int]]:
    return {"params": [1_000_000, 4_000_000] if quick else [25_000_000, 100_000_000], "tensors": [100]}


@dataclasses.dataclass
class Case:
    total: int
    count: int

    @property
    def label(self) -> str:
        return f"{self.count} tensors, {self.total / 1e6:g}M params"


def cases(ctx, shapes: dict) -> list[Case]:
    return [Case(total, count) for count in shapes["tensors"] for total in shapes["params"]]


def tensor_sizes(total: int, count: int = 100, seed: int = 0) -> list[int]:
    """`count` sizes summing to about `total`: a model-like mix of large matrices and small vectors
    (biases, norms), odd sizes included."""
    g = torch.Generator().manual_seed(seed)
    big = max(1, count * 3 // 5)
    weights = torch.rand(big, generator=g) + 0.2
    small = [int(torch.randint(1, 8193, (1,), generator=g)) for _ in range(count - big)]
    budget = max(big, total - sum(small))
    large = [max(1, int(w)) for w in (weights / weights.sum() * budget).tolist()]
    sizes = large + small
    order = torch.randperm(count, generator=g).tolist()
    return [sizes[i] for i in order]


def _impls(device: torch.device):
    """(name, optimizer factory, bytes per parameter, note)."""
    from fusedops.optim import FusedAdam

    impls = [
        ("fusedops", lambda ps: FusedAdam(ps, lr=1e-3), 28, ""),
        ("fusedops bf16-moments", lambda ps: FusedAdam(ps, lr=1e-3, state_dtype=torch.bfloat16), 20,
         "state_dtype=bfloat16 (stochastically rounded moments)"),
        ("torch fused", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), 28, "torch.optim.Adam(fused=True)"),
        ("torch foreach", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True), 28, "torch.optim.Adam(foreach=True)"),
    ]
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam as ApexFusedAdam

            impls.append(("apex", lambda ps: ApexFusedAdam(ps, lr=1e-3, adam_w_mode=False), 28,
                          "apex.optimizers.FusedAdam(adam_w_mode=False)"))
        except Exception:  # noqa: BLE001 - apex is optional
            pass
    return impls


def run_case(ctx, case: Case) -> list[harness.Row]:
    device = ctx.device
    sizes = tensor_sizes(case.total, case.count)
    n = sum(sizes)
    needed_gib = 44 * n / 2**30  # params, grads and every optimizer's two moments at once
    if harness.available_memory_gib(device) < needed_gib:
        ctx.log(f"adam {case.label}: skipped, it needs about {needed_gib:.1f} GiB free")
        return []
    g = torch.Generator(device="cpu").manual_seed(1)
    params = [torch.randn(s, generator=g).to(device).requires_grad_() for s in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device) * 1e-3
    params_common = {"params": n, "tensors": len(sizes), "panel": f"step over {len(sizes)} fp32 tensors", "x": n,
                     "x_label": "parameters"}
    # Every optimizer exists at once (their steps are timed in interleaved rounds); each allocates its
    # state in its first, warm-up, step.
    impls = [harness.Impl(make(params).step, impl, note, peak=False,
                          rate=harness.bandwidth(bytes_per_param * n, ctx.limits.triad_gbs),
                          params={**params_common, "bytes_per_param": bytes_per_param})
             for impl, make, bytes_per_param, note in _impls(device)]
    rows = harness.measure_rows(ctx, impls, op=OP, case=case.label, params=params_common, unit="GB/s",
                                rate=impls[0].rate)
    del impls, params
    harness.free_memory(device)
    return rows
