"""Cross-entropy, forward + backward of the mean loss over N tokens × V classes, fp32 and bf16 logits.

fusedops.cross_entropy against torch.nn.functional.cross_entropy eager (the peer for ratios) and under
torch.compile (when it compiles here), and Liger-Kernel's LigerCrossEntropyLoss on CUDA when installed
(it writes the gradient over the logits, so it runs last in each case).

GB/s counts the logits read once and the gradient written once (2·N·V·element bytes): the least any
implementation must move; the fraction is against the machine's measured copy bandwidth. Peak memory is
the extra memory of one forward + backward (the logits and targets exist before).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from . import harness

OP = "cross_entropy"


def shapes(quick: bool, device: str) -> dict[str, list[int]]:
    if quick:
        return {"N": [512], "V": [32000, 50257]}
    return {"N": [4096], "V": [32000, 50257, 128256]}


@dataclasses.dataclass
class Case:
    n: int
    v: int
    dtype: str

    @property
    def label(self) -> str:
        return f"N={self.n} V={self.v} {self.dtype}"


def cases(ctx, shapes: dict) -> list[Case]:
    return [Case(n, v, dt) for dt in ctx.pick_dtypes(["float32", "bfloat16"]) for n in shapes["N"] for v in shapes["V"]]


def _impls(ctx, x, t):
    """(name, fn, note, compile first) — fn runs forward + backward, and drops the gradient, as a training
    step does (torch then allocates fresh pages for the next one; fusedops writes the next gradient into the
    same buffer on the CPU, fusedops.empty_cache; the peak memory is measured with that buffer released, so
    it counts the gradient for both)."""
    import fusedops

    def call(loss_fn):
        def run():
            loss_fn(x, t).backward()
            x.grad = None
        return run

    reuse = "gradient buffer reused between calls" if ctx.device.type == "cpu" else ""
    impls = [("fusedops", call(fusedops.cross_entropy), reuse, False),
             ("torch", call(F.cross_entropy), "F.cross_entropy", False)]
    if ctx.compile:
        impls.append(("torch.compile", call(harness.compiled(F.cross_entropy)), "inductor, default mode", True))
    if ctx.device.type == "cuda":
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss

            impls.append(("liger", call(LigerCrossEntropyLoss()), "gradient written over the logits", False))
        except Exception:  # noqa: BLE001 - Liger-Kernel is optional
            pass
    return impls


def run_case(ctx, case: Case) -> list[harness.Row]:
    device = ctx.device
    dtype = harness.DTYPES[case.dtype]
    logits_bytes = case.n * case.v * dtype.itemsize
    # torch eager holds about three more buffers of the logits' size (fp32) at its peak; leave room.
    needed_gib = (logits_bytes + 3 * case.n * case.v * 4) / 2**30 + 0.5
    if harness.available_memory_gib(device) < needed_gib:
        ctx.log(f"cross_entropy {case.label}: skipped, it needs about {needed_gib:.1f} GiB free")
        return []
    x = torch.randn(case.n, case.v, device=device, dtype=dtype).requires_grad_(True)
    t = torch.randint(0, case.v, (case.n,), device=device)
    params = {"N": case.n, "V": case.v, "dtype": case.dtype,
              "panel": f"fwd+bwd, N={case.n}, {case.dtype}", "x": case.v, "x_label": "vocabulary V"}
    impls = [harness.Impl(fn, impl, note, first_call) for impl, fn, note, first_call in _impls(ctx, x, t)]
    rows = harness.measure_rows(ctx, impls, op=OP, case=case.label, params=params, unit="GB/s",
                                rate=harness.bandwidth(2 * logits_bytes, ctx.limits.copy_gbs))
    del x, t
    harness.free_memory(device)
    return rows
