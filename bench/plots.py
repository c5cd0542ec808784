"""PNG plots of benchmark rows: one figure per op, one panel per configuration (rows sharing
params["panel"]), the rate against the swept size (params["x"], named by params["x_label"]), one line
per implementation."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from .harness import Row


def plot_rows(rows: list[Row], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_op: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        if "panel" in r.params and "x" in r.params:
            by_op[r.op].append(r)
    for op, op_rows in by_op.items():
        panels: dict[str, list[Row]] = defaultdict(list)
        for r in op_rows:
            panels[f"{r.params['panel']} ({r.device})"].append(r)
        n = len(panels)
        cols = min(3, n)
        nrows = math.ceil(n / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
        for ax, (title, panel_rows) in zip(axes.flat, sorted(panels.items())):
            lines: dict[str, list[Row]] = defaultdict(list)
            for r in panel_rows:
                lines[r.impl].append(r)
            for impl, impl_rows in sorted(lines.items(), key=lambda kv: kv[0] != "fusedops"):
                impl_rows.sort(key=lambda r: r.params["x"])
                ax.plot([r.params["x"] for r in impl_rows], [r.metric for r in impl_rows], marker="o",
                        linewidth=2 if impl == "fusedops" else 1.2, label=impl)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(panel_rows[0].params.get("x_label", "size"))
            ax.set_ylabel(panel_rows[0].unit)
            if len({r.params["x"] for r in panel_rows}) > 2:
                ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
        path = out_dir / f"{op}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
