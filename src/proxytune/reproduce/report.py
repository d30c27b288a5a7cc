"""The reproduction's tables (Markdown, CSV, JSON) and the alpha-sweep plot, from the stored
per-example results and stage stamps."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..analysis.records import load_records
from ..evaluation.runner import _safe
from ..evaluation.stats import (
    Estimate,
    aligned,
    diff_interval,
    gap_interval,
    mean_gap_interval,
    mean_interval,
)
from ..evaluation.store import ResultStore
from ..extras import MissingExtraError, require
from .analysis import CLASSES, token_classes
from .config import PRIMARY_ALPHA, STAGES, swept_name
from .screen import SelectionRule, pct, screening_table

if TYPE_CHECKING:
    from .pipeline import Experiment

REFERENCES = ("base", "base-3shot", "expert", "tuned")
MIN_GAP = 0.25
"""Gap closed is reported only where the lower bound of tuned - base is at least this."""
DIFFERENCES = (
    ("proxy", "base"),
    ("tuned", "proxy"),
    ("proxy", "expert"),
    ("proxy", "base-3shot"),
    ("tuned", "base"),
)
"""Paired differences reported for every task (``proxy``: alpha 1)."""


def per_example(out: Path, task: str, split: str, system: str, metric: str) -> dict[str, Any]:
    """``{example id: score}`` of one system's stored results."""
    rows = ResultStore(out / "eval" / task / split / f"{_safe(system)}.jsonl").load()
    return {i: r.get("scores", {}).get(metric) for i, r in rows.items()}


def test_ids(exp: Experiment, task: str) -> list[str]:
    """The ids of a task's test examples, in order (those the base was scored on)."""
    return sorted(ResultStore(exp.out / "eval" / task / "test" / "base.jsonl").load())


def systems_of(exp: Experiment, task: str) -> list[str]:
    """The systems of a task's test table (``proxy@val`` where its alpha is not 1)."""
    rules = [r for r in exp.config.rules if r != "proxy"]
    val = ["proxy@val"] if exp.chosen_alphas()[task]["proxy"] != PRIMARY_ALPHA else []
    return [*REFERENCES, "proxy", *val, *rules]


def task_results(exp: Experiment, task: str) -> dict[str, Any]:
    """Every system's score per metric with intervals, the paired differences, and gap
    closed per rule where the tuned model's lead over the base is sure to be a real gap."""
    kind = exp.kind(task)
    chosen = exp.chosen_alphas()[task]
    systems = systems_of(exp, task)
    alphas = {"proxy": PRIMARY_ALPHA, "proxy@val": chosen["proxy"]}
    alphas.update({r: chosen[r] for r in exp.config.rules if r != "proxy"})
    ids = test_ids(exp, task)
    out: dict[str, Any] = {"n": len(ids), "primary": kind.primary, "metrics": {}}
    for metric in kind.metrics:
        scores = aligned({s: per_example(exp.out, task, "test", s, metric) for s in systems}, ids)
        diffs = {f"{a} - {b}": diff_interval(scores[a], scores[b]) for a, b in DIFFERENCES}
        gap = diffs["tuned - base"]
        has_gap = gap.low is not None and gap.low >= MIN_GAP
        rows: dict[str, Any] = {}
        for s in systems:
            row: dict[str, Any] = {"estimate": mean_interval(scores[s]), "alpha": alphas.get(s)}
            if s not in REFERENCES:
                if has_gap:
                    closed, undefined = gap_interval(scores[s], scores["base"], scores["tuned"])
                    row.update(gap=closed, gap_undefined_resamples=undefined)
                row["minus_base"] = diff_interval(scores[s], scores["base"])
            rows[s] = row
        out["metrics"][metric] = {"systems": rows, "differences": diffs, "has_gap": has_gap}
    return out


def controls_of(exp: Experiment) -> list[str]:
    """The run's negative controls (none where the user named the tasks)."""
    return [t for t in exp.tasks if t in exp.config.controls and exp.config.tasks is None]


def mean_closure(exp: Experiment, tasks: dict[str, Any]) -> dict[str, Any]:
    """Per steered system: gap closed averaged over the chosen tasks with a gap (controls
    left out), primary metric, with a stratified-bootstrap interval; and the tasks averaged."""
    chosen = [
        t
        for t in exp.tasks
        if t not in controls_of(exp) and tasks[t]["metrics"][tasks[t]["primary"]]["has_gap"]
    ]
    if not chosen:
        return {"tasks": [], "systems": {}}
    per_task = [systems_of(exp, t) for t in chosen]
    systems = [s for s in per_task[0] if s not in REFERENCES and all(s in p for p in per_task)]
    ids = {task: test_ids(exp, task) for task in chosen}
    out: dict[str, Estimate] = {}
    for system in systems:
        triples = []
        for task in chosen:
            names = (system, "base", "tuned")
            metric = tasks[task]["primary"]
            loaded = {s: per_example(exp.out, task, "test", s, metric) for s in names}
            scores = aligned(loaded, ids[task])
            triples.append(tuple(scores[s] for s in names))
        out[system] = mean_gap_interval(triples)
    return {"tasks": chosen, "systems": out}


