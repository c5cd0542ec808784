"""Linear cross-entropy: forward + backward of the mean cross-entropy of hidden @ weight.T (an LM head and
its loss), N tokens, hidden size H, vocabulary V.

fusedops.linear_cross_entropy (the logits are never materialized) against
F.cross_entropy(hidden @ weight.T) eager (the peer for ratios) and under torch.compile, and Liger-Kernel's
LigerFusedLinearCrossEntropyLoss on CUDA when installed. The point is memory: the stock path holds N×V
logits and their gradient; peak memory is the extra memory of one forward + backward (hidden, weight and
targets exist before). The rate counts the three matmuls (6·N·H·V FLOPs) against the measured matmul rate.

The reference shape is N=8192, H=2048, V=128256 (a Llama-3 vocabulary), the default on CUDA. On a CPU one
such forward + backward is ~13 TFLOP, minutes on a few cores, so the CPU default keeps V and shrinks N and H
(`--shape linear_cross_entropy.N=8192 --shape linear_cross_entropy.H=2048` restores them).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from . import harness

OP = "linear_cross_entropy"


def shapes(quick: bool, device: str) -> dict[str, list[int]]:
    if device == "cuda":
        if quick:
            return {"N": [4096], "H": [2048], "V": [32000, 128256]}
        return {"N": [8192], "H": [2048], "V": [32000, 50257, 128256]}
    if quick:
        return {"N": [256], "H": [128], "V": [16000, 32000]}
    return {"N": [1024], "H": [256], "V": [32000, 128256]}


@dataclasses.dataclass
class Case:
    n: int
    h: int
    v: int
    dtype: str

    @property
    def label(self) -> str:
        return f"N={self.n} H={self.h} V={self.v} {self.dtype}"


def cases(ctx, shapes: dict) -> list[Case]:
    # bf16 matmuls on a CPU without bf16 units run at a fraction of fp32's rate: fp32 only there by default.
    dtypes = ctx.pick_dtypes(["float32", "bfloat16"] if ctx.device.type == "cuda" else ["float32"])
    return [Case(n, h, v, dt) for dt in dtypes for n in shapes["N"] for h in shapes["H"] for v in shapes["V"]]


def _stock(hidden, weight, target):
    return F.cross_entropy(hidden @ weight.t(), target)


def _impls(ctx, hidden, weight, target):
    """(name, fn, note, compile first) — fn runs forward + backward, and drops the gradients (so that each
    call allocates its own, as in training, and the peak memory counts them)."""
    import fusedops

    def call(loss_fn):
        def run():
            loss_fn(hidden, weight, target).backward()
            hidden.grad = weight.grad = None
        return run

    impls = [("fusedops", call(fusedops.linear_cross_entropy), "", False),
             ("torch", call(_stock), "F.cross_entropy(hidden @ weight.T)", False)]
    if ctx.compile:
        impls.append(("torch.compile", call(harness.compiled(_stock)), "inductor, default mode", True))
    if ctx.device.type == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss()
            impls.append(("liger", call(lambda h, w, t: liger(w, h, t)), "LigerFusedLinearCrossEntropyLoss", False))
        except Exception:  # noqa: BLE001 - Liger-Kernel is optional
            pass
    return impls


def run_case(ctx, case: Case) -> list[harness.Row]:
    device = ctx.device
    dtype = harness.DTYPES[case.dtype]
    n, h, v = case.n, case.h, case.v
    params = {"N": n, "H": h, "V": v, "dtype": case.dtype,
              "panel": f"fwd+bwd, N={n}, H={h}, {case.dtype}", "x": v, "x_label": "vocabulary V"}
    rate = harness.flop_rate(6.0 * n * h * v, ctx.limits.matmul_tflops(dtype), device)
    unit = "TFLOP/s" if device.type == "cuda" else "GFLOP/s"
    hidden = (torch.randn(n, h, device=device, dtype=dtype) / h**0.5).requires_grad_(True)
    weight = torch.randn(v, h, device=device, dtype=dtype).requires_grad_(True)
    target = torch.randint(0, v, (n,), device=device)
    # The stock paths hold the logits, their log-softmax and gradient (fp32 in the loss) at once.
    stock_gib = (3 * n * v * 4 + 2 * v * h * dtype.itemsize) / 2**30 + 0.5
    rows, impls = [], []
    for impl, fn, note, first_call in _impls(ctx, hidden, weight, target):
        if impl.startswith("torch") and harness.available_memory_gib(device) < stock_gib:
            rows.append(harness.skipped_row(op=OP, case=case.label, impl=impl, device=device.type, unit=unit,
                                            params=params, note=f"skipped: needs about {stock_gib:.0f} GiB free"))
        else:
            impls.append(harness.Impl(fn, impl, note, first_call))
    rows = harness.measure_rows(ctx, impls, op=OP, case=case.label, params=params, unit=unit, rate=rate) + rows
    del hidden, weight, target
    harness.free_memory(device)
    return rows
