"""Benchmark harness shared by every op's benchmark (bench/bench_*.py).

* timing: warmed-up repetitions, the median reported (CUDA events on a GPU, perf_counter on the CPU);
* the machine's limits, measured in the same run: copy and triad bandwidth, fp32/bf16 matmul FLOP/s;
* peak memory: torch's allocator statistics on CUDA, the process's resident high-water mark on the
  CPU (reset through /proc/self/clear_refs before each measurement);
* results: rows with the implementation, its figure, the fraction of the physical limit and the ratio
  to the peer measured in the same run, printed as a table and written as JSON with the machine.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch


# ---- timing --------------------------------------------------------------------------------------------

def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: torch.device | str = "cpu", *, warmup: int = 2, reps: int = 7,
            min_time_s: float = 0.0, max_time_s: float = 30.0) -> float:
    """Median wall time of fn() in milliseconds, after `warmup` calls.

    Repeats at least `reps` times and until `min_time_s` has passed (capped by `max_time_s`)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while True:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        elapsed = time.perf_counter() - start_all
        if (len(times) >= reps and elapsed >= min_time_s) or elapsed >= max_time_s:
            break
    return statistics.median(times)


# ---- memory --------------------------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(fn: Callable[[], object], device: torch.device | str = "cpu") -> Optional[float]:
    """Extra memory at the peak of one fn() call, in MiB, above what was in use before it.

    CUDA: torch's allocator peak. CPU: the resident-set high-water mark (VmHWM), reset through
    /proc/self/clear_refs; None where the kernel does not support that reset."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kib("VmRSS")
        if _rss_kib("VmHWM") > before + 1024:
            return None  # the reset did not take
        fn()
        return (_rss_kib("VmHWM") - before) / 1024
    except OSError:
        return None


# ---- the machine -----------------------------------------------------------------------------------------

def machine_description(device: torch.device | str = "cpu") -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": [],
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        if m:
            info["cpu"] = m.group(1).strip()
        m = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
        if m:
            wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "neon", "sve")
            info["cpu_flags"] = [f for f in m.group(1).split() if f in wanted]
        info["cores"] = os.cpu_count()
    except OSError:
        pass
    try:
        import fusedops

        info["fusedops"] = fusedops.build_info()
    except Exception as e:  # noqa: BLE001 - a benchmark of peers alone still runs
        info["fusedops"] = f"unavailable: {e}"
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def machine_tag(info: dict) -> str:
    """A short folder name for bench/results/: the GPU, or the CPU model and thread count."""
    name = info.get("gpu") or f"{info['cpu']}-{info['threads']}t"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower()


@dataclasses.dataclass
class Limits:
    copy_gbs: float       # bytes read + written per second by a large copy
    triad_gbs: float      # a = b + s·c, 12 bytes per fp32 element
    matmul_fp32_tflops: float
    matmul_bf16_tflops: float


def measure_limits(device: torch.device | str = "cpu", quick: bool = False) -> Limits:
    """The machine's practical limits, measured with torch's own kernels on large operands."""
    device = torch.device(device)
    n = (64 if device.type == "cpu" else 256) * 2**20 // (4 if quick else 1)
    b = torch.rand(n, device=device)
    c = torch.rand(n, device=device)
    a = torch.empty_like(b)
    t_copy = time_ms(lambda: a.copy_(b), device, reps=5)
    t_triad = time_ms(lambda: torch.add(b, c, alpha=1.5, out=a), device, reps=5)
    del a, b, c
    size = 1024 if device.type == "cpu" else 8192
    if quick:
        size //= 2
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(size, size, device=device, dtype=dtype)
        y = torch.randn(size, size, device=device, dtype=dtype)
        t = time_ms(lambda: torch.mm(x, y), device, reps=3)
        results.append(2 * size**3 / (t * 1e-3) / 1e12)
    return Limits(copy_gbs=8 * n / (t_copy * 1e-3) / 1e9, triad_gbs=12 * n / (t_triad * 1e-3) / 1e9,
                  matmul_fp32_tflops=results[0], matmul_bf16_tflops=results[1])


# ---- results -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    op: str              # "adam", "cross_entropy", "attention", ...
    case: str            # the shape/configuration, e.g. "N=4096 V=32000 bf16"
    impl: str            # "fusedops", "torch", "torch.compile", "liger", ...
    device: str
    ms: float            # median time
    metric: float        # GB/s or TFLOP/s (see unit)
    unit: str            # "GB/s" or "TFLOP/s"
    fraction: float      # metric / the machine's limit for that unit
    peer_ratio: Optional[float] = None  # peer_ms / ms: > 1 means fusedops is faster (fusedops rows only)
    peak_mib: Optional[float] = None
    note: str = ""
    params: dict = dataclasses.field(default_factory=dict)  # numbers for plots (e.g. {"V": 32000})


def add_peer_ratios(rows: list[Row], ours: str = "fusedops", peer: str = "torch") -> None:
    """Fill peer_ratio on our rows from the peer's row with the same op, case and device."""
    by_key = {(r.op, r.case, r.device, r.impl): r for r in rows}
    for r in rows:
        if r.impl == ours:
            p = by_key.get((r.op, r.case, r.device, peer))
            if p is not None and r.ms > 0:
                r.peer_ratio = p.ms / r.ms


def format_table(rows: list[Row]) -> str:
    header = ["op", "case", "impl", "device", "ms", "rate", "% limit", "vs peer", "peak MiB"]
    lines = [header]
    for r in rows:
        lines.append([
            r.op, r.case, r.impl, r.device, f"{r.ms:.3f}", f"{r.metric:.3g} {r.unit}", f"{100 * r.fraction:.0f}%",
            f"{r.peer_ratio:.2f}x" if r.peer_ratio is not None else "",
            f"{r.peak_mib:.0f}" if r.peak_mib is not None else "",
        ])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    out = []
    for k, row in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_markdown(rows: list[Row]) -> str:
    out = ["| op | case | impl | device | ms | rate | % of limit | vs peer | peak MiB |",
           "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(
            f"| {r.op} | {r.case} | {r.impl} | {r.device} | {r.ms:.3f} | {r.metric:.3g} {r.unit} | "
            f"{100 * r.fraction:.0f}% | {f'{r.peer_ratio:.2f}x' if r.peer_ratio is not None else ''} | "
            f"{f'{r.peak_mib:.0f}' if r.peak_mib is not None else ''} |"
        )
    return "\n".join(out)


def write_results(path: Path, rows: list[Row], machine: dict, limits: dict, command: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "limits": limits, "command": command,
               "rows": [dataclasses.asdict(r) for r in rows]}
    path.write_text(json.dumps(payload, indent=1))