def predicted_vs_measured(screen: dict[str, Any] | None, tasks: dict[str, Any]) -> dict[str, Any]:
    """Per screened task: the closure the screen (its stage result) predicted and the one
    measured (``proxy`` at alpha 1, the primary metric)."""
    if not screen:
        return {}
    predicted = {t: r["predicted_closure"] for t, r in screen["screened"].items()}
    out = {}
    for task, res in tasks.items():
        if task not in predicted:
            continue
        m = res["metrics"][res["primary"]]
        measured = m["systems"]["proxy"].get("gap")
        out[task] = {
            "predicted": predicted[task],
            "measured": None if measured is None else measured.value,
            "interval": measured,
            "has_gap": m["has_gap"],
            "difference": m["differences"]["proxy - base"],
        }
    return out


def outputs(out: Path, task: str, system: str) -> dict[str, str]:
    """``{example id: first output, stripped}`` of one system's stored test results."""
    rows = ResultStore(out / "eval" / task / "test" / f"{_safe(system)}.jsonl").load()
    return {i: (r.get("outputs") or [""])[0].strip() for i, r in rows.items()}


def follow(exp: Experiment, task: str) -> dict[str, Any]:
    """Whose answers the proxy gives: how often its output equals the expert's and the
    tuned model's, and its accuracy where the expert was right or wrong (primary metric).
    A proxy that merely copies the small expert is right only where the expert is."""
    metric = exp.kind(task).primary
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


def format_shares(exp: Experiment, task: str) -> dict[str, float | None]:
    """Per test system: the share of its outputs in the taught format, right or wrong. Beside
    the lenient score (the content in any format) it says which part of a gap stayed open:
    the format, or the content."""
    follows = exp.kind(task).follows_format
    shares: dict[str, float | None] = {}
    for system in systems_of(exp, task):
        outs = outputs(exp.out, task, system)
        shares[system] = sum(map(follows, outs.values())) / len(outs) if outs else None
    return shares


