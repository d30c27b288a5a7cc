"""The reproduction's tables (Markdown, CSV, JSON) and the alpha-sweep plot, from the stored
per-example results and stage stamps."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..evaluation.runner import _safe
from ..evaluation.stats import Estimate, aligned, gap_interval, mean_interval
from ..evaluation.store import ResultStore
from ..extras import MissingExtraError, require
from .analysis import CLASSES, token_classes
from .tasks import task_kind

if TYPE_CHECKING:
    from .pipeline import Experiment

REFERENCES = ("base", "expert", "tuned")


def per_example(out: Path, task: str, split: str, system: str, metric: str) -> dict[str, Any]:
    """``{example id: score}`` of one system's stored results."""
    rows = ResultStore(out / "eval" / task / split / f"{_safe(system)}.jsonl").load()
    return {i: r.get("scores", {}).get(metric) for i, r in rows.items()}


def task_results(exp: Experiment, task: str) -> dict[str, Any]:
    """Every system's score per metric with intervals, and gap closed per rule."""
    kind = task_kind(task)
    chosen = exp.chosen_alphas()[task]
    systems = [*REFERENCES, *exp.config.rules]
    ids = sorted(ResultStore(exp.out / "eval" / task / "test" / "base.jsonl").load())
    out: dict[str, Any] = {"n": len(ids), "primary": kind.primary, "metrics": {}}
    for metric in kind.metrics:
        scores = aligned({s: per_example(exp.out, task, "test", s, metric) for s in systems}, ids)
        rows: dict[str, Any] = {}
        for s in systems:
            est = mean_interval(scores[s])
            row: dict[str, Any] = {"estimate": est, "alpha": chosen.get(s)}
            if s in exp.config.rules:
                gap, undefined = gap_interval(scores[s], scores["base"], scores["tuned"])
                row.update(gap=gap, gap_undefined_resamples=undefined)
            rows[s] = row
        out["metrics"][metric] = rows
    return out


def outputs(out: Path, task: str, system: str) -> dict[str, str]:
    """``{example id: first output, stripped}`` of one system's stored test results."""
    rows = ResultStore(out / "eval" / task / "test" / f"{_safe(system)}.jsonl").load()
    return {i: (r.get("outputs") or [""])[0].strip() for i, r in rows.items()}


def follow(exp: Experiment, task: str) -> dict[str, Any]:
    """Whose answers the proxy gives: how often its output equals the expert's and the
    tuned model's, and its accuracy where the expert was right or wrong (primary metric).
    A proxy that merely copies the small expert is right only where the expert is."""
    metric = task_kind(task).primary
    proxy, expert = outputs(exp.out, task, "proxy"), outputs(exp.out, task, "expert")
    tuned = outputs(exp.out, task, "tuned")
    p_score = per_example(exp.out, task, "test", "proxy", metric)
    e_score = per_example(exp.out, task, "test", "expert", metric)
    ids = sorted(proxy)
    if not ids:
        return {}

    def share(items: list[str], test: Any) -> float | None:
        return sum(1 for i in items if test(i)) / len(items) if items else None

    expert_right = [i for i in ids if (e_score.get(i) or 0) > 0]
    expert_wrong = [i for i in ids if not (e_score.get(i) or 0) > 0]
    return {
        "metric": metric,
        "same_as_expert": share(ids, lambda i: proxy[i] == expert.get(i)),
        "same_as_tuned": share(ids, lambda i: proxy[i] == tuned.get(i)),
        "expert_right": len(expert_right),
        "proxy_right_where_expert_right": share(expert_right, lambda i: (p_score.get(i) or 0) > 0),
        "expert_wrong": len(expert_wrong),
        "proxy_right_where_expert_wrong": share(expert_wrong, lambda i: (p_score.get(i) or 0) > 0),
    }


