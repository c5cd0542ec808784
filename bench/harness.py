"""Benchmark harness shared by every op's benchmark (bench/bench_*.py).

* timing: warmed-up repetitions, the median reported (CUDA events on a GPU, perf_counter on the CPU),
  the implementations of a case timed in interleaved rounds so that load changing on a shared machine
  affects them alike; each has a time budget, so a slow call gets fewer repetitions instead of minutes;
* peak memory: torch's allocator statistics on CUDA, the process's resident high-water mark on the
  CPU (reset through /proc/self/clear_refs before each measurement, after glibc returned its free
  pages), taken on the first (warm-up) call of each measurement;
* the machine's limits, measured in the same run: copy and triad bandwidth, fp32/bf16 matmul FLOP/s;
* the machine's description: CPU model and ISA flags, GPU, torch, threads, fusedops' build, the peers;
* results: rows with the implementation, its rate, the fraction of the machine's limit and the ratios
  to the peers measured in the same run, printed as a table and written as JSON and Markdown.

A benchmark module (bench/bench_<op>.py) defines
    shapes(quick, device) -> {name: [values]}   the swept sizes (overridable with --shape op.name=...)
    cases(ctx, shapes) -> list of cases          each with a `.label`; one progress-bar step each
    run_case(ctx, case) -> list[Row]             all implementations of one case
and optionally PEER, the implementation its ratios are taken against (default "torch").
"""
from __future__ import annotations

import ctypes
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


# ---- timing --------------------------------------------------------------------------------------------

def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time_once_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_ms(fn: Callable[[], object], device: torch.device | str = "cpu", *, warmup: int = 2, reps: int = 7,
            min_time_s: float = 0.0, max_time_s: float = 30.0, stat: str = "median") -> float:
    """The median (or, stat="min", the best) time of fn() in milliseconds, after `warmup` calls.

    Repeats at least `reps` times and until `min_time_s` has passed, stopping at `max_time_s` (at least
    one repetition)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while True:
        times.append(_time_once_ms(fn, device))
        elapsed = time.perf_counter() - start_all
        if (len(times) >= reps and elapsed >= min_time_s) or elapsed >= max_time_s:
            break
    return min(times) if stat == "min" else statistics.median(times)


# ---- memory --------------------------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _malloc_trim() -> None:
    """Return glibc's free heap pages to the system, so that memory an earlier call freed (but malloc
    kept) is not already resident: the next call's allocations then show in the high-water mark."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mib(fn: Callable[[], object], device: torch.device | str = "cpu") -> Optional[float]:
    """Extra memory at the peak of one fn() call, in MiB, above what was in use before it.

    CUDA: torch's allocator peak. CPU: the resident-set high-water mark (VmHWM), reset through
    /proc/self/clear_refs; None where the kernel does not support that reset. fusedops' reused CPU buffer
    (fusedops.empty_cache) is released first, so that an output written into it still counts."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    fusedops = sys.modules.get("fusedops")
    if fusedops is not None:
        fusedops.empty_cache()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kib("VmRSS")
        reset = _rss_kib("VmHWM") <= before + 1024
    except (OSError, RuntimeError):
        reset = False
    fn()
    if not reset:
        return None  # no way to reset the high-water mark here
    return (_rss_kib("VmHWM") - before) / 1024


def available_memory_gib(device: torch.device | str) -> float:
    """Memory free for new tensors: MemAvailable on the CPU, the GPU's free memory on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info()
        return free / 2**30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def free_memory(device: torch.device | str) -> None:
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---- the machine -----------------------------------------------------------------------------------------

PEER_PACKAGES = ("flash_attn", "liger_kernel", "apex", "triton")


def peer_versions() -> dict:
    """The optional peers installed here (their version), or why not."""
    out = {}
    for name in PEER_PACKAGES:
        try:
            mod = importlib.import_module(name)
            out[name] = str(getattr(mod, "__version__", "installed"))
        except Exception as e:  # noqa: BLE001 - a broken install is as good as none, and says why
            out[name] = f"not available ({type(e).__name__})"
    return out