def write_results(exp: Experiment) -> dict[str, Any]:
    """Write ``results.md``, ``results.csv``, ``results.json`` and ``alpha_sweep.png``."""
    tasks = {t: task_results(exp, t) for t in exp.tasks}
    stages = {}
    for stage in STAGES[:-1]:  # every stage but the report itself
        stamp = exp.done(stage)
        if stamp is not None:
            stages[stage] = {"seconds": stamp["seconds"], **stamp.get("result", {})}
    following = {t: follow(exp, t) for t in exp.tasks}
    formats = {t: format_shares(exp, t) for t in exp.tasks}
    predictions = predicted_vs_measured(stages.get("screen"), tasks)
    averaged = mean_closure(exp, tasks)
    data = {
        "config": exp.config.to_dict(),
        "stages": stages,
        "tasks": _plain(tasks),
        "predictions": _plain(predictions),
        "mean_closure": _plain(averaged),
        "follow": following,
        "format": formats,
        "token_classes": token_classes_of(exp),
    }
    (exp.out / "results.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    _write_csv(exp.out / "results.csv", tasks)
    plot = _plot_sweep(exp, stages.get("validation", {}).get("sweep", {}))
    text = markdown(
        exp, tasks, stages, plot, following, data["token_classes"], predictions, formats, averaged
    )
    (exp.out / "results.md").write_text(text, encoding="utf-8")
    return data


def markdown(
    exp: Experiment,
    tasks: dict[str, Any],
    stages: dict[str, Any],
    plot: Any,
    following: dict[str, Any],
    classes: dict[str, Any],
    predictions: dict[str, Any],
    formats: dict[str, dict[str, float | None]],
    averaged: dict[str, Any],
) -> str:
    """``results.md``: one section per table, each from the stored results alone."""
    lines = [
        *_header(exp),
        *_screening(exp, stages.get("screen")),
        *_predictions(predictions),
        *_averaged(averaged),
        *_main_table(exp, tasks),
        *_differences(tasks),
        *_formats(exp, tasks, formats),
        *_rules(tasks),
        *_sweep(stages.get("validation", {}).get("sweep", {})),
        *_training_lines(stages),
        *_following(following),
        *_classes(classes),
        "",
        "## Wall time per stage",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {s} | {v['seconds']:.0f} |" for s, v in stages.items()),
    ]
    if plot is not None:
        lines += ["", f"![alpha sweep]({plot.name})"]
    return "\n".join(lines) + "\n"


def _header(exp: Experiment) -> list[str]:
    cfg = exp.config
    controls = controls_of(exp)
    return [
        "# Proxy-tuning reproduction",
        "",
        f"Small model (expert = LoRA of it, anti-expert = it untuned): `{cfg.small}`; base and "
        f"directly tuned reference (LoRA, same data and recipe): `{cfg.big}`. Scores in %, "
        "95% bootstrap intervals in brackets, the same resampled examples for every system "
        "(paired). `proxy` is the paper's rule at alpha 1; `proxy@val` at the alpha chosen on "
        "validation. Gap closed = (proxy - base) / (tuned - base), shown only where the lower "
        f"bound of tuned - base is at least {100 * MIN_GAP:.0f} points (else `no gap`); "
        "`[unstable]`: in over 2.5% of resamples the tuned model did not beat the base."
        + (f" Negative control: {', '.join(controls)}." if controls else ""),
    ]


def _screening(exp: Experiment, screen: dict[str, Any] | None) -> list[str]:
    if not screen or not screen.get("screened"):
        return []
    rule = SelectionRule(**exp.config.to_dict()["selection"])
    return [
        "",
        "## Screening (untuned, before training)",
        "",
        *screening_table(screen["screened"], screen.get("chosen", []), rule),
    ]


def _predictions(predictions: dict[str, Any]) -> list[str]:
    if not predictions:
        return []
    lines = [
        "",
        "## Predicted against measured gap closed (primary metric, proxy at alpha 1)",
        "",
        "| task | predicted | measured | proxy - base |",
        "|---|---|---|---|",
    ]
    for task, p in predictions.items():
        measured = p["interval"].percent() if p["has_gap"] and p["interval"] else "no gap"
        lines.append(
            f"| {task} | {pct(p['predicted'])} | {measured} | {p['difference'].percent()} |"
        )
    return lines


def _averaged(averaged: dict[str, Any]) -> list[str]:
    if not averaged["systems"]:
        return []
    return [
        "",
        "## Gap closed averaged over the chosen tasks (test split, primary metric)",
        "",
        f"Tasks: {', '.join(averaged['tasks'])} (controls and tasks without a gap left out;"
        " each task resampled on its own). `proxy` is alpha 1.",
        "",
        "| system | mean gap closed |",
        "|---|---|",
        *(f"| {s} | {e.percent()} |" for s, e in averaged["systems"].items()),
    ]


def _main_table(exp: Experiment, tasks: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Main result (test split)",
        "",
        "| task | metric | n | base | base 3-shot | expert | proxy (a=1) | proxy@val (a) | "
        "tuned | gap closed (a=1) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, res in tasks.items():
        for metric, m in res["metrics"].items():
            rows = m["systems"]
            val = rows.get("proxy@val", rows["proxy"])
            lines.append(
                f"| {task} | {metric} | {res['n']} | {rows['base']['estimate'].percent()} | "
                f"{rows['base-3shot']['estimate'].percent()} | "
                f"{rows['expert']['estimate'].percent()} | "
                f"{rows['proxy']['estimate'].percent()} | "
                f"{val['estimate'].percent()} ({exp.chosen_alphas()[task]['proxy']:g}) | "
                f"{rows['tuned']['estimate'].percent()} | {_gap(rows['proxy'], m)} |"
            )
    return lines


def _differences(tasks: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Paired differences (test split, points; proxy at alpha 1)",
        "",
        "| task | metric | " + " | ".join(f"{a} - {b}" for a, b in DIFFERENCES) + " | verdict |",
        "|---|---|" + "---|" * (len(DIFFERENCES) + 1),
    ]
    for task, res in tasks.items():
        for metric, m in res["metrics"].items():
            d = m["differences"]
            vs_fewshot = d["proxy - base-3shot"]
            verdict = (
                "proxy beats the 3-shot base"
                if vs_fewshot.low is not None and vs_fewshot.low > 0
                else "proxy not above the 3-shot base: not worth its cost"
            )
            cells = [d[f"{a} - {b}"].percent() for a, b in DIFFERENCES]
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + f" | {verdict} |")
    return lines


def _formats(
    exp: Experiment, tasks: dict[str, Any], formats: dict[str, dict[str, float | None]]
) -> list[str]:
    lines = [
        "",
        "## Format or content (test split)",
        "",
        "Per system: the share of outputs in the taught format (right or wrong), then the "
        "lenient score (the right content in any format) and the primary score. A proxy whose "
        "format share is high but whose lenient score is below the base's lost content; one "
        "whose lenient score matches the base's but whose format share is low did not carry "
        "the format.",
        "",
        "| task | system | format followed | lenient | primary |",
        "|---|---|---|---|---|",
    ]
    for task, res in tasks.items():
        lenient, primary = exp.kind(task).lenient, res["primary"]
        for system, share in formats[task].items():
            rows = {m: res["metrics"][m]["systems"][system] for m in res["metrics"]}
            cells = [pct(share)] + [
                rows[m]["estimate"].percent() if m in rows else "-" for m in (lenient, primary)
            ]
            lines.append(f"| {task} | {system} | " + " | ".join(cells) + " |")
    return lines


def _rules(tasks: dict[str, Any]) -> list[str]:
    others = list(
        dict.fromkeys(
            s
            for res in tasks.values()
            for m in res["metrics"].values()
            for s in m["systems"]
            if s not in REFERENCES
        )
    )
    lines = [
        "",
        "## Steering rules compared (test split; proxy at 1, the others at their validated alpha)",
        "",
        "| task | metric | " + " | ".join(others) + " |",
        "|---|---|" + "---|" * len(others),
    ]
    for task, res in tasks.items():
        for metric, m in res["metrics"].items():
            rows = m["systems"]
            cells = [
                f"{rows[r]['estimate'].percent()} ({swept_name(r)}={rows[r]['alpha']:g}; "
                + (f"gap {_gap(rows[r], m)})" if m["has_gap"] else "no gap)")
                if r in rows
                else "-"
                for r in others
            ]
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return lines


def _sweep(sweep: dict[str, Any]) -> list[str]:
    if not sweep:
        return []
    alphas = sorted({float(a) for rules in sweep.values() for p in rules.values() for a in p})
    names = [f"{a:g}" for a in alphas]
    lines = [
        "",
        "## Validation sweep (primary metric, %)",
        "",
        "| task | rule | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for task, rules in sweep.items():
        for rule, points in rules.items():
            cells = ["-" if points.get(a) is None else f"{100 * points[a]:.1f}" for a in names]
            lines.append(f"| {task} | {rule} | " + " | ".join(cells) + " |")
    return lines


def _following(following: dict[str, Any]) -> list[str]:
    if not any(following.values()):
        return []
    lines = [
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
                f"| {task} | {pct(f['same_as_expert'])} | {pct(f['same_as_tuned'])} | "
                f"{pct(f['proxy_right_where_expert_right'])} (n={f['expert_right']}) | "
                f"{pct(f['proxy_right_where_expert_wrong'])} (n={f['expert_wrong']}) |"
            )
    return lines


def _classes(classes: dict[str, Any]) -> list[str]:
    if not classes:
        return []
    lines = [
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
    return lines


def _gap(row: dict[str, Any], metric: dict[str, Any]) -> str:
    if not metric["has_gap"]:
        return "no gap"
    return row["gap"].percent()


def _training_lines(stages: dict[str, Any]) -> list[str]:
    """Both models' epochs, losses and (the expert's) format compliance on validation."""
    rows = []
    labels = {"residual": "residual (loss of the alpha-1 proxy)"}
    for stage in ("expert", "tuned", "residual"):
        info = stages.get(stage)
        if not info:
            continue
        loss, val = info.get("train_loss_first_last"), info.get("validation_loss_first_last")
        compliance = info.get("compliance") or {}
        rows.append(
            f"| {labels.get(stage, stage)} | {info.get('epochs', '-')} | "
            + (f"{loss[0]:.3f} -> {loss[1]:.3f}" if loss else "-")
            + " | "
            + (f"{val[0]:.3f} -> {val[1]:.3f}" if val else "-")
            + " | "
            + (", ".join(f"{t} {pct(c)}" for t, c in compliance.items()) or "-")
            + " |"
        )
    if not rows:
        return []
    return [
        "",
        "## Training",
        "",
        "| model | epochs | training loss (first -> last) | validation loss (before -> after) "
        "| format followed on validation |",
        "|---|---|---|---|---|",
        *rows,
    ]


def token_classes_of(exp: Experiment) -> dict[str, Any]:
    """Per task, :func:`.analysis.token_classes` of the saved token records."""
    out = {}
    for task in exp.tasks:
        path = exp.out / "analysis" / task / "records.jsonl"
        if path.is_file():
            out[task] = token_classes(load_records(path))
    return out


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
            for metric, m in res["metrics"].items():
                for system, row in m["systems"].items():
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
        ax.set_ylabel(f"{exp.kind(task).primary} (%)")
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
