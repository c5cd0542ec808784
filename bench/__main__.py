"""The benchmark suite: `python -m bench` (or `make bench`).

Runs every op's benchmark (bench/bench_<op>.py) on each device present, side by side with the peers
in the same process, measures the machine's limits first, prints a table and writes
bench/results/<machine>/results.json (plus results.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
import shlex
import sys
from pathlib import Path

import torch

from . import harness, plots

ROOT = Path(__file__).resolve().parent


@dataclasses.dataclass
class Context:
    device: torch.device
    limits: harness.Limits
    quick: bool
    dtypes: list[str] | None   # None: each benchmark's defaults
    args: argparse.Namespace

    def want_dtype(self, name: str) -> bool:
        return self.dtypes is None or name in self.dtypes

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


def benchmark_modules() -> dict[str, object]:
    mods = {}
    for info in pkgutil.iter_modules([str(ROOT)]):
        if info.name.startswith("bench_"):
            mods[info.name[len("bench_"):]] = importlib.import_module(f"bench.{info.name}")
    return mods


def main(argv: list[str] | None = None) -> int:
    modules = benchmark_modules()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(sorted(modules)),
                        help=f"comma-separated ops to run (default: all of {', '.join(sorted(modules))})")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (every device present)")
    parser.add_argument("--dtypes", default=None, help="comma-separated dtypes to keep (e.g. float32,bfloat16)")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repetitions")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    parser.add_argument("--out", default=None, help="results folder (default bench/results/<machine>)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in modules]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; available: {sorted(modules)}")
    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [d.strip() for d in args.device.split(",")]
    dtypes = [d.strip() for d in args.dtypes.split(",")] if args.dtypes else None

    all_rows: list[harness.Row] = []
    limits_by_device = {}
    machine = harness.machine_description("cuda" if "cuda" in devices else "cpu")
    for dev in devices:
        device = torch.device(dev)
        print(f"measuring the limits of {dev} ...", file=sys.stderr, flush=True)
        limits = harness.measure_limits(device, quick=args.quick)
        limits_by_device[dev] = dataclasses.asdict(limits)
        print(f"{dev}: copy {limits.copy_gbs:.1f} GB/s, triad {limits.triad_gbs:.1f} GB/s, "
              f"matmul fp32 {limits.matmul_fp32_tflops * 1e3:.0f} GFLOP/s, bf16 {limits.matmul_bf16_tflops * 1e3:.0f} GFLOP/s",
              file=sys.stderr, flush=True)
        ctx = Context(device=device, limits=limits, quick=args.quick, dtypes=dtypes, args=args)
        for op in ops:
            rows = modules[op].run(ctx)
            harness.add_peer_ratios(rows)
            all_rows.extend(rows)

    print(harness.format_table(all_rows))
    out_dir = Path(args.out) if args.out else ROOT / "results" / harness.machine_tag(machine)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    harness.write_results(out_dir / "results.json", all_rows, machine, limits_by_device, command)
    (out_dir / "results.md").write_text(
        f"Measured {machine['date']} on {machine.get('gpu') or machine['cpu']} ({machine['threads']} threads), "
        f"torch {machine['torch']}, with `{command.strip()}`.\n\n"
        + "\n".join(f"- {d}: copy {l['copy_gbs']:.1f} GB/s, triad {l['triad_gbs']:.1f} GB/s, matmul fp32 "
                    f"{l['matmul_fp32_tflops'] * 1e3:.0f} GFLOP/s, bf16 {l['matmul_bf16_tflops'] * 1e3:.0f} GFLOP/s"
                    for d, l in limits_by_device.items())
        + "\n\n" + harness.format_markdown(all_rows) + "\n")
    for path in plots.plot_rows(all_rows, out_dir):
        print(f"plot: {path}", file=sys.stderr)
    print(f"\nresults written to {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