def write_results(exp: Experiment) -> dict[str, Any]:
    """Write ``results.md``, ``results.csv``, ``results.json`` and ``alpha_sweep.png``."""
    tasks = {t: task_results(exp, t) for t in exp.config.tasks}
    stages = {}
    for stage in ("data", "expert", "tuned", "validation", "test", "analysis"):
        stamp = exp.done(stage)
        if stamp is not None:
            stages[stage] = {"seconds": stamp["seconds"], **stamp.get("result", {})}
    following = {t: follow(exp, t) for t in exp.config.tasks}
    data = {
        "config": exp.config.to_dict(),
        "stages": stages,
        "tasks": _plain(tasks),
        "follow": following,
        "token_classes": token_classes_of(exp),
    }
    (exp.out / "results.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    _write_csv(exp.out / "results.csv", tasks)
    plot = _plot_sweep(exp, stages.get("validation", {}).get("sweep", {}))
    text = markdown(exp, tasks, stages, plot, following, data["token_classes"])
    (exp.out / "results.md").write_text(text, encoding="utf-8")
    return data


def markdown(
    exp: Experiment,
    tasks: dict[str, Any],
    stages: dict[str, Any],
    plot: Any,
    following: dict[str, Any],
    classes: dict[str, Any],
) -> str:
    cfg = exp.config
    lines = [
        "# Proxy-tuning reproduction",
        "",
        f"Small model (expert = LoRA of it, anti-expert = it untuned): `{cfg.small}`; base and "
        f"directly tuned reference (LoRA, same data and recipe): `{cfg.big}`. Scores in %, "
        "95% bootstrap intervals in brackets; gap closed = (proxy - base) / (tuned - base), "
        "its interval from the same resampled examples for every system (`[unstable]`: in "
        "over 2.5% of resamples the tuned model did not beat the base, so the ratio has no "
        "stable interval).",
        "",
        "## Main result",
        "",
        "| task | metric | n | base | expert | proxy (alpha) | tuned | gap closed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, res in tasks.items():
        for metric, rows in res["metrics"].items():
            proxy = rows["proxy"]
            lines.append(
                f"| {task} | {metric} | {res['n']} | {rows['base']['estimate'].percent()} | "
                f"{rows['expert']['estimate'].percent()} | "
                f"{proxy['estimate'].percent()} ({proxy['alpha']:g}) | "
                f"{rows['tuned']['estimate'].percent()} | {proxy['gap'].percent()} |"
            )
    lines += [
        "",
        "## Steering rules compared (each at its alpha chosen on validation)",
        "",
        "| task | metric | " + " | ".join(cfg.rules) + " |",
        "|---|---|" + "---|" * len(cfg.rules),
    ]
    for task, res in tasks.items():
        for metric, rows in res["metrics"].items():
            cells = [
                f"{rows[r]['estimate'].percent()} (a={rows[r]['alpha']:g}; gap "
                f"{rows[r]['gap'].percent()})"
                for r in cfg.rules
            ]
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    sweep = stages.get("validation", {}).get("sweep", {})
    if sweep:
        lines += ["", "## Validation sweep (primary metric, %)", ""]
        alphas = [f"{a:g}" for a in cfg.alphas]
        lines += [
            "| task | rule | " + " | ".join(alphas) + " |",
            "|---|---|" + "---|" * len(alphas),
        ]
        for task, rules in sweep.items():
            for rule, points in rules.items():
                cells = ["-" if points.get(a) is None else f"{100 * points[a]:.1f}" for a in alphas]
                lines.append(f"| {task} | {rule} | " + " | ".join(cells) + " |")
    if any(following.values()):
        lines += [
            "",
            "## Whose answers the proxy gives (test, primary metric)",
            "",
            "| task | proxy output = expert's | = tuned's | proxy right where expert right "
            "| proxy right where expert wrong |",
            "|---|---|---|---|---|",
        ]
        for task, f in following.items():
            if f:
                lines.append(
                    f"| {task} | {_pct(f['same_as_expert'])} | {_pct(f['same_as_tuned'])} | "
                    f"{_pct(f['proxy_right_where_expert_right'])} (n={f['expert_right']}) | "
                    f"{_pct(f['proxy_right_where_expert_wrong'])} (n={f['expert_wrong']}) |"
                )
    if classes:
        lines += [
            "",
            "## What steering changed (proxy, test prompts)",
            "",
            "| task | tokens | changed top choice | changed: number / word / format / end | "
            "all tokens: number / word / format / end | "
            "mean abs shift (nats): number / word / format / end |",
            "|---|---|---|---|---|---|",
        ]
        for task, c in classes.items():
            ch, al, sh = c["changed_by_class"], c["tokens_by_class"], c["mean_abs_shift_by_class"]
            shifts = " / ".join("-" if sh[k] is None else f"{sh[k]:.3f}" for k in sh)
            lines.append(
                f"| {task} | {c['tokens']} | {c['changed']} | "
                + " / ".join(str(ch[k]) for k in CLASSES)
                + " | "
                + " / ".join(str(al[k]) for k in CLASSES)
                + f" | {shifts} |"
            )
    lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s} | {v['seconds']:.0f} |" for s, v in stages.items()]
    if plot is not None:
        lines += ["", f"![alpha sweep]({plot.name})"]
    return "\n".join(lines) + "\n"


def token_classes_of(exp: Experiment) -> dict[str, Any]:
    """Per task, :func:`.analysis.token_classes` of the saved token records."""
    from ..analysis.records import load_records

    out = {}
    for task in exp.config.tasks:
        path = exp.out / "analysis" / task / "records.jsonl"
        if path.is_file():
            out[task] = token_classes(load_records(path))
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _write_csv(path: Path, tasks: dict[str, Any]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "task",
                "metric",
                "system",
                "alpha",
                "n",
                "score",
                "low",
                "high",
                "gap_closed",
                "gap_low",
                "gap_high",
            ]
        )
        for task, res in tasks.items():
            for metric, rows in res["metrics"].items():
                for system, row in rows.items():
                    e: Estimate = row["estimate"]
                    g: Estimate | None = row.get("gap")
                    gap = (None, None, None) if g is None else (g.value, g.low, g.high)
                    w.writerow(
                        [
                            task,
                            metric,
                            system,
                            row.get("alpha"),
                            res["n"],
                            e.value,
                            e.low,
                            e.high,
                            *gap,
                        ]
                    )


def _plot_sweep(exp: Experiment, sweep: dict[str, Any]) -> Path | None:
    """Validation score against alpha, one panel per task, one line per rule."""
    if not sweep:
        return None
    try:
        require("matplotlib", "plots", "alpha_sweep.png")
    except MissingExtraError as err:
        warnings.warn(f"no alpha_sweep.png: {err}", stacklevel=2)
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(sweep), 3.6), dpi=110)
    FigureCanvasAgg(fig)
    for i, (task, rules) in enumerate(sweep.items()):
        ax = fig.add_subplot(1, len(sweep), i + 1)
        for rule, points in rules.items():
            xs = [float(a) for a, v in points.items() if v is not None]
            ys = [100 * v for v in points.values() if v is not None]
            ax.plot(xs, ys, marker="o", label=rule)
        ax.set_title(f"{task} (validation)")
        ax.set_xlabel("alpha")
        ax.set_ylabel(f"{task_kind(task).primary} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = exp.out / "alpha_sweep.png"
    fig.savefig(path)
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, Estimate):
        return {"value": value.value, "low": value.low, "high": value.high}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
