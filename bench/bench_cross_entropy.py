"""Cross-entropy benchmarks: fusedops against torch in the same run.

* cross_entropy, forward + backward, N tokens × V classes, fp32 and bf16 logits, against
  torch.nn.functional.cross_entropy eager and under torch.compile (when it compiles here).
  GB/s counts the logits read once and the gradient written once (2·N·V·element bytes): the least any
  implementation must move. Peak memory is the extra memory of one forward + backward (the logits and
  targets exist before).
* linear_cross_entropy, forward + backward of the loss of hidden @ weight.T, against
  F.cross_entropy(hidden @ weight.T): time and peak memory (TFLOP/s counts the three matmuls).
"""
from __future__ import annotations

import gc
import time

import torch
import torch.nn.functional as F

from . import harness

OP = "cross_entropy"


def _available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _xent_cases(ctx):
    if ctx.quick:
        return 1024, [32000]
    return 4096, [32000, 50257, 128256]


def _timing(ctx, big: bool):
    if ctx.quick:
        return dict(warmup=1, reps=3)
    return dict(warmup=1, reps=3) if big else dict(warmup=2, reps=7)


def bench_cross_entropy(ctx) -> list[harness.Row]:
    import fusedops

    device = ctx.device
    rows: list[harness.Row] = []
    n, vocabs = _xent_cases(ctx)
    for dtype_name in ("float32", "bfloat16"):
        if not ctx.want_dtype(dtype_name):
            continue
        dtype = getattr(torch, dtype_name)
        for v in vocabs:
            case = f"N={n} V={v} {dtype_name} fwd+bwd"
            logits_bytes = n * v * torch.tensor([], dtype=dtype).element_size()
            # torch eager needs about 3 more buffers of the logits' size at its peak; leave room.
            if device.type == "cpu" and _available_gib() < 6 * logits_bytes / 2**30:
                ctx.log(f"{case}: skipped, not enough free memory")
                continue
            x = torch.randn(n, v, device=device, dtype=dtype).requires_grad_(True)
            t = torch.randint(0, v, (n,), device=device)
            moved = 2 * logits_bytes

            def fused():
                x.grad = None
                fusedops.cross_entropy(x, t).backward()

            def eager():
                x.grad = None
                F.cross_entropy(x, t).backward()

            impls = [("fusedops", fused, ""), ("torch", eager, "")]
            try:
                compiled_fn = torch.compile(F.cross_entropy)

                def compiled():
                    x.grad = None
                    compiled_fn(x, t).backward()

                compiled()  # compile outside the timing
                impls.append(("torch.compile", compiled, "inductor, default mode"))
            except Exception as e:  # noqa: BLE001 - a peer that does not compile here is reported, not fatal
                ctx.log(f"{case}: torch.compile unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            for impl, fn, note in impls:
                ctx.log(f"{case}: {impl} ...")
                ms = harness.time_ms(fn, device, **_timing(ctx, v > 100000 or dtype == torch.bfloat16))
                x.grad = None
                _free(device)
                peak = harness.peak_memory_mib(fn, device)
                x.grad = None
                _free(device)
                gbs = moved / (ms * 1e-3) / 1e9
                rows.append(harness.Row(op=OP, case=case, impl=impl, device=device.type, ms=ms, metric=gbs, unit="GB/s",
                                        fraction=gbs / ctx.limits.copy_gbs, peak_mib=peak, note=note,
                                        params={"N": n, "V": v, "dtype": dtype_name}))
            del x, t
            _free(device)
    return rows


def bench_linear_cross_entropy(ctx) -> list[harness.Row]:
    import fusedops

    device = ctx.device
    if ctx.quick:
        n, h, v = 1024, 512, 32000
    else:
        n, h, v = 8192, 2048, 128256
    rows: list[harness.Row] = []
    for dtype_name in ("float32",):
        if not ctx.want_dtype(dtype_name):
            continue
        dtype = getattr(torch, dtype_name)
        case = f"N={n} H={h} V={v} {dtype_name} fwd+bwd"
        esize = torch.tensor([], dtype=dtype).element_size()
        hidden = (torch.randn(n, h, device=device, dtype=dtype) / h**0.5).requires_grad_(True)
        weight = torch.randn(v, h, device=device, dtype=dtype).requires_grad_(True)
        target = torch.randint(0, v, (n,), device=device)
        flop = 3 * 2 * n * h * v

        def clear():
            hidden.grad = None
            weight.grad = None

        def fused():
            clear()
            fusedops.linear_cross_entropy(hidden, weight, target).backward()

        def stock():
            clear()
            F.cross_entropy(hidden @ weight.t(), target).backward()

        impls = [("fusedops", fused)]
        # The stock path holds the logits' log-softmax and two N×V gradients at once in its backward.
        stock_gib = (3.2 * n * v + v * h) * esize / 2**30 + 1.5
        if device.type != "cpu" or _available_gib() > stock_gib:
            impls.append(("torch", stock))
        else:
            ctx.log(f"{case}: stock path skipped, it needs about {stock_gib:.0f} GiB free")
        big = not ctx.quick and device.type == "cpu"
        for impl, fn in impls:
            ctx.log(f"{case}: {impl} ...")
            note = ""
            if big:
                # A forward + backward takes minutes on a CPU: one run, timed while its peak memory is taken.
                start = time.perf_counter()
                peak = harness.peak_memory_mib(fn, device)
                ms = (time.perf_counter() - start) * 1e3
                note = "one run"
            else:
                ms = harness.time_ms(fn, device, warmup=1, reps=3)
                clear()
                _free(device)
                peak = harness.peak_memory_mib(fn, device)
            clear()
            _free(device)
            tflops = flop / (ms * 1e-3) / 1e12
            limit = ctx.limits.matmul_fp32_tflops if dtype == torch.float32 else ctx.limits.matmul_bf16_tflops
            rows.append(harness.Row(op="linear_cross_entropy", case=case, impl=impl, device=device.type, ms=ms,
                                    metric=tflops, unit="TFLOP/s", fraction=tflops / limit, peak_mib=peak, note=note,
                                    params={"N": n, "H": h, "V": v, "dtype": dtype_name}))
        del hidden, weight, target
        _free(device)
    return rows


def run(ctx) -> list[harness.Row]:
    rows = bench_cross_entropy(ctx)
    try:
        import fusedops

        if hasattr(fusedops, "linear_cross_entropy"):
            rows += bench_linear_cross_entropy(ctx)
    except ImportError:
        pass
    return rows
