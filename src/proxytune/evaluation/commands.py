"""The bodies of ``proxytune eval`` and ``proxytune analyze`` (:mod:`proxytune.cli` only parses
options).

Both take an already built tuner, so that tests and notebooks can call them directly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..tuner import ProxyTuner


def run_eval(
    tuner: ProxyTuner,
    task_spec: str,
    *,
    alphas: Sequence[float] = (),
    systems: Sequence[str] = ("base", "expert", "proxy"),
    tuned: Any = None,
    rule: Any = None,
    out: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    resume: bool = True,
    progress: bool = True,
    workers: int = 2,
    gold_only: bool = False,
    settings: dict[str, Any] | None = None,
    task_overrides: dict[str, Any] | None = None,
    search: str | None = None,
    validation_size: int = 0,
    metric: str | None = None,
    trials: int = 10,
    seed: int = 0,
    as_json: bool = False,
    against: str | Path | None = None,
    gate_metric: str | None = None,
    max_drop: float = 0.0,
    runner: Any = None,
) -> int:
    """Evaluate (or search alpha on a validation split, then test) and print the table.

    ``against``: an earlier run's folder; the new results are compared with it example by
    example (:mod:`.gate`), and the return code is 1 when ``gate_metric`` dropped by more than
    ``max_drop`` in any system. ``runner``: where batches are scored
    (:data:`~.runner.BatchRunner`; default here)."""
    if against is not None and search is not None:
        raise ConfigError("--against compares plain eval runs; leave --search out")
    if gate_metric is not None and against is None:
        raise ConfigError("--gate-metric needs --against OLD_RUN (the run to compare with)")
    # lazy: torch and yaml; cli/analyze imports this module at the CLI's start
    from .runner import evaluate
    from .search import search as run_search
    from .systems import standard_systems
    from .tasks import load_task

    task = load_task(task_spec, **(task_overrides or {}))
    out_dir = Path(out or Path("runs") / "eval" / task.name)
    options = {
        "limit": limit,
        "batch_size": batch_size,
        "resume": resume,
        "progress": progress,
        "workers": workers,
        "gold_only": gold_only,
        "settings": settings,
        "runner": runner,
    }
    if search is not None:
        found = run_search(
            task,
            tuner,
            out_dir,
            **_search_settings(tuner, search, alphas, rule, metric, trials, seed, validation_size),
            tuned=tuned,
            **options,
        )
        _print_search(found, out_dir, as_json)
        return 0
    chosen = standard_systems(tuner, alphas, include=systems, tuned=tuned, rule=rule)
    split = "test" if validation_size else "all"
    report = evaluate(
        task,
        chosen,
        out_dir,
        split=split,
        validation_size=validation_size,
        seed=seed,
        **options,
    )
    if as_json:
        print(json.dumps(report.to_dict()))
    else:
        print(report.table())
        print(f"\nper-example results and summary in {out_dir}")
    if against is None:
        return 0
    return _gate(out_dir, Path(against), gate_metric, max_drop, seed)


def _search_settings(
    tuner: ProxyTuner,
    method: str,
    alphas: Sequence[float],
    rule: Any,
    metric: str | None,
    trials: int,
    seed: int,
    validation_size: int,
) -> dict[str, Any]:
    """:func:`~.search.search`'s settings from the command's (the default alpha grid and
    range where none are given)."""
    if not tuner.pairs:
        raise ConfigError("an alpha search needs an expert/anti-expert pair")
    return {
        "validation_size": validation_size,
        "alphas": alphas or (0.0, 0.25, 0.5, 1.0, 1.5, 2.0),
        "rules": (rule,),
        "metric": metric,
        "method": method,
        "trials": trials,
        "seed": seed,
        "alpha_range": (min(alphas), max(alphas)) if len(alphas) >= 2 else (0.0, 2.0),
    }


def _print_search(result: Any, out_dir: Path, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), default=str))
        return
    print(result.summary())
    best = result.best
    print(
        f"\nbest: {best['system']} (validation {result.metric} = "
        f"{best['validation']:.4f}); test {result.metric} = "
        f"{_num(result.best_test_score)}\nresults in {out_dir}"
    )


def _gate(new: Path, old: Path, metric: str | None, max_drop: float, seed: int) -> int:
    """Print the comparison with ``old``; 1 when the gated metric dropped."""
    # lazy: numpy, only with --against
    from .gate import compare_runs, failures, table

    changes = compare_runs(new, old, seed=seed)
    failed = [] if metric is None else failures(changes, metric, max_drop)
    print(f"\nagainst {old} (paired by example; change = new - old):")
    print(table(changes, failed))
    if failed:
        names = ", ".join(f"{c.system} {c.metric} {c.new - c.old:+.3f}" for c in failed)
        print(f"gate: FAILED ({names}; allowed drop {max_drop})")
        return 1
    if metric is not None:
        print(f"gate: passed ({metric}, allowed drop {max_drop})")
    return 0


def run_analyze(
    tuner: ProxyTuner,
    prompts: Sequence[str],
    *,
    alpha: float | None = None,
    rule: Any = None,
    out: str | None = None,
    top_tokens: int = 20,
    min_count: int = 1,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
    as_json: bool = False,
) -> int:
    """Generate, record every token, write the report; print the most promoted tokens."""
    # lazy: torch; cli/analyze imports this module at the CLI's start
    from ..analysis import analyze, write_report

    if not prompts:
        raise ConfigError("give at least one prompt (arguments or --prompts-file)")
    records = analyze(tuner, prompts, alpha=alpha, rule=rule, progress=progress, **(settings or {}))
    out_dir = Path(out or Path("runs") / "analysis")
    paths = write_report(records, out_dir, top_tokens=top_tokens, min_count=min_count)
    summary = json.loads(paths["summary"].read_text())
    if as_json:
        print(json.dumps(summary))
        return 0
    print(
        f"{summary['tokens']} tokens in {summary['sequences']} sequences; mean shift "
        f"{_num(summary['mean_shift'])} nats; mean KL(base||combined) "
        f"{_num(summary['mean_kl_base_combined'])}; steering changed the top choice "
        f"{summary['promoted_to_top']} times"
    )
    print("\nmost promoted tokens (mean shift, count):")
    for row in summary["most_promoted"][:top_tokens]:
        print(f"  {row['token']!r:>16}  {row['mean_shift']:+.3f}  x{row['count']}")
    print(f"\nreport: {paths['html']}")
    return 0


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: a ``.jsonl`` of ``{"prompt": ...}`` objects, else one per line."""
    text = Path(path).expanduser().read_text(encoding="utf-8")
    if path.endswith(".jsonl"):
        out = []
        for line in text.splitlines():
            if line.strip():
                row = json.loads(line)
                out.append(row["prompt"] if isinstance(row, dict) else str(row))
        return out
    return [line for line in text.splitlines() if line.strip()]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