def machine_description(devices: list[str] | str | torch.device = "cpu") -> dict:
    """The machine, for the results: CPU model and ISA flags, GPU (when `devices` has "cuda"), torch, threads,
    fusedops' build and the optional peers installed."""
    if isinstance(devices, (str, torch.device)):
        devices = [torch.device(devices).type]
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": [],
        "devices": devices,
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        if m:
            info["cpu"] = m.group(1).strip()
        m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", cpuinfo, re.M)
        if m:
            wanted = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                      "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve", "sve2", "bf16")
            present = set(m.group(1).split())
            info["cpu_flags"] = [f for f in wanted if f in present]
    except OSError:
        pass
    try:
        import fusedops

        info["fusedops"] = fusedops.build_info()
    except Exception as e:  # noqa: BLE001 - a benchmark of the peers alone still runs
        info["fusedops"] = f"unavailable: {e}"
    info["peers"] = peer_versions()
    if "cuda" in devices and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_sms"] = props.multi_processor_count
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

    def matmul_tflops(self, dtype: torch.dtype) -> float:
        """The matmul ceiling for work in `dtype`: for 16-bit types the faster of the two measured rates
        (a CPU without bf16 units computes bf16 in fp32, so the fp32 rate is its real ceiling)."""
        if dtype in (torch.bfloat16, torch.float16):
            return max(self.matmul_fp32_tflops, self.matmul_bf16_tflops)
        return self.matmul_fp32_tflops

    def describe(self) -> str:
        return (f"copy {self.copy_gbs:.1f} GB/s, triad {self.triad_gbs:.1f} GB/s, matmul "
                f"{format_flops(self.matmul_fp32_tflops)} fp32, {format_flops(self.matmul_bf16_tflops)} bf16")


def _matmul_tflops(device: torch.device, dtype: torch.dtype, max_size: int) -> float:
    """Square matmuls, the size doubling from 256 until one takes 100 ms or reaches max_size (a CPU without
    bf16 units runs bf16 a hundred times slower than fp32: no need to wait seconds to learn that)."""
    size = 256
    while True:
        x = torch.randn(size, size, device=device, dtype=dtype)
        y = torch.randn(size, size, device=device, dtype=dtype)
        t = time_ms(lambda: torch.mm(x, y), device, warmup=1, reps=5, max_time_s=1.0, stat="min")
        if t >= 100 or size >= max_size:
            return 2 * size**3 / (t * 1e-3) / 1e12
        size *= 2


def measure_limits(device: torch.device | str = "cpu", quick: bool = False) -> Limits:
    """The machine's practical limits, measured with torch's own kernels on large operands (best of a few
    repetitions: a limit is what the machine can reach)."""
    device = torch.device(device)
    n = (64 if device.type == "cpu" else 256) * 2**20 // (4 if quick else 1)
    b = torch.rand(n, device=device)
    c = torch.rand(n, device=device)
    a = torch.empty_like(b)
    t_copy = time_ms(lambda: a.copy_(b), device, reps=10, stat="min")
    t_triad = time_ms(lambda: torch.add(b, c, alpha=1.5, out=a), device, reps=10, stat="min")
    del a, b, c
    results = [_matmul_tflops(device, dtype, 4096 if device.type == "cpu" else 16384)
               for dtype in (torch.float32, torch.bfloat16)]
    return Limits(copy_gbs=8 * n / (t_copy * 1e-3) / 1e9, triad_gbs=12 * n / (t_triad * 1e-3) / 1e9,
                  matmul_fp32_tflops=results[0], matmul_bf16_tflops=results[1])


# ---- what a benchmark module gets ----------------------------------------------------------------------------

