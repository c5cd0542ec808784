"""PNG plots of benchmark rows: one figure per op (<op>.png), one panel per configuration and device (rows
sharing params["panel"]), the rate against the swept size (params["x"], named by params["x_label"]), one
line per implementation. Ops whose rows have peak memory get a second figure of it (<op>_memory.png).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from .harness import Row, is_ours

TITLES = {
    "adam": "Adam step",
    "attention": "attention",
    "cross_entropy": "cross-entropy",
    "linear_cross_entropy": "linear cross-entropy (LM head + loss)",
}


# One colour per implementation across every panel and figure.
COLORS = {"fusedops": "tab:blue", "fusedops bf16-moments": "tab:cyan", "torch": "tab:orange",
          "torch fused": "tab:orange", "torch foreach": "tab:brown", "torch.compile": "tab:green",
          "flash-attn": "tab:red", "liger": "tab:purple", "apex": "tab:red"}


def _line_order(impl: str) -> tuple:
    return (not is_ours(impl), impl)


def _size_label(x: float) -> str:
    """32000 → 32k, 25000000 → 25M, 2048 → 2048."""
    if x >= 995_000:
        return f"{x / 1e6:.3g}M"
    if x >= 2e4:
        return f"{x / 1e3:.0f}k"
    return f"{x:g}"


def _figure(plt, op: str, rows: list[Row], value, ylabel, title: str):
    panels: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        panels[f"{r.params['panel']} ({r.device})"].append(r)
    n = len(panels)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.5 * nrows + 0.5), squeeze=False)
    for ax, (panel, panel_rows) in zip(axes.flat, panels.items()):  # in the order the cases ran
        lines: dict[str, list[Row]] = defaultdict(list)
        for r in panel_rows:
            lines[r.impl].append(r)
        for impl in sorted(lines, key=_line_order):
            pts = sorted(lines[impl], key=lambda r: r.params["x"])
            ax.plot([r.params["x"] for r in pts], [value(r) for r in pts], marker="o", color=COLORS.get(impl),
                    linewidth=2.2 if is_ours(impl) else 1.2, label=impl)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel(panel_rows[0].params.get("x_label", "size"))
        ax.set_ylabel(ylabel(panel_rows[0]))
        xs = sorted({r.params["x"] for r in panel_rows})
        if len(xs) > 2 and xs[-1] / xs[0] >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [_size_label(x) for x in xs])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_rows(rows: list[Row], out_dir: Path) -> list[Path]:
    """Write the figures into out_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    by_op: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        if r.metric is not None and "panel" in r.params and "x" in r.params:
            by_op[r.op].append(r)
    for op, op_rows in by_op.items():
        name = TITLES.get(op, op)
        fig = _figure(plt, op, op_rows, lambda r: r.metric, lambda r: r.unit, f"{name}: throughput (higher is better)")
        path = out_dir / f"{op}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
        mem_rows = [r for r in op_rows if r.peak_mib is not None and op in ("cross_entropy", "linear_cross_entropy")]
        if mem_rows:
            fig = _figure(plt, op, mem_rows, lambda r: r.peak_mib, lambda r: "peak MiB",
                          f"{name}: extra peak memory of one call (lower is better)")
            path = out_dir / f"{op}_memory.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written
