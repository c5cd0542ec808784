"""The benchmark suite (bench/): the harness's measurement rules, and one tiny end-to-end run of every
benchmark module, so `make bench` cannot rot between the runs that produce bench/results/."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402


def _context(**kw) -> harness.Context:
    limits = harness.Limits(copy_gbs=10.0, triad_gbs=10.0, matmul_fp32_tflops=0.1, matmul_bf16_tflops=0.1)
    return harness.Context(device=torch.device("cpu"), limits=limits, **kw)


def _rate(ms: float):
    return 1.0 / ms, "GB/s", 0.5


def test_measure_rows_interleaves_the_implementations():
    calls: list[str] = []
    impls = [harness.Impl(lambda name=name: calls.append(name), name, peak=False) for name in ("a", "b", "c")]
    ctx = _context(reps=4, min_time_s=0.0, budget_s=10.0)
    rows = harness.measure_rows(ctx, impls, op="t", case="c", params={}, rate=_rate, unit="GB/s")
    assert [r.impl for r in rows] == ["a", "b", "c"]
    assert all(r.reps == 4 and r.ms is not None and r.ms >= 0 for r in rows)
    # Warm-ups one after another (two each: the calls are cheap), then rounds with one timed call of each,
    # each right after an untimed one of its own.
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]
    assert calls[6:] == ["a", "a", "b", "b", "c", "c"] * 4


def test_measure_rows_budget_failures_and_own_rates():
    slow_calls = 0

    def slow():
        nonlocal slow_calls
        slow_calls += 1
        time.sleep(0.03)

    def broken():
        raise RuntimeError("does not compile here")

    impls = [harness.Impl(slow, "slow", peak=False),
             harness.Impl(broken, "broken", note="peer"),
             harness.Impl(lambda: None, "fast", peak=False, rate=lambda ms: (2.0, "GB/s", 0.25),
                          params={"own": 1})]
    ctx = _context(reps=5, min_time_s=0.0, budget_s=0.05)
    slow_row, broken_row, fast_row = harness.measure_rows(ctx, impls, op="t", case="c", params={"case": 1},
                                                          rate=_rate, unit="GB/s")
    # Stopped by its budget, after at least one timed call (and none untimed: it is not cheap).
    assert 1 <= slow_row.reps < 5 and slow_row.ms >= 30 and slow_calls == 1 + slow_row.reps
    assert broken_row.ms is None and "RuntimeError: does not compile here" in broken_row.note
    assert fast_row.reps == 5 and fast_row.metric == 2.0 and fast_row.fraction == 0.25
    assert fast_row.params == {"own": 1} and slow_row.params == {"case": 1}


def test_peer_ratios():
    rows = [harness.Row(op="t", case="c", impl="fusedops", device="cpu", ms=2.0, metric=1, unit="GB/s", fraction=1),
            harness.Row(op="t", case="c", impl="torch", device="cpu", ms=3.0, metric=1, unit="GB/s", fraction=1),
            harness.Row(op="t", case="c", impl="torch.compile", device="cpu", ms=2.5, metric=1, unit="GB/s",
                        fraction=1)]
    harness.add_peer_ratios(rows)
    assert rows[0].peer_ratio == pytest.approx(1.5)
    assert rows[0].best_ratio == pytest.approx(1.25) and rows[0].best_peer == "torch.compile"


def test_bench_runs_end_to_end(tmp_path):
    """Every benchmark module at tiny sizes: the suite runs and writes results whose ratios are numbers."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(ROOT),
                                                         os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "bench", "--quick", "--no-compile", "--threads", "1", "--reps", "1",
           "--budget", "0.05", "--out", str(tmp_path),
           "--shape", "adam.params=20k", "--shape", "adam.tensors=7",
           "--shape", "attention.S=40", "--shape", "attention.tokens=80", "--shape", "attention.model_dim=64",
           "--shape", "attention.D=32",
           "--shape", "cross_entropy.N=9", "--shape", "cross_entropy.V=1000",
           "--shape", "linear_cross_entropy.N=9", "--shape", "linear_cross_entropy.H=16",
           "--shape", "linear_cross_entropy.V=300"]
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, timeout=600, capture_output=True)
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    for op in ("adam", "attention", "cross_entropy", "linear_cross_entropy"):
        ours = [r for r in rows if r["op"] == op and r["impl"] == "fusedops"]
        assert ours, op
        assert all(r["ms"] is not None and r["ms"] > 0 and r["peer_ratio"] is not None for r in ours), op
    assert (tmp_path / "results.md").read_text().count("| fusedops |") >= 4