class Progress:
    """A progress bar over the cases (tqdm on stderr when it is installed and stderr is a terminal), else
    one log line per case. log() prints above the bar."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True,
                                bar_format="{percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} "
                                           "[{elapsed}<{remaining}] {desc}")
            except ImportError:
                pass

    def begin(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(label)
        else:
            elapsed = time.perf_counter() - self.start
            self.log(f"[{self.done + 1}/{self.total} {int(elapsed // 60)}:{int(elapsed % 60):02d}] {label}")

    def end(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclasses.dataclass
class Context:
    """What a benchmark module runs under: the device, its measured limits and the run's options."""
    device: torch.device
    limits: Limits
    quick: bool = False
    dtypes: Optional[list[str]] = None   # --dtypes; None: each benchmark's defaults
    compile: bool = True                 # include torch.compile peers
    reps: int = 5                        # timed repetitions per measurement (fewer when over budget)
    min_time_s: float = 0.2
    budget_s: float = 2.0                # time budget of one measurement's timed repetitions
    progress: Optional[Progress] = None

    def pick_dtypes(self, defaults: list[str]) -> list[str]:
        """The dtypes to run: --dtypes when given, else the benchmark's defaults."""
        return list(self.dtypes) if self.dtypes is not None else list(defaults)

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress.log(message)
        else:
            print(message, file=sys.stderr, flush=True)


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn) with a clean slate: each case compiles its own graphs for its static shapes
    (dynamo's cache is per code object, and the cases would otherwise pile up recompilations on it)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


# ---- results -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    op: str              # "adam", "cross_entropy", "attention", ...
    case: str            # the shape/configuration, e.g. "N=4096 V=32000 bfloat16"
    impl: str            # "fusedops", "torch", "torch.compile", "liger", ...
    device: str
    ms: Optional[float]  # median time (None: not measured, the note says why)
    metric: Optional[float]   # in `unit`
    unit: str            # "GB/s", "GFLOP/s" or "TFLOP/s"
    fraction: Optional[float]  # the rate over the machine's measured limit for it
    peer_ratio: Optional[float] = None  # peer's ms / ours (fusedops rows): > 1 means fusedops is faster
    best_ratio: Optional[float] = None  # the fastest peer's ms / ours (fusedops rows)
    best_peer: str = ""
    peak_mib: Optional[float] = None    # extra memory at the peak of one call
    reps: int = 0        # timed repetitions behind the median
    note: str = ""
    params: dict = dataclasses.field(default_factory=dict)  # numbers; plots use panel, x, x_label


def bandwidth(nbytes: float, limit_gbs: float) -> Callable[[float], tuple[float, str, float]]:
    """ms → (GB/s, unit, fraction of limit_gbs) for a call that must move `nbytes`."""
    def rate(ms: float):
        gbs = nbytes / (ms * 1e-3) / 1e9
        return gbs, "GB/s", gbs / limit_gbs
    return rate


def flop_rate(flops: float, limit_tflops: float, device: torch.device) -> Callable[[float], tuple[float, str, float]]:
    """ms → (FLOP/s in TFLOP/s on a GPU, GFLOP/s on a CPU, unit, fraction of limit_tflops)."""
    def rate(ms: float):
        tflops = flops / (ms * 1e-3) / 1e12
        value, unit = (tflops, "TFLOP/s") if device.type == "cuda" else (tflops * 1e3, "GFLOP/s")
        return value, unit, tflops / limit_tflops if limit_tflops > 0 else 0.0
    return rate


@dataclasses.dataclass
class Impl:
    """One implementation of a case, to be measured beside the others: fn is the timed call; first_call:
    call fn once before the measurement (torch.compile compiles there); peak: measure the extra memory of
    the first call; rate and params: this implementation's own, where they differ from the case's (Adam's
    bytes per parameter)."""
    fn: Callable[[], object]
    impl: str
    note: str = ""
    first_call: bool = False
    peak: bool = True
    rate: Optional[Callable[[float], tuple[float, str, float]]] = None
    params: Optional[dict] = None


def measure_rows(ctx: Context, impls: list[Impl], *, op: str, case: str, params: dict,
                 rate: Callable[[float], tuple[float, str, float]], unit: str) -> list[Row]:
    """Measure the implementations of one case side by side, the suite's way, and make their rows (rate
    turns a median time into (rate, unit, fraction of the limit)).

    Each is warmed up in turn (its first call gives the peak memory; a second warm-up follows when a call is
    cheap next to the budget). Then they are timed in interleaved rounds, one timed call of each per round,
    so a change in the machine's load (other tenants of a shared host, clock changes) falls on all of them
    alike and the ratios between them hold even when the absolute times drift. A cheap call is timed right
    after an untimed one of the same implementation, as in a loop over it: otherwise the memory it freed
    may have gone back to the host while the others ran (sandboxed VMs do this within a second), and its
    next large allocation would be timed faulting it in again. Each keeps going until it has
    ctx.reps timed calls and ctx.min_time_s of them, or until it has spent ctx.budget_s: at least one, so a
    pathologically slow peer is timed once and does not eat the run. An error (a peer that does not compile
    here, out of memory) gives a row without numbers whose note says why, and the others go on."""
    device = ctx.device
    rows: list[Optional[Row]] = [None] * len(impls)
    peaks: list[Optional[float]] = [None] * len(impls)
    times: list[list[float]] = [[] for _ in impls]
    cheap = [False] * len(impls)  # whether its last call took under a quarter of the budget

    def is_cheap(seconds: float) -> bool:
        return seconds * 4 < ctx.budget_s

    def fail(i: int, e: BaseException) -> None:
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "out of memory" not in str(e):
            ctx.log(traceback.format_exc(limit=3).rstrip())
        ctx.log(f"{op} {case} {impls[i].impl}: failed: {_short_error(e)}")
        free_memory(device)
        rows[i] = skipped_row(op=op, case=case, impl=impls[i].impl, device=device.type, unit=unit,
                              params=impls[i].params or params, note=f"failed: {_short_error(e)}")

    for i, im in enumerate(impls):
        try:
            if im.first_call:
                im.fn()
                sync(device)
            t0 = time.perf_counter()
            if im.peak:
                peaks[i] = peak_memory_mib(im.fn, device)
            else:
                im.fn()
            sync(device)
            cheap[i] = is_cheap(time.perf_counter() - t0)
            if cheap[i]:
                im.fn()
                sync(device)
        except Exception as e:  # noqa: BLE001 - reported in the row, not fatal
            fail(i, e)

    spent = [0.0] * len(impls)
    active = [i for i in range(len(impls)) if rows[i] is None]
    while active:
        for i in list(active):
            try:
                if cheap[i]:
                    impls[i].fn()  # back to back with the timed call, as in a loop over it
                    sync(device)
                ms = _time_once_ms(impls[i].fn, device)
                cheap[i] = is_cheap(ms * 1e-3)
            except Exception as e:  # noqa: BLE001
                fail(i, e)
                active.remove(i)
                continue
            times[i].append(ms)
            spent[i] += ms * 1e-3
            if (len(times[i]) >= ctx.reps and spent[i] >= ctx.min_time_s) or spent[i] >= ctx.budget_s:
                active.remove(i)

    for i, im in enumerate(impls):
        if rows[i] is not None:
            continue
        ms = statistics.median(times[i])
        metric, unit_i, fraction = (im.rate or rate)(ms)
        note, reps = im.note, len(times[i])
        if reps < 3 and not ctx.quick:
            note = "; ".join(n for n in (note, f"{reps} timed run{'s' if reps > 1 else ''} (slow)") if n)
        rows[i] = Row(op=op, case=case, impl=im.impl, device=device.type, ms=ms, metric=metric, unit=unit_i,
                      fraction=fraction, peak_mib=peaks[i], reps=reps, note=note,
                      params=im.params or params)
    return rows  # type: ignore[return-value]


def skipped_row(*, op: str, case: str, impl: str, device: str, unit: str, params: dict, note: str) -> Row:
    return Row(op=op, case=case, impl=impl, device=device, ms=None, metric=None, unit=unit, fraction=None,
               note=note, params=params)


def is_ours(impl: str) -> bool:
    return impl == "fusedops" or impl.startswith("fusedops ")


def add_peer_ratios(rows: list[Row], peer: str = "torch") -> None:
    """On our rows (impl "fusedops" or "fusedops <variant>"): the ratio to `peer` and to the fastest peer
    measured for the same op, case and device."""
    measured = [r for r in rows if r.ms]
    for r in measured:
        if not is_ours(r.impl):
            continue
        peers = [p for p in measured if (p.op, p.case, p.device) == (r.op, r.case, r.device) and not is_ours(p.impl)]
        for p in peers:
            if p.impl == peer:
                r.peer_ratio = p.ms / r.ms
        if peers:
            best = min(peers, key=lambda p: p.ms)
            r.best_ratio, r.best_peer = best.ms / r.ms, best.impl


def format_flops(tflops: float) -> str:
    return f"{tflops:.3g} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.3g} GFLOP/s"


def _cells(r: Row, with_op: bool) -> list[str]:
    cells = [r.op] if with_op else []
    measured = r.ms is not None
    cells += [
        r.case, r.impl, r.device,
        f"{r.ms:.3f}" if measured else "—",
        f"{r.metric:.3g} {r.unit}" if measured else "—",
        f"{100 * r.fraction:.0f}%" if measured else "—",
        f"{r.peer_ratio:.2f}x" if r.peer_ratio is not None else "",
        f"{r.best_ratio:.2f}x ({r.best_peer})" if r.best_ratio is not None else "",
        f"{r.peak_mib:.0f}" if r.peak_mib is not None else "",
        r.note,
    ]
    return cells


HEADER = ["case", "impl", "device", "ms", "rate", "% of limit", "vs peer", "vs best peer", "peak MiB", "note"]


def format_table(rows: list[Row]) -> str:
    """A plain-text table, a blank line between ops."""
    header = ["op"] + HEADER
    lines = [header] + [_cells(r, True) for r in rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = []
    previous_op = None
    for k, row in enumerate(lines):
        if k > 1 and row[0] != previous_op:
            out.append("")
        previous_op = row[0] if k else None
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_markdown(rows: list[Row]) -> str:
    """One Markdown table (rows of one op)."""
    out = ["| " + " | ".join(HEADER) + " |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(r, False)) + " |")
    return "\n".join(out)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(path: Path, rows: list[Row], machine: dict, limits: dict, command: str, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "limits": limits, "command": command, **extra,
               "rows": [dataclasses.asdict(r) for r in rows]}
    path.write_text(json.dumps(_json_safe(payload), indent=1) + "\n")
