"""Verify an install: `python -m fusedops.check`.

Runs parity checks (forward and gradients against the float64 references in fusedops.reference) and
torch.autograd.gradcheck (float64, CPU kernels) for every op on every backend available here (cpu,
cuda-emulated, and cuda when a GPU is present), and prints a compact table with the largest errors.
Exits with status 1 if any check fails. Small shapes: it takes seconds, not minutes.

    python -m fusedops.check [--ops attention,cross_entropy,adam] [--backends cpu,cuda] [--seed 0]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from typing import Callable, Iterable

import torch

import fusedops


@dataclasses.dataclass
class Result:
    op: str
    check: str
    backend: str
    dtype: str
    max_abs_err: float
    tolerance: float
    passed: bool
    seconds: float = 0.0
    note: str = ""


@dataclasses.dataclass
class Check:
    op: str
    name: str
    fn: Callable[[str, torch.device], Iterable[Result]]
    backends: tuple[str, ...]


CHECKS: list[Check] = []


def register(op: str, name: str, backends: tuple[str, ...] = ("cpu", "cuda-emulated", "cuda")):
    """Adds fn(backend, device) -> Results to the checks of `op`."""

    def wrap(fn):
        CHECKS.append(Check(op, name, fn, backends))
        return fn

    return wrap


def compare(op: str, check: str, backend: str, got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
            note: str = "") -> Result:
    """One Result: the largest |got - expected| against atol + rtol·|expected|, NaN/inf positions included."""
    got64, exp64 = got.detach().double().cpu(), expected.detach().double().cpu()
    same_nonfinite = bool(torch.equal(torch.isnan(got64), torch.isnan(exp64))) and bool(
        torch.equal(torch.isinf(got64), torch.isinf(exp64)))
    finite = torch.isfinite(exp64) & torch.isfinite(got64)
    diff = (got64 - exp64).abs()[finite]
    bound = (atol + rtol * exp64.abs())[finite]
    max_err = float(diff.max()) if diff.numel() else 0.0
    ok = same_nonfinite and bool((diff <= bound).all())
    return Result(op, check, backend, str(got.dtype).replace("torch.", ""), max_err, atol, ok,
                  note=note if same_nonfinite else (note + " NaN/inf mismatch").strip())


def run_checks(ops: list[str] | None, backends: list[str] | None, seed: int) -> list[Result]:
    available = fusedops.available_backends()
    chosen = [b for b in (backends or available) if b in available]
    for b in backends or ():
        if b not in available:
            print(f"backend {b!r} is not available here (available: {', '.join(available)}): skipped",
                  file=sys.stderr)
    results = []
    for check in CHECKS:
        if ops and check.op not in ops:
            continue
        for backend in chosen:
            if backend not in check.backends:
                continue
            device = torch.device("cuda" if backend == "cuda" else "cpu")
            torch.manual_seed(seed)
            start = time.perf_counter()
            try:
                with fusedops.backend(backend):
                    new = list(check.fn(backend, device))
            except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported, not raised
                new = [Result(check.op, check.name, backend, "-", float("nan"), 0.0, False,
                              note=f"{type(e).__name__}: {e}".splitlines()[0][:120])]
                if "--verbose" in sys.argv:
                    traceback.print_exc()
            elapsed = time.perf_counter() - start
            for r in new:
                r.seconds = elapsed / max(len(new), 1)
            results.extend(new)
    return results


def format_results(results: list[Result]) -> str:
    header = ("op", "check", "backend", "dtype", "max error", "tolerance", "result", "note")
    rows = [header] + [(r.op, r.check, r.backend, r.dtype, f"{r.max_abs_err:.2e}", f"{r.tolerance:.1e}",
                        "PASS" if r.passed else "FAIL", r.note) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _load_op_checks() -> None:
    """Each op module registers its checks in fusedops/_checks.py."""
    from . import _checks  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedops.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=None, help="comma-separated ops (default: all)")
    parser.add_argument("--backends", default=None, help="comma-separated backends (default: all available here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of checks that raise")
    args = parser.parse_args(argv)
    _load_op_checks()
    info = fusedops.build_info()
    print(f"fusedops {info['fusedops_version']} on torch {info['torch_version']}; backends {info['backends']}; "
          f"CPU kernels {info['cpu_isa']}; CUDA {'built for sm_' + ',sm_'.join(info['cuda_archs']) if info['cuda_built'] else 'not built'}")
    results = run_checks(args.ops.split(",") if args.ops else None,
                         args.backends.split(",") if args.backends else None, args.seed)
    print(format_results(results))
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    # Run as `python -m fusedops.check` this file is __main__, a second copy of the module: the checks register
    # themselves (fusedops/_checks.py) in fusedops.check's CHECKS, so that module's main() must run them.
    from fusedops.check import main as _main

    raise SystemExit(_main())
