"""The benchmark suite: `python -m bench` (what `make bench` runs).

Runs every op's benchmark (bench/bench_<op>.py) on each device present (the CPU always, CUDA when
available), each case side by side with the peers in the same process: torch eager, torch.compile where it
compiles, and FlashAttention, Liger-Kernel and Apex on CUDA when they are installed. First it measures the
machine's limits (copy and triad bandwidth, fp32/bf16 matmul FLOP/s), which each rate is compared with.

Writes bench/results/<machine>/: results.json (every number, the machine and the limits), results.md
(a Markdown summary with the tables and plots, ready to include in the README) and <op>.png plots; prints
the table. The defaults finish in a few minutes on 2 CPU cores; --quick in about a minute.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
import shlex
import sys
import time
from pathlib import Path

import torch

from . import harness, plots

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent


def benchmark_modules() -> dict[str, object]:
    mods = {}
    for info in sorted(pkgutil.iter_modules([str(ROOT)]), key=lambda i: i.name):
        if info.name.startswith("bench_"):
            mods[info.name[len("bench_"):]] = importlib.import_module(f"bench.{info.name}")
    return mods


def parse_size(text: str) -> int:
    """'4096', '32k' (32000), '25M', '1e6' → int."""
    text = text.strip()
    scale = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    if scale != 1:
        text = text[:-1]
    return int(float(text) * scale)


def shapes_help(modules: dict) -> str:
    lines = ["default shapes (--shape OP.NAME=V1,V2,... overrides one):"]
    for op, mod in modules.items():
        for device in ("cpu", "cuda"):
            full = ", ".join(f"{k}={','.join(map(str, v))}" for k, v in mod.shapes(False, device).items())
            quick = ", ".join(f"{k}={','.join(map(str, v))}" for k, v in mod.shapes(True, device).items())
            lines.append(f"  {op} ({device}): {full}")
            lines.append(f"  {' ' * len(op)}  --quick: {quick}")
    lines.append("  (attention: B = tokens/S sequences of H = model_dim/D heads)")
    return "\n".join(lines)


def build_parser(modules: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=shapes_help(modules) + "\n\nexamples:\n"
        "  python -m bench --quick\n"
        "  python -m bench --ops attention --dtypes bfloat16 --shape attention.S=1024,4096\n"
        "  python -m bench --ops cross_entropy,adam --devices cuda --no-compile")
    parser.add_argument("--ops", default=",".join(modules),
                        help=f"comma-separated benchmarks to run (default: all: {','.join(modules)})")
    parser.add_argument("--devices", "--device", default="auto",
                        help="comma-separated devices: cpu, cuda, or auto (default: the CPU and CUDA when present)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated dtypes instead of each benchmark's defaults: float32, bfloat16, "
                             "float16 (or fp32, bf16, fp16)")
    parser.add_argument("--shape", action="append", default=[], metavar="OP.NAME=V1,V2",
                        help="override a swept size, e.g. attention.S=1024,4096 or adam.params=25M (k = 1e3, "
                             "M = 1e6); repeatable; defaults below")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes, few repetitions: checks that everything runs (about a minute)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="leave out the torch.compile peers (they compile every case's shapes)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per measurement (default 5; --quick 3); fewer when over budget")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="time budget of one measurement's timed repetitions (default 2 on a CPU, 1 on CUDA; "
                             "--quick 0.5): a slower call is timed once after its warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the CPU runs")
    parser.add_argument("--out", default=None, help="results folder (default bench/results/<machine>)")
    parser.add_argument("--list", action="store_true", help="print the cases that would run, and exit")
    return parser


def resolve_shapes(modules: dict, ops: list[str], device: str, quick: bool, overrides: list[str],
                   parser: argparse.ArgumentParser) -> dict[str, dict]:
    shapes = {op: modules[op].shapes(quick, device) for op in ops}
    for item in overrides:
        key, _, values = item.partition("=")
        op, _, name = key.partition(".")
        if op not in modules or name not in modules[op].shapes(quick, device) or not values:
            parser.error(f"--shape {item}: expected OP.NAME=V1,V2 with one of: "
                         + ", ".join(f"{o}.{n}" for o in modules for n in modules[o].shapes(quick, device)))
        if op in shapes:
            try:
                shapes[op][name] = [parse_size(v) for v in values.split(",")]
            except ValueError:
                parser.error(f"--shape {item}: sizes must be integers (k and M suffixes allowed)")
    return shapes


def image_link(path: Path, out_dir: Path) -> str:
    """A link that works from results.md and, unchanged, from the README: relative to the repository root
    (GitHub resolves a leading '/' there) when the results are inside the repository."""
    try:
        return "/" + path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return path.relative_to(out_dir).as_posix()


def markdown_summary(rows, machine, limits, command, elapsed_s, modules, pngs, out_dir) -> str:
    cpu = f"{machine['cpu']} ({machine['cores']} cores, {machine['threads']} torch threads"
    cpu += f"; {' '.join(machine['cpu_flags'])})" if machine["cpu_flags"] else ")"
    fused = machine.get("fusedops")
    isa = f", fusedops CPU kernels `{fused['cpu_isa']}`" if isinstance(fused, dict) else ""
    gpu = ""
    if "gpu" in machine:
        gpu = f", {machine['gpu']} (CUDA {machine['cuda']}, driver {machine.get('driver', '?')})"
    peers = ", ".join(f"{k} {v}" for k, v in machine["peers"].items() if not v.startswith("not available"))
    out = [
        f"### {machine.get('gpu') or machine['cpu']} ({', '.join(limits)})",
        "",
        f"Measured {machine['date'][:10]} on {cpu}{gpu}; torch {machine['torch']}{isa}"
        f"{'; peers installed: ' + peers if peers else ''}. "
        f"Command: `{command}` ({elapsed_s / 60:.1f} min). Limits measured at the start of the run:",
        "",
    ]
    out += [f"- {dev}: {harness.Limits(**lim).describe()}" for dev, lim in limits.items()]
    out += [
        "",
        "*vs peer*: the peer's time over ours (above 1: fusedops is faster) — torch eager, or "
        "`torch.optim.Adam(fused=True)` for Adam; *vs best peer*: the same against the fastest peer of the "
        "case. *% of limit*: the rate over the machine's measured limit (copy bandwidth for cross-entropy, triad "
        "for Adam, matmul FLOP/s for attention and linear cross-entropy). *peak MiB*: extra memory at the peak "
        "of one call. Times are medians of warmed-up runs; the implementations of a case are timed in "
        "interleaved rounds.",
    ]
    for op, mod in modules.items():
        op_rows = [r for r in rows if r.op == op]
        if not op_rows:
            continue
        # The module's docstring says what is measured and how: its paragraphs, unwrapped.
        about = "\n\n".join(" ".join(p.split()) for p in (mod.__doc__ or op).strip().split("\n\n"))
        out += ["", f"#### {op}", "", about, ""]
        for png in pngs:
            if png.stem in (op, f"{op}_memory"):
                out += [f"![{png.stem}]({image_link(png, out_dir)})", ""]
        out.append(harness.format_markdown(op_rows))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    modules = benchmark_modules()
    parser = build_parser(modules)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    if args.threads:
        torch.set_num_threads(args.threads)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in modules]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; available: {', '.join(modules)}")
    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        for d in devices:
            if d not in ("cpu", "cuda"):
                parser.error(f"unknown device {d!r}: cpu or cuda")
            if d == "cuda" and not torch.cuda.is_available():
                parser.error("--devices cuda: torch sees no CUDA device here")
    dtypes = None
    if args.dtypes:
        dtypes = [harness.DTYPE_ALIASES.get(d.strip(), d.strip()) for d in args.dtypes.split(",") if d.strip()]
        bad = [d for d in dtypes if d not in harness.DTYPES]
        if bad:
            parser.error(f"unknown dtype(s) {bad}: {', '.join(harness.DTYPES)}")

    # The plan: every (device, op, case), so that the progress bar knows the total.
    contexts, plan = {}, []
    for dev in devices:
        budget = args.budget if args.budget is not None else (0.5 if args.quick else 2.0 if dev == "cpu" else 1.0)
        contexts[dev] = harness.Context(device=torch.device(dev), limits=None, quick=args.quick, dtypes=dtypes,
                                        compile=args.compile, reps=args.reps or (3 if args.quick else 5),
                                        min_time_s=0.05 if args.quick else 0.2, budget_s=budget)
        shapes = resolve_shapes(modules, ops, dev, args.quick, args.shape, parser)
        for op in ops:
            plan += [(dev, op, case) for case in modules[op].cases(contexts[dev], shapes[op])]
    if args.list:
        for dev, op, case in plan:
            print(f"{dev:5s} {op:22s} {case.label}")
        print(f"{len(plan)} cases")
        return 0

    limits = {}
    for dev in devices:
        print(f"measuring the limits of {dev} ...", file=sys.stderr, flush=True)
        contexts[dev].limits = harness.measure_limits(dev, quick=args.quick)
        limits[dev] = dataclasses.asdict(contexts[dev].limits)
        print(f"{dev}: {contexts[dev].limits.describe()}", file=sys.stderr, flush=True)
    machine = harness.machine_description(devices)

    rows: list[harness.Row] = []
    progress = harness.Progress(len(plan))
    try:
        for dev, op, case in plan:
            ctx = contexts[dev]
            ctx.progress = progress
            progress.begin(f"{op} {case.label} ({dev})")
            try:
                case_rows = modules[op].run_case(ctx, case)
            except Exception as e:  # noqa: BLE001 - one broken case must not lose the rest of the run
                ctx.log(f"{op} {case.label} ({dev}): failed: {type(e).__name__}: {e}")
                case_rows = []
            harness.add_peer_ratios(case_rows, peer=getattr(modules[op], "PEER", "torch"))
            for r in case_rows:
                if r.ms is not None:
                    ctx.log(f"  {r.op} {r.case} {r.impl}: {r.ms:.3f} ms, {r.metric:.3g} {r.unit}"
                            + (f", {r.best_ratio:.2f}x vs {r.best_peer}" if r.best_ratio is not None else ""))
            rows += case_rows
            progress.end()
    except KeyboardInterrupt:
        progress.log("interrupted: writing the rows measured so far")
    finally:
        progress.close()

    elapsed = time.perf_counter() - started
    print(harness.format_table(rows))
    out_dir = Path(args.out) if args.out else ROOT / "results" / harness.machine_tag(machine)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m bench"] + [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])
    harness.write_results(out_dir / "results.json", rows, machine, limits, command, elapsed_s=round(elapsed, 1),
                          options={k: v for k, v in vars(args).items() if k != "list"})
    pngs = []
    try:
        pngs = plots.plot_rows(rows, out_dir)
    except ImportError as e:
        print(f"no plots: {e} (pip install matplotlib)", file=sys.stderr)
    (out_dir / "results.md").write_text(markdown_summary(rows, machine, limits, command, elapsed,
                                                         {op: modules[op] for op in ops}, pngs, out_dir))
    print(f"\n{len(rows)} rows in {elapsed / 60:.1f} min; results in {out_dir}: results.json, results.md"
          + "".join(f", {p.name}" for p in pngs), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
