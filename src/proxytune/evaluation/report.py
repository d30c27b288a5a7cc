"""Reports of an evaluation: summary files, the alpha-sweep table and one PNG per metric.

Written into the run's folder: ``summary.json`` (everything), ``summary.md`` (the table),
``summary.csv``; with two or more proxy alphas also ``sweep.csv`` and ``sweep_<metric>.png``
(score against alpha, the base, expert and tuned scores as reference lines). Plots use
matplotlib's Agg canvas directly, so the user's pyplot backend is never touched.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path
from typing import Any

from ..extras import require
from .runner import EvalReport

REFERENCE_STYLE = {
    "base": ("tab:gray", "--"),
    "expert": ("tab:orange", ":"),
    "tuned": ("tab:green", "-."),
}


def write_report(report: EvalReport) -> list[Path]:
    """Write every summary file of ``report`` into its ``out_dir``; returns their paths."""
    out = Path(report.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "summary.json", out / "summary.md", out / "summary.csv"]
    written[0].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    written[1].write_text(f"# {report.task} ({report.split})\n\n{report.table()}\n")
    metrics = report.metric_names
    with open(written[2], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", "role", "alpha", "examples", *metrics])
        for s in report.systems:
            w.writerow([s.name, s.role, s.alpha, s.examples, *(s.metrics.get(m) for m in metrics)])
    if len(sweep_points(report)) >= 2:
        written.append(write_sweep_csv(report, out / "sweep.csv"))
        try:
            written += plot_sweep(report, out)
        except ImportError as err:  # matplotlib is optional: tables only
            warnings.warn(f"no sweep plots: {err}", stacklevel=2)
    return written


def sweep_points(report: EvalReport) -> list[Any]:
    """The proxy systems with a numeric alpha, by alpha."""
    points = [s for s in report.systems if s.role == "proxy" and s.alpha is not None]
    return sorted(points, key=lambda s: s.alpha)


def write_sweep_csv(report: EvalReport, path: Path) -> Path:
    metrics = report.metric_names
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["alpha", *metrics])
        for s in sweep_points(report):
            w.writerow([s.alpha, *(s.metrics.get(m) for m in metrics)])
    return path


def plot_sweep(report: EvalReport, out: Path) -> list[Path]:
    """One PNG per metric: the proxy score against alpha, with reference lines."""
    require("matplotlib", "plots", "the sweep plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = sweep_points(report)
    paths = []
    for metric in report.metric_names:
        xs = [s.alpha for s in points if s.metrics.get(metric) is not None]
        ys = [s.metrics[metric] for s in points if s.metrics.get(metric) is not None]
        if len(xs) < 2:
            continue
        fig = Figure(figsize=(5.5, 3.6), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(xs, ys, marker="o", color="tab:blue", label="proxy-tuned")
        for s in report.systems:
            value = s.metrics.get(metric)
            if s.role in REFERENCE_STYLE and value is not None:
                color, style = REFERENCE_STYLE[s.role]
                ax.axhline(value, color=color, linestyle=style, label=s.name)
        ax.set_xlabel("alpha")
        ax.set_ylabel(metric)
        ax.set_title(f"{report.task}: {metric} vs alpha")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / ("sweep_" + re.sub(r"[^\w@.-]", "_", metric) + ".png")
        fig.savefig(path)
        paths.append(path)
    return paths
